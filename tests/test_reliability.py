"""Fault tests: crash-safe checkpoints (SIGKILL at random moments, a failed write), SIGINT and
SIGTERM stop at a step boundary with a checkpoint, --resume gives the same losses as an
uninterrupted run, non-finite steps are skipped and counted then stop the run (exit 3), and
untrusted or mismatched checkpoints are refused by every entry point.

Everything trains a tiny pixel UNet on 16x16 images on the CPU; the subprocess tests drive the
real command line, the rest call the entry points in-process to save interpreter start-ups.
"""
from __future__ import annotations

import csv
import errno
import json
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

import fixtures
from helpers_cli import assert_one_line_error, one_torch_thread, run_cli, run_many, start_cli

RUN = ["--train_diffusion", "--model", "unet", "--dataset", "folder", "--preset", "tiny", "--batch_size", "4",
       "--image_size", "16", "--base_channels", "16", "--checkpoint_every", "1",
       "--picture_every", "1000", "--seed", "3", "--patience", "0"]
STAGE = "conditional_diffusion"
LAST, FINAL = f"{STAGE}_last.pt", f"{STAGE}_final.pt"
STEPS_PER_EPOCH = 3  # 16 images, 1 per class held out, batches of 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """2 classes x 8 training images, 16x16."""
    return fixtures.make_image_folder(tmp_path_factory.mktemp("reliability_data"), n_train=8, n_test=2, size=16)


def run_args(data, results_dir, epochs, *extra):
    return [*RUN, "--data_root", str(data), "--results_dir", str(results_dir), "--epochs", str(epochs), *extra]


def train_in_process(argv):
    """main.py in this process; returns the exit status run_main gives."""
    import main
    from errors import run_main
    return run_main(main.main, [str(a) for a in argv])


def epoch_metrics(run_dir, names=("loss", "val_loss"), stage=STAGE):
    """{name: {epoch: value}} of one stage (names=None: every logged quantity but timings and
    skipped steps); a row logged again after a resume wins."""
    out = {name: {} for name in names or ()}
    with open(Path(run_dir) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row["stage"] != stage or row["name"] in ("epoch_seconds", "skipped_step"):
                continue
            if names is None or row["name"] in out:
                out.setdefault(row["name"], {})[int(row["epoch"])] = float(row["value"])
    return out


def load(path):
    from training.checkpoint import load_checkpoint
    return load_checkpoint(str(path))


def assert_same_tensors(a, b, where=""):
    """Nested dicts/lists of tensors and numbers are equal (CPU, same seed: bit for bit)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.allclose(a.double(), b.double(), rtol=1e-6, atol=1e-7), f"tensors differ at {where}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_losses(run_a, run_b, epochs, names=("loss", "val_loss"), stage=STAGE):
    a, b = epoch_metrics(run_a, names, stage), epoch_metrics(run_b, names, stage)
    assert a.keys() == b.keys() and a, (a, b)
    for name in a:
        assert sorted(a[name]) == sorted(b[name]), (name, a[name], b[name])
        if names is not None:  # the named losses are logged every epoch (others may start later)
            assert sorted(a[name]) == list(range(1, epochs + 1)), (name, a[name])
        for e in a[name]:
            assert math.isclose(a[name][e], b[name][e], rel_tol=1e-5), f"{name} of epoch {e}: {a[name][e]} vs {b[name][e]}"


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted 2-epoch run, the yardstick of the resume tests."""
    run_dir = tmp_path_factory.mktemp("reliability") / "uninterrupted"
    assert train_in_process(run_args(data, run_dir, 2)) == 0
    return run_dir


# --------------------------------------------------------------------------------------------
# Resume gives the same losses


@pytest.mark.parametrize("variant", [(), ("--timestep_sampling", "adaptive", "--loss", "balanced")],
                         ids=["default", "adaptive_timesteps"])
def test_resume_at_epoch_boundary_gives_same_losses(data, reference, tmp_path, variant):
    """1 epoch, then --resume to 2 epochs == 2 epochs in one go: losses, weights, EMA, optimizer,
    LR schedule, RNG (dropout, label dropout, noise, timesteps) and any sampler state."""
    if variant:
        reference = tmp_path / "uninterrupted"
        assert train_in_process(run_args(data, reference, 2, *variant)) == 0
    run_dir = tmp_path / "resumed"
    assert train_in_process(run_args(data, run_dir, 1, *variant)) == 0
    assert load(run_dir / LAST)["epoch"] == 1
    assert train_in_process(run_args(data, run_dir, 2, *variant, "--resume")) == 0
    assert_same_losses(reference, run_dir, 2)
    ours, theirs = load(run_dir / FINAL), load(reference / FINAL)
    assert (ours["epoch"], ours["step"]) == (theirs["epoch"], theirs["step"]) == (2, 2 * STEPS_PER_EPOCH)
    assert_same_tensors(ours["stage"], theirs["stage"], "stage")
    assert_same_tensors(ours["rng"], theirs["rng"], "rng")


def test_resume_asking_fewer_epochs_than_done_is_refused_before_any_work(data, reference, tmp_path, capsys):
    """Before, it read the data and rewrote config.json with the smaller count, the checkpoints
    keeping theirs. Asking as many as were done still finishes the run (nothing to train)."""
    from helpers_cli import snapshot
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = snapshot(run_dir)
    assert train_in_process(run_args(data, run_dir, 1, "--resume")) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"error: {run_dir / LAST} has trained 2 epochs, more than the 1 asked for (--epochs; with "
                   f"--train_all, --vae_epochs or --diffusion_epochs): ask for 2 or more"], err
    assert snapshot(run_dir) == before
    assert train_in_process(run_args(data, run_dir, 2, "--resume")) == 0


