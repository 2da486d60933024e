"""Bad input battery: wrong invocations of main.py, generate.py and visualize.py, each run as a
real subprocess, must end with exit status 2, exactly one non-empty stderr line ("error: ..."),
no traceback, and no file of an earlier run changed.

Two tiny runs (one latent, one pixel) are trained once per module, in-process, and the
generate/visualize cases point at them. The cases run a few at a time in the background (each
is its own process) so the battery fits a small CI machine's time budget; every test then
checks its own case. Cases that need no fresh process (IN_PROCESS, and a read-only run folder,
which is simulated in-process) call the scripts' main through run_main instead.
"""
from __future__ import annotations

import builtins
import errno
import os
import shutil
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fixtures
from helpers_cli import assert_one_line_error, one_torch_thread, run_cli, snapshot, snapshot_changes

IMAGE_SIZE = 16  # tiny images: the runs below are only there to be pointed at
SHARED = ["--dataset", "folder", "--preset", "tiny", "--batch_size", "8", "--image_size", IMAGE_SIZE,
          "--picture_every", "100"]  # what every stage reads
TRAIN = [*SHARED, "--base_channels", "16"]  # and the denoiser's width: --train_diffusion and --train_all


@dataclass(frozen=True)
class Case:
    id: str
    script: str
    args: tuple       # strings; "{name}" stands for a Paths attribute, "{fresh}" for an unused folder
    contains: str     # text the one error line must hold (may name a path the same way)


def case(id, script, *args, contains):
    return Case(id, script, tuple(str(a) for a in args), contains)


M = ("main.py", "--train_diffusion", "--model", "unet", *TRAIN, "--data_root", "{data}",
     "--results_dir", "{fresh}")  # a valid fresh pixel run, to which each case adds one bad thing
T = ("main.py", "--train_diffusion", *SHARED, "--data_root", "{data}", "--results_dir", "{fresh}")  # + --model

