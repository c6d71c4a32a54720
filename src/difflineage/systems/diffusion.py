"""Diffusion as a system, by composition: a denoiser (UNet, DiT, DyDiT) in a space (pixels, or the scaled latent
space of a frozen first stage; ``systems/spaces.py``), trained and sampled with the Gaussian diffusion of DDPM /
improved-diffusion (``diffusion/``). Conditioned on a class label or a caption (a text encoder trained with the
denoiser), with the condition dropped for a share of training examples so that one network serves
classifier-free guidance.

The systems of the lineage are this one with a choice of parts: DDPM is a UNet in pixels, LDM a UNet in a first
stage's latents, DiT a DiT in either, DyDiT a DiT fine-tuned with routers.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Optional

import torch

from difflineage.config import Config
from difflineage.data import Batch, Dataset, ImageDataset
from difflineage.diffusion import DiffusionConfig, GaussianDiffusion, Sampler, dpm_solver_timesteps, guided
from difflineage.errors import ConfigError
from difflineage.models.autoencoder_kl import AutoencoderKLConfig
from difflineage.nn.text import TextEncoder, TextEncoderConfig, token_length
from difflineage.systems.base import Condition, System
from difflineage.systems.frozen import FrozenPart
from difflineage.systems.options import DiffusionOptions
from difflineage.systems.spaces import LatentSpace, PixelSpace
from difflineage.systems.text import FrozenTextEncoder, check_text_digest, load_text_encoder, resolve_text_encoder

# Keys of earlier checkpoints -> today's: the first stage and the latent scale now belong to the latent space.
_LEGACY_PREFIXES = {"first_stage.": "space.first_stage.", "latent_scale": "space.latent_scale"}


@dataclass
class DiffusionModelConfig:
    """What every diffusion system's ``model`` section holds.

    :param condition: none, class (label embedding) or caption (text encoder + cross-attention).
    :param cond_drop: share of training examples whose condition is replaced by the null one (guidance).
    :param text: the caption encoder (``condition: caption`` only; null otherwise): trained with the denoiser, or
        with ``text_encoder`` the architecture of that CLIP's text tower (filled in when training starts).
    :param text_encoder: a DALL-E CLIP stage (run or checkpoint, ``model.stage=clip``) whose text tower, frozen,
        encodes the captions (Stable Diffusion's design); empty: a byte-level encoder trained with the denoiser.
    :param text_encoder_digest: sha256 of that tower's weights, recorded when training starts."""

    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    text: Optional[TextEncoderConfig] = None
    condition: Literal["none", "class", "caption"] = "class"
    cond_drop: float = 0.1
    text_encoder: str = ""
    text_encoder_digest: str = ""

    def __post_init__(self) -> None:
        # a text encoder exists only for captions: a class-conditional run's config carries none
        if self.condition != "caption":
            self.text = None
        elif self.text is None:
            self.text = TextEncoderConfig()

    def check(self) -> None:
        if not 0 <= self.cond_drop < 1:
            raise ConfigError(f"model.cond_drop={self.cond_drop} must lie in [0, 1)")


@dataclass
class LatentSpaceFields:
    """The latent space's settings, for the systems that can run in one.

    :param first_stage: the frozen autoencoder: a checkpoint (or run) directory of an ``autoencoder_kl``
        system, or ``sd-vae:PATH`` for Stable Diffusion VAE weights (LDM or diffusers layout).
    :param autoencoder: its architecture; filled in from ``first_stage`` when training starts.
    :param sd_vae_norm_groups: GroupNorm groups of an SD VAE file (not stored in the weights; 32 for SD).
    :param cache_latents: encode the training images once and draw each step's latents from their moments.
    :param latent_scale: a fixed latent scale (Stable Diffusion's VAE: 0.18215, which the official DiT uses);
        None measures 1 / std on the training data (LDM's scale_by_std)."""

    first_stage: str = ""
    autoencoder: Optional[AutoencoderKLConfig] = None
    sd_vae_norm_groups: int = 32
    cache_latents: bool = True
    latent_scale: Optional[float] = None


class DiffusionSystem(System):
    """A denoiser (``network_name`` names its attribute and so its checkpoint prefix; ``build_network`` makes it)
    in a space (``space_class``), trained with ``self.diffusion``."""

    network_name: ClassVar[str]
    SampleOptions = DiffusionOptions

    def __init__(self, config: Config):
        super().__init__(config)
        m, d = config.model, config.data
        if m.condition == "class" and not d.num_classes:
            raise ConfigError(f"model.condition=class needs labelled data; {d.source} has no labels "
                              "(use model.condition=none, or caption with captions.jsonl or metadata.jsonl)")
        space = self.space_class(config)
        self.channels, self.side = space.shape_of(config)
        self.text = TextEncoder(m.text) if m.condition == "caption" else None
        self.text_part = FrozenTextEncoder(self.text, m.text_encoder) if self.text is not None and m.text_encoder else None
        out_channels = self.channels * (2 if m.diffusion.variance == "learned_range" else 1)
        setattr(self, self.network_name, self.build_network(
            out_channels, num_classes=(d.num_classes or 0) if m.condition == "class" else 0,
            context_dim=m.text.width if self.text is not None else None))
        self.space = space(config)  # made after the denoiser, so that a seed gives the weights it always gave
        self.diffusion = m.diffusion.build()
        self._respaced: dict[Any, GaussianDiffusion] = {}

    # -- the parts ------------------------------------------------------------------------------

    @abc.abstractmethod
    def build_network(self, out_channels: int, num_classes: int, context_dim: Optional[int]) -> torch.nn.Module:
        """The denoiser for (``self.channels``, ``self.side``) inputs."""

    @classmethod
    def space_class(cls, config: Config) -> type:
        """Latents when the config names a first stage (or its architecture), else pixels."""
        m = config.model
        return LatentSpace if getattr(m, "first_stage", "") or getattr(m, "autoencoder", None) is not None else PixelSpace

    @property
    def net(self) -> torch.nn.Module:
        """The denoiser: (x_t, t, **condition) -> prediction (and variance channels)."""
        return getattr(self, self.network_name)

    @classmethod
    def resolve_config(cls, config: Config) -> Config:
        """What the space reads from elsewhere (a first stage's architecture) and a frozen text encoder's
        architecture and digest, filled in."""
        return cls.space_class(config).resolve_config(resolve_text_encoder(config))

    @classmethod
    def upgrade_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoints of earlier versions kept the first stage and the latent scale at the top level."""
        out = {}
        for k, v in state.items():
            old = next((p for p in _LEGACY_PREFIXES if k.startswith(p)), None)
            out[_LEGACY_PREFIXES[old] + k[len(old):] if old else k] = v
        return out

    def prepare(self, dataset: Dataset, restored: bool = False) -> None:
        """Before training: the space's parts loaded (a latent space's first stage, its latent scale measured), and
        a frozen text encoder's weights (a resumed run's checked against the digest its config recorded)."""
        self.space.prepare(dataset, restored)
        if self.text_part is not None:
            digest = self.config.model.text_encoder_digest
            if restored:
                check_text_digest(self.text_part, digest, "the checkpoint's text tower is not the one this run froze")
            else:
                load_text_encoder(self.text_part, digest)
            self.text_part.attach(dataset.captions)

    def frozen_parts(self) -> list[FrozenPart]:
        return self.space.parts() + ([self.text_part] if self.text_part is not None else [])

    def pictures(self, dataset: ImageDataset, out_dir, generator: Optional[torch.Generator] = None) -> dict:
        return self.space.pictures(dataset, out_dir, self.device)

    # -- conditioning -----------------------------------------------------------------------------

    @property
    def conditioning(self) -> str:
        """``model.condition`` (class- and caption-conditioned models can both be asked for a class)."""
        return self.config.model.condition

    def condition_kwargs(self, labels: Optional[torch.Tensor], captions: Optional[list[str]],
                         train: bool = False) -> dict[str, Any]:
        """The UNet's conditioning inputs; in training, the condition is dropped with prob. cond_drop."""
        m = self.config.model
        if m.condition == "class":
            return {"labels": self.net.y_embedder.drop(labels) if train else labels}
        if m.condition == "caption":
            if captions is None:
                raise ValueError("this model is caption-conditioned: the data must carry captions")
            if train and m.cond_drop > 0:
                drop = torch.rand(len(captions)) < m.cond_drop
                captions = ["" if dr else c for c, dr in zip(captions, drop.tolist())]
            context, mask, pooled = (self.text_part or self.text)(captions)
            if train:  # the padding past the batch's longest caption is masked out anyway: dropped, it costs nothing
                keep = token_length(captions, m.text.max_length)
                context, mask = context[:, :keep], mask[:, :keep]
            return {"context": context, "context_mask": mask, "pooled": pooled}
        return {}

    def null_kwargs(self, n: int) -> dict[str, Any]:
        m = self.config.model
        if m.condition == "class":
            return {"labels": torch.full((n,), self.net.y_embedder.num_classes, dtype=torch.long, device=self.device)}
        if m.condition == "caption":
            return self.condition_kwargs(None, [""] * n)
        return {}

    # -- training -------------------------------------------------------------------------------

    def loss(self, batch: Batch, step: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x0 = self.space.encode(batch)
        t = torch.randint(0, self.diffusion.num_timesteps, (len(x0),), device=x0.device)
        cond = self.condition_kwargs(batch["label"], batch["caption"], train=True)
        terms = self.diffusion.training_losses(lambda xt, tt: self.net(xt, tt, **cond), x0, t)
        metrics = {"mse": terms["mse"].mean().detach()}
        if "vb" in terms:
            metrics["vb"] = terms["vb"].mean().detach()
        return terms["loss"].mean(), metrics

    # -- sampling -------------------------------------------------------------------------------

    def chain(self, steps: Optional[int], sampler: str = "ddpm") -> GaussianDiffusion:
        """The chain of ``steps`` timesteps a sampler visits: improved-diffusion's spacing for ddpm and ddim,
        diffusers' linspace spacing (from T - 1 down) for DPM-Solver++."""
        steps = steps or self.config.model.diffusion.sample_steps
        key = (steps, sampler == "dpmpp_2m")
        if key not in self._respaced:
            T = self.diffusion.num_timesteps
            if sampler == "dpmpp_2m":
                self._respaced[key] = self.diffusion.respaced(dpm_solver_timesteps(T, steps))
            else:
                self._respaced[key] = self.diffusion if steps == T else self.diffusion.respaced(steps)
        return self._respaced[key]

    @torch.no_grad()
    def sample(self, n: int, condition: Condition = None, generator: Optional[torch.Generator] = None,
               options: Optional[DiffusionOptions] = None, **given: Any) -> torch.Tensor:
        """Draw ``n`` images in [-1, 1], (n, C, H, W).

        :param condition: a class by name (``"seven"``) or number, a tensor of ``n`` labels, or, for a
            caption-conditioned run, a caption (for every sample) or a list of ``n``; None: the classes in turn. A
            run trained on a captions file takes captions only; a class run refuses a caption.
        :param generator: a seeded ``torch.Generator`` for the noise (the same seed draws the same images).
        :param options: a ``DiffusionOptions`` (DiT: ``DiTOptions``, DyDiT: ``DyDiTOptions``), or its fields as
            keywords, each the recipe's where not given: ``steps`` (the chain respaced to this many; diffusers'
            ``num_inference_steps``), ``sampler`` (``ddpm``, ``ddim`` or ``dpmpp_2m``), ``guidance`` (the
            classifier-free scale, 1 = the conditional model alone; diffusers' ``guidance_scale``), ``eta`` (DDIM),
            ``progress``; a DiT also takes ``step_cache`` (``calibrate_step_cache``), a DyDiT ``mode``."""
        o = self.sample_options(options, **given)
        dc = self.config.model.diffusion
        guidance = dc.guidance if o.guidance is None else o.guidance
        if isinstance(condition, str) and self.config.model.condition == "caption":
            condition = [condition] * n  # one caption for every sample (a class model reads it as a class's name)
        captions = None
        if isinstance(condition, list):
            if self.config.model.condition != "caption":
                raise ValueError(f"this model is conditioned on {self.config.model.condition}, not captions")
            captions, labels = condition, None
        else:
            labels = self.labels_for(n, condition) if self.config.model.condition != "none" and \
                (condition is not None or self.num_classes) else None
            if self.config.model.condition == "caption":
                if self.captions_from_file:
                    self.refuse_classes()
                if labels is None:
                    raise ValueError("give captions (a list of strings) to sample from a caption-conditioned model")
                captions = self.captions_for(labels)
        cond = self.condition_kwargs(labels, captions) if self.config.model.condition != "none" else {}
        net = self.denoiser(o)
        fn = self.guide(guidance, cond, self.null_kwargs(n), net) if cond else (lambda x, t: net(x, t))
        sampler = Sampler(o.sampler or dc.sampler).value
        x = self.chain(o.steps, sampler).sample(fn, (n, self.channels, self.side, self.side), sampler=sampler,
                                                eta=dc.eta if o.eta is None else o.eta, generator=generator,
                                                device=self.device, clip_denoised=self.space.clip_denoised,
                                                progress=o.progress)
        return self.space.decode(x)

    def denoiser(self, options: DiffusionOptions) -> Callable[..., torch.Tensor]:
        """The network as sampling calls it, (x_t, t, **condition) -> prediction: ``net`` itself here; a transformer
        runs its blocks through a step cache where the options give one."""
        return self.net

    def guide(self, scale: float, cond: dict[str, Any], null: dict[str, Any],
              net: Optional[Callable[..., torch.Tensor]] = None):
        """Classifier-free guidance of ``net`` (default: the denoiser) on the prediction channels (the variance
        channels follow the condition)."""
        return guided(self.net if net is None else net, scale, cond, null, guide_channels=self.channels)

    # -- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, dataset: ImageDataset, generator: Optional[torch.Generator] = None, progress: bool = True,
                 bpd_images: int = 100, bpd_steps: Optional[int] = None, **options: Any) -> dict[str, float]:
        """The variational bound in bits/dim on the first ``bpd_images`` held-out images, over the full chain
        (or ``bpd_steps`` respaced steps: the bound of that shorter chain), conditioned on their labels."""
        if bpd_images <= 0:
            return {}
        sub = dataset.subset(range(min(bpd_images, len(dataset))))
        chain = self.chain(bpd_steps or self.diffusion.num_timesteps)
        total, prior = [], []
        for s in range(0, len(sub), 50):
            batch = sub.batch(range(s, min(s + 50, len(sub))), self.device)
            cond = self.condition_kwargs(batch["label"], batch["caption"]) if self.config.model.condition != "none" else {}
            x0 = self.space.encode(batch)
            r = chain.bits_per_dim(lambda x, t: self.net(x, t, **cond), x0, generator=generator, progress=progress,
                                   clip_denoised=self.space.clip_denoised)
            total.append(r["bits_per_dim"])
            prior.append(r["prior_bits_per_dim"])
        return {"bits_per_dim": torch.cat(total).mean().item(), "prior_bits_per_dim": torch.cat(prior).mean().item(),
                "bpd_images": len(sub), "bpd_steps": chain.num_timesteps, "bpd_space": self.space.bpd_space}

    def forward_passes(self):
        x = torch.zeros(1, self.channels, self.side, self.side, device=self.device)
        t = torch.zeros(1, dtype=torch.long, device=self.device)
        labels = torch.zeros(1, dtype=torch.long, device=self.device)
        cond = self.condition_kwargs(labels, self.captions_for(labels) if self.num_classes else [""]) \
            if self.config.model.condition != "none" else {}
        return {f"sampling: {self.network_name} (one image, one step)": lambda: self.net(x, t, **cond),
                **self.space.forward_passes(self.device)}
