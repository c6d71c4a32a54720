"""Every OpenMoji recipe trains at its own size, each later stage on the earlier stages it names: the CLIP stage whose
text tower the text-to-image recipes freeze, the autoencoder and dVAE, the four text-to-image systems, the class DiT and
its DyDiT, the VAE and the two VQ-VAEs with their priors. One step each, on a few images: the recipes, not the results."""

import pytest
import torch

import difflineage
from difflineage.systems import load_config
from difflineage.train import Trainer

QUICK = ["train.steps=1", "train.batch_size=4", "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=0",
         "train.sample_n=2", "train.warmup_steps=0"]
FEW_STEPS = ["model.diffusion.sample_steps=2"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "openmoji-cache"))


def train(recipe: str, out, *extra: str):
    result = Trainer(load_config(recipe, QUICK + list(extra)), out, progress=False).fit()
    assert result.status == "finished"
    return difflineage.load(result.checkpoint)


def test_every_openmoji_recipe_trains_on_the_stages_it_names(tmp_path):
    clip = train("dalle-clip-openmoji", tmp_path / "clip")
    ae = train("autoencoder-openmoji", tmp_path / "ae")
    assert clip.config.data.channels == 3 and ae.config.data.image_size == 32
    frozen = f"model.text_encoder={tmp_path / 'clip'}"
    tower = clip.clip.text_encoder.state_dict()
    for recipe, extra in (("dit-openmoji", [f"model.first_stage={tmp_path / 'ae'}", frozen]),
                          ("ldm-openmoji", [f"model.first_stage={tmp_path / 'ae'}", frozen]),
                          ("ddpm-openmoji", [frozen])):
        system = train(recipe, tmp_path / recipe, *extra, *FEW_STEPS)
        assert system.captions_from_file and system.text_part is not None  # OpenMoji's names are its own captions
        assert all(torch.equal(v, tower[k]) for k, v in system.text.state_dict().items())
        images = system.sample(2, ["red apple", "woman: dark skin tone"], steps=2)
        assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    train("dalle-dvae-openmoji", tmp_path / "dvae")
    dalle = train("dalle-openmoji", tmp_path / "dalle", f"model.first_stage={tmp_path / 'dvae'}",
                  f"model.clip_stage={tmp_path / 'clip'}")
    assert dalle.clip_model() is not None and dalle.sample(1, ["red apple"]).shape == (1, 3, 32, 32)
    base = train("dit-class-openmoji", tmp_path / "dit-class", f"model.first_stage={tmp_path / 'ae'}", *FEW_STEPS)
    assert base.num_classes == 98
    dydit = train("dydit-openmoji", tmp_path / "dydit", f"model.base={tmp_path / 'dit-class'}", *FEW_STEPS)
    assert dydit.sample(2, torch.tensor([0, 97]), steps=2).shape == (2, 3, 32, 32)
    assert train("vae-openmoji", tmp_path / "vae").sample(1).shape == (1, 3, 32, 32)
    for v in ("vqvae", "vqvae2"):
        train(f"{v}-openmoji", tmp_path / v)
        prior = train(f"{v}-prior-openmoji", tmp_path / f"{v}-prior", f"model.first_stage={tmp_path / v}")
        assert prior.sample(1, torch.tensor([5])).shape == (1, 3, 32, 32)