def test_resume_with_another_lr_trains_at_it(data, reference, tmp_path):
    """--lr on --resume is not ignored: the optimizer and its schedule continue from the new rate."""
    run_dir = tmp_path / "new_lr"
    shutil.copytree(reference, run_dir)
    assert train_in_process(run_args(data, run_dir, 3, "--resume", "--lr", "1e-5")) == 0
    stage = load(run_dir / LAST)["stage"]
    group = stage["opt"]["param_groups"][0]
    assert stage["sched"]["base_lrs"] == [1e-5] and group["initial_lr"] == 1e-5
    assert group["lr"] == pytest.approx(1e-5)  # past the tiny preset's 10 warm-up steps
    assert json.loads((run_dir / "config.json").read_text())["lr"] == 1e-5


def test_resume_from_an_older_checkpoint_logs_each_epoch_once(data, reference, tmp_path):
    """A crash can lose the checkpoint of an epoch whose rows metrics.csv already holds; resuming
    from the checkpoint before it redoes that epoch and leaves one row per epoch and quantity."""
    import shutil
    run_dir = tmp_path / "rewound"
    assert train_in_process(run_args(data, run_dir, 1)) == 0
    shutil.copy(run_dir / LAST, tmp_path / "epoch1.pt")
    assert train_in_process(run_args(data, run_dir, 2, "--resume")) == 0
    shutil.copy(tmp_path / "epoch1.pt", run_dir / LAST)  # epoch 2's checkpoint lost, its rows kept
    assert train_in_process(run_args(data, run_dir, 2, "--resume")) == 0
    with open(run_dir / "metrics.csv") as f:
        keys = [(r["stage"], r["epoch"], r["name"]) for r in csv.DictReader(f)]
    assert len(keys) == len(set(keys)) and ("conditional_diffusion", "2", "loss") in keys, keys
    assert_same_losses(reference, run_dir, 2)


def test_sigint_mid_epoch_saves_and_resume_gives_same_losses(data, reference, tmp_path, monkeypatch, capsys):
    """SIGINT during epoch 2 -> checkpoint at the next step boundary, exit 130 and how to resume;
    --resume then ends exactly where the uninterrupted run ends, per-epoch losses included."""
    from training.denoiser import DenoiserStage
    real_step, calls = DenoiserStage.train_step, []

    def step_then_signal(self, x, y, epoch):
        calls.append(epoch)
        if len(calls) == STEPS_PER_EPOCH + 2:  # the second step of epoch 2
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, x, y, epoch)

    monkeypatch.setattr(DenoiserStage, "train_step", step_then_signal)
    run_dir = tmp_path / "interrupted"
    assert train_in_process(run_args(data, run_dir, 2)) == 130
    err = capsys.readouterr().err
    assert "SIGINT" in err and "--resume" in err.strip().splitlines()[-1], err
    assert len(calls) == STEPS_PER_EPOCH + 2, "the run went on after the signal"
    state = load(run_dir / LAST)
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 2, STEPS_PER_EPOCH + 2)
    assert not (run_dir / FINAL).exists()

    monkeypatch.setattr(DenoiserStage, "train_step", real_step)
    saved = (run_dir / LAST).read_bytes()  # mid-epoch, another batch size would skip the wrong images
    assert train_in_process([*run_args(data, run_dir, 2, "--resume"), "--batch_size", "2"]) == 2
    assert "batches of 4" in capsys.readouterr().err and (run_dir / LAST).read_bytes() == saved
    assert train_in_process([*run_args(data, run_dir, 2, "--resume"), "--seed", "4"]) == 2  # another order
    assert "--seed 3" in capsys.readouterr().err and (run_dir / LAST).read_bytes() == saved
    assert train_in_process(run_args(data, run_dir, 2, "--resume")) == 0
    assert_same_losses(reference, run_dir, 2)
    assert_same_tensors(load(run_dir / FINAL)["stage"], load(reference / FINAL)["stage"], "stage")


def test_continuing_to_a_target_already_reached_is_refused_before_any_work(data, reference, tmp_path, capsys):
    """--checkpoint_path to a fresh --results_dir with --total_epochs already reached would train
    nothing: one error line, and no new folder."""
    new = tmp_path / "continued"
    assert train_in_process([*run_args(data, new, 2), "--checkpoint_path", reference / LAST, "--total_epochs", "2"]) == 2
    assert capsys.readouterr().err.strip().endswith("has already trained 2 epochs; give more to train on")
    assert not new.exists()


