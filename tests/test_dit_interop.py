import argparse
import os

import pytest
import torch

from difflineage.errors import CheckpointError
from difflineage.interop.dit import (
    diffusers_dit_config,
    diffusers_to_dit,
    dit_to_diffusers,
    load_diffusers_dit,
    load_official_dit,
    match_paper_numerics,
    save_official_dit,
)
from difflineage.models.dit import DiT, DiTConfig

SMALL = dict(depth=2, hidden=32, heads=2, patch=2, learn_sigma=True)


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Every trainable weight random, the zero-initialised adaLN and output layers included."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def small_dit(learn_sigma=True) -> DiT:
    cfg = DiTConfig(**{**SMALL, "learn_sigma": learn_sigma})
    return randomise(DiT(cfg, in_channels=4, input_size=8, num_classes=10))


def inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0, 17, 999]), torch.tensor([3, 0, 10])


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_official_round_trip_gives_the_same_model_and_settings(tmp_path, suffix):
    model = small_dit()
    path = save_official_dit(model, tmp_path / f"dit{suffix}")
    loaded, settings = load_official_dit(path, heads=2)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))
    assert not loaded.training
    assert settings == {"name": "custom", "depth": 2, "hidden": 32, "heads": 2, "patch": 2, "mlp_ratio": 4.0,
                        "in_channels": 4, "out_channels": 8, "input_size": 8, "num_classes": 10,
                        "learn_sigma": True, "weights": "state_dict"}
    if suffix == ".pt":  # the official format: a plain dict of tensors, readable with weights_only
        raw = torch.load(path, weights_only=True)
        assert set(raw) == set(model.state_dict()) and "pos_embed" in raw


def test_learn_sigma_false_and_a_training_checkpoint_prefers_ema(tmp_path):
    model, other = small_dit(learn_sigma=False), small_dit(learn_sigma=False)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    # as the official train.py writes it, argparse.Namespace included
    ckpt = {"model": other.state_dict(), "ema": model.state_dict(), "opt": {"state": {}, "param_groups": []},
            "args": argparse.Namespace(model="DiT-S/2", image_size=64, num_classes=10)}
    torch.save(ckpt, tmp_path / "0000100.pt")
    loaded, settings = load_official_dit(tmp_path / "0000100.pt", heads=2)
    assert settings["weights"] == "ema" and settings["learn_sigma"] is False and settings["out_channels"] == 4
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), model(x, t, y))
    with pytest.raises(CheckpointError, match="learn_sigma=True was asked"):
        load_official_dit(tmp_path / "0000100.pt", heads=2, learn_sigma=True)


def test_heads_come_from_the_named_config_or_must_be_given(tmp_path):
    with torch.device("meta"):
        named = DiT(DiTConfig(name="DiT-S/8"), in_channels=4, input_size=16, num_classes=3)
    state = {k: torch.zeros(v.shape) for k, v in named.state_dict().items()}
    save_official_dit(state, tmp_path / "s8.safetensors")
    loaded, settings = load_official_dit(tmp_path / "s8.safetensors")
    assert (settings["name"], settings["heads"], settings["input_size"], settings["num_classes"]) == ("DiT-S/8", 6, 16, 3)
    assert loaded.cfg.name == "DiT-S/8"
    save_official_dit(small_dit(), tmp_path / "custom.pt")
    with pytest.raises(CheckpointError, match="heads="):
        load_official_dit(tmp_path / "custom.pt")


