"""Bad input to the evaluation, picture and bench commands: refused in one error line (exit
status 2), before the long work, never scored or drawn into wrong numbers or a traceback.

One tiny latent run on a cat/dog folder is trained once per module, in-process; a second
folder of other classes ({bird, plane, ship}) has its own real-data classifier.
"""
import json
import sys
import types

import pytest
import torch
from PIL import Image

import fixtures
from errors import run_main
from helpers_cli import one_torch_thread

COMMON = ["--dataset", "folder", "--preset", "tiny", "--batch_size", "8", "--image_size", "16", "--device", "cpu"]
TRAIN = [*COMMON, "--base_channels", "16", "--picture_every", "100"]
OTHER_CLASSES = ("bird", "plane", "ship")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import main
    root = tmp_path_factory.mktemp("bad_input_eval")
    paths = types.SimpleNamespace(
        data=fixtures.make_image_folder(root / "data", n_train=8, n_test=2, size=16),  # 1 held-out image a class
        other=fixtures.make_image_folder(root / "other", classes=OTHER_CLASSES, n_train=8, n_test=2, size=16),
        run=root / "run", other_classifier=root / "other_classifier")
    with one_torch_thread():
        assert main.main(["--train_all", *TRAIN, "--data_root", str(paths.data), "--vae_epochs", "1",
                          "--diffusion_epochs", "1", "--results_dir", str(paths.run)]) == 0
        assert main.main(["--train_classifier", *COMMON, "--data_root", str(paths.other), "--epochs", "1",
                          "--results_dir", str(paths.other_classifier)]) == 0
    return paths


