"""The first stage of latent diffusion: Stable Diffusion's KL-regularised autoencoder, trained on its own.

Loss per image = |x - D(z)|_1 summed over pixels + kl_weight * KL(q(z|x) || N(0, I)) summed over latent
dimensions, z ~ q(z|x) (LDM's reconstruction + small KL; the LPIPS and adversarial terms of SD's recipe are
left out: on 28-32 px digits L1 alone reconstructs sharply). The trained encoder and decoder become the
frozen first stage of ``systems/ldm.py``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from difflineage.config import Config
from difflineage.data import Batch, Dataset, ImageDataset
from difflineage.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from difflineage.nn.distributions import gaussian_kl_standard
from difflineage.systems.base import Condition, Reconstructs, System, spread_images
from difflineage.systems.frozen import GaussianStage


class AutoencoderKLSystem(Reconstructs, System):
    name = "autoencoder_kl"
    ModelConfig = AutoencoderKLConfig
    no_prior = ("the autoencoder reconstructs images rather than sampling them: use pictures() or reconstruct(); "
                "a first stage's prior is the diffusion model trained on it")

    def __init__(self, config: Config):
        super().__init__(config)
        self.ae = AutoencoderKL(config.model, image_channels=config.data.channels or 1)
        self.register_buffer("preview", torch.zeros(0), persistent=False)

    @property
    def uses_labels(self) -> bool:
        return False

    def prepare(self, dataset: Dataset, restored: bool = False) -> None:
        """Keep 32 training images spread over the set (the files are sorted by class) for the training grids."""
        self.preview = spread_images(dataset, self.device)

    def as_first_stage(self, spec: str) -> GaussianStage:
        """The trained autoencoder as the frozen first stage of a latent model (``ProvidesFirstStage``)."""
        return GaussianStage(self.ae, spec, self.config.data.channels or 1)

    def loss(self, batch: Batch, step: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = batch["image"]
        recon, mean, logvar = self.ae(x)
        l1 = (recon.float() - x).abs().flatten(1).sum(1)  # per image
        kl = gaussian_kl_standard(mean.float(), logvar.float()).flatten(1).sum(1)
        loss = (l1 + self.config.model.kl_weight * kl).mean()
        return loss, {"l1_per_pixel": (l1.mean() / x[0].numel()).detach(), "kl": kl.mean().detach()}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        mean, _ = self.ae.encode(x.to(self.device))
        return self.ae.decode(mean).clamp(-1, 1)

    @torch.no_grad()
    def sample(self, n: int, condition: Condition = None, generator: Optional[torch.Generator] = None,
               **options: Any) -> torch.Tensor:
        """An autoencoder has no prior to sample: this returns reconstructions of the preview images
        (training images kept by ``prepare``), so that training grids show the first stage improving."""
        return self.preview_reconstructions(n)

    @torch.no_grad()
    def evaluate(self, dataset: ImageDataset, generator: Optional[torch.Generator] = None, progress: bool = True,
                 **options: Any) -> dict[str, float]:
        """Held-out reconstruction error from the posterior mean: L1, MSE and PSNR on [0, 1] pixels."""
        l1 = mse = 0.0
        for s in range(0, len(dataset), 250):
            x = dataset.batch(range(s, min(s + 250, len(dataset))), self.device)["image"]
            r = self.reconstruct(x)
            l1 += (r - x).abs().mean((1, 2, 3)).sum().item() / 2  # [-1, 1] -> [0, 1] units
            mse += ((r - x) / 2).pow(2).mean((1, 2, 3)).sum().item()
        n = len(dataset)
        return {"recon_l1": l1 / n, "recon_mse": mse / n, "recon_psnr_db": 10 * math.log10(1.0 / (mse / n)),
                "downsampling_factor": self.ae.downsampling_factor}

    def forward_passes(self):
        d = self.config.data
        x = torch.zeros(1, d.channels or 1, d.image_size, d.image_size, device=self.device)
        z = torch.zeros(1, self.config.model.latent_channels, d.image_size // self.ae.downsampling_factor,
                        d.image_size // self.ae.downsampling_factor, device=self.device)
        return {"encoder (one image)": lambda: self.ae.encode(x), "decoder (one image)": lambda: self.ae.decode(z)}
