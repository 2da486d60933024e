"""Multi-process training as `torchrun --nproc_per_node=2 main.py ...` runs it: two CPU processes
over gloo. The ranks must end with identical weights (checked inside tests/ddp_worker.py, since by
design only rank 0 saves), only rank 0 may write the run folder, and --resume must work.
Two launches in all (each pays torch's import twice), to stay well under a minute on a small CPU."""
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = ["conditional_diffusion_best.pt", "conditional_diffusion_final.pt", "conditional_diffusion_last.pt"]

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="this PyTorch build has no gloo backend")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args):
    """Run `args` in two processes; fail with both ranks' output if the launch fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # two processes on a small CPU: one thread each
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


def train_flags(data_root, results_dir):
    return ["--train_diffusion", "--model", "unet", "--dataset", "folder", "--data_root", data_root,
            "--preset", "tiny", "--batch_size", "8", "--results_dir", results_dir, "--device", "cpu", "--seed", "3"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_one_writer(run_dir, epochs):
    """Exactly one set of checkpoints, no stray temporary files, and every metric once per epoch."""
    assert sorted(p.name for p in run_dir.glob("*.pt")) == CHECKPOINTS
    assert [p.name for p in run_dir.rglob("*") if ".tmp" in p.name or p.name.startswith(".")] == []
    assert json.loads((run_dir / "config.json").read_text())["batch_size"] == 8
    with open(run_dir / "metrics.csv") as f:
        counts = Counter((row["epoch"], row["name"]) for row in csv.DictReader(f))
    assert {int(epoch) for epoch, _ in counts} == set(range(1, epochs + 1))
    assert set(counts.values()) == {1}, counts
    assert all((str(epoch), "val_loss") in counts for epoch in range(1, epochs + 1))


@pytest.fixture(scope="module")
def worker_run(tmp_path_factory, image_folder_root):
    """tests/ddp_worker.py under torchrun: epoch 1, then --resume to epoch 2, checking the ranks."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "markers").mkdir()
    result = torchrun("tests/ddp_worker.py", root / "markers", *train_flags(image_folder_root, root / "run"))
    return root / "run", root / "markers", result


def test_ranks_end_with_identical_weights(worker_run):
    _, markers, _ = worker_run
    for rank in (0, 1):
        report = json.loads((markers / f"rank{rank}.json").read_text())
        assert report["world_size"] == 2
        for check in ("after epoch 1: model identical", "after resumed epoch 2: model identical",
                      "after resumed epoch 2: ema identical", "ranks get different shards",
                      "resumed ranks have their own RNG streams", "resumed run equals a straight run",
                      "val_loss averaged across ranks", "a stop inside an epoch logs its straight loss"):
            assert check in report["passed"]


def test_only_rank_zero_writes(worker_run):
    run_dir, _, result = worker_run
    assert_one_writer(run_dir, epochs=2)
    assert result.stderr.count("resuming conditional_diffusion after epoch 1,") == 1  # rank 0 alone speaks
    # four trainings finish in the worker (the run, its resume, the straight run, the stopped one's resume)
    assert result.stdout.count("[conditional_diffusion] saved ") == 4
    assert result.stdout.count("[conditional_diffusion] for sampling: ") == 4
    assert load(run_dir / "conditional_diffusion_final.pt")["epoch"] == 2


def test_vae_gan_ranks_end_with_identical_weights(tmp_path, image_folder_root):
    """The VAE-GAN stage under torchrun, every loss on from the first step (the class terms, whose
    head and centers sit outside the VAE's forward, and the discriminator): its weights, class
    centers and optimizer state stay identical across ranks, also after --resume."""
    (tmp_path / "markers").mkdir()
    flags = ["--train_vae", "--dataset", "folder", "--data_root", image_folder_root, "--preset", "tiny",
             "--batch_size", "8", "--results_dir", tmp_path / "run", "--device", "cpu", "--seed", "3",
             "--perceptual_weight", "0", "--picture_every", "100", "--vae_grad_clip", "0.01",
             "--class_loss_ramp_epochs", "0", "--adv_start_epoch", "0", "--adv_ramp_epochs", "0",
             "--vae_lr_schedule", "constant"]  # a cosine's plan would change with --epochs 1, then 2
    torchrun("tests/ddp_worker.py", tmp_path / "markers", *flags)
    for rank in (0, 1):
        report = json.loads((tmp_path / "markers" / f"rank{rank}.json").read_text())
        for label in ("after epoch 1", "after resumed epoch 2"):
            for part in ("vae", "centers", "discriminator", "optimizer"):
                assert f"{label}: {part} identical" in report["passed"]
        assert "resumed run equals a straight run" in report["passed"]
    assert sorted(p.name for p in (tmp_path / "run").glob("*.pt")) == ["vae_gan_best.pt", "vae_gan_last.pt"]


def test_main_py_resumes_under_torchrun(worker_run, tmp_path, image_folder_root):
    run_dir = tmp_path / "run"
    shutil.copytree(worker_run[0], run_dir)
    steps_per_epoch = load(run_dir / "conditional_diffusion_last.pt")["step"] // 2

    result = torchrun("main.py", *train_flags(image_folder_root, run_dir), "--resume", "--epochs", "3")
    assert result.stderr.count("resuming conditional_diffusion after epoch 2,") == 1
    last = load(run_dir / "conditional_diffusion_last.pt")
    assert last["epoch"] == 3 and last["step"] == 3 * steps_per_epoch
    assert load(run_dir / "conditional_diffusion_final.pt")["epoch"] == 3
    assert_one_writer(run_dir, epochs=3)


BAD_STEP_WORKER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import torch.distributed as torch_dist
from training import distributed as dist
from training.optim import grads_finite_step

torch_dist.init_process_group("gloo")
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1))
judged = []
for scaler in (None, torch.amp.GradScaler("cpu", init_scale=16.0)):
    loss = model(torch.ones(4, 2)).sum()
    if dist.rank() == 1:  # this rank alone has a non-finite loss
        loss = loss * float("inf")
    judged.append(grads_finite_step(loss, list(model.parameters()), torch.optim.SGD(model.parameters()), 1.0,
                                    scaler))
with open(f"{sys.argv[2]}/rank{dist.rank()}.json", "w") as f:
    json.dump(judged, f)
dist.teardown()  # a barrier first: gloo can abort a rank whose peer left mid-collective
"""


def test_ranks_judge_a_non_finite_step_alike(tmp_path):
    """One rank's non-finite loss is a bad step on every rank, with or without fp16's GradScaler
    (whose overflow skips would otherwise count as good steps on the other ranks, and their lr
    schedules, EMA and bad-step counts drift apart)."""
    script = tmp_path / "bad_step_worker.py"
    script.write_text(BAD_STEP_WORKER)
    torchrun(script, REPO, tmp_path)
    judged = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert judged == [[False, False], [False, False]]
