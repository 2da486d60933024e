"""The side-by-side contender: diffusers' own training example (examples/unconditional_image_generation),
made class-conditional, trained for a wall-clock budget and scored with the suite's offline metrics.

What the example does and this script keeps: `UNet2DModel` + `DDPMScheduler` (1000 linear-beta steps,
epsilon prediction, plain MSE), AdamW (lr 1e-4, betas 0.95/0.999, weight decay 1e-6, eps 1e-8), 500
warm-up steps then cosine decay, diffusers' `EMAModel` with warm-up (inv_gamma 1, power 3/4, max decay
0.9999), random horizontal flips, batch 64 (its train.sh), fp32. What changes: the class label goes in
through `num_class_embeds` (the example is unconditional); the cosine decay ends where the budget ends
(its length is estimated from the speed of the first steps); images come from the suite's data path;
and sampling uses diffusers' `DDIMScheduler` at `--sample_steps` unless `--scheduler ddpm` (the example
samples 1000 DDPM steps, which 2000 images cannot afford on a CPU).

    python bench/diffusers_recipe.py --data_root ../shared/data/cifar10-catdog --minutes 20 --out results/diffusers_recipe

diffusers is needed here only (`pip install diffusers`); it is not in requirements.txt.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import Config, validate  # noqa: E402
from errors import UserError, run_main  # noqa: E402
from data import load_dataset, to_uint8  # noqa: E402
from data.batcher import DeviceBatcher  # noqa: E402
from evaluation.evaluate import OfflineMetrics, balanced_labels, load_real_classifier  # noqa: E402
from training.run import device_name, git_commit  # noqa: E402
from viz.figures import save_grid  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="folder")
    p.add_argument("--data_root", required=True)
    p.add_argument("--out", required=True, help="folder for eval.json and the sample grid")
    p.add_argument("--minutes", type=float, default=20.0, help="training budget (wall clock)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup_steps", type=int, default=500)
    p.add_argument("--block_out_channels", default="32,64,64", help="UNet2DModel widths per level")
    p.add_argument("--attention_levels", default="1", help="levels with AttnDownBlock2D/AttnUpBlock2D")
    p.add_argument("--layers_per_block", type=int, default=2)
    p.add_argument("--scheduler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--sample_steps", type=int, default=50)
    p.add_argument("--num_samples", type=int, default=2000)
    p.add_argument("--classifier_path", help="real-data classifier (default: the suite's usual place)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def build_unet(args, image_size, num_classes):
    from diffusers import UNet2DModel
    widths = tuple(int(w) for w in args.block_out_channels.split(","))
    attn = {int(i) for i in args.attention_levels.split(",") if i != ""}
    down = tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(len(widths)))
    up = tuple("AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(len(widths))))
    return UNet2DModel(sample_size=image_size, in_channels=3, out_channels=3, layers_per_block=args.layers_per_block,
                       block_out_channels=widths, down_block_types=down, up_block_types=up,
                       norm_num_groups=min(32, widths[0]), num_class_embeds=num_classes)


def cosine_with_warmup(step, warmup, total):
    """The example's default lr schedule (diffusers' get_cosine_schedule_with_warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train(args, model, batcher, scheduler, device):
    from diffusers.training_utils import EMAModel
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    budget, start, step, total_steps, losses = 60 * args.minutes, time.time(), 0, None, []
    bar = tqdm(desc="diffusers recipe", unit="step")
    epoch = 0
    while time.time() - start < budget:
        for x, y in batcher.epoch(epoch):
            if time.time() - start >= budget:
                break
            if step == 50:  # the cosine decay should end with the budget: estimate the steps it holds
                total_steps = int(budget / ((time.time() - start) / 50))
            lr_scale = cosine_with_warmup(step, args.warmup_steps, total_steps or 10 ** 9)
            for group in opt.param_groups:
                group["lr"] = args.lr * lr_scale
            noise = torch.randn_like(x)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x),), device=device)
            noisy = scheduler.add_noise(x, noise, t)
            loss = F.mse_loss(model(noisy, t, class_labels=y).sample.float(), noise.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # as the example clips
            opt.step()
            ema.step(model.parameters())
            step += 1
            bar.update(1)
            if step % 50 == 0:
                losses.append((step, float(loss)))
                bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
        epoch += 1
    bar.close()
    ema.copy_to(model.parameters())
    return {"steps": step, "epochs_started": epoch, "train_seconds": time.time() - start,
            "planned_steps": total_steps, "loss_every_50_steps": losses}


@torch.inference_mode()
def sample(args, model, train_scheduler, labels, image_size, device, batch=250):
    from diffusers import DDIMScheduler, DDPMScheduler
    cls = DDIMScheduler if args.scheduler == "ddim" else DDPMScheduler
    scheduler = cls.from_config(train_scheduler.config)
    scheduler.set_timesteps(args.sample_steps if args.scheduler == "ddim" else train_scheduler.config.num_train_timesteps)
    out = []
    for i in tqdm(range(0, len(labels), batch), desc="sampling"):
        g = torch.Generator(device="cpu").manual_seed(args.seed + i)
        y = labels[i:i + batch].to(device)
        x = torch.randn((len(y), 3, image_size, image_size), generator=g).to(device)
        for t in scheduler.timesteps:
            eps = model(x, t, class_labels=y).sample
            x = scheduler.step(eps, t, x, generator=g).prev_sample
        out.append(to_uint8(x.cpu()))
    return torch.cat(out)


def main(argv=None):
    args = parse_args(argv)
    try:
        import diffusers
        from diffusers import DDPMScheduler
    except ImportError:
        raise UserError("diffusers is not installed: `pip install diffusers` (only this contender needs it)") from None
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    cfg = validate(Config(dataset=args.dataset, data_root=args.data_root, results_dir=args.out, seed=args.seed))
    train_set = load_dataset(cfg.dataset, cfg.data_root, "train", cfg.image_size, val_fraction=cfg.val_fraction)
    num_classes = len(train_set.class_names)
    model = build_unet(args, cfg.image_size, num_classes).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    batcher = DeviceBatcher(train_set.images, train_set.labels, args.batch_size, device, flip=True, seed=args.seed)
    log = train(args, model, batcher, scheduler, device)
    model.eval()
    labels = balanced_labels(args.num_samples, num_classes)
    t0 = time.time()
    images = sample(args, model, scheduler, labels, cfg.image_size, device)
    sampling_seconds = time.time() - t0
    classifier = load_real_classifier(cfg, device, args.classifier_path)
    result = {"recipe": "diffusers train_unconditional example, class-conditional",
              "diffusers_version": diffusers.__version__, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
              "args": vars(args), "device": device_name(device), "commit": git_commit()[0],
              "num_samples": args.num_samples, "sampling_seconds": sampling_seconds, "class_names": train_set.class_names,
              **log}
    result.update(OfflineMetrics(classifier, cfg, device, num_classes)(images, labels))
    os.makedirs(args.out, exist_ok=True)
    per_class = torch.stack([images[labels == c][:8] for c in range(num_classes)]).flatten(0, 1)
    save_grid(per_class, os.path.join(args.out, "samples_grid.png"), nrow=8)
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("params_m", "steps", "sample_accuracy", "classifier_fd",
                                             "classifier_kid")}, indent=1))


if __name__ == "__main__":
    sys.exit(run_main(main))
