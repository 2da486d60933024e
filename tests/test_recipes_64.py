"""The 64x64 recipes (celeba_smiling in both layouts, flowers102) end to end on CPU with --preset
tiny: train, generate, visualize with the S5 output names and file-safe class names; the S3 stage
schedule of the recipes; and continuing a run with --checkpoint_path P --total_epochs N exactly as
an uninterrupted run would have gone on (in-process: main(argv) is what `python X.py` runs)."""
import math
import os
import shutil

import imageio.v2 as imageio
import pytest
import torch

import generate
import main
import visualize
from config import PRESETS, Config, build_config
from data import safe_name
from errors import UserError
from training.checkpoint import load_checkpoint
from training.run import Run
from training.vae_gan import loss_weights

# A constant VAE lr: the default cosine spans --vae_epochs, so continuing a 1-epoch run to 2 epochs
# (--total_epochs) would follow another schedule than a 2-epoch run (its own test: test_reliability).
VAE_ONLY, DENOISER_ONLY = ["--vae_lr_schedule", "constant"], ["--steps", "5"]  # the other stage refuses them
TINY = ["--preset", "tiny", "--device", "cpu", *VAE_ONLY, *DENOISER_ONLY]
SEED = 3
S5_NAMES = ("vae_gan_best.pt", "vae_gan_last.pt", "conditional_diffusion_final.pt", "autoencoder_losses.png",
            "diffusion_loss.png", "vae_samples_grid_subset.png", "config.json", "metrics.csv")
