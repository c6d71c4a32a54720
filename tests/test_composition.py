"""The systems as compositions: a denoiser in a space, the narrow contract (loss(batch, step)), the optional
abilities as protocols, and the configs and checkpoints of earlier versions still read."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import difflineage
from difflineage.data import load_dataset
from difflineage.errors import ConfigError
from difflineage.eval import evaluate_system
from difflineage.systems import SYSTEMS, DiTSystem, config_from_dict
from difflineage.systems.base import CarriesClip, Denoises, DynamicCompute, Reranks
from difflineage.systems.spaces import LatentSpace, PixelSpace

FIXTURES = Path(__file__).parent / "fixtures" / "systems"


def fixture(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the fixtures are configs of an earlier version
        return difflineage.load(FIXTURES / name)


def test_one_denoiser_class_in_either_space():
    pixel, latent = fixture("dit_pixel"), fixture("dit_latent")
    assert type(pixel) is type(latent) is DiTSystem
    assert isinstance(pixel.space, PixelSpace) and pixel.space.clip_denoised
    assert isinstance(latent.space, LatentSpace) and not latent.space.clip_denoised
    assert (latent.channels, latent.side) == latent.space.shape == (latent.config.model.autoencoder.latent_channels, 4)
    assert isinstance(fixture("ldm").space, LatentSpace) and isinstance(fixture("ddpm_class").space, PixelSpace)
    # the space's parts belong to the space: a pixel DiT holds no autoencoder weights at all
    assert not any(k.startswith("space.") for k in pixel.state_dict())
    assert {"space.latent_scale", "space.first_stage.decoder.conv_out.weight"} <= set(latent.state_dict())


def test_checkpoints_of_earlier_versions_are_read_under_todays_keys():
    old = {"first_stage.decoder.conv_out.weight": torch.ones(1), "latent_scale": torch.tensor(2.0),
           "dit.pos_embed": torch.zeros(1), "text.proj.weight": torch.zeros(1)}
    new = DiTSystem.upgrade_state_dict(old)
    assert set(new) == {"space.first_stage.decoder.conv_out.weight", "space.latent_scale", "dit.pos_embed",
                        "text.proj.weight"}
    assert new["space.latent_scale"] is old["latent_scale"]
    assert DiTSystem.upgrade_state_dict(new) == new  # today's keys stay as they are
    # the committed fixture is an earlier version's checkpoint: top-level first_stage.* keys, and it loads
    from safetensors import safe_open

    with safe_open(str(FIXTURES / "dit_latent" / "ema.safetensors"), "pt") as fh:
        assert any(k.startswith("first_stage.") for k in fh.keys())
    latent = fixture("dit_latent")
    assert latent.space.latent_scale.item() != 1.0  # the measured scale came across


def test_a_dit_config_carries_no_unet_and_a_class_model_no_text_encoder():
    dit = difflineage.load_config("dit-mnist")
    names = {f.name for f in dataclasses.fields(dit.model)}
    assert "unet" not in names and "unet" not in dit.to_dict()["model"]
    assert dit.model.condition == "class" and dit.model.text is None
    caption = difflineage.load_config("dit-mnist", ["model.condition=caption"])
    assert caption.model.text is not None and caption.model.text.width > 0  # the default encoder, when captions


def test_an_earlier_dit_config_with_a_unet_section_is_read_with_a_note(tmp_path):
    raw = yaml.safe_load((FIXTURES / "dit_pixel" / "config.yaml").read_text())
    assert "unet" in raw["model"]
    with pytest.warns(FutureWarning, match="model.unet is no longer read"):
        cfg = config_from_dict(raw)
    assert cfg == config_from_dict({**raw, "model": {k: v for k, v in raw["model"].items() if k != "unet"}})


def test_a_renamed_key_is_read_under_its_old_name_and_both_names_are_refused():
    from difflineage.config import build

    @dataclasses.dataclass
    class Renamed:
        steps: int = 1
        deprecated_keys = {"iterations": "steps"}

    with pytest.warns(FutureWarning, match="now called x.steps"):
        assert build(Renamed, {"iterations": 7}, "x").steps == 7
    with pytest.raises(ConfigError, match="same setting"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        build(Renamed, {"iterations": 7, "steps": 8}, "x")


def test_optional_abilities_are_declared_protocols():
    assert isinstance(fixture("dydit"), DynamicCompute) and fixture("dydit").compute_modes == ("fast", "full")
    assert not isinstance(fixture("dit_latent"), DynamicCompute)
    prior = fixture("dalle_prior")
    assert isinstance(prior, CarriesClip) and isinstance(prior, Reranks) and prior.clip_model() is not None
    for name in ("vae", "ddpm_caption", "vqvae_prior"):
        assert not isinstance(fixture(name), (CarriesClip, Reranks, DynamicCompute)), name
    assert all(isinstance(fixture(n), Denoises) for n in ("ddpm_class", "ldm", "dit_pixel", "dydit"))
    assert not isinstance(fixture("vae"), Denoises) and not isinstance(fixture("dalle_prior"), Denoises)


def test_the_training_step_is_an_argument_of_the_loss():
    dalle = fixture("dalle_dvae").train()
    batch = load_dataset(dalle.config.data, "train").batch(range(4))
    steps = dalle.config.train.steps
    early, late = dalle.loss(batch, 0)[1], dalle.loss(batch, steps)[1]
    m = dalle.config.model.dvae
    assert early["tau"].item() == pytest.approx(m.temperature(0.0)) and late["tau"].item() == pytest.approx(m.temperature(1.0))
    assert early["tau"] > late["tau"]  # the Gumbel temperature is annealed with the step
    dydit = fixture("dydit").train()
    batch = load_dataset(dydit.config.data, "train").batch(range(4))
    cfg = dataclasses.replace(dydit.config, model=dataclasses.replace(dydit.config.model, router_warmup=10, target=0.5))
    dydit.config = cfg
    assert dydit.loss(batch, 0)[1]["flops_target"].item() == pytest.approx(1.0)
    assert dydit.loss(batch, 5)[1]["flops_target"].item() == pytest.approx(0.75)
    assert "mse_full" in dydit.loss(batch, 5)[1] and "mse_full" not in dydit.loss(batch, 10)[1]
    assert "step" not in batch


def test_load_returns_the_system_alone_and_evaluate_records_where_it_came_from():
    system = fixture("vae")
    assert not hasattr(system, "checkpoint_path")
    result = evaluate_system(system, n=0, progress=False, k=2, checkpoint=FIXTURES / "vae")
    assert result["checkpoint"] == str(FIXTURES / "vae")


def test_every_registered_system_is_a_system_with_its_model_dataclass():
    for name, cls in SYSTEMS.items():
        assert cls.name == name and dataclasses.is_dataclass(cls.ModelConfig)


def test_each_stage_of_a_staged_system_is_its_own_class():
    from difflineage.systems.dalle import DalleCLIP, DalleDVAE, DallePrior, DalleSystem
    from difflineage.systems.vqvae import VQVAE2Prior, VQVAE2System, VQVAEPrior, VQVAESystem

    expected = {"vqvae_ae": VQVAESystem, "vqvae_prior": VQVAEPrior, "vqvae2_ae": VQVAE2System,
                "vqvae2_prior": VQVAE2Prior, "dalle_dvae": DalleDVAE, "dalle_clip": DalleCLIP, "dalle_prior": DallePrior}
    for name, cls in expected.items():
        system = fixture(name)
        assert type(system) is cls, name
        assert SYSTEMS[system.config.system].for_config(system.config) is cls
    assert all(issubclass(c, DalleSystem) and c.name == "dalle" for c in (DalleDVAE, DalleCLIP, DallePrior))
    # the prior stages hold their frozen first stage: trainable parameters are the prior's alone
    prior = fixture("vqvae2_prior")
    assert all(not p.requires_grad for p in prior.vqvae.parameters())
    assert prior.train().vqvae.training is False  # and it stays in eval mode (its quantiser statistics frozen)
    assert not fixture("vqvae_ae").uses_labels and fixture("vqvae_prior").uses_labels


def test_each_stage_has_a_config_of_its_own_and_reads_configs_written_before():
    """A stage's model section holds its own settings (a dVAE run's config.yaml has no transformer); a config
    written when every stage held every setting (every earlier checkpoint) still reads, silently where the other
    stages' settings are their defaults, with a note where one was set."""
    from difflineage.systems import load_config

    dvae = load_config("dalle-dvae-mnist")
    written = yaml.safe_load(dvae.to_yaml())["model"]
    assert set(written) == {"stage", "dvae"}
    assert set(yaml.safe_load(load_config("dalle-clip-mnist").to_yaml())["model"]) == {"stage", "clip"}
    assert {"transformer", "dvae", "clip", "first_stage"} <= set(yaml.safe_load(load_config("dalle-mnist").to_yaml())["model"])
    assert set(yaml.safe_load(load_config("vqvae-mnist").to_yaml())["model"]) == {"stage", "vq"}

    old = yaml.safe_load((FIXTURES / "dalle_dvae" / "config.yaml").read_text())
    assert "transformer" in old["model"]  # written before each stage had its own
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config_from_dict(old).model == config_from_dict({**old, "model": written | {"dvae": old["model"]["dvae"]}}).model
    old["model"]["rerank"] = 4
    with pytest.warns(FutureWarning, match="model.rerank is a setting of the prior stage, not read by this one"):
        config_from_dict(old)


