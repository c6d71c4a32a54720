"""DiT as a system: the diffusion system with a DiT denoiser, trained with the Gaussian diffusion of DDPM /
improved-diffusion (learned-range variance and the hybrid loss by default, as DiT trains), in the latent space of a
frozen first stage (as the paper does over the Stable Diffusion VAE, ``model.first_stage=sd-vae:PATH``, or over an
``autoencoder_kl`` run of this project) or, with no first stage, in pixel space. Class- or caption-conditional
(the text encoder's pooled embedding into adaLN, its tokens into the cross-attention blocks), with classifier-free
guidance applied to every prediction channel or, as the official sampler does, to the first three only
(``model.guidance_channels=3``, kept to reproduce its FIDs)."""

from __future__ import annotations

import functools
import shutil
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Optional

import torch

from difflineage.diffusion import DiffusionConfig, guided
from difflineage.errors import ConfigError
from difflineage.models.dit import DiT, DiTConfig
from difflineage.models.step_cache import StepCache, choose_reuse
from difflineage.systems.diffusion import DiffusionModelConfig, DiffusionSystem, LatentSpaceFields
from difflineage.systems.options import DiTOptions


# The mean |cached - plain| (pixels in [-1, 1]) of held-back samples past which a step cache is warned about (or,
# fitted, reuses less): about 5 of 255 grey levels on average. Set from two independently trained DiT/DyDiT pairs
# (benchmarks/sampling_spread.py, docs/sampling.md): every cache measured at 0.036 or less kept FID within 1.1x of the
# uncached sampler's (or lowered it) and class accuracy at 96% or more; the ones at 0.063 to 0.080 (DyDiT, 5 steps,
# 20% reused) lost 5 to 15 points of accuracy and raised FID 1.4x to 2x.
STEP_CACHE_TOLERANCE = 0.04


def calibration_samples(classes: int) -> int:
    """How many samples a step cache is calibrated on by default: two per class, at least 16, at most 64."""
    return min(64, max(16, 2 * classes))


def schedule_agreement(chosen: torch.Tensor, others: list[torch.Tensor]) -> float:
    """The share of ``chosen``'s reused (step, block) pairs that every schedule of ``others`` chose too (1.0 when
    nothing is reused)."""
    total = int(chosen.sum())
    if total == 0:
        return 1.0
    shared = chosen.clone()
    for other in others:
        shared &= other
    return int(shared.sum()) / total

# The DiT paper's FID-50K sampling (its sample_ddp.py): 250 DDPM steps, guidance 1.5 (on the channels the model's
# guidance_channels names: the first three of the four latent channels).
DIT_FID_SAMPLING = {"sampler": "ddpm", "steps": 250, "guidance": 1.5}


@dataclass
class DiTSystemConfig(DiffusionModelConfig, LatentSpaceFields):
    """:param dit: the transformer (a named config such as DiT-S/2, or custom sizes).
    :param guidance_channels: how many prediction channels guidance touches (0: all; 3: the official code).
    The space is the first stage's latents when ``first_stage`` (or ``autoencoder``) is set, else pixels."""

    dit: DiTConfig = field(default_factory=DiTConfig)
    diffusion: DiffusionConfig = field(default_factory=lambda: DiffusionConfig(variance="learned_range"))
    guidance_channels: int = 0

    # Earlier versions wrote a UNet section into every DiT run's config (unused): still read, and ignored.
    deprecated_keys: ClassVar[dict[str, Optional[str]]] = {"unet": None}

    def check(self) -> None:
        super().check()
        if self.condition == "none":
            raise ConfigError("model.condition=none: the DiT system is conditioned on a class or a caption "
                              "(condition: class or caption)")
        if self.guidance_channels < 0:
            raise ConfigError("model.guidance_channels must be 0 (all) or a positive count")


