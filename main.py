"""Train a stage: `python main.py --train_vae | --train_diffusion | --train_all | --train_classifier`."""
import argparse
import sys

from config import (SWITCH, ArgumentParser, add_common_args, add_sampling_args, build_config, model_of,
                    positive_int, refuse_unused_flags)
from diffusion.objective import LOSS_TERMS, LOSS_WEIGHTINGS, PREDICTIONS, TIMESTEP_SAMPLINGS
from diffusion.schedule import SCHEDULES
from errors import UserError, run_main
from models import LATENT_DENOISERS, TRANSFORMER_DENOISERS
from models.transformer import ATTENTION_KINDS
from training.optim import LR_SCHEDULES


def parse_args(argv=None):
    p = ArgumentParser(prog="main.py", description=__doc__)
    stage = p.add_mutually_exclusive_group(required=True)
    stage.add_argument("--train_vae", **SWITCH, help="train the VAE-GAN (latent models)")
    stage.add_argument("--train_diffusion", **SWITCH, help="train the conditional denoiser")
    stage.add_argument("--train_all", **SWITCH, help="VAE-GAN then denoiser (pixel models: denoiser)")
    stage.add_argument("--train_classifier", **SWITCH,
                       help="train the real-data classifier used by the offline metrics")
    p.add_argument("--epochs", type=positive_int, help="epochs of the stage being trained")
    p.add_argument("--vae_epochs", type=int, help="VAE-GAN epochs (with --train_all)")
    p.add_argument("--diffusion_epochs", type=int, help="denoiser epochs (with --train_all)")
    p.add_argument("--minutes", type=float, help="wall-clock budget of the stage being trained: it stops at the "
                                                 "last epoch boundary that fits, after at least one (--epochs stays "
                                                 "the cap; default 4 for the VAE, 16 for the denoiser, 9 and 11 at "
                                                 "64x64; 0: no budget)")
    p.add_argument("--vae_minutes", type=float, help="VAE-GAN budget in minutes (with --train_all; 0: none)")
    p.add_argument("--diffusion_minutes", type=float, help="denoiser budget in minutes (with --train_all; 0: none)")
    p.add_argument("--hflip", action=argparse.BooleanOptionalAction,
                   help="train on images and their mirror images (default; --no-hflip where left and right "
                        "differ)")
    p.add_argument("--lr", type=float, help="learning rate of the stage(s) being trained")
    p.add_argument("--resume", **SWITCH, help="continue the run in --results_dir from its last checkpoint")
    p.add_argument("--checkpoint_path", help="continue from this checkpoint (with --total_epochs)")
    p.add_argument("--total_epochs", type=positive_int, help="with --checkpoint_path: train until this many epochs")
    add_common_args(p)
    add_sampling_args(p)
    g = p.add_argument_group("VAE-GAN")
    g.add_argument("--latent_channels", type=int)
    g.add_argument("--vae_block_attention", action=argparse.BooleanOptionalAction,
                   help="channel + spatial attention in every VAE block (--no-vae_block_attention: only the "
                        "bottleneck self-attention, faster)")
    g.add_argument("--perceptual_weight", type=float, help="VGG16 perceptual loss weight (0: no VGG needed)")
    g.add_argument("--vgg_weights", help="path to torchvision's vgg16-397923af.pth")
    g.add_argument("--vae_grad_clip", type=float, help="VAE gradient-norm clip (0: off, the default)")
    g.add_argument("--vae_lr_schedule", choices=LR_SCHEDULES,
                   help="VAE learning rate: cosine (default), down to 0 over --vae_epochs (with --train_vae, "
                        "--epochs), or constant")
    g.add_argument("--vae_res_blocks", type=int, help="residual blocks per VAE encoder level (the decoder has one "
                                                      "more; default 0)")
    g.add_argument("--kl_weight", type=float)
    g.add_argument("--kl_start_epoch", type=int, help="stage schedule: each loss weight ramps linearly from 0 "
                                                      "at its start epoch to full over its ramp epochs")
    g.add_argument("--kl_warmup_epochs", type=int)
    g.add_argument("--classifier_weight", type=float)
    g.add_argument("--center_weight", type=float)
    g.add_argument("--repulsion_weight", type=float, help="push class centers apart (0: off)")
    g.add_argument("--class_loss_start_epoch", type=int)
    g.add_argument("--class_loss_ramp_epochs", type=int)
    g.add_argument("--adv_weight", type=float, help="adversarial loss weight (0: no discriminator)")
    g.add_argument("--adv_start_epoch", type=int)
    g.add_argument("--adv_ramp_epochs", type=int)
    g = p.add_argument_group("denoiser")
    g.add_argument("--base_channels", type=int, help="UNet width")
    g.add_argument("--attention", choices=ATTENTION_KINDS,
                   help="transformer attention (default softmax for latent_transformer, linear for transformer)")
    g.add_argument("--transformer_width", type=int)
    g.add_argument("--transformer_depth", type=int)
    g.add_argument("--patch_size", type=int)
    g.add_argument("--schedule", choices=SCHEDULES,
                   help="noise schedule (default cosine; edm: EDM's log-normal training noise levels)")
    g.add_argument("--timesteps", type=int)
    g.add_argument("--prediction", choices=PREDICTIONS)
    g.add_argument("--loss_weighting", choices=LOSS_WEIGHTINGS)
    g.add_argument("--label_dropout", type=float, help="null-label probability for guidance (default 0.1)")
    g.add_argument("--loss", choices=LOSS_TERMS,
                   help="mse, or S2's balanced loss (MSE, L1, cosine, Laplacian, Sobel by noise level)")
    g.add_argument("--timestep_sampling", choices=TIMESTEP_SAMPLINGS,
                   help="adaptive: importance-sample noise levels by their loss")
    g.add_argument("--patience", type=int, help="early stopping: held-out evaluations (each epoch, or each "
                                                "--eval_every) without a better metric (default 10; 0 never stops)")
    g.add_argument("--ema_decay", type=float)
    g.add_argument("--warmup_steps", type=int, help="denoiser lr: linear warm-up over this many steps")
    g.add_argument("--lr_schedule", choices=LR_SCHEDULES,
                   help="denoiser lr after the warm-up: constant (default) or cosine, down to 0 over "
                        "--diffusion_epochs (with --train_diffusion, --epochs)")
    g.add_argument("--weight_decay", type=float)
    g.add_argument("--dropout", type=float)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_every", type=int, help="epochs between offline sample metrics during training (0: off)")
    g.add_argument("--eval_samples", type=int, help="samples per evaluation during training (default 500)")
    g.add_argument("--classifier_path", help="real-data classifier checkpoint for the offline metrics")
    g.add_argument("--classifier_width", type=int, help="--train_classifier: ResNet width (default 64)")
    g = p.add_argument_group("engineering")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the denoiser's training model (default: on CUDA only)")
    g.add_argument("--picture_every", type=int, help="epochs between periodic pictures")
    g.add_argument("--checkpoint_every", type=int, help="epochs between checkpoints")
    g.add_argument("--log_every", type=int, help="steps between loss read-outs")
    return p.parse_args(argv)


