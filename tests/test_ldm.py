import math

import pytest
import torch
import yaml
from helpers import tiny_autoencoder_dict, tiny_ddpm_dict

import difflineage
from difflineage.config import DataConfig
from difflineage.data import load_dataset
from difflineage.errors import ConfigError
from difflineage.systems import config_from_dict
from difflineage.train import CheckpointError, Trainer


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory):
    """The tiny autoencoder, trained long enough (60 steps at lr 1e-2, about a second) to beat a constant image."""
    run = tmp_path_factory.mktemp("ae")
    Trainer(config_from_dict(tiny_autoencoder_dict(steps=60, lr=1e-2)), run, progress=False).fit()
    return run


def ldm_dict(first_stage, **train):
    d = tiny_ddpm_dict(**train)
    d["system"] = "ldm"
    d["model"]["first_stage"] = str(first_stage)
    d["model"]["unet"]["channel_mult"] = [1]
    d["model"]["unet"]["attention_resolutions"] = [4]
    return d


def test_autoencoder_system_trains_and_reports_reconstruction(first_stage):
    """evaluate() reports L1, MSE and PSNR on [0, 1] pixels (its docstring), recomputed here from the decoded
    posterior means; and the trained autoencoder beats the best constant reconstructions of the training set:
    the per-pixel median (the constant with the least L1) and the per-pixel mean (the least squared error)."""
    ae = difflineage.load(first_stage)
    assert ae.ae.downsampling_factor == 2
    held = load_dataset(DataConfig(source="digits", image_size=8), "heldout")
    r = ae.evaluate(held)
    x = held.batch(range(len(held)))["image"]
    with torch.no_grad():
        mean, _ = ae.ae.encode(x)
        recon = ae.ae.decode(mean).clamp(-1, 1)
    x01, recon01 = (x + 1) / 2, (recon + 1) / 2  # [-1, 1] -> [0, 1]
    l1, mse = (recon01 - x01).abs().mean().item(), (recon01 - x01).pow(2).mean().item()
    assert r["recon_l1"] == pytest.approx(l1, rel=1e-4)
    assert r["recon_mse"] == pytest.approx(mse, rel=1e-4)
    assert r["recon_psnr_db"] == pytest.approx(10 * math.log10(1.0 / mse), abs=1e-3)  # peak 1 on [0, 1] pixels
    train = load_dataset(DataConfig(source="digits", image_size=8), "train")
    t01 = (train.batch(range(len(train)))["image"] + 1) / 2
    median_l1 = (t01.median(0, keepdim=True).values - x01).abs().mean().item()
    mean_mse = (t01.mean(0, keepdim=True) - x01).pow(2).mean().item()
    assert r["recon_l1"] < 0.8 * median_l1
    assert r["recon_psnr_db"] > 10 * math.log10(1.0 / mean_mse) + 1.0  # at least 1 dB better than the mean image


def test_ldm_trains_in_latent_space_and_carries_its_first_stage(first_stage, tmp_path):
    trainer = Trainer(config_from_dict(ldm_dict(first_stage)), tmp_path, progress=False)
    trainer.fit()
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"]["autoencoder"]["latent_channels"] == 2  # the architecture was read from the first stage
    system = difflineage.load(tmp_path)
    assert (system.channels, system.side) == (2, 4)
    # scale_by_std: the scale is 1 / std of the training latents, and the checkpoint carries it
    assert system.space.latent_scale.item() == pytest.approx(trainer.system.space.latent_scale.item())
    assert system.space.latent_scale.item() != 1.0
    # the frozen first stage is the one trained above
    ae = difflineage.load(first_stage)
    assert torch.equal(system.space.first_stage.decoder.conv_out.weight, ae.ae.decoder.conv_out.weight)
    assert all(not p.requires_grad for p in trainer.system.space.first_stage.parameters())
    x = system.sample(3, condition=2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 8, 8) and x.min() >= -1 and x.max() <= 1


def test_latent_cache_holds_the_encoders_posterior(first_stage, tmp_path):
    trainer = Trainer(config_from_dict(ldm_dict(first_stage, steps=1)), tmp_path, progress=False)
    trainer.fit()
    data = load_dataset(DataConfig(source="digits", image_size=8), "train")
    mean, logvar = trainer.system.space.first_stage.encode(data.batch(range(5))["image"])
    assert torch.allclose(trainer.system.space.part.cache.compute()[0][:5], mean, atol=1e-5)
    assert trainer.ema.module.space.part.cache is trainer.system.space.part.cache  # the EMA's copy shares it


def test_ldm_over_a_stable_diffusion_vae_file(tmp_path):
    from difflineage.interop import save_sd_vae
    from difflineage.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig

    vae = AutoencoderKL(AutoencoderKLConfig(channels=(8, 8), latent_channels=3, norm_groups=4), image_channels=1)
    path = save_sd_vae(vae, tmp_path / "vae.safetensors", layout="diffusers")
    d = ldm_dict(f"sd-vae:{path}", steps=1)
    d["model"]["sd_vae_norm_groups"] = 4
    Trainer(config_from_dict(d), tmp_path / "run", progress=False).fit()
    system = difflineage.load(tmp_path / "run")
    assert system.channels == 3 and torch.equal(system.space.first_stage.encoder.conv_in.weight, vae.encoder.conv_in.weight)


