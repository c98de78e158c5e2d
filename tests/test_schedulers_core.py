"""core.py: each shared formula against diffusers (or scipy / closed forms where diffusers has no counterpart)."""

from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as d_rescale
from diffusers.utils.torch_utils import randn_tensor as d_randn

from diffusekit.schedulers import core
from scheduler_helpers import assert_close, quiet

T = 1000


@pytest.mark.parametrize(
    "theirs_cls,kwargs",
    [
        (diffusers.DDPMScheduler, {"beta_schedule": "linear"}),
        (diffusers.DDPMScheduler, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
        (diffusers.DDPMScheduler, {"beta_schedule": "squaredcos_cap_v2"}),
        (diffusers.DDPMScheduler, {"beta_schedule": "sigmoid"}),
        (diffusers.DDPMScheduler, {"beta_schedule": "laplace"}),
        (diffusers.HeunDiscreteScheduler, {"beta_schedule": "exp"}),
        (diffusers.DDPMScheduler, {"trained_betas": np.linspace(1e-4, 0.02, T)}),
        (diffusers.DDIMScheduler, {"rescale_betas_zero_snr": True, "beta_schedule": "scaled_linear"}),
    ],
)
def test_betas_and_alphas_cumprod_match_diffusers(theirs_cls, kwargs):
    theirs = theirs_cls(**kwargs)
    ours = dict(kwargs)
    params = dict(num_train_timesteps=T, beta_start=theirs.config.beta_start, beta_end=theirs.config.beta_end,
                  beta_schedule=theirs.config.beta_schedule, trained_betas=ours.get("trained_betas"),
                  rescale_betas_zero_snr=ours.get("rescale_betas_zero_snr", False))
    betas, alphas, ac = core.make_train_schedule(**params)
    assert betas.dtype == alphas.dtype == ac.dtype == torch.float32 and betas.shape == (T,)
    # float64-then-cast vs float32: within an ulp or two (diffusers rescales zero-SNR betas in float32: ~3e-6)
    assert_close(betas, theirs.betas, 1e-5 if params["rescale_betas_zero_snr"] else 1e-7, "betas")
    # alphas_cumprod: diffusers' float32 cumprod drifts up to ~3e-5 relative at the tail; compare per entry
    rel = ((ac.double() - theirs.alphas_cumprod.double()).abs() / theirs.alphas_cumprod.double().clamp_min(1e-30))
    assert float(rel[:-1].max()) < 5e-5
    np.testing.assert_allclose(ac.numpy(), np.cumprod(1 - core.make_betas(**params)).astype(np.float32), rtol=1e-7)


def test_rescale_zero_terminal_snr():
    betas = core.make_betas(T, 0.00085, 0.012, "scaled_linear")
    rescaled = core.rescale_zero_terminal_snr(betas)
    ac = np.cumprod(1 - rescaled)
    assert ac[-1] == 0 and abs(ac[0] - (1 - betas[0])) < 1e-15  # zero terminal SNR, first step unchanged
    # same algorithm: equal to diffusers' function run in float64, and to its float32 run within float32 rounding
    assert_close(torch.from_numpy(rescaled), d_rescale(torch.from_numpy(betas)), 1e-12, "rescaled (float64)")
    assert_close(torch.from_numpy(rescaled).float(), d_rescale(torch.from_numpy(betas).float()), 2e-5, "rescaled")


SPACING_CASES = [(s, n, off) for s in ("leading", "trailing", "linspace") for n in (1, 3, 7, 10, 50, 1000)
                 for off in (0, 1)]


@pytest.mark.parametrize("spacing,n,offset", SPACING_CASES)
def test_spaced_timesteps_match_diffusers(spacing, n, offset):
    ours = core.spaced_timesteps(T, n, spacing, offset)
    ddim = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ddim.set_timesteps(n)
    np.testing.assert_array_equal(np.round(ours).astype(np.int64), ddim.timesteps.numpy())
    euler = diffusers.EulerDiscreteScheduler(timestep_spacing=spacing, steps_offset=offset)
    euler.set_timesteps(n)
    np.testing.assert_array_equal(ours.astype(np.float32), euler.timesteps.numpy())
    assert np.all(np.diff(ours) < 0)


def test_spaced_timesteps_errors():
    with pytest.raises(ValueError, match="timestep_spacing='uniform'"):
        core.spaced_timesteps(T, 10, "uniform")
    with pytest.raises(ValueError, match="larger than num_train_timesteps"):
        core.spaced_timesteps(T, 1001, "leading")
    with pytest.raises(ValueError, match="positive integer"):
        core.spaced_timesteps(T, 0, "leading")


def test_previous_timesteps_is_the_next_entry():
    np.testing.assert_array_equal(core.previous_timesteps([999, 888, 777, 0]), [888, 777, 0, -1])
    with pytest.raises(ValueError, match="descending"):
        core.check_custom_timesteps("S", [1, 5], T)


def test_sigma_to_t_matches_diffusers():
    quiet()
    euler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    log_sigmas = np.log(core.train_sigmas(euler.alphas_cumprod))
    rng = np.random.default_rng(0)
    sigmas = np.concatenate([np.exp(rng.uniform(-6, 4, 200)), np.exp(log_sigmas[::41]).astype(np.float64),
                             [0.0, 1e-12, 1e6]])
    ref = np.array([euler._sigma_to_t(s, log_sigmas) for s in sigmas])
    np.testing.assert_array_equal(core.sigma_to_t(sigmas, log_sigmas), ref)
    # a non-monotone table (odd trained betas) takes the general path, same answers
    odd = log_sigmas.copy()
    odd[[5, 6]] = odd[[6, 5]]
    np.testing.assert_array_equal(core.sigma_to_t(sigmas, odd), [euler._sigma_to_t(s, odd) for s in sigmas])


@pytest.mark.parametrize("n", [1, 2, 10, 25])
def test_karras_and_exponential_sigmas_match_diffusers(n):
    euler = diffusers.EulerDiscreteScheduler()
    in_sigmas = np.array([14.6, 3.0, 0.03])
    np.testing.assert_allclose(core.convert_sigmas("karras", in_sigmas, n),
                               euler._convert_to_karras(in_sigmas, n), rtol=1e-15)
    np.testing.assert_allclose(core.convert_sigmas("exponential", in_sigmas, n),
                               euler._convert_to_exponential(in_sigmas, n), rtol=1e-15)
    k = core.karras_sigmas(0.1, 10.0, n)
    assert k[0] == pytest.approx(10.0) and (n == 1 or k[-1] == pytest.approx(0.1))
    assert core.convert_sigmas(None, in_sigmas, n) is in_sigmas


def test_beta_ppf_closed_forms():
    q = np.linspace(0, 1, 101)
    np.testing.assert_allclose(core.beta_ppf(q, 1.0, 1.0), q, atol=1e-14)  # uniform
    np.testing.assert_allclose(core.beta_ppf(q, 1.0, 2.0), 1 - np.sqrt(1 - q), atol=1e-10)  # F = 1 - (1-x)^2
    np.testing.assert_allclose(core.beta_ppf(q, 2.0, 1.0), np.sqrt(q), atol=1e-10)  # F = x^2
    # arcsine law Beta(1/2, 1/2): F = (2/pi) asin(sqrt(x))
    np.testing.assert_allclose(core.beta_ppf(q, 0.5, 0.5), np.sin(q * math.pi / 2) ** 2, atol=1e-12)
    sym = core.beta_ppf(q, 0.6, 0.6)
    np.testing.assert_allclose(sym, 1 - sym[::-1], atol=1e-14)  # symmetric distribution
    assert sym[50] == pytest.approx(0.5, abs=1e-15) and np.all(np.diff(sym) > 0)


def test_beta_sigmas_match_scipy_and_diffusers():
    stats = pytest.importorskip("scipy.stats")
    q = np.concatenate([np.linspace(0, 1, 257), [1e-9, 1 - 1e-9]])
    for a, b in ((0.6, 0.6), (2.5, 0.7), (0.3, 4.0)):
        np.testing.assert_allclose(core.beta_ppf(q, a, b), stats.beta.ppf(q, a, b), atol=1e-12)
    euler = diffusers.EulerDiscreteScheduler()
    in_sigmas = np.array([14.6, 3.0, 0.03])
    for n in (2, 10, 33):
        np.testing.assert_allclose(core.convert_sigmas("beta", in_sigmas, n), euler._convert_to_beta(in_sigmas, n),
                                   rtol=1e-13)


def test_threshold_sample_matches_diffusers():
    ddpm = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0)) * 3
    assert torch.equal(core.threshold_sample(x, 0.9, 2.5), ddpm._threshold_sample(x))
    half = core.threshold_sample(x.half(), 0.9, 2.5)
    assert half.dtype == torch.float16
    assert_close(half, ddpm._threshold_sample(x.half()), 1e-3, "fp16")
    assert torch.equal(core.process_x0(x, thresholding=True, clip_sample=True, dynamic_thresholding_ratio=0.9,
                                       sample_max_value=2.5), ddpm._threshold_sample(x))  # thresholding wins
    assert torch.equal(core.process_x0(x, clip_sample=True, clip_sample_range=0.5), x.clamp(-0.5, 0.5))
    assert core.process_x0(x) is x


