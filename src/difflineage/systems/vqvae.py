"""VQ-VAE as a system, in two stages, one per config (``model.stage``), each its own class:

1. ``autoencoder``: encoder, vector quantiser and decoder trained on reconstruction (MSE) + the quantiser's
   losses; codebook perplexity and codes in use are logged every step. ``sample`` returns reconstructions of
   training images (an autoencoder has no prior).
2. ``prior``: a gated PixelCNN over the frozen autoencoder's code maps (``model.first_stage``: the stage-1 run),
   class-conditional; the code maps of the training images are computed once. Sampling draws codes position by
   position (``temperature``), then decodes them. The checkpoint holds the autoencoder too, so it samples alone.

``vqvae`` and ``vqvae2`` are registered by their autoencoder stage (``VQVAESystem``, ``VQVAE2System``); a config
with ``model.stage=prior`` builds the prior stage (``VQVAEPrior``, ``VQVAE2Prior``) through ``for_config``. A prior
is composed, not derived from its autoencoder stage: it holds that stage's network as a frozen ``CodeStage`` part
and asks the stage's class for its scores and forward passes (``autoencoder_scores``, ``autoencoder_passes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Literal, Optional

import torch
import torch.nn.functional as F

from difflineage.config import Config
from difflineage.data import AnyBatch, Batch, Dataset, ImageDataset
from difflineage.errors import ConfigError
from difflineage.models.pixelcnn import GatedPixelCNN, PixelCNNConfig
from difflineage.models.vqvae import VQVAE, VQVAE2, VQVAEConfig
from difflineage.systems.base import Condition, Reconstructs, System, batches, reconstruction_scores, spread_images
from difflineage.systems.frozen import CodeStage, FrozenPart
from difflineage.systems.options import TemperatureOptions


@dataclass
class VQVAEAutoencoderConfig:
    """The autoencoder stage's model section. :param stage: autoencoder (this stage: stage 1) or prior (stage 2,
    over the codes of ``first_stage``). :param vq: the autoencoder and its quantiser."""

    stage: Literal["autoencoder", "prior"] = "autoencoder"
    vq: VQVAEConfig = field(default_factory=VQVAEConfig)


@dataclass
class VQVAEPriorConfig(VQVAEAutoencoderConfig):
    """The prior stage's model section (``vq``: the autoencoder's, read from ``first_stage`` when training starts).
    :param first_stage: the stage-1 run or checkpoint directory.
    :param condition: class (the prior is class-conditional) or none.
    :param temperature: default sampling temperature of the prior.
    :param top_prior_layers: VQ-VAE-2: gated layers of the top prior (0: as ``prior.layers``); the paper's top
        prior is the deeper one, since the top codes carry the global layout."""

    stage: Literal["autoencoder", "prior"] = "prior"
    prior: PixelCNNConfig = field(default_factory=PixelCNNConfig)
    first_stage: str = ""
    condition: Literal["none", "class"] = "class"
    temperature: float = 1.0
    top_prior_layers: int = 0

    def check(self) -> None:
        if self.top_prior_layers < 0:
            raise ConfigError("model.top_prior_layers must be 0 (as prior.layers) or more")
        if self.temperature <= 0:
            raise ConfigError(f"model.temperature={self.temperature} must be positive")


# Configs written before each stage had its own hold every stage's settings: the autoencoder's reads the prior's
# and leaves them out (config.build).
VQVAEAutoencoderConfig.other_stages = (VQVAEPriorConfig,)
VQVAEPriorConfig.other_stages = ()


def vq_model_config(model: dict) -> type:
    """The model dataclass of a VQ-VAE or VQ-VAE-2 stage, by ``model.stage`` (an unknown stage is refused by the
    autoencoder's, which names the choices)."""
    return VQVAEPriorConfig if model.get("stage") == "prior" else VQVAEAutoencoderConfig


class VQVAESystem(Reconstructs, System):
    """Stage 1 of VQ-VAE: the autoencoder (see the module docstring)."""

    name = "vqvae"
    title = "VQ-VAE"
    ModelConfig = VQVAEAutoencoderConfig
    SampleOptions = TemperatureOptions
    no_prior = "a VQ-VAE autoencoder reconstructs rather than samples: train the prior stage (model.stage=prior) " \
               "to draw new images"

    def __init__(self, config: Config):
        super().__init__(config)
        self.vqvae = self.make_autoencoder(config)
        self.side = config.data.image_size // self.vqvae.downsampling_factor
        self.register_buffer("preview", torch.zeros(0), persistent=False)

    @classmethod
    def for_config(cls, config: Config) -> type[System]:
        return STAGES[cls.name][config.model.stage]

    @classmethod
    def model_config_for(cls, model: dict) -> type:
        return vq_model_config(model)

    @staticmethod
    def make_autoencoder(config: Config) -> torch.nn.Module:
        d = config.data
        vqvae = VQVAE(config.model.vq, image_channels=d.channels or 1)
        if d.image_size % vqvae.downsampling_factor:
            raise ConfigError(f"data.image_size={d.image_size} is not divisible by the VQ-VAE's downsampling "
                              f"factor {vqvae.downsampling_factor}")
        return vqvae

    @property
    def conditioning(self) -> str:
        return "none"  # an autoencoder takes no class; its prior may

    def prepare(self, dataset: Dataset, restored: bool = False) -> None:
        self.preview = spread_images(dataset, self.device)

    def as_first_stage(self, spec: str) -> CodeStage:
        """The trained autoencoder as the frozen first stage of a prior (``ProvidesFirstStage``)."""
        return CodeStage(self.vqvae, spec, self.config.data.channels or 1)

    # -- training -----------------------------------------------------------------------------------

    def loss(self, batch: Batch, step: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["image"]
        recon, q = self.vqvae(x)
        mse = F.mse_loss(recon.float(), x)
        return mse + q.loss, {"mse": mse.detach(), "commitment": q.commitment_loss.detach(),
                              "perplexity": q.perplexity, "codes_used": q.used.float()}

    # -- sampling -----------------------------------------------------------------------------------

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.vqvae.decode(self.vqvae.encode(x.to(self.device))).float().clamp(-1, 1)

    @torch.no_grad()
    def sample(self, n: int, condition: Condition = None, generator: Optional[torch.Generator] = None,
               options: Optional[TemperatureOptions] = None, **given: Any) -> torch.Tensor:
        """Reconstructions of training images (an autoencoder has no prior yet; its prior's options are accepted)."""
        self.sample_options(options, **given)
        return self.preview_reconstructions(n)

    # -- evaluation ---------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, dataset: ImageDataset, generator: Optional[torch.Generator] = None, progress: bool = True,
                 **options: Any) -> dict[str, float]:
        """Held-out reconstruction error and codebook usage (perplexity, codes used)."""
        return self.autoencoder_scores(self.vqvae, self.config, dataset)

    def forward_passes(self):
        return self.autoencoder_passes(self.vqvae, self.config, self.side)

    # -- what the prior stage asks of this one's network ------------------------------------------------

    @staticmethod
    def autoencoder_scores(vqvae: torch.nn.Module, config: Config, dataset: ImageDataset) -> dict[str, float]:
        """The autoencoder's held-out reconstruction error and codebook usage."""
        device = next(vqvae.parameters()).device
        return reconstruction_scores(dataset, device, vqvae.encode, vqvae.decode, codebook=config.model.vq.codes)

    @staticmethod
    def autoencoder_passes(vqvae: torch.nn.Module, config: Config, side: int) -> dict[str, Callable]:
        """The autoencoder's one-image forward passes (``info`` counts their arithmetic)."""
        d, device = config.data, next(vqvae.parameters()).device
        x = torch.zeros(1, d.channels or 1, d.image_size, d.image_size, device=device)
        codes = torch.zeros(1, side, side, dtype=torch.long, device=device)
        return {"encoder (one image)": lambda: vqvae.encode(x), "decoder (one image)": lambda: vqvae.decode(codes)}


class VQVAEPrior(System):
    """Stage 2 of VQ-VAE: a gated PixelCNN over the code maps of the frozen autoencoder of ``model.first_stage`` (a
    ``CodeStage`` part, loaded before training; its network is registered as ``vqvae``, as in stage 1's
    checkpoints, so the prior's checkpoint samples alone), class-conditional with ``model.condition=class``."""

    name = "vqvae"
    title = "VQ-VAE"
    ModelConfig = VQVAEPriorConfig
    SampleOptions = TemperatureOptions
    autoencoder: ClassVar[type[VQVAESystem]] = VQVAESystem  # the stage whose network it models

    def __init__(self, config: Config):
        super().__init__(config)
        self.vqvae = self.autoencoder.make_autoencoder(config)
        self.side = config.data.image_size // self.vqvae.downsampling_factor
        self.first_stage = CodeStage(self.vqvae, config.model.first_stage, config.data.channels or 1)
        self.build_prior(config.model)

    @classmethod
    def model_config_for(cls, model: dict) -> type:
        return vq_model_config(model)

    def build_prior(self, m: VQVAEPriorConfig) -> None:
        self.prior = GatedPixelCNN(m.prior, m.vq.codes, num_classes=self.num_classes)

    @property
    def conditioning(self) -> str:
        return self.config.model.condition

    def frozen_parts(self) -> list[FrozenPart]:
        return [self.first_stage]

    @classmethod
    def resolve_config(cls, config: Config) -> Config:
        m = config.model
        if not m.first_stage:
            raise ConfigError("model.stage=prior needs model.first_stage: the VQ-VAE autoencoder run to model "
                              "(train it first with model.stage=autoencoder)")
        ckpt = cls.stage_checkpoint(m.first_stage, "first_stage", "autoencoder")
        return replace(config, model=replace(m, vq=ckpt.config.model.vq))

    def prepare(self, dataset: Dataset, restored: bool = False) -> None:
        """The autoencoder of ``model.first_stage`` loaded (a fresh run; a resumed one carries its own copy, even if
        that run has trained on since) and the training set attached to it (its code maps encoded once)."""
        path = self.config.model.first_stage
        if not restored:
            self.first_stage.load(self.stage_checkpoint(path, "first_stage", "autoencoder").part("vqvae."), path)
        self.first_stage.attach(dataset, self.device)

    def codes_of(self, batch: AnyBatch):
        """The batch's code maps (a tuple of maps for several levels): from a latent store, cached in training,
        encoded otherwise."""
        return self.first_stage.encode(batch, self.training)

    def labels_of(self, batch: Batch) -> Optional[torch.Tensor]:
        return batch["label"] if self.uses_labels else None

    def loss(self, batch: Batch, step: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nll = self.prior.nll(self.codes_of(batch), self.labels_of(batch))  # nats per position
        return nll.mean(), {"nll_bits_per_code": (nll.mean() / math.log(2)).detach()}

    @torch.no_grad()
    def sample(self, n: int, condition: Condition = None, generator: Optional[torch.Generator] = None,
               options: Optional[TemperatureOptions] = None, **given: Any) -> torch.Tensor:
        """Codes drawn by the PixelCNN (class ``condition``, or the classes in turn; ``temperature``: the
        recipe's where not given), decoded."""
        o = self.sample_options(options, **given)
        labels = self.labels_for(n, condition) if self.uses_labels else None
        codes = self.prior.sample(n, (self.side, self.side), labels=labels, generator=generator, device=self.device,
                                  temperature=o.temperature or self.config.model.temperature)
        return self.first_stage.decode(codes)

    @torch.no_grad()
    def evaluate(self, dataset: ImageDataset, generator: Optional[torch.Generator] = None, progress: bool = True,
                 **options: Any) -> dict[str, float]:
        """The autoencoder's scores and the prior's held-out negative log-likelihood in bits per code and in bits
        per image dimension."""
        out = self.autoencoder.autoencoder_scores(self.vqvae, self.config, dataset)
        nll = sum(self.prior.nll(self.vqvae.encode(b["image"]), self.labels_of(b)).sum().item()
                  for b in batches(dataset, self.device))
        bits_per_code = nll / len(dataset) / math.log(2)
        d = self.config.data
        out["prior_nll_bits_per_code"] = bits_per_code
        out["prior_nll_bits_per_dim"] = bits_per_code * self.side ** 2 / ((d.channels or 1) * d.image_size ** 2)
        return out

    def forward_passes(self):
        passes = self.autoencoder.autoencoder_passes(self.vqvae, self.config, self.side)
        codes = torch.zeros(1, self.side, self.side, dtype=torch.long, device=self.device)
        labels = torch.zeros(1, dtype=torch.long, device=self.device) if self.uses_labels else None
        passes[f"prior: one pass (of {self.side ** 2} per image)"] = lambda: self.prior(codes, labels)
        return passes


class TopCondition(torch.nn.Module):
    """Top codes -> a conditioning map at the bottom resolution for the bottom prior (embedding, 2x nearest)."""

    def __init__(self, codes: int, width: int = 32):
        super().__init__()
        self.embed = torch.nn.Embedding(codes, width)

    def forward(self, top: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.embed(top).movedim(-1, 1), scale_factor=2, mode="nearest")


class VQVAE2System(VQVAESystem):
    """VQ-VAE-2 (Razavi et al. 2019), stage 1: two code levels (top at half the bottom's side); both quantisers
    and the decoder are trained on reconstruction. Stage 2 is :class:`VQVAE2Prior`."""

    name = "vqvae2"
    title = "VQ-VAE-2"

    @staticmethod
    def make_autoencoder(config: Config) -> torch.nn.Module:
        d = config.data
        vqvae = VQVAE2(config.model.vq, image_channels=d.channels or 1)
        f = vqvae.downsampling_factor * 2
        if d.image_size % f:
            raise ConfigError(f"data.image_size={d.image_size} is not divisible by VQ-VAE-2's top-level factor {f}")
        return vqvae

    def loss(self, batch: Batch, step: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["image"]
        recon, (q_t, q_b) = self.vqvae(x)
        mse = F.mse_loss(recon.float(), x)
        return mse + q_t.loss + q_b.loss, {"mse": mse.detach(), "perplexity_top": q_t.perplexity,
                                          "perplexity_bottom": q_b.perplexity, "codes_used_top": q_t.used.float(),
                                          "codes_used_bottom": q_b.used.float()}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.vqvae.decode(*self.vqvae.encode(x.to(self.device))).float().clamp(-1, 1)

    @staticmethod
    def autoencoder_scores(vqvae: torch.nn.Module, config: Config, dataset: ImageDataset) -> dict[str, float]:
        """Held-out reconstruction error and codebook usage per level."""
        device = next(vqvae.parameters()).device
        return reconstruction_scores(dataset, device, vqvae.encode, lambda codes: vqvae.decode(*codes),
                                     codebook=config.model.vq.codes, levels=("top", "bottom"))

    @staticmethod
    def autoencoder_passes(vqvae: torch.nn.Module, config: Config, side: int) -> dict[str, Callable]:
        d, device = config.data, next(vqvae.parameters()).device
        x = torch.zeros(1, d.channels or 1, d.image_size, d.image_size, device=device)
        top = torch.zeros(1, side // 2, side // 2, dtype=torch.long, device=device)
        bottom = torch.zeros(1, side, side, dtype=torch.long, device=device)
        return {"encoder (one image)": lambda: vqvae.encode(x), "decoder (one image)": lambda: vqvae.decode(top, bottom)}


class VQVAE2Prior(VQVAEPrior):
    """VQ-VAE-2, stage 2: a class-conditional top PixelCNN and a bottom PixelCNN conditioned on the class and the
    top codes (loss: the sum of their NLLs), over the frozen two-level autoencoder's codes. Sampling: top codes,
    then bottom codes given them, then decoding."""

    name = "vqvae2"
    title = "VQ-VAE-2"
    autoencoder = VQVAE2System

    def build_prior(self, m: VQVAEPriorConfig) -> None:
        top = replace(m.prior, layers=m.top_prior_layers or m.prior.layers)
        self.prior = GatedPixelCNN(top, m.vq.codes, num_classes=self.num_classes)  # the top prior
        self.top_cond = TopCondition(m.vq.codes)
        self.prior_bottom = GatedPixelCNN(m.prior, m.vq.codes, num_classes=self.num_classes, cond_channels=32)

    def level_nlls(self, top: torch.Tensor, bottom: torch.Tensor, labels: Optional[torch.Tensor]):
        """Per-image NLLs (nats per position) of the top codes and of the bottom codes given the top ones."""
        return self.prior.nll(top, labels), self.prior_bottom.nll(bottom, labels, self.top_cond(top))

    def loss(self, batch: Batch, step: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nll_t, nll_b = (v.mean() for v in self.level_nlls(*self.codes_of(batch), self.labels_of(batch)))
        return nll_t + nll_b, {"nll_bits_per_code_top": (nll_t / math.log(2)).detach(),
                               "nll_bits_per_code_bottom": (nll_b / math.log(2)).detach()}

    @torch.no_grad()
    def sample(self, n: int, condition: Condition = None, generator: Optional[torch.Generator] = None,
               options: Optional[TemperatureOptions] = None, **given: Any) -> torch.Tensor:
        """Top codes, then bottom codes given them, drawn by the two PixelCNNs (class ``condition`` by name or
        number, or the classes in turn; ``temperature``: the recipe's where not given), decoded to [-1, 1]."""
        o = self.sample_options(options, **given)
        labels = self.labels_for(n, condition) if self.uses_labels else None
        tau = o.temperature or self.config.model.temperature
        top = self.prior.sample(n, (self.side // 2, self.side // 2), labels=labels, generator=generator,
                                device=self.device, temperature=tau)
        bottom = self.prior_bottom.sample(n, (self.side, self.side), labels=labels, cond_map=self.top_cond(top),
                                          generator=generator, device=self.device, temperature=tau)
        return self.first_stage.decode((top, bottom))

    @torch.no_grad()
    def evaluate(self, dataset: ImageDataset, generator: Optional[torch.Generator] = None, progress: bool = True,
                 **options: Any) -> dict[str, float]:
        """The autoencoder's scores and, per level, the priors' NLL in bits per code, with the total in bits per
        image dimension."""
        out = self.autoencoder.autoencoder_scores(self.vqvae, self.config, dataset)
        nll = [0.0, 0.0]
        for batch in batches(dataset, self.device):
            for i, v in enumerate(self.level_nlls(*self.vqvae.encode(batch["image"]), self.labels_of(batch))):
                nll[i] += v.sum().item()
        n, d = len(dataset), self.config.data
        bits = [v / n / math.log(2) for v in nll]
        out["prior_nll_bits_per_code_top"], out["prior_nll_bits_per_code_bottom"] = bits
        positions = ((self.side // 2) ** 2, self.side ** 2)
        out["prior_nll_bits_per_dim"] = (bits[0] * positions[0] + bits[1] * positions[1]) / \
            ((d.channels or 1) * d.image_size ** 2)
        return out

    def forward_passes(self):
        passes = self.autoencoder.autoencoder_passes(self.vqvae, self.config, self.side)
        top = torch.zeros(1, self.side // 2, self.side // 2, dtype=torch.long, device=self.device)
        bottom = torch.zeros(1, self.side, self.side, dtype=torch.long, device=self.device)
        labels = torch.zeros(1, dtype=torch.long, device=self.device) if self.uses_labels else None
        passes[f"top prior: one pass (of {(self.side // 2) ** 2} per image)"] = lambda: self.prior(top, labels)
        passes[f"bottom prior: one pass (of {self.side ** 2} per image)"] = \
            lambda: self.prior_bottom(bottom, labels, self.top_cond(top))
        return passes


# The class that builds each stage of the two systems (System.for_config).
STAGES = {"vqvae": {"autoencoder": VQVAESystem, "prior": VQVAEPrior},
          "vqvae2": {"autoencoder": VQVAE2System, "prior": VQVAE2Prior}}
