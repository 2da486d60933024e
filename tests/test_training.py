"""The training loop and the S2/S4 training options: early stopping, the balanced loss,
adaptive timestep sampling."""
import math

import pytest
import torch

from config import Config
from diffusion.objective import AdaptiveTimesteps, DiffusionLoss, balanced_terms
from diffusion.schedule import NoiseSchedule
from training.loop import fit
from training.run import Run


class StubStage:
    """A stage whose held-out loss follows a script, to drive the loop's bookkeeping."""
    kind, last_name, best_name = "conditional_diffusion", "stub_last.pt", "stub_best.pt"
    best_metric = ("val_loss", "min")
    early_stopping = True

    def __init__(self, val_losses):
        self.val_losses, self.validated = list(val_losses), 0
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def train_step(self, x, y, epoch):
        return {"loss": x.mean()}

    def validate(self, epoch):
        self.validated += 1
        return {"val_loss": self.val_losses[epoch - 1]}

    def pictures(self, epoch):
        pass

    def state_dict(self):
        return {"weight": self.weight.detach()}

    def load_state_dict(self, state):
        pass


class OneBatch:
    def __len__(self):
        return 1

    def epoch(self, e):
        yield torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)


def test_early_stopping_stops_when_the_held_out_loss_stops_improving(tmp_path):
    losses = [1.0, 0.8, 0.7, 0.75, 0.72, 0.71, 0.9, 0.7, 0.65, 0.6]  # best at epoch 3, then 3 worse
    stage = StubStage(losses)
    cfg = Config(patience=3, picture_every=100)
    best = fit(stage, OneBatch(), cfg, Run(str(tmp_path)), total_epochs=10)
    assert stage.validated == 6 and best == pytest.approx(0.7)
    assert (tmp_path / "stub_last.pt").exists() and (tmp_path / "stub_best.pt").exists()


class FakeClock:
    """Stands in for the time module inside the loop: each training step takes 10 s."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


@pytest.fixture
def timed_stage(monkeypatch):
    """A stub stage whose every training step takes 10 s of the loop's (fake) clock."""
    import training.loop as loop
    clock = FakeClock()
    monkeypatch.setattr(loop, "time", clock)

    class TimedStage(StubStage):
        def train_step(self, x, y, epoch):
            clock.now += 10.0
            return super().train_step(x, y, epoch)
    return TimedStage


def test_minutes_budget_stops_at_the_last_epoch_that_fits_and_counts_across_resumes(tmp_path, timed_stage):
    from training.checkpoint import load_checkpoint
    TimedStage = timed_stage
    cfg = Config(patience=0, picture_every=100)
    stage = TimedStage([1.0] * 20)
    fit(stage, OneBatch(), cfg, Run(str(tmp_path)), total_epochs=20, max_minutes=1.0)
    # 10 s epochs: after epoch 6 (60 s) a seventh would end past 60 s
    state = load_checkpoint(str(tmp_path / "stub_last.pt"))
    assert stage.validated == 6 and state["epoch"] == 6 and state["train_seconds"] == pytest.approx(60.0)
    again = TimedStage([1.0] * 20)  # the same budget again: the time is spent, nothing more trains
    fit(again, OneBatch(), cfg, Run(str(tmp_path)), total_epochs=20, resume_state=state, max_minutes=1.0)
    assert again.validated == 0
    more = TimedStage([1.0] * 20)  # a larger budget continues from the time already used
    fit(more, OneBatch(), cfg, Run(str(tmp_path)), total_epochs=20, resume_state=state, max_minutes=1.5)
    assert more.validated == 3 and load_checkpoint(str(tmp_path / "stub_last.pt"))["epoch"] == 9
    capped = TimedStage([1.0] * 20)  # --epochs stays the cap
    fit(capped, OneBatch(), cfg, Run(str(tmp_path / "capped")), total_epochs=2, max_minutes=10.0)
    assert capped.validated == 2
    unbudgeted = TimedStage([1.0] * 20)  # --minutes 0: no budget, past the default's minutes
    fit(unbudgeted, OneBatch(), cfg, Run(str(tmp_path / "unbudgeted")), total_epochs=20, max_minutes=0)
    assert unbudgeted.validated == 20


def test_checkpoint_writes_do_not_count_against_the_budget(tmp_path, timed_stage, monkeypatch):
    import training.loop as loop
    from training.checkpoint import load_checkpoint
    real_save = loop.save_checkpoint

    def slow_save(state, path):
        loop.time.now += 5.0  # each write takes 5 s of the fake clock
        real_save(state, path)

    monkeypatch.setattr(loop, "save_checkpoint", slow_save)
    fit(timed_stage([1.0, 0.5]), OneBatch(), Config(patience=0, picture_every=100), Run(str(tmp_path)),
        total_epochs=2)
    # two 10 s epochs, each followed by a _best.pt and a _last.pt write
    assert load_checkpoint(str(tmp_path / "stub_last.pt"))["train_seconds"] == pytest.approx(20.0)


