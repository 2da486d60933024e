"""Speed of each denoiser on this device: training images/s, FLOPs per training image and
model-FLOP utilisation, peak memory, and sampling images/s (DDIM and DPM-Solver++ at 10/20/50
steps, DDPM at 1000), next to diffusers' UNet2DModel at a matched parameter count trained through
the same step. Writes JSON and prints a table. A measurement, not a test.

    python bench/benchmark.py [--device auto] [--out bench/results/NAME.json] [--quick] [--[no-]compile]

Training runs through the suite's own DenoiserStage.train_step (DiffusionLoss, autocast, AdamW
(fused on CUDA), channels_last on CUDA, grad clipping, EMA) on random data; sampling through
pipeline.Pipeline.sample with the config's guidance scale. See bench/README.md.
"""
import argparse
import ctypes
import datetime
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from config import DENOISERS, DEVICES, PRESETS, ArgumentParser, build_config, positive_int  # noqa: E402
from errors import run_main  # noqa: E402
from training.run import device_name, git_commit, writable_output  # noqa: E402
from models import build_denoiser, build_vae  # noqa: E402
from training import denoiser as denoiser_module  # noqa: E402
from training.loop import seed_everything, select_device  # noqa: E402
from training.optim import amp_dtype, compile_wanted  # noqa: E402

NUM_CLASSES = 2  # the default dataset, cifar10_catdog
SAMPLERS = [("ddim", 10), ("ddim", 20), ("ddim", 50), ("dpmpp", 10), ("dpmpp", 20), ("dpmpp", 50), ("ddpm", 1000)]
# Dense (no sparsity) bf16 tensor-core peaks, matched against torch.cuda.get_device_name in order.
GPU_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("H200 NVL", 835.5), ("H100", 989.4), ("H200", 989.4),
                   ("A100", 312.0)]
REFERENCE = "diffusers_unet2d"


@dataclass
class Settings:
    train_batch: int
    warmup_steps: int
    repeats: int
    steps_per_repeat: int
    sample_batch: int
    sample_repeats: int
    ddpm_steps: int  # DDPM steps actually run; fewer than 1000 only with --quick (then extrapolated)


def settings_for(device, quick, config_batch, train_batch=None):
    if device.type == "cuda":
        batches = dict(train_batch=config_batch, sample_batch=256)
    else:  # CPUs (and MPS) get small batches, so that a --quick run of every model takes minutes
        batches = dict(train_batch=8, sample_batch=2) if quick else dict(train_batch=16, sample_batch=4)
    if train_batch:
        batches["train_batch"] = train_batch
    if quick:
        return Settings(**batches, warmup_steps=1 if device.type != "cuda" else 3, repeats=3, steps_per_repeat=2,
                        sample_repeats=1, ddpm_steps=10 if device.type != "cuda" else 100)
    return Settings(**batches, warmup_steps=10, repeats=5, steps_per_repeat=20, sample_repeats=3, ddpm_steps=1000)