CASES = [
    # --- main.py: names, sizes, counts, ranges
    case("main_unknown_dataset", *M, "--dataset", "imagenet_zzz", contains="unknown dataset"),
    case("main_unknown_model", *M, "--model", "resnet_zzz", contains="--model"),
    case("main_unknown_sampler", *M, "--sampler", "euler_zzz", contains="--sampler"),
    case("main_batch_size_zero", *M, "--batch_size", "0", contains="--batch_size"),
    case("main_epochs_zero", *M, "--epochs", "0", contains="--epochs"),
    case("main_minutes_negative", *M, "--minutes", "-1", contains="minutes"),
    case("main_minutes_with_train_all", *M[:1], "--train_all", *M[2:], "--minutes", "3", contains="--vae_minutes"),
    case("main_subset_negative", *M, "--subset", "-5", contains="--subset"),
    case("main_flag_prefix_is_not_guessed", *M, "--vae_lr", "cosine", contains="unrecognized arguments: --vae_lr"),
    case("main_eval_samples_one", *M, "--eval_every", "1", "--eval_samples", "1", contains="--eval_samples"),
    case("main_image_size_not_halvable", *M, "--image_size", "17", contains="divisible by 2"),
    case("main_vgg_weights_not_a_checkpoint", "main.py", "--train_vae", *SHARED, "--data_root", "{data}",
         "--results_dir", "{fresh}", "--perceptual_weight", "0.1", "--vgg_weights", "{text}",
         contains="not a readable VGG16 checkpoint"),
    case("main_checkpoint_into_another_run", *M[:-1], "{latent}", "--checkpoint_path",
         "{pixel}/conditional_diffusion_last.pt", "--total_epochs", "3", contains="another run"),
    case("main_image_size_zero", *M, "--image_size", "0", contains="--image_size"),
    case("main_steps_negative", *M, "--steps", "-1", contains="--steps"),
    case("main_guidance_negative", *M, "--guidance_scale", "-1", contains="--guidance_scale"),
    case("main_guidance_interval_reversed", *M, "--guidance_interval", "5", "0.3", contains="--guidance_interval"),
    case("main_unknown_vae_lr_schedule", *M, "--vae_lr_schedule", "step_zzz", contains="--vae_lr_schedule"),
    case("main_unknown_lr_schedule", *M, "--lr_schedule", "step_zzz", contains="--lr_schedule"),
    case("main_width_not_split_into_heads", *M, "--model", "attn_unet", "--base_channels", "51",
         contains="--base_channels 51"),
    case("main_width_zero", *M, "--base_channels", "0", contains="head counts must be positive"),
    case("main_patch_does_not_divide_latent", *T, "--model", "latent_transformer", "--patch_size", "3",
         contains="--patch_size 3"),
    case("main_patch_size_zero", *T, "--model", "transformer", "--patch_size", "0", contains="--patch_size"),
    case("main_vae_res_blocks_negative", "main.py", "--train_vae", *SHARED, "--data_root", "{data}", "--results_dir",
         "{fresh}", "--vae_res_blocks", "-1", contains="--vae_res_blocks must not be negative, got -1"),
    case("main_checkpoint_every_zero_on_resume", *M[:-1], "{pixel}", "--resume", "--epochs", "3",
         "--checkpoint_every", "0", contains="--checkpoint_every"),  # checked before an epoch trains unsaved
    case("main_dropout_out_of_range", *M, "--dropout", "2", contains="--dropout"),
    case("main_lr_infinite", *M, "--lr", "inf", contains="--lr"),
    case("main_ema_decay_negative", *M, "--ema_decay", "-1", contains="--ema_decay"),
    case("main_diffusion_epochs_zero", *M, "--diffusion_epochs", "0", contains="--diffusion_epochs"),
    case("main_total_epochs_negative", *M, "--checkpoint_path", "{pixel}/conditional_diffusion_last.pt",
         "--total_epochs", "-5", contains="--total_epochs"),
    case("main_resume_and_checkpoint_path", *M, "--resume", "--checkpoint_path",
         "{pixel}/conditional_diffusion_last.pt", "--total_epochs", "3", contains="give one of them"),
    case("main_attribute_for_a_folder", *M, "--attribute", "Eyeglasses", contains="--attribute"),
    # --- main.py: data
    case("main_missing_data", *M, "--data_root", "{missing}", contains="does not exist"),
    case("main_empty_data", *M, "--data_root", "{empty}", contains="(one folder per class"),
    case("main_one_class", *M, "--data_root", "{one_class}", contains="one class"),
    case("main_unreadable_image", *M, "--data_root", "{garbage}", contains="cannot read image"),
    # --- main.py: run folders and checkpoints
    case("main_results_under_file", *M[:-1], "{a_file}/run", contains="results folder"),
    case("main_resume_nothing", *M, "--resume", contains="nothing to resume"),
    case("main_checkpoint_without_total", *M, "--checkpoint_path", "{pixel}/conditional_diffusion_last.pt",
         contains="--total_epochs"),
    case("main_checkpoint_other_model", *M, "--checkpoint_path", "{pixel}/conditional_diffusion_last.pt",
         "--total_epochs", "3", "--model", "attn_unet", contains="not --model attn_unet"),
    case("main_train_vae_pixel_model", "main.py", "--train_vae", "--model", "unet", *SHARED, "--data_root",
         "{data}", "--results_dir", "{fresh}", contains="no VAE"),
    case("main_fresh_run_over_earlier_run", *M[:-1], "{pixel}", contains="--resume"),
    case("main_resume_with_missing_data", *M[:-4], "--data_root", "{missing}", "--results_dir", "{pixel}",
         "--resume", "--epochs", "2", contains="does not exist"),
    # --- generate.py
    case("gen_no_results_dir", "generate.py", contains="--results_dir"),
    case("gen_num_samples_zero", "generate.py", "--results_dir", "{pixel}", "--num_samples", "0",
         contains="--num_samples"),
    case("gen_evaluate_one_sample", "generate.py", "--results_dir", "{pixel}", "--evaluate", "--num_samples", "1",
         contains="--num_samples"),
    case("gen_steps_too_many", "generate.py", "--results_dir", "{pixel}", "--steps", "100000", contains="--steps"),
    case("gen_unknown_class", "generate.py", "--results_dir", "{pixel}", "--class_name", "zebra",
         contains="unknown class"),
    case("gen_model_path_missing", "generate.py", "--model_path", "{missing}.pt", contains="does not exist"),
    case("gen_model_path_truncated", "generate.py", "--model_path", "{truncated}",
         contains="not a readable checkpoint"),
    case("gen_model_path_vae", "generate.py", "--model_path", "{latent}/vae_gan_best.pt", contains="vae_gan"),
    case("gen_other_dataset", "generate.py", "--results_dir", "{pixel}", "--dataset", "cifar10",
         contains="not --dataset cifar10"),
    case("gen_output_under_file", "generate.py", "--results_dir", "{pixel}", "--output_dir", "{a_file}/out",
         "--num_samples", "1", contains="{a_file}"),
    case("gen_flag_the_action_does_not_read", "generate.py", "--results_dir", "{pixel}", "--evaluate",
         "--class_name", "dog", contains="--class_name"),
    case("gen_two_actions", "generate.py", "--results_dir", "{pixel}", "--evaluate", "--classify",
         contains="not allowed with"),
    case("gen_classify_images_negative", "generate.py", "--results_dir", "{pixel}", "--evaluate",
         "--classify_images", "-1", contains="--classify_images"),
    case("gen_model_path_folder", "generate.py", "--model_path", "{pixel}", contains="is a folder"),
    case("gen_model_path_and_results_dir", "generate.py", "--results_dir", "{pixel}", "--model_path",
         "{latent}/conditional_diffusion_final.pt", "--classify", contains="--output_dir"),  # not into {pixel}
    # --- visualize.py
    case("vis_flag_the_mode_does_not_read", "visualize.py", "--mode", "forward_process", "--results_dir",
         "{pixel}", "--steps", "10", contains="--steps"),
    case("vis_reconstructions_pixel_run", "visualize.py", "--mode", "reconstructions", "--results_dir", "{pixel}",
         contains="latent model"),
    case("vis_reconstructions_other_dataset", "visualize.py", "--mode", "reconstructions", "--results_dir",
         "{latent}", "--dataset", "cifar10", contains="not --dataset cifar10"),
    case("vis_unknown_mode", "visualize.py", "--mode", "tsne_zzz", "--results_dir", "{pixel}", contains="--mode"),
    case("vis_latent_space_pixel_run", "visualize.py", "--mode", "latent_space", "--results_dir", "{pixel}",
         contains="latent model"),
    case("vis_unknown_class", "visualize.py", "--mode", "denoising_steps", "--results_dir", "{latent}",
         "--class_name", "zebra", contains="unknown class"),
    case("vis_results_missing", "visualize.py", "--mode", "samples_grid", "--results_dir", "{missing}",
         contains="does not exist"),
    case("vis_latent_space_other_vae", "visualize.py", "--mode", "latent_space", "--results_dir",
         "{latent_other_vae}", contains="latent_channels"),
    case("vis_model_path_text", "visualize.py", "--mode", "samples_grid", "--model_path", "{text}",
         contains="{text} is not a checkpoint: another kind of file (it begins"),
    case("gen_data_root_empty", "generate.py", "--results_dir", "{pixel}", "--data_root", "", "--evaluate",
         contains="--data_root must not be empty"),
    case("vis_model_path_and_results_dir", "visualize.py", "--mode", "samples_grid", "--results_dir", "{pixel}",
         "--model_path", "{latent}/conditional_diffusion_final.pt", contains="not both"),
]


