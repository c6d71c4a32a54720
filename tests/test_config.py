import pytest

from difflineage.config import DataConfig, TrainConfig
from difflineage.errors import ConfigError
from difflineage.models.vae import VAEConfig
from difflineage.systems import config_from_dict, load_config


def base():
    return {"system": "vae", "data": {"source": "digits", "image_size": 8}, "model": {"channels": [8]}, "train": {}}


def test_builds_typed_sections():
    cfg = config_from_dict(base())
    assert isinstance(cfg.model, VAEConfig) and isinstance(cfg.data, DataConfig) and isinstance(cfg.train, TrainConfig)
    assert cfg.model.channels == (8,)


def test_overrides_are_typed_and_dotted():
    cfg = config_from_dict(base(), ["model.latent_dim=2", "train.lr=1e-3", "train.bf16=true", "train.betas=[0.5, 0.9]"])
    assert cfg.model.latent_dim == 2
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.train.bf16 is True and cfg.train.betas == (0.5, 0.9)


def test_bf16_auto_means_bf16_only_where_it_is_native(monkeypatch):
    from difflineage.nn import precision

    assert config_from_dict(base(), ["train.bf16=auto"]).train.bf16 == "auto"
    with pytest.raises(ConfigError, match="train.bf16='sometimes'"):
        config_from_dict(base(), ["train.bf16=sometimes"])
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.resolve_bf16("auto", "cpu") is True and precision.resolve_bf16(False, "cpu") is False
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert precision.resolve_bf16("auto", "cpu") is False and precision.resolve_bf16(True, "cpu") is True


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as err:
        config_from_dict(base(), ["model.latent_dims=2"])
    msg = str(err.value)
    assert "model.latent_dims" in msg and "did you mean 'model.latent_dim'" in msg and "model.hidden" in msg


def test_unknown_section_and_system():
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        config_from_dict({**base(), "trian": {}})
    with pytest.raises(ConfigError, match="unknown system 'vea'.*valid: .*vae"):
        config_from_dict({**base(), "system": "vea"})


def test_wrong_type_is_refused():
    with pytest.raises(ConfigError, match=r"train.steps='many' must be a whole number"):
        config_from_dict(base(), ["train.steps=many"])
    with pytest.raises(ConfigError, match="train.bf16=1 must be true or false"):
        config_from_dict(base(), ["train.bf16=1"])


def test_literal_lists_choices():
    with pytest.raises(ConfigError, match="model.likelihood='gauss' is not one of the choices: bernoulli, discretized_gaussian"):
        config_from_dict(base(), ["model.likelihood=gauss"])


