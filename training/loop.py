"""The one training loop every stage (VAE-GAN, denoiser, classifier) runs through: epochs,
progress, logging without per-step host syncs, periodic pictures, atomic checkpoints,
best-checkpoint choice on a held-out metric, resume, SIGINT/SIGTERM, and the NaN guard."""
import os
import random
import signal
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from errors import UserError, first_line
from training import distributed as dist
from training.checkpoint import all_finite, save_checkpoint
from training.run import Run


class StopRequested(Exception):
    """Raised after a signal-triggered checkpoint so the entry point can exit cleanly."""


class NonFiniteError(Exception):
    pass


def select_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for, but MPS is not available")
    return torch.device("cuda", dist.local_rank()) if name == "cuda" else torch.device(name)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state():
    python, numpy = random.getstate(), np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": python[1], "python_gauss": python[2],
             "numpy": torch.from_numpy(numpy[1].astype(np.int64)), "numpy_pos": int(numpy[2]),
             "numpy_gauss": (int(numpy[3]), float(numpy[4]))}
    if torch.cuda.is_available():  # this process's GPU only: a resume may see fewer GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state.get("python_gauss")))
    np_state = np.random.get_state()  # position and cached gaussian too, or the stream restarts elsewhere
    np.random.set_state((np_state[0], state["numpy"].numpy().astype(np.uint32), state.get("numpy_pos", 624),
                         *state.get("numpy_gauss", (0, 0.0))))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class _SignalCatcher:
    """SIGINT/SIGTERM set a flag; the loop saves at the next step boundary and stops."""

    def __init__(self):
        self.caught = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        self.caught = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def undecayed_lr(stage, epoch):
    """What a budget that stops a decaying learning rate short should say: on a slower device than
    the one a recipe's epochs were fitted to, the lr never reaches its low end."""
    share = stage.lr_share(epoch) if hasattr(stage, "lr_share") else 1.0
    if share >= 1.0 or share < 0.01:
        return ""
    return (f"; its learning rate is still {share:.0%} of its peak, planned to decay over more epochs: "
            f"plan {epoch} epoch{'s' if epoch != 1 else ''} to finish the decay within this budget on this device")