class Paths:
    """Everything the cases point at, as strings for str.format."""

    def __init__(self, root: Path):
        self.root = root
        self.fresh = root / "fresh"  # one never-before-used results folder per case
        self.data = fixtures.make_image_folder(root / "data", n_train=8, n_test=2, size=IMAGE_SIZE)
        self.missing = root / "does_not_exist"
        self.empty = root / "empty"
        self.empty.mkdir()
        self.one_class = fixtures.make_image_folder(root / "one_class", classes=("cat",), n_train=4,
                                                    size=IMAGE_SIZE)
        self.garbage = fixtures.make_image_folder(root / "garbage", n_train=4, n_test=0, size=IMAGE_SIZE,
                                                  with_test=False)
        (self.garbage / "train" / "dog" / "0002.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png" * 10)
        self.a_file = root / "a_regular_file"
        self.a_file.write_text("results cannot go under a file\n")
        self.text = root / "notes.pt"
        self.text.write_text("this is a text file, not a checkpoint\n")
        self.pixel = root / "pixel_run"
        self.latent = root / "latent_run"
        self.latent_other_vae = root / "latent_run_other_vae"  # its VAE file from a run with other latents
        self.truncated = root / "truncated.pt"
        self.latent_no_centers = root / "latent_run_no_centers"  # its VAE file without the class centers
        self.config_edited = root / "config_edited.pt"  # base_channels changed after training
        self.config_text = root / "config_text.pt"  # the config stored as a string
        self.no_classes = root / "no_classes.pt"  # an empty class_names list
        self.non_finite = root / "non_finite.pt"  # NaN weights

    def format_dict(self):
        return {k: str(v) for k, v in self.__dict__.items()}