def refused(capsys, main, argv, contains):
    """run_main's status is 2 with one stderr line holding every string of `contains`."""
    with one_torch_thread():
        status = run_main(main, [str(a) for a in argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), (status, lines)
    for text in contains:
        assert text in lines[0], lines
    return lines[0]


def not_reached(*args, **kwargs):
    raise AssertionError("the long work started before the bad input was refused")


# --- held-out data of other classes than the run's ------------------------------------------------

@pytest.mark.parametrize("action", [["--classify"], ["--evaluate", "--no_fid", "--num_samples", "4"]])
def test_scoring_a_run_on_data_of_other_classes_is_refused(runs, capsys, monkeypatch, tmp_path, action):
    """--evaluate with a real-data classifier of that other data too: it agrees with the data."""
    import generate
    import pipeline
    monkeypatch.setattr(pipeline.Pipeline, "sample", not_reached)
    if "--evaluate" in action:
        action = [*action, "--classifier_path", runs.other_classifier / "classifier_best.pt"]
    refused(capsys, generate.main, ["--results_dir", runs.run, *action, "--data_root", runs.other,
                                    "--output_dir", tmp_path, "--device", "cpu"],
            contains=["bird, plane, ship", "cat, dog"])
    assert list(tmp_path.iterdir()) == []


def test_sampling_sweep_refuses_a_data_folder_of_other_classes(runs, capsys, monkeypatch, tmp_path):
    """The sweep reads the run's own data folder: here it holds other classes since the training."""
    from bench import sampling_sweep
    load_pipeline = sampling_sweep.load_pipeline

    def run_whose_data_changed(*args, **kwargs):
        pipe = load_pipeline(*args, **kwargs)
        pipe.cfg.data_root = str(runs.other)
        return pipe
    monkeypatch.setattr(sampling_sweep, "load_pipeline", run_whose_data_changed)
    monkeypatch.setattr(sampling_sweep, "load_real_classifier", not_reached)
    refused(capsys, sampling_sweep.main, ["--results_dir", runs.run, "--device", "cpu", "--num_samples", "4",
                                          "--out", tmp_path / "sweep.json"], contains=["bird, plane, ship", "cat, dog"])


# --- a damaged real-data classifier checkpoint -----------------------------------------------------

@pytest.mark.parametrize("part, missing", [("stage", "class_names, model"), ("class_names", "class_names"),
                                           ("model", "model")])
def test_a_classifier_checkpoint_missing_a_part_is_refused_by_name(runs, tmp_path, part, missing):
    from config import Config
    from errors import UserError
    from evaluation.evaluate import load_real_classifier
    state = torch.load(runs.other_classifier / "classifier_best.pt", weights_only=True)
    del (state if part == "stage" else state["stage"])[part]
    damaged = tmp_path / "classifier_best.pt"
    torch.save(state, damaged)
    cfg = Config.from_dict(state["config"])
    expected = f"^{damaged} is not a complete classifier checkpoint \\(no {missing} inside\\)"
    with pytest.raises(UserError, match=expected):
        load_real_classifier(cfg, "cpu", str(damaged))


@pytest.mark.parametrize("weights, message", [("missing.pth", "no such file"),
                                             ("garbage.pth", "is not a readable FID Inception weights file")])
def test_evaluate_refuses_an_inception_weights_file_it_cannot_use_before_sampling(runs, capsys, monkeypatch, tmp_path,
                                                                                 weights, message):
    """A file named on the command line must work: a typo is not a note and an eval.json without FID."""
    import generate
    (tmp_path / "garbage.pth").write_text("not weights")
    monkeypatch.setattr("evaluation.evaluate.load_real_classifier", not_reached)
    refused(capsys, generate.main, ["--evaluate", "--results_dir", runs.run, "--device", "cpu", "--num_samples", "2",
                                    "--inception_weights", tmp_path / weights, "--output_dir", tmp_path / "out"],
            contains=[message])
    assert not (tmp_path / "out" / "eval.json").exists()


def test_inception_weights_with_no_fid_are_refused(runs, capsys):
    import generate
    refused(capsys, generate.main, ["--evaluate", "--no_fid", "--inception_weights", "w.pth", "--results_dir", runs.run,
                                    "--device", "cpu"], contains=["--inception_weights does not apply with --no_fid"])


@pytest.mark.parametrize("action", [["--classify"], ["--evaluate", "--no_fid", "--num_samples", "4"]])
def test_scoring_on_data_that_holds_out_other_images_is_refused(runs, capsys, monkeypatch, tmp_path, action):
    """One image more in the data folder moves the validation carve-out: the run's held-out scores
    could then count images it trained on."""
    import shutil

    import generate
    grown = tmp_path / "grown"
    shutil.copytree(runs.data, grown)
    shutil.copy(next((grown / "train" / "cat").iterdir()), grown / "train" / "cat" / "extra.png")
    monkeypatch.setattr("evaluation.evaluate.load_real_classifier", not_reached)
    refused(capsys, generate.main, [*action, "--results_dir", runs.run, "--data_root", grown, "--device", "cpu",
                                    "--output_dir", tmp_path / "out"],
            contains=[f"the data in {grown} holds out other images than the run did"])


def test_the_sweep_refuses_a_run_whose_data_grew_since(capsys, monkeypatch, tmp_path):
    """Files added in place move the validation carve-out under a finished run: its held-out scores
    could count images it trained on."""
    import main
    from bench import sampling_sweep
    data = fixtures.make_image_folder(tmp_path / "data", n_train=8, n_test=2, size=16)
    with one_torch_thread():
        assert main.main(["--train_diffusion", "--model", "unet", *TRAIN, "--data_root", str(data), "--epochs", "1",
                          "--results_dir", str(tmp_path / "run")]) == 0
    Image.new("RGB", (16, 16)).save(data / "train" / "cat" / "extra.png")
    import data as data_module  # a later command is a new process: nothing read before is cached
    from evaluation import evaluate
    data_module.clear_cache()
    evaluate._read_heldout_split.cache_clear()
    capsys.readouterr()  # the training's own output
    monkeypatch.setattr(sampling_sweep, "load_real_classifier", not_reached)
    refused(capsys, sampling_sweep.main, ["--results_dir", tmp_path / "run", "--device", "cpu", "--num_samples", "2",
                                          "--out", tmp_path / "sweep.json"],
            contains=[f"the data in {data} holds out other images than the run did"])


def test_evaluation_during_training_needs_a_sample_of_every_class(runs, capsys, monkeypatch, tmp_path):
    """Two samples of three classes: refused before the classifier is loaded or a step is trained."""
    import main
    monkeypatch.setattr("evaluation.evaluate.load_real_classifier", not_reached)
    refused(capsys, main.main, ["--train_diffusion", "--model", "unet", *TRAIN, "--data_root", runs.other,
                                "--results_dir", tmp_path / "run", "--eval_every", "1", "--eval_samples", "2"],
            contains=["--eval_every needs at least 3 samples (one per class of the 3", "got --eval_samples 2"])
    assert not (tmp_path / "run").exists()


def test_evaluate_needs_a_sample_of_every_class(monkeypatch):
    """Two samples of a three-class run leave a class unscored: refused before any work."""
    from errors import UserError
    from evaluation import evaluate
    monkeypatch.setattr(evaluate, "load_real_classifier", not_reached)
    monkeypatch.setattr(evaluate, "check_heldout_classes", not_reached)
    pipe = types.SimpleNamespace(cfg=None, device="cpu", num_classes=3)
    with pytest.raises(UserError, match=r"needs at least 3 samples \(one per class of the 3, .*got --num_samples 2"):
        evaluate.evaluate_run(pipe, "run", types.SimpleNamespace(num_samples=2), seed=0)


# --- bench/sampling_sweep.py -----------------------------------------------------------------------

@pytest.mark.parametrize("seed", [2 ** 32, -1])
def test_sampling_sweep_checks_the_seeds_range_as_the_config_does(runs, capsys, monkeypatch, tmp_path, seed):
    from bench import sampling_sweep
    monkeypatch.setattr(sampling_sweep, "load_real_classifier", not_reached)
    refused(capsys, sampling_sweep.main, ["--results_dir", runs.run, "--device", "cpu", "--seed", seed,
                                          "--out", tmp_path / "sweep.json"], contains=["--seed must be in [0, 2**32)"])


def test_sampling_sweep_refuses_guidance_a_run_never_trained(runs, capsys, monkeypatch, tmp_path):
    """A run trained with label dropout 0 (as --preset s1 is) has no null label to guide against."""
    import dataclasses

    from bench import sampling_sweep
    load = sampling_sweep.load_pipeline

    def without_label_dropout(*args, **kwargs):
        pipe = load(*args, **kwargs)
        pipe.cfg = dataclasses.replace(pipe.cfg, label_dropout=0.0, guidance_scale=1.0)
        return pipe

    monkeypatch.setattr(sampling_sweep, "load_pipeline", without_label_dropout)
    monkeypatch.setattr(sampling_sweep, "load_real_classifier", not_reached)
    refused(capsys, sampling_sweep.main, ["--results_dir", runs.run, "--device", "cpu", "--guidance", "1,2",
                                          "--out", tmp_path / "sweep.json"],
            contains=["--guidance_scale 2 guides against the null label"])


# --- visualize.py ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["latent_space", "denoising_path"])
def test_latent_pictures_of_fewer_than_two_held_out_images_are_refused(runs, capsys, monkeypatch, mode):
    import pipeline
    import visualize
    monkeypatch.setattr(pipeline.Pipeline, "sample", not_reached)
    refused(capsys, visualize.main, ["--mode", mode, "--results_dir", runs.run, "--classes", "cat", "--device", "cpu"],
            contains=[f"--mode {mode} needs at least 2 held-out images", "found 1"])


@pytest.mark.parametrize("flag", [["--dataset", "cifar10"], ["--model", "transformer"], ["--image_size", "64"],
                                  ["--preset", "s1"]])
def test_loss_curves_refuse_flags_the_run_was_not_trained_with(runs, capsys, flag):
    import visualize
    refused(capsys, visualize.main, ["--mode", "loss_curves", "--results_dir", runs.run, *flag],
            contains=[f"the run was trained with {flag[0][2:]}=", f"not {' '.join(flag)}"])


def test_loss_curves_take_flags_the_run_was_trained_with(runs):
    import visualize
    assert visualize.main(["--mode", "loss_curves", "--results_dir", str(runs.run), "--dataset", "folder",
                           "--image_size", "16", "--preset", "tiny"]) == 0


# --- bench/diffusers_recipe.py, with stand-ins for diffusers (not installed here) and its UNet -------

def stand_in_unet(args, image_size, num_classes):
    unet = torch.nn.Module()
    unet.class_embedding = torch.nn.Embedding(num_classes, 4)  # named as in diffusers' UNet2DModel
    return unet


@pytest.fixture
def recipe(monkeypatch, image_folder_root, tmp_path):
    """diffusers_recipe.main on the cat/dog folder, its out folder and a model.pt writer; training,
    sampling and the metrics are stand-ins (sampling gives images of the class's grey level)."""
    from bench import diffusers_recipe
    diffusers = types.ModuleType("diffusers")
    diffusers.__version__, diffusers.DDPMScheduler = "stand-in", lambda **kwargs: None
    monkeypatch.setitem(sys.modules, "diffusers", diffusers)
    monkeypatch.setattr(diffusers_recipe, "build_unet", stand_in_unet)
    monkeypatch.setattr(diffusers_recipe, "train", lambda *args: {"steps": 1})
    monkeypatch.setattr(diffusers_recipe, "sample", lambda args, model, scheduler, labels, size, device:
                        (labels * 200).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, size, size))
    monkeypatch.setattr(diffusers_recipe, "load_real_classifier", lambda *args: None)
    metrics = {"sample_accuracy": 0.5, "classifier_fd": 1.0, "classifier_kid": 0.1}

    class Metrics:
        classifier = types.SimpleNamespace(checkpoint_path="classifier_best.pt")

        def __init__(self, *args):
            pass

        def __call__(self, images, labels):
            return metrics
    monkeypatch.setattr(diffusers_recipe, "OfflineMetrics", Metrics)
    out = tmp_path / "out"

    def model_file(class_names, num_embeddings):
        out.mkdir(exist_ok=True)
        from training.checkpoint import save_checkpoint
        saved = {"kind": "diffusers_contender", "config": vars(diffusers_recipe.parse_args(["--data_root", "x",
                                                                                            "--out", "y"])),
                 "model": stand_in_unet(None, 32, num_embeddings).state_dict(), "log": {"steps": 1}}
        if class_names is not None:
            saved["class_names"] = class_names
        save_checkpoint(saved, out / "model.pt")

    def run(*args):
        return run_main(diffusers_recipe.main, ["--data_root", str(image_folder_root), "--out", str(out),
                                                "--device", "cpu", "--batch_size", "8", *map(str, args)])
    return types.SimpleNamespace(module=diffusers_recipe, out=out, model_file=model_file, run=run)


