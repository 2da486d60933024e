"""Evaluation primitives: metrics on features (metrics), the FID Inception and cached
reference statistics (inception), nearest-neighbour memorization checks (memorization),
and zero-shot classification with a conditional denoiser (diffusion_classifier)."""