def test_first_stage_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.first_stage is empty"):
        Trainer(config_from_dict(ldm_dict("")), tmp_path / "a", progress=False).fit()
    vae_run = tmp_path / "vae"
    from helpers import tiny_vae

    Trainer(tiny_vae(steps=1), vae_run, progress=False).fit()
    with pytest.raises(ConfigError, match="is a vae checkpoint; it must be an autoencoder_kl"):
        Trainer(config_from_dict(ldm_dict(vae_run)), tmp_path / "b", progress=False).fit()
    with pytest.raises(CheckpointError, match="no Stable Diffusion VAE file"):
        Trainer(config_from_dict(ldm_dict("sd-vae:/nonexistent.safetensors")), tmp_path / "c", progress=False).fit()


def test_latent_sampler_does_not_clip_to_the_pixel_range(first_stage, tmp_path):
    """Scaled latents have unit variance; clipping the x_0 estimate to [-1, 1], right for pixels, would cut
    them (and gave broken strokes). With a network that predicts no noise, x_0 = x_t / sqrt(abar) is large."""
    Trainer(config_from_dict(ldm_dict(first_stage, steps=1)), tmp_path, progress=False).fit()
    system = difflineage.load(tmp_path)
    system.space.decode = lambda z: z  # look at the latents themselves
    z = system.sample(4, condition=1, generator=torch.Generator().manual_seed(0), guidance=1.0)
    assert z.abs().max() > 1.5


def test_ldm_resumes_from_its_config(first_stage, tmp_path):
    """The config names only the first stage; the checkpoint's has the architecture filled in. Resuming
    with the config (as a re-run quickstart does) must see them as the same model."""
    Trainer(config_from_dict(ldm_dict(first_stage, steps=2)), tmp_path, progress=False).fit()
    result = Trainer(config_from_dict(ldm_dict(first_stage, steps=3)), tmp_path, resume=True, progress=False).fit()
    assert result.step == 3 and result.status == "finished"


def test_a_resumed_ldm_encodes_with_the_first_stage_it_carries(tmp_path):
    """The autoencoder run trains on after the LDM stopped: the resumed LDM keeps encoding with its own copy."""
    ae = tmp_path / "ae"
    Trainer(config_from_dict(tiny_autoencoder_dict(steps=3)), ae, progress=False).fit()
    Trainer(config_from_dict(ldm_dict(ae, steps=4)), tmp_path / "ldm", stop_at=2, progress=False).fit()
    Trainer(config_from_dict(tiny_autoencoder_dict(steps=30)), ae, resume=True, progress=False).fit()
    resumed = Trainer(None, tmp_path / "ldm", resume=True, progress=False)
    resumed.fit()
    space = resumed.system.space
    data = load_dataset(DataConfig(source="digits", image_size=8), "train")
    carried, _ = space.first_stage.encode(data.batch(range(5))["image"])
    newer, _ = difflineage.load(ae).ae.encode(data.batch(range(5))["image"])
    assert not torch.allclose(carried, newer, atol=1e-3)  # the two encoders differ, so the check can fail
    assert torch.allclose(space.part.cache.compute()[0][:5], carried, atol=1e-5)


def test_a_fixed_latent_scale_is_used_instead_of_measured(first_stage, tmp_path):
    d = ldm_dict(first_stage, steps=1)
    d["model"]["latent_scale"] = 0.18215  # as the official DiT multiplies the SD VAE's latents
    t = Trainer(config_from_dict(d), tmp_path, progress=False)
    t.fit()
    assert t.system.space.latent_scale.item() == pytest.approx(0.18215)
    assert difflineage.load(tmp_path).space.latent_scale.item() == pytest.approx(0.18215)


def test_a_latent_model_resumed_under_bf16_continues_exactly(first_stage, tmp_path):
    """The training latents are encoded once, in full precision, before training, in a resumed run as in a straight
    one: a resumed run re-encoding them inside the bf16 autocast trained on other latents."""
    d = ldm_dict(first_stage, steps=6, bf16=True, checkpoint_every=3)
    straight = Trainer(config_from_dict(d), tmp_path / "straight", progress=False)
    straight.fit()
    Trainer(config_from_dict(d), tmp_path / "resumed", stop_at=3, progress=False).fit()
    resumed = Trainer(None, tmp_path / "resumed", resume=True, progress=False)
    resumed.fit()
    for a, b in ((straight.system, resumed.system), (straight.ema.module, resumed.ema.module)):
        theirs = b.state_dict()
        differ = [k for k, v in a.state_dict().items() if not torch.equal(v, theirs[k])]
        assert not differ, f"{len(differ)} tensors differ after resuming, e.g. {differ[:3]}"


def test_the_first_stage_checkpoint_is_read_once_when_a_run_starts(first_stage, tmp_path, monkeypatch):
    """Resolving the config (its architecture) and preparing the system (its weights) share one read."""
    import difflineage.systems.base as base

    reads = []
    original = base.read_checkpoint
    monkeypatch.setattr(base, "read_checkpoint", lambda path, *a, **k: reads.append(str(path)) or original(path, *a, **k))
    Trainer(config_from_dict(ldm_dict(first_stage, steps=1)), tmp_path, progress=False).fit()
    assert reads == [str(first_stage)]
    reads.clear()  # outside a run's start, each ask is a read of its own (nothing is held in memory after it)
    base.read_stage(first_stage, "first_stage", (difflineage.systems.AutoencoderKLSystem,), "")
    base.read_stage(first_stage, "first_stage", (difflineage.systems.AutoencoderKLSystem,), "")
    assert len(reads) == 2
