"""What the pictures say: titles, column and axis labels, and that no mark or label hides another
(the figures are captured before viz.figures writes them)."""
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from diffusion.schedule import NoiseSchedule
from evaluation.memorization import save_closest_pairs
from viz import figures


@pytest.fixture
def drawn(monkeypatch):
    """The (figure, title) pairs that viz.figures would have written."""
    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, path, title=None, dpi=120: saved.append((fig, title)))
    yield saved
    for fig, _ in saved:
        plt.close(fig)


def column_names(ax):
    return [t.get_text() for t in ax.get_xticklabels()]


class FakePipe:
    """What the figures read of a pipeline; sample() reports three x0 estimates to its callback."""
    class_names, num_classes, cfg, vae = ["cat", "dog"], 2, SimpleNamespace(timesteps=10), None

    def __init__(self):
        self.seeds = []

    def sampling_settings(self, **kwargs):
        return "ddim 4 steps, guidance 3 ramped linearly"

    def sample(self, labels, seed=0, callback=None, decode=True, **kwargs):
        self.seeds.append(seed)
        g = torch.Generator().manual_seed(seed)
        for i in range(3):
            x0 = torch.randn((len(labels), 4, 2, 2), generator=g) * (i + 1)
            if callback:
                callback(i, 10 - i, x0, x0)
        return torch.rand((len(labels), 3, 8, 8), generator=g) * 2 - 1


def test_closest_pairs_name_their_columns_distances_and_near_copies(drawn, tmp_path):
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    report = {"threshold": 0.1, "closest_gen_indices": [2, 0], "closest_train_indices": [1, 0],
              "closest_distances": [0.0, 0.25]}
    save_closest_pairs(tmp_path / "pairs.png", images, images.__getitem__, report, k=4)
    (fig, title), = drawn
    assert "0.1000" in title and "near copy" in title
    assert [s.replace("\n", " ") for s in column_names(fig.axes[0])] == ["generated sample", "nearest training image"]
    rows = [ax.get_ylabel().replace("\n", " ") for ax in fig.axes]
    assert rows == ["distance 0.0000 near copy", "distance 0.2500 not a near copy"]


def test_closest_pairs_show_each_sample_beside_its_nearest_training_image(monkeypatch, tmp_path):
    """The training image is what train_image(i) gives for the report's index (a mirror image there)."""
    gen = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    train = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    report = {"threshold": 0.1, "closest_gen_indices": [2, 0], "closest_train_indices": [4, 1],
              "closest_distances": [0.0, 0.2]}
    shown = []
    monkeypatch.setattr(figures, "labelled_rows", lambda rows, *args, **kwargs: shown.extend(rows))
    save_closest_pairs(tmp_path / "pairs.png", gen, lambda i: train[i].flip(-1), report)
    assert len(shown) == 2
    for row, g, t in zip(shown, [2, 0], [4, 1]):
        assert row.shape[0] == 2 and torch.equal(row[0], gen[g]) and torch.equal(row[1], train[t].flip(-1))


def test_closest_pairs_png_has_a_row_per_pair(tmp_path):
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    report = {"threshold": 0.1, "closest_gen_indices": [0, 1, 2, 3], "closest_train_indices": [3, 2, 1, 0],
              "closest_distances": [0.0, 0.1, 0.2, 0.3]}
    save_closest_pairs(tmp_path / "sub" / "pairs.png", images, images.__getitem__, report, k=4)
    from PIL import Image
    with Image.open(tmp_path / "sub" / "pairs.png") as png:
        assert png.size == (480, 552)  # labelled_rows at 120 dpi: 4 in wide, 1 in per row + 0.6 in


@pytest.mark.parametrize("latent", [False, True])
def test_forward_process_title_says_what_is_noised(drawn, tmp_path, latent):
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    figures.forward_process_figure(NoiseSchedule("linear", 50), image, tmp_path / "f.png", latent=latent)
    (_, title), = drawn
    assert "noise added to the pixels" in title
    assert ("latents, not pixels" in title) == latent


def test_steps_comparison_names_its_seed_columns(drawn, tmp_path):
    pipe = FakePipe()
    figures.steps_comparison_figure(pipe, 1, tmp_path / "s.png", seed=7, step_counts=(2, 4), samplers=("ddim",),
                                    per_row=3)
    (fig, title), = drawn
    assert column_names(fig.axes[0]) == ["seed 7", "seed 8", "seed 9"]  # image i starts from seed + i
    assert set(pipe.seeds) == {7} and "column per seed" in title and "'dog'" in title
    assert "guidance 3 ramped linearly" in title


def test_steps_comparison_names_the_step_counts_it_ran(drawn, tmp_path):
    """A run with 10 timesteps samples at most 10 steps: its rows say 10, not the 40 asked for."""
    figures.steps_comparison_figure(FakePipe(), 1, tmp_path / "s.png", step_counts=(5, 20, 40), samplers=("ddim",))
    (fig, _), = drawn
    assert [ax.get_ylabel() for ax in fig.axes] == ["ddim 5", "ddim 10"]


