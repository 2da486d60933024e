"""Figures: the pictures that training writes periodically and visualize.py draws on demand."""
import math
import os
import re
import textwrap
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

from data import to_float  # noqa: E402
from files import atomic_path  # noqa: E402


def save_grid(images, path, nrow):
    """images: float in [-1, 1] or uint8, [N, 3, H, W]."""
    if images.dtype == torch.uint8:
        images = to_float(images)
    with atomic_path(path, "picture") as tmp:  # a full disk leaves no truncated picture
        save_image((images.float().cpu() + 1) / 2, tmp, nrow=nrow, padding=2, pad_value=1.0)


def _to_numpy_grid(images, nrow):
    if images.dtype == torch.uint8:
        images = to_float(images)
    grid = make_grid((images.float().cpu() + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)
    return (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def labelled_rows(rows, row_names, path, title=None, col_names=None):
    """A figure of image rows with a name on each row (and optionally each column)."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    size = rows[0].shape[-1]
    fig, axes = plt.subplots(n_rows, 1, figsize=(max(4, n_cols * 0.9 + 1.5), n_rows * 1.0 + 0.6),
                             squeeze=False)
    for ax, images, name in zip(axes[:, 0], rows, row_names):
        ax.imshow(_to_numpy_grid(images, nrow=n_cols), interpolation="nearest" if size <= 64 else "bilinear")
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
        ax.set_xticks([])
    if col_names:
        step = (size + 2)
        axes[0, 0].set_xticks([2 + step * i + size / 2 for i in range(len(col_names))])
        axes[0, 0].set_xticklabels(col_names, fontsize=8)
        axes[0, 0].xaxis.tick_top()
    _save(fig, path, title)


def _save(fig, path, title=None, dpi=120):
    """Title, layout, write, and free the figure (pyplot keeps every open one)."""
    if title:  # 0.08 in from the top: tight_layout leaves it room there, not 2% of a tall figure's height down
        width = max(20, int(fig.get_figwidth() * 12))  # characters of 10 pt text across the figure
        title = "\n".join(textwrap.fill(line, width) for line in title.splitlines())
        fig.suptitle(title, fontsize=10, y=1 - 0.08 / fig.get_figheight())
    fig.tight_layout()
    try:
        with atomic_path(path, "picture") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)


def plot_losses(run, stage, path):
    """Training losses per epoch (and validation metrics) of one stage from metrics.csv."""
    series = defaultdict(list)
    for row in run.read_metrics():
        if row["stage"] == stage and row["name"] not in ("epoch_seconds", "skipped_step"):
            series[row["name"]].append((int(row["epoch"]), float(row["value"])))
    if not series:
        return False
    names = sorted(series)
    cols = min(3, len(names))
    fig, axes = plt.subplots(math.ceil(len(names) / cols), cols, figsize=(4 * cols, 2.6 * math.ceil(len(names) / cols)),
                             squeeze=False)
    for ax, name in zip(axes.flat, names):
        epochs, values = zip(*series[name])
        ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None, ms=3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if all(v > 0 for v in values) and max(values) / max(min(values), 1e-12) > 30:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    _save(fig, path, f"{stage} ({run.folder})", dpi=110)
    return True


def pick_classes(class_names, names=None, limit=10):
    """Indices of the classes a picture shows: the named ones, or an evenly spread readable
    subset when there are many (not just the first two)."""
    if names:
        lowered = {c.lower(): i for i, c in enumerate(class_names)}
        return [lowered[n.lower()] for n in names]
    if len(class_names) <= limit:
        return list(range(len(class_names)))
    return [int(round(i)) for i in np.linspace(0, len(class_names) - 1, limit)]


def class_sample_grid(pipe, path, per_class=8, seed=0, classes=None, title=None, **sample_kwargs):
    """One row of samples per class, labelled. Every row starts from the same noise, seeds seed
    to seed + per_class - 1 (as generate.py draws a class): a class's images do not depend on
    which other classes are shown, and a column shows what the label alone changes."""
    classes = classes if classes is not None else pick_classes(pipe.class_names)
    rows = [pipe.sample([c] * per_class, seed=seed, **sample_kwargs).cpu() for c in classes]
    seeds = f"seed {seed}" if per_class == 1 else f"seeds {seed} to {seed + per_class - 1}"
    labelled_rows(rows, [pipe.class_names[c] for c in classes], path,
                  title=(f"{title}: " if title else "") + f"{pipe.sampling_settings(**sample_kwargs)}, "
                                                             f"{seeds} in every row")
    return torch.cat(rows)


@torch.no_grad()
def reconstruction_grid(vae, images, labels, class_names, path, per_class=8):
    """Held-out images above their VAE reconstructions, for a readable subset of classes."""
    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    rows, names = [], []
    for c in pick_classes(class_names, limit=6):  # a class with fewer held-out images gets a shorter row
        real = images[(labels == c).nonzero().flatten()[:per_class]]
        if len(real):
            rows += [real, vae(to_float(real.to(device)), sample=False)[0].float().clamp(-1, 1).cpu()]
            names += [f"{class_names[c]}\nreal", "reconstruction"]
    vae.train(was_training)
    labelled_rows(rows, names, path, title="VAE reconstructions of held-out images")


def trajectory(pipe, label, seed, num_frames, **sample_kwargs):
    """One sampling run of one image: the decoded x0 estimate and the current x_t at every step."""
    frames, states = [], []

    def keep(i, t, x, x0):
        states.append((int(t), x.detach().clone(), x0.detach().clone()))

    final = pipe.sample([label], seed=seed, callback=keep, **sample_kwargs)
    idx = np.unique(np.linspace(0, len(states) - 1, num_frames).round().astype(int))
    for i in idx:
        t, x, x0 = states[i]
        frames.append((t, pipe.decode(x)[0].cpu(), pipe.decode(x0)[0].cpu()))
    return frames, final[0].cpu(), states


def _state_name(pipe):
    """A latent model's noisy state decoded by its VAE does not look like noise: say what it is."""
    return "x_t" if pipe.vae is None else "x_t, decoded\nby the VAE"


def denoising_steps_figure(pipe, label, path, seed=0, num_frames=10, **sample_kwargs):
    """One sampling chain at several steps: the noisy state (top) and its clean estimate (bottom)."""
    frames, _, _ = trajectory(pipe, label, seed, num_frames, **sample_kwargs)
    rows = [torch.stack([f[1] for f in frames]), torch.stack([f[2] for f in frames])]
    labelled_rows(rows, [_state_name(pipe), "x0 estimate"], path, col_names=[f"t={f[0]}" for f in frames],
                  title=f"one reverse-diffusion run, class '{pipe.class_names[label]}', "
                        f"{pipe.sampling_settings(**sample_kwargs)}, seed {seed}")


def denoising_animation(pipe, label, path, seed=0, num_frames=40, fps=8, **sample_kwargs):
    """GIF of the reverse process of one real sampling run: the noisy state beside its x0
    estimate, each frame captioned with its timestep. Returns the captions, frame by frame."""
    import imageio.v2 as imageio
    frames, final, _ = trajectory(pipe, label, seed, num_frames, **sample_kwargs)
    settings = f"'{pipe.class_names[label]}', seed {seed}\n{pipe.sampling_settings(**sample_kwargs)}"
    state = _state_name(pipe).replace("\n", " ")
    shown = [(f"t = {t}", x, x0) for t, x, x0 in frames] + [("final sample", final, None)]
    pictures = [_animation_frame(x, x0, f"{settings}\n{caption}", state) for caption, x, x0 in shown]
    with atomic_path(path, "animation") as tmp:  # the last frame is held 4 times as long
        imageio.mimsave(tmp, pictures, duration=[1000 / fps] * len(frames) + [4000 / fps], loop=0)
    return [caption for caption, _, _ in shown]


def _animation_frame(x, x0, caption, state_name):
    """One GIF frame as an RGB array: x beside its x0 estimate, or x alone in the middle when x0
    is None (the final sample). A fixed figure size keeps every frame the same shape."""
    fig = plt.figure(figsize=(4.4, 2.9), dpi=100)
    boxes = [[0.02, 0.02, 0.47, 0.7], [0.51, 0.02, 0.47, 0.7]] if x0 is not None else [[0.265, 0.02, 0.47, 0.7]]
    for box, image, name in zip(boxes, (x, x0), (state_name, "x0 estimate")):
        ax = fig.add_axes(box)
        ax.imshow(_to_numpy_grid(image[None], nrow=1), interpolation="nearest")
        ax.set_title(name if x0 is not None else "", fontsize=9)
        ax.axis("off")
    fig.suptitle(caption, fontsize=8)
    fig.canvas.draw()
    picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return picture


def forward_process_figure(schedule, image_uint8, path, num_columns=10, seed=0, latent=False):
    """One real image noised along the schedule, x_t = alpha_t x0 + sigma_t eps, in pixels (a
    latent model, latent=True, noises its VAE's standardized latents instead: the title says so)."""
    x0 = to_float(image_uint8[None])
    ts = torch.linspace(0, schedule.timesteps - 1, num_columns).round().long()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    row = torch.cat([schedule.q_sample(x0, t[None], noise) for t in ts]).clamp(-1, 1)
    labelled_rows([torch.cat([x0, row[1:]])], ["x_t"], path,
                  col_names=["x0"] + [f"t={int(t)}" for t in ts[1:]],
                  title=f"forward process, noise added to the pixels ({schedule.kind} schedule, "
                        f"T={schedule.timesteps})" + ("\nthe model itself noises its VAE's standardized "
                                                      "latents, not pixels" if latent else ""))


def steps_comparison_figure(pipe, label, path, seed=0, step_counts=(5, 10, 20, 40),
                            samplers=("ddim", "dpmpp", "ddpm"), per_row=4, **sample_kwargs):
    """The same seeds and class at several step counts, one row per sampler and step count, a
    column per seed (image i starts from seed + i)."""
    rows, names = [], []
    step_counts = sorted({min(steps, pipe.cfg.timesteps) for steps in step_counts})  # as many as the run has
    for sampler in samplers:
        for steps in step_counts:
            rows.append(pipe.sample([label] * per_row, sampler=sampler, steps=steps, seed=seed, **sample_kwargs).cpu())
            names.append(f"{sampler} {steps}")
    guidance = pipe.sampling_settings(**sample_kwargs).split(", ", 1)[1]
    labelled_rows(rows, names, path, col_names=[f"seed {seed + i}" for i in range(per_row)],
                  title=f"'{pipe.class_names[label]}', {guidance}: a column per seed (the same seeds in every "
                        f"row),\na row per sampler and step count")


def latent_space_figure(latents, labels, class_names, centers, path, seed=0):
    """t-SNE and PCA of encoded held-out images coloured by class, with class centers."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    feats = latents.flatten(1).numpy()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    classes = sorted(set(labels.tolist()))
    colors = class_colors(classes)
    pca = PCA(n_components=2, random_state=seed).fit(feats)
    both = np.concatenate([feats, centers]) if centers is not None else feats
    perplexity = max(1.0, min(30.0, (len(both) - 1) / 3))  # below the point count, as t-SNE needs
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(both)
    for ax, xy, title in ((axes[0], tsne, "t-SNE"), (axes[1], pca.transform(both), "PCA")):
        points = xy[:len(feats)]
        for j, c in enumerate(classes):
            mask = labels.numpy() == c
            ax.scatter(points[mask, 0], points[mask, 1], s=6, alpha=0.6, color=colors[c], label=class_names[c])
        if centers is not None:
            _mark_centers(ax, xy[len(feats):][classes], [class_names[c] for c in classes],
                          [colors[c] for c in classes], tol=0.03 * np.ptp(xy, axis=0).max())
        ax.set_title(f"{title} of held-out latents (X: class centers)", fontsize=10)
    axes[0].legend(fontsize=8, markerscale=2, loc="best")
    _save(fig, path)


def class_colors(classes):
    """A colour per shown class, by its place among them (distinct for up to 20 classes), so the
    latent-space and denoising-path figures of the same classes colour them alike."""
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    return {c: cmap(j % cmap.N) for j, c in enumerate(sorted(classes))}


def _mark_centers(ax, xy, names, colors, tol):
    """Class centers as X's in their class's colour, each named; a center on (within tol of) an
    earlier one gets a smaller X on top and its name below the other's, so every one stays visible."""
    for i, ((x, y), name, color) in enumerate(zip(xy, names, colors)):
        k = int((np.hypot(*(xy[:i] - (x, y)).T) <= tol).sum())  # earlier centers it would hide under
        ax.scatter(x, y, marker="X", s=160 * 0.55 ** k, color=color, edgecolor="black", zorder=3 + k)
        ax.annotate(name, (x, y), xytext=(8, 4 - 11 * k), textcoords="offset points", fontsize=8,
                    bbox=dict(boxstyle="round,pad=0.15", fc=color, alpha=0.5, lw=0))


def denoising_path_figure(pipe, label, real_latents, real_labels, path, num_samples=6, seed=0, **sample_kwargs):
    """Paths of several samples through latent space during one sampling run (the x0 estimate
    at each step), projected with PCA fitted on real latents, drawn over the real latents."""
    from sklearn.decomposition import PCA
    states = []
    pipe.sample([label] * num_samples, seed=seed, decode=False,
                callback=lambda i, t, x, x0: states.append(x0.detach().float().cpu()), **sample_kwargs)
    pca = PCA(n_components=2, random_state=seed).fit(real_latents.flatten(1).numpy())
    fig, ax = plt.subplots(figsize=(7, 6))
    real_xy = pca.transform(real_latents.flatten(1).numpy())
    colors = class_colors(set(real_labels.tolist()) | {label})
    for c in sorted(set(real_labels.tolist())):
        mask = real_labels.numpy() == c
        ax.scatter(real_xy[mask, 0], real_xy[mask, 1], s=5, alpha=0.25, color=colors[c],
                   label=f"real {pipe.class_names[c]}")
    path_xy = np.stack([pca.transform(s.flatten(1).numpy()) for s in states])  # [steps, samples, 2]
    for k in range(num_samples):
        ax.plot(path_xy[:, k, 0], path_xy[:, k, 1], "-", color="black", lw=1, alpha=0.7)
        ax.scatter(path_xy[0, k, 0], path_xy[0, k, 1], marker="o", color="white", edgecolor="black", s=30, zorder=3)
        ax.scatter(path_xy[-1, k, 0], path_xy[-1, k, 1], marker="*", color=colors[label],
                   edgecolor="black", s=140, zorder=3)
    share = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC 1 of the real latents ({share[0]:.0%} of their variance)", fontsize=8)
    ax.set_ylabel(f"PC 2 of the real latents ({share[1]:.0%} of their variance)", fontsize=8)
    ax.set_title(f"denoising paths of {num_samples} '{pipe.class_names[label]}' samples (x0 estimate per step; "
                 f"o start, * end), PCA of real latents\n{pipe.sampling_settings(**sample_kwargs)}, seeds {seed} to "
                 f"{seed + num_samples - 1}", fontsize=9)
    ax.legend(fontsize=7, markerscale=2)
    _save(fig, path)


def sweep_figure(rows, path, title=None):
    """A sampling sweep's trade-off: sample accuracy, Frechet distance and KID (with its standard
    error) against the guidance scale, one line per sampler, steps, guidance schedule and interval;
    dashed, the real held-out images' accuracy and FD."""
    series = defaultdict(list)
    for r in rows:
        lo, hi = r["guidance_interval"]
        interval = "" if lo == 0 and hi is None else f", in ({lo:g}, {hi:g}]"
        series[f"{r['sampler']} {r['steps']}, {r['guidance_schedule']}{interval}"].append(r)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [("sample_accuracy", "sample accuracy", "real_heldout_accuracy"),
              ("classifier_fd", "classifier FD", "classifier_fd_real_floor"), ("classifier_kid", "KID", None)]
    for ax, (key, name, real) in zip(axes, panels):
        for label, points in series.items():
            points = sorted(points, key=lambda r: r["guidance_scale"])
            scales = [r["guidance_scale"] for r in points]
            errors = [r["classifier_kid_std"] for r in points] if key == "classifier_kid" else None
            ax.errorbar(scales, [r[key] for r in points], yerr=errors, marker="o", ms=4, capsize=3, label=label)
        if real and rows[0].get(real) is not None:
            ax.axhline(rows[0][real], color="gray", ls="--", lw=1, label="real held-out images")
        ax.set_xlabel("guidance scale", fontsize=8)
        ax.set_title(name, fontsize=9)
    axes[0].legend(fontsize=7)
    _save(fig, path, title, dpi=110)


def save_individual(images, folder, prefix):
    """One PNG per image, numbered; numbered images left by an earlier, larger call are removed so
    that the folder holds exactly this set (tools that score a folder of images would mix them)."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        p = os.path.join(folder, f"{prefix}_{i:03d}.png")
        with atomic_path(p, "image") as tmp:
            save_image((img.float().cpu() + 1) / 2, tmp)
        paths.append(p)
    numbered = re.compile(re.escape(prefix) + r"_(\d{3,})\.png")
    for name in os.listdir(folder):
        match = numbered.fullmatch(name)
        if match and int(match.group(1)) >= len(images):
            os.remove(os.path.join(folder, name))
    return paths


__all__ = ["save_grid", "labelled_rows", "plot_losses", "class_sample_grid", "reconstruction_grid",
           "denoising_steps_figure", "denoising_animation", "forward_process_figure",
           "steps_comparison_figure", "latent_space_figure", "denoising_path_figure", "sweep_figure",
           "save_individual"]
