"""Diffusion maths against closed forms: schedules, posterior, parameterisations, samplers on
Gaussian data (where the exact answer is known), guidance."""
import math

import pytest
import torch

from diffusion import gaussian
from diffusion.guidance import GUIDANCE_SCHEDULES, guidance_scale_at, make_denoiser
from diffusion.objective import DiffusionLoss, loss_weight, target_for, to_x0_eps
from diffusion.samplers import SAMPLERS, ddim, ddpm, dpmpp_2m
from diffusion.samplers import sample as run_sampler
from diffusion.schedule import NoiseSchedule, sampling_timesteps


def test_linear_schedule_matches_closed_form():
    s = NoiseSchedule("linear", 1000, 1e-4, 0.02)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    expected = torch.tensor(betas, dtype=torch.float64)
    assert torch.allclose(s.betas, expected)
    abar = 1.0
    for i, b in enumerate(betas):
        abar *= 1 - b
        if i in (0, 1, 500, 999):
            assert s.alphas_cumprod[i].item() == pytest.approx(abar, rel=1e-12)
    t = torch.tensor([-1, 0, 999])
    assert torch.equal(s.abar(t), torch.cat([torch.ones(1, dtype=torch.float64), s.alphas_cumprod[[0, 999]]]))
    # Looked up on t's own device (a GPU step must not copy t to the host): the meta device shows it.
    assert s.abar(t.to("meta")).device.type == "meta"


def test_linear_schedule_spans_the_same_noise_levels_at_any_length():
    """Betas given for 1000 steps are scaled by 1000/T, so that x_{T-1} is pure noise whatever T
    (abar_{T-1} = 4e-5 at T = 1000), where every sampler starts."""
    for T in (50, 100, 250, 1000):
        s = NoiseSchedule("linear", T, 1e-4, 0.02)
        scale = 1000 / T
        assert s.betas[0].item() == pytest.approx(1e-4 * scale) and s.betas[-1].item() == pytest.approx(0.02 * scale)
        assert s.alphas_cumprod[-1].item() < 1e-4  # unscaled, T = 100 would end at 0.36
    assert (NoiseSchedule("linear", 10).betas <= 0.999).all()  # capped where 0.02 * 1000/T >= 1


