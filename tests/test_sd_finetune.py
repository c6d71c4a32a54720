"""Fine-tuning a released Stable Diffusion with the trainer, end to end on a tiny one: LoRA adapters (only they train
and are saved) or the whole UNet, the VAE and text encoder frozen, exact resume, sampling from the checkpoint, the
adapters merged into a plain UNet."""

import json

import pytest
import torch
from helpers import make_tiny_sd, state_equal
from PIL import Image

from difflineage.errors import CheckpointError
from difflineage.systems import config_from_dict, load
from difflineage.train import Trainer

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

CAPTIONS = ["a red square", "a green square", "a blue circle", "a yellow star"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdft")
    model = root / "sd"
    make_tiny_sd(1, model, CAPTIONS * 20)
    data = root / "images"
    data.mkdir()
    lines = []
    for i in range(20):  # every tenth is held out
        colour = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)][i % 4]
        Image.new("RGB", (16, 16), colour).save(data / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "caption": CAPTIONS[i % 4]}))
    (data / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return model, data


def _config(setup, tune="lora", steps=6):
    model, data = setup
    return config_from_dict({
        "system": "stable_diffusion",
        "data": {"source": f"folder:{data}", "image_size": 16, "channels": 3},
        "model": {"pretrained": str(model), "tune": tune, "lora_rank": 2, "sample_steps": 2},
        "train": {"steps": steps, "batch_size": 4, "lr": 1e-3, "log_every": 1, "sample_every": 0,
                  "checkpoint_every": 3, "ema_decay": 0.9, "seed": 0},
    })


def test_lora_trains_saves_only_adapters_and_resumes_exactly(setup, tmp_path):
    cfg = _config(setup)
    straight = Trainer(cfg, tmp_path / "a", progress=False)
    result = straight.fit()
    assert result.status == "finished"
    saved = straight.system.state_dict()
    assert saved and all(".lora_a." in k or ".lora_b." in k for k in saved)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if ".lora_b." in k)  # B left zero: nothing trained
    assert straight.system.config.model.pretrained_digest
    first = Trainer(cfg, tmp_path / "b", stop_at=3, progress=False).fit()
    assert first.status == "stopped"
    resumed = Trainer(None, tmp_path / "b", resume=True, progress=False)
    resumed.fit()
    assert state_equal(saved, resumed.system.state_dict()) == []
    assert state_equal(straight.ema.module.state_dict(), resumed.ema.module.state_dict()) == []
    # the checkpoint holds the adapters alone, and samples
    ckpt = result.checkpoint
    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    assert size < 1_000_000
    system = load(ckpt)
    images = system.sample(2, condition="a red square", generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    # merged: a plain UNet computing what the adapted one does
    merged = system.merged_unet_state()
    assert not any("lora" in k for k in merged)
    plain = type(system.sd.unet)(system.sd.unet.cfg, 4, 4, 8, context_dim=system.sd.text_encoder.cfg.width).eval()
    plain.load_state_dict(merged)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([400]), torch.randn(1, 77, system.sd.text_encoder.cfg.width)
    with torch.no_grad():
        assert (plain(x, t, context=ctx) - system.sd.unet.eval()(x, t, context=ctx)).abs().max() < 1e-5


def test_whole_unet_trains_and_frozen_parts_stay(setup, tmp_path):
    trainer = Trainer(_config(setup, tune="unet", steps=2), tmp_path / "u", progress=False)
    before = {k: v.clone() for k, v in trainer_system_frozen(setup).items()}
    trainer.fit()
    system = trainer.system
    assert all(k.startswith("sd.unet.") for k in system.state_dict())
    after = {k: v for k, v in system.sd.state_dict().items() if k.startswith(("vae.", "text_encoder."))}
    assert state_equal(before, after) == []


def trainer_system_frozen(setup):
    from difflineage.systems.stable_diffusion import StableDiffusion

    sd = StableDiffusion.from_pretrained(setup[0])
    return {k: v for k, v in sd.state_dict().items() if k.startswith(("vae.", "text_encoder."))}


def test_changed_pretrained_files_are_refused(setup, tmp_path):
    cfg = _config(setup, steps=1)
    result = Trainer(cfg, tmp_path / "c", progress=False).fit()
    raw = json.loads(json.dumps(cfg.to_dict()))
    raw["model"]["pretrained_digest"] = "0" * 64
    with pytest.raises(CheckpointError, match="changed since this run began"):
        from difflineage.systems import build_system

        build_system(config_from_dict(raw))
    assert result.checkpoint is not None


def test_trains_from_a_latent_store_of_its_vae(setup, tmp_path):
    """`difflineage extract --first-stage sd-vae:MODEL/vae/...` once, then fine-tune from the store; a store of
    another first stage is refused by its digest."""
    from difflineage.config import data_config
    from difflineage.extract import extract

    model, data = setup
    vae_file = model / "vae" / "diffusion_pytorch_model.safetensors"
    store = tmp_path / "store"
    extract(f"sd-vae:{vae_file}", data_config({"source": f"folder:{data}", "image_size": 16, "channels": 3}), store,
            shard_size=8, batch_size=4, progress=False, device="cpu")
    raw = _config(setup, steps=2).to_dict()
    raw["data"]["latents"] = str(store)
    result = Trainer(config_from_dict(raw), tmp_path / "s", progress=False).fit()
    assert result.status == "finished"


def test_a_fine_tune_converts_to_a_released_layout(setup, tmp_path):
    """`convert RUN --to diffusers`: the pretrained files with the fine-tuned UNet (adapters merged), which
    diffusers loads and which samples as the run does."""
    from difflineage.cli import main
    from difflineage.systems.stable_diffusion import StableDiffusion

    run = tmp_path / "run"
    Trainer(_config(setup, steps=2), run, progress=False).fit()
    assert main(["convert", str(run), str(tmp_path / "folder"), "--to", "diffusers"]) == 0
    system = load(run)
    again = StableDiffusion.from_pretrained(tmp_path / "folder")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a = system.sd.sample("a red square", latents=latents, steps=2, progress=False)
    b = again.sample("a red square", latents=latents, steps=2, progress=False)
    assert (a - b).abs().max().item() < 1e-4
