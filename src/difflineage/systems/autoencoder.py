"""The first stage of latent diffusion: Stable Diffusion's KL-regularised autoencoder, trained on its own.

Loss per image = |x - D(z)|_1 summed over pixels + kl_weight * KL(q(z|x) || N(0, I)) summed over latent
dimensions, z ~ q(z|x) (LDM's reconstruction + small KL; the LPIPS and adversarial terms of SD's recipe are
left out: on 28-32 px digits L1 alone reconstructs sharply). The trained encoder and decoder become the
frozen first stage of ``systems/ldm.py``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from difflineage.config import Config
from difflineage.data import Batch, Dataset, ImageDataset
from difflineage.errors import ConfigError
from difflineage.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from difflineage.nn.distributions import gaussian_kl_standard
from difflineage.systems.base import Condition, Reconstructs, System, reconstruction_scores, spread_images
from difflineage.systems.frozen import GaussianStage
from difflineage.systems.options import SampleOptions


class AutoencoderKLSystem(Reconstructs, System):
    name = "autoencoder_kl"
    title = "Autoencoder (KL)"
    ModelConfig = AutoencoderKLConfig
    no_prior = ("the autoencoder reconstructs images rather than sampling them: use pictures() or reconstruct(); "
                "a first stage's prior is the diffusion model trained on it")

    def __init__(self, config: Config):
        super().__init__(config)
        self.ae = AutoencoderKL(config.model, image_channels=config.data.channels or 1)
        f, side = self.ae.downsampling_factor, config.data.image_size
        if side is not None and side % f:  # the decoder would give back another size than it was given
            raise ConfigError(f"data.image_size={side} does not divide by the autoencoder's downsampling factor {f} "
                              f"({len(config.model.channels)} levels): --set data.image_size={-(-side // f) * f} "
                              "(smaller images are padded to it), or fewer model.channels levels")
        self.register_buffer("preview", torch.zeros(0), persistent=False)

    @property
    def conditioning(self) -> str:
        return "none"

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
               options: Optional[SampleOptions] = None, **given: Any) -> torch.Tensor:
        """An autoencoder has no prior to sample: this returns reconstructions of the preview images
        (training images kept by ``prepare``), so that training grids show the first stage improving."""
        self.sample_options(options, **given)
        return self.preview_reconstructions(n)

    @torch.no_grad()
    def evaluate(self, dataset: ImageDataset, generator: Optional[torch.Generator] = None, progress: bool = True,
                 **options: Any) -> dict[str, float]:
        """Held-out reconstruction error from the posterior mean: L1, MSE and PSNR on [0, 1] pixels."""
        scores = reconstruction_scores(dataset, self.device, lambda x: self.ae.encode(x)[0], self.ae.decode)
        return {**scores, "downsampling_factor": self.ae.downsampling_factor}

    def forward_passes(self):
        d = self.config.data
        x = torch.zeros(1, d.channels or 1, d.image_size, d.image_size, device=self.device)
        z = torch.zeros(1, self.config.model.latent_channels, d.image_size // self.ae.downsampling_factor,
                        d.image_size // self.ae.downsampling_factor, device=self.device)
        return {"encoder (one image)": lambda: self.ae.encode(x), "decoder (one image)": lambda: self.ae.decode(z)}
