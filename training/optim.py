"""Optimizer, warm-up schedule, EMA and autocast, shared by every stage."""
import contextlib
import functools
import itertools
import math

import torch
from torch.optim.swa_utils import AveragedModel

from training import distributed as dist


def _fused(device):
    return (device is not None and device.type == "cuda") or None  # fused AdamW: one kernel per step on GPUs


def make_optimizer(params, lr, weight_decay=0.0, betas=(0.9, 0.999), device=None):
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=_fused(device))


def load_optimizer_state(optimizer, state, device):
    """Restore a saved optimizer on this device. The saved groups carry the saving device's `fused`
    flag, and loading places each step counter by it (beside the weights when fused, on the CPU
    otherwise): flag them for this device first, or a CPU run resumed on a GPU would step unfused,
    or fused with its counters on the wrong device. The moments then take their parameter's
    memory layout: loading keeps the saved strides, and CUDA's fused AdamW refuses contiguous
    moments beside channels-last weights (a checkpoint from a CPU run resumed on a GPU)."""
    optimizer.load_state_dict({**state, "param_groups": [{**group, "fused": _fused(device)}
                                                         for group in state["param_groups"]]})
    for param, param_state in optimizer.state.items():
        for name, value in param_state.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                param_state[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def warmup_schedule(optimizer, warmup_steps, decay=lambda: 1.0):
    """Linear warm-up over `warmup_steps` optimizer steps, times `decay()`: the lr schedule's
    factor, read when the scheduler steps (after each optimizer step) to set the next step's lr."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             lambda s: min(1.0, (s + 1) / max(warmup_steps, 1)) * decay())


LR_SCHEDULES = ("constant", "cosine")


def lr_factor(schedule, progress):
    """The lr's multiplier at `progress` (the share of the stage's planned epochs done): 1
    throughout, or a half cosine from 1 down to 0 at the end of the plan."""
    if schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def make_ema(model, decay):
    """EMA of the weights with the usual warm-up: the decay grows as (1 + n) / (10 + n) up to
    `decay`, so a short run's average is not dominated by the initial weights (a fixed 0.999
    still holds 43% of them after 840 steps). n is AveragedModel's own counter, saved with it."""
    def ema_update(ema_params, params, num_averaged):
        n = int(num_averaged)
        torch._foreach_lerp_(ema_params, params, 1.0 - min(decay, (1 + n) / (10 + n)))
    return AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)


def update_ema(ema, model):
    """ema.update_parameters(model) without its host syncs: AveragedModel hands its step counter
    (a CPU tensor) to the averaging function on the GPU, which has to read it back every step."""
    n = int(ema.n_averaged)
    averaged = [t.detach() for t in itertools.chain(ema.module.parameters(), ema.module.buffers())]
    current = [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]
    floating = [a.is_floating_point() for a in averaged]
    for a, c, is_float in zip(averaged, current, floating, strict=True):
        if n == 0 or not is_float:  # counters (BatchNorm's) are copied, not averaged
            a.copy_(c)
    if n > 0:
        ema.multi_avg_fn([a for a, f in zip(averaged, floating) if f], [c for c, f in zip(current, floating) if f], n)
    ema.n_averaged += 1


@functools.cache
def cpu_has_native_bf16():
    """Whether this x86 CPU computes in bf16 natively (AVX512-BF16 or AMX-BF16, read from
    /proc/cpuinfo; False where that file is missing). Elsewhere oneDNN emulates bf16, slower than
    float32; with it, the cats/dogs recipe trains about 1.8x faster than in float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(device, amp):
    """The autocast dtype --amp gives on this device (None: float32). auto: bf16 where the hardware
    has it natively (GPUs of compute capability 8.0 and up, CPUs with AVX512-BF16 or AMX), fp16 with
    loss scaling on older GPUs (emulated bf16 is slow there), float32 on other CPUs and on MPS."""
    if amp == "none":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None
    return torch.float16 if amp == "fp16" else torch.bfloat16


def autocast(device, amp):
    dtype = amp_dtype(device, amp)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def compile_wanted(compile_flag, device):
    """--compile / --no-compile, or by default on CUDA only (on a 2-core CPU the compiled step was slower, after
    two minutes of compiling: BENCHMARKS.md)."""
    return device.type == "cuda" if compile_flag is None else compile_flag


def make_scaler(device, amp):
    """A GradScaler under fp16, whose small gradients underflow unscaled; bf16 and fp32 need none."""
    return torch.amp.GradScaler(device.type) if amp_dtype(device, amp) == torch.float16 else None


def grads_finite_step(loss, params, optimizer, grad_clip, scaler=None):
    """Backward, clip, and step only if the loss and gradient norm are finite (one host sync,
    as GradScaler does). Returns False for a bad step: a non-finite loss or gradient. Under fp16
    an overflow of the scaled gradients is GradScaler's business while its scale is above 1: it
    skips the update and halves the scale, and the step counts as done, as in PyTorch's AMP recipe."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # unscale before clipping, or the clip acts on scaled grads
    else:
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf"))
    # Under DDP the gradients are the ranks' mean, the loss each rank's own: every rank must judge
    # the step alike, or their lr schedules, EMA and bad-step counts would drift apart.
    finite_loss = dist.all_across_ranks(torch.isfinite(loss.detach()))
    if not bool(torch.isfinite(norm) & finite_loss):
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            return False
        overflow = bool(finite_loss) and scaler.get_scale() > 1
        scaler.update()
        return overflow
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return True