class FourBatches(OneBatch):
    def __len__(self):
        return 4

    def epoch(self, e):
        for _ in range(4):
            yield from super().epoch(e)


def test_budget_after_a_mid_epoch_resume_counts_the_whole_next_epoch(tmp_path, timed_stage, capsys):
    """Resumed with one batch of an epoch left, that epoch's 10 s must not stand for the next
    epoch's 40 s: at 80 s of a 100 s budget another epoch would overrun it."""
    import os
    import signal

    from training.checkpoint import load_checkpoint
    from training.loop import StopRequested

    class StoppedStage(timed_stage):
        steps = 0

        def train_step(self, x, y, epoch):
            StoppedStage.steps += 1
            if StoppedStage.steps == 7:  # the third batch of epoch 2
                os.kill(os.getpid(), signal.SIGTERM)
            return super().train_step(x, y, epoch)

    cfg = Config(patience=0, picture_every=100)
    with pytest.raises(StopRequested, match="in epoch 2 after batch 3 of 4, step 7; resume with"):
        fit(StoppedStage([1.0] * 5), FourBatches(), cfg, Run(str(tmp_path)), total_epochs=5, max_minutes=100 / 60)
    state = load_checkpoint(str(tmp_path / "stub_last.pt"))
    assert (state["epoch"], state["batch_in_epoch"], state["train_seconds"]) == (1, 3, pytest.approx(70.0))
    resumed = timed_stage([1.0] * 5)
    capsys.readouterr()
    fit(resumed, FourBatches(), cfg, Run(str(tmp_path)), total_epochs=5, resume_state=state, max_minutes=100 / 60)
    assert resumed.validated == 1 and load_checkpoint(str(tmp_path / "stub_last.pt"))["epoch"] == 2
    # the stop and the resume count the epoch alike, from 1
    assert "resuming conditional_diffusion in epoch 2 after batch 3 of 4, step 7" in capsys.readouterr().err


def test_a_first_epoch_longer_than_the_budget_says_so(tmp_path, timed_stage, capsys):
    fit(timed_stage([1.0] * 5), FourBatches(), Config(patience=0, picture_every=100), Run(str(tmp_path)),
        total_epochs=5, max_minutes=0.5)  # the first epoch always runs: 40 s of a 30 s budget
    out = capsys.readouterr().out
    assert "stopping after epoch 1: it took 0.7 min, more than the 0.5-minute budget" in out
    assert (f"[conditional_diffusion] saved {tmp_path / 'stub_last.pt'} (to train on with --resume) and stub_best.pt "
            f"(the best val_loss)") in out


def test_a_resume_with_every_epoch_done_says_there_is_nothing_to_train(tmp_path, capsys):
    from training.checkpoint import load_checkpoint
    cfg = Config(patience=0, picture_every=100)
    fit(StubStage([1.0, 2.0]), OneBatch(), cfg, Run(str(tmp_path)), total_epochs=2)
    again = StubStage([1.0])
    fit(again, OneBatch(), cfg, Run(str(tmp_path)), total_epochs=2,
        resume_state=load_checkpoint(str(tmp_path / "stub_last.pt")))
    assert again.validated == 0 and "2 of 2 epochs are done: nothing to train" in capsys.readouterr().out


def test_a_run_resumed_after_an_early_stop_trains_no_more(tmp_path, capsys):
    from training.checkpoint import load_checkpoint
    fit(StubStage([1.0, 2.0, 3.0]), OneBatch(), Config(patience=1, picture_every=100), Run(str(tmp_path)),
        total_epochs=10)
    state = load_checkpoint(str(tmp_path / "stub_last.pt"))
    assert state["epoch"] == 2
    again = StubStage([1.0] * 10)
    fit(again, OneBatch(), Config(patience=1, picture_every=100), Run(str(tmp_path)), total_epochs=10,
        resume_state=state)
    assert again.validated == 0 and load_checkpoint(str(tmp_path / "stub_last.pt"))["epoch"] == 2
    assert "stopped early at epoch 2" in capsys.readouterr().out
    patient = StubStage([1.0, 2.0, 3.0, 0.5, 0.6])  # a larger --patience trains on
    fit(patient, OneBatch(), Config(patience=3, picture_every=100), Run(str(tmp_path)), total_epochs=5,
        resume_state=state)
    assert patient.validated == 3


@pytest.mark.parametrize("schedule, planned, says", [("cosine", 20, "still 79% of its peak"), ("cosine", 6, None),
                                                    ("constant", 20, None)])
def test_a_budget_that_stops_a_decaying_learning_rate_short_says_so(tmp_path, timed_stage, capsys, schedule,
                                                                     planned, says):
    """The stop names what the budget cut: a cosine planned over 20 epochs and stopped after 6 is
    at 79% of its peak; one planned over the 6 that fit, or a constant rate, lost nothing."""
    from training.optim import lr_factor

    class DecayingStage(timed_stage):
        def lr_share(self, epoch):
            return lr_factor(schedule, epoch / planned)

    stage = DecayingStage([1.0] * 20)
    fit(stage, OneBatch(), Config(patience=0, picture_every=100), Run(str(tmp_path)), total_epochs=20,
        max_minutes=1.0)
    stop = [line for line in capsys.readouterr().out.splitlines() if "stopping at epoch 6" in line]
    assert len(stop) == 1, stop
    if says:
        assert says in stop[0] and stop[0].endswith("plan 6 epochs to finish the decay within this budget on this device")
    else:
        assert "learning rate" not in stop[0]


