"""VAE (Kingma & Welling, 2014): maximise the evidence lower bound

    ELBO(x) = E_q(z|x)[ log p(x|z) ] - KL( q(z|x) || p(z) )  <=  log p(x)

with one reparameterised sample per image in training; evaluate with the ELBO and the
importance-weighted bound of Burda et al. (2016), log (1/k) sum_i p(x, z_i) / q(z_i|x), which
tightens towards log p(x) as k grows.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from difflineage.config import Config
from difflineage.data import Batch, ImageDataset
from difflineage.images import save_grid
from difflineage.models.vae import VAE, VAEConfig
from difflineage.nn.distributions import (
    bernoulli_log_likelihood,
    discretized_gaussian_log_likelihood,
    gaussian_kl_standard,
    gaussian_log_density,
    nats_to_bits_per_dim,
)
from difflineage.systems.base import Condition, System
from difflineage.systems.options import TemperatureOptions

EVAL_BINARIZE_SEED = 1234  # the one fixed Bernoulli draw of the held-out images used for evaluation


class VAESystem(System):
    name = "vae"
    title = "VAE"
    SampleOptions = TemperatureOptions
    ModelConfig = VAEConfig

    def __init__(self, config: Config):
        super().__init__(config)
        d = config.data
        self.vae = VAE(config.model, image_channels=d.channels or 1, image_size=d.image_size, num_classes=d.num_classes)
        self.dims = (d.channels or 1) * d.image_size**2

    @property
    def conditioning(self) -> str:
        return "class" if self.config.model.conditional else "none"

    # -- the likelihood terms -------------------------------------------------------------------

    def observe(self, image: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The observed x the likelihood is over: binarised pixels in {0, 1} for Bernoulli
        (a random draw for ``dynamic``), the 8-bit image itself in [-1, 1] otherwise."""
        m = self.config.model
        if m.likelihood != "bernoulli":
            return image
        p = (image.float() + 1.0) / 2.0
        if m.binarize == "threshold":
            return (p > 0.5).float()
        return torch.bernoulli(p.clamp(0, 1), generator=generator)

    def observe_fixed(self, image: torch.Tensor) -> torch.Tensor:
        """``observe`` with the one fixed evaluation draw (drawn on the CPU, so it is the same on every device)."""
        return self.observe(image.cpu(), _fixed_generator()).to(self.device)

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 - 1.0 if self.config.model.likelihood == "bernoulli" else x

    def log_likelihood(self, decoded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over pixels: (N,) in nats."""
        if self.config.model.likelihood == "bernoulli":
            ll = bernoulli_log_likelihood(decoded, x)
        else:
            ll = discretized_gaussian_log_likelihood(x, decoded, self.vae.log_scale.expand_as(decoded))
        return ll.flatten(1).sum(1)

    def elbo_terms(self, x: torch.Tensor, label: Optional[torch.Tensor], eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: (log p(x|z) with z = mu + sigma * eps, KL(q(z|x) || N(0, I))), in nats."""
        mean, logvar = (t.float() for t in self.vae.encode(self.encoder_input(x), label))
        z = mean + torch.exp(0.5 * logvar) * eps
        rec = self.log_likelihood(self.vae.decode(z, label), x)
        kl = gaussian_kl_standard(mean, logvar).sum(1)
        return rec, kl

    def loss(self, batch: Batch, step: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.observe(batch["image"])
        eps = torch.randn(len(x), self.config.model.latent_dim, device=x.device)
        rec, kl = self.elbo_terms(x, batch["label"], eps)
        neg_elbo = -(rec - kl).mean()  # nats per image
        metrics = {"neg_elbo_nats": neg_elbo.detach(), "recon_nats": -rec.mean().detach(), "kl_nats": kl.mean().detach(),
                   "bits_per_dim": nats_to_bits_per_dim(neg_elbo.detach(), self.dims)}
        return neg_elbo, metrics

    # -- sampling and pictures -------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, condition: Condition = None, generator: Optional[torch.Generator] = None,
               options: Optional[TemperatureOptions] = None, **given: Any) -> torch.Tensor:
        """Decode z ~ N(0, temperature^2 I) (``temperature``: 1 where not given); returns the mean of p(x|z) in
        [-1, 1]."""
        o = self.sample_options(options, **given)
        temperature = 1.0 if o.temperature is None else o.temperature
        labels = self.labels_for(n, condition)
        z = torch.randn(n, self.config.model.latent_dim, generator=generator, device="cpu").to(self.device) * temperature
        return self.decode_latent(z, labels)

    @property
    def latent_dim(self) -> int:
        return self.config.model.latent_dim

    @torch.no_grad()
    def decode_latent(self, z: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The mean of p(x|z) for latent points ``z`` (N, latent_dim), in [-1, 1] (a ``LatentPlane``)."""
        return self.vae.mean_image(self.vae.decode(z, labels))

    @torch.no_grad()
    def reconstruct(self, image: torch.Tensor, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decode the posterior mean of each image."""
        mean, _ = self.vae.encode(self.encoder_input(self.observe_fixed(image)), label)
        return self.vae.mean_image(self.vae.decode(mean, label))

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, steps: int = 10, label: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decode straight lines between the posterior means of images a and b: (len(a) * steps, C, H, W)."""
        za, _ = self.vae.encode(self.encoder_input(self.observe_fixed(a)), label)
        zb, _ = self.vae.encode(self.encoder_input(self.observe_fixed(b)), label)
        w = torch.linspace(0, 1, steps, device=self.device)[None, :, None]
        z = (za[:, None] * (1 - w) + zb[:, None] * w).flatten(0, 1)
        lab = label.repeat_interleave(steps) if label is not None else None
        return self.vae.mean_image(self.vae.decode(z, lab))

    @torch.no_grad()
    def latent_manifold(self, side: int = 20, label: Optional[int] = None) -> torch.Tensor:
        """Kingma & Welling's figure 4: decode a grid of z through the Gaussian's inverse CDF (2-D z only)."""
        if self.config.model.latent_dim != 2:
            raise ValueError("the latent manifold picture needs model.latent_dim=2")
        p = torch.linspace(0.05, 0.95, side, dtype=torch.float64)
        q = torch.distributions.Normal(0.0, 1.0).icdf(p).float()
        z = torch.stack(torch.meshgrid(q, q.flip(0), indexing="xy"), dim=-1).view(-1, 2).to(self.device)
        labels = self.labels_for(len(z), label) if self.num_classes else None
        return self.vae.mean_image(self.vae.decode(z, labels))

    def pictures(self, dataset: ImageDataset, out_dir: Path, generator: Optional[torch.Generator] = None) -> dict[str, Path]:
        out_dir = Path(out_dir)
        out: dict[str, Path] = {}
        g = generator or torch.Generator().manual_seed(0)
        pick = torch.randperm(len(dataset), generator=g)[:32]
        batch = dataset.batch(pick, self.device)
        labels = batch["label"] if self.num_classes else None
        rec = self.reconstruct(batch["image"], labels)
        pairs = torch.stack([batch["image"].cpu(), rec.cpu()], 1).view(-1, *rec.shape[1:])  # original, recon, ...
        out["reconstructions"] = save_grid(pairs, out_dir / "reconstructions.png", nrow=16, scale=2)
        half = min(8, len(pick) // 2)
        lab = labels[:half] if labels is not None else None
        inter = self.interpolate(batch["image"][:half], batch["image"][half : 2 * half], steps=10, label=lab)
        out["interpolations"] = save_grid(inter, out_dir / "interpolations.png", nrow=10, scale=2)
        if self.config.model.latent_dim == 2:
            out["latent_manifold"] = save_grid(self.latent_manifold(20), out_dir / "latent_manifold.png", nrow=20)
        return out

    def forward_passes(self):
        d, m = self.config.data, self.config.model
        image = torch.zeros(1, d.channels or 1, d.image_size, d.image_size, device=self.device)
        z = torch.zeros(1, m.latent_dim, device=self.device)
        label = torch.zeros(1, dtype=torch.long, device=self.device) if self.num_classes else None
        return {"sampling: decoder (one image)": lambda: self.vae.decode(z, label),
                "training: encoder + decoder (one image)": lambda: self.vae.decode(self.vae.encode(image, label)[0], label)}

    # -- evaluation -------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, dataset: ImageDataset, generator: Optional[torch.Generator] = None, k: int = 1000,
                 batch_size: int = 100, progress: bool = True, **options: Any) -> dict[str, float]:
        """Held-out ELBO and the importance-weighted NLL bound with ``k`` samples per image.

        Bernoulli models see one fixed binarisation of the held-out images (seed 1234), as in the
        literature's dynamically binarised MNIST test set.
        """
        if k < 1:
            raise ValueError(f"k={k}: the importance-weighted bound needs at least one sample")
        g = generator or torch.Generator().manual_seed(0)
        total_elbo = total_iw = 0.0
        L = self.config.model.latent_dim
        chunk = max(1, 4096 // batch_size)
        everything = dataset.batch(range(len(dataset)))
        xs = self.observe_fixed(everything["image"])  # one fixed binarisation of the whole split
        labels = everything["label"].to(self.device) if self.num_classes else None
        bar = tqdm(range(0, len(dataset), batch_size), desc=f"ELBO / IWAE k={k}", disable=not progress, leave=False)
        for start in bar:
            x = xs[start : start + batch_size]
            label = labels[start : start + batch_size] if labels is not None else None
            mean, logvar = (t.float() for t in self.vae.encode(self.encoder_input(x), label))
            log_w = []
            for s in range(0, k, chunk):
                m = min(chunk, k - s)
                eps = torch.randn(m, len(x), L, generator=g).to(self.device)
                z = mean + torch.exp(0.5 * logvar) * eps  # (m, N, L)
                rep = lambda t: t[None].expand(m, *t.shape).reshape(-1, *t.shape[1:])  # noqa: E731
                lab = rep(label) if label is not None else None
                rec = self.log_likelihood(self.vae.decode(z.flatten(0, 1), lab), rep(x)).view(m, len(x))
                log_prior = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z)).sum(-1)
                log_q = gaussian_log_density(z, mean, logvar).sum(-1)
                log_w.append(rec + log_prior - log_q)
            log_w = torch.cat(log_w)  # (k, N)
            total_elbo += log_w.mean(0).sum().item()
            total_iw += (torch.logsumexp(log_w, 0) - math.log(k)).sum().item()
        n = len(dataset)
        neg_elbo, nll = -total_elbo / n, -total_iw / n
        return {"neg_elbo_nats": neg_elbo, "nll_iw_nats": nll, "iw_samples": k, "images": n,
                "neg_elbo_bits_per_dim": nats_to_bits_per_dim(neg_elbo, self.dims),
                "nll_iw_bits_per_dim": nats_to_bits_per_dim(nll, self.dims)}


def _fixed_generator() -> torch.Generator:
    return torch.Generator().manual_seed(EVAL_BINARIZE_SEED)