def test_randn_tensor_matches_diffusers():
    shape = (3, 2, 4, 4)
    for dtype in (torch.float32, torch.float16):
        a = core.randn_tensor(shape, torch.Generator().manual_seed(7), "cpu", dtype)
        b = d_randn(shape, generator=torch.Generator().manual_seed(7), device=torch.device("cpu"), dtype=dtype)
        assert a.dtype == dtype and torch.equal(a, b)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    gens2 = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    assert torch.equal(core.randn_tensor(shape, gens), d_randn(shape, generator=gens2))
    torch.manual_seed(5)
    a = core.randn_tensor(shape)
    torch.manual_seed(5)
    assert torch.equal(a, d_randn(shape))
    with pytest.raises(ValueError, match="generators for a batch"):
        core.randn_tensor(shape, gens[:2])
    # a CPU generator with a tensor meant for another device: drawn on the CPU, then moved
    assert core.randn_tensor(shape, torch.Generator().manual_seed(0), device="meta").device.type == "meta"


def test_lms_coefficients_match_diffusers():
    pytest.importorskip("scipy")
    quiet()
    lms = diffusers.LMSDiscreteScheduler()
    lms.set_timesteps(10)
    sigmas = lms.sigmas.tolist()
    for index in (0, 1, 3, 8, 9):
        order = min(index + 1, 4)
        for k in range(order):
            ours = core.lms_coefficient(sigmas, index, order, k)
            assert ours == pytest.approx(lms.get_lms_coefficient(order, index, k), rel=1e-5, abs=1e-7)
    # order 1 is the Euler step: the coefficient is the step length
    assert core.lms_coefficient([3.0, 1.0], 0, 1, 0) == pytest.approx(-2.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_parameterisations_round_trip(prediction_type):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    a_bar = torch.tensor(0.3, dtype=torch.float64)
    alpha_t, sigma_t = a_bar**0.5, (1 - a_bar) ** 0.5
    sample = alpha_t * x0 + sigma_t * eps
    target = {"epsilon": eps, "sample": x0, "v_prediction": alpha_t * eps - sigma_t * x0}[prediction_type]
    x0_hat, eps_hat = core.vp_x0_eps(target, sample, alpha_t, sigma_t, prediction_type)
    assert_close(x0_hat, x0, 1e-12, "x0")
    assert_close(eps_hat, eps, 1e-12, "eps")
    assert_close(core.vp_eps_from_x0(sample, x0, alpha_t, sigma_t), eps, 1e-12, "eps from x0")
    # the same model output seen through the k-diffusion (VE) view: x = sample / alpha_t, sigma = sigma_t / alpha_t
    sigma = sigma_t / alpha_t
    assert_close(core.ve_x0(target, sample / alpha_t, sigma, prediction_type), x0, 1e-12, "VE x0")
    assert_close(core.vp_velocity(x0, eps, a_bar.reshape(1).expand(1000), torch.tensor([5, 6])),
                 alpha_t * eps - sigma_t * x0, 1e-12, "velocity")
    assert_close(core.ve_velocity(x0, eps, sigma.reshape(1)), alpha_t * eps - sigma_t * x0, 1e-12, "VE velocity")
    with pytest.raises(ValueError, match="prediction_type"):
        core.vp_x0_eps(target, sample, alpha_t, sigma_t, "flow")


def test_posterior_and_ddim_transfer():
    a_t, a_prev = torch.tensor(0.2), torch.tensor(0.6)
    ddpm = diffusers.DDPMScheduler()
    ddpm.alphas_cumprod = torch.tensor([0.6, 0.2])
    ddpm.num_inference_steps, ddpm.custom_timesteps, ddpm.timesteps = 2, True, torch.tensor([1, 0])
    assert core.posterior_variance(a_t, a_prev) == pytest.approx(float(ddpm._get_variance(1)), rel=1e-6)
    # DDIM at std = 0 with the true x0/eps maps x_t exactly onto the x_prev of the same (x0, eps)
    x0, eps = torch.randn(5, generator=torch.Generator().manual_seed(0)), torch.randn(5)
    assert_close(core.ddim_transfer(x0, eps, a_prev), a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps, 1e-7, "ddim")
    # posterior mean of the true x0 from x_t = sqrt(a_t) x0 (eps = 0) is sqrt(a_prev) x0 when eps = 0
    assert_close(core.ddpm_posterior_mean(x0, a_t**0.5 * x0, a_t, a_prev), a_prev**0.5 * x0, 1e-6, "posterior mean")


def test_ancestral_split_and_derivative():
    up, down = core.ancestral_split(torch.tensor(3.0), torch.tensor(1.0))
    assert float(up**2 + down**2) == pytest.approx(1.0) and 0 < float(down) < 1
    up_half, _ = core.ancestral_split(torch.tensor(3.0), torch.tensor(1.0), eta=0.5)
    assert float(up_half) == pytest.approx(0.5 * float(up))
    assert_close(core.to_d(torch.tensor([3.0]), torch.tensor([1.0]), 2.0), torch.tensor([1.0]), 0, "to_d")
    g = core.geometric_mean_sigma(torch.tensor([4.0, 9.0]), torch.tensor([1.0, 1.0]))
    assert_close(g, torch.tensor([2.0, 3.0]), 1e-6, "log midpoint")


def test_option_validation_messages():
    with pytest.raises(ValueError, match=r"S: beta_schedule='foo' is not supported; choose one of \['linear'"):
        core.make_betas(T, beta_schedule="foo", owner="S")
    with pytest.raises(ValueError, match="use_karras_sigmas, use_beta_sigmas"):
        core.sigma_schedule_kind("S", True, False, True)
    assert core.sigma_schedule_kind("S", False, None, True) == "beta"
    assert core.sigma_schedule_kind("S", False, False, False) is None