def test_resume_under_another_best_metric_starts_its_record_afresh(tmp_path):
    """A run resumed with another --eval_every ranks checkpoints by another metric: the saved best
    (a loss) must not be compared with the new metric's values (an FD), nor count as patience."""
    from training.checkpoint import load_checkpoint

    class FDStage(StubStage):
        best_metric = ("classifier_fd_heldout", "min")

        def validate(self, epoch):
            return {**super().validate(epoch), "classifier_fd_heldout": 5.0 - epoch}  # improving

    cfg = Config(patience=2, picture_every=100)
    fit(StubStage([0.01, 0.02]), OneBatch(), cfg, Run(str(tmp_path)), total_epochs=2)  # best loss 0.01
    state = load_checkpoint(str(tmp_path / "stub_last.pt"))
    assert state["best_metric"] == "val_loss" and state["epochs_since_best"] == 1
    stage = FDStage([1.0] * 6)
    best = fit(stage, OneBatch(), cfg, Run(str(tmp_path)), total_epochs=6, resume_state=state)
    assert stage.validated == 4 and best == pytest.approx(5.0 - 6)  # no early stop: FD improved each epoch
    assert load_checkpoint(str(tmp_path / "stub_best.pt"))["epoch"] == 6


def test_patience_zero_never_stops(tmp_path):
    stage = StubStage([1.0, 2.0, 3.0, 4.0])
    fit(stage, OneBatch(), Config(patience=0, picture_every=100), Run(str(tmp_path)), total_epochs=4)
    assert stage.validated == 4


def test_balanced_terms_vanish_for_a_perfect_prediction_and_weigh_details_by_noise():
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    target = torch.randn(3, 3, 8, 8)
    perfect = balanced_terms(target, target, x0, x0, torch.tensor([0.1, 0.5, 0.9]))
    assert torch.allclose(perfect, torch.zeros(3), atol=1e-3)
    blurred = torch.nn.functional.avg_pool2d(x0, 3, 1, 1)  # same target error, lost details
    low_noise = balanced_terms(target, target, blurred, x0, torch.full((3,), 0.99))
    high_noise = balanced_terms(target, target, blurred, x0, torch.full((3,), 0.01))
    assert (low_noise > 10 * high_noise).all() and (high_noise > 0).all()


def test_balanced_loss_trains_through_the_diffusion_loss():
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    loss_fn = DiffusionLoss(NoiseSchedule("cosine", 100), "v", terms="balanced")
    loss = loss_fn(lambda x, t, y: net(x), torch.rand(4, 3, 8, 8), None)
    loss.backward()
    assert torch.isfinite(loss) and net.weight.grad.abs().sum() > 0


