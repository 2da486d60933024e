"""Test-only DDP worker, launched by tests/test_distributed.py through torch.distributed.run:

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_worker.py MARKER_DIR <main.py flags but --epochs>

Trains the stage the flags name (the denoiser or the VAE-GAN) through main.main (training.runner:
the stage + DeviceBatcher + fit) for one epoch, then resumes it (--resume) to two, and after each
run checks across ranks that the weights (the VAE-GAN's centers and discriminator included), EMA
and optimizer state are bit-identical (only rank 0 saves, so this cannot be checked
from the files), and then that two epochs in one go end in the same state on every rank. It also checks that the ranks trained on different data shards, that validation
metrics are averaged across ranks, that resumed ranks draw their own random numbers, and that
a run stopped by a signal inside an epoch logs, once resumed, the epoch's uninterrupted loss. Each
rank writes MARKER_DIR/rank<r>.json when all its checks pass.
"""
import json
import os
import signal
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's packages

import torch  # noqa: E402

import main  # noqa: E402
from training import distributed as dist  # noqa: E402
from training import runner  # noqa: E402
from training.loop import StopRequested  # noqa: E402
from training.run import Run  # noqa: E402


def flat(tensors):
    return torch.cat([t.detach().double().flatten().cpu() for t in tensors])


def per_rank(vector):
    """[world_size, n]: every rank's copy of a 1-D tensor."""
    return dist.gather_tensor(vector[None])


def same_on_all_ranks(vector):
    rows = per_rank(vector)
    return all(torch.equal(rows[0], row) for row in rows[1:])


def differs_across_ranks(vector):
    rows = per_rank(vector)
    return all(not torch.equal(rows[0], row) for row in rows[1:])


def optimizer_tensors(*optimizers):
    return [v for opt in optimizers for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]


def training_state(stage):
    if stage.kind == "vae_gan":
        return {"vae": flat(stage.vae.parameters()), "centers": flat(stage.center_loss.parameters()),
                "discriminator": flat(stage.disc.parameters()),
                "optimizer": flat(optimizer_tensors(stage.opt_g, stage.opt_d))}
    return {"model": flat(stage.model.parameters()), "ema": flat(stage.ema.parameters()),
            "optimizer": flat(optimizer_tensors(stage.opt))}


def check_identical_state(stage, label, passed):
    for name, vector in training_state(stage).items():
        assert same_on_all_ranks(vector), f"{label}: {name} differs across ranks"
        passed.append(f"{label}: {name} identical")


def check_validation_is_averaged(stage, passed):
    """Give each rank different held-out data: the logged val_loss must then be the mean of the
    ranks' own losses, the same on every rank."""
    stage.val_x = stage.val_x * (1 + dist.rank())
    with mock.patch.object(dist, "mean_across_ranks", lambda value: value):
        own = stage.validate(1)["val_loss"]
    averaged = stage.validate(1)["val_loss"]
    own_losses = per_rank(torch.tensor([own], dtype=torch.float64))[:, 0]
    assert len(set(own_losses.tolist())) == len(own_losses), f"ranks' own val losses coincide: {own_losses}"
    assert abs(averaged - float(own_losses.mean())) < 1e-9, (averaged, own_losses)
    assert same_on_all_ranks(torch.tensor([averaged], dtype=torch.float64))
    passed.append("val_loss averaged across ranks")


def straight_run_flags(flags):
    """The same flags, into a folder of its own beside the run's."""
    i = flags.index("--results_dir") + 1
    return flags[:i] + [str(flags[i]) + "_straight"] + flags[i + 1:]


def check_stop_inside_an_epoch(flags, calls, logged, passed):
    """SIGINT reaches rank 0 alone after the first step of epoch 1 (--log_every 1: the ranks agree
    at once); --resume finishes the epoch. Every rank must go on from its own shard's loss sums:
    the epoch's logged loss is then the uninterrupted run's."""
    i = flags.index("--results_dir") + 1
    stopped = flags[:i] + [str(flags[i]) + "_stopped"] + flags[i + 1:] + ["--epochs", "1", "--log_every", "1"]
    original_fit = runner.fit

    def fit_with_a_signal(stage, *args, **kwargs):
        train_step = stage.train_step

        def step_then_signal(*a, **k):
            losses = train_step(*a, **k)
            if dist.rank() == 0:
                os.kill(os.getpid(), signal.SIGINT)
            return losses
        stage.train_step = step_then_signal
        return original_fit(stage, *args, **kwargs)

    with mock.patch.object(runner, "fit", fit_with_a_signal):
        try:
            main.main(stopped)
            raise AssertionError("the signal did not stop the run")
        except StopRequested:
            torch.distributed.barrier()  # rank 0 has written the checkpoint the resume reads
    assert len(calls[-1][1]) > 1, "one batch per epoch: no stop inside an epoch"
    main.main(stopped + ["--resume"])
    assert calls[-1][2]["batch_in_epoch"] == 1, "the run did not resume inside its first epoch"
    expected, got = logged[0]["loss"], logged[-1]["loss"]  # the first run's epoch 1, and this one's
    assert abs(got - expected) <= 1e-5 * abs(expected), (got, expected)
    passed.append("a stop inside an epoch logs its straight loss")


def main_worker(marker_dir, flags):
    calls = []  # (stage, batcher, resume_state) of each fit call
    real_fit = runner.fit

    def fit_and_keep(stage, batcher, cfg, run, total_epochs, resume_state=None, **kwargs):
        calls.append((stage, batcher, resume_state))
        return real_fit(stage, batcher, cfg, run, total_epochs, resume_state, **kwargs)

    logged = []  # each epoch's row, on every rank (only rank 0 writes metrics.csv)
    real_log = Run.log

    def log_and_keep(run, stage, epoch, step, values):
        if "skipped_step" not in values:
            logged.append(dict(values))
        return real_log(run, stage, epoch, step, values)

    passed = []
    with mock.patch.object(runner, "fit", fit_and_keep), mock.patch.object(Run, "log", log_and_keep):
        main.main(flags + ["--epochs", "1"])
        stage, batcher, _ = calls[-1]
        check_identical_state(stage, "after epoch 1", passed)
        first_batch, _ = next(iter(batcher.epoch(0)))
        assert differs_across_ranks(first_batch.flatten().double()), "ranks trained on the same batch"
        passed.append("ranks get different shards")

        main.main(flags + ["--epochs", "2", "--resume"])
        stage, _, resume_state = calls[-1]
        assert resume_state is not None and resume_state["epoch"] == 1, "the second run did not resume"
        assert differs_across_ranks(resume_state["rng"]["torch"].double()), "resumed ranks share one RNG stream"
        passed.append("resumed ranks have their own RNG streams")
        check_identical_state(stage, "after resumed epoch 2", passed)
        resumed = training_state(stage)

        main.main(straight_run_flags(flags) + ["--epochs", "2"])
        for name, vector in training_state(calls[-1][0]).items():
            assert torch.equal(vector, resumed[name]), f"resumed {name} differs from the straight run's"
        passed.append("resumed run equals a straight run")
        if stage.kind != "vae_gan":  # the VAE-GAN validates the same held-out images on every rank
            check_validation_is_averaged(stage, passed)
            check_stop_inside_an_epoch(flags, calls, logged, passed)

    Path(marker_dir, f"rank{dist.rank()}.json").write_text(
        json.dumps({"world_size": dist.world_size(), "passed": passed}))
    dist.teardown()


if __name__ == "__main__":
    main_worker(sys.argv[1], sys.argv[2:])
