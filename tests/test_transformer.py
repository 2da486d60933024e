"""The pixel-space diffusion transformer: shapes, mixed precision, per-block weights, linear
attention against its O(N^2) definition, determinism, the null label, and overfitting one batch."""
import itertools
from types import SimpleNamespace

import pytest
import torch

from diffusion.objective import DiffusionLoss
from diffusion.schedule import NoiseSchedule
from models import build_denoiser
from models.transformer import DiffusionTransformer, linear_attention

NUM_CLASSES = 2
TINY = dict(width=32, depth=2, heads=2, patch_size=4, dropout=0.0, decoder_channels=16)


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: a second thread only adds OpenMP synchronisation, which costs
    several times the work itself when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(attention="linear", image_size=32, seed=0, **overrides):
    torch.manual_seed(seed)
    return DiffusionTransformer(3, image_size, NUM_CLASSES, **{**TINY, "attention": attention, **overrides})


def unzero(model, seed=0):
    """Give the zero-initialised layers (adaLN, output conv) small random values, so that every
    path reaches the output as it does after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def inputs(batch, image_size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, image_size, image_size, generator=g) * 2 - 1
    t = torch.randint(0, 100, (batch,), generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return x, t, y


@pytest.mark.parametrize("attention", ["linear", "softmax"])
@pytest.mark.parametrize("image_size,patch_size", [(32, 4), (64, 2)])
def test_output_shape_and_zero_start(attention, image_size, patch_size):
    model = tiny_model(attention, image_size, patch_size=patch_size)
    x, t, y = inputs(2, image_size)
    out = model(x, t, y)
    assert out.shape == x.shape
    assert not out.any()  # adaLN-Zero and the zero output conv: the zero predictor at the start
    assert unzero(model)(x, t, y).abs().sum() > 0


@pytest.mark.parametrize("attention", ["linear", "softmax"])
def test_bf16_autocast_is_finite(attention):
    model = unzero(tiny_model(attention))
    x, t, y = inputs(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    out.float().pow(2).mean().backward()
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_blocks_have_their_own_weights():
    model = tiny_model(depth=3)
    blocks = [dict(block.named_parameters()) for block in model.blocks]
    all_params = [p for block in blocks for p in block.values()]
    assert len({id(p) for p in all_params}) == len({p.data_ptr() for p in all_params}) == len(all_params)

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, t, y = inputs(4)
    for _ in range(3):  # zero-initialised layers open one after another: output conv, adaLN, branches
        opt.zero_grad()
        (model(x, t, y) - x).pow(2).mean().backward()
        opt.step()
    for a, b in itertools.combinations(blocks, 2):
        for name in a:
            assert not torch.equal(a[name], b[name]), f"{name} is equal in two blocks"


def test_linear_attention_matches_quadratic_definition():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, generator=g, dtype=torch.float64) for _ in range(3))
    phi_q, phi_k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    weights = phi_q @ phi_k.transpose(-1, -2)  # [B, heads, N, N]
    reference = (weights / weights.sum(dim=-1, keepdim=True)) @ v
    out = linear_attention(q, k, v)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)

    # Under bf16 autocast the sums run in float32: only the result is rounded to bf16.
    q, k, v = (x.bfloat16() for x in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, linear_attention(q.float(), k.float(), v.float()).bfloat16())


def test_unpatchify_puts_each_token_on_its_patch():
    model = tiny_model()
    p, g, c = model.patch_size, model.grid_size, model.decoder_channels
    tokens = torch.randn(2, g * g, p * p * c)
    image = model.unpatchify(tokens)
    for i, j in [(0, 0), (0, 5), (3, 1), (g - 1, g - 1)]:  # token i * g + j is the patch at row i, column j
        patch = image[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p]
        assert torch.equal(patch.permute(0, 2, 3, 1).reshape(2, -1), tokens[:, i * g + j])


def test_same_seed_same_model_and_output():
    a, b = unzero(tiny_model(seed=3)), unzero(tiny_model(seed=3))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    x, t, y = inputs(2)
    assert torch.equal(a(x, t, y), b(x, t, y))
    assert not torch.equal(next(tiny_model(seed=4).parameters()), next(a.parameters()))


def test_null_label():
    model = unzero(tiny_model())
    x, t, y = inputs(2)
    null = torch.full_like(y, NUM_CLASSES)
    unconditional = model(x, t, null)
    assert torch.isfinite(unconditional).all()
    assert not torch.allclose(unconditional, model(x, t, y))


def test_from_config_and_size_check():
    cfg = SimpleNamespace(model="transformer", transformer_width=32, transformer_depth=3, transformer_heads=2,
                          patch_size=4, attention="softmax", dropout=0.0, time_embed_dim=None)
    model = build_denoiser(cfg, NUM_CLASSES, 3, 32)
    assert len(model.blocks) == 3 and model.patch_size == 4
    assert model.blocks[0].attention.kind == "softmax" and model.blocks[0].mlp[0].out_features == 128
    with pytest.raises(ValueError, match="divisible"):
        DiffusionTransformer(3, 30, NUM_CLASSES, patch_size=4)


def test_tiny_model_overfits_one_batch():
    model = tiny_model()
    loss_fn = DiffusionLoss(NoiseSchedule("cosine", 100), prediction="v")
    x0, _, y = inputs(8, seed=2)
    g = torch.Generator().manual_seed(3)
    t, noise = torch.randint(0, 100, (8,), generator=g), torch.randn(x0.shape, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(50):
        loss = loss_fn(model, x0, y, t=t, noise=noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