def test_adaptive_timesteps_learn_from_every_ranks_losses():
    """Under DDP each rank updates the table with the sums of all ranks' bins, so the tables stay one
    table: the same as one process seeing both ranks' batches."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 100, (16,), generator=g), torch.rand(16, generator=g)) for _ in range(2)]
    local = []  # each rank's own per-bin sums and counts, as it hands them to the all-reduce
    for t, losses in batches:
        AdaptiveTimesteps(100, decay=0.5, sum_across_ranks=lambda x: local.append(x) or x).update(t, losses)
    ranks = []
    for rank, (t, losses) in enumerate(batches):
        table = AdaptiveTimesteps(100, decay=0.5, sum_across_ranks=lambda x: local[0] + local[1])
        table.update(t, losses)
        ranks.append(table.mean_sq)
    one = AdaptiveTimesteps(100, decay=0.5)
    one.update(torch.cat([t for t, _ in batches]), torch.cat([losses for _, losses in batches]))
    assert torch.allclose(ranks[0], one.mean_sq) and torch.equal(ranks[0], ranks[1])


def test_processes_that_read_different_data_are_refused(monkeypatch, image_folder_root):
    from config import Config
    from errors import UserError
    from training import distributed, runner
    cfg = Config(dataset="folder", data_root=str(image_folder_root), image_size=16)
    monkeypatch.setattr(distributed, "enabled", lambda: True)
    monkeypatch.setattr(distributed, "gather_objects", lambda mine: [mine, ["another", mine[1]]])
    with pytest.raises(UserError, match="the processes read different images .*ranks 1 differ from rank 0"):
        runner.load_splits(cfg)
    monkeypatch.setattr(distributed, "gather_objects", lambda mine: [mine, list(mine)])
    assert len(runner.load_splits(cfg)[0]) > 0


def test_adaptive_timesteps_are_unbiased_and_follow_the_loss():
    sampler = AdaptiveTimesteps(1000, bins=10, decay=0.0)
    t = torch.arange(0, 1000, 10)
    losses = torch.where(t < 100, torch.tensor(10.0), torch.tensor(1.0))  # the first bin is hard
    sampler.update(t, losses)
    p = sampler.probabilities("cpu")
    assert p[0] > 3 * p[5] and p.sum().item() == pytest.approx(1.0)
    torch.manual_seed(0)
    samples, weights = sampler.sample(200_000, "cpu")
    assert samples.min() >= 0 and samples.max() <= 999
    assert weights.mean().item() == pytest.approx(1.0, rel=0.01)  # E[1 / (T p(t))] = 1
    f = (samples.float() / 1000) ** 2  # an importance-weighted mean equals the uniform mean
    assert (weights * f).mean().item() == pytest.approx(1 / 3, rel=0.02)


@pytest.mark.parametrize("timesteps", [10, 30, 1000])
def test_adaptive_timesteps_update_the_bin_they_were_drawn_from(timesteps):
    """Also when T is not a multiple of the bins: a bin's loss must land on that bin."""
    sampler = AdaptiveTimesteps(timesteps, decay=0.0)
    for b in range(sampler.bins):
        sampler.mean_sq = torch.full((sampler.bins,), 1e-12)
        sampler.mean_sq[b] = 1.0  # all the probability but the uniform share on bin b
        t, weights = sampler.sample(64, "cpu")
        hit = t[weights < 1]  # drawn through bin b's large probability
        sampler.update(hit, torch.full_like(hit, 5.0, dtype=torch.float))
        others = torch.cat([sampler.mean_sq[:b], sampler.mean_sq[b + 1:]])
        assert sampler.mean_sq[b] == pytest.approx(25.0) and (others == 1e-12).all(), (timesteps, b)
    torch.manual_seed(0)
    sampler.mean_sq = torch.rand(sampler.bins) + 0.1
    t, weights = sampler.sample(200_000, "cpu")
    assert t.min() == 0 and t.max() == timesteps - 1
    assert (weights * (t.float() / timesteps) ** 2).mean().item() == pytest.approx(
        ((torch.arange(timesteps) / timesteps) ** 2).mean().item(), rel=0.02)


def test_balanced_detail_terms_keep_float32_under_bf16_autocast():
    torch.manual_seed(0)
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    x0_hat, target = x0 + 1e-3 * torch.randn_like(x0), torch.randn(2, 3, 16, 16)
    full = balanced_terms(target, target, x0_hat, x0, torch.ones(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = balanced_terms(target, target, x0_hat, x0, torch.ones(2))
    assert autocast.dtype == torch.float32 and torch.allclose(autocast, full, rtol=1e-4)


def test_adaptive_loss_runs_without_host_sync_and_keeps_state(monkeypatch):
    loss_fn = DiffusionLoss(NoiseSchedule("linear", 100), "eps", timestep_sampling="adaptive")
    net = torch.nn.Conv2d(2, 2, 1)
    batches = [torch.randn(8, 2, 4, 4) for _ in range(3)]

    def host_sync(*args):
        raise AssertionError("a tensor was read on the host inside the loss (a GPU sync)")

    with monkeypatch.context() as m:  # what reads a value back from a GPU tensor
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            m.setattr(torch.Tensor, name, host_sync)
        losses = [loss_fn(lambda x, t, y: net(x), x0, None) for x0 in batches]
    for loss in losses:
        loss.backward()
    state = loss_fn.adaptive.state_dict()
    assert state["mean_sq"].shape == (20,) and not torch.allclose(state["mean_sq"], torch.ones(20))


def test_lr_factor_is_a_half_cosine_over_the_plan():
    from training.optim import lr_factor
    assert [lr_factor("constant", p) for p in (0, 0.5, 1, 2)] == [1.0] * 4
    assert [round(lr_factor("cosine", p), 12) for p in (-1, 0, 0.25, 0.5, 0.75, 1, 2)] == \
        [1.0, 1.0, round((1 + math.sqrt(0.5)) / 2, 12), 0.5, round((1 - math.sqrt(0.5)) / 2, 12), 0.0, 0.0]


def test_ema_warms_up_then_uses_the_configured_decay():
    from training.optim import make_ema, update_ema
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = make_ema(model, 0.999)
    update_ema(ema, model)  # the first update copies
    with torch.no_grad():
        model.weight.fill_(1.0)
    update_ema(ema, model)  # n = 1: decay (1 + 1) / (10 + 1)
    assert ema.module.weight.item() == pytest.approx(1 - 2 / 11)
    for _ in range(5000):
        update_ema(ema, model)
    assert ema.module.weight.item() == pytest.approx(1.0, abs=1e-3)  # the start is forgotten
    assert ema.n_averaged.device.type == "cpu" and int(ema.n_averaged) == 5002


def test_ema_averages_parameters_and_float_buffers_and_copies_counters():
    from training.optim import make_ema, update_ema

    class WithBuffers(torch.nn.Linear):
        def __init__(self):
            super().__init__(3, 2)
            self.register_buffer("running", torch.zeros(2))
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    torch.manual_seed(0)
    model = WithBuffers()
    ema, decay = make_ema(model, 0.5), 0.5  # the warm-up's decay passes 0.5 at n = 8: the cap is tested too
    expected = None
    for n in range(30):
        with torch.no_grad():
            for t in (model.weight, model.bias, model.running):
                t.add_(torch.randn_like(t))
            model.calls.add_(1)
        update_ema(ema, model)
        current = [model.weight.detach().clone(), model.bias.detach().clone(), model.running.clone()]
        weight = 1 - min(decay, (1 + n) / (10 + n))  # the warm-up's decay after n updates
        expected = current if expected is None else [e + weight * (c - e) for e, c in zip(expected, current)]
    for got, want in zip((ema.module.weight, ema.module.bias, ema.module.running), expected):
        torch.testing.assert_close(got, want)
    assert int(ema.module.calls) == 30 and int(ema.n_averaged) == 30


def test_optimizer_state_takes_the_fused_flag_of_the_device_it_resumes_on():
    """A CPU run resumed on a GPU: fused AdamW again, its step counters beside the weights (as fused
    AdamW needs them). The meta device stands in for the GPU: loading places tensors, steps nothing."""
    from training.optim import load_optimizer_state, make_optimizer
    p = torch.nn.Parameter(torch.zeros(2))
    on_cpu = make_optimizer([p], 1e-3, device=torch.device("cpu"))
    p.grad = torch.ones(2)
    on_cpu.step()
    saved = on_cpu.state_dict()
    on_gpu = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, device="meta"))], lr=1e-3)
    load_optimizer_state(on_gpu, saved, torch.device("cuda"))
    state = next(iter(on_gpu.state.values()))
    assert saved["param_groups"][0]["fused"] is None and on_gpu.param_groups[0]["fused"] is True
    assert state["step"].device.type == "meta" and state["exp_avg"].device.type == "meta"
    load_optimizer_state(on_cpu, on_cpu.state_dict(), torch.device("cpu"))
    assert on_cpu.param_groups[0]["fused"] is None and on_cpu.state[p]["step"].device.type == "cpu"


