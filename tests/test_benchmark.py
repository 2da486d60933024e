"""bench/benchmark.py end to end on the CPU at the tiny preset: the JSON it writes holds every
figure for every model asked for, and bad flags get one error line. (Its speed is what it
measures, never what a test asserts.) Each bench script refuses bad input in one error line
before its long work."""
import argparse
import json
import types

import pytest

from errors import run_main
from helpers_cli import assert_one_line_error, one_torch_thread, run_cli, run_many


def test_benchmark_writes_every_figure_for_each_model(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("bench/benchmark.py", "--device", "cpu", "--quick", "--threads", "1", "--preset", "tiny",
                     "--train_batch", "4", "--models", "latent_unet,latent_transformer,unet", "--out", out)
    assert result.returncode == 0, result.describe()
    report = json.loads(out.read_text())
    assert report["preset"] == "tiny" and report["device_type"] == "cpu"
    assert set(report["models"]) == {"latent_unet", "latent_transformer", "unet"}
    for name, figures in report["models"].items():
        train = figures["train"]
        assert train["batch"] == 4 and train["images_per_s"] > 0 and train["training_gflop_per_image"] > 0, name
        assert train["achieved_tflop_per_s"] > 0 and train["mfu"] > 0, name
        runs = figures["sampling"]["runs"]
        assert [(r["sampler"], r["steps"]) for r in runs] == [  # DDPM: all of the tiny preset's 100 steps
            ("ddim", 10), ("ddim", 20), ("ddim", 50), ("dpmpp", 10), ("dpmpp", 20), ("dpmpp", 50), ("ddpm", 100)]
        assert all(r["ms_per_step"] > 0 for r in runs), name
        assert runs[-1]["measured_steps"] == 10 and runs[-1]["images_per_s_extrapolated"] > 0  # --quick on a CPU
    assert report["models"]["latent_unet"]["params"] < 2e6  # the tiny preset's width, not the default's 17.5M
    # A latent model's input is the VAE's latent; a pixel model's, the image.
    assert report["models"]["latent_transformer"]["sample_shape"] == [4, 8, 8]
    assert report["models"]["unet"]["sample_shape"] == [3, 32, 32]
    assert "latent_unet" in result.stdout and "dpmpp20" in result.stdout  # the printed table
    assert "ddpm100 is extrapolated from 10 measured steps" in " ".join(report["notes"])


def load_benchmark():
    import importlib.util
    spec = importlib.util.spec_from_file_location("benchmark", "bench/benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark


def test_flop_count_includes_softmax_attention_on_the_cpu():
    """The CPU's fused attention kernel counts as 0 FLOPs unless counted through the math kernel."""
    import torch
    benchmark = load_benchmark()

    class Attention(torch.nn.Module):  # q, k, v contiguous: the CPU takes its fused kernel
        def forward(self, x, t, y):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    heads, tokens, dim = 2, 16, 8
    flops = benchmark.training_flops_per_image(Attention(), (heads, tokens, dim), torch.device("cpu"))
    assert flops == 3 * 4 * heads * tokens ** 2 * dim  # QK^T and AV, 2 FLOPs a multiply-add, x3 for training


def test_benchmark_refuses_bad_flags(tmp_path):
    # --device cuda: the UserError of a machine without a GPU (the tests hide any), through run_main
    cases = (("--train_batch", "0"), ("--models", "resnet"), ("--preset", "huge"), ("--device", "cuda"))
    results = run_many([("bench/benchmark.py", "--out", tmp_path / "x.json", *args) for args in cases])
    for (flag, _), result in zip(cases, results):
        assert_one_line_error(result, contains=flag)
    assert not (tmp_path / "x.json").exists()


def test_sampler_accuracy_writes_each_samplers_error(tmp_path):
    out = tmp_path / "new" / "accuracy.json"  # --out's folder is created
    result = run_cli("bench/sampler_accuracy.py", "--schedules", "cosine", "--steps", "10,200", "--samples", "512",
                     "--out", out)
    assert result.returncode == 0, result.describe()
    rows = json.loads(out.read_text())["results"]["cosine"]
    assert set(rows) == {"10", "200"}
    # more steps, closer to the exact answer; DPM-Solver++ closer than DDIM at equal steps
    assert rows["200"]["dpmpp"]["rms_error"] < rows["10"]["dpmpp"]["rms_error"] < rows["10"]["ddim"]["rms_error"]
    assert abs(rows["200"]["ddpm"]["std_ratio"] - 1) < 0.1
    assert_one_line_error(run_cli("bench/sampler_accuracy.py", "--steps", "0"), contains="--steps")


# --- bad input, refused in-process before any long work --------------------------------------------

def exit_status(main, argv):
    """run_main's status, or argparse's (ArgumentParser.error exits itself)."""
    try:
        return run_main(main, [str(a) for a in argv])
    except SystemExit as e:
        return e.code


def assert_refused(capsys, status, contains):
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, (status, err)
    assert contains in err, err


def not_reached(*args, **kwargs):
    raise AssertionError("the long work started before the bad input was refused")


def out_paths(args, tmp_path):
    """UNWRITABLE: an --out that cannot be written, even by root (a path under a regular file);
    FOLDER: an existing folder; PNG: a writable file that is not .json."""
    (tmp_path / "a_file").write_text("")
    named = {"UNWRITABLE": tmp_path / "a_file" / "x.json", "FOLDER": tmp_path, "PNG": tmp_path / "sweep.png"}
    return [named.get(a, a) for a in args]


OUT_CASES = [(["--out", "UNWRITABLE"], "--out"), (["--out", "FOLDER"], "--out")]


@pytest.mark.parametrize("args, contains", [(["--threads", "-1"], "--threads"), (["--threads", "0"], "--threads"),
                                            *OUT_CASES])
def test_benchmark_refuses_bad_threads_and_out_before_measuring(args, contains, tmp_path, monkeypatch, capsys):
    from bench import benchmark
    monkeypatch.setattr(benchmark, "peak_flops", not_reached)  # the first measurement
    status = exit_status(benchmark.main, ["--device", "cpu", *out_paths(args, tmp_path)])
    assert_refused(capsys, status, contains)


@pytest.mark.parametrize("args, contains", [
    (["--threads", "0"], "--threads"), (["--channel_mults", "a,b"], "--channel_mults"), (["--betas", "x"], "--betas"),
    (["--betas", "0.9"], "--betas"), (["--lr", "-1"], "--lr"), (["--batch_size", "0"], "--batch_size")])
def test_vae_screen_refuses_bad_flags_before_loading_data(args, contains, tmp_path, capsys):
    from bench import vae_screen
    with one_torch_thread():  # past its checks, main sets the thread count
        status = exit_status(vae_screen.main, ["--data_root", tmp_path / "no_data", *args])
    assert_refused(capsys, status, contains)


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    """bench/sampling_sweep.py on a stand-in run with the tiny preset's 100-step schedule; loading
    the held-out data or the real-data classifier, the first long steps, fails the test."""
    from bench import sampling_sweep
    from config import build_config
    run = types.SimpleNamespace(cfg=build_config(argparse.Namespace(preset="tiny")), class_names=["cat", "dog"],
                                num_classes=2, heldout_digest=None)
    assert run.cfg.timesteps == 100
    monkeypatch.setattr(sampling_sweep, "load_pipeline", lambda *args, **kwargs: run)
    monkeypatch.setattr(sampling_sweep, "check_heldout_classes", not_reached)
    monkeypatch.setattr(sampling_sweep, "load_real_classifier", not_reached)
    return lambda *args: exit_status(sampling_sweep.main, ["--results_dir", tmp_path, "--device", "cpu", *args])


def test_sampling_sweep_needs_a_sample_of_every_class(tmp_path, monkeypatch, capsys):
    from bench import sampling_sweep
    from config import build_config
    run = types.SimpleNamespace(cfg=build_config(argparse.Namespace(preset="tiny")), class_names=["a", "b", "c"],
                                num_classes=3, heldout_digest=None)
    monkeypatch.setattr(sampling_sweep, "load_pipeline", lambda *args, **kwargs: run)
    monkeypatch.setattr(sampling_sweep, "check_heldout_classes", not_reached)
    monkeypatch.setattr(sampling_sweep, "load_real_classifier", not_reached)
    status = exit_status(sampling_sweep.main, ["--results_dir", tmp_path, "--device", "cpu", "--num_samples", "2"])
    assert_refused(capsys, status, "the sweep needs at least 3 samples (one per class of the 3")


@pytest.mark.parametrize("args, contains", [
    (["--samplers", "ddim:100,dpmpp:1000"], "--samplers dpmpp:1000:"), (["--guidance", "nan"], "--guidance"),
    (["--guidance", "2,-1"], "--guidance"), (["--guidance", "1e9"], "--guidance"),
    (["--guidance_intervals", "0.3:inf"], "HI finite"),  # config.validate refuses it too
    (["--out", "PNG"], "name a .json file"), *OUT_CASES])
def test_sampling_sweep_refuses_bad_settings_before_sampling(args, contains, sweep, tmp_path, capsys):
    assert_refused(capsys, sweep(*out_paths(args, tmp_path)), contains)


def test_sampling_sweep_takes_good_settings_past_its_checks(sweep, tmp_path):
    with pytest.raises(AssertionError, match="long work started"):
        sweep("--samplers", "dpmpp:100,ddpm:1", "--guidance", "0,50", "--out", tmp_path / "new" / "sweep.json")


@pytest.mark.parametrize("args, contains", OUT_CASES)
def test_sampler_accuracy_refuses_an_unwritable_out_before_measuring(args, contains, tmp_path, monkeypatch, capsys):
    from bench import sampler_accuracy
    monkeypatch.setattr(sampler_accuracy, "measure", not_reached)
    assert_refused(capsys, exit_status(sampler_accuracy.main, out_paths(args, tmp_path)), contains)


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                                          ("NVIDIA H100 NVL", 835.5), ("NVIDIA H200", 989.4),
                                          ("NVIDIA H200 NVL", 835.5), ("NVIDIA A100-SXM4-80GB", 312.0)])
def test_gpu_peaks_are_the_datasheets_for_the_part(monkeypatch, name, tflops):
    """The first matching name wins: the NVL and PCIe parts peak lower than the SXM ones."""
    import torch
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak, note = load_benchmark().peak_flops(torch.device("cuda"), torch.bfloat16)
    assert peak == tflops * 1e12 and "datasheet" in note
