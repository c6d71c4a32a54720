"""DyDiT as a system: a trained DiT fine-tuned with DyDiT's routers toward a FLOPs target (Zhao et al. 2025).

``model.base`` names the DiT to start from: a ``dit`` checkpoint or run of this project (what its weights define
is taken over from it: see :func:`inherit_from_base`), or an
official DiT file (``.pt`` / ``.safetensors``, the architecture inferred from its shapes; the recipe then names
the first stage and data). A released DyDiT file (DiT keys plus routers) is accepted too: its routers are kept.

Before fine-tuning, every block's heads and MLP channels are reordered by weight magnitude (no change to the
function), so the always-on unit 0 is the most important one; the routers start with every unit on.

The loss (the paper's): the diffusion loss of the dynamic model, plus the FLOPs loss 2 (mean ratio - target)^2
where the ratio is the share of the whole network's arithmetic computed with the routers' decisions (the paper
counts the blocks' attention and MLP only; here the parts no router touches count as always on, so that lambda is
the ratio a FLOPs counter measures), plus, during the
``router_warmup`` steps, the diffusion loss of the complete model (routers off, same weights); the target
is annealed from 1 to ``target`` (lambda) over the warm-up. ``stratified`` spreads each batch's timesteps
over four equal buckets of the chain.

Sampling uses the fast path (sliced weights per timestep, MLP on the active tokens only); ``mode=masked``
(the released code's way) and ``mode=full`` (routers off) are there for comparison.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from difflineage.config import Config
from difflineage.data import Batch, Dataset
from difflineage.errors import CheckpointError, ConfigError
from difflineage.interop.dit import dit_config_of, infer_dit_settings
from difflineage.interop.dydit import read_dydit_state, width_layout
from difflineage.models.dydit import DyDiT, DyDiTConfig, is_router_key, router_keys_of
from difflineage.systems.base import Condition, read_stage
from difflineage.systems.dit import DiTSystem, DiTSystemConfig
from difflineage.systems.options import DyDiTOptions
from difflineage.weights import load_state_dict_strict


@dataclass
class DyDiTSystemConfig(DiTSystemConfig):
    """:param base: the DiT to fine-tune (a dit checkpoint or run directory, or an official DiT / DyDiT file).
    :param dydit: which routers (width, tokens) and the Gumbel temperature.
    :param target: lambda, the FLOPs ratio the fine-tuning aims at (1 = DiT's).
    :param router_warmup: steps over which the target falls from 1 to ``target``.
    :param complete_steps: steps during which the complete model's diffusion loss (routers off, the same weights)
        is added; None: as many as ``router_warmup``. The released recipe keeps it for its first stage, 30K steps.
    :param stratified: draw each batch's timesteps from four equal buckets of the chain.
    :param router_lr_scale: the routers' learning rate relative to train.lr (they start far on the "on"
        side, bias 15 / 35, and must cross to "off" within a short fine-tuning)."""

    base: str = ""
    dydit: DyDiTConfig = field(default_factory=DyDiTConfig)
    target: float = 0.5
    router_warmup: int = 0
    complete_steps: Optional[int] = None
    stratified: bool = False
    router_lr_scale: float = 1.0

    def check(self) -> None:
        super().check()
        if not 0 < self.target <= 1:
            raise ConfigError(f"model.target={self.target} must lie in (0, 1]: the FLOPs ratio to aim at")
        if self.router_lr_scale <= 0:
            raise ConfigError("model.router_lr_scale must be positive")
        if self.router_warmup < 0:
            raise ConfigError("model.router_warmup must be 0 or more steps")
        if self.complete_steps is not None and self.complete_steps < 0:
            raise ConfigError("model.complete_steps must be 0 or more steps (or null: as many as model.router_warmup)")
        if self.dit.block != "adaln_zero":
            raise ConfigError(f"DyDiT makes adaLN-Zero blocks dynamic; model.dit.block={self.dit.block!r} is not one")



class DyDiTSystem(DiTSystem):
    """DyDiT fine-tuning and sampling (see the module docstring); a :class:`DynamicCompute` system."""

    name = "dydit"
    title = "DyDiT"
    ModelConfig = DyDiTSystemConfig
    SampleOptions = DyDiTOptions
    compute_modes = ("fast", "full")  # the dynamic sampling path, and the complete network's

    def build_network(self, out_channels: int, num_classes: int, context_dim: Optional[int]) -> torch.nn.Module:
        m = self.config.model
        cfg = replace(m.dit, learn_sigma=out_channels == 2 * self.channels, class_dropout=m.cond_drop)
        return DyDiT(cfg, self.channels, self.side, num_classes, context_dim=context_dim, dynamic=m.dydit)

    # -- the base DiT ------------------------------------------------------------------------------

    @classmethod
    def resolve_config(cls, config: Config) -> Config:
        """Take the DiT's architecture, first stage, diffusion and conditioning from ``model.base``."""
        m = config.model
        if not m.base:
            if m.autoencoder is None and not m.first_stage:
                raise ConfigError("model.base is empty: name the DiT to fine-tune (a dit checkpoint or run "
                                  "directory, e.g. runs/quickstart-dit/dit, or an official DiT .pt file)")
            return super().resolve_config(config)
        base = Path(m.base)
        if base.is_dir():
            b = cls.base_checkpoint(m.base).config
            if (b.data.image_size, b.data.channels, b.data.num_classes) != \
                    (config.data.image_size, config.data.channels, config.data.num_classes):
                raise ConfigError(f"model.base={m.base} was trained on {b.data.image_size}px, {b.data.channels}-channel "
                                  f"data with {b.data.num_classes} classes; data.* must match it")
            return replace(config, model=inherit_from_base(m, b.model))
        if not base.is_file():
            raise ConfigError(f"model.base={m.base}: no such checkpoint directory or file")
        state, _ = read_dydit_state(base)
        recipe_heads = m.dit.resolved()[2] if m.dit.name != "custom" else m.dit.heads
        # a DyDiT file's width routers tell its heads and their layout (its routers are loaded as they are)
        heads, keep_first = width_layout(state, str(base), fallback_heads=recipe_heads)
        heads = heads or (recipe_heads if m.dit.name != "custom" else None)
        try:  # a paper size records its heads in the table; a custom size takes the recipe's model.dit.heads
            s = infer_dit_settings(state, str(base), heads=heads)
        except CheckpointError as exc:
            if heads is not None or "none of the paper's DiT sizes" not in str(exc):
                raise
            s = infer_dit_settings(state, str(base), heads=m.dit.heads)
        dit = dit_config_of(s, base=m.dit)
        if keep_first is not None:
            m = replace(m, dydit=replace(m.dydit, keep_first=keep_first))
        variance = "learned_range" if s["learn_sigma"] else \
            (m.diffusion.variance if m.diffusion.variance != "learned_range" else "fixed_small")
        diffusion = replace(m.diffusion, variance=variance)  # the file's output layer says whether sigma is learned
        return super().resolve_config(replace(config, model=replace(m, dit=dit, diffusion=diffusion)))

    @classmethod
    def base_checkpoint(cls, path: str):
        """The ``dit`` (or ``dydit``) checkpoint named by ``model.base``."""
        return read_stage(path, "base", (DiTSystem, cls),
                          "DyDiT fine-tunes a dit one")

    def prepare(self, dataset: Dataset, restored: bool = False) -> None:
        """A fresh run loads the base DiT (and its first stage) and ranks units by importance; a resumed one carries
        them. Then the training set is attached to the latent space (its latents cached)."""
        m = self.config.model
        if restored:
            self.space.prepare(dataset, restored=True)
            return
        if not m.base:
            raise ConfigError("model.base is empty: nothing to fine-tune from")
        base = Path(m.base)
        if base.is_dir():
            ckpt = self.base_checkpoint(m.base)
            weights = ckpt.ema if ckpt.ema is not None else ckpt.model
            prefix = f"{self.network_name}."
            net_state = ckpt.part(prefix)
            others = {k: v for k, v in weights.items() if not k.startswith(prefix)}  # first stage, text, scale
            own_net = {k: v for k, v in self.state_dict().items() if k.startswith(prefix)}
            load_state_dict_strict(self, {**others, **own_net}, str(base))
            self._load_net(net_state, str(base))
            self.space.prepare(dataset, restored=True)  # the base's first stage and latent scale stay
        else:
            self.space.prepare(dataset)  # a latent space's first stage from model.first_stage
            state, _ = read_dydit_state(base)
            self._load_net(state, str(base))

    def _load_net(self, state: dict[str, torch.Tensor], source: str) -> None:
        if router_keys_of(state):  # a DyDiT already: weights and routers as they are
            load_state_dict_strict(self.net, state, source)
        else:
            self.net.load_dit_weights(state, source)
            self.net.rank_units_by_importance()

    # -- training ------------------------------------------------------------------------------------

    def param_groups(self) -> list[dict[str, Any]]:
        routers, rest = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (routers if is_router_key(name) else rest).append(p)
        return [{"params": rest, "lr_scale": 1.0},
                {"params": routers, "lr_scale": self.config.model.router_lr_scale}]

    def flops_target(self, step: Optional[int]) -> float:
        """lambda, annealed linearly from 1 over the router warm-up (step None: after it)."""
        m = self.config.model
        if not m.router_warmup or step is None:
            return m.target
        return 1.0 - (1.0 - m.target) * min(step / m.router_warmup, 1.0)

    def draw_timesteps(self, n: int, device: torch.device) -> torch.Tensor:
        T = self.diffusion.num_timesteps
        if not self.config.model.stratified:
            return torch.randint(0, T, (n,), device=device)
        bucket = torch.arange(n, device=device) % 4  # four equal buckets of the chain, in turn
        return (bucket * T + torch.randint(0, T, (n,), device=device)) // 4

    def loss(self, batch: Batch, step: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x0 = self.space.encode(batch)
        t = self.draw_timesteps(len(x0), x0.device)
        cond = self.condition_kwargs(batch["label"], batch["caption"], train=True)
        noise = torch.randn_like(x0)
        target = self.flops_target(None if step is None else int(step))
        seen: dict[str, Any] = {}

        def dynamic(xt, tt):
            out, seen["usage"] = self.net(xt, tt, **cond, mode="masked", return_usage=True)
            return out

        terms = self.diffusion.training_losses(dynamic, x0, t, noise)
        usage = seen["usage"]
        ratio = self.net.flops_ratio(usage)
        loss_flops = 2.0 * (ratio.mean() - target) ** 2
        loss = terms["loss"].mean() + loss_flops
        metrics = {"mse": terms["mse"].mean().detach(), "flops_ratio": ratio.mean().detach(),
                   "flops_target": torch.tensor(target), "loss_flops": loss_flops.detach(),
                   **{f"{k}_on": v.mean().detach() for k, v in usage.items()}}
        if "vb" in terms:
            metrics["vb"] = terms["vb"].mean().detach()
        m = self.config.model
        complete = m.router_warmup if m.complete_steps is None else m.complete_steps
        if step is not None and int(step) < complete:
            full = self.diffusion.training_losses(lambda xt, tt: self.net(xt, tt, **cond, mode="full"), x0, t, noise)
            loss = loss + full["loss"].mean()
            metrics["mse_full"] = full["mse"].mean().detach()
        return loss, metrics

    # -- sampling ------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, condition: Condition = None, generator: Optional[torch.Generator] = None,
               options: Optional[DyDiTOptions] = None, **given: Any) -> torch.Tensor:
        """Draw ``n`` images in [-1, 1] as a DiT does (``condition``, ``generator``, ``steps``, ``sampler``,
        ``guidance``, ``eta``, ``step_cache``: see ``DiffusionSystem.sample``), with DyDiT's ``mode``: ``fast``
        (default: sliced weights, active tokens only), ``masked`` (the released code's multiply-by-zero) or ``full``
        (routers off: every unit, as the DiT before fine-tuning). Options as ``DyDiTOptions`` or keywords."""
        o = self.sample_options(options, **given)
        was_training = self.net.training
        self.net.eval()  # in training mode the routers would draw Gumbel noise
        try:
            return super().sample(n, condition, generator, o)
        finally:
            self.net.train(was_training)

    def denoiser(self, options: DyDiTOptions) -> Callable[..., torch.Tensor]:
        """DiT's, in the options' ``mode`` (the network's inference mode where none is given)."""
        net = super().denoiser(options)
        return functools.partial(net, mode=options.mode) if options.mode is not None else net

    def compile_blocks(self) -> bool:
        """Nothing is compiled: the fast path gathers a different number of tokens at every step."""
        return False

    @property
    def base(self) -> str:
        """The DiT this DyDiT was fine-tuned from (``model.base``)."""
        return self.config.model.base


def inherit_from_base(recipe: DyDiTSystemConfig, base: DiTSystemConfig) -> DyDiTSystemConfig:
    """The recipe with what the base DiT's weights define taken from the base: the transformer's
    architecture, the first stage, the conditioning and text encoder, and the diffusion process the network
    was trained for (schedule, timesteps, prediction, variance). Run-time choices stay the recipe's: gradient
    checkpointing, condition dropout, latent caching, guidance channels, loss weighting and sampling defaults."""
    dit = replace(base.dit, grad_checkpointing=recipe.dit.grad_checkpointing)
    bd, rd = base.diffusion, recipe.diffusion
    diffusion = replace(rd, schedule=bd.schedule, timesteps=bd.timesteps, prediction=bd.prediction, variance=bd.variance)
    return replace(recipe, dit=dit, diffusion=diffusion, first_stage=base.first_stage, autoencoder=base.autoencoder,
                   sd_vae_norm_groups=base.sd_vae_norm_groups, text=base.text, condition=base.condition,
                   text_encoder=base.text_encoder, text_encoder_digest=base.text_encoder_digest)