def test_compiled_training_step_gives_the_eager_losses():
    """torch.compile of the training model (the default on CUDA, --compile elsewhere) through the
    real DenoiserStage on the CPU: the same losses as eager steps from the same weights and noise."""
    import argparse
    import dataclasses

    from config import build_config
    from training.denoiser import DenoiserStage
    cfg = build_config(argparse.Namespace(preset="tiny", model="unet", dataset="folder", image_size=16,
                                          base_channels=16, device="cpu"))
    cfg = dataclasses.replace(cfg, dropout=0.0)  # compiled dropout draws other random numbers
    x, y = torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 0, 1])

    def losses(compile_model):
        torch.manual_seed(0)
        stage = DenoiserStage(dataclasses.replace(cfg, compile=compile_model), ["cat", "dog"], (3, 16, 16),
                              torch.device("cpu"), x[:1], y[:1], None)
        assert (stage.train_model is not stage.model) == compile_model
        return [float(stage.train_step(x, y, 0.0)["loss"]) for _ in range(2)]

    assert losses(True) == pytest.approx(losses(False), rel=1e-3)


def test_auto_precision_is_bf16_only_on_cpus_that_have_it(monkeypatch):
    import os
    from training import optim
    cpu = torch.device("cpu")
    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(optim, "cpu_has_native_bf16", lambda: native)
        assert optim.amp_dtype(cpu, "auto") == expected
        assert optim.amp_dtype(cpu, "bf16") == torch.bfloat16 and optim.amp_dtype(cpu, "none") is None
    assert optim.amp_dtype(torch.device("mps"), "auto") is None
    # The real reading agrees with what the machine's own flags say.
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    monkeypatch.undo()
    assert optim.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_fp16_trains_every_stage_with_loss_scaling(tmp_path, image_folder_root, capsys):
    """--amp fp16 (and auto on GPUs without native bf16): each stage scales its losses with a
    GradScaler per optimizer and saves the scalers for resume; bf16 and float32 need none."""
    import main
    from training.checkpoint import load_checkpoint
    from training.optim import make_scaler
    cpu = torch.device("cpu")
    assert make_scaler(cpu, "bf16") is None and make_scaler(cpu, "none") is None and make_scaler(cpu, "auto") is None
    assert isinstance(make_scaler(cpu, "fp16"), torch.amp.GradScaler)
    flags = ["--dataset", "folder", "--data_root", str(image_folder_root), "--preset", "tiny", "--batch_size", "4",
             "--image_size", "16", "--picture_every", "100", "--amp", "fp16", "--device", "cpu",
             "--results_dir", str(tmp_path)]
    assert main.main(["--train_all", *flags, "--adv_start_epoch", "0", "--vae_epochs", "1",
                      "--diffusion_epochs", "1"]) == 0
    assert main.main(["--train_classifier", *flags, "--epochs", "1"]) == 0
    assert "note: --amp fp16 on a CPU is emulated" in capsys.readouterr().err  # it works, slowly
    vae = load_checkpoint(str(tmp_path / "vae_gan_last.pt"))["stage"]
    denoiser = load_checkpoint(str(tmp_path / "conditional_diffusion_last.pt"))["stage"]
    classifier = load_checkpoint(str(tmp_path / "classifier_last.pt"))["stage"]
    for scaler in (vae["scaler_g"], vae["scaler_d"], denoiser["scaler"], classifier["scaler"]):
        # Used: steps without overflow count towards its growth, an overflow lowers its scale.
        assert scaler["_growth_tracker"] > 0 or 0 < scaler["scale"] < 2.0 ** 16