def test_resume_takes_each_stage_settings_from_its_own_checkpoint(data, tmp_path):
    """Every stage rewrites config.json: after a separate --train_diffusion, --train_vae --resume
    still continues with the VAE's own settings (here its KL weight and batch), not the denoiser's."""
    vae = ["--dataset", "folder", "--preset", "tiny", "--image_size", "16",
           "--picture_every", "1000", "--data_root", data, "--results_dir", tmp_path]
    assert train_in_process(["--train_vae", *vae, "--epochs", "1", "--batch_size", "4", "--kl_weight", "0.01"]) == 0
    assert train_in_process(["--train_diffusion", *vae, "--epochs", "1", "--batch_size", "4"]) == 0
    assert json.loads((tmp_path / "config.json").read_text())["kl_weight"] != 0.01
    assert train_in_process(["--train_vae", *vae, "--resume", "--vae_epochs", "2"]) == 0
    config = load(tmp_path / "vae_gan_last.pt")["config"]
    assert (config["kl_weight"], config["vae_batch_size"]) == (0.01, 4) and load(tmp_path / "vae_gan_last.pt")["epoch"] == 2


def test_vae_resume_at_epoch_boundary_gives_same_losses(data, tmp_path):
    """The VAE-GAN stage: its loss-weight schedule (KL, classifier and center losses ramping in,
    the adversarial loss switched on in epoch 2), both optimizers and the centers resume exactly."""
    vae = ["--train_vae", "--dataset", "folder", "--preset", "tiny", "--batch_size", "4", "--image_size", "16",
           "--perceptual_weight", "0", "--checkpoint_every", "1", "--picture_every", "1000", "--seed", "3",
           "--adv_start_epoch", "1", "--vae_lr_schedule", "constant", "--data_root", data]  # cosine: its own test
    once, twice = tmp_path / "uninterrupted", tmp_path / "resumed"
    assert train_in_process([*vae, "--results_dir", once, "--epochs", "2"]) == 0
    assert train_in_process([*vae, "--results_dir", twice, "--epochs", "1"]) == 0
    assert train_in_process([*vae, "--results_dir", twice, "--epochs", "2", "--resume"]) == 0
    assert_same_losses(once, twice, 2, names=None, stage="vae_gan")
    assert sorted(epoch_metrics(once, None, "vae_gan")["total"]) == [1, 2]
    assert "adversarial" in epoch_metrics(once, None, "vae_gan")  # the schedule did switch a loss on
    ours, theirs = load(twice / "vae_gan_last.pt"), load(once / "vae_gan_last.pt")
    assert ours["epoch"] == theirs["epoch"] == 2
    assert_same_tensors(ours["stage"], theirs["stage"], "stage")


@pytest.mark.parametrize("stage", ["vae_gan", STAGE])
def test_cosine_lr_follows_its_closed_form_and_resumes_mid_epoch(data, tmp_path, monkeypatch, stage):
    """--vae_lr_schedule / --lr_schedule cosine: the lr is a half cosine of the fractional epoch
    over --epochs, so a run stopped by SIGINT inside epoch 2 and resumed ends where the
    uninterrupted run ends."""
    from training.denoiser import DenoiserStage
    from training.vae_gan import VAEGANStage
    if stage == STAGE:
        stage_class, optimizers = DenoiserStage, ("opt",)
        args = [*RUN, "--data_root", data, "--lr_schedule", "cosine", "--warmup_steps", "1"]
    else:
        stage_class, optimizers = VAEGANStage, ("opt_g", "opt_d")
        args = ["--train_vae", "--dataset", "folder", "--preset", "tiny", "--batch_size", "4", "--image_size", "16",
                "--perceptual_weight", "0", "--picture_every", "1000", "--seed", "3", "--data_root", data,
                "--vae_lr_schedule", "cosine"]
    args += ["--lr", "1e-3", "--epochs", "2"]
    once, twice = tmp_path / "uninterrupted", tmp_path / "resumed"
    assert train_in_process([*args, "--results_dir", once]) == 0
    real_step, calls = stage_class.train_step, []

    def step_then_signal(self, x, y, epoch):
        calls.append(epoch)
        if 1 < epoch and len([e for e in calls if e > 1]) == 1:  # the second step of epoch 2
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, x, y, epoch)

    monkeypatch.setattr(stage_class, "train_step", step_then_signal)
    assert train_in_process([*args, "--results_dir", twice]) == 130
    assert load(twice / f"{stage}_last.pt")["batch_in_epoch"] == 2
    monkeypatch.setattr(stage_class, "train_step", real_step)
    assert train_in_process([*args, "--results_dir", twice, "--resume"]) == 0
    assert_same_losses(once, twice, 2, names=None, stage=stage)
    ours, theirs = load(twice / f"{stage}_last.pt"), load(once / f"{stage}_last.pt")
    assert_same_tensors(ours["stage"], theirs["stage"], "stage")
    # The saved lr is the one set from the last step's fractional epoch, 1 + (steps - 1) / steps.
    steps = theirs["step"] // 2
    expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * (1 + (steps - 1) / steps) / 2))
    for opt in optimizers:
        assert math.isclose(theirs["stage"][opt]["param_groups"][0]["lr"], expected, rel_tol=1e-6)


def test_rng_state_round_trip_restores_every_generator():
    """torch, Python and NumPy streams continue exactly, mid-stream and with a cached gaussian."""
    import numpy as np
    from training.loop import rng_state, set_rng_state
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    random.random(), random.gauss(0, 1)   # Python's gauss caches a second value
    np.random.rand(5), np.random.randn()  # NumPy mid-block, with a cached gaussian
    torch.rand(3)
    saved = rng_state()
    draw = lambda: (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), np.random.rand(700).sum(),  # noqa: E731
                    torch.rand(4).tolist())
    expected = draw()
    draw()
    set_rng_state(saved)
    assert draw() == expected