def test_missing_and_misshapen_keys_are_named(tmp_path):
    state = small_dit().state_dict()
    del state["blocks.1.attn.proj.bias"]
    save_official_dit(state, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing.*blocks\.1\.attn\.proj\.bias") as err:
        load_official_dit(tmp_path / "missing.pt", heads=2)
    assert "missing.pt" in str(err.value)
    state = small_dit().state_dict()
    state["blocks.0.mlp.fc2.weight"] = torch.zeros(32, 64)
    state["extra.weight"] = torch.zeros(1)
    save_official_dit(state, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"unexpected.*extra\.weight.*shape mismatch.*blocks\.0\.mlp\.fc2"):
        load_official_dit(tmp_path / "shape.pt", heads=2)


def _mark(path):  # what the malicious object's __reduce__ would make unpickling run
    open(path, "w").close()


class Booby:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return _mark, (self.path,)


def test_pickled_code_is_refused_without_running_it_and_a_missing_file_is_named(tmp_path):
    marker = str(tmp_path / "ran")
    state = small_dit().state_dict()
    state["payload"] = Booby(marker)
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil\.pt.*refused"):
        load_official_dit(tmp_path / "evil.pt", heads=2)
    assert not os.path.exists(marker)
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such file"):
        load_official_dit(tmp_path / "nope.pt", heads=2)


def test_diffusers_key_mapping_round_trips_and_checks_the_shared_embedders():
    state = small_dit().state_dict()
    theirs = dit_to_diffusers(state, depth=2)
    assert "pos_embed" not in theirs and theirs["transformer_blocks.1.attn1.to_k.weight"].shape == (32, 32)
    assert torch.equal(theirs["transformer_blocks.1.attn1.to_k.weight"], state["blocks.1.attn.qkv.weight"][32:64])
    assert torch.equal(theirs["transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"],
                       state["y_embedder.embedding_table.weight"])
    back = diffusers_to_dit(theirs, sample_size=8)
    assert set(back) == set(state)
    for k in state:
        torch.testing.assert_close(back[k], state[k], rtol=0, atol=1e-7 if k == "pos_embed" else 0)
    theirs["transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"] += 1
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.1\.norm1\.emb\.timestep_embedder\.linear_2"):
        diffusers_to_dit(theirs, sample_size=8)
    with pytest.raises(CheckpointError, match="sample_size"):
        diffusers_to_dit(dit_to_diffusers(state))


def _diffusers_dit():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero", norm_elementwise_affine=False,
        norm_eps=1e-6)


def _diffusers_out(model, x, t, y):
    with torch.no_grad():
        return model(hidden_states=x, timestep=t, class_labels=y).sample


def test_diffusers_weights_give_the_papers_dit_and_back(tmp_path):
    theirs = randomise(_diffusers_dit())
    # diffusers holds one embedder per block: a converted DiT has equal ones, so make them equal here too
    with torch.no_grad():
        for block in theirs.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(theirs.transformer_blocks[0].norm1.emb.state_dict())
    x, t, y = inputs()
    unpatched = _diffusers_out(theirs, x, t, y)
    match_paper_numerics(theirs)
    assert all(b.norm1.emb.time_proj.downscale_freq_shift == 0 for b in theirs.transformer_blocks)
    expected = _diffusers_out(theirs, x, t, y)
    assert (unpatched - expected).abs().max() > 1e-3  # diffusers' own timestep frequencies differ from DiT's

    ours = DiT(DiTConfig(**SMALL), in_channels=4, input_size=8, num_classes=10).eval()
    from difflineage.weights import load_state_dict_strict
    load_state_dict_strict(ours, diffusers_to_dit(theirs.state_dict(), sample_size=8), "diffusers")
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y), expected, rtol=0, atol=1e-5)

    # ours -> diffusers, strictly, into a fresh diffusers model built from our config
    mine = small_dit()
    diffusers = pytest.importorskip("diffusers")
    fresh = match_paper_numerics(diffusers.DiTTransformer2DModel(**diffusers_dit_config(mine)))
    fresh.load_state_dict(dit_to_diffusers(mine.state_dict(), depth=2), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(_diffusers_out(fresh.eval(), x, t, y), mine(x, t, y), rtol=0, atol=1e-5)

    # a diffusers model folder, config.json giving heads and sample_size
    fresh.save_pretrained(tmp_path / "transformer")
    loaded, settings = load_diffusers_dit(tmp_path)
    assert settings["heads"] == 2 and settings["input_size"] == 8
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y), mine(x, t, y), rtol=0, atol=1e-6)


