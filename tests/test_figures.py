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
    class_names, num_classes, cfg = ["cat", "dog"], 2, SimpleNamespace(timesteps=10)

    def __init__(self):
        self.seeds = []

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


def test_denoising_path_labels_its_pca_axes(drawn, tmp_path):
    real = torch.randn((20, 4, 2, 2), generator=torch.Generator().manual_seed(0))
    figures.denoising_path_figure(FakePipe(), 1, real, torch.arange(20) % 2, tmp_path / "p.png", num_samples=3)
    (fig, _), = drawn
    ax, = fig.axes
    assert ax.get_xlabel().startswith("PC 1 of the real latents")
    assert ax.get_ylabel().startswith("PC 2 of the real latents")


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