def test_fp16_overflow_is_the_scalers_to_handle_and_a_nan_loss_is_a_bad_step():
    """An overflow of the scaled gradients (finite loss) halves GradScaler's scale and skips the
    update without counting as a bad step; a non-finite loss always is one, scaler or not."""
    from training.optim import grads_finite_step
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    huge = lambda: (p * 1e34).sum()  # noqa: E731  finite, but its gradient times 2^16 is inf in float32
    assert grads_finite_step(huge(), [p], opt, 0, scaler) is True
    assert scaler.get_scale() == 2.0 ** 15 and torch.equal(p.detach(), torch.ones(3))  # skipped, scale halved
    assert grads_finite_step(p.sum() * float("nan"), [p], opt, 0, scaler) is False
    assert grads_finite_step(p.sum(), [p], opt, 0, scaler) is True and p[0].item() < 1  # a normal step
    assert grads_finite_step(p.sum() * float("inf"), [p], opt, 0, None) is False
    low = torch.amp.GradScaler("cpu", init_scale=1.0)  # a scale already down to 1: overflows are bad steps now
    q = torch.nn.Parameter(torch.ones(3))
    assert grads_finite_step((q * 1e38).sum() * 10, [q], torch.optim.SGD([q], lr=0.1), 0, low) is False


# --- what the denoiser stage takes from its config -----------------------------------------------

def tiny_denoiser_stage(**overrides):
    import argparse
    import dataclasses

    from config import build_config
    from training.denoiser import DenoiserStage
    cfg = build_config(argparse.Namespace(preset="tiny", model="unet", dataset="folder", image_size=8,
                                          base_channels=8, device="cpu"))
    cfg = dataclasses.replace(cfg, **overrides)
    x, y = torch.rand(2, 3, 8, 8) * 2 - 1, torch.tensor([0, 1])
    return DenoiserStage(cfg, ["cat", "dog"], (3, 8, 8), torch.device("cpu"), x, y, None)


@pytest.mark.parametrize("settings", [
    dict(prediction="eps", loss_weighting="min_snr", schedule="linear", timesteps=200),
    dict(prediction="x0", loss_weighting="uniform", schedule="edm", timesteps=50),
    dict(prediction="v", loss_weighting="min_snr", schedule="cosine", timesteps=1000)])
def test_the_objective_trained_is_the_configured_one(settings):
    """A parsed --prediction or --schedule that training ignored would train one target and
    sample another."""
    stage = tiny_denoiser_stage(**settings)
    loss = stage.loss_fn
    assert (loss.prediction, loss.weighting) == (settings["prediction"], settings["loss_weighting"])
    assert (loss.schedule.kind, loss.schedule.timesteps) == (settings["schedule"], settings["timesteps"])
    pipe = stage.pipeline()
    assert pipe.cfg.prediction == settings["prediction"] and pipe.schedule.kind == settings["schedule"]


class LabelSpy(torch.nn.Module):
    def __init__(self, network, seen):
        super().__init__()
        self.network, self.seen = network, seen

    def forward(self, x, t, y):
        self.seen.append(y.clone())
        return self.network(x, t, y)


def test_label_dropout_replaces_labels_by_the_null_label_only():
    stage = tiny_denoiser_stage(label_dropout=0.5)
    seen = []
    stage.train_model = LabelSpy(stage.train_model, seen)
    torch.manual_seed(0)
    labels = torch.tensor([0, 1] * 32)
    stage.train_step(torch.rand(64, 3, 8, 8) * 2 - 1, labels, 0.0)
    (y,) = seen
    dropped = y != labels
    assert (y[dropped] == 2).all()  # two classes: the null label is 2, never a real class
    assert 20 <= int(dropped.sum()) <= 44  # about half of 64
    stage, seen = tiny_denoiser_stage(label_dropout=0.0), []
    stage.train_model = LabelSpy(stage.train_model, seen)
    stage.train_step(torch.rand(64, 3, 8, 8) * 2 - 1, labels, 0.0)
    assert torch.equal(seen[0], labels)


