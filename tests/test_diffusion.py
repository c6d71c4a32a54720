import math

import numpy as np
import pytest
import torch

from difflineage.diffusion import GaussianDiffusion, cosine_betas, guided, linear_betas, space_timesteps


def test_linear_schedule_closed_form():
    b = linear_betas(1000)
    assert b.dtype == np.float64 and b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    d = GaussianDiffusion(b)
    # abar_t = prod (1 - beta_s); the schedule leaves almost no signal at T
    assert d.alphas_cumprod[10] == pytest.approx(np.prod(1 - b[:11]), rel=1e-12)
    assert d.alphas_cumprod[-1] < 5e-5


def test_cosine_schedule_closed_form():
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    d = GaussianDiffusion(cosine_betas(T))
    for t in (0, 100, 500, 900):
        assert d.alphas_cumprod[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_q_sample_matches_its_definition():
    d = GaussianDiffusion(linear_betas(100))
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 50, 99])
    a = torch.tensor(d.alphas_cumprod[[0, 50, 99]]).float().view(3, 1, 1, 1)
    assert torch.allclose(d.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-6)


def test_posterior_is_the_bayes_product_of_forward_steps():
    """q(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0); check mean and variance
    against the product of the two Gaussians, computed independently."""
    d = GaussianDiffusion(linear_betas(1000))
    t = 300
    beta, a_prev = d.betas[t], d.alphas_cumprod[t - 1]
    x0, xt = 0.7, -0.2
    # q(x_t | x_{t-1}) = N(sqrt(1 - beta) x_{t-1}, beta) as a function of x_{t-1}: precision (1 - beta) / beta
    prec = (1 - beta) / beta + 1 / (1 - a_prev)
    mean = ((math.sqrt(1 - beta) * xt / beta) + (math.sqrt(a_prev) * x0 / (1 - a_prev))) / prec
    m, v, _ = d.q_posterior(torch.tensor([[x0]]), torch.tensor([[xt]]), torch.tensor([t]))
    assert m.item() == pytest.approx(mean, rel=1e-5) and v.item() == pytest.approx(1 / prec, rel=1e-5)


def test_prediction_conversions_invert_each_other():
    d = GaussianDiffusion(linear_betas(1000))
    x0, eps, t = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3), torch.tensor([1, 10, 500, 999])
    xt = d.q_sample(x0, t, eps)
    assert torch.allclose(d.x0_from_eps(xt, t, eps), x0, atol=2e-3 * 100)  # t = 999 divides by sqrt(abar) ~ 0.006
    assert torch.allclose(d.x0_from_eps(xt[:3], t[:3], eps[:3]), x0[:3], atol=1e-4)
    assert torch.allclose(d.x0_from_v(xt, t, d.v_target(x0, t, eps)), x0, atol=1e-5)


def test_learned_variance_loss_on_a_tiny_case():
    """The hybrid loss = MSE on eps + the bound's term; the bound sees the mean detached, so its gradient
    reaches only the variance channels, and a variance output of +1 (or -1) gives log beta (or the clipped
    log posterior variance) exactly."""
    d = GaussianDiffusion(linear_betas(1000), variance="learned_range")
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    t = torch.tensor([5, 400])
    out = torch.zeros(2, 2, 4, 4, requires_grad=True)
    terms = d.training_losses(lambda x, tt: out, x0, t, noise=torch.randn(2, 1, 4, 4))
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    terms["vb"].sum().backward()
    assert out.grad[:, :1].abs().max() == 0 and out.grad[:, 1:].abs().max() > 0
    xt = torch.randn(2, 1, 4, 4)
    hi = d.p_mean_variance(torch.cat([torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)], 1), xt, t)
    lo = d.p_mean_variance(torch.cat([torch.zeros(2, 1, 4, 4), -torch.ones(2, 1, 4, 4)], 1), xt, t)
    assert torch.allclose(hi["log_variance"][:, 0, 0, 0], torch.tensor(np.log(d.betas[[5, 400]])).float())
    assert torch.allclose(lo["log_variance"][:, 0, 0, 0], torch.tensor(d.posterior_log_variance_clipped[[5, 400]]).float())
    # The bound at t > 0 is a KL between Gaussians: zero when the model's mean and variance equal the posterior's
    eps_hat = d.eps_from_x0(xt, t, x0)
    assert d.vb_terms_bpd(torch.cat([eps_hat, -torch.ones_like(xt)], 1), x0, xt, t)[1].abs() < 1e-4


def test_respacing_keeps_abar_at_the_kept_steps():
    d = GaussianDiffusion(linear_betas(1000))
    r = d.respaced(250)
    assert r.num_timesteps == 250 and r.timestep_map[0] == 0 and r.timestep_map[-1] == 999
    assert np.allclose(r.alphas_cumprod, d.alphas_cumprod[r.timestep_map], rtol=1e-12)
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    with pytest.raises(ValueError, match="cannot take 2000 steps"):
        d.respaced(2000)


def test_respacing_takes_improved_diffusions_timesteps():
    """Hand-worked against improved-diffusion's space_timesteps (the DiT code's respacing)."""
    # "ddimK": the smallest stride giving exactly K steps (30 steps: stride 34, not 1000 // 30 = 33), or refused
    assert space_timesteps(1000, "ddim3") == [0, 334, 668] and space_timesteps(1000, "ddim30")[-1] == 986
    with pytest.raises(ValueError, match="no stride takes exactly 999 DDIM steps"):
        space_timesteps(1000, "ddim999")
    # K steps: the rounding of a running sum of the stride 999 / 20 = 49.95; after 10 additions the sum is
    # 499.49999999999994 and rounds to 499, where 10 x 49.95 = 499.5 would give 500
    assert 499 in space_timesteps(1000, 21) and 500 not in space_timesteps(1000, 21)
    # sections: 1000 = 334 + 333 + 333 timesteps, 10, 15 and 20 steps spread over each
    steps = space_timesteps(1000, "10,15,20")
    assert len(steps) == 45 and steps[:2] == [0, 37] and steps[9] == 333 and steps[10] == 334 and steps[-1] == 999
    assert space_timesteps(1000, 1) == [999]  # the deliberate difference: one step starts from pure noise