# What each stage reads, so that a flag no stage of the command reads is refused rather than
# written unused into the run's config.json. The classifier: these beside the shared flags.
COMMON_FLAGS = set(vars(add_common_args(argparse.ArgumentParser()).parse_args([])))
CLASSIFIER_FLAGS = {"train_classifier", "epochs", "lr", "resume", "hflip", "classifier_width", "picture_every",
                    "checkpoint_every", "log_every", "classifier_epochs", "classifier_lr", "classifier_batch_size"}
# Read by the VAE-GAN stage alone, and by the denoiser stage alone (its sampling flags set the
# run's pictures and sampling defaults); --latent_channels both (the denoiser's must match its VAE).
VAE_FLAGS = {"vae_block_attention", "perceptual_weight", "vgg_weights", "vae_grad_clip", "vae_lr_schedule",
             "vae_res_blocks", "kl_weight", "kl_start_epoch", "kl_warmup_epochs", "classifier_weight", "center_weight",
             "repulsion_weight", "class_loss_start_epoch", "class_loss_ramp_epochs", "adv_weight", "adv_start_epoch",
             "adv_ramp_epochs", "vae_epochs", "vae_minutes"}
DENOISER_FLAGS = {"base_channels", "attention", "transformer_width", "transformer_depth", "patch_size", "schedule",
                  "timesteps", "prediction", "loss_weighting", "label_dropout", "loss", "timestep_sampling", "patience",
                  "ema_decay", "warmup_steps", "lr_schedule", "weight_decay", "dropout", "eval_every", "eval_samples",
                  "classifier_path", "compile", "diffusion_epochs", "diffusion_minutes", "sampler", "steps",
                  "guidance_scale", "guidance_schedule", "guidance_interval"}
# Of those, the architecture flags one family of denoisers reads and the other does not.
UNET_FLAGS = {"base_channels"}
TRANSFORMER_FLAGS = {"attention", "transformer_width", "transformer_depth", "patch_size"}


def refuse_flags_no_stage_reads(args, stage, model=None):
    """stage: the --train_* flag of what runs; model: the denoiser it builds (None: resuming a run,
    whose saved config refuses any architecture flag that differs from it)."""
    if stage == "--train_classifier":
        refuse_unused_flags(args, CLASSIFIER_FLAGS, set(vars(args)) - COMMON_FLAGS, stage)
        return
    other_stage = {"--train_vae": DENOISER_FLAGS, "--train_diffusion": VAE_FLAGS}.get(stage, set())
    refuse_unused_flags(args, (), other_stage | {"classifier_width"}, stage)
    if model is not None:
        other_family = UNET_FLAGS if model in TRANSFORMER_DENOISERS else TRANSFORMER_FLAGS
        no_vae = VAE_FLAGS | {"latent_channels"} if model not in LATENT_DENOISERS else set()
        refuse_unused_flags(args, (), other_family | no_vae, f"--model {model}")


