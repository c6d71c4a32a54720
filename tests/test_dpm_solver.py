"""DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler, step by step, on the same model function."""

import numpy as np
import pytest
import torch

from difflineage.diffusion.dpm_solver import dpm_solver_pp_2m, dpm_solver_timesteps
from difflineage.diffusion.gaussian import GaussianDiffusion
from difflineage.diffusion.schedules import linear_betas


def model(x, t):
    """A fixed smooth function of (x, t) standing in for a network: its output depends on both."""
    tt = t.float().view(-1, *([1] * (x.dim() - 1))) / 1000.0
    return torch.tanh(0.7 * x + torch.sin(3 * tt) - 0.2 * x.roll(1, dims=-1))


def diffusers_steps(prediction: str, steps: int, x: torch.Tensor):
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear", solver_order=2, algorithm_type="dpmsolver++",
                                        solver_type="midpoint", prediction_type=prediction)
    sched.set_timesteps(steps)
    out = []
    for t in sched.timesteps:
        x = sched.step(model(x, t.view(1).expand(len(x))), t, x).prev_sample
        out.append(x)
    return [int(t) for t in sched.timesteps], out


@pytest.mark.parametrize("prediction,steps", [("epsilon", 10), ("epsilon", 5), ("v_prediction", 10), ("epsilon", 20)])
def test_every_step_equals_diffusers(prediction, steps):
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    their_t, theirs = diffusers_steps(prediction, steps, x.clone())
    ours_t = dpm_solver_timesteps(1000, steps)
    assert ours_t == sorted(their_t)
    chain = GaussianDiffusion(linear_betas(1000), prediction="eps" if prediction == "epsilon" else "v").respaced(ours_t)
    seen = []
    final = dpm_solver_pp_2m(chain, model, x.clone(), on_step=lambda i, xi: seen.append(xi))
    assert len(seen) == steps
    for k, (a, b) in enumerate(zip(seen, theirs)):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), f"step {k}: max diff {(a - b).abs().max():.3g}"
    assert torch.equal(final, seen[-1])


def test_learned_variance_channels_are_dropped_for_the_ode():
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    ts = dpm_solver_timesteps(1000, 8)
    fixed = GaussianDiffusion(linear_betas(1000)).respaced(ts)
    learned = GaussianDiffusion(linear_betas(1000), variance="learned_range").respaced(ts)
    with_variance = lambda x, t: torch.cat([model(x, t), torch.full_like(x, 0.9)], 1)  # noqa: E731
    assert torch.equal(dpm_solver_pp_2m(fixed, model, x.clone()), dpm_solver_pp_2m(learned, with_variance, x.clone()))


def test_the_spacing_is_refused_when_it_cannot_hold_the_steps():
    assert dpm_solver_timesteps(1000, 1) == [999]
    assert dpm_solver_timesteps(10, 5) == [2, 4, 5, 7, 9]  # round(linspace(0, 9, 6)) without its 0
    with pytest.raises(ValueError, match="10 steps do not fit in 10 timesteps"):
        dpm_solver_timesteps(10, 10)  # linspace's rounding would visit timestep 4 twice
    with pytest.raises(ValueError, match="1 to 1000 steps, not 0"):
        dpm_solver_timesteps(1000, 0)
    assert np.all(np.diff(dpm_solver_timesteps(1000, 50)) > 0)


def test_it_solves_the_same_ode_as_ddim_with_fewer_steps():
    """DDIM (eta 0) is the first-order solver of the same ODE: at 1000 steps it is the reference; DPM-Solver++ at 20
    steps lands nearer to it than DDIM at 20 steps does."""
    base = GaussianDiffusion(linear_betas(1000))
    x = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(2))

    def solve(sampler, steps):
        from difflineage.diffusion.schedules import space_timesteps

        keep = dpm_solver_timesteps(1000, steps) if sampler == "dpmpp_2m" else space_timesteps(1000, steps)
        chain = base if steps == 1000 else base.respaced(keep)
        return chain.sample(model, x.shape, sampler=sampler, noise=x.clone(), clip_denoised=False, progress=False)

    reference = solve("ddim", 1000)
    err_dpm = (solve("dpmpp_2m", 20) - reference).abs().mean()
    err_ddim = (solve("ddim", 20) - reference).abs().mean()
    assert err_dpm < 0.5 * err_ddim, (err_dpm, err_ddim)


def test_a_dit_samples_with_dpm_solver(tmp_path):
    from test_dit_system import tiny_dit_dict

    import difflineage
    from difflineage.systems import config_from_dict
    from difflineage.train import Trainer

    Trainer(config_from_dict(tiny_dit_dict(steps=3)), tmp_path, progress=False).fit()
    system = difflineage.load(tmp_path)
    a = system.sample(4, condition=2, generator=torch.Generator().manual_seed(0), sampler="dpmpp_2m", steps=5)
    b = system.sample(4, condition=2, generator=torch.Generator().manual_seed(0), sampler="dpmpp_2m", steps=5)
    assert a.shape == (4, 1, 8, 8) and torch.equal(a, b) and a.abs().max() <= 1
    assert system.chain(5, "dpmpp_2m").timestep_map.tolist() == dpm_solver_timesteps(100, 5)