def test_impossible_values_are_refused():
    with pytest.raises(ConfigError, match="train.ema_decay=1.5 must lie in"):
        config_from_dict(base(), ["train.ema_decay=1.5"])
    with pytest.raises(ConfigError, match="train.steps=0 must be at least 1"):
        config_from_dict(base(), ["train.steps=0"])
    with pytest.raises(ConfigError, match="data.source='imagenet' is not a known source"):
        config_from_dict(base(), ["data.source=imagenet"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        config_from_dict(base(), ["train.steps"])


def test_yaml_round_trip_and_recipe_by_name():
    cfg = load_config("vae-mnist")
    import yaml

    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    with pytest.raises(ConfigError, match="no config file 'nope' and no recipe of that name; recipes: .*vae-mnist"):
        load_config("nope")


@pytest.mark.parametrize("recipe", sorted(p.stem for p in __import__("difflineage.config", fromlist=["CONFIG_DIR"]).CONFIG_DIR.glob("*.yaml")))
def test_every_recipe_is_a_valid_config(recipe):
    from difflineage.systems import SYSTEMS

    cfg = load_config(recipe)
    assert cfg.system in SYSTEMS and recipe.split("-")[0] in cfg.system


@pytest.mark.parametrize("recipe,size", [("dit-xl2-imagenet256", "XL"), ("dit-b2-imagenet256", "B"),
                                         ("dit-s2-imagenet256", "S")])
def test_the_imagenet_dit_recipes_state_the_papers_settings(recipe, size):
    from difflineage.systems import load_config

    c = load_config(recipe)
    t, m = c.train, c.model
    assert (t.lr, t.weight_decay, t.batch_size, t.ema_decay, t.grad_clip, t.warmup_steps) == (1e-4, 0.0, 256, 0.9999, 0.0, 0)
    assert m.dit.name == f"DiT-{size}/2" and m.diffusion.variance == "learned_range" and m.latent_scale == 0.18215
    assert (m.diffusion.sampler, m.diffusion.sample_steps, m.diffusion.guidance, m.guidance_channels) == ("ddpm", 250, 1.5, 3)
    assert (c.data.image_size, c.data.channels, c.data.flip, m.cond_drop, t.tf32) == (256, 3, True, 0.1, True)


@pytest.mark.parametrize("recipe,target", [("dydit-xl2-imagenet256", 0.5), ("dydit-xl2-imagenet256-l07", 0.7)])
def test_the_imagenet_dydit_recipes_state_the_released_settings(recipe, target):
    from difflineage.systems import load_config

    c = load_config(recipe)
    m, t = c.model, c.train
    assert m.target == target and (t.lr, t.batch_size, t.grad_clip, t.tf32) == (1e-4, 256, 200.0, True)
    assert (m.router_warmup, m.complete_steps, m.stratified, m.guidance_channels) == (1000, 30000, True, 3)
    assert (m.diffusion.sampler, m.diffusion.sample_steps, m.diffusion.guidance) == ("ddpm", 250, 1.5)


@pytest.fixture(scope="module")
def sd_vae_sized(tmp_path_factory):
    """An SD-VAE-shaped file (83.7M parameters, random weights): the recipes read their first stage's shape from it."""
    import torch

    from difflineage.interop.sd_vae import save_sd_vae
    from difflineage.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig

    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderKLConfig(channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                            norm_groups=32), image_channels=3)
    return save_sd_vae(vae, tmp_path_factory.mktemp("vae") / "sd-vae.safetensors")


@pytest.mark.parametrize("recipe,millions", [("dit-s2-imagenet256", 33.0), ("dit-b2-imagenet256", 130.5),
                                             ("dit-xl2-imagenet256", 675.1), ("dydit-xl2-imagenet256", 678.4),
                                             ("dydit-xl2-imagenet256-l07", 678.4)])
def test_the_imagenet_recipes_build_at_full_size(recipe, millions, sd_vae_sized):
    """Each recipe builds its network at the paper's size (DiT Table 4: S/2 33M, B/2 130M, XL/2 675M; DyDiT-XL/2
    adds its routers) over 32 x 32 x 4 latents and 1,000 classes, on the meta device (shapes, no memory); the
    dress rehearsal (benchmarks/dress_rehearsal.py) trains them for real."""
    import torch

    from difflineage.systems import SYSTEMS, load_config

    cfg = load_config(recipe, [f"model.first_stage=sd-vae:{sd_vae_sized}", "data.num_classes=1000"])
    cls = SYSTEMS[cfg.system]
    cfg = cls.resolve_config(cfg)
    with torch.device("meta"):
        system = cls.for_config(cfg).from_config(cfg)
    net = system.net
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(millions, abs=0.05)
    assert (system.channels, system.side) == (4, 32) and net.y_embedder.embedding_table.num_embeddings == 1001  # + null
    assert net.out_channels == 8  # learned sigma


def test_training_with_bf16_auto_is_the_precision_it_resolves_to(tmp_path, monkeypatch, capsys, native=False):
    """Where bf16 is not native, auto trains exactly as fp32 (were "auto" taken as truthy, bf16 would change every
    loss). The other way round costs an emulated-bf16 run on CPUs without it; resolve_bf16 is tested above."""
    import json

    from test_dit_system import tiny_dit_dict

    from difflineage.train import Trainer, trainer

    monkeypatch.setattr(trainer, "resolve_bf16", lambda setting, device: native if setting == "auto" else setting)
    losses = {}
    for setting in ("auto", native):
        out = tmp_path / str(setting)
        Trainer(config_from_dict(tiny_dit_dict(steps=3, bf16=setting)), out, progress=False).fit()
        losses[setting] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses["auto"] == losses[native]
    assert f"train.bf16=auto: {'bf16 autocast' if native else 'fp32'} on cpu" in capsys.readouterr().err
