"""Sampling options, declared: one frozen dataclass per kind of system, which ``System.sample`` takes (as an instance,
or as keyword arguments that build one) and from which the command line, the demo and evaluation build their
controls. A field's metadata says what it does (``help``) and whether a command offers it (``cli``); an option a
system does not declare is refused by name. A field left at None takes the run's own setting (its recipe's).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from difflineage.diffusion import SAMPLERS, Sampler
from difflineage.models.dydit import MODES
from difflineage.models.step_cache import StepCache


def option(help: str, default: Any = None, cli: bool = True, choices: Optional[tuple] = None,
           aliases: tuple[str, ...] = ()) -> Any:
    """A declared sampling option: ``help`` for the controls, ``cli`` whether commands offer it, ``choices``, and
    the names the field's other code uses for it (``aliases``: diffusers' keyword arguments, the official DiT
    scripts' flags), accepted as well."""
    return field(default=default, metadata={"help": help, "cli": cli, "choices": choices, "aliases": aliases})


@dataclass(frozen=True)
class SampleOptions:
    """What every system's ``sample`` takes (an autoencoder's reconstructions take nothing else)."""

    progress: bool = option("a progress bar over the sampler's steps", default=False, cli=False)

    @classmethod
    def of(cls, options: Optional["SampleOptions"] = None, **given: Any) -> "SampleOptions":
        """``options`` (of this kind, or of a kind whose fields this one has) with ``given`` on top; an option this
        kind does not declare, given or set, is refused with the ones it has."""
        names = [f.name for f in fields(cls)]
        given = cls.unaliased(given)
        carried = {} if options is None else {f.name: getattr(options, f.name) for f in fields(options)
                                              if getattr(options, f.name) != f.default}
        unknown = sorted(k for k in {**carried, **given} if k not in names)
        if unknown:
            takes = ", ".join(n for n in names if n != "progress") or "no options"
            raise TypeError(f"unknown sampling options {unknown}; this system takes {takes}")
        return cls(**{**carried, **given})

    @classmethod
    def unaliased(cls, given: dict[str, Any]) -> dict[str, Any]:
        """``given`` with the field's other names (``guidance_scale``, ``num_inference_steps``, ...) as this
        kind's; the same option given under two names is refused."""
        alias = {a: f.name for f in fields(cls) for a in f.metadata.get("aliases", ())}
        out: dict[str, Any] = {}
        for key, value in given.items():
            name = alias.get(key, key)
            if name in out:
                raise TypeError(f"the sampling option {name!r} is given twice (as {key!r} too); give it once")
            out[name] = value
        return out

    @classmethod
    def controls(cls) -> dict[str, dict[str, Any]]:
        """The options a command offers, by name: {"type", "help", "choices"} (the type without Optional)."""
        hints = typing.get_type_hints(cls)
        out = {}
        for f in fields(cls):
            if not f.metadata.get("cli", True):
                continue
            kind = hints[f.name]
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            kind = args[0] if args else kind
            choices = f.metadata.get("choices") or (tuple(m.value for m in kind) if kind is Sampler else None)
            out[f.name] = {"type": str if kind is Sampler else kind, "help": f.metadata.get("help", ""),
                           "choices": choices, "aliases": f.metadata.get("aliases", ())}
        return out


@dataclass(frozen=True)
class DiffusionOptions(SampleOptions):
    """A diffusion system's sampling (DDPM, LDM, DiT, DyDiT)."""

    steps: Optional[int] = option("sampling steps (the chain respaced to this many)",
                                  aliases=("num_inference_steps", "num_sampling_steps"))
    guidance: Optional[float] = option("classifier-free guidance scale (1: the conditional model)",
                                       aliases=("guidance_scale", "cfg_scale"))
    sampler: Optional[Sampler] = option("ddpm, ddim or dpmpp_2m (DPM-Solver++(2M), 10-20 steps)")
    eta: Optional[float] = option("DDIM's eta (0: deterministic)", cli=False)

    def __post_init__(self) -> None:
        if self.sampler is not None:
            if self.sampler not in SAMPLERS:
                raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
            object.__setattr__(self, "sampler", Sampler(self.sampler))
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps={self.steps}: give 1 or more sampling steps")


@dataclass(frozen=True)
class DiTOptions(DiffusionOptions):
    """DiT's: a diffusion system's, and a step cache (``DiTSystem.calibrate_step_cache``)."""

    step_cache: Optional[StepCache] = option("reuse blocks' residuals from the step before where this schedule says",
                                             cli=False)


@dataclass(frozen=True)
class DyDiTOptions(DiTOptions):
    """DyDiT's: DiT's, and the mode its blocks run in."""

    mode: Optional[str] = option("fast (default: sliced weights, active tokens only), masked (every unit computed, "
                                 "switched-off ones zeroed, as the released code) or full (routers off)",
                                 choices=MODES)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"unknown DyDiT mode {self.mode!r}; choose one of {', '.join(MODES)}")


@dataclass(frozen=True)
class TemperatureOptions(SampleOptions):
    """A prior with a temperature (the VAE's prior noise, the VQ-VAE priors' softmax)."""

    temperature: Optional[float] = option("scale of the prior noise, or the softmax temperature of a prior")

    def __post_init__(self) -> None:
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be positive")


@dataclass(frozen=True)
class DalleOptions(TemperatureOptions):
    """DALL-E's transformer sampling (every stage takes them; the dVAE and CLIP stages ignore them)."""

    top_k: Optional[int] = option("sample among the K most likely tokens (0: all)")
    top_p: Optional[float] = option("sample from the nucleus of probability P (1: all)")
    guidance: Optional[float] = option("classifier-free guidance scale (1: the conditional model)")
    rerank: Optional[int] = option("draw N candidates per image and keep the one its CLIP scores highest")
    use_cache: bool = option("keys and values kept between tokens (False: the whole sequence every step)",
                             default=True, cli=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rerank is not None and self.rerank < 1:
            raise ValueError(f"rerank={self.rerank}: give the number of candidates per image, 1 or more")


__all__ = ["DalleOptions", "DiTOptions", "DiffusionOptions", "DyDiTOptions", "SampleOptions", "TemperatureOptions",
           "option"]