def test_cosine_schedule_matches_closed_form():
    s = NoiseSchedule("cosine", 1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for i in (0, 10, 500, 900):  # index i is t = i + 1
        assert s.alphas_cumprod[i].item() == pytest.approx(f(i + 1) / f(0), rel=1e-9)
    assert (s.betas <= 0.999).all() and (s.betas > 0).all()
    assert torch.all(s.alphas_cumprod[1:] < s.alphas_cumprod[:-1])


def test_edm_schedule_is_the_log_normal_law_of_edm():
    """sigma_t = sqrt((1 - abar) / abar) runs from sigma_min to sigma_max through evenly spaced
    quantiles of ln sigma ~ N(p_mean, p_std^2): so a uniform t has that law's mean and spread."""
    from diffusion.schedule import EDM_P_MEAN, EDM_P_STD, EDM_SIGMA_MAX, EDM_SIGMA_MIN
    s = NoiseSchedule("edm", 1000)
    sigma = ((1 - s.alphas_cumprod) / s.alphas_cumprod).sqrt()
    assert sigma[0].item() == pytest.approx(EDM_SIGMA_MIN, rel=1e-9)
    assert sigma[-1].item() == pytest.approx(EDM_SIGMA_MAX, rel=1e-9)
    assert torch.all(sigma[1:] > sigma[:-1])
    normal = torch.distributions.Normal(EDM_P_MEAN, EDM_P_STD)
    lo, hi = (normal.cdf(torch.tensor(math.log(v))).item() for v in (EDM_SIGMA_MIN, EDM_SIGMA_MAX))
    for t in (100, 500, 900):  # the quantile at t's share of the truncated mass
        u = lo + (hi - lo) * t / 999
        assert math.log(sigma[t].item()) == pytest.approx(normal.icdf(torch.tensor(u)).item(), abs=1e-4)
    log_sigma = sigma.log()  # the cut tails and the grid's end points move the moments by a little
    assert log_sigma.mean().item() == pytest.approx(EDM_P_MEAN, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(EDM_P_STD, rel=0.02)
    # the betas reproduce the table, as the posterior needs
    assert torch.allclose(torch.cumprod(1 - s.betas, 0), s.alphas_cumprod, rtol=1e-9)
    assert (s.betas > 0).all() and (s.betas < 1).all()


@pytest.mark.parametrize("kind", ["linear", "cosine", "edm"])
def test_posterior_matches_gaussian_conditioning(kind):
    """q(x_s | x_t, x0) from the schedule equals the conditional of the joint Gaussian
    (x_s, x_t) | x0 computed directly."""
    sched = NoiseSchedule(kind, 1000)
    for t, s in ((1, 0), (500, 499), (999, 998), (700, 300), (5, -1)):
        a_t, a_s = sched.abar(torch.tensor(t)).item(), sched.abar(torch.tensor(s)).item()
        # x_s = sqrt(a_s) x0 + sqrt(1-a_s) e1;  x_t = sqrt(a_t/a_s) x_s + sqrt(1-a_t/a_s) e2
        var_s, cov = 1 - a_s, math.sqrt(a_t / a_s) * (1 - a_s)
        var_t = 1 - a_t
        x0, x_t = torch.tensor([0.7]), torch.tensor([-0.3])
        cond_mean = math.sqrt(a_s) * 0.7 + cov / var_t * (-0.3 - math.sqrt(a_t) * 0.7)
        cond_var = var_s - cov ** 2 / var_t
        mean, var = sched.posterior_mean_variance(x0, x_t, torch.tensor([t]), torch.tensor([s]))
        assert mean.item() == pytest.approx(cond_mean, abs=1e-6)
        assert var.item() == pytest.approx(cond_var, abs=1e-7)
        if s == t - 1 and t > 0:  # the DDPM paper's beta-tilde
            beta = sched.betas[t].item()
            assert var.item() == pytest.approx(beta * (1 - a_s) / (1 - a_t), rel=1e-5)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_parameterisations_round_trip(prediction):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    sched = NoiseSchedule("cosine", 1000)
    t = torch.tensor([0, 100, 600, 999])
    alpha, sigma = sched.alpha_sigma(t, x0)
    x_t = alpha * x0 + sigma * eps
    out = target_for(prediction, x0, eps, alpha, sigma)
    x0_hat, eps_hat = to_x0_eps(out, x_t, alpha, sigma, prediction)
    tol = 5e-3 if prediction == "x0" else 1e-4  # eps from x0 divides by a small sigma at t=0
    assert torch.allclose(x0_hat, x0, atol=2e-3 if prediction == "eps" else 1e-4)
    assert torch.allclose(eps_hat, eps, atol=tol)


def test_min_snr_weights_equal_clipped_snr_on_x0_error():
    snr = torch.tensor([0.01, 1.0, 5.0, 100.0])
    # The eps error is snr times the x0 error, the v error (snr + 1) times: each weight makes
    # the effective x0-error weight min(snr, 5).
    assert torch.allclose(loss_weight(snr, "eps", "min_snr") * snr, snr.clamp(max=5))
    assert torch.allclose(loss_weight(snr, "v", "min_snr") * (snr + 1), snr.clamp(max=5))
    assert torch.allclose(loss_weight(snr, "x0", "min_snr"), snr.clamp(max=5))
    assert torch.equal(loss_weight(snr, "v", "uniform"), torch.ones(4))


def test_loss_is_zero_for_the_exact_target():
    sched = NoiseSchedule("linear", 100)
    x0 = torch.randn(6, 2, 4, 4)
    t, noise = torch.randint(0, 100, (6,)), torch.randn(6, 2, 4, 4)
    oracle = lambda x_t, t_, y: noise  # noqa: E731
    assert DiffusionLoss(sched, "eps")(oracle, x0, None, t=t, noise=noise).item() == pytest.approx(0, abs=1e-10)


@pytest.mark.parametrize("kind", ["linear", "cosine", "edm"])
@pytest.mark.parametrize("spacing", ["time", "logsnr"])
def test_sampling_timesteps_are_distinct_and_span_the_schedule(kind, spacing):
    sched = NoiseSchedule(kind, 1000)
    assert sampling_timesteps(sched, 1000, spacing).tolist() == list(range(999, -1, -1))
    for steps in (1, 5, 20, 999):
        ts = sampling_timesteps(sched, steps, spacing).tolist()
        assert len(ts) == steps and ts[0] == 999 and ts == sorted(set(ts), reverse=True) and min(ts) >= 0
        if steps > 1:
            assert ts[-1] == 0
    with pytest.raises(ValueError, match=r"steps must be in 1\.\.100, got 101"):
        sampling_timesteps(NoiseSchedule(kind, 100), 101, spacing)


# --- samplers on Gaussian data: x0 ~ N(mu, s^2 I), whose exact denoiser is known ---
MU, S = 0.5, 0.4


def gaussian_denoiser(schedule):
    return gaussian.gaussian_denoiser(schedule, MU, S)


def exact_ode_endpoint(schedule, x_T):
    return gaussian.exact_ode_endpoint(schedule, x_T, MU, S)


@pytest.mark.parametrize("kind", ["linear", "cosine", "edm"])
def test_ddim_all_steps_follows_the_deterministic_path(kind):
    sched = NoiseSchedule(kind, 1000)
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = ddim(gaussian_denoiser(sched), x_T, sched, 1000, eta=0.0)
    assert torch.allclose(out, exact_ode_endpoint(sched, x_T), atol=5e-3)
    again = ddim(gaussian_denoiser(sched), x_T, sched, 1000, eta=0.0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(out, again)  # eta = 0 uses no randomness


@pytest.mark.parametrize("kind", ["linear", "cosine", "edm"])
def test_dpmpp_20_steps_matches_ddim_1000_and_the_exact_answer(kind):
    sched = NoiseSchedule(kind, 1000)
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = exact_ode_endpoint(sched, x_T)
    fast = dpmpp_2m(gaussian_denoiser(sched), x_T, sched, 20)
    slow = ddim(gaussian_denoiser(sched), x_T, sched, 1000)
    ddim20 = ddim(gaussian_denoiser(sched), x_T, sched, 20)
    rms = lambda a, b: (a - b).pow(2).mean().sqrt().item()  # noqa: E731
    err_fast, err_ddim20 = rms(fast, exact), rms(ddim20, exact)
    assert err_fast < 0.02 * S  # within 2% of the data's standard deviation
    assert (fast - exact).abs().max().item() < 0.1 * S
    assert rms(fast, slow) < 0.02 * S
    assert err_fast < err_ddim20  # second order beats first order at the same step count
    assert rms(dpmpp_2m(gaussian_denoiser(sched), x_T, sched, 10), exact) < 0.04 * S  # 10 steps: within 4%


def test_ddim_eta1_is_the_ddpm_posterior_step():
    """DDPM = DDIM with eta = 1: each step samples exactly q(x_s | x_t, x0_hat)."""
    sched = NoiseSchedule("linear", 1000)
    den = gaussian_denoiser(sched)
    x_T = torch.randn(64, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = ddpm(den, x_T, sched, 25, generator=torch.Generator().manual_seed(5))
    g, x = torch.Generator().manual_seed(5), x_T
    ts = sampling_timesteps(sched, 25).tolist() + [-1]
    for t, s in zip(ts[:-1], ts[1:]):
        x0, _ = den(x, torch.full((len(x),), t))
        mean, var = sched.posterior_mean_variance(x0, x, torch.tensor([t]), torch.tensor([s]))
        x = mean.double() + (var.double().sqrt() * torch.randn(x.shape, generator=g, dtype=x.dtype) if s >= 0 else 0)
    assert torch.allclose(out, x, atol=1e-5)


def test_ddpm_samples_the_data_distribution():
    sched = NoiseSchedule("cosine", 1000)
    x_T = torch.randn(20000, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = ddpm(gaussian_denoiser(sched), x_T, sched, 250, generator=torch.Generator().manual_seed(4))
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(S, rel=0.05)


class ToyModel(torch.nn.Module):
    """Output depends on the label, so guided and unguided outputs differ."""

    def forward(self, x, t, y):
        return x * 0.5 + y.float().view(-1, *([1] * (x.dim() - 1))) * 0.1


def test_guidance_scale_one_is_exactly_unguided_and_zero_is_unconditional():
    sched = NoiseSchedule("linear", 100)
    model, x, t = ToyModel(), torch.randn(3, 2, 4, 4), torch.tensor([50, 50, 50])
    labels = torch.tensor([0, 1, 1])
    plain = model(x, t, labels)
    uncond = model(x, t, torch.full_like(labels, 2))
    for w, expected in ((1.0, plain), (0.0, uncond), (3.0, uncond + 3 * (plain - uncond))):
        den = make_denoiser(model, sched, "eps", labels, null_label=2, guidance_scale=w)
        _, eps = den(x, t)
        assert torch.allclose(eps, expected, atol=1e-6)
    _, eps = make_denoiser(model, sched, "eps", labels, 2, 1.0)(x, t)
    assert torch.equal(eps, plain)  # bit-exact: the unconditional branch is not evaluated


def test_guidance_interval_guides_only_at_the_noise_levels_inside_it():
    sched = NoiseSchedule("linear", 100)
    model, x, labels = ToyModel(), torch.randn(3, 2, 4, 4), torch.tensor([0, 1, 1])
    abar = sched.alphas_cumprod
    noise_over_signal = ((1 - abar) / abar).sqrt()
    interval = (float(noise_over_signal[30]), float(noise_over_signal[60]))  # (lo, hi]: t = 31 .. 60
    guided = make_denoiser(model, sched, "eps", labels, 2, 3.0)
    gated = make_denoiser(model, sched, "eps", labels, 2, 3.0, guidance_interval=interval)
    for step in (0, 30, 31, 60, 61, 99):
        t = torch.full((3,), step)
        expected = guided(x, t)[1] if 31 <= step <= 60 else model(x, t, labels)
        assert torch.equal(gated(x, t)[1], expected), step
    everywhere = make_denoiser(model, sched, "eps", labels, 2, 3.0, guidance_interval=(0.0, math.inf))
    assert torch.equal(everywhere(x, torch.full((3,), 99))[1], guided(x, torch.full((3,), 99))[1])


def test_guidance_schedules_average_to_the_constant_scale():
    for name in ("constant", "linear", "adaptive"):
        values = [guidance_scale_at(3.0, name, p / 299) for p in range(300)]
        assert sum(values) / len(values) == pytest.approx(3.0, rel=0.02)
    assert guidance_scale_at(3.0, "adaptive", 0.0) < 3.0 < guidance_scale_at(3.0, "adaptive", 1.0)
    assert guidance_scale_at(1.0, "adaptive", 0.9) == 1.0
    # linear: no guidance at the noisiest step, twice the extra at the last
    assert [guidance_scale_at(3.0, "linear", p) for p in (0.0, 0.5, 1.0)] == [1.0, 3.0, 5.0]


class ScaleSpy(torch.nn.Module):
    """The unconditional half (label 2) outputs 0, the conditional one 1: an x0 estimate = w."""

    def forward(self, x, t, y):
        return (y < 2).float().view(-1, 1) * torch.ones_like(x)


def scales_seen(scale, schedule, steps):
    den = make_denoiser(ScaleSpy(), NoiseSchedule("cosine", 100), "x0", torch.tensor([0]), null_label=2,
                        guidance_scale=scale, guidance_schedule=schedule, steps=steps)
    return [float(den(torch.zeros(1, 1), torch.tensor([t]))[0]) for t in torch.linspace(90, 0, steps).long()]


def test_guidance_ramp_follows_the_samplers_steps():
    assert scales_seen(3.0, "linear", 4) == pytest.approx([1.0, 7 / 3, 11 / 3, 5.0])


def test_a_ramped_guidance_schedule_needs_the_step_count():
    """Without it every call after the first would sit at the ramp's end (2w - 1)."""
    def first_two_scales(schedule):
        den = make_denoiser(ScaleSpy(), NoiseSchedule("cosine", 100), "x0", torch.tensor([0]), null_label=2,
                            guidance_scale=3.0, guidance_schedule=schedule)
        return [float(den(torch.zeros(1, 1), torch.tensor([t]))[0]) for t in (90, 45)]

    with pytest.raises(ValueError, match="needs the sampler's step count"):
        first_two_scales("linear")
    assert first_two_scales("constant") == [3.0, 3.0]  # a constant scale needs no count


@pytest.mark.parametrize("schedule", GUIDANCE_SCHEDULES)
def test_scales_up_to_one_are_not_ramped(schedule):
    """0 is the unconditional model at every step (a ramp would run from conditional to -1)."""
    assert scales_seen(0.0, schedule, 5) == [0.0] * 5
    assert scales_seen(0.5, schedule, 5) == [0.5] * 5


@pytest.mark.parametrize("schedule", GUIDANCE_SCHEDULES)
def test_a_single_step_is_guided_at_the_scale_asked_for(schedule):
    assert scales_seen(3.0, schedule, 1) == [3.0]


@pytest.mark.parametrize("name", SAMPLERS)
def test_callback_sees_each_steps_input_and_its_estimate(name):
    """The denoising figures label a column with t: its x must be the state at t (x_T first)."""
    schedule = NoiseSchedule("cosine", 100)
    seen, calls = [], []

    def denoise(x, t):
        calls.append((x.clone(), int(t[0])))
        return 0.5 * x, 0.5 * x

    x_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    run_sampler(name, denoise, x_T, schedule, 6, generator=torch.Generator().manual_seed(1),
                callback=lambda i, t, x, x0: seen.append((i, int(t), x.clone(), x0.clone())))
    assert torch.equal(seen[0][2], x_T) and len(seen) == len(calls) == 6
    for (i, t, x, x0), (x_in, t_in) in zip(seen, calls):
        assert t == t_in and torch.equal(x, x_in) and torch.equal(x0, 0.5 * x_in)


def test_ddpm_noise_of_one_batch_is_not_the_start_of_the_next(monkeypatch):
    """sample_batched gives batch i the seed seed + i; DDPM's noise stream must not be the next
    batch's x_T (with batches of one, seed + 1 for the noise would replay it)."""
    import pipeline
    from config import Config
    drawn = {}

    def record_sampler(name, denoise, x, schedule, steps, generator=None, callback=None, eta=0.0):
        drawn[len(drawn)] = (x.clone(), torch.randn(x.shape, generator=generator))
        return x

    monkeypatch.setattr(pipeline, "run_sampler", record_sampler)
    pipe = pipeline.Pipeline(Config(image_size=8), ToyModel(), ["a", "b"], torch.device("cpu"))
    pipe.sample_batched(torch.tensor([0, 1, 0]), batch_size=1, sampler="ddpm", steps=2, seed=5)
    (x0_start, x0_noise), (x1_start, _), (x2_start, _) = drawn[0], drawn[1], drawn[2]
    assert not torch.equal(x0_noise, x1_start) and not torch.equal(x1_start, x2_start)
    pipe.sample(torch.tensor([0]), sampler="ddpm", steps=2, seed=5)  # still one seed, one result
    assert torch.equal(drawn[3][0], x0_start) and torch.equal(drawn[3][1], x0_noise)