def test_sample_grid_rows_share_their_seeds_and_say_how_they_were_sampled(drawn, tmp_path):
    """A class's row starts from seeds seed .. seed + n - 1 whatever the other rows: the same
    images as generate.py draws for that class alone."""
    pipe = FakePipe()
    shown = figures.class_sample_grid(pipe, tmp_path / "g.png", per_class=3, seed=4, classes=[0, 1], title="epoch 2")
    alone = figures.class_sample_grid(pipe, tmp_path / "g.png", per_class=3, seed=4, classes=[1])
    figures.class_sample_grid(pipe, tmp_path / "g.png", per_class=1, seed=4, classes=[1])
    assert pipe.seeds == [4, 4, 4, 4] and torch.equal(shown[3:], alone)
    (_, title), _, (_, one_each) = drawn
    assert title == "epoch 2: ddim 4 steps, guidance 3 ramped linearly, seeds 4 to 6 in every row"
    assert one_each == "ddim 4 steps, guidance 3 ramped linearly, seed 4 in every row"


def test_sampling_settings_in_words():
    from config import Config
    from pipeline import Pipeline
    run = SimpleNamespace(cfg=Config(sampler="dpmpp", steps=20, guidance_scale=11.0, guidance_schedule="linear"))
    say = lambda **kwargs: Pipeline.sampling_settings(run, **kwargs)  # noqa: E731
    assert say() == "dpmpp 20 steps, guidance 11 ramped linearly"
    assert say(sampler="ddpm", steps=1000, guidance_scale=1.0) == "ddpm 1000 steps, no guidance"
    assert say(guidance_schedule="constant", guidance_scale=3.5) == "dpmpp 20 steps, guidance 3.5"
    assert say(guidance_schedule="adaptive") == "dpmpp 20 steps, guidance 11 on the adaptive schedule"
    assert say(guidance_interval=(0.3, 5.0)) == "dpmpp 20 steps, guidance 11 ramped linearly for sigma/alpha in (0.3, 5]"
    assert say(guidance_interval=(0.0, float("inf"))) == "dpmpp 20 steps, guidance 11 ramped linearly"
    assert say(guidance_scale=0.0) == "dpmpp 20 steps, guidance 0"  # unconditional: schedules shape w > 1 only
    # the interval applies at any scale but 1, the unconditional model's included
    assert say(guidance_scale=0.0, guidance_interval=(0.3, 5.0)) == "dpmpp 20 steps, guidance 0 for sigma/alpha in (0.3, 5]"
    assert say(guidance_interval=(0.3, float("inf"))).endswith("ramped linearly for sigma/alpha above 0.3")


@pytest.mark.parametrize("vae", [None, object()])
def test_denoising_steps_say_the_sampler_and_what_the_noisy_row_shows(drawn, tmp_path, monkeypatch, vae):
    pipe = FakePipe()
    pipe.vae, pipe.decode = vae, lambda x: x[:, :3]
    figures.denoising_steps_figure(pipe, 0, tmp_path / "d.png", seed=5, num_frames=3)
    (fig, title), = drawn
    assert title.endswith("class 'cat', ddim 4 steps, guidance 3 ramped linearly, seed 5")
    assert fig.axes[0].get_ylabel() == ("x_t" if vae is None else "x_t, decoded\nby the VAE")


def test_loss_curves_count_whole_epochs(drawn, tmp_path):
    from training.run import Run
    run = Run(str(tmp_path))
    run.create()
    for epoch in (1, 2):
        run.log("conditional_diffusion", epoch, 10 * epoch, {"loss": 1.0 / epoch})
    assert figures.plot_losses(run, "conditional_diffusion", str(tmp_path / "l.png"))
    (fig, _), = drawn
    fig.canvas.draw()
    ticks = [float(t.get_text().replace("\u2212", "-")) for t in fig.axes[0].get_xticklabels() if t.get_text()]
    assert ticks and all(t == int(t) for t in ticks)


def test_denoising_path_labels_its_pca_axes(drawn, tmp_path):
    real = torch.randn((20, 4, 2, 2), generator=torch.Generator().manual_seed(0))
    figures.denoising_path_figure(FakePipe(), 1, real, torch.arange(20) % 2, tmp_path / "p.png", num_samples=3)
    (fig, _), = drawn
    ax, = fig.axes
    assert ax.get_xlabel().startswith("PC 1 of the real latents")
    assert ax.get_ylabel().startswith("PC 2 of the real latents")
    assert ax.get_title().endswith("ddim 4 steps, guidance 3 ramped linearly, seeds 0 to 2")