# --- measuring --------------------------------------------------------------------------------

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_per_call(fn, device, *, warmup, repeats, calls=1):
    """Median seconds per call of fn over `repeats` timed runs of `calls` calls each, after
    `warmup` untimed calls. CUDA runs are timed with events after a synchronize, so the
    kernels still queued when fn returns are counted."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            synchronize(device)
            seconds = time.perf_counter() - t0
        times.append(seconds / calls)
    return statistics.median(times), times


def compute_dtype(device, amp):
    """The dtype the training matmuls run in (training/optim.py's autocast rule)."""
    return amp_dtype(device, amp) or torch.float32


def peak_flops(device, dtype):
    """(FLOP/s, where the number comes from): a datasheet peak for known GPUs, else the best of
    several large matmuls in the training dtype: what this device's BLAS reaches now, measured
    again next to each model, since on a shared CPU "now" changes from minute to minute."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS:
            if key in name:
                note = f"datasheet: {key} bf16 dense"
                if dtype != torch.bfloat16 and dtype != torch.float16:
                    note += f" (training runs in {dtype}: MFU is against the bf16 peak)"
                return tflops * 1e12, note
        return None, f"no peak known for {name}: MFU not computed"
    n = 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    _, all_seconds = time_per_call(lambda: a @ b, device, warmup=1, repeats=10)
    return 2 * n ** 3 / min(all_seconds), f"best {n}x{n} {dtype} matmul, threads={torch.get_num_threads()}"


def training_flops_per_image(model, shape, device):
    """Forward FLOPs of one image (FlopCounterMode counts matmuls, convolutions and attention),
    times 3 for forward plus backward. Attention is counted through its math kernel: the counter
    knows the GPU's fused kernels but counts the CPU's fused one as 0."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    x = torch.randn((2,) + tuple(shape), device=device)
    t, y = torch.randint(0, 100, (2,), device=device), torch.randint(0, NUM_CLASSES, (2,), device=device)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return 3 * counter.get_total_flops() / 2


class PeakMemory:
    """Peak memory of what runs between start() and read(): CUDA's max_memory_allocated (weights,
    optimizer state and activations), or on Linux CPUs the growth of the peak resident set
    (VmHWM, reset through /proc/self/clear_refs). None where neither is available."""

    def __init__(self, device):
        self.device, self.rss_before = device, None

    @staticmethod
    def _status_kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # hand memory the previous model freed back to the OS, or this one's growth hides in it
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak resident set to the current one
            self.rss_before = self._status_kib("VmRSS")
        except OSError:
            self.rss_before = None

    def read_mb(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        if self.rss_before is None:
            return None
        return (self._status_kib("VmHWM") - self.rss_before) / 1024

    def kind(self):
        return "cuda max_memory_allocated" if self.device.type == "cuda" else "peak RSS growth (VmHWM), CPU"


# --- models -----------------------------------------------------------------------------------

def model_config(name, compile_model, preset="default"):
    return build_config(argparse.Namespace(model=name, compile=compile_model, preset=preset))


def make_stage(cfg, device, network=None):
    """The suite's DenoiserStage on placeholder validation data; `network` stands in for the
    configured denoiser (the diffusers reference) and gets exactly the same treatment. The latent
    model gets an untrained VAE, so its sampling time includes decoding, as in real use."""
    extras = {}
    if cfg.is_latent:
        vae = build_vae(cfg, NUM_CLASSES, cfg.image_size).to(device).eval().requires_grad_(False)
        shape = (cfg.latent_channels, vae.latent_size, vae.latent_size)
        extras = dict(vae=vae, latent_shift=torch.zeros(shape[0], 1, 1, device=device),
                      latent_scale=torch.ones(shape[0], 1, 1, device=device))
    else:
        shape = (3, cfg.image_size, cfg.image_size)
    build = denoiser_module.build_denoiser if network is None else (lambda *args: network)
    with mock.patch.object(denoiser_module, "build_denoiser", build):
        stage = denoiser_module.DenoiserStage(cfg, [f"class{i}" for i in range(NUM_CLASSES)], shape, device,
                                              torch.zeros((1,) + shape), torch.zeros(1, dtype=torch.long), None,
                                              **extras)
    return stage, shape


def random_batch(cfg, shape, batch, device):
    """What a DeviceBatcher yields: pixels in [-1, 1], or (mean, logvar) latent pairs."""
    if cfg.is_latent:
        x = torch.cat([torch.randn((batch,) + shape), torch.randn((batch,) + shape) - 4.0], dim=1)
    else:
        x = torch.rand((batch,) + shape) * 2 - 1
    return x.to(device), torch.randint(0, NUM_CLASSES, (batch,)).to(device)


def diffusers_reference(cfg, target_params):
    """diffusers' UNet2DModel shaped like our pixel UNet (levels, blocks per level, no attention,
    scale-shift conditioning, a class embedding with a null row), with the base width (in steps of
    32, diffusers' GroupNorm groups) whose parameter count is closest to ours."""
    from diffusers import UNet2DModel

    class DiffusersUNet(nn.Module):
        """UNet2DModel behind the suite's model(x, t, y) call."""

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t, y):
            return self.net(x, t, class_labels=y).sample

    def build(base):
        levels = len(cfg.channel_mults)
        return UNet2DModel(sample_size=cfg.image_size, in_channels=3, out_channels=3,
                           block_out_channels=tuple(base * m for m in cfg.channel_mults),
                           layers_per_block=cfg.num_res_blocks, down_block_types=("DownBlock2D",) * levels,
                           up_block_types=("UpBlock2D",) * levels, add_attention=False,
                           num_class_embeds=NUM_CLASSES + 1, resnet_time_scale_shift="scale_shift",
                           dropout=cfg.dropout)

    def count(base):
        with torch.device("meta"):  # shapes only: no memory, no init
            return parameter_count(build(base))

    base = min(range(32, 257, 32), key=lambda b: abs(count(b) - target_params))
    net = build(base)
    return DiffusersUNet(net), {"block_out_channels": list(net.config.block_out_channels),
                                "layers_per_block": cfg.num_res_blocks}


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


# --- one model --------------------------------------------------------------------------------

def benchmark_model(name, cfg, device, s, network=None):
    print(f"{name} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    # Each model compiled afresh, as a training run compiles its one model: compile's caches are
    # per code object, so a second UNet size would otherwise get a dynamic-shape graph.
    torch._dynamo.reset()
    seed_everything(0)
    peak, _ = peak_flops(device, compute_dtype(device, cfg.amp))
    memory = PeakMemory(device)
    memory.start()
    stage, shape = make_stage(cfg, device, network)
    x, y = random_batch(cfg, shape, s.train_batch, device)
    seconds, all_seconds = time_per_call(lambda: stage.train_step(x, y, 0.0), device, warmup=s.warmup_steps,
                                         repeats=s.repeats, calls=s.steps_per_repeat)
    peak_mb = memory.read_mb()
    flops = training_flops_per_image(stage.model, shape, device)
    images_per_s = s.train_batch / seconds
    result = {
        "params": parameter_count(stage.model),
        "sample_shape": list(shape),
        "train": {"batch": s.train_batch, "seconds_per_step": seconds, "seconds_per_step_all": all_seconds,
                  "images_per_s": images_per_s, "images_per_s_best": s.train_batch / min(all_seconds),
                  "training_gflop_per_image": flops / 1e9, "peak_tflop_per_s": peak and peak / 1e12,
                  "achieved_tflop_per_s": flops * images_per_s / 1e12,
                  "mfu": flops * images_per_s / peak if peak else None,
                  "peak_memory_mb": peak_mb, "memory_kind": memory.kind()},
        "sampling": measure_sampling(stage, cfg, device, s),
    }
    del stage, x, y
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return result


def measure_sampling(stage, cfg, device, s):
    """Images/s of Pipeline.sample for each sampler and step count. With --quick, DDPM runs
    ddpm_steps steps and its 1000-step rate is extrapolated from the measured cost per step."""
    pipe = stage.pipeline()
    labels = torch.arange(s.sample_batch) % NUM_CLASSES
    pipe.sample(labels, sampler="ddim", steps=2)  # one-time costs (allocations, kernel choice)
    rows = []
    for sampler, steps in SAMPLERS:
        steps = min(steps, cfg.timesteps)  # the tiny preset's schedule has 100 steps, not 1000
        run_steps = min(s.ddpm_steps, steps) if sampler == "ddpm" else steps
        seconds, _ = time_per_call(lambda: pipe.sample(labels, sampler=sampler, steps=run_steps), device,
                                   warmup=0, repeats=s.sample_repeats)
        row = {"sampler": sampler, "steps": steps, "measured_steps": run_steps, "batch": s.sample_batch,
               "seconds_per_batch": seconds, "ms_per_step": 1000 * seconds / run_steps,
               "images_per_s": s.sample_batch / seconds}
        if run_steps != steps:  # per-step cost x 1000: the final decode is counted 1000/run_steps times
            row["images_per_s"] = None
            row["images_per_s_extrapolated"] = s.sample_batch / (seconds / run_steps * steps)
        rows.append(row)
    return {"guidance_scale": cfg.guidance_scale, "network_batch_per_step":
            s.sample_batch * (1 if cfg.guidance_scale == 1.0 else 2), "runs": rows}


# --- run and report ---------------------------------------------------------------------------

def print_table(report):
    rows = report["models"]
    if not rows:
        print("no model was benchmarked")
        for note in report["notes"]:
            print(f"note: {note}")
        return
    print(f"\n{report['device']}, torch {report['torch']}, commit {report['git_commit']}"
          f"{' (dirty)' if report['git_dirty'] else ''}, {report['compute_dtype']}; peak: {report['peak_source']}")
    print(f"{'model':<20}{'params M':>9}{'batch':>6}{'train img/s':>12}{'(best)':>8}{'GFLOP/img':>10}"
          f"{'TFLOP/s':>9}{'peak':>8}{'MFU %':>7}{'mem MB':>8}")
    for name, r in rows.items():
        t = r["train"]
        print(f"{name:<20}{r['params'] / 1e6:>9.2f}{t['batch']:>6}{t['images_per_s']:>12.3g}"
              f"{t['images_per_s_best']:>8.3g}{t['training_gflop_per_image']:>10.2f}"
              f"{t['achieved_tflop_per_s']:>9.3g}{fmt(t['peak_tflop_per_s'], '.3g'):>8}"
              f"{fmt(t['mfu'] and 100 * t['mfu'], '.1f'):>7}{fmt(t['peak_memory_mb'], '.0f'):>8}")
    first = next(iter(rows.values()))["sampling"]
    print(f"\nsampling images/s (ms per step), batch {first['runs'][0]['batch']}, guidance "
          f"{first['guidance_scale']} (network batch {first['network_batch_per_step']}); * = extrapolated")
    print(f"{'model':<20}" + "".join(f"{run['sampler'] + str(run['steps']):>16}" for run in first["runs"]))
    for name, r in rows.items():
        cells = []
        for run in r["sampling"]["runs"]:
            rate = run["images_per_s"] if run["images_per_s"] is not None else run["images_per_s_extrapolated"]
            star = "" if run["images_per_s"] is not None else "*"
            cells.append(f"{rate:.3g}{star} ({run['ms_per_step']:.0f})")
        print(f"{name:<20}" + "".join(f"{c:>16}" for c in cells))
    for note in report["notes"]:
        print(f"note: {note}")


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--out", help="JSON file (default bench/results/<device>-<date>[-<preset>][-quick].json)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and, on CPU, smaller batches; DDPM-1000 "
                                                         "extrapolated from 10 steps (CPU) or 100 (GPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the training model, not sampling (default: as training does, on CUDA only)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: torch's choice); on a busy "
                                               "machine 1 is far steadier than threads that wait on each other")
    p.add_argument("--models", help=f"comma-separated subset of {','.join(DENOISERS)},{REFERENCE}")
    p.add_argument("--train_batch", type=positive_int, help="training batch (default: the config's on CUDA; on CPUs 8 "
                                                   "with --quick, else 16)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="measure each model at this preset's sizes and precision (e.g. cpu: the CPU recipe's "
                        "widths in bf16) instead of its default size")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    notes = []
    requested = args.models.split(",") if args.models else [*DENOISERS, REFERENCE]
    unknown = set(requested) - {*DENOISERS, REFERENCE}
    if unknown:
        p.error(f"unknown --models {', '.join(sorted(unknown))}")
    out = Path(writable_output(args.out or REPO / "bench" / "results" / (
        f"{device.type}-{datetime.date.today().isoformat()}{'' if args.preset == 'default' else '-' + args.preset}"
        f"{'-quick' if args.quick else ''}.json")))
    config_for = lambda name: model_config(name, args.compile, args.preset)  # noqa: E731
    s = settings_for(device, args.quick, config_for("unet").batch_size, args.train_batch)
    dtype = compute_dtype(device, config_for("unet").amp)
    _, peak_source = peak_flops(device, dtype)
    commit, dirty = git_commit()
    report = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
              "git_commit": commit, "git_dirty": dirty, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name] + sys.argv), "settings": asdict(s),
              "compile": compile_wanted(args.compile, device), "preset": args.preset,
              "compute_dtype": str(dtype), "peak_source": peak_source,
              "load_average_start": os.getloadavg()[0], "models": {}, "notes": notes}

    save = lambda: out.write_text(json.dumps(report, indent=2) + "\n")  # noqa: E731

    def measure_reference():
        try:
            import diffusers
        except ImportError:
            notes.append(f"{REFERENCE} skipped: diffusers is not installed (pip install diffusers)")
            return
        cfg = config_for("unet")
        with torch.device("meta"):  # shapes only
            ours = parameter_count(build_denoiser(cfg, NUM_CLASSES, 3, cfg.image_size))
        network, layout = diffusers_reference(cfg, ours)
        result = benchmark_model(REFERENCE, cfg, device, s, network)
        result.update(diffusers_version=diffusers.__version__, matched_to="unet",
                      param_ratio_to_unet=result["params"] / ours, **layout)
        report["models"][REFERENCE] = result
        notes.append(f"{REFERENCE}: widths {layout['block_out_channels']}, {result['params'] / ours:.3f}x the "
                     f"parameters of our unet, same batch, loss, optimizer, EMA and sampler")

    for name in requested:  # in the order asked for: what a time limit cuts short is the last
        if name == REFERENCE:
            measure_reference()
        else:
            report["models"][name] = benchmark_model(name, config_for(name), device, s)
        save()  # after each model: a run stopped by a time limit keeps what it measured
    report["load_average_end"] = os.getloadavg()[0]
    # The load at the end counts this process's own threads; only what is beyond them is contention.
    busiest = max(report["load_average_start"], report["load_average_end"] - torch.get_num_threads())
    if device.type == "cpu" and busiest > (os.cpu_count() or 1) - 0.5:
        notes.append(f"the machine was busy (load average up to {busiest:.1f} besides this benchmark, on "
                     f"{os.cpu_count()} cores): CPU timings are contended and noisy")
    if device.type != "cuda":
        notes.append(f"CPU MFU is against a measured {dtype} matmul, not a datasheet peak; oneDNN convolutions "
                     "(which may use Winograd) can beat it, so MFU over 100% is possible")
    ddpm = next((r["sampling"]["runs"][-1] for r in report["models"].values()), None)
    if ddpm and ddpm["measured_steps"] != ddpm["steps"]:
        notes.append(f"ddpm{ddpm['steps']} is extrapolated from {ddpm['measured_steps']} measured steps "
                     f"(ms per step is measured)")

    save()
    print_table(report)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    sys.exit(run_main(main))