def _train_runs(paths: Paths):
    """One latent run (VAE-GAN + denoiser) and one pixel run, 1 epoch each, in-process."""
    import main
    common = [*map(str, TRAIN), "--data_root", str(paths.data)]
    assert main.main(["--train_all", *common, "--vae_epochs", "1", "--diffusion_epochs", "1",
                      "--results_dir", str(paths.latent)]) == 0
    assert main.main(["--train_diffusion", "--model", "unet", *common, "--epochs", "1",
                      "--results_dir", str(paths.pixel)]) == 0
    data = (paths.pixel / "conditional_diffusion_final.pt").read_bytes()
    paths.truncated.write_bytes(data[: len(data) // 2])
    paths.latent_other_vae.mkdir()
    shutil.copy(paths.latent / "conditional_diffusion_final.pt", paths.latent_other_vae)
    vae = torch.load(paths.latent / "vae_gan_best.pt", weights_only=True)
    vae["config"]["latent_channels"] = 8
    torch.save(vae, paths.latent_other_vae / "vae_gan_best.pt")
    paths.latent_no_centers.mkdir()
    shutil.copy(paths.latent / "conditional_diffusion_final.pt", paths.latent_no_centers)
    vae = torch.load(paths.latent / "vae_gan_best.pt", weights_only=True)
    del vae["stage"]["center_loss"]
    torch.save(vae, paths.latent_no_centers / "vae_gan_best.pt")

    def damaged(path, change):
        state = torch.load(paths.pixel / "conditional_diffusion_final.pt", weights_only=True)
        change(state)
        torch.save(state, path)
    damaged(paths.config_edited, lambda s: s["config"].update(base_channels=32))
    damaged(paths.config_text, lambda s: s.update(config=str(s["config"])))
    damaged(paths.no_classes, lambda s: s["stage"].update(class_names=[]))
    damaged(paths.non_finite, lambda s: [w.fill_(float("nan")) for w in s["stage"]["ema"].values()
                                         if w.is_floating_point()])


class Battery:
    """Runs the selected cases in the background, a few processes at a time."""

    def __init__(self, paths: Paths, cases: list[Case], workers: int = 3):
        self.paths = paths
        self.watched = {"pixel run": paths.pixel, "latent run": paths.latent, "data": paths.data}
        self.before = {name: snapshot(folder) for name, folder in self.watched.items()}
        self.pool = ThreadPoolExecutor(max_workers=workers)
        fmt = paths.format_dict()
        self.futures = {c.id: self.pool.submit(run_cli, c.script, *self._argv(c, fmt), timeout=240) for c in cases}

    def _argv(self, case: Case, fmt: dict) -> list[str]:
        fmt = dict(fmt, fresh=str(self.paths.fresh / case.id))
        return [str(a).format(**fmt) for a in case.args]

    def result(self, case_id):
        return self.futures[case_id].result()

    def changes(self) -> list[tuple[str, float | None]]:
        """Every change to a watched folder, once no case is running any more (no half-written
        state is seen), as (description, mtime)."""
        wait(self.futures.values())
        return [(f"{name}: {change}", mtime) for name, folder in self.watched.items()
                for change, mtime in snapshot_changes(self.before[name], snapshot(folder))]


@pytest.fixture(scope="module")
def battery(request, tmp_path_factory):
    paths = Paths(tmp_path_factory.mktemp("bad_input"))
    with one_torch_thread():
        _train_runs(paths)
    selected = {item.callspec.params["case"].id for item in request.session.items
                if getattr(item, "callspec", None) is not None and isinstance(item.callspec.params.get("case"), Case)}
    battery = Battery(paths, [c for c in CASES if c.id in selected])
    yield battery
    battery.pool.shutdown(wait=True, cancel_futures=True)
    shutil.rmtree(paths.root / "fresh", ignore_errors=True)


def test_enough_cases():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.script for c in CASES} == {"main.py", "generate.py", "visualize.py"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_invocation(battery, case):
    result = battery.result(case.id)
    contains = case.contains.format(**battery.paths.format_dict())
    assert_one_line_error(result, status=2, contains=contains)
    # Files of the earlier runs written while this case ran (cases run side by side: the time
    # window tells whose write it was; test_no_earlier_run_changed catches any change at all).
    mine = [text for text, mtime in battery.changes() if mtime is not None and
            result.started - 1 <= mtime <= result.ended + 1]
    assert not mine, f"files of earlier runs changed while this case ran: {mine}\n{result.describe()}"
    if case.script == "main.py" and "{fresh}" in case.args:  # refused before its results folder was made
        assert not (battery.paths.fresh / case.id).exists(), result.describe()


# --- a read-only run folder: refused before any work, by every command that writes into it

READ_ONLY_CALLS = [("generate", "--evaluate"), ("generate", "--classify"), ("generate", "--create_animation"),
                   *(("visualize", "--mode", mode) for mode in
                     ("latent_space", "samples_grid", "denoising_steps", "reconstructions", "loss_curves",
                      "forward_process", "steps_comparison", "denoising_path"))]


def _read_only(monkeypatch, folder):
    """Make `folder` behave like a read-only mount in this process (root writes through chmod
    555): creating or writing anything under it fails with EROFS; reading works; an existing
    folder still 'makedirs' fine, as there."""
    root = os.path.realpath(folder)

    def refused(path):
        try:
            path = os.path.realpath(os.fspath(path))
        except TypeError:  # a file descriptor
            return False
        return path == root or path.startswith(root + os.sep)

    def fail(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def open_(file, mode="r", *args, **kwargs):
        if refused(file) and set(mode) & set("wax+"):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if refused(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            fail(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if refused(path) and not os.path.exists(path):
            fail(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.mark.parametrize("call", READ_ONLY_CALLS, ids=[" ".join(c) for c in READ_ONLY_CALLS])
def test_read_only_run_folder_is_refused_before_any_work(battery, monkeypatch, capsys, call):
    import generate
    import pipeline
    import visualize
    from errors import run_main

    def no_sampling(*args, **kwargs):
        pytest.fail("sampled before finding the output folder read-only")
    monkeypatch.setattr(pipeline.Pipeline, "sample", no_sampling)
    monkeypatch.setattr(pipeline, "encode_images", no_sampling)
    run = str(battery.paths.latent)
    _read_only(monkeypatch, run)
    entry = {"generate": generate, "visualize": visualize}[call[0]]
    with one_torch_thread():
        status = run_main(entry.main, [*call[1:], "--results_dir", run, "--device", "cpu"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: cannot write to the ") and f"{run}: Read-only file system" in lines[0], lines


@pytest.mark.parametrize("stage", ["--train_vae", "--train_diffusion", "--train_classifier"])
def test_training_into_a_read_only_folder_is_refused_before_loading_data(battery, monkeypatch, capsys, tmp_path,
                                                                          stage):
    """The results folder is made only once every check has passed; whether it can be made is
    known at once, before the data are read (and, for a latent denoiser, encoded)."""
    import main
    from errors import run_main
    from training import runner

    def no_loading(*args, **kwargs):
        pytest.fail("read the data before finding the results folder unwritable")
    monkeypatch.setattr(runner, "load_splits", no_loading)
    parent = tmp_path / "read_only"
    parent.mkdir()
    _read_only(monkeypatch, parent)
    run = parent / "run"
    with one_torch_thread():
        flags = TRAIN if stage == "--train_diffusion" else SHARED
        status = run_main(main.main, [stage, *map(str, flags), "--data_root", str(battery.paths.data),
                                      "--results_dir", str(run)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1, lines
    assert lines[0] == f"error: cannot write to the results folder {run}: Read-only file system", lines
    assert not run.exists()


# The same contract checked in-process through run_main (what each script's __main__ runs): a
# subprocess costs ~4 s of CPU to import torch, too much for cases that need no fresh process.
IN_PROCESS = [
    # a flag no stage of the command reads (a 0 is a value given, not an absent flag)
    case("main_vae_flag_to_the_denoiser", *M, "--kl_weight", "0.5", contains="--kl_weight does not apply to "
         "--train_diffusion"),
    case("main_denoiser_flag_to_the_vae", "main.py", "--train_vae", *SHARED, "--data_root", "{data}", "--results_dir",
         "{fresh}", "--dropout", "0", contains="--dropout does not apply to --train_vae"),
    case("main_classifier_flag_to_train_all", "main.py", "--train_all", *TRAIN, "--data_root", "{data}",
         "--results_dir", "{fresh}", "--classifier_width", "8", contains="--classifier_width does not apply to "
         "--train_all"),
    # guidance against a null label the run never trains; eps where a latent model cannot clip x0
    case("main_guidance_without_label_dropout", *M, "--label_dropout", "0",
         contains="--guidance_scale 11 guides against the null label, which a run with --label_dropout 0 never trains"),
    case("main_latent_eps_on_the_cosine_schedule", "main.py", "--train_diffusion", *TRAIN, "--data_root", "{data}",
         "--results_dir", "{fresh}", "--prediction", "eps",
         contains="--prediction eps with --schedule cosine makes a latent model's samples blow up"),
    # architecture flags of the other family of denoisers, VAE flags to a pixel model
    case("main_unet_flag_to_a_transformer", *T, "--model", "latent_transformer", "--base_channels", "16",
         contains="--base_channels does not apply to --model latent_transformer"),
    case("main_transformer_flag_to_a_unet", *M, "--patch_size", "2", contains="--patch_size does not apply to --model "
         "unet"),
    case("main_vae_flag_to_a_pixel_model", "main.py", "--train_all", "--model", "unet", *TRAIN, "--data_root", "{data}",
         "--results_dir", "{fresh}", "--kl_weight", "1", contains="--kl_weight does not apply to --model unet"),
    case("main_vae_flag_resuming_a_pixel_run", "main.py", "--train_all", "--resume", "--results_dir", "{pixel}",
         "--vae_epochs", "7", "--device", "cpu", contains="--vae_epochs does not apply to --model unet"),
    # --checkpoint_path: its own stage, a flag that stage reads, a target it has not reached
    case("main_checkpoint_of_another_stage", "main.py", "--train_diffusion", "--checkpoint_path",
         "{latent}/vae_gan_last.pt", "--total_epochs", "3", "--results_dir", "{fresh}",
         contains="{latent}/vae_gan_last.pt holds a vae_gan checkpoint: continue it with --train_vae"),
    case("main_checkpoint_with_a_flag_its_stage_does_not_read", "main.py", "--train_vae", "--checkpoint_path",
         "{latent}/vae_gan_last.pt", "--total_epochs", "3", "--results_dir", "{fresh}", "--guidance_scale", "3",
         contains="--guidance_scale does not apply to --train_vae"),
    case("main_checkpoint_past_its_target", "main.py", "--train_vae", "--checkpoint_path", "{latent}/vae_gan_last.pt",
         "--total_epochs", "1", "--results_dir", "{fresh}",
         contains="--total_epochs 1: {latent}/vae_gan_last.pt has already trained 1 epoch; give more"),
    # a switch turned off is given too (--no-compile: the VAE-GAN stage never compiles)
    case("main_switch_off_to_the_vae", "main.py", "--train_vae", *SHARED, "--data_root", "{data}", "--results_dir",
         "{fresh}", "--no-compile", contains="--compile does not apply to --train_vae"),
    case("main_vae_switch_off_to_the_denoiser", *M, "--no-vae_block_attention",
         contains="--vae_block_attention does not apply to --train_diffusion"),
    case("main_switch_off_to_the_classifier", "main.py", "--train_classifier", "--data_root", "{data}",
         "--results_dir", "{fresh}", "--no-compile", contains="--compile does not apply to --train_classifier"),
    case("vis_zero_of_a_flag_the_mode_does_not_read", "visualize.py", "--mode", "loss_curves", "--results_dir",
         "{pixel}", "--guidance_scale", "0", contains="--guidance_scale does not apply to --mode loss_curves"),
    case("gen_class_name_empty", "generate.py", "--results_dir", "{pixel}", "--class_name", "", "--num_samples", "1",
         contains="--class_name is empty"),  # not taken for 'all'
    case("vis_class_name_empty", "visualize.py", "--mode", "denoising_steps", "--results_dir", "{pixel}",
         "--class_name", "", contains="--class_name is empty"),
    # checkpoints whose contents do not match their own config, or that miss a part
    case("gen_checkpoint_config_edited", "generate.py", "--model_path", "{config_edited}", "--output_dir", "{fresh}",
         contains="{config_edited} does not match its own config"),
    case("gen_checkpoint_config_not_a_mapping", "generate.py", "--model_path", "{config_text}", "--output_dir",
         "{fresh}", contains="{config_text} is damaged: its config"),
    case("gen_checkpoint_no_class_names", "generate.py", "--model_path", "{no_classes}", "--output_dir", "{fresh}",
         contains="{no_classes} is damaged: it names no classes"),
    case("gen_checkpoint_non_finite_weights", "generate.py", "--model_path", "{non_finite}", "--output_dir",
         "{fresh}", "--num_samples", "1", "--steps", "2", contains="{non_finite} holds non-finite weights"),
    case("vis_latent_space_vae_without_centers", "visualize.py", "--mode", "latent_space", "--results_dir",
         "{latent_no_centers}", contains="no center_loss inside"),
]


@pytest.mark.parametrize("script, argv, message", [
    ("main", ["--train_diffusion", "--checkpoint_path", "x.pt", "--total_epochs", "3.5"],
     "argument --total_epochs: not a whole number: '3.5'"),
    ("visualize", ["--mode", "samples_grid", "--num_samples", "0"], "argument --num_samples: must be positive, got 0"),
    ("generate", ["--steps", "-2"], "argument --steps: must be positive, got -2"),
    ("bench.diffusers_recipe", ["--data_root", "x", "--out", "y", "--sample_steps", "0"],
     "argument --sample_steps: must be positive, got 0"),
])
def test_counts_are_checked_while_parsing(capsys, script, argv, message):
    """config.positive_int: a count below 1 is argparse's own one-line error, before any work."""
    import importlib
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(script).parse_args(argv)
    lines = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and message in lines[0], lines


@pytest.mark.parametrize("bad", IN_PROCESS, ids=[c.id for c in IN_PROCESS])
def test_bad_invocation_in_process(battery, capsys, bad):
    import importlib
    from errors import run_main
    entry = importlib.import_module(bad.script.removesuffix(".py"))
    fmt = battery.paths.format_dict()
    with one_torch_thread():
        status = run_main(entry.main, battery._argv(bad, fmt) + ["--device", "cpu"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert bad.contains.format(**fmt).lower() in lines[0].lower(), lines


def test_non_finite_samples_of_a_checkpoint_are_refused(battery, monkeypatch):
    """Finite weights whose samples still overflow (the NaN-weights file is refused at load, by
    an IN_PROCESS case): refused by name, not saved as black images. A training run's pipeline
    (no checkpoint file) is left alone."""
    import pipeline
    from errors import UserError
    pipe = pipeline.load_pipeline(str(battery.paths.pixel))
    monkeypatch.setattr(pipeline, "run_sampler", lambda *a, **k: torch.full((1, 3, IMAGE_SIZE, IMAGE_SIZE), torch.nan))
    with pytest.raises(UserError, match=r"^sampling from .*conditional_diffusion_final\.pt gave non-finite values"):
        pipe.sample([0], steps=2)
    pipe.checkpoint_path = None
    assert torch.isnan(pipe.sample([0], steps=2)).all()


def test_no_earlier_run_changed(battery):
    """After every case: no file of the pre-trained runs or the data was added, removed or changed."""
    changes = [text for text, _ in battery.changes()]
    assert not changes, f"files of earlier runs changed: {changes}"


def test_sampling_a_run_trained_without_label_dropout_at_another_guidance_is_refused():
    """--preset s1 trains no null label (label dropout 0, guidance 1): scale 1 samples, 3 is refused."""
    from argparse import Namespace

    from config import build_config
    from errors import UserError
    saved = build_config(Namespace(preset="s1"))
    assert build_config(Namespace(guidance_scale=1.0), base=saved).guidance_scale == 1.0
    for scale in (3.0, 0.0):  # 0 is the null label's prediction alone
        with pytest.raises(UserError, match=f"--guidance_scale {scale:g} guides against the null label"):
            build_config(Namespace(guidance_scale=scale), base=saved)


def test_runs_saved_before_the_recipe_checks_still_load():
    """A new run is refused eps on the cosine schedule for a latent model, and guidance without label
    dropout; a run saved before those checks existed still samples, resumes and draws as it was."""
    from argparse import Namespace

    from config import Config, build_config
    assert build_config(Namespace(), base=Config(prediction="eps")).prediction == "eps"
    assert build_config(Namespace(), base=Config(label_dropout=0.0)).guidance_scale == Config.guidance_scale


@pytest.mark.parametrize("script, absent", [("visualize", ["--batch_size", "--subset", "--download"]),
                                            ("generate", ["--subset", "--download"])])
def test_help_offers_no_flag_the_script_would_refuse(capsys, script, absent):
    import importlib
    with pytest.raises(SystemExit):
        importlib.import_module(script).parse_args(["--help"])
    shown = capsys.readouterr().out
    assert "--seed" in shown and not [flag for flag in absent if flag in shown]


@pytest.mark.parametrize("env, message", [
    ({"RANK": "1"}, "RANK=1 and WORLD_SIZE=None do not describe a process of a group"),
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a whole number"),
    ({"WORLD_SIZE": "0", "RANK": "0"}, "RANK=0 and WORLD_SIZE=0 do not describe"),
    ({"WORLD_SIZE": "2"}, "RANK=None and WORLD_SIZE=2 do not describe"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "1"}, "WORLD_SIZE=2 without MASTER_ADDR: start several"),
])
def test_torchrun_variables_left_in_a_shell_are_refused_before_any_work(monkeypatch, capsys, tmp_path, env, message):
    """Not a traceback from deep inside, nor a silent wait for processes that never come. The data
    folder does not exist: the check comes first."""
    import main
    from errors import run_main
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    status = run_main(main.main, ["--train_diffusion", "--model", "unet", "--dataset", "folder", "--data_root",
                                  str(tmp_path / "none"), "--results_dir", str(tmp_path / "run"), "--device", "cpu"])
    lines = capsys.readouterr().err.splitlines()
    assert status == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("run, change, says", [
    ("pixel", lambda s: s["config"].update(image_size="32"), "its config does not read (TypeError"),
    ("pixel", lambda s: s["config"].update(guidance_interval=[1.0]), "its config does not read (IndexError"),
    ("pixel", lambda s: s["config"].update(channel_mults="122"), "its config does not build a unet (TypeError"),
    ("pixel", lambda s: s["stage"].update(sample_size="8"), "its sample_size '8' is not the side of its images"),
    ("latent", lambda s: s["stage"].update(latent_scale=1.0), "its latent_scale is not a per-channel tensor"),
    ("latent", lambda s: s["stage"].update(latent_shift=torch.zeros(3)), "its latent_shift is not a per-channel"),
], ids=["image_size_text", "interval_cut_short", "channel_mults_text", "sample_size_text", "scale_a_float",
        "shift_misshapen"])
def test_a_checkpoint_edited_by_hand_is_refused_in_one_line(battery, capsys, tmp_path, run, change, says):
    import generate
    from errors import run_main
    state = torch.load(getattr(battery.paths, run) / "conditional_diffusion_final.pt", weights_only=True)
    change(state)
    torch.save(state, tmp_path / "edited.pt")
    status = run_main(generate.main, ["--model_path", str(tmp_path / "edited.pt"), "--num_samples", "1", "--steps",
                                      "2", "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
    lines = capsys.readouterr().err.splitlines()
    assert status == 2 and len(lines) == 1 and f"{tmp_path / 'edited.pt'} is damaged: {says}" in lines[0], lines
