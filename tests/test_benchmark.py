"""bench/benchmark.py end to end on the CPU at the tiny preset: the JSON it writes holds every
figure for every model asked for, and bad flags get one error line. (Its speed is what it
measures, never what a test asserts.)"""
import json

from helpers_cli import assert_one_line_error, run_cli, run_many


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


def test_flop_count_includes_softmax_attention_on_the_cpu():
    """The CPU's fused attention kernel counts as 0 FLOPs unless counted through the math kernel."""
    import importlib.util
    import torch
    spec = importlib.util.spec_from_file_location("benchmark", "bench/benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)

    class Attention(torch.nn.Module):  # q, k, v contiguous: the CPU takes its fused kernel
        def forward(self, x, t, y):
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    heads, tokens, dim = 2, 16, 8
    flops = benchmark.training_flops_per_image(Attention(), (heads, tokens, dim), torch.device("cpu"))
    assert flops == 3 * 4 * heads * tokens ** 2 * dim  # QK^T and AV, 2 FLOPs a multiply-add, x3 for training


def test_benchmark_refuses_bad_flags(tmp_path):
    cases = (("--train_batch", "0"), ("--models", "resnet"), ("--preset", "huge"))
    results = run_many([("bench/benchmark.py", "--out", tmp_path / "x.json", *args) for args in cases])
    for (flag, _), result in zip(cases, results):
        assert_one_line_error(result, contains=flag)
    assert not (tmp_path / "x.json").exists()


def test_sampler_accuracy_writes_each_samplers_error(tmp_path):
    out = tmp_path / "accuracy.json"
    result = run_cli("bench/sampler_accuracy.py", "--schedules", "cosine", "--steps", "10,200", "--samples", "512",
                     "--out", out)
    assert result.returncode == 0, result.describe()
    rows = json.loads(out.read_text())["results"]["cosine"]
    assert set(rows) == {"10", "200"}
    # more steps, closer to the exact answer; DPM-Solver++ closer than DDIM at equal steps
    assert rows["200"]["dpmpp"]["rms_error"] < rows["10"]["dpmpp"]["rms_error"] < rows["10"]["ddim"]["rms_error"]
    assert abs(rows["200"]["ddpm"]["std_ratio"] - 1) < 0.1
    assert_one_line_error(run_cli("bench/sampler_accuracy.py", "--steps", "0"), contains="--steps")