# --------------------------------------------------------------------------------------------
# Signals and crashes, as real processes


def _training_started(proc):
    """The loop is running: its progress bar ("conditional_diffusion 3/40") or resume line is out."""
    return f"{STAGE} " in proc.stderr


def test_sigterm_saves_mid_epoch_and_resume_completes(data, tmp_path):
    run_dir = tmp_path / "sigterm"
    proc = start_cli("main.py", *run_args(data, run_dir, 500), log_dir=tmp_path / "logs")
    try:
        assert proc.wait_for(lambda p: "epoch 2/500" in p.stdout, timeout=120), proc.describe()
        time.sleep(random.uniform(0, 0.3))
        proc.signal(signal.SIGTERM)
        status = proc.wait(timeout=60)
    finally:
        proc.signal(signal.SIGKILL)
    assert status == 143, proc.describe()
    last_line = proc.stderr.strip().splitlines()[-1]
    assert "SIGTERM" in last_line and "--resume" in last_line and LAST in last_line, proc.describe()
    assert "Traceback" not in proc.stderr, proc.describe()
    state = load(run_dir / LAST)
    # mid-epoch, or (the signal came during an epoch's held-out evaluation or pictures) at its end
    assert state["epoch"] >= 2 and 0 <= state["batch_in_epoch"] <= STEPS_PER_EPOCH, state["batch_in_epoch"]
    assert state["step"] == state["epoch"] * STEPS_PER_EPOCH + state["batch_in_epoch"]

    total = state["epoch"] + 1
    result = run_cli("main.py", *run_args(data, run_dir, total, "--resume"), timeout=180)
    assert result.returncode == 0, result.describe()
    final = load(run_dir / FINAL)
    assert (final["epoch"], final["step"], final["batch_in_epoch"]) == (total, total * STEPS_PER_EPOCH, 0)
    assert sorted(epoch_metrics(run_dir)["loss"]) == list(range(1, total + 1))


def test_sigkill_at_random_moments_then_resume_finishes(data, tmp_path):
    """Three SIGKILLs at random moments (2-8 s after launch, and never before the training loop
    has started), each followed by --resume, then a last --resume to a few epochs beyond the last
    checkpoint: every checkpoint left by a kill loads, none goes back in time, at most one
    checkpoint interval of work is lost per kill, and the run ends with every epoch done, a
    loadable final checkpoint and no temporary files."""
    # Training reseeds the global generators, so the kill moments take their seed from the OS
    # (RELIABILITY_SEED=<seed printed on failure> replays a run).
    kills, seed = 3, int(os.environ.get("RELIABILITY_SEED") or random.SystemRandom().randrange(10 ** 6))
    rng = random.Random(seed)
    run_dir, logs = tmp_path / "sigkill", tmp_path / "logs"
    deadline = time.monotonic() + 240  # overall cap
    history = []  # per kill: (seconds after launch, last epoch reported, epoch in the checkpoint)
    saved_epoch = 0

    def remaining():
        return max(deadline - time.monotonic(), 1)

    for _ in range(kills):
        resume = ["--resume"] if (run_dir / LAST).exists() else []
        proc = start_cli("main.py", *run_args(data, run_dir, 100_000, *resume), log_dir=logs)
        try:
            proc.wait_for(lambda p: False, timeout=rng.uniform(2, 8))  # sleeps, unless the process ends
            if not _training_started(proc):  # a slow start: kill early in training instead
                proc.wait_for(_training_started, timeout=remaining())
                time.sleep(rng.uniform(0, 1))
            assert proc.proc.poll() is None, proc.describe()
            proc.proc.kill()
            proc.proc.wait()
        finally:
            proc.signal(signal.SIGKILL)
        reported = [int(line.split("epoch ")[1].split("/")[0]) for line in proc.stdout.splitlines()
                    if line.startswith(f"[{STAGE}] epoch ")]
        state = load(run_dir / LAST) if (run_dir / LAST).exists() else {"epoch": 0}  # must load: atomic writes
        history.append((round(time.monotonic() - proc.started, 1), max(reported, default=None), state["epoch"]))
        assert state["epoch"] >= saved_epoch, f"a checkpoint went back in time (seed {seed}): {history}"
        assert state["epoch"] >= max(reported, default=0) - 1, \
            f"more than one checkpoint interval lost (seed {seed}): {history}"
        saved_epoch = state["epoch"]
        assert time.monotonic() < deadline, f"over the time cap (seed {seed}): {history}"
    print(f"SIGKILL test, seed {seed}: (s after launch, last epoch reported, epoch in checkpoint) per kill: {history}")

    epochs = saved_epoch + 2
    resume = ["--resume"] if (run_dir / LAST).exists() else []
    result = run_cli("main.py", *run_args(data, run_dir, epochs, *resume), timeout=remaining())
    assert result.returncode == 0, f"{result.describe()}\n(seed {seed}, {history})"
    final = load(run_dir / FINAL)
    assert final["epoch"] == epochs and final["step"] == epochs * STEPS_PER_EPOCH, (seed, history)
    assert load(run_dir / LAST)["epoch"] == epochs
    metrics = epoch_metrics(run_dir)
    assert sorted(metrics["loss"]) == sorted(metrics["val_loss"]) == list(range(1, epochs + 1)), (seed, history)
    assert all(math.isfinite(v) for v in metrics["loss"].values())
    leftovers = [p.name for p in run_dir.iterdir() if ".tmp" in p.name]
    assert not leftovers, f"temporary files left behind: {leftovers} (seed {seed}, {history})"