def fit(stage, batcher, cfg, run: Run, total_epochs, resume_state=None, max_minutes=None):
    """Train `stage` until `total_epochs` epochs are done, or until the next epoch would overrun
    `max_minutes` of training time (counted across resumes): the steps and the held-out
    evaluation, not pictures or checkpoint writes, so --picture_every does not change what a
    budget buys. `stage` provides kind, train_step,
    validate, pictures, state_dict/load_state_dict, best_metric ("name", "min"|"max"), and, where a
    budget can cut its learning-rate decay short, lr_share(epoch) (the lr's share of its peak)."""
    epoch, step, skip_batches, best, since_best, seconds = 0, 0, 0, None, 0, 0.0
    partial = ({}, 0)  # loss sums and count of the batches of a stopped epoch done before the stop
    batching = [getattr(batcher, "batch_size", None), dist.world_size()]
    order = [cfg.seed, cfg.subset]  # with the batching, what fixes an epoch's permutation
    if resume_state is not None and resume_state.get("batch_in_epoch", 0):
        saved, saved_order = resume_state.get("batching", batching), resume_state.get("order", order)
        inside = f"the run stopped inside epoch {resume_state['epoch'] + 1}"
        if list(saved) != batching:
            raise UserError(f"{inside} with batches of {saved[0]} on {saved[1]} process(es): resume it with "
                            f"those (batch size and process count can change at an epoch boundary)")
        if list(saved_order) != order:
            raise UserError(f"{inside} with --seed {saved_order[0]} and --subset {saved_order[1]}, which fix that "
                            f"epoch's order: resume it with those (they can change at an epoch boundary)")
    if resume_state is not None:
        try:
            stage.load_state_dict(resume_state["stage"])
            set_rng_state(resume_state["rng"])
        except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as e:  # a damaged or edited file
            raise UserError(f"the {stage.kind} checkpoint cannot be resumed: {type(e).__name__} "
                            f"{first_line(e, 120)}") from None
        epoch, step = resume_state["epoch"], resume_state["step"]
        skip_batches, best = resume_state.get("batch_in_epoch", 0), resume_state.get("best")
        since_best = resume_state.get("epochs_since_best", 0)
        seconds = resume_state.get("train_seconds", 0.0)
        partial = (dict(resume_state.get("epoch_sums", {})), resume_state.get("epoch_count", 0))
        if "rank_epoch_sums" in resume_state:  # under torchrun each rank continues its own shard's sums
            partial = tuple(resume_state["rank_epoch_sums"][dist.rank()])
        if dist.is_main():  # epochs counted from 1, as the progress and the stop messages do
            where = (f"in epoch {epoch + 1} after batch {skip_batches} of {len(batcher)}" if skip_batches
                     else f"after epoch {epoch}")
            print(f"resuming {stage.kind} {where}, step {step}", file=sys.stderr)
            run.drop_metrics_after(stage.kind, step)
    metric_name, mode = stage.best_metric
    if resume_state is not None and resume_state.get("best_metric", metric_name) != metric_name:
        best, since_best = None, 0  # e.g. --eval_every changed: a loss cannot be compared with an FD
    bad_in_a_row = 0

    def checkpoint(name, batch_in_epoch=0, done_epochs=None, sums=None, count=0, every_rank=False):
        """every_rank: all ranks call this together, so the other ranks' RNG states (and, inside an
        epoch, their loss sums so far) can be kept too, and a resume under torchrun continues every
        rank's stream and its shard's epoch mean."""
        sums = {k: float(v) for k, v in (sums or {}).items()}
        ranks = dist.gather_objects((rng_state(), (sums, count))) if every_rank and dist.enabled() else None
        if not dist.is_main():
            return
        state = {"kind": stage.kind, "config": cfg.to_dict(), "epoch": epoch if done_epochs is None else done_epochs,
                 "step": step, "batch_in_epoch": batch_in_epoch, "batching": batching, "order": order, "best": best,
                 "best_metric": metric_name, "epochs_since_best": since_best,
                 # at an epoch's end, the epochs' time alone: not this checkpoint's or _best.pt's writing
                 "train_seconds": seconds + time.time() - t0 if batch_in_epoch else seconds,
                 "rng": rng_state(), "stage": stage.state_dict()}
        if ranks is not None:
            state["rank_rngs"] = [rng for rng, _ in ranks]
        if batch_in_epoch:  # mid-epoch: the epoch's loss so far, so its logged mean covers every batch
            state.update(epoch_sums=sums, epoch_count=count)
            if ranks is not None:
                state["rank_epoch_sums"] = [partial_sums for _, partial_sums in ranks]
        save_checkpoint(state, run.path(name))

    def last_good():
        last = run.path(stage.last_name)
        return f"the last good checkpoint is {last}" if os.path.isfile(last) else "no checkpoint was saved yet"

    # Only now: a run refused before this point leaves no new folder and an earlier config.json alone.
    run.create()
    run.save_config(cfg, getattr(stage, "config_name", "config.json"))

    budget = 60.0 * max_minutes if max_minutes else None  # None or 0: no budget
    if budget is not None and seconds >= budget and epoch < total_epochs and dist.is_main():
        tqdm.write(f"[{stage.kind}] its {max_minutes:g}-minute budget is spent ({seconds / 60:.1f} min); "
                   f"give a larger one to train on (0: none)")

    def patience_spent():
        return bool(getattr(stage, "early_stopping", False) and cfg.patience and since_best >= cfg.patience)

    stopped_early = resume_state is not None and patience_spent()  # resumed after an early stop: train nothing
    if resume_state is not None and epoch >= total_epochs and dist.is_main():
        tqdm.write(f"[{stage.kind}] {epoch} of {total_epochs} epochs are done: nothing to train (more epochs train "
                   f"on)")
    if stopped_early and epoch < total_epochs and dist.is_main():
        tqdm.write(f"[{stage.kind}] the run stopped early at epoch {epoch}: {metric_name} has not improved for "
                   f"{since_best} evaluations; a larger --patience (0: never stop) trains on")
    t0 = time.time()
    with _SignalCatcher() as signals:
        while not stopped_early and epoch < total_epochs and (budget is None or seconds < budget):
            sums, count, t0 = {}, 0, time.time()
            if skip_batches:
                sums, count = partial
            bar = tqdm(total=len(batcher), desc=f"{stage.kind} {epoch + 1}/{total_epochs}",
                       disable=not dist.is_main(), leave=False, dynamic_ncols=True)
            for i, (x, y) in enumerate(batcher.epoch(epoch)):
                if i < skip_batches:  # resuming mid-epoch: the permutation is the same, skip what was done
                    bar.update(1)
                    continue
                losses = stage.train_step(x, y, epoch + i / len(batcher))
                if losses is None:  # non-finite loss or gradient: the stage skipped the update
                    bad_in_a_row += 1
                    # 1-based like the epochs: this is step number step + 1, done after any checkpoint at `step`
                    run.log(stage.kind, epoch + 1, step + 1, {"skipped_step": 1.0})
                    if bad_in_a_row >= cfg.max_bad_steps:
                        bar.close()  # or the error line would continue the progress bar's line
                        raise NonFiniteError(f"{bad_in_a_row} non-finite steps in a row at epoch {epoch + 1}; "
                                             f"stopped, {last_good()} (try a lower --lr)")
                else:
                    bad_in_a_row = 0
                    for k, v in losses.items():
                        sums[k] = sums.get(k, 0.0) + v.detach()
                    count += 1
                step += 1
                bar.update(1)
                if step % cfg.log_every == 0 and count:  # the only host sync for logging
                    bar.set_postfix({k: f"{float(v) / count:.4f}" for k, v in sums.items()})
                # Under torchrun every rank must stop at the same step, or the others would wait in
                # the next all-reduce: agree on the signal every log_every steps.
                stop = signals.caught if not dist.enabled() else (
                    step % cfg.log_every == 0 and dist.any_across_ranks(signals.caught))
                if stop:
                    checkpoint(stage.last_name, batch_in_epoch=i + 1, sums=sums, count=count, every_rank=True)
                    bar.close()
                    raise StopRequested(
                        f"{signals.caught or 'SIGTERM'}: saved {run.path(stage.last_name)} in epoch {epoch + 1} after "
                        f"batch {i + 1} of {len(batcher)}, step {step}; resume with the same command plus --resume")
            bar.close()
            steps_seconds, batches_here, skip_batches = time.time() - t0, len(batcher) - skip_batches, 0
            epoch += 1
            row = {k: dist.mean_across_ranks(float(v) / max(count, 1)) for k, v in sums.items()}
            row.update(stage.validate(epoch))
            row["epoch_seconds"] = time.time() - t0
            seconds, t0 = seconds + row["epoch_seconds"], time.time()
            run.log(stage.kind, epoch, step, row)
            if dist.is_main():
                summary = " ".join(f"{k}={v:.4g}" for k, v in row.items())
                tqdm.write(f"[{stage.kind}] epoch {epoch}/{total_epochs} {summary}")
            value = row.get(metric_name)
            # Weights blown up by a too-high lr can still take finite steps: never save them over a good checkpoint.
            if (value is not None and not np.isfinite(value)) or not all_finite(stage.state_dict()):
                raise NonFiniteError(f"the {stage.kind} model is no longer finite after epoch {epoch} "
                                     f"({metric_name} {value}); stopped without saving it, {last_good()} "
                                     f"(try a lower --lr)")
            if value is not None:
                if best is None or (value < best if mode == "min" else value > best):
                    best, since_best = value, 0
                    checkpoint(stage.best_name)
                else:
                    since_best += 1
            stop_early = patience_spent()
            # Each rank judges its own copy of the held-out metric: a last-bit difference must not
            # stop one rank while the others go on into the next all-reduce.
            stop_early = dist.any_across_ranks(stop_early)
            if stop_early and dist.is_main():
                tqdm.write(f"[{stage.kind}] early stop at epoch {epoch}: {metric_name} has not improved for "
                           f"{since_best} evaluations (best {best:.4g}, --patience {cfg.patience})")
            # The budget: stop now if one more epoch like this one would overrun it (all ranks agree);
            # after a mid-epoch resume this one ran only some of its batches.
            next_epoch_seconds = row["epoch_seconds"] + steps_seconds * (len(batcher) / max(batches_here, 1) - 1)
            out_of_time = budget is not None and epoch < total_epochs and seconds + next_epoch_seconds > budget
            out_of_time = dist.any_across_ranks(out_of_time)
            if out_of_time and dist.is_main() and seconds > budget:  # the first epoch always runs
                tqdm.write(f"[{stage.kind}] stopping after epoch {epoch}: it took {seconds / 60:.1f} min, more than "
                           f"the {max_minutes:g}-minute budget (--minutes 0: no budget)")
            elif out_of_time and dist.is_main():
                tqdm.write(f"[{stage.kind}] stopping at epoch {epoch}: another epoch would pass the "
                           f"{max_minutes:g}-minute budget ({seconds / 60:.1f} min used; --minutes 0: no budget)"
                           + undecayed_lr(stage, epoch))
            stop_early = stop_early or out_of_time
            saved = epoch % cfg.checkpoint_every == 0 or epoch == total_epochs or stop_early
            if saved:
                checkpoint(stage.last_name, every_rank=True)
            if dist.is_main() and (epoch % cfg.picture_every == 0 or epoch == total_epochs or stop_early):
                stage.pictures(epoch)
            # A signal during the held-out evaluation, the checkpoint or the pictures stops the run
            # here (all ranks agree), also after the last epoch: --train_all must not start its next stage.
            if signals.caught if not dist.enabled() else dist.any_across_ranks(signals.caught):
                if not saved:
                    checkpoint(stage.last_name, every_rank=True)
                raise StopRequested(f"{signals.caught or 'SIGTERM'}: saved {run.path(stage.last_name)} after epoch "
                                    f"{epoch} of {total_epochs}; resume with the same command plus --resume")
            if stop_early:
                break
    if dist.is_main() and not os.path.isfile(run.path(stage.last_name)):
        checkpoint(stage.last_name)  # continued into a new folder with nothing left to train
    if best is None and dist.is_main() and not os.path.isfile(run.path(stage.best_name)):
        checkpoint(stage.best_name)  # no held-out metric yet: the last state is the best we know
    if dist.is_main():
        tqdm.write(f"[{stage.kind}] saved {run.path(stage.last_name)} (to train on with --resume) and "
                   f"{stage.best_name} (the best {metric_name})")
    return best
