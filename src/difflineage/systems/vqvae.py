"""VQ-VAE as a system, in two stages, one per config (``model.stage``):

1. ``autoencoder``: encoder, vector quantiser and decoder trained on reconstruction (MSE) + the quantiser's
   losses; codebook perplexity and codes in use are logged every step. ``sample`` returns reconstructions of
   training images (an autoencoder has no prior).
2. ``prior``: a gated PixelCNN over the frozen autoencoder's code maps (``model.first_stage``: the stage-1 run),
   class-conditional; the code maps of the training images are computed once. Sampling draws codes position by
   position (``temperature``), then decodes them. The checkpoint holds the autoencoder too, so it samples alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F

from difflineage.config import Config, ConfigError
from difflineage.data import Batch, ImageDataset
from difflineage.models.pixelcnn import GatedPixelCNN, PixelCNNConfig
from difflineage.models.vqvae import VQVAE, VQVAEConfig
from difflineage.systems.base import Condition, System


@dataclass
class VQVAESystemConfig:
    """:param stage: autoencoder (stage 1) or prior (stage 2, over the codes of ``first_stage``).
    :param first_stage: the stage-1 run or checkpoint directory (stage 2).
    :param condition: class (the prior is class-conditional) or none.
    :param temperature: default sampling temperature of the prior."""

    stage: Literal["autoencoder", "prior"] = "autoencoder"
    vq: VQVAEConfig = field(default_factory=VQVAEConfig)
    prior: PixelCNNConfig = field(default_factory=PixelCNNConfig)
    first_stage: str = ""
    condition: Literal["none", "class"] = "class"
    temperature: float = 1.0

    def check(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"model.temperature={self.temperature} must be positive")


class VQVAESystem(System):
    name = "vqvae"
    ModelConfig = VQVAESystemConfig

    def __init__(self, config: Config):
        super().__init__(config)
        m, d = config.model, config.data
        self.vqvae = VQVAE(m.vq, image_channels=d.channels or 1)
        self.side = d.image_size // self.vqvae.downsampling_factor
        if d.image_size % self.vqvae.downsampling_factor:
            raise ConfigError(f"data.image_size={d.image_size} is not divisible by the VQ-VAE's downsampling "
                              f"factor {self.vqvae.downsampling_factor}")
        if m.stage == "prior":
            self.vqvae.requires_grad_(False)
            self.prior = GatedPixelCNN(m.prior, m.vq.codes, num_classes=self.num_classes)
        self.register_buffer("preview", torch.zeros(0), persistent=False)
        self._codes: Optional[torch.Tensor] = None

    @property
    def uses_labels(self) -> bool:
        return self.config.model.stage == "prior" and self.config.model.condition == "class" and \
            bool(self.config.data.num_classes)

    # -- stage 2: the first stage ------------------------------------------------------------------

    @classmethod
    def resolve_config(cls, config: Config) -> Config:
        m = config.model
        if m.stage != "prior":
            return config
        if not m.first_stage:
            raise ConfigError("model.stage=prior needs model.first_stage: the VQ-VAE autoencoder run to model "
                              "(train it first with model.stage=autoencoder)")
        from difflineage.train.checkpoint import load_checkpoint

        ckpt = load_checkpoint(m.first_stage, training_state=False)
        if ckpt.config.system != "vqvae" or ckpt.config.model.stage != "autoencoder":
            raise ConfigError(f"model.first_stage={m.first_stage} is not a VQ-VAE autoencoder checkpoint "
                              f"(system {ckpt.config.system})")
        return replace(config, model=replace(m, vq=ckpt.config.model.vq))

    def prepare(self, dataset: ImageDataset) -> None:
        pick = torch.linspace(0, len(dataset) - 1, min(32, len(dataset))).long()
        self.preview = dataset.batch(pick, self.device)["image"]
        if self.config.model.stage != "prior":
            return
        from difflineage.train.checkpoint import load_checkpoint, load_state_dict_strict

        ckpt = load_checkpoint(self.config.model.first_stage, training_state=False)
        weights = ckpt.ema if ckpt.ema is not None else ckpt.model
        load_state_dict_strict(self.vqvae, {k[len("vqvae."):]: v for k, v in weights.items() if k.startswith("vqvae.")},
                               self.config.model.first_stage)
        self.vqvae.eval()
        with torch.no_grad():
            self._codes = torch.cat([self.vqvae.encode(dataset.batch(range(s, min(s + 500, len(dataset))), self.device)["image"])
                                     for s in range(0, len(dataset), 500)])

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.model.stage == "prior":
            self.vqvae.eval()  # frozen, its quantiser statistics too
        return self

    def codes_of(self, batch: Batch) -> torch.Tensor:
        if self._codes is not None and self.training and batch.get("index") is not None:
            return self._codes[batch["index"].to(self._codes.device)]
        with torch.no_grad():
            return self.vqvae.encode(batch["image"])

    # -- training -----------------------------------------------------------------------------------

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.config.model.stage == "prior":
            codes = self.codes_of(batch)
            nll = self.prior.nll(codes, batch["label"] if self.uses_labels else None)  # nats per position
            return nll.mean(), {"nll_bits_per_code": (nll.mean() / math.log(2)).detach()}
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
               temperature: Optional[float] = None, progress: bool = False, **options: Any) -> torch.Tensor:
        """Prior stage: codes drawn by the PixelCNN (class ``condition``, or the classes in turn), decoded.
        Autoencoder stage: reconstructions of training images (there is no prior yet)."""
        if options:
            raise TypeError(f"unknown sampling options {sorted(options)}; this system takes temperature")
        if self.config.model.stage != "prior":
            if len(self.preview) == 0:
                raise ValueError("a VQ-VAE autoencoder reconstructs rather than samples: train the prior stage "
                                 "(model.stage=prior) to draw new images")
            return self.reconstruct(self.preview[torch.arange(n) % len(self.preview)])
        labels = self.labels_for(n, condition) if self.uses_labels else None
        codes = self.prior.sample(n, (self.side, self.side), labels=labels, generator=generator, device=self.device,
                                  temperature=temperature or self.config.model.temperature)
        return self.vqvae.decode(codes).float().clamp(-1, 1)

    # -- evaluation ---------------------------------------------------------------------------------

    def pictures(self, dataset: ImageDataset, out_dir: Path, generator: Optional[torch.Generator] = None) -> dict[str, Path]:
        from difflineage.images import save_grid

        x = dataset.batch(torch.linspace(0, len(dataset) - 1, min(32, len(dataset))).long(), self.device)["image"]
        pairs = torch.stack([x.cpu(), self.reconstruct(x).cpu()], 1).flatten(0, 1)
        return {"reconstructions": save_grid(pairs, Path(out_dir) / "reconstructions.png", nrow=16, scale=2)}

    @torch.no_grad()
    def evaluate(self, dataset: ImageDataset, generator: Optional[torch.Generator] = None, progress: bool = True,
                 **options: Any) -> dict[str, float]:
        """Held-out reconstruction error, codebook usage (perplexity, codes used) and, for the prior, its
        negative log-likelihood in bits per code and in bits per image dimension."""
        mse, counts, nll = 0.0, torch.zeros(self.config.model.vq.codes), 0.0
        for s in range(0, len(dataset), 250):
            batch = dataset.batch(range(s, min(s + 250, len(dataset))), self.device)
            codes = self.vqvae.encode(batch["image"])
            mse += ((self.vqvae.decode(codes).float().clamp(-1, 1) - batch["image"]) / 2).pow(2).mean((1, 2, 3)).sum().item()
            counts += torch.bincount(codes.flatten().cpu(), minlength=len(counts)).float()
            if self.config.model.stage == "prior":
                nll += self.prior.nll(codes, batch["label"] if self.uses_labels else None).sum().item()
        n = len(dataset)
        p = counts / counts.sum()
        out = {"recon_mse": mse / n, "recon_psnr_db": 10 * math.log10(1.0 / (mse / n)),
               "codebook_perplexity": math.exp(-(p * torch.log(p + 1e-10)).sum().item()),
               "codes_used": int((counts > 0).sum())}
        if self.config.model.stage == "prior":
            bits_per_code = nll / n / math.log(2)
            d = self.config.data
            out["prior_nll_bits_per_code"] = bits_per_code
            out["prior_nll_bits_per_dim"] = bits_per_code * self.side ** 2 / ((d.channels or 1) * d.image_size ** 2)
        return out

    def forward_passes(self):
        d = self.config.data
        x = torch.zeros(1, d.channels or 1, d.image_size, d.image_size, device=self.device)
        codes = torch.zeros(1, self.side, self.side, dtype=torch.long, device=self.device)
        passes = {"encoder (one image)": lambda: self.vqvae.encode(x), "decoder (one image)": lambda: self.vqvae.decode(codes)}
        if self.config.model.stage == "prior":
            labels = torch.zeros(1, dtype=torch.long, device=self.device) if self.uses_labels else None
            passes[f"prior: one pass (of {self.side ** 2} per image)"] = lambda: self.prior(codes, labels)
        return passes