# --------------------------------------------------------------------------------------------
# A failed write keeps the previous checkpoint


class _DiskFillsUp:
    """A file whose writes fail with ENOSPC after `limit` bytes (the first part does land)."""

    def __init__(self, f, limit):
        self.f, self.limit, self.written = f, limit, 0

    def write(self, data):
        room = self.limit - self.written
        if len(data) > room:
            self.f.write(bytes(data[:max(room, 0)]))
            self.written = self.limit
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


@pytest.mark.parametrize("failure", ["mid_write", "fsync", "rename"])
def test_failed_checkpoint_write_keeps_previous_checkpoint(tmp_path, monkeypatch, failure):
    from training import checkpoint as ckpt
    path = tmp_path / LAST
    old = {"kind": STAGE, "config": {"dataset": "folder"}, "epoch": 1, "weights": torch.arange(5000.0)}
    ckpt.save_checkpoint(old, str(path))
    new = dict(old, epoch=2, weights=torch.randn(200_000))

    if failure == "mid_write":
        real_save = torch.save
        monkeypatch.setattr(ckpt.torch, "save", lambda obj, f, **kw: real_save(obj, _DiskFillsUp(f, 100_000), **kw))
    elif failure == "fsync":
        def fsync(fd):
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(ckpt.os, "fsync", fsync)
    else:
        def replace(src, dst):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(ckpt.CheckpointWriteError, match="the previous checkpoint is intact"):
        ckpt.save_checkpoint(new, str(path))
    monkeypatch.undo()

    state = ckpt.load_checkpoint(str(path))
    assert state["epoch"] == 1 and torch.equal(state["weights"], old["weights"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST], "a temporary file was left behind"


def test_stale_temporary_files_of_a_killed_writer_are_removed(tmp_path):
    from training.checkpoint import copy_checkpoint, save_checkpoint
    for name in (LAST, FINAL):
        (tmp_path / f".{name}.tmp99999999").write_bytes(b"PK\x03\x04 half of a checkpoint")
    save_checkpoint({"kind": STAGE, "config": {}, "epoch": 1}, str(tmp_path / LAST))
    copy_checkpoint(str(tmp_path / LAST), str(tmp_path / FINAL))
    assert sorted(p.name for p in tmp_path.iterdir()) == [FINAL, LAST]
    from config import write_json  # reports and pictures too
    from viz.figures import save_grid
    (tmp_path / ".eval.json.tmp99999999.json").write_text('{"half": ')
    (tmp_path / ".grid.png.tmp99999999.png").write_bytes(b"\x89PNG half")
    write_json({"a": 1}, str(tmp_path / "eval.json"))
    save_grid(torch.zeros(1, 3, 4, 4), str(tmp_path / "grid.png"), nrow=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [FINAL, LAST, "eval.json", "grid.png"]


# --------------------------------------------------------------------------------------------
# Non-finite steps


def _nan_after(monkeypatch, bad_calls):
    """Training losses (not validation: it passes t) of the given 1-based calls become NaN."""
    from diffusion.objective import DiffusionLoss
    real, calls = DiffusionLoss.__call__, []

    def call(self, model, x0, y, t=None, noise=None):
        loss = real(self, model, x0, y, t=t, noise=noise)
        if t is None:
            calls.append(1)
            if bad_calls(len(calls)):
                return loss * float("nan")
        return loss

    monkeypatch.setattr(DiffusionLoss, "__call__", call)
    return calls


@pytest.mark.parametrize("from_the_start", [False, True], ids=["after_two_good_epochs", "from_the_start"])
def test_non_finite_steps_are_skipped_counted_and_stop_the_run(data, tmp_path, monkeypatch, capsys, from_the_start):
    import main
    from errors import EXIT_NON_FINITE, run_main
    from training import runner
    run_dir = tmp_path / "nan"
    if from_the_start:
        bad = lambda n: True  # noqa: E731
    else:  # one bad step in epoch 1 (recovered), then all bad from epoch 3 on
        bad = lambda n: n == 2 or n > 2 * STEPS_PER_EPOCH  # noqa: E731
    calls = _nan_after(monkeypatch, bad)
    cfg = main.build_config(main.stage_overrides(main.parse_args(run_args(data, run_dir, 5))))
    cfg.max_bad_steps = 3
    status = run_main(lambda argv: runner.train_diffusion(cfg))
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert status == EXIT_NON_FINITE == 3
    assert "3 non-finite steps in a row" in err_lines[-1] and err_lines[-1].startswith("error: "), err_lines[-1]

    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    skipped = [r for r in rows if r["name"] == "skipped_step"]
    if from_the_start:
        assert len(calls) == 3 and len(skipped) == 3
        assert not (run_dir / LAST).exists()
        assert "no checkpoint" in err_lines[-1], err_lines[-1]
        return
    assert len(calls) == 2 * STEPS_PER_EPOCH + 3 and len(skipped) == 4
    assert str(run_dir / LAST) in err_lines[-1]
    state = load(run_dir / LAST)  # the last good checkpoint, intact
    assert (state["epoch"], state["step"], state["batch_in_epoch"]) == (2, 2 * STEPS_PER_EPOCH, 0)
    assert all(torch.isfinite(v).all() for v in state["stage"]["model"].values())
    assert sorted(epoch_metrics(run_dir)["loss"]) == [1, 2]


# --------------------------------------------------------------------------------------------
# Untrusted and mismatched checkpoints


class _Payload:
    """Pickles to "run this code": what a malicious checkpoint would hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _evil_checkpoint(path, marker, kind=STAGE):
    torch.save({"kind": kind, "config": {"dataset": "folder", "model": "unet"}, "epoch": 1,
                "stage": {"model": _Payload(marker)}}, str(path))
    return path


def test_code_carrying_checkpoint_is_refused_by_every_entry_point(data, tmp_path):
    import main
    from config import save_config
    # The payload is real: an unsafe load runs it.
    sanity_marker = tmp_path / "sanity_marker"
    torch.load(str(_evil_checkpoint(tmp_path / "sanity.pt", sanity_marker)), weights_only=False)
    assert sanity_marker.read_text() == "pwned"

    marker = tmp_path / "pwned_marker"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker)
    run_dir = tmp_path / "evil_run"  # a run folder whose checkpoints were swapped for the payload
    run_dir.mkdir()
    cfg = main.build_config(main.stage_overrides(main.parse_args(run_args(data, run_dir, 2))))
    save_config(cfg, str(run_dir / "config.json"))
    _evil_checkpoint(run_dir / LAST, marker)
    _evil_checkpoint(run_dir / "vae_gan_best.pt", marker, kind="vae_gan")
    calls = [
        ("generate.py", "--model_path", evil),
        ("main.py", *run_args(data, tmp_path / "fresh", 2), "--checkpoint_path", evil, "--total_epochs", "2"),
        ("main.py", *run_args(data, run_dir, 2), "--resume"),
        ("visualize.py", "--mode", "samples_grid", "--model_path", evil),
        ("visualize.py", "--mode", "reconstructions", "--results_dir", run_dir),
    ]
    for result in run_many(calls, workers=3):
        assert_one_line_error(result, status=2, contains="refusing to load")
        assert not marker.exists(), f"the payload ran\n{result.describe()}"


def test_checkpoint_of_another_model_or_dataset_is_refused_by_name(data, reference, tmp_path, capsys):
    import generate
    from errors import run_main
    last = str(reference / LAST)

    def refused(entry, argv, *names):
        assert run_main(entry.main, [str(a) for a in argv]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("error: ") and all(n in line for n in names), line
        assert "size mismatch" not in line and "shape" not in line
        return line

    import main
    # Continue a checkpoint into a folder that holds another run: refused, that run untouched.
    other = tmp_path / "another_run"
    shutil.copytree(reference, other)
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    refused(main, [*run_args(data, other, 3), "--checkpoint_path", last, "--total_epochs", "3"],
            "another run", str(other))
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before
    # Continue a unet run as an attn_unet.
    refused(main, [*run_args(data, tmp_path / "other_model", 3), "--checkpoint_path", last,
                   "--total_epochs", "3", "--model", "attn_unet"], "model", "unet", "attn_unet")
    assert not (tmp_path / "other_model" / "config.json").exists()
    # Sample a folder-dataset run as CIFAR-10.
    refused(generate, ["--results_dir", reference, "--dataset", "cifar10", "--num_samples", "1"],
            "dataset", "folder", "cifar10")
    # --resume continues with the settings inside the stage's checkpoint: a config.json edited
    # since (or rewritten by another stage) does not change the architecture it trains.
    copy = tmp_path / "edited_copy"
    shutil.copytree(reference, copy)
    config = json.loads((copy / "config.json").read_text())
    config["base_channels"], config["guidance_schedule"] = 32, "cosine"
    (copy / "config.json").write_text(json.dumps(config))
    assert run_main(main.main, ["--train_diffusion", "--resume", "--results_dir", str(copy), "--epochs", "3"]) == 0
    assert load(copy / LAST)["config"]["base_channels"] == 16 and load(copy / LAST)["epoch"] == 3


# --------------------------------------------------------------------------------------------
# Nothing saved is lost to a broken run or a mistaken command


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def test_train_all_continues_a_checkpoint_of_either_stage(data, reference, tmp_path):
    """--checkpoint_path decides the stage; --train_all names either (its own flag is refused
    with the other stage's checkpoint)."""
    new = tmp_path / "continued"
    argv = ["--train_all", *RUN[1:], "--data_root", data, "--results_dir", new]
    assert train_in_process([*argv, "--checkpoint_path", reference / LAST, "--total_epochs", "3"]) == 0
    assert load(new / FINAL)["epoch"] == 3


def test_resuming_on_data_that_holds_out_other_images_is_refused(data, reference, tmp_path, capsys):
    """One image more in the folder moves the validation carve-out: the run's held-out loss and best
    checkpoint would change meaning mid-run. One error line, and the run's files untouched."""
    grown, run_dir = tmp_path / "grown", tmp_path / "run"
    shutil.copytree(data, grown)
    shutil.copy(next((grown / "train" / "cat").iterdir()), grown / "train" / "cat" / "extra.png")
    shutil.copytree(reference, run_dir)
    before = _snapshot(run_dir)
    assert train_in_process([*run_args(grown, run_dir, 3), "--resume"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: the data holds out other images than when the run started")
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("broken", ["metric", "weights"])
def test_a_model_gone_non_finite_is_not_saved_over_the_last_good_one(data, tmp_path, monkeypatch, capsys, broken):
    """A too-high lr can leave weights huge but finite steps taken, the held-out loss NaN: from
    the first epoch that ends so, nothing is saved and the run stops naming the last good file."""
    from errors import EXIT_NON_FINITE
    from training.denoiser import DenoiserStage
    real = DenoiserStage.validate

    def validate(self, epoch):
        row = real(self, epoch)
        if epoch >= 2:
            if broken == "metric":
                row["val_loss"] = float("nan")
            else:
                next(self.model.parameters()).data.fill_(float("inf"))
        return row

    monkeypatch.setattr(DenoiserStage, "validate", validate)
    run_dir = tmp_path / "blown_up"
    assert train_in_process(run_args(data, run_dir, 4)) == EXIT_NON_FINITE
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no longer finite after epoch 2" in line and str(run_dir / LAST) in line, line
    for name in (LAST, f"{STAGE}_best.pt"):
        state = load(run_dir / name)
        assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["stage"]["model"].values())


def test_a_stage_never_starts_over_the_files_of_an_earlier_run(data, reference, tmp_path, capsys):
    """Its _last.pt gone, a run's _best.pt and _final.pt must not be overwritten by a fresh start,
    nor by a --resume of that stage (--train_all --resume reaches it with another stage's file there)."""
    import main
    from errors import UserError
    from training import runner
    from training.denoiser import DenoiserStage
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / LAST).unlink()
    before = _snapshot(run_dir)
    argv = run_args(data, run_dir, 1)
    assert train_in_process(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{STAGE}_best.pt, {FINAL} but no {LAST} to continue" in line and "would overwrite" in line, line
    assert _snapshot(run_dir) == before
    cfg = main.build_config(main.stage_overrides(main.parse_args(argv)))
    with pytest.raises(UserError, match=f"but no {LAST} to resume"):
        runner.resume_state_for(cfg, DenoiserStage, resume=True)


def test_a_folder_holding_another_kind_of_run_is_refused(data, reference, tmp_path, capsys):
    """A VAE trained into a pixel UNet's folder would mix two runs (and rewrite config.json)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = _snapshot(run_dir)
    argv = ["--train_vae", "--model", "latent_unet", "--dataset", "folder", "--preset", "tiny", "--image_size", "16",
            "--data_root", data, "--results_dir", run_dir, "--epochs", "1"]
    assert train_in_process(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"holds {FINAL} of --model unet" in line and "not --model latent_unet" in line, line
    assert _snapshot(run_dir) == before


def test_a_classifier_trained_into_a_run_folder_does_not_change_what_the_folder_holds(data, reference, tmp_path):
    """The classifier writes its options to classifier_config.json: the run's config.json stays as
    it was, the pixel run in the folder still continues there, and a fresh pixel run still starts
    beside a classifier."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    config = (run_dir / "config.json").read_bytes()
    classifier = ["--train_classifier", "--dataset", "folder", "--data_root", data, "--image_size", "16",
                  "--preset", "tiny", "--batch_size", "4", "--epochs", "1", "--results_dir", run_dir]
    assert train_in_process(classifier) == 0
    assert (run_dir / "config.json").read_bytes() == config
    assert json.loads((run_dir / "classifier_config.json").read_text())["classifier_epochs"] == 1
    assert train_in_process([*run_args(data, tmp_path / "next", 3), "--checkpoint_path", run_dir / LAST,
                             "--total_epochs", "3"]) == 0
    fresh = tmp_path / "fresh"
    assert train_in_process([*classifier[:-1], fresh]) == 0
    assert train_in_process(run_args(data, fresh, 1)) == 0


@pytest.mark.parametrize("damage", ["nul_tail", "bad_header", "text_value"])
def test_a_damaged_metrics_file_is_refused_before_resuming(data, reference, tmp_path, capsys, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    metrics = run_dir / "metrics.csv"
    text = metrics.read_text()
    metrics.write_text({"nul_tail": text + "\0" * 64, "bad_header": "a,b\n" + text.split("\n", 1)[1],
                        "text_value": text + "conditional_diffusion,2,6,loss,lots\n"}[damage])
    before = _snapshot(run_dir)
    assert train_in_process(run_args(data, run_dir, 3, "--resume")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert "metrics.csv is not a readable metrics file" in lines[-1], lines[-1]
    assert _snapshot(run_dir) == before


def test_a_config_edited_into_nonsense_is_one_error_line(data, reference, tmp_path, capsys):
    """--resume of a stage with no checkpoint yet reads config.json for its settings (--train_all
    --resume of a latent run whose VAE has no _last.pt left)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "config.json").write_text(json.dumps({"model": 5, "base_channels": "x"}))
    (run_dir / LAST).rename(run_dir / "vae_gan_last.pt")  # the config.json path of the diffusion stage
    assert train_in_process(["--train_all", "--resume", "--results_dir", run_dir]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: --resume: cannot read the run's config in") and "config.json" in line, line


@pytest.mark.parametrize("damage", ["rng", "epoch", "stage", "stage.opt"])
def test_a_checkpoint_missing_part_of_its_training_state_is_one_error_line(data, reference, tmp_path, capsys, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    state = load(run_dir / LAST)
    if damage == "stage.opt":
        del state["stage"]["opt"]
    else:
        del state[damage]
    torch.save(state, run_dir / LAST)
    before = _snapshot(run_dir)
    assert train_in_process(run_args(data, run_dir, 3, "--resume")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ") and ("opt" if damage == "stage.opt" else f"no {damage} inside") in line, line
    assert _snapshot(run_dir) == before


def test_a_missing_evaluation_classifier_is_refused_before_training(data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = run_args(data, run_dir, 2, "--eval_every", "1", "--classifier_path", tmp_path / "none.pt")
    assert train_in_process(argv) == 2
    assert "none.pt" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not run_dir.exists()  # not even a config.json: nothing trained


def test_the_classifier_resumes_in_its_default_folder_and_refuses_what_it_does_not_read(data, tmp_path, capsys,
                                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default folder is results/folder_classifier under the working folder
    classifier = ["--train_classifier", "--dataset", "folder", "--data_root", data, "--image_size", "16",
                  "--preset", "tiny", "--batch_size", "4", "--epochs", "1"]
    assert train_in_process(classifier) == 0
    assert train_in_process([*classifier, "--resume"]) == 0
    assert "resuming classifier after epoch 1," in capsys.readouterr().err
    for flag in (["--patience", "1"], ["--ema_decay", "0.5"], ["--compile"], ["--guidance_scale", "3"]):
        assert train_in_process([*classifier, "--results_dir", tmp_path / "other", *flag]) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line == f"error: {flag[0]} does not apply to --train_classifier", line
    assert not (tmp_path / "other").exists()
    assert train_in_process([*classifier[:-2], "--epochs", "2", "--resume"]) == 2
    assert "not --epochs (of --train_classifier) 2" in capsys.readouterr().err
    # its one-cycle lr is planned over the first run's steps: another --subset would leave it undone
    assert train_in_process([*classifier, "--subset", "8", "--resume"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: the classifier's one-cycle learning rate is planned over "), line


def _fills_the_disk(path, *args, **kwargs):
    """An image writer on a full disk: part of the file, then ENOSPC."""
    with open(path, "wb") as f:
        f.write(b"\x89PNG partial")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("writer", ["json", "grid", "figure"])
def test_a_full_disk_leaves_the_previous_file_whole_and_no_temporary_file(tmp_path, monkeypatch, writer):
    """JSON reports and pictures are written beside their place and renamed: the old file stays
    whole, the half-written one goes, and the error is one WriteError line."""
    import matplotlib.pyplot as plt
    from config import write_json
    from files import WriteError
    from viz import figures
    path = tmp_path / ("report.json" if writer == "json" else "picture.png")
    path.write_bytes(b"the previous file")
    if writer == "json":
        monkeypatch.setattr("json.dump", lambda obj, f, **kwargs: _fills_the_disk(f.name))
        write = lambda: write_json({"a": 1}, str(path))  # noqa: E731
    elif writer == "grid":
        monkeypatch.setattr(figures, "save_image", lambda images, p, **kwargs: _fills_the_disk(p))
        write = lambda: figures.save_grid(torch.zeros(2, 3, 4, 4), str(path), nrow=2)  # noqa: E731
    else:
        monkeypatch.setattr(plt.Figure, "savefig", lambda fig, p, **kwargs: _fills_the_disk(p))
        write = lambda: figures._save(plt.figure(), str(path))  # noqa: E731
    with pytest.raises(WriteError, match=r"picture.png|report.json") as failure:
        write()
    assert "(No space left on device); the previous" in str(failure.value)
    assert path.read_bytes() == b"the previous file"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("error, status, line", [
    (OSError(errno.ENOSPC, "No space left on device", "run/pictures/a.png"), 4,
     "error: No space left on device: run/pictures/a.png"),
    (PermissionError(errno.EACCES, "Permission denied", "run/metrics.csv"), 4,
     "error: Permission denied: run/metrics.csv"),
])
def test_the_machines_file_errors_are_one_line(capsys, error, status, line):
    from errors import run_main

    def main(argv):
        raise error
    assert run_main(main) == status
    assert capsys.readouterr().err.splitlines() == [line]


def test_other_os_errors_keep_their_traceback():
    """A missing file the code itself should have made is a bug: it is not hidden as one line."""
    from errors import run_main

    def main(argv):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")
    with pytest.raises(FileNotFoundError):
        run_main(main)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't "
                                                "allocate memory: you tried to allocate 17179869184 bytes"),
                                   MemoryError("Unable to allocate 144. GiB for an array")])
def test_out_of_memory_is_one_line(capsys, error):
    """A batch too large for the GPU is the commonest failure of a first GPU run: one line, status 5."""
    from errors import EXIT_OUT_OF_MEMORY, run_main

    def main(argv):
        raise error
    assert run_main(main) == EXIT_OUT_OF_MEMORY == 5
    line, = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: out of memory ({str(error).splitlines()[0][:40]}") and "--batch_size" in line


def test_other_runtime_errors_keep_their_traceback():
    from errors import run_main

    def main(argv):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes"):
        run_main(main)
