"""The side-by-side contender: diffusers' own training example (examples/unconditional_image_generation),
made class-conditional, trained for a wall-clock budget and scored with the suite's offline metrics.

What the example does and this script keeps: `UNet2DModel` + `DDPMScheduler` (1000 linear-beta steps,
epsilon prediction, plain MSE), AdamW (lr 1e-4, betas 0.95/0.999, weight decay 1e-6, eps 1e-8), 500
warm-up steps then cosine decay, diffusers' `EMAModel` with warm-up (inv_gamma 1, power 3/4, max decay
0.9999), random horizontal flips, batch 64 (its train.sh), fp32. What changes: the class label goes in
through `num_class_embeds` (the example is unconditional); the cosine decay ends where the budget ends
(its length is fitted, when the warm-up ends, to the pace since step 20); images come from the suite's data path;
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

from config import DEVICES, ArgumentParser, Config, positive_int, validate, write_json  # noqa: E402
from errors import UserError, run_main  # noqa: E402
from data import load_dataset, to_uint8  # noqa: E402
from data.batcher import DeviceBatcher  # noqa: E402
from evaluation.evaluate import (OfflineMetrics, balanced_labels, check_sample_count,  # noqa: E402
                                 load_real_classifier)
from training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from training.loop import rng_state, select_device, set_rng_state  # noqa: E402
from training.run import commit_label, device_name  # noqa: E402
from viz.figures import save_grid  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="folder")
    p.add_argument("--data_root", required=True)
    p.add_argument("--out", required=True, help="folder for eval.json and the sample grid")
    p.add_argument("--minutes", type=float, default=20.0, help="training budget (wall clock)")
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup_steps", type=int, default=500)
    p.add_argument("--block_out_channels", default="32,64,64", help="UNet2DModel widths per level")
    p.add_argument("--attention_levels", default="1", help="levels with AttnDownBlock2D/AttnUpBlock2D")
    p.add_argument("--layers_per_block", type=positive_int, default=2)
    p.add_argument("--scheduler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--sample_steps", type=positive_int, default=50)
    p.add_argument("--num_samples", type=positive_int, default=2000)
    p.add_argument("--classifier_path", help="real-data classifier (default: the suite's usual place)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--segment_minutes", type=float,
                   help="stop training after this many minutes of this command, saving its state for --resume")
    p.add_argument("--resume", action="store_true", help="go on training from <out>/train_state.pt")
    p.add_argument("--stage", choices=("all", "train", "score"), default="all",
                   help="train writes <out>/model.pt (the EMA weights and the training log), score reads it: "
                        "a budget and its scoring can run as two commands")
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


def train(args, model, batcher, scheduler, device, state_path):
    """The example's loop for `--minutes` of training, counted across segments: with `--segment_minutes`
    it stops after that long, saves its whole state to `state_path` and returns None, and `--resume`
    goes on from there (a device that limits each command's time can then give it the full budget)."""
    from diffusers.training_utils import EMAModel
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    progress = dict(step=0, epoch=0, batch_in_epoch=0, elapsed=0.0, total_steps=None, losses=[])
    if args.resume:
        saved = load_checkpoint(state_path, "the contender's training state (nothing to --resume)")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        ema.load_state_dict(saved["ema"])
        ema.to(device)  # loaded on the CPU, and EMAModel keeps its averages where they are
        progress.update(saved["progress"])
        set_rng_state(saved["rng"])
    budget, start = 60 * args.minutes, time.time() - progress["elapsed"]
    segment_end = time.time() + 60 * args.segment_minutes if args.segment_minutes else math.inf
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step, epoch, losses, paced_from = progress["step"], progress["epoch"], progress["losses"], None
    bar = tqdm(desc="diffusers recipe", unit="step", initial=step)
    while time.time() - start < budget:
        for i, (x, y) in enumerate(batcher.epoch(epoch)):
            if i < progress["batch_in_epoch"]:  # resumed inside this epoch: its order is the same
                continue
            if time.time() - start >= budget:
                break
            if time.time() >= segment_end:
                progress.update(step=step, epoch=epoch, batch_in_epoch=i, elapsed=time.time() - start, losses=losses)
                save_checkpoint({"kind": "diffusers_contender_state", "config": vars(args), "model": model.state_dict(),
                                 "opt": opt.state_dict(), "ema": ema.state_dict(), "progress": progress,
                                 "rng": rng_state()}, state_path)
                bar.close()
                return None
            if step == progress["step"] + 20:  # the pace is timed from here, past one-off start-up costs
                synchronize()
                paced_from = (step, time.time())
            if (progress["total_steps"] is None and step >= max(args.warmup_steps, 50) and paced_from
                    and step >= paced_from[0] + 20):
                synchronize()  # the cosine decay starts: make it end with the budget, at the pace so far
                now = time.time()
                progress["total_steps"] = step + int((budget - (now - start)) * (step - paced_from[0])
                                                     / (now - paced_from[1]))
            lr_scale = cosine_with_warmup(step, args.warmup_steps, progress["total_steps"] or 10 ** 9)
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
        progress["batch_in_epoch"] = 0
        epoch += 1
    bar.close()
    ema.copy_to(model.parameters())
    return {"steps": step, "epochs_started": epoch, "train_seconds": time.time() - start,
            "planned_steps": progress["total_steps"], "loss_every_50_steps": losses}


def check_trained_classes(saved, class_names, path):
    """A model scored on data of other classes would not fit its class embedding, or, with as many
    classes, be scored against other classes under the same labels."""
    trained = saved.get("class_names")
    if trained is not None:
        same, what = list(trained) == list(class_names), ", ".join(trained)
    else:  # a model.pt from before the names were saved: its class embedding tells how many there were
        count = len(saved["model"]["class_embedding.weight"])
        same, what = count == len(class_names), f"{count} classes"
    if not same:
        raise UserError(f"{path} was trained on {what}, not this data's {', '.join(class_names)}: score it "
                        f"with the --data_root it was trained on")


def class_rows(images, labels, num_classes, per_class=8):
    """The first `per_class` images of each class, one row per class; a class with fewer samples
    is padded with white so that every row stays one class."""
    rows = [images[labels == c][:per_class] for c in range(num_classes)]
    width = max(len(r) for r in rows)
    blank = torch.full_like(images[:1], 255)
    return torch.cat([torch.cat([r, blank.expand(width - len(r), -1, -1, -1)]) for r in rows]), width


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
    torch.manual_seed(args.seed)
    device = select_device(args.device)
    cfg = validate(Config(dataset=args.dataset, data_root=args.data_root, results_dir=args.out, seed=args.seed))
    train_set = load_dataset(cfg.dataset, cfg.data_root, "train", cfg.image_size, val_fraction=cfg.val_fraction)
    num_classes = len(train_set.class_names)
    check_sample_count(args.num_samples, num_classes, "scoring the contender")  # before the budget is spent
    try:
        import diffusers
        from diffusers import DDPMScheduler
    except ImportError:
        raise UserError("diffusers is not installed: `pip install diffusers` (only this contender needs it)") from None
    model_path = os.path.join(args.out, "model.pt")
    if args.stage == "score":
        saved = load_checkpoint(model_path, "the contender's trained model (run --stage train first)")
        if saved["kind"] != "diffusers_contender":
            raise UserError(f"{model_path} is a {saved['kind']} checkpoint, not this contender's")
        check_trained_classes(saved, train_set.class_names, model_path)
        trained_args = argparse.Namespace(**saved["config"])
        model = build_unet(trained_args, cfg.image_size, num_classes).to(device)
        model.load_state_dict(saved["model"])
        log = saved["log"]
    else:
        model = build_unet(args, cfg.image_size, num_classes).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    # The scorer first: a missing classifier should fail now, not after the whole budget.
    metrics = None if args.stage == "train" else OfflineMetrics(
        load_real_classifier(cfg, device, args.classifier_path), cfg, device, num_classes)
    if args.stage != "score":
        batcher = DeviceBatcher(train_set.images, train_set.labels, args.batch_size, device, flip=True, seed=args.seed)
        os.makedirs(args.out, exist_ok=True)
        state_path = os.path.join(args.out, "train_state.pt")
        log = train(args, model, batcher, scheduler, device, state_path)
        if log is None:
            print(f"saved {state_path} after this segment; go on with the same command plus --resume")
            return 0
        save_checkpoint({"kind": "diffusers_contender", "config": vars(args), "model": model.state_dict(),
                         "class_names": train_set.class_names, "log": log}, model_path)
        if args.stage == "train":
            print(f"wrote {model_path}; score it with --stage score")
            return 0
    model.eval()
    labels = balanced_labels(args.num_samples, num_classes)
    t0 = time.time()
    images = sample(args, model, scheduler, labels, cfg.image_size, device)
    sampling_seconds = time.time() - t0
    result = {"recipe": "diffusers train_unconditional example, class-conditional",
              "diffusers_version": diffusers.__version__, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
              "args": vars(args), "device": device_name(device), "commit": commit_label(),
              "num_samples": args.num_samples, "sampling_seconds": sampling_seconds, "class_names": train_set.class_names,
              **log}
    if args.stage == "score":
        result["training_args"] = saved["config"]  # the budget, widths and seed it was trained with
    result.update(metrics(images, labels), classifier=metrics.classifier.checkpoint_path)
    os.makedirs(args.out, exist_ok=True)
    write_json(result, os.path.join(args.out, "eval.json"))  # first: the scores outlive a failed picture
    grid, width = class_rows(images, labels, num_classes)
    save_grid(grid, os.path.join(args.out, "samples_grid.png"), nrow=width)
    print(json.dumps({k: result[k] for k in ("params_m", "steps", "sample_accuracy", "classifier_fd",
                                             "classifier_kid")}, indent=1))


if __name__ == "__main__":
    sys.exit(run_main(main))