FLOWER, FLOWER_SAFE = "pink primrose", "pink_primrose"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, two threads spin-wait on each other (4-10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def celeba_args(root, results_dir, *extra, stage=None):
    """The run's flags for --train_all, or for one stage ("vae" or "denoiser") without the other's."""
    tiny = [*TINY[:4], *(VAE_ONLY if stage != "denoiser" else []), *(DENOISER_ONLY if stage != "vae" else [])]
    return ["--dataset", "celeba_smiling", "--data_root", str(root), "--results_dir", str(results_dir),
            "--seed", str(SEED), "--batch_size", "4", *tiny, *extra]


def train_all(args, epochs=2):
    assert main.main(["--train_all", "--vae_epochs", str(epochs), "--diffusion_epochs", str(epochs)] + args) == 0


@pytest.fixture(scope="module")
def celeba_run(tmp_path_factory, celeba_root):
    """Official layout, Smiling: 12 train images, batch 4, 2 + 2 epochs (every stage switched on)."""
    run = tmp_path_factory.mktemp("celeba_official") / "run"
    train_all(celeba_args(celeba_root, run))
    return run


@pytest.fixture(scope="module")
def celeba_kaggle_run(tmp_path_factory, celeba_kaggle_root):
    """Kaggle layout with another attribute (--attribute Wearing_Hat): 1 + 1 epochs."""
    run = tmp_path_factory.mktemp("celeba_kaggle") / "run"
    train_all(celeba_args(celeba_kaggle_root, run, "--attribute", "Wearing_Hat"), epochs=1)
    return run


@pytest.fixture(scope="module")
def flowers_run(tmp_path_factory, flowers102_root):
    """Flowers102, official splits: the first 24 of the 102 train images, 102 held out, 2 + 2 epochs."""
    run = tmp_path_factory.mktemp("flowers") / "run"
    train_all(["--dataset", "flowers102", "--data_root", str(flowers102_root), "--flowers_splits", "official",
               "--subset", "24", "--results_dir", str(run), "--seed", str(SEED), "--batch_size", "8", *TINY])
    return run


def epoch_values(run, stage, epoch):
    """{name: value} that metrics.csv holds for one epoch of a stage (wall-clock time left out)."""
    rows = [r for r in Run(str(run)).read_metrics()
            if r["stage"] == stage and int(r["epoch"]) == epoch and r["name"] != "epoch_seconds"]
    return {r["name"]: float(r["value"]) for r in rows}


def assert_same_values(resumed, uninterrupted):
    assert resumed and set(resumed) == set(uninterrupted), (sorted(resumed), sorted(uninterrupted))
    for name, value in uninterrupted.items():
        assert math.isclose(resumed[name], value, rel_tol=1e-4, abs_tol=1e-6), (name, resumed[name], value)


# --- the stage schedule ------------------------------------------------------------------------

def recipe_config(dataset, *flags):
    return build_config(main.stage_overrides(main.parse_args(["--train_vae", "--dataset", dataset, *flags])))


def test_celeba_recipe_under_the_seeds_preset_is_the_s3_stage_schedule():
    cfg = recipe_config("celeba_smiling", "--preset", "s1")
    assert tuple(cfg.vae_channel_mults) == (1, 2, 2, 4) and cfg.image_size == 64
    assert (cfg.vae_minutes, cfg.diffusion_minutes, cfg.vae_epochs) == (None, None, 1200)
    assert cfg.kl_start_epoch <= cfg.class_loss_start_epoch < cfg.adv_start_epoch
    w = {e: loss_weights(cfg, e) for e in (0, 0.5, 5, 9.9, 10, 15, 25, 29.9, 30, 35, 40, 100)}
    assert all(w[e]["recon"] == 1.0 for e in w)  # reconstruction from the start
    assert w[0]["kl"] == 0 and 0 < w[0.5]["kl"] < w[5]["kl"] < w[15]["kl"] <= w[25]["kl"] == cfg.kl_weight
    for e in (0, 5, 9.9):  # classifier and center losses off before their start
        assert w[e]["classifier"] == w[e]["center"] == 0
    assert 0 < w[15]["classifier"] < cfg.classifier_weight and w[40]["classifier"] == cfg.classifier_weight
    assert 0 < w[15]["center"] < cfg.center_weight and w[40]["center"] == cfg.center_weight
    for e in (0, 10, 25, 29.9, 30):  # the adversarial loss last, rising from 0 at its start
        assert w[e]["adversarial"] == 0
    assert 0 < w[35]["adversarial"] < cfg.adv_weight
    assert w[cfg.adv_start_epoch + cfg.adv_ramp_epochs]["adversarial"] == w[100]["adversarial"] == cfg.adv_weight


def test_flowers_recipe_has_repulsion_and_flags_override_the_recipe():
    cfg = recipe_config("flowers102")
    assert cfg.repulsion_weight > 0 and tuple(cfg.vae_channel_mults) == (1, 2, 2, 4)
    assert loss_weights(cfg, 30)["repulsion"] == cfg.repulsion_weight and loss_weights(cfg, 0)["repulsion"] == 0
    assert loss_weights(recipe_config("flowers102", "--preset", "s1"), 5)["repulsion"] == 0  # S3: from epoch 10
    cfg = recipe_config("flowers102", "--preset", "s1", "--repulsion_weight", "0", "--adv_start_epoch", "7",
                        "--adv_ramp_epochs", "0", "--class_loss_ramp_epochs", "2", "--kl_start_epoch", "1")
    assert (cfg.repulsion_weight, cfg.adv_start_epoch, cfg.adv_ramp_epochs, cfg.adv_weight) == (0, 7, 0, 0.05)
    assert (cfg.class_loss_ramp_epochs, cfg.kl_start_epoch) == (2, 1)
    assert loss_weights(cfg, 6.9)["adversarial"] == 0 and loss_weights(cfg, 7)["adversarial"] == cfg.adv_weight


def test_64x64_recipes_carry_their_measured_budget_split_and_flags_still_win():
    """Each 64x64 recipe gives the VAE 9 of the 20 minutes, keeps the loss weighting and guidance
    it was measured best with (guidance 8, not the cats/dogs 11; min-SNR on Flowers102 only), with
    or without the cpu preset; cats/dogs keeps the defaults' 4 + 16 and their min-SNR weighting;
    the seeds' preset has no budget; a flag wins over all of them."""
    for preset in ((), ("--preset", "cpu")):
        celeba, flowers = recipe_config("celeba_smiling", *preset), recipe_config("flowers102", *preset)
        assert (celeba.vae_minutes, celeba.diffusion_minutes, celeba.vae_epochs) == (9, 11, 6)
        assert (flowers.vae_minutes, flowers.diffusion_minutes, flowers.vae_epochs) == (9, 11, 8)
        assert (celeba.guidance_scale, flowers.guidance_scale) == (8, 8)
        assert (celeba.loss_weighting, flowers.loss_weighting) == ("uniform", "min_snr")
        assert celeba.latent_channels == Config.latent_channels
        catdog = recipe_config("cifar10_catdog", *preset)
        assert (catdog.vae_minutes, catdog.diffusion_minutes, catdog.guidance_scale, catdog.loss_weighting) == (
            Config.vae_minutes, Config.diffusion_minutes, Config.guidance_scale, Config.loss_weighting)
        assert (Config.guidance_scale, Config.loss_weighting) == (11, "min_snr")
    assert recipe_config("flowers102", "--preset", "cpu").amp == PRESETS["cpu"]["amp"] != Config.amp
    seeds = recipe_config("flowers102", "--preset", "s1")
    assert seeds.vae_minutes is None and seeds.guidance_scale == PRESETS["s1"]["guidance_scale"]
    assert seeds.loss_weighting == PRESETS["s1"]["loss_weighting"] == "uniform"  # the seeds' plain loss
    flagged = recipe_config("flowers102", "--preset", "cpu", "--guidance_scale", "16", "--vae_minutes", "4")
    assert (flagged.guidance_scale, flagged.vae_minutes, flagged.diffusion_minutes) == (16, 4, 11)


@pytest.mark.parametrize("preset", ["tiny", "cpu"])
@pytest.mark.parametrize("dataset", ["celeba_smiling", "flowers102"])
def test_short_presets_switch_every_stage_on(dataset, preset):
    """A preset overrides the recipe: its short run still reaches every stage (tiny: within 2 epochs);
    the cpu preset has no discriminator (its few minutes go to reconstruction)."""
    cfg = recipe_config(dataset, "--preset", preset)
    assert tuple(cfg.vae_channel_mults) == (1, 2, 2, 4)  # the recipe's extra level survives the preset
    assert "vae_channel_mults" not in PRESETS[preset]
    assert preset != "tiny" or cfg.vae_epochs == 2
    early, late = loss_weights(cfg, 0), loss_weights(cfg, cfg.vae_epochs - 0.01)
    assert early["kl"] == 0 and early["adversarial"] == 0  # still in order: KL rising, adversarial last
    for name in ("kl", "classifier", "center") + (("adversarial",) if preset == "tiny" else ()):
        assert late[name] > 0, name
    assert preset == "tiny" or late["adversarial"] == 0
    assert (late["repulsion"] > 0) == (dataset == "flowers102")


# --- full cycles ---------------------------------------------------------------------------------

def test_celeba_official_run(celeba_run, tmp_path):
    for name in S5_NAMES:
        assert os.path.isfile(celeba_run / name), name
    final = load_checkpoint(str(celeba_run / "conditional_diffusion_final.pt"))
    assert final["epoch"] == 2 and final["stage"]["class_names"] == ["Not Smiling", "Smiling"]
    assert final["stage"]["sample_size"] == 8 and final["stage"]["latent_scale"].shape == (4, 1, 1)  # 4x8x8
    vae = load_checkpoint(str(celeba_run / "vae_gan_last.pt"))
    assert vae["config"]["image_size"] == 64 and tuple(vae["config"]["vae_channel_mults"]) == (1, 2, 2, 4)
    # Every loss of the schedule was on by the second epoch, the PatchGAN included.
    second = epoch_values(celeba_run, "vae_gan", 2)
    assert {"recon", "kl", "classifier", "center", "repulsion", "adversarial", "discriminator"} <= set(second)
    from models import build_discriminator
    disc = build_discriminator(build_config(main.parse_args(["--train_vae", "--dataset", "celeba_smiling"])))
    assert disc(torch.zeros(1, 3, 64, 64)).shape[-1] > 1  # a logit per patch

    out = tmp_path / "gen"
    assert generate.main(["--results_dir", str(celeba_run), "--class_name", "Smiling", "--num_samples", "2",
                          "--output_dir", str(out), "--device", "cpu"]) == 0
    assert sorted(os.listdir(out)) == ["Smiling", "Smiling_grid.png"]
    assert generate.main(["--results_dir", str(celeba_run), "--class_name", "not_smiling", "--num_samples", "1",
                          "--output_dir", str(out), "--device", "cpu"]) == 0  # the file-safe form, any case
    assert os.path.isfile(out / "Not_Smiling_grid.png")
    assert generate.main(["--results_dir", str(celeba_run), "--create_animation", "--class_name", "not smiling",
                          "--device", "cpu"]) == 0
    assert len(imageio.mimread(str(celeba_run / "diffusion_animation_Not_Smiling.gif"))) > 3
    assert visualize.main(["--results_dir", str(celeba_run), "--mode", "denoising_path", "--class_name", "Smiling",
                           "--num_samples", "3", "--device", "cpu"]) == 0
    assert os.path.getsize(celeba_run / "denoising_path_Smiling.png") > 1000


def test_celeba_kaggle_layout_and_attribute(celeba_kaggle_run, tmp_path):
    for name in S5_NAMES:
        assert os.path.isfile(celeba_kaggle_run / name), name
    final = load_checkpoint(str(celeba_kaggle_run / "conditional_diffusion_final.pt"))
    assert final["config"]["attribute"] == "Wearing_Hat"
    assert final["stage"]["class_names"] == ["Not Wearing Hat", "Wearing Hat"]
    out = tmp_path / "gen"
    assert generate.main(["--results_dir", str(celeba_kaggle_run), "--class_name", "wearing hat", "--num_samples",
                          "1", "--output_dir", str(out), "--device", "cpu"]) == 0
    assert sorted(os.listdir(out)) == ["Wearing_Hat", "Wearing_Hat_grid.png"]
    assert visualize.main(["--results_dir", str(celeba_kaggle_run), "--mode", "samples_grid", "--classes",
                           "Wearing_Hat", "not wearing hat", "--num_samples", "2", "--device", "cpu"]) == 0
    assert os.path.getsize(celeba_kaggle_run / "samples_grid.png") > 1000


def test_flowers102_run_with_file_safe_names(flowers_run, tmp_path, monkeypatch):
    from viz import figures
    for name in S5_NAMES:
        assert os.path.isfile(flowers_run / name), name
    final = load_checkpoint(str(flowers_run / "conditional_diffusion_final.pt"))
    cfg = final["config"]
    assert cfg["flowers_splits"] == "official" and cfg["repulsion_weight"] > 0 and cfg["image_size"] == 64
    assert len(final["stage"]["class_names"]) == 102 and final["stage"]["class_names"][0] == FLOWER
    assert "repulsion" in epoch_values(flowers_run, "vae_gan", 2)

    out = tmp_path / "gen"
    assert generate.main(["--results_dir", str(flowers_run), "--class_name", FLOWER, "--num_samples", "2",
                          "--output_dir", str(out), "--device", "cpu"]) == 0
    assert sorted(os.listdir(out)) == [FLOWER_SAFE, FLOWER_SAFE + "_grid.png"]
    assert sorted(os.listdir(out / FLOWER_SAFE)) == [f"{FLOWER_SAFE}_000.png", f"{FLOWER_SAFE}_001.png"]
    assert generate.main(["--results_dir", str(flowers_run), "--class_name", "Colt's Foot", "--num_samples", "1",
                          "--output_dir", str(out), "--device", "cpu"]) == 0
    assert os.path.isfile(out / "colt_s_foot_grid.png")
    assert generate.main(["--results_dir", str(flowers_run), "--create_animation", "--class_name", FLOWER_SAFE,
                          "--device", "cpu"]) == 0
    assert os.path.isfile(flowers_run / f"diffusion_animation_{FLOWER_SAFE}.gif")
    # --class_name all with 102 classes: one GIF for each class of a spread, not the first ten.
    assert generate.main(["--results_dir", str(flowers_run), "--create_animation", "--steps", "2",
                          "--device", "cpu"]) == 0
    names = final["stage"]["class_names"]
    gifs = {f for f in os.listdir(flowers_run) if f.startswith("diffusion_animation_")}
    assert gifs == {f"diffusion_animation_{safe_name(names[c])}.gif" for c in figures.pick_classes(names)} | \
        {f"diffusion_animation_{FLOWER_SAFE}.gif"}
    assert "diffusion_animation_blackberry_lily.gif" in gifs  # the last class, "blackberry lily"
    shown = []  # the real latents drawn under the paths: a spread of the 102 classes, plus the sampled one
    draw = figures.denoising_path_figure
    monkeypatch.setattr(figures, "denoising_path_figure",
                        lambda pipe, label, latents, labels, *a, **k: (shown.append(set(labels.tolist())),
                                                                       draw(pipe, label, latents, labels, *a, **k)))
    for name in ("PINK PRIMROSE", FLOWER_SAFE, "Sweet Pea"):  # case-insensitive, or the file-safe form
        safe = safe_name(name.lower())
        path = flowers_run / f"denoising_path_{safe}.png"
        if path.exists():
            path.unlink()
        assert visualize.main(["--results_dir", str(flowers_run), "--mode", "denoising_path", "--class_name", name,
                               "--num_samples", "2", "--device", "cpu"]) == 0
        assert os.path.getsize(path) > 1000
    spread = set(figures.pick_classes(final["stage"]["class_names"]))
    assert shown == [spread, spread, spread | {3}] and len(spread) == 10  # 3: sweet pea
    assert not any(" " in f for f in os.listdir(flowers_run))
    assert visualize.main(["--results_dir", str(flowers_run), "--mode", "samples_grid", "--classes", FLOWER,
                           "sweet_pea", "Globe-Flower", "--num_samples", "1", "--device", "cpu"]) == 0
    assert os.path.getsize(flowers_run / "samples_grid.png") > 1000


def test_many_classes_default_to_a_spread():
    from viz.figures import pick_classes
    names = [f"class {i}" for i in range(102)]
    spread = pick_classes(names)
    assert len(spread) == 10 and spread[0] == 0 and spread[-1] == 101 and spread != list(range(10))
    assert pick_classes(names[:2]) == [0, 1]


# --- continuing a run: --checkpoint_path P --total_epochs N ------------------------------------------

def test_vae_resume_to_total_epochs_matches_an_uninterrupted_run(celeba_run, celeba_root, tmp_path, capsys):
    run_a = tmp_path / "a"
    assert main.main(["--train_vae", "--epochs", "1"] + celeba_args(celeba_root, run_a, stage="vae")) == 0
    assert load_checkpoint(str(run_a / "vae_gan_last.pt"))["epoch"] == 1
    capsys.readouterr()
    assert main.main(["--train_vae", "--checkpoint_path", str(run_a / "vae_gan_last.pt"), "--total_epochs", "2",
                      "--device", "cpu"]) == 0
    assert "resuming vae_gan after epoch 1," in capsys.readouterr().err
    last = load_checkpoint(str(run_a / "vae_gan_last.pt"))
    uninterrupted = load_checkpoint(str(celeba_run / "vae_gan_last.pt"))
    assert (last["epoch"], last["step"]) == (2, uninterrupted["step"]) and last["config"]["vae_epochs"] == 2
    assert_same_values(epoch_values(run_a, "vae_gan", 2), epoch_values(celeba_run, "vae_gan", 2))
    assert_same_values(epoch_values(run_a, "vae_gan", 1), epoch_values(celeba_run, "vae_gan", 1))
    # The --train_* flag must name the checkpoint's stage, and a target it has reached trains nothing:
    # both refused before any work.
    before = sorted(os.listdir(run_a))
    with pytest.raises(UserError, match="holds a vae_gan checkpoint: continue it with --train_vae"):
        main.main(["--train_diffusion", "--checkpoint_path", str(run_a / "vae_gan_last.pt"), "--total_epochs", "3",
                   "--device", "cpu"])
    with pytest.raises(UserError, match=r"--total_epochs 2: .*vae_gan_last\.pt has already trained 2 epochs"):
        main.main(["--train_vae", "--checkpoint_path", str(run_a / "vae_gan_last.pt"), "--total_epochs", "2",
                   "--device", "cpu"])
    assert sorted(os.listdir(run_a)) == before


def test_denoiser_resume_to_total_epochs_matches_an_uninterrupted_run(celeba_run, celeba_root, tmp_path):
    run_c = tmp_path / "c"
    run_c.mkdir()
    for name in ("vae_gan_best.pt", "vae_gan_last.pt"):  # the uninterrupted run's VAE
        shutil.copy(celeba_run / name, run_c / name)
    assert main.main(["--train_diffusion", "--epochs", "1"] + celeba_args(celeba_root, run_c, stage="denoiser")) == 0
    uninterrupted = load_checkpoint(str(celeba_run / "conditional_diffusion_final.pt"))
    expected = epoch_values(celeba_run, "conditional_diffusion", 2)
    # Into a folder without the VAE (the checkpoint holds its own), then into its own folder (S5's form).
    for extra, folder in ((["--results_dir", str(tmp_path / "d")], tmp_path / "d"), ([], run_c)):
        assert main.main(["--train_diffusion", "--checkpoint_path", str(run_c / "conditional_diffusion_last.pt"),
                          "--total_epochs", "2", "--device", "cpu", *extra]) == 0
        final = load_checkpoint(str(folder / "conditional_diffusion_final.pt"))
        assert (final["epoch"], final["step"]) == (2, uninterrupted["step"])
        assert final["config"]["diffusion_epochs"] == 2
        assert_same_values(epoch_values(folder, "conditional_diffusion", 2), expected)
        for key in ("model", "ema"):
            for name, tensor in uninterrupted["stage"][key].items():
                assert torch.allclose(final["stage"][key][name].float(), tensor.float(), rtol=1e-4, atol=1e-6), name