def test_latent_figures_colour_classes_alike_and_apart(drawn, tmp_path):
    """Flowers102-like class indices 1 and 21 (the same tab20 colour by index) get two colours, the
    same in the latent-space figure and in the denoising paths."""
    pipe = FakePipe()
    pipe.class_names, pipe.num_classes = [f"c{i}" for i in range(30)], 30
    real = torch.randn((20, 4, 2, 2), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 21] * 10)
    figures.latent_space_figure(real, labels, pipe.class_names, None, tmp_path / "l.png")
    figures.denoising_path_figure(pipe, 21, real, labels, tmp_path / "p.png", num_samples=2)
    (space, _), (paths, _) = drawn

    def legend_colors(ax):
        return {t.get_text().removeprefix("real "): tuple(h.get_facecolor()[0][:3])
                for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}
    in_space, in_paths = legend_colors(space.axes[0]), legend_colors(paths.axes[0])
    assert in_space == in_paths and in_space["c1"] != in_space["c21"]
    labels = torch.tensor([3, 9] * 10)  # a set of {3, 9} iterates 9 first: the colours follow the sorted order
    figures.latent_space_figure(real, labels, pipe.class_names, None, tmp_path / "l.png")
    figures.denoising_path_figure(pipe, 9, real, labels, tmp_path / "p.png", num_samples=2)
    (space, _), (paths, _) = drawn[2:]
    assert legend_colors(space.axes[0]) == legend_colors(paths.axes[0])


def test_denoising_paths_of_a_class_without_real_latents_shown(drawn, tmp_path):
    """The sampled class gets its colour even when no real latent of it is drawn."""
    real = torch.randn((20, 4, 2, 2), generator=torch.Generator().manual_seed(0))
    figures.denoising_path_figure(FakePipe(), 1, real, torch.zeros(20, dtype=torch.long), tmp_path / "p.png",
                                  num_samples=2)
    (fig, _), = drawn
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["real cat"]


def test_coinciding_class_centers_stay_visible_and_named(drawn, tmp_path):
    labels = torch.arange(3).repeat_interleave(10)
    latents = torch.randn((30, 4, 2, 2), generator=torch.Generator().manual_seed(0)) + 2 * labels.view(-1, 1, 1, 1)
    centers = np.stack([np.zeros(16), np.zeros(16), np.full(16, 4.0)]).astype(np.float32)  # cat's = dog's
    figures.latent_space_figure(latents, labels, ["cat", "dog", "bird"], centers, tmp_path / "l.png")
    (fig, _), = drawn
    fig.canvas.draw()
    for ax in fig.axes:  # t-SNE and PCA
        assert sorted(t.get_text() for t in ax.texts) == ["bird", "cat", "dog"]
    pca = fig.axes[1]
    names = {t.get_text(): t.get_window_extent() for t in pca.texts}
    assert not names["cat"].overlaps(names["dog"])
    marks = [c for c in pca.collections if len(c.get_offsets()) == 1]  # the centers, in class order
    assert len(marks) == 3 and np.allclose(marks[0].get_offsets(), marks[1].get_offsets())
    assert marks[1].get_sizes()[0] < marks[0].get_sizes()[0]  # dog's X smaller, on top of cat's
    assert [m.get_facecolor()[0].tolist() for m in marks] == [list(plt.get_cmap("tab10")(j)) for j in range(3)]


def test_a_tall_figure_keeps_its_title_above_the_column_names(monkeypatch, tmp_path):
    saved, close = [], plt.close
    monkeypatch.setattr(plt, "close", saved.append)  # _save's last step: keep the figure it wrote
    rows = [torch.zeros((2, 3, 32, 32))] * 16
    figures.labelled_rows(rows, ["row"] * 16, tmp_path / "t.png", title="a title\nof two lines",
                          col_names=["left", "right"])
    fig, = saved
    renderer = fig.canvas.get_renderer()
    assert fig.get_suptitle() == "a title\nof two lines"
    assert fig._suptitle.get_window_extent(renderer).y0 >= fig.axes[0].get_tightbbox(renderer).y1
    close(fig)


def test_a_long_title_is_wrapped_to_a_narrow_figure(monkeypatch, tmp_path):
    saved, close = [], plt.close
    monkeypatch.setattr(plt, "close", saved.append)
    title = "dpmpp 20 steps, guidance 11 ramped linearly for sigma/alpha in (0.3, 5], seeds 0 to 2 in every row"
    figures.labelled_rows([torch.zeros((3, 3, 32, 32))] * 2, ["cat", "dog"], tmp_path / "g.png", title=title)
    fig, = saved
    renderer = fig.canvas.get_renderer()
    box = fig._suptitle.get_window_extent(renderer)
    assert fig.get_suptitle().replace("\n", " ") == title and box.x0 >= 0 and box.x1 <= fig.bbox.width
    close(fig)
