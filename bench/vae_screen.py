"""A quick screen of VAE training settings at a fixed wall-clock budget: trains the suite's
AttentionVAE on L1 (+ the tiny KL, optional latent classifier loss) for `--seconds` and prints the
held-out PSNR of the posterior mean's reconstruction. Cheaper than a full `main.py --train_vae`
run (no discriminator, no checkpoints, no pictures), for ranking settings before a real run.

    python bench/vae_screen.py --data_root ../shared/data/cifar10-catdog --seconds 120 --batch_size 16 \
        --res_blocks 0 --lr_decay
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ArgumentParser, positive_int  # noqa: E402
from errors import UserError, run_main  # noqa: E402
from data import load_dataset, to_float  # noqa: E402
from data.batcher import DeviceBatcher  # noqa: E402
from models.vae import AttentionVAE  # noqa: E402
from training.optim import lr_factor, make_ema, update_ema  # noqa: E402
from training.vae_gan import kl_divergence  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="folder")
    p.add_argument("--data_root", required=True)
    p.add_argument("--seconds", type=float, default=75)
    p.add_argument("--batch_size", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--betas", default="0.5,0.9")
    p.add_argument("--grad_clip", type=float, default=0.0, help="0: off")
    p.add_argument("--base_channels", type=int, default=32)
    p.add_argument("--channel_mults", default="1,2,2")
    p.add_argument("--latent_channels", type=int, default=8)
    p.add_argument("--res_blocks", type=int, default=1, help="residual blocks per encoder level")
    p.add_argument("--block_attention", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--ema", type=float, default=0.0, help="score an EMA of the weights with this decay (0: off)")
    p.add_argument("--lr_decay", action="store_true",
                   help="cosine decay of the lr to 0 over the time budget (by elapsed time)")
    p.add_argument("--deterministic", action="store_true", help="decode the posterior mean, not a sample")
    p.add_argument("--mse", action="store_true", help="add an MSE term to the L1 loss")
    p.add_argument("--classifier_weight", type=float, default=0.0)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.channel_mults = tuple(int(m) for m in args.channel_mults.split(","))
    except ValueError:
        raise UserError(f"--channel_mults: {args.channel_mults!r} is not comma-separated integers") from None
    try:
        args.betas = tuple(float(b) for b in args.betas.split(","))
    except ValueError:
        raise UserError(f"--betas: {args.betas!r} is not two comma-separated numbers") from None
    checks = [
        (math.isfinite(args.lr) and args.lr > 0, f"--lr must be a positive number, got {args.lr}"),
        (len(args.betas) == 2 and all(0 <= b < 1 for b in args.betas),
         f"--betas must be two numbers in [0, 1), got {args.betas}"),
        (0 < args.seconds < math.inf, f"--seconds must be positive, got {args.seconds}"),
        (min(args.channel_mults) >= 1 and min(args.base_channels, args.latent_channels) >= 1,
         "--channel_mults, --base_channels and --latent_channels must be positive"),
        (args.res_blocks >= 0, f"--res_blocks must not be negative, got {args.res_blocks}"),
        (0 <= args.ema < 1, f"--ema must be in [0, 1) (0: off), got {args.ema}"),
        (0 <= args.grad_clip < math.inf and 0 <= args.classifier_weight < math.inf,
         "--grad_clip and --classifier_weight must be finite and not negative"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train = load_dataset(args.dataset, args.data_root, "train", image_size=32, val_fraction=0.1)
    val = load_dataset(args.dataset, args.data_root, "val", image_size=32, val_fraction=0.1)
    vae = AttentionVAE(base_channels=args.base_channels, channel_mults=args.channel_mults,
                       latent_channels=args.latent_channels, num_classes=len(train.class_names),
                       num_res_blocks=args.res_blocks, block_attention=args.block_attention)
    ema = make_ema(vae, args.ema) if args.ema else None
    opt = torch.optim.AdamW(vae.parameters(), args.lr, betas=args.betas, weight_decay=0.0)
    batcher = DeviceBatcher(train.images, train.labels, args.batch_size, torch.device("cpu"), flip=True, seed=args.seed)
    start, step, epoch = time.time(), 0, 0
    while time.time() - start < args.seconds:
        for x, y in batcher.epoch(epoch):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                mean, logvar = vae.encode(x)
                z = mean if args.deterministic else mean + torch.randn_like(mean) * (0.5 * logvar).exp()
                recon = vae.decode(z).float()
                loss = (recon - x).abs().mean() + 1e-6 * kl_divergence(mean.float(), logvar.float())
                if args.mse:
                    loss = loss + (recon - x).pow(2).mean()
                if args.classifier_weight:
                    loss = loss + args.classifier_weight * F.cross_entropy(vae.classify(mean).float(), y)
            opt.zero_grad()
            loss.backward()
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(vae.parameters(), args.grad_clip)
            if args.lr_decay:
                done = min(1.0, (time.time() - start) / args.seconds)
                for group in opt.param_groups:
                    group["lr"] = args.lr * lr_factor("cosine", done)
            opt.step()
            if ema is not None:
                update_ema(ema, vae)
            step += 1
            if time.time() - start >= args.seconds:
                break
        epoch += 1
    if ema is not None:
        vae = ema.module
    vae.eval()
    with torch.no_grad():
        x = to_float(val.images[:1000])
        recon = vae(x, sample=False)[0].clamp(-1, 1)
        psnr = (-10 * torch.log10(((recon - x) / 2).pow(2).flatten(1).mean(1))).mean()
    params = sum(p.numel() for p in vae.parameters()) / 1e6
    print(f"{params:.2f}M parameters, {step} steps of {args.batch_size} in {time.time() - start:.0f} s: "
          f"held-out PSNR {psnr:.2f} dB")


if __name__ == "__main__":
    sys.exit(run_main(main))