def test_guided_sampling_gives_the_unconditional_half_the_null_label(monkeypatch):
    import pipeline
    pipe = tiny_denoiser_stage().pipeline()
    seen, made = [], []
    pipe.denoiser = LabelSpy(pipe.denoiser, seen)
    pipe.sample(torch.tensor([0, 1, 1]), sampler="ddim", steps=3, guidance_scale=3.0, guidance_schedule="constant")
    assert len(seen) == 3 and all(torch.equal(y, torch.tensor([0, 1, 1, 2, 2, 2])) for y in seen)
    # The guidance schedule is told the sampler's step count, so a ramp spans the whole run.
    make = pipeline.make_denoiser
    monkeypatch.setattr(pipeline, "make_denoiser", lambda *a, **k: made.append(k["steps"]) or make(*a, **k))
    pipe.sample(torch.tensor([0]), sampler="dpmpp", steps=5, guidance_scale=3.0, guidance_schedule="linear")
    assert made == [5]


def test_learning_rate_warms_up_linearly_then_holds():
    from training.optim import warmup_schedule
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    sched = warmup_schedule(opt, 4)
    rates = []
    for _ in range(6):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])


def test_patience_counts_across_a_resume(tmp_path):
    """Two evaluations without improvement before the stop, one after the resume: patience 3 stops."""
    losses = [1.0, 0.8, 0.9, 0.95, 0.97, 0.5, 0.4]
    cfg = Config(patience=3, picture_every=100)
    fit(StubStage(losses), OneBatch(), cfg, Run(str(tmp_path)), total_epochs=4)
    state = torch.load(tmp_path / "stub_last.pt", weights_only=True)
    assert state["epochs_since_best"] == 2
    stage = StubStage(losses)
    fit(stage, OneBatch(), cfg, Run(str(tmp_path)), total_epochs=7, resume_state=state)
    assert stage.validated == 1  # epoch 5 was the third without improvement: stopped there


@pytest.mark.parametrize("field, value, message", [
    ("seed", 10 ** 20, "--seed must be in"),
    ("seed", -1, "--seed must be in"),
    ("lr", 1e39, "--lr must be in (0, 1]"),  # finite in Python, infinite in float32
    ("vae_lr", float("nan"), "--lr must be in (0, 1]"),
    ("classifier_weight", float("nan"), "loss weights must be finite"),
    ("kl_weight", float("inf"), "loss weights must be finite"),
    ("weight_decay", float("inf"), "--weight_decay and --grad_clip must be finite"),
    ("classifier_width", 0, "widths, depths and head counts must be positive"),
    ("transformer_depth", 0, "widths, depths and head counts must be positive"),
    ("results_dir", "", "--results_dir must not be empty"),
])
def test_values_no_run_can_use_are_refused_by_the_config(field, value, message):
    import argparse

    from config import build_config
    from errors import UserError
    with pytest.raises(UserError) as error:
        build_config(argparse.Namespace(preset="tiny", model="unet", dataset="folder", **{field: value}))
    assert message in str(error.value)


def test_the_generator_step_leaves_the_discriminator_without_gradients(tmp_path, monkeypatch):
    """The adversarial term reaches the VAE through a frozen discriminator; the discriminator's
    own step then trains it."""
    import argparse
    import types

    import training.vae_gan as vae_gan
    from config import build_config
    cfg = build_config(argparse.Namespace(preset="tiny", image_size=16, perceptual_weight=0.0, adv_start_epoch=0,
                                          adv_ramp_epochs=0, device="cpu"))
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1])
    stage = vae_gan.VAEGANStage(cfg, 2, 16, torch.device("cpu"), types.SimpleNamespace(images=images, labels=labels),
                                Run(str(tmp_path)), ["cat", "dog"])
    real_step, seen = vae_gan.grads_finite_step, []

    def step_and_look(loss, params, optimizer, *args):
        done = real_step(loss, params, optimizer, *args)
        seen.append([p.grad is not None for p in stage.disc.parameters()])
        return done

    monkeypatch.setattr(vae_gan, "grads_finite_step", step_and_look)
    before = [p.detach().clone() for p in stage.disc.parameters()]
    losses = stage.train_step(images.float() / 127.5 - 1, labels, 1.0)
    assert "adversarial" in losses and "discriminator" in losses
    generator, discriminator = seen
    assert not any(generator) and all(discriminator)
    assert all(p.requires_grad for p in stage.disc.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, stage.disc.parameters()))


def test_a_non_finite_discriminator_step_is_skipped_alone(tmp_path, monkeypatch):
    """The generator has stepped by then: the step is not reported as skipped (the loop would count
    it against --max_bad_steps and drop its generator losses), only the discriminator's is."""
    import argparse
    import types

    import training.vae_gan as vae_gan
    from config import build_config
    cfg = build_config(argparse.Namespace(preset="tiny", image_size=16, perceptual_weight=0.0, adv_start_epoch=0,
                                          adv_ramp_epochs=0, device="cpu"))
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    stage = vae_gan.VAEGANStage(cfg, 2, 16, torch.device("cpu"), types.SimpleNamespace(images=images,
                                labels=torch.tensor([0, 1, 0, 1])), Run(str(tmp_path)), ["cat", "dog"])
    disc = stage.disc_ddp
    stage.disc_ddp = lambda x: disc(x) * float("nan")  # the discriminator's own loss goes non-finite
    before_g = [p.detach().clone() for p in stage.vae.parameters()]
    before_d = [p.detach().clone() for p in stage.disc.parameters()]
    losses = stage.train_step(images.float() / 127.5 - 1, torch.tensor([0, 1, 0, 1]), 1.0)
    assert losses is not None and "discriminator" not in losses and float(losses["discriminator_skipped"]) == 1
    assert torch.isfinite(losses["total"]) and "adversarial" in losses
    assert any(not torch.equal(a, p) for a, p in zip(before_g, stage.vae.parameters()))
    assert all(torch.equal(a, p) for a, p in zip(before_d, stage.disc.parameters()))