def test_ddpm_step_matches_diffusers():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          variance_type="fixed_small", clip_sample=True, prediction_type="epsilon")
    d = GaussianDiffusion(linear_betas(1000))
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    for t in (999, 500, 10, 1, 0):
        ref = sched.step(eps, t, x, generator=torch.Generator().manual_seed(7)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        ours = d.ddpm_step(eps, x, torch.full((2,), t), noise)["sample"]
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4), t


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_matches_diffusers(eta):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          clip_sample=False, set_alpha_to_one=True, prediction_type="epsilon")
    sched.set_timesteps(50)
    d = GaussianDiffusion(linear_betas(1000)).respaced(sorted(sched.timesteps.tolist()))
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(2, 1, 6, 6, generator=g), torch.randn(2, 1, 6, 6, generator=g)
    for i, t in enumerate(sched.timesteps.tolist()[:3] + sched.timesteps.tolist()[-2:]):
        ref = sched.step(eps, t, x, eta=eta, generator=torch.Generator().manual_seed(3)).prev_sample
        idx = d.num_timesteps - 1 - sched.timesteps.tolist().index(t)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
        ours = d.ddim_step(eps, x, torch.full((2,), idx), noise, eta=eta, clip_denoised=False)["sample"]
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4), t


def test_guidance_scale_one_is_the_conditional_model_and_scale_extrapolates():
    def model(x, t, label):
        return x * 0 + label.float().view(-1, 1, 1, 1)  # output = the label, everywhere

    x, t = torch.zeros(2, 1, 2, 2), torch.tensor([3, 3])
    cond, null = {"label": torch.tensor([4, 4])}, {"label": torch.tensor([1, 1])}
    assert torch.equal(guided(model, 1.0, cond, null)(x, t), model(x, t, **cond))
    assert torch.allclose(guided(model, 3.0, cond, null)(x, t), torch.full((2, 1, 2, 2), 1 + 3 * (4 - 1.0)))


def test_guidance_leaves_the_variance_channels_conditional():
    def model(x, t, label):
        return torch.cat([x * 0 + label.float().view(-1, 1, 1, 1)] * 2, 1)

    out = guided(model, 2.0, {"label": torch.tensor([5])}, {"label": torch.tensor([1])}, guide_channels=1)(
        torch.zeros(1, 1, 1, 1), torch.tensor([0]))
    assert out[0, 0].item() == pytest.approx(9.0) and out[0, 1].item() == pytest.approx(5.0)


def test_bits_per_dim_bound_rewards_the_model_that_knows_the_data():
    d = GaussianDiffusion(linear_betas(1000)).respaced(20)
    x0 = torch.zeros(2, 1, 2, 2)  # all mid-grey: an oracle knows x0 exactly
    oracle = lambda xt, t: d.eps_from_x0(xt, torch.searchsorted(torch.as_tensor(d.timestep_map), t), x0)  # noqa: E731
    clueless = lambda xt, t: torch.zeros_like(xt)  # noqa: E731  predicts no noise: x0 = x_t / sqrt(abar)
    good = d.bits_per_dim(oracle, x0, generator=torch.Generator().manual_seed(0))
    bad = d.bits_per_dim(clueless, x0, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(good["bits_per_dim"]).all() and (good["prior_bits_per_dim"] >= 0).all()
    assert (good["prior_bits_per_dim"] < 1e-3).all()  # q(x_T | x_0) is almost N(0, I)
    assert (good["bits_per_dim"] * 2 < bad["bits_per_dim"]).all()


def test_schedule_lookups_come_from_float32_tables_made_once_per_device():
    # No host-device copy per lookup (a host wait on CUDA, every step) and no float64 on the device (MPS has none):
    # each table is copied once as float32 and indexed there; the values are those of rounding each float64 entry.
    d = GaussianDiffusion(linear_betas(100), prediction="v", variance="learned_range", loss_weighting="min_snr")
    t = torch.tensor([0, 1, 50, 99])
    for arr in (d.sqrt_alphas_cumprod, d.posterior_log_variance_clipped, d.log_betas, d.log_fixed_large):
        got = d._at(arr, t, torch.zeros(4, 1, 1))
        assert got.dtype == torch.float32 and got.shape == (4, 1, 1)
        assert torch.equal(got.flatten(), torch.as_tensor(arr, dtype=torch.float64)[t].float())
    tables = dict(d._tables)
    assert all(copy.dtype in (torch.float32, torch.long) for _, copy in tables.values())
    d.training_losses(lambda x, tt: torch.zeros(len(x), 2, 2, 2), torch.zeros(4, 1, 2, 2), t)
    again = len(d._tables)
    d.training_losses(lambda x, tt: torch.zeros(len(x), 2, 2, 2), torch.zeros(4, 1, 2, 2), t)
    assert len(d._tables) == again and all(d._tables[k][1] is v[1] for k, v in tables.items())  # reused, not remade
    snr = d.alphas_cumprod / (1 - d.alphas_cumprod)
    want = torch.as_tensor(np.minimum(snr, 5.0) / (snr + 1))[t].float()
    assert torch.equal(d.min_snr_weight(t), want)
    assert torch.equal(d.model_timesteps(t), t) and torch.equal(d.respaced(10).model_timesteps(torch.tensor([0, 9])),
                                                                 torch.tensor([0, 99]))
