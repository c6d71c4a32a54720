"""The Gaussian diffusion process of DDPM (Ho et al. 2020) with improved-diffusion's learned variance
(Nichol & Dhariwal 2021), as the DiT code uses it: forward noising, posterior, losses, the variational
bound, and the DDPM and DDIM samplers over the full or a respaced chain.

Notation: x_0 data in [-1, 1]; q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I); the network reads
(x_t, t) and predicts eps, x_0 or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, plus (learned range)
an interpolation v_var in [-1, 1] between log beta_t and the log posterior variance.

All schedule arithmetic is float64 numpy; each lookup returns float32 tensors shaped to broadcast, indexed on the
device from a float32 copy of the table made there once (no host-device copy, and so no host wait, per step;
no float64 on the device, which MPS lacks).
The network is any callable ``model_fn(x_t, t) -> output`` where t is the *original* timestep (0..T-1),
so a respaced chain (250 of 1000 steps) feeds the network the timesteps it was trained on.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from difflineage.data.dataset import to_device
from difflineage.diffusion.dpm_solver import dpm_solver_pp_2m
from difflineage.diffusion.schedules import space_timesteps
from difflineage.nn.distributions import discretized_gaussian_log_likelihood, gaussian_kl

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Sampler(str, Enum):
    DDPM = "ddpm"  # ancestral (Ho et al. 2020)
    DDIM = "ddim"  # Song et al. 2021 (eta 0: deterministic)
    DPMPP_2M = "dpmpp_2m"  # DPM-Solver++(2M), Lu et al. 2022 (diffusion/dpm_solver.py): 10-20 steps


SAMPLERS = tuple(s.value for s in Sampler)


class Prediction(str, Enum):
    EPS = "eps"  # the noise, as DDPM
    X0 = "x0"  # the clean image
    V = "v"  # velocity (Salimans & Ho 2022)


class Variance(str, Enum):
    FIXED_SMALL = "fixed_small"  # the posterior variance beta~_t (DDPM's lower bound)
    FIXED_LARGE = "fixed_large"  # beta_t (DDPM's upper bound)
    LEARNED_RANGE = "learned_range"  # improved-diffusion: interpolate the two in log space, learned


class LossWeighting(str, Enum):
    NONE = "none"
    MIN_SNR = "min_snr"  # Hang et al. (2023): weight each t by min(SNR, 5) relative to the target's own scale


class GaussianDiffusion:
    """One noise schedule and the operations on it. ``respaced(K)`` gives the K-step chain."""

    def __init__(self, betas: np.ndarray, prediction: str = "eps", variance: str = "fixed_small",
                 loss_weighting: str = "none", timestep_map: Optional[np.ndarray] = None,
                 original_num_timesteps: Optional[int] = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.prediction = Prediction(prediction)
        self.variance = Variance(variance)
        self.loss_weighting = LossWeighting(loss_weighting)
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map)
        self.original_num_timesteps = original_num_timesteps or len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0: its log is replaced by beta~_1's, as improved-diffusion does
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:])) \
            if len(betas) > 1 else np.log(np.maximum(self.posterior_variance, 1e-20))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # fixed_large: beta_t, with beta~_1 at t = 0 (as improved-diffusion)
        self.log_fixed_large = np.log(np.append(self.posterior_variance[1], betas[1:]) if len(betas) > 1 else betas)
        self._tables: dict = {}  # (id of a table, device, dtype) -> (the table, its copy on the device)
        self._min_snr: dict = {}  # (prediction, gamma) -> the weights of every timestep, float64

    # -- respacing ------------------------------------------------------------------------------

    def respaced(self, steps: int | str | list[int], final_alpha_cumprod: Optional[float] = None) -> "GaussianDiffusion":
        """The chain that visits only some timesteps: betas recomputed so that abar at each kept step is
        unchanged (improved-diffusion's SpacedDiffusion). ``steps``: K, "K", "ddimK", or a list of timesteps.

        ``final_alpha_cumprod``: the abar the last DDIM step lands on (default 1: clean data). Stable Diffusion's
        scheduler lands on timestep 0's (diffusers' ``set_alpha_to_one=False``): ``self.alphas_cumprod[0]``."""
        keep = sorted(steps) if isinstance(steps, list) else space_timesteps(self.num_timesteps, steps)
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"timesteps must lie in 0..{self.num_timesteps - 1}")
        last, new_betas = 1.0, []
        for i in keep:
            new_betas.append(1.0 - self.alphas_cumprod[i] / last)
            last = self.alphas_cumprod[i]
        chain = GaussianDiffusion(np.array(new_betas), self.prediction.value, self.variance.value,
                                  self.loss_weighting.value, timestep_map=self.timestep_map[keep],
                                  original_num_timesteps=self.original_num_timesteps)
        if final_alpha_cumprod is not None:  # only DDIM's step reads it at the last step (ancestral sampling does not)
            chain.alphas_cumprod_prev = np.append(float(final_alpha_cumprod), chain.alphas_cumprod[:-1])
        return chain

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Indices into this chain -> the original timesteps the network was trained with."""
        return self._table(self.timestep_map, t.device, torch.long)[t]

    def _table(self, arr: np.ndarray, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``arr`` as a ``dtype`` tensor on ``device``, copied there on first use and kept (the float64 values
        rounded to float32 once: the same numbers as rounding each looked-up value)."""
        key = (id(arr), device, dtype)
        held = self._tables.get(key)
        if held is None or held[0] is not arr:
            held = (arr, to_device(torch.from_numpy(np.asarray(arr)).to(dtype), device))
            self._tables[key] = held
        return held[1]

    # -- the forward process --------------------------------------------------------------------

    def _at(self, arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """arr[t] as a float32 tensor shaped (N, 1, 1, ...) to broadcast against ``like``."""
        return self._table(arr, t.device)[t].view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of q(x_t | x_0)."""
        mean = self._at(self.sqrt_alphas_cumprod, t, x0) * x0
        return mean, self._at(self.log_one_minus_alphas_cumprod, t, x0).expand_as(x0)

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._at(self.posterior_variance, t, xt), self._at(self.posterior_log_variance_clipped, t, xt)

    # -- converting between what the network predicts -------------------------------------------

    def x0_from_eps(self, xt, t, eps):
        return self._at(self.sqrt_recip_alphas_cumprod, t, xt) * xt - self._at(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps

    def eps_from_x0(self, xt, t, x0):
        return (self._at(self.sqrt_recip_alphas_cumprod, t, xt) * xt - x0) / self._at(self.sqrt_recipm1_alphas_cumprod, t, xt)

    def x0_from_v(self, xt, t, v):
        return self._at(self.sqrt_alphas_cumprod, t, xt) * xt - self._at(self.sqrt_one_minus_alphas_cumprod, t, xt) * v

    def v_target(self, x0, t, eps):
        return self._at(self.sqrt_alphas_cumprod, t, x0) * eps - self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def split_output(self, out: torch.Tensor, channels: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Network output -> (prediction, variance interpolation or None)."""
        if self.variance == Variance.LEARNED_RANGE:
            if out.shape[1] != 2 * channels:
                raise ValueError(f"learned variance needs {2 * channels} output channels, the network gave {out.shape[1]}")
            return out[:, :channels], out[:, channels:]
        return out, None

    # -- the reverse process --------------------------------------------------------------------

    def p_mean_variance(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True) -> dict:
        """p(x_{t-1} | x_t) from the network output: mean, variance, log_variance, pred_x0, pred_eps."""
        out = out.float()
        pred, var_out = self.split_output(out, xt.shape[1])
        if self.variance == Variance.LEARNED_RANGE:
            min_log = self._at(self.posterior_log_variance_clipped, t, xt)
            max_log = self._at(self.log_betas, t, xt)
            frac = (var_out + 1) / 2  # the network's v in [-1, 1] -> [0, 1]
            log_variance = frac * max_log + (1 - frac) * min_log
        elif self.variance == Variance.FIXED_LARGE:
            log_variance = self._at(self.log_fixed_large, t, xt).expand_as(xt)
        else:
            log_variance = self._at(self.posterior_log_variance_clipped, t, xt).expand_as(xt)

        if self.prediction == Prediction.EPS:
            x0 = self.x0_from_eps(xt, t, pred)
        elif self.prediction == Prediction.X0:
            x0 = pred
        else:
            x0 = self.x0_from_v(xt, t, pred)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior(x0, xt, t)
        return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance, "pred_x0": x0,
                "pred_eps": self.eps_from_x0(xt, t, x0)}

    # -- losses and the bound -------------------------------------------------------------------

    def vb_terms_bpd(self, out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                     clip_denoised: bool = False) -> torch.Tensor:
        """One term of the variational bound per image, in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for
        t > 0, the discretised decoder NLL -log p(x_0|x_1) for t = 0."""
        true_mean, _, true_log_var = self.q_posterior(x0, xt, t)
        p = self.p_mean_variance(out, xt, t, clip_denoised=clip_denoised)
        kl = gaussian_kl(true_mean, true_log_var, p["mean"], p["log_variance"]).flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"]).flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) per image in bits/dim: the bound's prior term (close to 0)."""
        t = torch.full((len(x0),), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, log_var = self.q_mean_variance(x0, t)
        return gaussian_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(log_var)).flatten(1).mean(1) / math.log(2.0)

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor,
                        noise: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Per-image losses at timesteps ``t`` (indices into this chain): ``mse`` on the prediction target,
        ``vb`` (learned variance: the bound's term with the mean detached, scaled by T / 1000 as in
        improved-diffusion's hybrid loss) and their sum ``loss``."""
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)
        out = model_fn(xt, self.model_timesteps(t)).float()
        pred, var_out = self.split_output(out, x0.shape[1])
        target = {Prediction.EPS: noise, Prediction.X0: x0, Prediction.V: self.v_target(x0, t, noise)}[self.prediction]
        mse = (target - pred).pow(2).flatten(1).mean(1)
        if self.loss_weighting == LossWeighting.MIN_SNR:
            mse = mse * self.min_snr_weight(t)
        terms = {"mse": mse}
        if var_out is not None:
            frozen = torch.cat([pred.detach(), var_out], dim=1)  # the bound trains the variance only
            terms["vb"] = self.vb_terms_bpd(frozen, x0, xt, t) * (self.num_timesteps / 1000.0)
            terms["loss"] = mse + terms["vb"]
        else:
            terms["loss"] = mse
        return terms

    def min_snr_weight(self, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
        """min(SNR_t, gamma) / SNR_t for eps, / (SNR_t + 1) for v, and min(SNR_t, gamma) for x_0."""
        key = (self.prediction, gamma)
        if key not in self._min_snr:  # the weights in float64 once, looked up as float32
            snr = self.alphas_cumprod / (1 - self.alphas_cumprod)
            clipped = np.minimum(snr, gamma)
            self._min_snr[key] = {Prediction.EPS: clipped / snr, Prediction.V: clipped / (snr + 1),
                                  Prediction.X0: clipped}[self.prediction]
        return self._table(self._min_snr[key], t.device)[t]

    @torch.no_grad()
    def bits_per_dim(self, model_fn: ModelFn, x0: torch.Tensor, generator: Optional[torch.Generator] = None,
                     progress: bool = False, clip_denoised: bool = True) -> dict[str, torch.Tensor]:
        """The full variational bound per image in bits/dim over this chain: prior + sum of the t terms."""
        total = self.prior_bpd(x0)
        prior = total.clone()
        for i in tqdm(list(range(self.num_timesteps))[::-1], desc="bits/dim bound", disable=not progress, leave=False):
            t = torch.full((len(x0),), i, device=x0.device, dtype=torch.long)
            noise = to_device(torch.randn(x0.shape, generator=generator), x0.device)
            xt = self.q_sample(x0, t, noise)
            total = total + self.vb_terms_bpd(model_fn(xt, self.model_timesteps(t)), x0, xt, t, clip_denoised=clip_denoised)
        return {"bits_per_dim": total, "prior_bits_per_dim": prior}

    # -- samplers -------------------------------------------------------------------------------

    def ddpm_step(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                  clip_denoised: bool = True) -> dict:
        """Ancestral sampling (Ho et al. algorithm 2): x_{t-1} = mean + sigma_t z, no noise at t = 0."""
        p = self.p_mean_variance(out, xt, t, clip_denoised)
        nonzero = (t != 0).float().view(-1, *([1] * (xt.dim() - 1)))
        return {"sample": p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * noise, "pred_x0": p["pred_x0"]}

    def ddim_step(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, eta: float = 0.0,
                  clip_denoised: bool = True) -> dict:
        """DDIM (Song et al. 2021): x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev); eta = 0 is deterministic."""
        p = self.p_mean_variance(out, xt, t, clip_denoised)
        eps = self.eps_from_x0(xt, t, p["pred_x0"])
        a, a_prev = self._at(self.alphas_cumprod, t, xt), self._at(self.alphas_cumprod_prev, t, xt)
        sigma = eta * torch.sqrt((1 - a_prev) / (1 - a)) * torch.sqrt(1 - a / a_prev)
        mean = p["pred_x0"] * torch.sqrt(a_prev) + torch.sqrt((1 - a_prev - sigma**2).clamp(min=0)) * eps
        nonzero = (t != 0).float().view(-1, *([1] * (xt.dim() - 1)))
        return {"sample": mean + nonzero * sigma * noise, "pred_x0": p["pred_x0"]}

    @torch.no_grad()
    def sample(self, model_fn: ModelFn, shape: tuple[int, ...], sampler: str = "ddpm", eta: float = 0.0,
               generator: Optional[torch.Generator] = None, device: torch.device | str = "cpu",
               clip_denoised: bool = True, progress: bool = True, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the reverse chain from x_T ~ N(0, I) (or ``noise``) to x_0. Random draws come from ``generator``
        on the CPU, so a seed gives the same images on any device (copied to it without a host wait)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        sampler = Sampler(sampler).value
        x = to_device(torch.randn(shape, generator=generator), device) if noise is None else noise.to(device)
        if sampler == "dpmpp_2m":  # an ODE solver: no noise after x_T (the chain's steps: dpm_solver_timesteps)
            return dpm_solver_pp_2m(self, model_fn, x, clip_denoised=clip_denoised, progress=progress)
        for i in tqdm(list(range(self.num_timesteps))[::-1], desc=f"{sampler} {self.num_timesteps} steps",
                      disable=not progress, leave=False):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            out = model_fn(x, self.model_timesteps(t))
            z = to_device(torch.randn(shape, generator=generator), device) if (i > 0 and (sampler == "ddpm" or eta > 0)) \
                else torch.zeros(shape, device=device)
            step = self.ddpm_step(out, x, t, z, clip_denoised) if sampler == "ddpm" \
                else self.ddim_step(out, x, t, z, eta, clip_denoised)
            x = step["sample"]
        return x