def test_loaded_optimizer_moments_take_their_parameters_memory_layout():
    """A CPU run's contiguous AdamW moments, resumed where the weights are channels-last (CUDA)."""
    from training.optim import load_optimizer_state, make_optimizer
    torch.manual_seed(0)
    saved_model = torch.nn.Conv2d(3, 4, 3)
    saved_opt = make_optimizer(saved_model.parameters(), 1e-3)
    saved_model(torch.randn(2, 3, 5, 5)).sum().backward()
    saved_opt.step()
    model = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), 1e-3)
    load_optimizer_state(opt, saved_opt.state_dict(), torch.device("cpu"))
    state = opt.state[model.weight]
    assert not saved_opt.state[saved_model.weight]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    for name in ("exp_avg", "exp_avg_sq"):
        assert state[name].stride() == model.weight.stride()
        assert torch.equal(state[name], saved_opt.state[saved_model.weight][name])


@pytest.mark.parametrize("rank", [0, 1])
def test_evaluation_samples_are_the_same_images_on_any_number_of_gpus(monkeypatch, rank):
    """Rank r of 2 draws the r-th block of the labels, from the seeds a single process gives those
    images, and the gathered set is in the single process's order."""
    import types

    from training import denoiser, distributed
    drawn, scored = [], []
    stage = object.__new__(denoiser.DenoiserStage)
    stage.cfg, stage.num_classes, stage.device = Config(eval_samples=8), 3, torch.device("cpu")
    stage.pipeline = lambda: types.SimpleNamespace(sample_batched=lambda labels, seed: drawn.append(
        (labels.tolist(), seed)) or torch.zeros(len(labels), 3, 4, 4))
    stage.offline = lambda images, labels: scored.append(labels.tolist()) or {
        "sample_accuracy": 1.0, "classifier_fd": 0.0, "classifier_fd_heldout": 0.0, "classifier_kid": 0.0,
        "memorization": {"near_copy_fraction": 0.0}}
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "gather_tensor", lambda t: torch.cat([t, t]))
    stage.sample_metrics()
    labels = [0, 1, 2, 0, 1, 2, 0, 1]  # balanced_labels(8, 3), as one process draws them from seed + i
    assert drawn == [(labels[4 * rank:4 * rank + 4], denoiser.HELDOUT_SEED + 4 * rank)]
    assert scored == [labels]


@pytest.mark.parametrize("total_epochs, picture_every", [(3, 1), (3, 100), (1, 100)])
def test_a_signal_after_an_epochs_last_step_stops_the_run_there(tmp_path, total_epochs, picture_every):
    """SIGINT during the held-out evaluation (after the last batch's check) is not lost: the run
    saves the epoch and stops, also after its last epoch (--train_all would start its next stage),
    and whether or not the epoch writes pictures."""
    import os
    import signal
    from training.checkpoint import load_checkpoint
    from training.loop import StopRequested

    class SignalledStage(StubStage):
        def validate(self, epoch):
            os.kill(os.getpid(), signal.SIGINT)
            return super().validate(epoch)

    stage = SignalledStage([1.0, 2.0, 3.0])
    cfg = Config(patience=0, picture_every=picture_every, checkpoint_every=5)
    with pytest.raises(StopRequested, match=f"SIGINT: saved .*stub_last.pt after epoch 1 of {total_epochs}; resume"):
        fit(stage, OneBatch(), cfg, Run(str(tmp_path)), total_epochs=total_epochs)
    state = load_checkpoint(str(tmp_path / "stub_last.pt"))
    assert stage.validated == 1 and state["epoch"] == 1 and state["batch_in_epoch"] == 0


def test_training_pictures_are_titled_with_their_epoch(monkeypatch):
    from types import SimpleNamespace
    import viz.figures
    from training.denoiser import DenoiserStage
    drawn = []
    monkeypatch.setattr(viz.figures, "class_sample_grid", lambda pipe, path, **kwargs: drawn.append((path, kwargs)))
    monkeypatch.setattr(viz.figures, "plot_losses", lambda *args: None)
    stage = SimpleNamespace(pipeline=lambda: "pipe", cfg=SimpleNamespace(seed=7), kind="conditional_diffusion",
                            run=SimpleNamespace(picture=lambda name: f"pictures/{name}", path=lambda name: name))
    DenoiserStage.pictures(stage, 2)
    assert drawn == [("pictures/samples_epoch0002.png", {"per_class": 8, "seed": 7, "title": "epoch 2"})]
