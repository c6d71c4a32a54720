"""A text encoder trained apart and frozen (Stable Diffusion's design): a DALL-E CLIP stage's text tower encodes the
captions of a caption-conditioned diffusion system, never changes, is recorded by its digest, and is refused when it is
not a CLIP, when the run is not caption-conditioned, or when it changed after the run's config was made."""

import copy

import pytest
import torch
from helpers import tiny_ddpm_dict

import difflineage
from difflineage.errors import CheckpointError, ConfigError
from difflineage.systems import config_from_dict, load_config
from difflineage.systems.text import CLIP_PREFIX, FrozenTextEncoder
from difflineage.train import Trainer
from difflineage.weights import state_digest

TINY = ["data.source=digits", "data.image_size=8", "train.batch_size=32", "train.log_every=1", "train.sample_every=0",
        "train.warmup_steps=0", "train.checkpoint_every=0"]
TINY_CLIP = ["model.clip.embed=16", "model.clip.channels=8", "model.clip.text.width=24", "model.clip.text.depth=1",
             "model.clip.text.heads=2", "model.clip.text.max_length=40"]


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    Trainer(load_config("dalle-clip-mnist", TINY + TINY_CLIP + ["train.steps=4"]), out, progress=False).fit()
    return out


def ddpm_with_text_encoder(clip_run, **train) -> dict:
    d = tiny_ddpm_dict("caption", **train)
    d["model"]["text_encoder"] = str(clip_run)
    return d


def test_the_clip_text_tower_is_frozen_in_the_denoiser(clip_run, tmp_path):
    tower = difflineage.load(clip_run).clip.text_encoder.state_dict()
    result = Trainer(config_from_dict(ddpm_with_text_encoder(clip_run, steps=3)), tmp_path, progress=False).fit()
    assert result.status == "finished"
    for use_ema in (True, False):
        system = difflineage.load(tmp_path, use_ema=use_ema)
        m = system.config.model
        assert (m.text.width, m.text.max_length) == (24, 40)  # the architecture came from the CLIP stage
        assert m.text_encoder_digest == state_digest(tower)
        assert all(torch.equal(v, tower[k]) for k, v in system.text.state_dict().items())  # never trained
        assert isinstance(system.text_part, FrozenTextEncoder) and system.text_part in system.frozen_parts()
        assert not any(p.requires_grad for p in system.text.parameters())
    images = system.sample(2, ["a handwritten digit seven", "something it never read"],
                           generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


def test_the_frozen_encoder_gives_what_its_tower_gives_and_looks_training_captions_up(clip_run):
    system = difflineage.load(clip_run)
    part = FrozenTextEncoder(copy.deepcopy(system.clip.text_encoder), str(clip_run))
    part.attach(["a handwritten digit one", "a handwritten digit two", "a handwritten digit one"])
    assert list(part._table) == ["", "a handwritten digit one", "a handwritten digit two"]
    for captions in (["a handwritten digit two", "", "a handwritten digit two"], ["never seen", "a handwritten digit one"]):
        direct = system.clip.text_encoder(captions)
        for a, b in zip(part(captions), direct):
            assert torch.allclose(a.float(), b.float(), atol=1e-6)
    twin = copy.deepcopy(part)
    assert twin._table is part._table and twin.module is part.module  # the EMA's copy shares the encodings


def test_a_resumed_run_with_a_frozen_text_encoder_continues_exactly(clip_run, tmp_path):
    cfg = config_from_dict(ddpm_with_text_encoder(clip_run, steps=4))
    Trainer(cfg, tmp_path / "straight", progress=False).fit()
    Trainer(cfg, tmp_path / "cut", stop_at=2, progress=False).fit()
    Trainer(cfg, tmp_path / "cut", resume=True, progress=False).fit()
    a, b = difflineage.load(tmp_path / "straight"), difflineage.load(tmp_path / "cut")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_what_is_not_a_clip_or_not_captions_is_refused(clip_run, tmp_path):
    Trainer(config_from_dict(tiny_ddpm_dict("class", steps=1)), tmp_path / "ddpm", progress=False).fit()
    wrong = tiny_ddpm_dict("caption")
    wrong["model"]["text_encoder"] = str(tmp_path / "ddpm")
    with pytest.raises(ConfigError, match=r"model.text_encoder=.*is a ddpm checkpoint"):
        Trainer(config_from_dict(wrong), tmp_path / "wrong", progress=False).fit()
    classes = tiny_ddpm_dict("class")
    classes["model"]["text_encoder"] = str(clip_run)
    with pytest.raises(ConfigError, match="model.condition=class"):
        Trainer(config_from_dict(classes), tmp_path / "classes", progress=False).fit()


def test_a_clip_stage_changed_after_the_config_was_made_is_refused(clip_run, tmp_path):
    from dataclasses import replace

    from difflineage.data import load_dataset
    from difflineage.systems import build_system

    config = build_system(config_from_dict(ddpm_with_text_encoder(clip_run))).resolve_config(
        config_from_dict(ddpm_with_text_encoder(clip_run)))
    assert len(config.model.text_encoder_digest) == 64
    stale = replace(config, model=replace(config.model, text_encoder_digest="0" * 64))
    with pytest.raises(CheckpointError, match="changed since this run's config was made"):
        build_system(stale).prepare(load_dataset(config.data, "train"))
    build_system(config).prepare(load_dataset(config.data, "train"))  # the digest it recorded is accepted
    assert CLIP_PREFIX == "clip.text_encoder."
