"""Every command of the README, end to end on CPU with --preset tiny, on generated fixtures
in the real on-disk formats (in-process: the entry points' main(argv) is what `python X.py` runs)."""
import json
import os

import imageio.v2 as imageio
import pytest
import torch

import generate
import main
import visualize
from config import Config, build_config
from training.checkpoint import load_checkpoint

TINY = ["--preset", "tiny", "--batch_size", "8", "--device", "cpu"]


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory, cifar10_root):
    """A tiny latent run on the CIFAR-10 cats/dogs fixture (pickle batches)."""
    run = str(tmp_path_factory.mktemp("latent_run"))
    main.main(["--train_all", "--dataset", "cifar10_catdog", "--data_root", str(cifar10_root),
               "--vae_epochs", "2", "--diffusion_epochs", "2", "--results_dir", run] + TINY)
    return run


def test_training_writes_the_run_folder(latent_run):
    for name in ("config.json", "metrics.csv", "vae_gan_best.pt", "vae_gan_last.pt", "conditional_diffusion_final.pt",
                 "conditional_diffusion_best.pt", "autoencoder_losses.png", "diffusion_loss.png",
                 "vae_samples_grid_subset.png", "pictures/samples_epoch0002.png",
                 "pictures/reconstructions_epoch0001.png"):
        assert os.path.isfile(os.path.join(latent_run, name)), name
    with open(os.path.join(latent_run, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["dataset"] == "cifar10_catdog" and cfg["preset"] == "tiny" and cfg["batch_size"] == 8
    state = load_checkpoint(os.path.join(latent_run, "conditional_diffusion_final.pt"))
    stage = state["stage"]
    assert state["epoch"] == 2 and stage["class_names"] == ["cat", "dog"]
    assert {"model", "ema", "opt", "sched", "vae", "latent_shift", "latent_scale"} <= set(stage)
    assert stage["latent_scale"].shape == (4, 1, 1) and (stage["latent_scale"] > 0).all()
    vae = load_checkpoint(os.path.join(latent_run, "vae_gan_last.pt"))["stage"]
    assert {"vae", "disc", "center_loss", "opt_g", "opt_d"} <= set(vae)


def test_latent_training_data_holds_mirror_images_only_with_hflip(latent_run):
    from training.runner import _latent_data, load_splits
    with open(os.path.join(latent_run, "config.json")) as f:
        cfg = Config.from_dict(json.load(f))
    train, val = load_splits(cfg)
    _, both, both_labels, *_ = _latent_data(cfg, "cpu", train, val)
    cfg.hflip = False
    _, plain, plain_labels, *_ = _latent_data(cfg, "cpu", train, val)
    n = len(train.images)
    assert len(both) == 2 * n and torch.equal(both_labels, torch.cat([train.labels, train.labels]))
    assert len(plain) == n and torch.equal(plain_labels, train.labels)
    assert torch.equal(plain, both[:n])  # the images themselves, encoded the same way
    assert (both[n:] - both[:n]).abs().mean() > 1e-3  # the second half: their mirror images
    args = main.stage_overrides(main.parse_args(["--train_diffusion", "--no-hflip"]))
    assert build_config(args).hflip is False and build_config(main.parse_args(["--train_vae"])).hflip is True


def test_generate_writes_grid_and_images_and_is_seeded(latent_run, tmp_path):
    out1, out2, out3 = (str(tmp_path / n) for n in ("a", "b", "c"))
    args = ["--results_dir", latent_run, "--class_name", "dog", "--num_samples", "4", "--device", "cpu"]
    assert generate.main(args + ["--output_dir", out1, "--seed", "7"]) == 0
    assert generate.main(args + ["--output_dir", out2, "--seed", "7"]) == 0
    assert generate.main(args + ["--output_dir", out3, "--seed", "8"]) == 0
    assert os.path.isfile(os.path.join(out1, "dog_grid.png"))
    assert sorted(os.listdir(os.path.join(out1, "dog"))) == [f"dog_{i:03d}.png" for i in range(4)]
    read = lambda d: imageio.imread(os.path.join(d, "dog", "dog_000.png"))  # noqa: E731
    assert (read(out1) == read(out2)).all()       # same seed, same images
    assert not (read(out1) == read(out3)).all()   # another seed, other images
    # A later, smaller call into the same folder leaves exactly its own images (other files stay).
    open(os.path.join(out1, "dog", "notes.txt"), "w").close()
    assert generate.main(args + ["--output_dir", out1, "--seed", "7", "--num_samples", "2"]) == 0
    assert sorted(os.listdir(os.path.join(out1, "dog"))) == ["dog_000.png", "dog_001.png", "notes.txt"]


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_a_samples_image_does_not_depend_on_the_batch_it_is_drawn_in(latent_run, sampler):
    """Image i starts from seed + i: what --evaluate scores does not change with --batch_size."""
    from pipeline import load_pipeline
    pipe = load_pipeline(latent_run, device="cpu")
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    whole = pipe.sample_batched(labels, batch_size=7, seed=3, sampler=sampler, steps=4)
    in_threes = pipe.sample_batched(labels, batch_size=3, seed=3, sampler=sampler, steps=4)
    assert torch.allclose(in_threes, whole, atol=1e-4)
    assert torch.allclose(pipe.sample(labels[2:], seed=5, sampler=sampler, steps=4), whole[2:], atol=1e-4)


def test_generate_all_classes_and_sampler_options(latent_run, tmp_path, monkeypatch):
    """The sampling flags reach the guidance and the sampler the grids are drawn with."""
    import pipeline
    seen = []

    def make_denoiser(*args, **kwargs):
        seen.append(("guidance", args[5], args[6], kwargs["steps"]))
        return real_make_denoiser(*args, **kwargs)

    def run_sampler(name, denoise, x_T, schedule, steps, **kwargs):
        seen.append(("sampler", name, steps))
        return real_run_sampler(name, denoise, x_T, schedule, steps, **kwargs)

    real_make_denoiser, real_run_sampler = pipeline.make_denoiser, pipeline.run_sampler
    monkeypatch.setattr(pipeline, "make_denoiser", make_denoiser)
    monkeypatch.setattr(pipeline, "run_sampler", run_sampler)
    out = str(tmp_path / "all")
    assert generate.main(["--results_dir", latent_run, "--class_name", "all", "--num_samples", "2", "--output_dir", out,
                          "--sampler", "dpmpp", "--steps", "5", "--guidance_scale", "3",
                          "--guidance_schedule", "adaptive", "--device", "cpu"]) == 0
    assert {"cat_grid.png", "dog_grid.png"} <= set(os.listdir(out))
    assert seen and set(seen) == {("guidance", 3.0, "adaptive", 5), ("sampler", "dpmpp", 5)}, seen


def test_sampling_runs_the_network_under_the_asked_precision(latent_run):
    """--amp bf16 samples through bf16 autocast (different, close images); none is float32."""
    import argparse
    from pipeline import load_pipeline
    images = {}
    for amp in ("none", "bf16"):
        pipe = load_pipeline(latent_run, overrides=argparse.Namespace(amp=amp))
        assert pipe.cfg.amp == amp
        images[amp] = pipe.sample(torch.tensor([0, 1, 0, 1]), steps=4, seed=0)
        assert images[amp].dtype == torch.float32
    gap = (images["none"] - images["bf16"]).abs()
    assert 0 < gap.max() and gap.mean() < 0.05, (gap.max(), gap.mean())


def test_animation_is_a_gif_of_the_reverse_process(latent_run):
    assert generate.main(["--results_dir", latent_run, "--create_animation", "--class_name", "cat",
                          "--device", "cpu"]) == 0
    frames = imageio.mimread(os.path.join(latent_run, "diffusion_animation_cat.gif"))
    assert len(frames) > 5
    assert frames[0].std() > 0 and not (frames[0] == frames[-1]).all()
    assert len({f.shape for f in frames}) == 1


def test_animation_frames_are_captioned_with_their_timestep(latent_run, tmp_path, monkeypatch):
    from pipeline import load_pipeline
    from viz import figures
    pipe = load_pipeline(latent_run, device="cpu")
    path = str(tmp_path / "anim.gif")
    captions = figures.denoising_animation(pipe, 0, path, steps=4, sampler="ddim", num_frames=4)
    steps = [int(c.removeprefix("t = ")) for c in captions if c.startswith("t = ")]
    assert len(steps) == 4 and steps == sorted(steps, reverse=True) and steps[0] > steps[-1]
    assert captions[4:] == ["final sample"]
    frames = imageio.mimread(path)
    assert len(frames) == len(captions)
    from PIL import Image
    with Image.open(path) as gif:  # the final sample is held: its frame lasts longest
        durations = [gif.seek(i) or gif.info["duration"] for i in range(gif.n_frames)]
    assert durations[-1] > 2 * max(durations[:-1])
    drawn = []  # and every frame's caption ends with its own line
    real_frame = figures._animation_frame
    monkeypatch.setattr(figures, "_animation_frame", lambda x, x0, caption, state: drawn.append(caption) or
                        real_frame(x, x0, caption, state))
    assert figures.denoising_animation(pipe, 0, path, steps=4, sampler="ddim", num_frames=4) == captions
    assert [c.splitlines()[-1] for c in drawn] == captions and "ddim 4 steps" in drawn[0]


@pytest.mark.parametrize("mode", ["latent_space", "samples_grid", "denoising_steps", "reconstructions",
                                  "loss_curves", "forward_process", "steps_comparison", "denoising_path"])
def test_every_visualize_mode(latent_run, mode):
    one_class = ["--class_name", "dog"] if "class_name" in visualize.MODE_FLAGS[mode] else []
    assert visualize.main(["--results_dir", latent_run, "--mode", mode, *one_class, "--device", "cpu"]) == 0
    expected = {"latent_space": "latent_space.png", "samples_grid": "samples_grid.png",
                "denoising_steps": "denoising_steps_dog.png", "reconstructions": "reconstructions.png",
                "loss_curves": "diffusion_loss.png", "forward_process": "forward_process.png",
                "steps_comparison": "steps_comparison_dog.png", "denoising_path": "denoising_path_dog.png"}[mode]
    assert os.path.getsize(os.path.join(latent_run, expected)) > 1000


def test_readme_commands_find_the_default_run_folder_and_a_lone_checkpoint_serves_every_mode(
        latent_run, tmp_path, monkeypatch):
    """`python generate.py --class_name dog` and `python visualize.py --mode ...` without
    --results_dir use results/<dataset>_<model>, as README says; a final checkpoint copied alone
    (its VAE inside) still draws the latent space and the reconstructions; --output_dir is where
    an animation goes; --steps sets steps_comparison's step counts."""
    import shutil
    monkeypatch.chdir(tmp_path)
    os.makedirs("results")
    os.symlink(latent_run, os.path.join("results", "cifar10_catdog_latent_unet"))
    assert generate.main(["--class_name", "dog", "--num_samples", "2", "--steps", "2", "--device", "cpu"]) == 0
    assert os.path.isfile(os.path.join(latent_run, "generated", "dog_grid.png"))
    assert visualize.main(["--mode", "loss_curves"]) == 0
    solo = tmp_path / "solo"
    solo.mkdir()
    shutil.copy(os.path.join(latent_run, "conditional_diffusion_final.pt"), solo / "model.pt")
    for mode in ("latent_space", "reconstructions"):
        assert visualize.main(["--model_path", str(solo / "model.pt"), "--mode", mode, "--device", "cpu"]) == 0
        assert os.path.getsize(solo / f"{mode}.png") > 1000
    assert generate.main(["--model_path", str(solo / "model.pt"), "--create_animation", "--class_name", "cat",
                          "--output_dir", str(tmp_path / "anim"), "--steps", "3", "--device", "cpu"]) == 0
    assert os.path.isfile(tmp_path / "anim" / "diffusion_animation_cat.gif")
    import viz.figures
    drawn = []
    monkeypatch.setattr(viz.figures, "steps_comparison_figure", lambda *a, **k: drawn.append(k["step_counts"]))
    assert visualize.main(["--model_path", str(solo / "model.pt"), "--mode", "steps_comparison", "--steps", "16",
                           "--device", "cpu"]) == 0
    assert drawn == [(2, 4, 8, 16)]


def test_latent_transformer_trains_on_an_existing_vae(latent_run, cifar10_root, tmp_path):
    """The DiT recipe: a VAE trained by another run, copied in, and the transformer on its latents."""
    import shutil
    run = str(tmp_path / "latent_transformer")
    os.makedirs(run)
    for name in ("vae_gan_best.pt", "vae_gan_last.pt"):
        shutil.copy(os.path.join(latent_run, name), run)
    assert main.main(["--train_diffusion", "--model", "latent_transformer", "--dataset", "cifar10_catdog",
                      "--data_root", str(cifar10_root), "--epochs", "1", "--patch_size", "2",
                      "--results_dir", run] + TINY) == 0
    state = load_checkpoint(os.path.join(run, "conditional_diffusion_final.pt"))
    vae = load_checkpoint(os.path.join(latent_run, "vae_gan_best.pt"))["stage"]["vae"]
    assert state["config"]["model"] == "latent_transformer" and state["config"]["patch_size"] == 2
    assert all(torch.equal(state["stage"]["vae"][k], v) for k, v in vae.items())  # sampled through that VAE
    assert state["stage"]["sample_size"] == 8  # 32x32 images, two VAE downsamplings
    out = str(tmp_path / "gen")
    assert generate.main(["--results_dir", run, "--class_name", "dog", "--num_samples", "2", "--output_dir", out,
                          "--device", "cpu"]) == 0
    images = [imageio.imread(os.path.join(out, "dog", f)) for f in sorted(os.listdir(os.path.join(out, "dog")))]
    assert len(images) == 2 and images[0].shape == (32, 32, 3)
    assert visualize.main(["--results_dir", run, "--mode", "latent_space", "--device", "cpu"]) == 0


def test_image_folder_dataset_end_to_end(image_folder_root, tmp_path):
    run = str(tmp_path / "folder_run")
    assert main.main(["--train_all", "--dataset", "folder", "--data_root", str(image_folder_root),
                      "--vae_epochs", "1", "--diffusion_epochs", "1", "--results_dir", run] + TINY) == 0
    out = str(tmp_path / "gen")
    assert generate.main(["--results_dir", run, "--class_name", "cat", "--num_samples", "3", "--output_dir", out,
                          "--device", "cpu"]) == 0
    assert len(os.listdir(os.path.join(out, "cat"))) == 3


@pytest.fixture(scope="module")
def real_classifier(tmp_path_factory, cifar10_root):
    """The real-data classifier of the cats/dogs fixture (its report checked once)."""
    classifier_dir = str(tmp_path_factory.mktemp("classifier"))
    assert main.main(["--train_classifier", "--dataset", "cifar10_catdog", "--data_root", str(cifar10_root),
                      "--epochs", "2", "--results_dir", classifier_dir] + TINY) == 0
    report = json.load(open(os.path.join(classifier_dir, "classifier_report.json")))
    # The validation images chose the best checkpoint; the official test batch (4 per class) did not.
    assert len(report["per_class"]) == 2 and report["heldout_images"] == 2  # 10% of 8 per class, at least one
    assert len(report["test_per_class"]) == 2 and report["test_images"] == 8
    assert not os.path.exists(os.path.join(classifier_dir, "pictures"))  # it draws none there: no empty folder
    return os.path.join(classifier_dir, "classifier_best.pt")


def test_evaluate_and_classify_write_complete_reports(latent_run, real_classifier, tmp_path, monkeypatch, capsys):
    import pytorch_fid.inception
    from evaluation.inception import _fid_weights_source
    # The real-weights path, with random Inception weights saved in the standard file format.
    with _fid_weights_source(None):
        random_state = pytorch_fid.inception.fid_inception_v3().state_dict()
    weights = str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    torch.save(random_state, weights)
    monkeypatch.setattr("training.run.git_commit", lambda: ("abc1234", True))  # edited code is marked
    assert generate.main(["--evaluate", "--results_dir", latent_run, "--num_samples", "16", "--device", "cpu",
                          "--classifier_path", real_classifier, "--seed", "3",
                          "--inception_weights", weights, "--classify_images", "4", "--steps", "5"]) == 0
    result = json.load(open(os.path.join(latent_run, "eval.json")))
    for key in ("num_samples", "seed", "sampler", "steps", "guidance_scale", "checkpoint", "device",
                "total_seconds", "sample_accuracy", "sample_accuracy_per_class", "real_heldout_accuracy",
                "classifier_fd", "classifier_kid", "memorization", "fid", "kid_mean", "diffusion_classifier"):
        assert key in result, key
    assert result["num_samples"] == 16 and result["steps"] == 5 and result["commit"] == "abc1234 (modified)"
    assert result["fid_reference"].endswith("images of the run's training split")
    assert result["fid_caveat"].startswith("16 samples, fewer than the 2048 features")
    per_class = result["sample_accuracy_per_class"]  # 8 samples of each class were drawn and scored
    assert len(per_class) == 2 and all(0 <= a <= 1 for a in per_class)
    assert result["sample_accuracy"] == pytest.approx(sum(per_class) / 2)
    assert result["classifier_fd_real_floor"] > 0  # held-out against training images: never the same set
    assert result["classifier_fd_real_floor_images"] == 2  # as many as the samples, or all there are
    # The reference accuracy is the classifier's on the test images, which chose no checkpoint.
    report = json.load(open(os.path.join(os.path.dirname(real_classifier), "classifier_report.json")))
    assert result["real_heldout_split"] == "test"
    assert result["real_heldout_accuracy"] == pytest.approx(report["test_accuracy"])
    assert result["real_heldout_balanced_accuracy"] == pytest.approx(sum(report["test_per_class"]) / 2)
    assert result["accuracy_ratio"] == pytest.approx(result["sample_balanced_accuracy"] /
                                                     result["real_heldout_balanced_accuracy"])
    assert os.path.isfile(os.path.join(latent_run, "memorization_closest_pairs.png"))
    printed = capsys.readouterr().out.splitlines()  # the table names the sampling; both files are named
    assert any(line.startswith("samples") and line.endswith("16 (dpmpp 5 steps, guidance 11 ramped linearly, "
                                                             "seeds from 3)") for line in printed), printed
    assert printed[-2:] == [os.path.join(latent_run, "eval.json"),
                            os.path.join(latent_run, "memorization_closest_pairs.png")]
    assert generate.main(["--classify", "--results_dir", latent_run, "--num_samples", "4", "--device", "cpu"]) == 0
    assert 1 <= json.load(open(os.path.join(latent_run, "classify.json")))["images"] <= 4  # the fixture holds few


@pytest.mark.parametrize("subset", [None, 6])
def test_memorization_finds_mirrored_copies_of_the_images_the_run_trained_on(latent_run, real_classifier, subset):
    """The run trained on mirror images too (--hflip, the default), so a mirrored training image is
    a copy: found at distance 0 and shown mirrored beside the sample. With --subset, the images
    searched are the run's own subset of the training split."""
    import dataclasses

    from evaluation.evaluate import OfflineMetrics, load_real_classifier, real_split
    cfg = Config.from_dict(json.load(open(os.path.join(latent_run, "config.json"))))
    cfg = dataclasses.replace(cfg, subset=subset)
    assert cfg.hflip
    metrics = OfflineMetrics(load_real_classifier(cfg, "cpu", real_classifier), cfg, "cpu", 2)
    images, labels = real_split(cfg, "train", subset=subset)
    assert len(metrics.all_train_feats) == 2 * len(images) == 2 * (subset or len(metrics.train_images))
    mirrored = images[:6].flip(-1)
    report = metrics(mirrored, labels[:6])["memorization"]
    assert report["mirror_images_searched"] and report["near_copy_fraction"] == 1.0
    assert max(report["closest_distances"]) < 1e-5
    for gen, train in zip(report["closest_gen_indices"], report["closest_train_indices"]):
        assert torch.equal(metrics.train_image(train), mirrored[gen])


def test_a_classifier_that_held_out_other_images_is_refused(latent_run, real_classifier):
    """The real-data classifier must hold out exactly the run's held-out images: with another
    --val_fraction half of them would be its training images, and its accuracy on them inflated."""
    import dataclasses
    from errors import UserError
    from evaluation.evaluate import load_real_classifier
    cfg = Config.from_dict(json.load(open(os.path.join(latent_run, "config.json"))))
    assert load_real_classifier(cfg, torch.device("cpu"), real_classifier).heldout_digest
    with pytest.raises(UserError, match="held out other images"):
        load_real_classifier(dataclasses.replace(cfg, val_fraction=0.3), torch.device("cpu"), real_classifier)


def test_without_test_images_of_its_own_the_reference_accuracy_is_the_validation_one(image_folder_root, tmp_path,
                                                                                      capsys):
    """--val_fraction 0: the official test images are the validation split, so there is no separate
    test figure, and the offline metrics say which split their reference accuracy comes from."""
    from evaluation.evaluate import OfflineMetrics, load_real_classifier
    run = str(tmp_path)
    assert main.main(["--train_classifier", "--dataset", "folder", "--data_root", str(image_folder_root),
                      "--image_size", "16", "--val_fraction", "0", "--epochs", "1", "--results_dir", run] + TINY) == 0
    report = json.load(open(os.path.join(run, "classifier_report.json")))
    assert report["heldout_images"] == 8 and "test_accuracy" not in report
    printed = capsys.readouterr().out.splitlines()  # where the report went, and the checkpoints
    assert os.path.join(run, "classifier_report.json") in printed
    assert any(line.startswith(f"[classifier] saved {os.path.join(run, 'classifier_last.pt')}") for line in printed)
    cfg = Config.from_dict(json.load(open(os.path.join(run, "classifier_config.json"))))
    classifier = load_real_classifier(cfg, torch.device("cpu"), os.path.join(run, "classifier_best.pt"))
    metrics = OfflineMetrics(classifier, cfg, torch.device("cpu"), 2)
    assert metrics.real_split == "val" and metrics.real_accuracy["accuracy"] == pytest.approx(report["accuracy"])


def test_fixed_subsets_mix_the_classes_of_a_sorted_split():
    """The diffusion classifier's --classify_images and the 10,000-image caps take a fixed random
    subset, not the first images, which a held-out folder lists class by class."""
    from evaluation.evaluate import fixed_subset
    labels = torch.arange(10).repeat_interleave(100)  # sorted by class
    keep = fixed_subset(len(labels), 50)
    assert len(set(labels[keep].tolist())) >= 8 and torch.equal(keep, fixed_subset(len(labels), 50))
    assert torch.equal(fixed_subset(30, 50), torch.arange(30))


def test_sampling_sweep_scores_every_setting_with_either_weights(latent_run, real_classifier, tmp_path, capsys):
    from bench import sampling_sweep
    from errors import run_main
    out = {w: str(tmp_path / f"{w}.json") for w in ("ema", "raw", "bf16")}
    base = ["--results_dir", latent_run, "--samplers", "dpmpp:3,ddim:2", "--guidance", "1,2", "--num_samples", "8",
            "--batch_size", "4", "--classifier_path", real_classifier]
    assert run_main(sampling_sweep.main, base + ["--out", out["ema"]]) == 0
    assert run_main(sampling_sweep.main, base + ["--out", out["raw"], "--no_ema"]) == 0
    assert run_main(sampling_sweep.main, base + ["--out", out["bf16"], "--amp", "bf16"]) == 0
    # Guidance schedules: the run's (constant) by default, or those asked for, under each scale.
    schedules = str(tmp_path / "schedules.json")
    assert run_main(sampling_sweep.main, base + ["--samplers", "dpmpp:3", "--guidance_schedules", "constant,linear",
                                                 "--out", schedules]) == 0
    rows = json.load(open(schedules))["rows"]
    assert [(r["guidance_scale"], r["guidance_schedule"]) for r in rows] == [
        (1.0, "constant"), (1.0, "linear"), (2.0, "constant"), (2.0, "linear")]
    assert rows[0]["classifier_fd"] == rows[1]["classifier_fd"]  # at scale 1 a schedule has nothing to scale
    assert rows[2]["classifier_fd"] != rows[3]["classifier_fd"]
    # Guidance intervals: everywhere (the run's) by default, or those asked for; an interval no
    # sampled noise level falls into is the unguided model.
    intervals = str(tmp_path / "intervals.json")
    assert run_main(sampling_sweep.main, base + ["--samplers", "dpmpp:3", "--guidance", "1,2",
                                                 "--guidance_intervals", "all,0:1e-6", "--out", intervals]) == 0
    rows = json.load(open(intervals))["rows"]
    assert [r["guidance_interval"] for r in rows] == [[0, None], [0, 1e-6]] * 2
    assert rows[0]["classifier_fd"] == rows[1]["classifier_fd"] == rows[3]["classifier_fd"] != rows[2]["classifier_fd"]
    reports = {w: json.load(open(path)) for w, path in out.items()}
    for path in out.values():  # each JSON with its plot beside it
        assert imageio.imread(path[:-len(".json")] + ".png").shape[1] > 1000
    assert [reports[w]["weights"] for w in out] == ["ema", "raw", "ema"]
    assert [reports[w]["amp"] for w in out] == ["auto", "auto", "bf16"]  # the run's, or the one asked for
    assert reports["bf16"]["compute_dtype"] == "torch.bfloat16"  # what "auto" or "bf16" came to here
    assert run_main(sampling_sweep.main, base + ["--num_samples", "1"]) == 2  # one line: no traceback
    assert "--num_samples must be at least 2" in capsys.readouterr().err
    for report in reports.values():
        settings = [(r["sampler"], r["steps"], r["guidance_scale"]) for r in report["rows"]]
        assert settings == [("dpmpp", 3, 1.0), ("dpmpp", 3, 2.0), ("ddim", 2, 1.0), ("ddim", 2, 2.0)]
        for row in report["rows"]:
            assert 0 <= row["sample_accuracy"] <= 1 and row["classifier_fd"] >= 0
    # The tiny run's EMA (decay 0.9) differs from its raw weights, so the samples' features do too.
    assert reports["ema"]["rows"][0]["classifier_fd"] != reports["raw"]["rows"][0]["classifier_fd"]
    capsys.readouterr()
    assert run_main(sampling_sweep.main, base + ["--samplers", "dpmpp:x"]) == 2
    assert "--samplers" in capsys.readouterr().err
    assert run_main(sampling_sweep.main, base + ["--guidance_schedules", "cosine"]) == 2
    assert "--guidance_schedules" in capsys.readouterr().err
    assert run_main(sampling_sweep.main, base + ["--guidance", "2,strong"]) == 2
    assert "--guidance" in capsys.readouterr().err
    assert run_main(sampling_sweep.main, base + ["--guidance_intervals", "5:0.3"]) == 2
    assert "--guidance_intervals" in capsys.readouterr().err
    # --out replaces an earlier sweep's report and plot, never another file.
    sampling_sweep.refuse_overwriting_other_files(out["ema"], out["ema"][:-len(".json")] + ".png")
    before = {name: open(os.path.join(latent_run, name), "rb").read() for name in ("config.json", "diffusion_loss.png")}
    for name, says in (("config.json", "exists and is not a sampling sweep's report"),
                       ("diffusion_loss.json", "its plot would replace")):
        assert run_main(sampling_sweep.main, base + ["--out", os.path.join(latent_run, name)]) == 2
        assert says in capsys.readouterr().err
    assert all(open(os.path.join(latent_run, name), "rb").read() == data for name, data in before.items())


@pytest.mark.parametrize("model", ["unet", "attn_unet", "transformer"])
def test_pixel_denoisers_on_all_ten_cifar_classes(model, cifar10_root, tmp_path):
    run = str(tmp_path / model)
    extra = ["--loss", "balanced", "--timestep_sampling", "adaptive"] if model == "unet" else []
    assert main.main(["--train_diffusion", "--model", model, "--dataset", "cifar10", "--data_root", str(cifar10_root),
                      "--epochs", "1", "--results_dir", run] + TINY + extra) == 0
    state = load_checkpoint(os.path.join(run, "conditional_diffusion_final.pt"))
    assert state["config"]["model"] == model and "vae" not in state["stage"]
    assert len(state["stage"]["class_names"]) == 10
    out = str(tmp_path / "gen")
    assert generate.main(["--model_path", os.path.join(run, "conditional_diffusion_final.pt"), "--class_name", "horse",
                          "--num_samples", "2", "--steps", "4", "--guidance_scale", "3", "--output_dir", out,
                          "--device", "cpu"]) == 0
    assert len(os.listdir(os.path.join(out, "horse"))) == 2
    for mode, steps in (("forward_process", []), ("denoising_steps", ["--steps", "4"])):
        assert visualize.main(["--results_dir", run, "--mode", mode, "--class_name", "horse", *steps,
                               "--device", "cpu"]) == 0
    assert os.path.isfile(os.path.join(run, "denoising_steps_horse.png"))


def test_reconstruction_rows_are_named_by_their_own_class(monkeypatch, tmp_path):
    """Classes with fewer held-out images than a row holds must not shift the later rows' names."""
    from viz import figures

    class Identity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, sample=True):
            return (x,)

    labels = torch.tensor([0] * 3 + [1] * 10 + [2] * 5)
    images = labels.view(-1, 1, 1, 1).expand(-1, 3, 4, 4).to(torch.uint8) * 100  # the class in the pixels
    drawn = {}
    monkeypatch.setattr(figures, "labelled_rows", lambda rows, names, path, **kw: drawn.update(rows=rows, names=names))
    figures.reconstruction_grid(Identity(), images, labels, ["a", "b", "c"], str(tmp_path / "r.png"), per_class=8)
    reals = drawn["rows"][0::2]
    assert [name.split("\n")[0] for name in drawn["names"][0::2]] == ["a", "b", "c"]
    assert [len(r) for r in reals] == [3, 8, 5]
    assert all((row == 100 * c).all() for c, row in enumerate(reals))


def test_evaluation_during_training_picks_the_best_checkpoint_by_its_sample_fd(latent_run, real_classifier,
                                                                                cifar10_root, tmp_path):
    """--eval_every: the offline sample metrics are logged, and _best.pt is the epoch whose samples
    came closest to the held-out images (not the one with the lowest held-out loss)."""
    import shutil

    from training.run import Run
    run = str(tmp_path / "evaluated")
    os.makedirs(run)
    for name in ("vae_gan_best.pt", "vae_gan_last.pt"):
        shutil.copy(os.path.join(latent_run, name), run)
    assert main.main(["--train_diffusion", "--dataset", "cifar10_catdog", "--data_root", str(cifar10_root),
                      "--epochs", "3", "--eval_every", "1", "--eval_samples", "4", "--classifier_path",
                      real_classifier, "--results_dir", run] + TINY) == 0
    rows = [r for r in Run(run).read_metrics() if r["stage"] == "conditional_diffusion"]
    fd = {int(r["epoch"]): float(r["value"]) for r in rows if r["name"] == "classifier_fd_heldout"}
    assert sorted(fd) == [1, 2, 3] and {r["name"] for r in rows} >= {"sample_accuracy", "classifier_kid"}
    best = load_checkpoint(os.path.join(run, "conditional_diffusion_best.pt"))
    assert best["best_metric"] == "classifier_fd_heldout"
    assert best["epoch"] == min(fd, key=fd.get) and best["best"] == pytest.approx(min(fd.values()), rel=1e-4)


def test_decoding_undoes_the_latent_standardization(latent_run, cifar10_root):
    from data import load_dataset, to_float
    from pipeline import load_pipeline
    pipe = load_pipeline(latent_run, device=torch.device("cpu"))
    pipe.latent_shift, pipe.latent_scale = pipe.latent_shift + 0.3, pipe.latent_scale * 2.0  # far from 0 and 1
    images = load_dataset("cifar10_catdog", cifar10_root, "val").images[:4]
    with torch.no_grad():
        mean, _ = pipe.vae.encode(to_float(images))
        direct = pipe.vae.decode(mean).float().clamp(-1, 1)
    torch.testing.assert_close(pipe.decode(pipe.to_model_space(images)), direct, atol=1e-5, rtol=0)


def test_denoising_path_draws_the_sampled_class_under_its_paths_when_classes_leave_it_out(latent_run, monkeypatch):
    from viz import figures
    shown, draw = [], figures.denoising_path_figure
    monkeypatch.setattr(figures, "denoising_path_figure",
                        lambda pipe, label, latents, labels, *a, **k: (shown.append(set(labels.tolist())),
                                                                       draw(pipe, label, latents, labels, *a, **k)))
    assert visualize.main(["--results_dir", latent_run, "--mode", "denoising_path", "--classes", "cat",
                           "--class_name", "dog", "--num_samples", "2", "--steps", "3", "--device", "cpu"]) == 0
    assert shown == [{0, 1}]  # cat as asked, and dog, the class sampled


def test_the_held_out_latents_stay_when_a_resume_changes_seed_or_subset(latent_run):
    """The best checkpoint is chosen on the held-out loss of these latents: a resume may change
    --seed and --subset (at an epoch boundary), and must still measure the same held-out set."""
    import dataclasses

    from training.runner import _latent_data, load_splits
    cfg = Config.from_dict(json.load(open(os.path.join(latent_run, "config.json"))))
    resumed = load_checkpoint(os.path.join(latent_run, "conditional_diffusion_last.pt"))["stage"]
    held_out = []
    for changed in (cfg, dataclasses.replace(cfg, seed=5, subset=6)):
        train, val = load_splits(changed)
        held_out.append(_latent_data(changed, torch.device("cpu"), train, val, resumed)[-1])
    assert torch.equal(*held_out)


def test_forward_process_of_a_latent_run_says_it_noises_pixels(latent_run, monkeypatch):
    from viz import figures
    seen, draw = [], figures.forward_process_figure

    def spy(*args, latent=False, **kwargs):
        seen.append(latent)
        return draw(*args, latent=latent, **kwargs)

    monkeypatch.setattr(figures, "forward_process_figure", spy)
    assert visualize.main(["--results_dir", latent_run, "--mode", "forward_process", "--device", "cpu"]) == 0
    assert seen == [True]


def test_a_resume_may_repeat_the_runs_own_architecture_flags(image_folder_root, tmp_path):
    """A transformer run resumed with its own --patch_size and no --model: not taken for the default
    latent UNet, whose flags exclude the transformer's."""
    run = str(tmp_path / "run")
    args = ["--train_diffusion", "--model", "transformer", "--dataset", "folder", "--data_root",
            str(image_folder_root), "--image_size", "16", "--patch_size", "4", "--results_dir", run] + TINY
    assert main.main([*args, "--epochs", "1"]) == 0
    resumed = [a for a in args if a not in ("--model", "transformer")]
    assert main.main([*resumed, "--epochs", "2", "--resume"]) == 0
    assert load_checkpoint(os.path.join(run, "conditional_diffusion_last.pt"))["epoch"] == 2