def test_convert_between_the_three_layouts(tmp_path, capsys):
    """official file -> difflineage checkpoint (over an SD VAE file) -> diffusers folder -> official file:
    the same weights at every stage, and the checkpoint samples through the CLI."""
    from difflineage import load
    from difflineage.cli import main
    from difflineage.interop import save_sd_vae
    from difflineage.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig

    model = small_dit()
    official = save_official_dit(model, tmp_path / "dit.pt")
    vae = AutoencoderKL(AutoencoderKLConfig(channels=(8, 8, 8, 8), latent_channels=4, norm_groups=4), image_channels=1)
    vae_file = save_sd_vae(vae, tmp_path / "vae.safetensors")
    ckpt = tmp_path / "ckpt"
    assert main(["convert", str(official), str(ckpt), "--to", "difflineage", "--heads", "2", "--vae", str(vae_file),
                 "--vae-norm-groups", "4", "--data", "digits"]) == 0
    assert "read a official DiT" in capsys.readouterr().out
    system = load(ckpt)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(system.dit(x, t, y), model(x, t, y))
    assert system.space.latent_scale.item() == pytest.approx(0.18215) and system.config.data.image_size == 64
    assert system.config.model.guidance_channels == 3 and system.config.model.diffusion.sample_steps == 250
    assert main(["sample", str(ckpt), "--n", "2", "--label", "3", "--steps", "2", "--out", str(tmp_path / "s.png")]) == 0

    assert main(["convert", str(ckpt), str(tmp_path / "hf"), "--to", "diffusers"]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    back, _ = load_diffusers_dit(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "again.pt"), "--to", "official"]) == 0
    again, _ = load_official_dit(tmp_path / "again.pt", heads=2)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v) and torch.equal(again.state_dict()[k], v)


def test_convert_names_what_it_cannot_write(tmp_path, capsys):
    from difflineage.cli import main

    model = randomise(DiT(DiTConfig(**{**SMALL, "block": "adaln"}), in_channels=4, input_size=8, num_classes=10))
    assert main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "x"), "--to", "official"]) == 2
    assert "missing.pt: no such file" in capsys.readouterr().err
    vae_less = save_official_dit(small_dit(), tmp_path / "dit.pt")
    assert main(["convert", str(vae_less), str(tmp_path / "c"), "--to", "difflineage", "--heads", "2"]) == 2
    assert "give the VAE file" in capsys.readouterr().err  # 4 input channels: a latent DiT needs its --vae
    with pytest.raises(ValueError, match="only adaLN-Zero"):
        save_official_dit(model, tmp_path / "adaln.pt")


def test_convert_reads_a_diffusers_file_and_refuses_what_would_lose_weights(tmp_path, capsys):
    from difflineage.cli import main
    from difflineage.interop.dit import save_diffusers_dit

    model = small_dit()
    save_diffusers_dit(model, tmp_path / "hf")
    weights = tmp_path / "hf" / "diffusion_pytorch_model.safetensors"
    assert main(["convert", str(weights), str(tmp_path / "o.pt"), "--to", "official"]) == 0  # config.json beside it
    assert torch.equal(load_official_dit(tmp_path / "o.pt", heads=2)[0].state_dict()["pos_embed"],
                       model.state_dict()["pos_embed"])
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes(weights.read_bytes())
    assert main(["convert", str(alone), str(tmp_path / "p.pt"), "--to", "official", "--heads", "2"]) == 2
    assert f"{alone}: diffusers weights do not record the latent side" in capsys.readouterr().err
    # a caption-conditioned DiT has neither layout: refused, and nothing is written
    captioned = DiT(DiTConfig(**SMALL), in_channels=4, input_size=8, num_classes=10, context_dim=16)
    with pytest.raises(ValueError, match="caption-conditioned DiT has no official layout"):
        save_official_dit(captioned, tmp_path / "cap.pt")
    with pytest.raises(ValueError, match="caption-conditioned DiT has no diffusers layout"):
        save_diffusers_dit(captioned, tmp_path / "cap-hf")
    assert not (tmp_path / "cap.pt").exists() and not (tmp_path / "cap-hf").exists()
    # a VAE file that is not there is named as itself, not as the DiT file
    official = save_official_dit(model, tmp_path / "dit.pt")
    assert main(["convert", str(official), str(tmp_path / "c"), "--to", "difflineage", "--heads", "2",
                 "--vae", str(tmp_path / "nope.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "nope.safetensors" in err and not err.startswith(f"error: {official}")


def test_a_file_is_read_by_what_it_holds_not_by_its_name(tmp_path):
    from safetensors.torch import save_file

    model = small_dit()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "named.pt"))  # safetensors
    loaded, _ = load_official_dit(tmp_path / "named.pt", heads=2)
    assert torch.equal(loaded.state_dict()["blocks.1.mlp.fc2.weight"], model.state_dict()["blocks.1.mlp.fc2.weight"])
    (tmp_path / "picture.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(CheckpointError, match="picture.pt: not a torch file \\(it starts with b'\\\\x89PNG"):
        load_official_dit(tmp_path / "picture.pt", heads=2)