def test_evaluate_refuses_too_few_samples_before_sampling(capsys):
    from difflineage.cli import main

    assert main(["evaluate", str(FIXTURES / "vae"), "--n", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--n 3: the sample set holds 3 image(s); scoring needs at least 4" in err[0]


def test_a_class_is_asked_for_by_name_in_python_and_on_the_command_line(tmp_path, capsys):
    """condition="seven" or --label seven (or --class 7) draws the class so named; a caption model takes one caption
    as a string; an unknown name is refused with the names there are."""
    from difflineage.cli import main

    dit = fixture("dit_pixel")
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(dit.sample(2, condition="seven", generator=g(), steps=2), dit.sample(2, condition=7, generator=g(), steps=2))
    assert torch.equal(dit.sample(2, condition="Seven", generator=g(), steps=2), dit.sample(2, condition="7", generator=g(), steps=2))
    with pytest.raises(ValueError, match=r"unknown class 'sevn' \(did you mean 'seven'\?\)"):
        dit.sample(1, condition="sevn")
    caption = fixture("ddpm_caption")
    text = caption.captions_for(torch.tensor([3]))[0]
    assert torch.equal(caption.sample(2, condition=text, generator=g(), steps=2),
                       caption.sample(2, condition=[text, text], generator=g(), steps=2))
    assert main(["sample", str(FIXTURES / "dit_pixel"), "--label", "seven", "--n", "2", "--steps", "2",
                 "--out", str(tmp_path / "a.png"), "--npz", str(tmp_path / "a.npz")]) == 0
    assert main(["sample", str(FIXTURES / "dit_pixel"), "--class", "7", "--n", "2", "--steps", "2",
                 "--out", str(tmp_path / "b.png"), "--npz", str(tmp_path / "b.npz")]) == 0
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and a["arr_1"].tolist() == [7, 7]
    assert main(["sample", str(FIXTURES / "dit_pixel"), "--label", "elevn", "--out", str(tmp_path / "c.png")]) == 2
    assert "--label: unknown class 'elevn'" in capsys.readouterr().err
