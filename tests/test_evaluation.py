"""Fast checks of the evaluation primitives on synthetic fixtures (CPU, no downloads)."""

import contextlib
import json
import os
import urllib.error

import numpy as np
import pytest
import pytorch_fid.inception
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import gaussian_blur

from errors import UserError
from evaluation import inception
from evaluation.diffusion_classifier import diffusion_classify
from evaluation.metrics import extract_features, frechet_distance, kernel_inception_distance, per_class_accuracy
from evaluation.memorization import memorization_report, save_closest_pairs
from models.classifier import ImageClassifier


def smooth_random_images(n: int, seed: int) -> torch.Tensor:
    """Low-frequency random images in [-1, 1], [n, 3, 32, 32]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn((n, 3, 8, 8), generator=generator)
    return F.interpolate(coarse, size=32, mode="bilinear", align_corners=False).clamp(-1, 1)


def test_frechet_distance_matches_its_closed_form_for_diagonal_covariances():
    from evaluation.metrics import frechet_distance_from_stats
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.0])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()  # 5 + 2
    assert frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b)) == pytest.approx(expected)


def test_balanced_labels_deal_the_classes_out_evenly():
    from evaluation.evaluate import balanced_labels
    assert balanced_labels(7, 3).bincount().tolist() == [3, 2, 2]
    assert balanced_labels(2000, 2).bincount().tolist() == [1000, 1000]


def test_frechet_distance_zero_for_same_set_and_grows_with_degradation():
    torch.manual_seed(0)
    features = ImageClassifier(num_classes=2, width=8).eval().features
    images = smooth_random_images(300, seed=0)
    clean = extract_features(features, images)
    self_distance = frechet_distance(clean, clean)

    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    distance_to_clean = lambda degraded: frechet_distance(clean, extract_features(features, degraded))
    noised = [distance_to_clean((images + s * noise).clamp(-1, 1)) for s in (0.1, 0.3, 0.8)]
    blurred = [distance_to_clean(gaussian_blur(images, 2 * int(3 * s) + 1, s)) for s in (0.7, 1.5, 3.0)]

    assert abs(self_distance) < 1e-6 * min(noised + blurred)
    assert noised == sorted(noised) and blurred == sorted(blurred)
    assert len(set(noised)) == 3 and len(set(blurred)) == 3


def test_kid_between_halves_of_one_gaussian_is_near_zero_and_far_below_different_gaussians():
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2000, 16))
    shifted = rng.standard_normal((1000, 16)) + 0.3
    same_mean, _ = kernel_inception_distance(sample[:1000], sample[1000:], num_subsets=10, subset_size=200)
    different_mean, _ = kernel_inception_distance(sample[:1000], shifted, num_subsets=10, subset_size=200)
    assert different_mean > 0.1
    assert abs(same_mean) < 0.1 * different_mean


def test_kid_is_the_unbiased_estimator():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.2
    # One subset of the whole set is a permutation, to which the estimate is invariant: compare with the definition.
    kernel = lambda a, b: (a @ b / 5 + 1) ** 3
    m = len(x)
    within_x = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_y = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    across = sum(kernel(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    kid_mean, kid_std = kernel_inception_distance(x, y, num_subsets=1, subset_size=100)
    assert kid_mean == pytest.approx(within_x + within_y - 2 * across, rel=1e-9)
    assert kid_std == 0

    # Averaged over independent samples from one distribution it is ~0; the biased (V-statistic)
    # estimate would sit near +0.08 here.
    estimates = [
        kernel_inception_distance(rng.standard_normal((400, 16)), rng.standard_normal((400, 16)), 10, 200, seed)[0]
        for seed in range(20)
    ]
    assert abs(np.mean(estimates)) < 0.01
    assert min(estimates) < 0  # an unbiased estimate of 0 must go negative sometimes


def two_class_fixture(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: reddish, horizontal stripes; class 1: bluish, vertical stripes; random brightness and noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=generator)
    stripes = torch.sin(torch.arange(32) * 0.8).view(1, 32)
    horizontal, vertical = stripes.T.expand(32, 32), stripes.expand(32, 32)
    images = torch.empty(n, 3, 32, 32)
    for i, label in enumerate(labels.tolist()):
        colour = torch.tensor([0.6, -0.2, -0.4]) if label == 0 else torch.tensor([-0.4, -0.1, 0.6])
        pattern = horizontal if label == 0 else vertical
        brightness = torch.rand((), generator=generator) * 0.4 - 0.2
        images[i] = colour.view(3, 1, 1) + 0.3 * pattern + brightness
    images += 0.3 * torch.randn(images.shape, generator=generator)
    return images.clamp(-1, 1), labels


def test_image_classifier_learns_separable_fixture():
    torch.manual_seed(0)
    train_images, train_labels = two_class_fixture(512, seed=0)
    test_images, test_labels = two_class_fixture(200, seed=1)
    model = ImageClassifier(num_classes=2, width=8)  # narrow: CPU time, not capacity, is the limit here
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(200):
        batch = torch.randint(0, len(train_images), (16,))
        loss = F.cross_entropy(model(train_images[batch]), train_labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = per_class_accuracy(model(test_images), test_labels, num_classes=2)["accuracy"]
    assert accuracy > 0.9


@pytest.mark.parametrize("image_size,norm", [(32, "group"), (64, "batch")])
def test_image_classifier_shapes(image_size, norm):
    model = ImageClassifier(num_classes=3, image_size=image_size, width=8, norm=norm).eval()
    x = torch.rand(2, 3, image_size, image_size) * 2 - 1
    assert model(x).shape == (2, 3)
    assert model.features(x).shape == (2, model.feature_dim) == (2, 32)


def test_per_class_accuracy_hand_example():
    logits = torch.tensor([[2.0, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 3], [0, 5, 0]])  # argmax 0, 1, 0, 2, 1
    labels = torch.tensor([0, 1, 1, 2, 0])
    report = per_class_accuracy(logits, labels, num_classes=4)
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["per_class"][:3] == pytest.approx([0.5, 0.5, 1.0])
    assert np.isnan(report["per_class"][3])  # no examples of class 3
    assert report["class_counts"] == [2, 2, 1, 0]
    assert report["balanced_accuracy"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)  # over the classes with examples
    assert per_class_accuracy(torch.tensor([0, 1, 0, 2, 1]), labels, 4)["accuracy"] == report["accuracy"]


def test_memorization_flags_planted_copies_not_fresh_samples(tmp_path):
    generator = torch.Generator().manual_seed(0)
    train = torch.randn((1000, 32), generator=generator)
    heldout = torch.randn((500, 32), generator=generator)
    copied = torch.arange(0, 20)
    exact_copies = train[copied[:10]]
    noised_copies = train[copied[10:]] + 0.05 * torch.randn((10, 32), generator=generator)
    fresh = torch.randn((200, 32), generator=generator)
    generated = torch.cat([exact_copies, noised_copies, fresh])

    report = memorization_report(generated, heldout, train)
    flagged = set(report["closest_gen_indices"][: round(report["near_copy_fraction"] * len(generated))])
    assert set(range(20)) <= flagged  # every planted copy
    assert len(flagged - set(range(20))) <= 0.03 * len(fresh)  # fresh samples flagged at ~the held-out rate
    assert report["heldout_flagged_fraction"] == pytest.approx(0.01, abs=0.005)
    assert sorted(report["closest_gen_indices"][:20]) == list(range(20))  # the planted copies are the closest pairs
    nearest_train_of = dict(zip(report["closest_gen_indices"], report["closest_train_indices"]))
    assert all(nearest_train_of[i] == copied[i].item() for i in range(20))
    assert report["gen_median_distance"] > 0 and report["heldout_median_distance"] > report["threshold"]

    gen_images = torch.randint(0, 256, (len(generated), 3, 32, 32), dtype=torch.uint8)
    train_images = torch.randint(0, 256, (len(train), 3, 32, 32), dtype=torch.uint8)
    save_closest_pairs(tmp_path / "pairs" / "closest.png", gen_images, train_images.__getitem__, report, k=4)
    with Image.open(tmp_path / "pairs" / "closest.png") as png:
        assert png.size == (480, 552)  # labelled_rows at 120 dpi: 4 in wide, 4 rows of 1 in + 0.6 in


@pytest.fixture
def offline_empty_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and a download that fails at once, like an offline machine."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def refuse_download(*args, **kwargs):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse_download)
    return tmp_path / "hub" / "checkpoints" / inception.FID_WEIGHTS_FILE


def test_fid_inception_random_weights_give_2048_features(offline_empty_hub):
    with pytest.warns(UserWarning) as warned:
        network = inception.load_fid_inception(None, "cpu", allow_random=True)
    assert any("RANDOM" in str(w.message) for w in warned)
    features = extract_features(network, torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert features.shape == (2, 2048) and torch.isfinite(features).all()


@pytest.mark.parametrize("suite_offline", ["0", "1"])
def test_fid_inception_without_weights_raises_user_error_naming_the_file(offline_empty_hub, monkeypatch,
                                                                         suite_offline):
    # Online mode tries the (here refused) download and warns; SUITE_OFFLINE=1 never tries.
    monkeypatch.setenv("SUITE_OFFLINE", suite_offline)
    expect = pytest.warns(UserWarning, match="download") if suite_offline == "0" else contextlib.nullcontext()
    with expect, pytest.raises(UserError) as error:
        inception.load_fid_inception(None, "cpu")
    message = str(error.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in message and "--inception_weights" in message
    assert str(offline_empty_hub) in message and pytorch_fid.inception.FID_WEIGHTS_URL in message
    assert "\n" not in message
    with pytest.raises(UserError, match="--inception_weights"):
        inception.load_fid_inception(str(offline_empty_hub.parent / "missing.pth"), "cpu")


def test_fid_inception_loads_weights_from_explicit_path_and_hub_cache(offline_empty_hub, tmp_path):
    # A correctly keyed (random) weight file, standing in for the real one.
    with inception._fid_weights_source(None):
        state_dict = pytorch_fid.inception.fid_inception_v3().state_dict()
    explicit = tmp_path / "my_inception.pth"
    torch.save(state_dict, explicit)
    offline_empty_hub.parent.mkdir(parents=True)
    torch.save(state_dict, offline_empty_hub)

    for weights_path in (str(explicit), None):
        network = inception.load_fid_inception(weights_path, "cpu")
        first_conv = network.net.blocks[0][0].conv.weight
        assert torch.equal(first_conv, state_dict["Conv2d_1a_3x3.conv.weight"])

    wrong_keys, not_torch = tmp_path / "wrong_keys.pth", tmp_path / "not_torch.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong_keys)
    not_torch.write_text("not a checkpoint")
    for bad_file in (wrong_keys, not_torch):
        with pytest.raises(UserError, match="FID Inception weights") as error:
            inception.load_fid_inception(str(bad_file), "cpu")
        assert "\n" not in str(error.value)
    # A text file or a bare tensor: said to be no weights file (torch.load's own error is a bare "101")
    a_tensor = tmp_path / "a_tensor.pth"
    torch.save(torch.zeros(3), a_tensor)
    for bad_file in (not_torch, a_tensor):
        with pytest.raises(UserError) as error:
            inception.load_fid_inception(str(bad_file), "cpu")
        assert f"{bad_file} is not a readable FID Inception weights file" in str(error.value)


def test_reference_stats_are_cached_and_fid_kid_uses_them(tmp_path):
    features = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def compute():
        calls.append(1)
        return features

    mu, sigma, cached = inception.reference_stats("cifar10-catdog/32/classifier", tmp_path, compute)
    mu_again, sigma_again, cached_again = inception.reference_stats("cifar10-catdog/32/classifier", tmp_path, compute)
    assert len(calls) == 1
    assert np.array_equal(mu, mu_again) and np.array_equal(sigma, sigma_again) and torch.equal(cached, cached_again)
    assert mu == pytest.approx(features.double().mean(0).numpy()) and cached.shape == (300, 8)
    assert [p.name for p in tmp_path.iterdir()] == ["cifar10-catdog_32_classifier.npz"]  # no temp file left

    scores = inception.fid_kid(cached, features, real_stats=(mu, sigma), kid_subsets=5, kid_subset_size=100)
    assert set(scores) == {"fid", "kid_mean", "kid_std"} and abs(scores["fid"]) < 1e-6
    # FID against the statistics given, not those of the features passed beside them (KID's)
    shifted = inception.fid_kid(cached, features, real_stats=(mu + 1, sigma), kid_subsets=5, kid_subset_size=100)
    assert shifted["fid"] == pytest.approx(8.0, rel=1e-6) and shifted["kid_mean"] == scores["kid_mean"]


def test_reference_stats_in_an_unwritable_place_serve_the_run_uncached(tmp_path, capsys):
    """A read-only place for .fid_cache (beside a read-only run folder) must not end an
    evaluation after all its sampling: the statistics serve this run, with a note."""
    features = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    a_file = tmp_path / "a_file"
    a_file.write_text("the cache cannot go under a file")
    mu, sigma, feats = inception.reference_stats("key", a_file / ".fid_cache", lambda: features)
    assert mu == pytest.approx(features.double().mean(0).numpy()) and torch.equal(feats, features)
    assert "note: reference statistics not cached" in capsys.readouterr().err


def test_diffusion_classify_with_oracle_eps_is_near_perfect():
    generator = torch.Generator().manual_seed(0)
    num_classes, timesteps_total = 3, 1000
    class_means = 0.5 * torch.randn((num_classes, 3, 8, 8), generator=generator)
    labels = torch.randint(0, num_classes, (60,), generator=generator)
    x0 = class_means[labels] + 0.3 * torch.randn((60, 3, 8, 8), generator=generator)
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, timesteps_total), dim=0)

    def oracle_eps(x_t, t, y):
        # Exact noise prediction if the data of class y were the point mass at its mean.
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - abar.sqrt() * class_means[y]) / (1 - abar).sqrt()

    predictions, errors = diffusion_classify(
        oracle_eps, x0, num_classes, alphas_cumprod, batch_size=32, return_errors=True
    )
    assert errors.shape == (60, num_classes)
    assert (predictions == labels).float().mean() > 0.95
    assert torch.equal(predictions, diffusion_classify(oracle_eps, x0, num_classes, alphas_cumprod, batch_size=7))


def test_inception_reference_stats_follow_the_training_images_not_their_path(tmp_path):
    """The FID cache is keyed by the images themselves: data rewritten in place at the same path
    must be scored against new statistics, and an unchanged dataset reuses its cache."""
    import data
    from config import Config
    from evaluation.evaluate import inception_metrics
    from fixtures import make_image_folder

    class MeanColour(torch.nn.Module):  # a cheap stand-in for Inception, with a fixed weights digest
        weights_digest = "fixed"

        def forward(self, x):
            return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)

    root = make_image_folder(tmp_path / "data", n_train=10, with_test=False)
    cfg = Config(dataset="folder", data_root=str(root), image_size=32, val_fraction=0.2)
    samples = torch.full((6, 3, 32, 32), 128, dtype=torch.uint8)
    cache = tmp_path / "cache"

    def score():
        data.clear_cache()
        return inception_metrics(cfg, samples, MeanColour(), "cpu", cache)["fid"]

    before = score()
    assert score() == before and len(list(cache.iterdir())) == 1  # unchanged data: the cache serves
    for png in root.rglob("*.png"):  # the same files, new contents
        Image.fromarray(255 - np.asarray(Image.open(png))).save(png)
    after = score()
    assert after != pytest.approx(before) and len(list(cache.iterdir())) == 2


def test_json_reports_write_nan_as_null(tmp_path):
    """A class with no samples has a NaN accuracy; strict JSON parsers refuse a bare NaN."""
    from config import write_json
    write_json({"per_class": [1.0, float("nan")], "fd": float("inf"), "nested": {"x": (0.5, float("nan"))}},
               str(tmp_path / "r.json"))
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"per_class": [1.0, None], "fd": None, "nested": {"x": [0.5, None]}}


@pytest.mark.parametrize("state, label", [(("abc1234", False), "abc1234"), (("abc1234", True), "abc1234 (modified)"),
                                          ((None, None), None)])
def test_reports_mark_a_commit_whose_files_were_modified(monkeypatch, state, label):
    """eval.json and the bench reports: figures measured on edited code are not labelled as the clean commit."""
    from training import run
    monkeypatch.setattr(run, "git_commit", lambda: state)
    assert run.commit_label() == label


def test_a_copy_of_the_tree_outside_git_names_the_commit_it_was_sent_as(monkeypatch, tmp_path):
    from training import run
    monkeypatch.setattr(run, "REPO", str(tmp_path))  # no .git above a fresh temporary folder
    monkeypatch.delenv("DIFFUSION_SUITE_COMMIT", raising=False)
    assert run.git_commit() == (None, None)
    monkeypatch.setenv("DIFFUSION_SUITE_COMMIT", "abc1234")
    assert run.git_commit() == ("abc1234", None) and run.commit_label() == "abc1234"
    monkeypatch.undo()  # inside the checkout, git's own answer wins over the variable
    if not os.path.isdir(os.path.join(run.REPO, ".git")):
        pytest.skip("the tests run outside a git checkout")
    monkeypatch.setenv("DIFFUSION_SUITE_COMMIT", "stale00")
    commit, modified = run.git_commit()
    assert commit not in (None, "stale00") and isinstance(modified, bool)


def test_offline_metrics_compare_balanced_accuracies_and_a_floor_of_as_many_images():
    """The ratio divides balanced accuracies (a held-out split's class frequencies need not be the
    samples'); the FD floor takes as many held-out images as there are samples."""
    from evaluation.evaluate import OfflineMetrics, fixed_subset
    from evaluation.metrics import frechet_distance
    g = torch.Generator().manual_seed(0)
    metrics = object.__new__(OfflineMetrics)
    metrics.train_feats, metrics.val_feats = torch.randn(80, 4, generator=g), torch.randn(50, 4, generator=g)
    samples = torch.randn(10, 4, generator=g)
    metrics.features = lambda images, mirrored=False: samples
    metrics.accuracy = lambda images, labels: {"accuracy": 0.9, "balanced_accuracy": 0.8, "per_class": [1.0, 0.6]}
    metrics.real_accuracy = {"accuracy": 0.9, "balanced_accuracy": 0.6, "per_class": [1.0, 0.2]}
    metrics.real_split = "test"
    out = metrics(torch.zeros(10, 3, 8, 8, dtype=torch.uint8), torch.arange(10) % 2, memorization=False)
    assert out["accuracy_ratio"] == pytest.approx(0.8 / 0.6)
    assert out["classifier_fd_real_floor_images"] == 10
    floor = frechet_distance(metrics.train_feats, metrics.val_feats[fixed_subset(50, 10)])
    assert out["classifier_fd_real_floor"] == pytest.approx(floor)