def stage_flag(args):
    return next(f"--{name}" for name in ("train_vae", "train_diffusion", "train_all", "train_classifier")
                if getattr(args, name))


def stage_overrides(args):
    """--epochs / --lr / --batch_size apply to the stage being trained."""
    if args.epochs is not None:
        if args.train_vae:
            args.vae_epochs = args.epochs
        elif args.train_diffusion:
            args.diffusion_epochs = args.epochs
        elif args.train_all:
            raise UserError("with --train_all, use --vae_epochs and --diffusion_epochs")
    if args.minutes is not None:
        if args.train_vae:
            args.vae_minutes = args.minutes
        elif args.train_diffusion:
            args.diffusion_minutes = args.minutes
        else:
            raise UserError("--minutes budgets --train_vae or --train_diffusion; with --train_all use --vae_minutes "
                            "and --diffusion_minutes")
    if args.lr is not None and (args.train_vae or args.train_all):
        args.vae_lr = args.lr
    if args.batch_size is not None and (args.train_vae or args.train_all):
        args.vae_batch_size = args.batch_size
    if args.train_classifier:
        for flag, field in (("epochs", "classifier_epochs"), ("lr", "classifier_lr"),
                            ("batch_size", "classifier_batch_size")):
            if getattr(args, flag) is not None:
                setattr(args, field, getattr(args, flag))
    if (args.checkpoint_path is None) != (args.total_epochs is None):
        raise UserError("--checkpoint_path and --total_epochs go together")
    if args.checkpoint_path and args.resume:
        raise UserError("--resume continues the run in --results_dir, --checkpoint_path a given checkpoint: "
                        "give one of them")
    return args


def main(argv=None):
    from training import distributed, runner
    args = stage_overrides(parse_args(argv))
    distributed.check_environment()  # torchrun's variables left in a shell: refused before any work
    stage = stage_flag(args)
    if args.checkpoint_path:  # the stage continued is the checkpoint's own (--train_all: either)
        cfg, kind = runner.config_for_resume(args, args.checkpoint_path, with_kind=True)
        train = {"vae_gan": runner.train_vae, "conditional_diffusion": runner.train_diffusion}.get(kind)
        if train is None:
            raise UserError(f"{args.checkpoint_path} holds a {kind} checkpoint; --checkpoint_path continues a "
                            f"vae_gan or conditional_diffusion one (continue a classifier with --train_classifier "
                            f"--resume)")
        own = "--train_vae" if kind == "vae_gan" else "--train_diffusion"
        if stage not in (own, "--train_all"):
            raise UserError(f"{args.checkpoint_path} holds a {kind} checkpoint: continue it with {own}")
        refuse_flags_no_stage_reads(args, own, cfg.model)
        train(cfg, checkpoint_path=args.checkpoint_path, total_epochs=args.total_epochs)
        return 0
    refuse_flags_no_stage_reads(args, stage, None if args.resume else model_of(args.model, args.preset))
    if args.train_classifier:
        if args.results_dir is None:  # its own folder, also when resuming
            from training.classifier import default_classifier_dir
            args.results_dir = default_classifier_dir(build_config(args))
    if args.resume:  # continue with the run's own config (only runtime fields may change)
        stages = (["vae_gan_last.pt"] if args.train_vae or args.train_all else []) + \
                 (["conditional_diffusion_last.pt"] if args.train_diffusion or args.train_all else []) + \
                 (["classifier_last.pt"] if args.train_classifier else [])
        cfg = runner.config_for_saved_run(args, stages)
        refuse_flags_no_stage_reads(args, stage, cfg.model)  # now that the run's model is known
        stage_config = lambda name: runner.config_for_saved_run(args, stages, name)  # noqa: E731
    else:
        cfg = build_config(args)
        stage_config = lambda name: cfg  # noqa: E731
    if args.train_classifier:
        from training.classifier import train_classifier
        train_classifier(stage_config("classifier_last.pt"), resume=args.resume)
        return 0
    if (args.train_vae or args.train_all) and cfg.is_latent:
        runner.train_vae(stage_config("vae_gan_last.pt"), resume=args.resume)
    elif args.train_vae:
        raise UserError(f"--model {cfg.model} works in pixel space and has no VAE; use --train_diffusion")
    if args.train_diffusion or args.train_all:
        runner.train_diffusion(stage_config("conditional_diffusion_last.pt"), resume=args.resume)
    return 0


def main_and_teardown(argv=None):
    from training import distributed
    try:
        status = main(argv)
    except BaseException:
        distributed.teardown(finished=False)
        raise
    distributed.teardown()
    return status


if __name__ == "__main__":
    sys.exit(run_main(main_and_teardown))