def test_diffusers_recipe_refuses_one_sample_before_training(recipe, monkeypatch, capsys):
    monkeypatch.setattr(recipe.module, "train", not_reached)
    assert recipe.run("--num_samples", "1") == 2
    assert "scoring the contender needs at least 2 samples" in capsys.readouterr().err


def test_diffusers_recipe_needs_a_sample_of_every_class_before_training(runs, capsys, monkeypatch, tmp_path):
    """Checked before diffusers is even imported: here it is not installed."""
    from bench import diffusers_recipe
    monkeypatch.setattr(diffusers_recipe, "train", not_reached)
    refused(capsys, diffusers_recipe.main, ["--data_root", runs.other, "--out", tmp_path / "out", "--device", "cpu",
                                            "--num_samples", "2"],
            contains=["scoring the contender needs at least 3 samples (one per class of the 3"])


def test_diffusers_recipe_saves_the_class_names_and_scores_unequal_class_counts(recipe):
    from training.checkpoint import load_checkpoint
    assert recipe.run("--stage", "train") == 0
    assert load_checkpoint(str(recipe.out / "model.pt"))["class_names"] == ["cat", "dog"]
    assert recipe.run("--stage", "score", "--num_samples", "3") == 0  # 2 cats, 1 dog
    scores = json.loads((recipe.out / "eval.json").read_text())
    assert scores["num_samples"] == 3 and scores["classifier"] == "classifier_best.pt"  # which classifier scored
    grid = Image.open(recipe.out / "samples_grid.png").convert("L")
    assert grid.size == (2 * 34 + 2, 2 * 34 + 2)  # a row per class, 2 wide, 32 px tiles with 2 px padding
    assert [grid.getpixel((x, y)) for x, y in ((18, 18), (52, 18), (18, 52), (52, 52))] == [0, 0, 200, 255]


def test_diffusers_recipe_writes_its_scores_before_the_picture(recipe, monkeypatch):
    recipe.model_file(["cat", "dog"], 2)

    def picture_fails(*args, **kwargs):
        raise OSError("the picture could not be written")
    monkeypatch.setattr(recipe.module, "save_grid", picture_fails)
    with pytest.raises(OSError, match="picture"):
        recipe.run("--stage", "score", "--num_samples", "4")
    assert json.loads((recipe.out / "eval.json").read_text())["sample_accuracy"] == 0.5


@pytest.mark.parametrize("class_names, num_embeddings, trained_on", [
    (list(OTHER_CLASSES), 3, "bird, plane, ship"),
    (None, 3, "3 classes"),  # a model.pt from before the class names were saved
])
def test_diffusers_recipe_refuses_to_score_on_data_of_other_classes(recipe, monkeypatch, capsys, class_names,
                                                                    num_embeddings, trained_on):
    recipe.model_file(class_names, num_embeddings)
    monkeypatch.setattr(recipe.module, "sample", not_reached)
    assert recipe.run("--stage", "score", "--num_samples", "4") == 2
    err = capsys.readouterr().err
    assert f"was trained on {trained_on}, not this data's cat, dog" in err and err.count("\n") == 1, err