class DiTSystem(DiffusionSystem):
    """A DiT in pixels or in a first stage's latents."""

    name = "dit"
    title = "DiT"
    ModelConfig = DiTSystemConfig
    SampleOptions = DiTOptions
    network_name = "dit"
    fid_sampling = DIT_FID_SAMPLING

    def build_network(self, out_channels: int, num_classes: int, context_dim: Optional[int]) -> torch.nn.Module:
        m = self.config.model
        learn_sigma = out_channels == 2 * self.channels
        cfg = replace(m.dit, learn_sigma=learn_sigma, class_dropout=m.cond_drop)
        return DiT(cfg, self.channels, self.side, num_classes, context_dim=context_dim)

    def guide(self, scale: float, cond: dict[str, Any], null: dict[str, Any],
              net: Optional[Callable[..., torch.Tensor]] = None):
        k = self.config.model.guidance_channels or self.channels
        return guided(self.net if net is None else net, scale, cond, null, guide_channels=min(k, self.channels))

    def denoiser(self, options: DiTOptions) -> Callable[..., torch.Tensor]:
        """The DiT, its blocks run through the options' step cache (from :meth:`calibrate_step_cache`, reset for this
        sampling run) where there is one: it reuses blocks' residuals from the previous sampler step where its
        schedule says so."""
        if options.step_cache is None:
            return self.net
        options.step_cache.reset()
        return functools.partial(self.net, block_loop=options.step_cache)

    def compile_blocks(self) -> bool:
        """Compile each transformer block for sampling (torch.compile, static shapes; on the CPU inductor needs a C++
        compiler, and without one this returns False and changes nothing). Block by block rather than the whole
        network, so the step cache's choices between blocks stay plain Python. Parameter names are kept. DyDiT's
        fast path gathers a different number of tokens at every step, so its blocks are left as they are. Calling it
        again (each fast request of the demo does) compiles nothing more."""
        if self.device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
            return False
        for block in self.net.blocks:
            if getattr(block, "_compiled_call_impl", None) is None:  # once: a second call keeps the first's wrapper
                block.compile(dynamic=False)
        return True

    def calibrate_step_cache(self, fraction: float, steps: Optional[int] = None, sampler: Optional[str] = None,
                             n: Optional[int] = None, seed: int = 0, check: int = 8, fit: bool = False,
                             **options: Any) -> StepCache:
        """A step cache for this sampler and step count, from a calibration run with every block computed: the
        ``fraction`` of block evaluations whose residual changed least are reused (models/step_cache.py).

        - **Calibration**: ``n`` samples (default ``calibration_samples``: two per class, at least 16, at most 64),
          their conditions spread over the classes, drawn in two halves of different noise and classes. The schedule
          is chosen from both halves' changes together; ``cache.agreement`` is the share of its choices that the two
          halves, each on its own, would also have made (1.0: the calibration is stable; docs/sampling.md measures it
          against ``n``).
        - **Check**: what the reuse costs is measured on ``check`` held-back samples (other noise than the
          calibration's): ``cache.error``, the mean |cached - plain| of their pixels in [-1, 1].
        - **Tolerance**: past ``STEP_CACHE_TOLERANCE`` a warning says so; with ``fit`` the share reused is halved
          instead, from the same calibration, until the error is within it (down to no reuse at all), and
          ``cache.asked`` keeps the share first asked for."""
        dc = self.config.model.diffusion
        steps, sampler = steps or dc.sample_steps, sampler or dc.sampler
        n = calibration_samples(self.num_classes) if n is None else n
        if n < 2:
            raise ValueError(f"the step cache is calibrated on two halves of its samples: n must be at least 2, not {n}")
        halves = []
        for half, m in enumerate((n - n // 2, n // 2)):
            calibration = StepCache.off(steps, len(self.net.blocks), record=True)
            # the second half goes on with the classes where the first stopped
            condition = (torch.arange(m) + half * (n - n // 2)) % self.num_classes if self.num_classes else None
            self.sample(m, condition=condition, generator=torch.Generator().manual_seed(seed + half), steps=steps,
                        sampler=sampler, step_cache=calibration, **options)
            halves.append(calibration.deltas.clone())
        deltas = (halves[0] * (n - n // 2) + halves[1] * (n // 2)) / n
        held_back = lambda: torch.Generator().manual_seed(seed + 1_000_003)  # noqa: E731
        conditions = torch.arange(check) % self.num_classes if self.num_classes else None
        plain = None  # the held-back samples without the cache: drawn once, whatever the fit tries
        asked = fraction
        while True:
            cache = StepCache(choose_reuse(deltas, fraction), calibration=deltas)
            cache.asked = asked
            cache.agreement = schedule_agreement(cache.reuse, [choose_reuse(d, fraction) for d in halves])
            if check <= 0:
                return cache
            if plain is None:
                plain = self.sample(check, condition=conditions, generator=held_back(), steps=steps, sampler=sampler,
                                    **options)
            cached = self.sample(check, condition=conditions, generator=held_back(), steps=steps, sampler=sampler,
                                 step_cache=cache, **options)
            cache.error = (cached.float() - plain.float()).abs().mean().item()
            if cache.error <= STEP_CACHE_TOLERANCE or not cache.reuse.any():
                return cache
            if not fit:
                warnings.warn(f"the step cache reusing {cache.reuse_fraction:.0%} of block evaluations changes "
                              f"{check} held-back samples by {cache.error:.3f} on average (pixels in [-1, 1]), more "
                              f"than {STEP_CACHE_TOLERANCE}: its samples may differ from the plain sampler's in what "
                              "they show; reuse less (a smaller fraction, or fit=True to find one) or sample without "
                              "it", stacklevel=2)
                return cache
            fraction = fraction / 2 if fraction >= 0.02 else 0.0
