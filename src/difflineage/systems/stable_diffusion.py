"""Stable Diffusion 1.x/2.x from its released weights: our UNet, CLIP text tower, tokenizer, ``AutoencoderKL`` and
samplers, put together as Stable Diffusion's pipelines do.

A caption and the negative caption (default "", SD's unconditional prompt) are tokenized to 77 ids and encoded by the
frozen text tower; the UNet denoises ``(4, size / 8, size / 8)`` latents with classifier-free guidance applied as SD
applies it (``uncond + s (cond - uncond)`` on the network's output, eps or v, both halves in one batch); the VAE
decodes ``latents / 0.18215``. The samplers visit the timesteps diffusers' schedulers visit for SD, so that the same
initial latents give the same image as ``StableDiffusionPipeline``:

* ``ddim``: the ``leading`` spacing plus ``steps_offset`` (1, 51, ..., 951 for 20 steps) and a last step onto
  timestep 0's noise level (``set_alpha_to_one=False``), as ``DDIMScheduler`` with SD's scheduler config;
* ``dpmpp_2m``: DPM-Solver++(2M) over the ``linspace`` spacing, as ``DPMSolverMultistepScheduler``;
* ``ddpm``: ancestral sampling over evenly spread timesteps.

``fast=True`` composes the levers that keep the image close: DPM-Solver++(2M) at 20 steps (unless told), the UNet's
feature cache (``FeatureCache``: the deep levels recomputed every third step, DeepCache's rule), and bf16 autocast
where the processor runs it natively. On the CPU the networks run channels-last, the layout oneDNN's convolutions are
fastest in (the same numbers to float rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn

from difflineage.config import Config
from difflineage.data import Batch, Dataset
from difflineage.diffusion.config import DiffusionConfig
from difflineage.diffusion.gaussian import GaussianDiffusion
from difflineage.diffusion.guidance import guided
from difflineage.diffusion.schedules import diffusers_timesteps, linear_betas, scaled_linear_betas
from difflineage.errors import CheckpointError, ConfigError
from difflineage.interop.stable_diffusion import SDWeights, read_stable_diffusion
from difflineage.models.clip_text import CLIPTextEncoder
from difflineage.models.unet import FeatureCache, SpatialTransformer, UNet
from difflineage.nn.clip_tokenizer import CLIPTokenizer
from difflineage.nn.lora import add_lora, lora_state_dict, merge_lora
from difflineage.nn.precision import native_bf16
from difflineage.systems.base import Condition, System
from difflineage.systems.frozen import FrozenPart, GaussianStage, read_once
from difflineage.systems.options import DiffusionOptions
from difflineage.weights import load_state_dict_strict

SD_SAMPLERS = ("ddim", "dpmpp_2m", "ddpm")
FAST_STEPS = 20
FAST_CACHE_INTERVAL = 3


def _betas(scheduler: dict) -> "torch.Tensor":
    kind = scheduler.get("beta_schedule", "scaled_linear")
    n = int(scheduler.get("num_train_timesteps", 1000))
    start, end = float(scheduler.get("beta_start", 0.00085)), float(scheduler.get("beta_end", 0.012))
    if kind == "scaled_linear":
        return scaled_linear_betas(n, start, end)
    if kind == "linear":
        return linear_betas(n, start * n / 1000, end * n / 1000)
    raise CheckpointError(f"beta_schedule={kind!r}: difflineage runs Stable Diffusion's scaled_linear (or linear)")


class StableDiffusion(nn.Module):
    """A Stable Diffusion model in difflineage's networks. Build with :meth:`from_pretrained`."""

    def __init__(self, weights: SDWeights):
        super().__init__()
        io = weights.unet_io
        self.version = weights.version
        self.unet = UNet(weights.unet, io["in_channels"], io["out_channels"], io["sample_size"],
                         context_dim=io["context_dim"])
        load_state_dict_strict(self.unet, weights.unet_state, f"{weights.source} (UNet)")
        self.text_encoder = CLIPTextEncoder(weights.text)
        load_state_dict_strict(self.text_encoder, weights.text_state, f"{weights.source} (text encoder)")
        self.vae = weights.vae
        self.requires_grad_(False).eval()
        self.tokenizer_folder = weights.tokenizer
        self._tokenizer: Optional[CLIPTokenizer] = None
        self.scheduler = dict(weights.scheduler)
        self.latent_scale = weights.latent_scale
        self.diffusion = GaussianDiffusion(_betas(self.scheduler), weights.prediction)
        self.vae_factor = 2 ** (len(self.vae.cfg.channels) - 1)
        self.default_size = io["sample_size"] * self.vae_factor
        self.source = weights.source
        self._layout()

    @property
    def layout(self) -> torch.memory_format:
        """Channels-last on the CPU (oneDNN's fastest convolution layout), contiguous elsewhere."""
        return torch.channels_last if self.device.type == "cpu" else torch.contiguous_format

    def _layout(self) -> None:
        self.unet.to(memory_format=self.layout)
        self.vae.to(memory_format=self.layout)

    def to(self, *args, **kwargs) -> "StableDiffusion":
        super().to(*args, **kwargs)
        self._layout()
        return self

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], version: Optional[str] = None, prediction: Optional[str] = None,
                        tokenizer: Optional[Union[str, Path]] = None,
                        dtype: Optional[torch.dtype] = None) -> "StableDiffusion":
        """From a diffusers folder or an original single file (see ``interop/stable_diffusion.py``). ``dtype``: the
        weights' type (diffusers' ``torch_dtype``), e.g. ``torch.float16`` on a GPU or ``torch.bfloat16`` on a CPU
        with native bf16; the sampler's own arithmetic stays in float32 whatever the networks run in."""
        model = cls(read_stable_diffusion(path, version, prediction, tokenizer))
        return model if dtype is None else model.to(dtype)

    @property
    def tokenizer(self) -> CLIPTokenizer:
        if self._tokenizer is None:
            if self.tokenizer_folder is None:
                raise CheckpointError(f"{self.source}: no tokenizer; a single file holds none, so give the model's "
                                      "tokenizer/ folder (vocab.json, merges.txt): tokenizer=PATH (--tokenizer PATH)")
            self._tokenizer = CLIPTokenizer.from_folder(self.tokenizer_folder, self.text_encoder.cfg.max_length)
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The networks' weight type, one for all three (float32 unless loaded or moved to another)."""
        return self.unet.conv_in.weight.dtype

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> the token features the UNet reads, (N, 77, width)."""
        return self.text_encoder(self.tokenizer(list(captions)).to(self.device))

    def chain(self, sampler: str, steps: int) -> GaussianDiffusion:
        """The respaced process whose steps are the timesteps diffusers' scheduler visits for SD: the folder's
        ``timestep_spacing`` where its scheduler config names one, else each scheduler's default (DDIM leading,
        DPM-Solver++ linspace)."""
        t = self.diffusion.num_timesteps
        offset = int(self.scheduler.get("steps_offset", 1))
        spacing = self.scheduler.get("timestep_spacing")
        if sampler == "ddim":
            if spacing not in (None, "leading"):  # diffusers' DDIM then steps to t - T // K, which it never visits
                raise ConfigError(f"DDIM with timestep_spacing={spacing!r}: difflineage's DDIM follows SD's leading "
                                  "spacing; use sampler dpmpp_2m, or set the scheduler's timestep_spacing to leading")
            final = 1.0 if self.scheduler.get("set_alpha_to_one", False) else float(self.diffusion.alphas_cumprod[0])
            return self.diffusion.respaced(diffusers_timesteps(t, steps, "leading", offset), final_alpha_cumprod=final)
        if sampler == "dpmpp_2m":
            return self.diffusion.respaced(diffusers_timesteps(t, steps, spacing or "linspace", offset, solver=True))
        if sampler == "ddpm":
            return self.diffusion.respaced(steps)
        raise ValueError(f"sampler={sampler!r}; choose one of {', '.join(SD_SAMPLERS)}")

    def latent_shape(self, n: int, size: Union[int, tuple[int, int]]) -> tuple[int, int, int, int]:
        h, w = (size, size) if isinstance(size, int) else size
        f = self.vae_factor
        for side in (h, w):
            if side % f:
                raise ConfigError(f"image size {side} is not divisible by {f} (the VAE's downsampling); use "
                                  f"{side // f * f} or {math.ceil(side / f) * f}")
        return n, self.unet.conv_in.in_channels, h // f, w // f

    @torch.no_grad()
    def sample(self, captions: Union[str, Sequence[str]], negative: Union[str, Sequence[str], None] = None,
               steps: Optional[int] = None, guidance: float = 7.5, sampler: Optional[str] = None,
               seed: Optional[int] = 0, size: Union[int, tuple[int, int], None] = None,
               latents: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
               progress: bool = True, return_latents: bool = False, fast: bool = False,
               feature_cache: Optional[FeatureCache] = None, bf16: Optional[bool] = None,
               compile: bool = False) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] for the captions. ``latents``: the initial noise (N, 4, H/8, W/8), else
        drawn from ``generator`` or ``seed`` on the CPU (the same images on any device). Defaults: DDIM, 50 steps;
        with ``fast``, DPM-Solver++ at 20 steps, the feature cache and bf16 where native (each overridable:
        ``sampler``, ``steps``, ``feature_cache``, ``bf16``). ``compile``: the UNet compiled by ``torch.compile``
        (the plain path only, not with the feature cache; the first call compiles, about two minutes for SD 1.5 on
        two CPU cores, and later calls of the same shape reuse it)."""
        sampler = sampler or ("dpmpp_2m" if fast else "ddim")
        steps = steps or (FAST_STEPS if fast else 50)
        if fast and feature_cache is None:
            feature_cache = FeatureCache(FAST_CACHE_INTERVAL)
        if feature_cache is not None:
            feature_cache.reset()
        bf16 = native_bf16(self.device) if bf16 is None and fast else bool(bf16)
        captions = [captions] if isinstance(captions, str) else list(captions)
        n = len(captions)
        negative = [negative or ""] * n if negative is None or isinstance(negative, str) else list(negative)
        if len(negative) != n:
            raise ValueError(f"{len(negative)} negative captions for {n} captions")
        shape = self.latent_shape(n, size if size is not None else self.default_size) if latents is None \
            else tuple(latents.shape)
        if latents is None:
            generator = generator or (torch.Generator().manual_seed(seed) if seed is not None else None)
            latents = torch.randn(shape, generator=generator)
        context = self.encode_text(captions)
        layout, dtype = self.layout, self.dtype
        if compile and feature_cache is not None:
            raise ValueError("compile applies to the plain path; the feature cache's steps differ from call to call")
        unet = self.compiled_unet() if compile else self.unet

        def model_fn(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            kwargs = {"feature_cache": feature_cache} if feature_cache is not None else {}
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = unet(x.to(dtype=dtype, memory_format=layout), t, context=context, **kwargs)
            return out.float()

        if guidance != 1.0:
            fn = guided(model_fn, guidance, {"context": context}, {"context": self.encode_text(negative)})
        else:
            fn = lambda x, t: model_fn(x, t, context)  # noqa: E731
        chain = self.chain(sampler, steps)
        z = chain.sample(fn, shape, sampler=sampler, device=self.device, clip_denoised=False, progress=progress,
                         noise=latents.to(self.device), generator=generator)
        if return_latents:
            return z
        return self.decode(z, bf16=bf16)

    def compiled_unet(self) -> nn.Module:
        """The UNet under ``torch.compile`` (made once, kept)."""
        if getattr(self, "_compiled", None) is None:
            object.__setattr__(self, "_compiled", torch.compile(self.unet))  # not a submodule: no second state dict
        return self._compiled

    @torch.no_grad()
    def decode(self, z: torch.Tensor, bf16: bool = False) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            z = (z / self.latent_scale).to(dtype=self.dtype, memory_format=self.layout)
            return self.vae.decode(z).float().clamp(-1, 1)




# ---------------------------------------------------------------------------------------------------------------------
# Fine-tuning: Stable Diffusion as a system the trainer trains


@dataclass
class SDTuneConfig:
    """Fine-tuning a released Stable Diffusion on your own captioned images (``system: stable_diffusion``).

    :param pretrained: the model's diffusers folder or original single file (with ``tokenizer``: its tokenizer/
        folder; ``prediction``: eps or v where the files do not say; ``version``: 1.x or 2.x to insist on).
    :param tune: ``lora`` (rank-``lora_rank`` adapters on every attention projection, scaled by ``lora_alpha`` /
        rank; only the adapters are trained and saved) or ``unet`` (the whole UNet).
    :param cond_drop: share of training captions replaced by the empty one (what guidance needs).
    :param sampler, sample_steps, guidance: the sampling defaults (SD's pipelines: DDIM 50, 7.5).
    :param pretrained_digest: sha256 of the pretrained UNet's weights, recorded when the run begins; a run or
        checkpoint whose files have changed since is refused."""

    pretrained: str = ""
    tokenizer: str = ""
    prediction: str = ""
    version: str = ""
    tune: str = "lora"
    lora_rank: int = 4
    lora_alpha: float = 0.0
    cond_drop: float = 0.1
    sampler: str = "ddim"
    sample_steps: int = 50
    guidance: float = 7.5
    pretrained_digest: str = ""

    @property
    def diffusion(self) -> DiffusionConfig:
        """The sampling defaults as every diffusion system's ``model.diffusion`` holds them (what the demo and
        ``info`` read): SD's scaled-linear schedule over 1,000 timesteps, its prediction, sampler, steps, guidance."""
        return DiffusionConfig(schedule="scaled_linear", prediction=self.prediction or "eps", sampler=self.sampler,
                               sample_steps=self.sample_steps, guidance=self.guidance)

    def check(self) -> None:
        if not self.pretrained:
            raise ConfigError("model.pretrained is empty: name the Stable Diffusion model to fine-tune, "
                              "--set model.pretrained=/models/stable-diffusion-v1-5 (a diffusers folder or a single file)")
        if self.tune not in ("lora", "unet"):
            raise ConfigError(f"model.tune={self.tune!r}; choose lora (adapters) or unet (the whole UNet)")
        if self.lora_rank < 1:
            raise ConfigError(f"model.lora_rank={self.lora_rank} must be at least 1")
        if not 0 <= self.cond_drop < 1:
            raise ConfigError(f"model.cond_drop={self.cond_drop} must lie in [0, 1)")
        if self.sampler not in SD_SAMPLERS:
            raise ConfigError(f"model.sampler={self.sampler!r}; choose one of {', '.join(SD_SAMPLERS)}")
        if self.prediction not in ("", "eps", "v"):
            raise ConfigError(f"model.prediction={self.prediction!r}; choose eps or v (or leave it empty)")


def _pretrained(m: SDTuneConfig) -> SDWeights:
    return read_once(("stable-diffusion", str(Path(m.pretrained).resolve()), m.prediction, m.version, m.tokenizer),
                     lambda: read_stable_diffusion(m.pretrained, m.version or None, m.prediction or None,
                                                   m.tokenizer or None))


class StableDiffusionSystem(System):
    """A released Stable Diffusion fine-tuned with the project's trainer: the VAE and the text encoder are frozen
    parts (latents from the images, or from a store made by ``difflineage extract --first-stage
    sd-vae:MODEL/vae/diffusion_pytorch_model.safetensors``), the UNet or its LoRA adapters train on SD's objective
    (noise or v at a uniform timestep, MSE), with EMA and exact resume as every system. Checkpoints keep what trains:
    the adapters alone, or the UNet; the rest is read from ``model.pretrained``, checked by its digest."""

    name = "stable_diffusion"
    title = "Stable Diffusion"
    ModelConfig = SDTuneConfig
    SampleOptions = DiffusionOptions

    def __init__(self, config: Config):
        super().__init__(config)
        m = config.model
        weights = _pretrained(m)
        self.sd = StableDiffusion(weights)
        if m.pretrained_digest and weights.unet_digest != m.pretrained_digest:
            raise CheckpointError(f"model.pretrained={m.pretrained} changed since this run began (its UNet's weights "
                                  f"differ from sha256 {m.pretrained_digest[:12]}); point it at the files the run "
                                  "started from")
        size = config.data.image_size
        if size is not None:
            self.sd.latent_shape(1, size)  # refused here, by name, when not divisible by the VAE's factor
        if m.tune == "lora":
            add_lora(self.sd.unet, m.lora_rank, m.lora_alpha or None, only=[SpatialTransformer])
        else:
            self.sd.unet.requires_grad_(True)
        self.sd.unet.train()
        self.first_stage = GaussianStage(self.sd.vae, f"sd-vae:{m.pretrained}", self.sd.vae.image_channels)
        self.text = FrozenPart(self.sd.text_encoder, f"sd-text:{m.pretrained}")
        trained = lora_state_dict(self.sd.unet) if m.tune == "lora" else self.sd.unet.state_dict()
        self._saved = sorted(f"sd.unet.{k}" for k in trained)

    @classmethod
    def released(cls, path: Union[str, Path], tokenizer: Optional[str] = None,
                 prediction: Optional[str] = None) -> "StableDiffusionSystem":
        """The released model as it is (no adapters), as a system the demo and evaluation serve."""
        from difflineage.config import from_dict

        return cls(from_dict({
            "system": cls.name, "data": {"source": f"folder:{path}", "channels": 3, "image_size": None},
            "model": {"pretrained": str(path), "tokenizer": str(tokenizer or ""), "prediction": prediction or "",
                      "tune": "unet"}}, lambda name, model: SDTuneConfig))

    def chain(self, steps: Optional[int], sampler: str = "ddim") -> GaussianDiffusion:
        """The timesteps ``sampler`` visits at ``steps`` (``Respaces``)."""
        return self.sd.chain(sampler, steps or self.config.model.sample_steps)

    @classmethod
    def resolve_config(cls, config: Config) -> Config:
        """The pretrained UNet's digest recorded (what a resumed run or a loaded checkpoint checks the files against)."""
        m = config.model
        if m.pretrained_digest:
            return config
        from dataclasses import replace

        return replace(config, model=replace(m, pretrained_digest=_pretrained(m).unet_digest))

    @property
    def conditioning(self) -> str:
        return "caption"

    @property
    def net(self) -> nn.Module:
        """The denoiser (``Denoises``): what the demo's step progress and FLOPs counts hook."""
        return self.sd.unet

    def frozen_parts(self) -> list[FrozenPart]:
        return [self.first_stage, self.text]

    # checkpoints keep what trains ----------------------------------------------------------------

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        keep = {prefix + k for k in self._saved}
        for k in [k for k in state if k.startswith(prefix) and k not in keep]:
            del state[k]  # in place: a wrapper (DistributedDataParallel) passes its own destination
        return state

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        if strict:
            missing, extra = sorted(set(self._saved) - set(state)), sorted(set(state) - set(self._saved))
            if missing or extra:
                raise CheckpointError(f"the weights do not fit this {self.config.model.tune} fine-tune: missing "
                                      f"{missing[:4]}, unexpected {extra[:4]}")
        return super().load_state_dict(state, strict=False, assign=assign)

    # training --------------------------------------------------------------------------------------

    def prepare(self, dataset: Dataset, restored: bool = False) -> None:
        """A latent store is checked to be this VAE's; an in-memory training set is encoded once."""
        self.first_stage.attach(dataset, self.device)

    def loss(self, batch: Batch, step: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mean, std = self.first_stage.encode(batch, training=self.training)
        z = (mean + std * torch.randn_like(std)) * self.sd.latent_scale
        captions = list(batch["caption"])
        m = self.config.model
        if self.training and m.cond_drop > 0:
            drop = (torch.rand(len(captions)) < m.cond_drop).tolist()
            captions = ["" if d else c for c, d in zip(captions, drop)]
        with torch.no_grad():
            context = self.sd.text_encoder(self.sd.tokenizer(captions, warn=False).to(self.device))
        d = self.sd.diffusion
        t = torch.randint(0, d.num_timesteps, (z.shape[0],), device=z.device)
        noise = torch.randn_like(z)
        xt = d.q_sample(z, t, noise)
        target = noise if d.prediction.value == "eps" else d.v_target(z, t, noise)
        out = self.sd.unet(xt.contiguous(memory_format=self.sd.layout), t, context=context)
        loss = (out.float() - target).pow(2).mean()
        return loss, {"mse": loss.detach()}

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.sd.unet.parameters() if p.requires_grad], "lr_scale": 1.0}]

    # sampling --------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, condition: Condition = None, generator: Optional[torch.Generator] = None,
               options: Optional[DiffusionOptions] = None, **given: Any) -> torch.Tensor:
        """``n`` images for a caption (each) or a list of ``n`` captions, in [-1, 1]; None: the empty caption (SD's
        unconditional)."""
        o = self.sample_options(options, **given)
        if condition is None:
            captions = [""] * n
        elif isinstance(condition, str):
            captions = [condition] * n
        elif isinstance(condition, list) and len(condition) == n:
            captions = condition
        else:
            raise ValueError("Stable Diffusion draws from captions: give a caption, or a list of n captions")
        m = self.config.model
        sampler = o.sampler.value if hasattr(o.sampler, "value") else o.sampler
        return self.sd.sample(captions, steps=o.steps or m.sample_steps, sampler=sampler or m.sampler,
                              guidance=m.guidance if o.guidance is None else o.guidance, seed=None,
                              generator=generator, size=self.config.data.image_size, progress=o.progress)

    def forward_passes(self):
        side = (self.config.data.image_size or self.sd.default_size) // self.sd.vae_factor
        z = torch.zeros(1, self.sd.unet.conv_in.in_channels, side, side, device=self.device)
        t = torch.zeros(1, dtype=torch.long, device=self.device)
        ctx = torch.zeros(1, self.sd.text_encoder.cfg.max_length, self.sd.text_encoder.cfg.width, device=self.device)
        return {"sampling: unet (one image, one step)": lambda: self.sd.unet(z, t, context=ctx)}

    def merged_unet_state(self) -> dict[str, torch.Tensor]:
        """The UNet with any adapters folded in, as a plain UNet's state dict (the weights a diffusers folder or a
        single file takes)."""
        import copy

        unet = copy.deepcopy(self.sd.unet)
        merge_lora(unet)
        return unet.state_dict()


__all__ = ["SD_SAMPLERS", "SDTuneConfig", "StableDiffusion", "StableDiffusionSystem"]
