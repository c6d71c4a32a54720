"""Stable Diffusion's KL autoencoder: parity with diffusers, the SD weight loaders and their refusals."""

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from difflineage.errors import CheckpointError, ConfigError
from difflineage.interop import detect_layout, diffusers_to_ldm, ldm_to_diffusers, load_sd_vae, save_sd_vae
from difflineage.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig

diffusers = pytest.importorskip("diffusers")

ATOL = RTOL = 1e-5


def _randomise_norms(model: nn.Module) -> None:
    """GroupNorm starts at weight 1, bias 0; random values make a mis-wired norm show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)


def _diffusers_vae(image_channels=3, layers_per_block=1, attention=True, channels=(32, 64)):
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(in_channels=image_channels, out_channels=image_channels,
                                  down_block_types=("DownEncoderBlock2D",) * len(channels),
                                  up_block_types=("UpDecoderBlock2D",) * len(channels),
                                  block_out_channels=channels, layers_per_block=layers_per_block, latent_channels=4,
                                  norm_num_groups=8, mid_block_add_attention=attention)
    _randomise_norms(ref)
    return ref.eval()


def _ours(image_channels=3, **kw) -> AutoencoderKL:
    torch.manual_seed(0)
    model = AutoencoderKL(AutoencoderKLConfig(**kw), image_channels)
    _randomise_norms(model)
    return model.eval()


@pytest.fixture(scope="module")
def ref():
    return _diffusers_vae()


def _assert_same_outputs(a: AutoencoderKL, b: AutoencoderKL, channels: int = 3) -> None:
    x = torch.rand(2, channels, 16, 16) * 2 - 1
    with torch.no_grad():
        for ta, tb in zip(a.encode(x), b.encode(x)):
            torch.testing.assert_close(ta, tb, atol=0, rtol=0)
        z = torch.randn(2, 4, 8, 8)
        torch.testing.assert_close(a.decode(z), b.decode(z), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# Parity with diffusers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_channels,layers,attention", [(3, 1, True), (1, 1, True), (3, 2, True), (3, 1, False)])
def test_parity_with_diffusers(image_channels, layers, attention):
    ref = _diffusers_vae(image_channels, layers, attention)
    ours = AutoencoderKL(AutoencoderKLConfig(channels=(32, 64), layers_per_block=layers, mid_attention=attention),
                         image_channels)
    ours.load_state_dict(diffusers_to_ldm(ref.state_dict()), strict=True)
    ours.eval()
    x = torch.rand(2, image_channels, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        assert mean.shape == (2, 4, 8, 8)
        torch.testing.assert_close(mean, dist.mean, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(logvar, dist.logvar, atol=ATOL, rtol=RTOL)
        z = dist.mean + 0.5 * torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(3))
        out = ours.decode(z)
        assert out.shape == x.shape
        torch.testing.assert_close(out, ref.decode(z).sample, atol=ATOL, rtol=RTOL)
        # and not trivially: the reconstruction depends on z
        assert not torch.allclose(out, ours.decode(torch.zeros_like(z)), atol=1e-3)


def test_state_dict_uses_ldm_names():
    keys = set(_ours(channels=(32, 64, 64), layers_per_block=2).state_dict())
    for key in ["encoder.conv_in.weight", "encoder.down.0.block.1.conv2.weight",
                "encoder.down.1.block.0.nin_shortcut.weight", "encoder.down.0.downsample.conv.weight",
                "encoder.down.1.downsample.conv.weight", "encoder.mid.block_1.norm1.weight",
                "encoder.mid.attn_1.proj_out.weight", "encoder.mid.block_2.conv2.bias",
                "encoder.norm_out.weight", "encoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight",
                "decoder.conv_in.weight", "decoder.mid.attn_1.q.weight", "decoder.up.2.block.2.conv1.weight",
                "decoder.up.0.block.0.nin_shortcut.weight", "decoder.up.1.upsample.conv.weight",
                "decoder.up.2.upsample.conv.weight", "decoder.norm_out.bias", "decoder.conv_out.weight"]:
        assert key in keys, key
    assert "encoder.down.2.downsample.conv.weight" not in keys
    assert "decoder.up.0.upsample.conv.weight" not in keys
    assert _ours().state_dict()["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)


# ----------------------------------------------------------------------------------------------
# Layout conversion and files
# ----------------------------------------------------------------------------------------------


def test_layout_round_trips_are_exact(ref):
    d = ref.state_dict()
    ldm = diffusers_to_ldm(d)
    assert detect_layout(d) == "diffusers" and detect_layout(ldm) == "ldm"
    back = ldm_to_diffusers(ldm)
    assert set(back) == set(d) and all(torch.equal(back[k], d[k]) and back[k].shape == d[k].shape for k in d)
    again = diffusers_to_ldm(back)
    assert set(again) == set(ldm) and all(torch.equal(again[k], ldm[k]) for k in ldm)


def test_old_diffusers_attention_names(ref):
    old = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
           .replace("to_out.0.", "proj_attn."): v for k, v in ref.state_dict().items()}
    assert any(".proj_attn." in k for k in old)
    new = diffusers_to_ldm(ref.state_dict())
    conv = diffusers_to_ldm(old)
    assert set(conv) == set(new) and all(torch.equal(conv[k], new[k]) for k in new)


def test_load_sd_vae_diffusers_layout(tmp_path, ref):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = load_sd_vae(path, norm_groups=8)
    assert not model.training and model.cfg.channels == (32, 64) and model.cfg.layers_per_block == 1
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x)[0], ref.encode(x).latent_dist.mean, atol=ATOL, rtol=RTOL)
    expected = AutoencoderKL(model.cfg, 3)
    expected.load_state_dict(diffusers_to_ldm(ref.state_dict()))
    _assert_same_outputs(model, expected.eval())


def test_load_sd_vae_full_ldm_checkpoint(tmp_path):
    src = _ours(1, channels=(32, 64, 64), layers_per_block=2, mid_attention=False)
    state = {f"first_stage_model.{k}": v for k, v in src.state_dict().items()}
    state["model.diffusion_model.x"] = torch.zeros(3)
    state["cond_stage_model.transformer.y"] = torch.zeros(2)
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": state, "global_step": 7}, path)
    model = load_sd_vae(path, norm_groups=8)
    assert model.cfg == src.cfg and model.image_channels == 1 and model.downsampling_factor == 4
    _assert_same_outputs(model, src, channels=1)


def test_load_sd_vae_standalone_ckpt_drops_loss_keys(tmp_path):
    src = _ours()
    state = dict(src.state_dict())
    state["loss.logvar"] = torch.zeros(())
    state["loss.discriminator.main.0.weight"] = torch.zeros(8, 3, 4, 4)
    path = tmp_path / "kl-f2.pt"
    torch.save({"state_dict": state}, path)
    _assert_same_outputs(load_sd_vae(path, norm_groups=8), src)


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_save_sd_vae_round_trip(tmp_path, layout, ref):
    src = _ours()
    path = save_sd_vae(src, tmp_path / f"vae-{layout}.safetensors", layout=layout)
    stored = load_file(str(path))
    assert detect_layout(stored) == layout
    if layout == "diffusers":  # diffusers itself accepts the file
        ref_copy = _diffusers_vae()
        ref_copy.load_state_dict(stored, strict=True)
    loaded = load_sd_vae(path, norm_groups=8)
    a, b = loaded.state_dict(), src.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)


# ----------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------

_EXECUTED: list = []


def _payload():
    _EXECUTED.append(True)
    return "ran"


class _Malicious:
    def __reduce__(self):
        return (_payload, ())


def test_missing_key_is_named(tmp_path):
    state = dict(_ours().state_dict())
    del state["decoder.up.0.block.1.conv2.weight"]
    path = tmp_path / "vae.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"missing.*decoder\.up\.0\.block\.1\.conv2\.weight") as err:
        load_sd_vae(path, norm_groups=8)
    assert str(path) in str(err.value)


def test_missing_shape_key_is_named(tmp_path):
    state = dict(_ours().state_dict())
    del state["encoder.conv_in.weight"]
    path = tmp_path / "vae.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"encoder\.conv_in\.weight") as err:
        load_sd_vae(path, norm_groups=8)
    assert str(path) in str(err.value)


def test_shape_mismatch_is_named(tmp_path):
    state = dict(_ours().state_dict())
    state["decoder.conv_out.weight"] = torch.zeros(3, 32, 1, 1)
    path = tmp_path / "vae.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*decoder\.conv_out\.weight") as err:
        load_sd_vae(path, norm_groups=8)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(CheckpointError, match="no such file") as err:
        load_sd_vae(path)
    assert str(path) in str(err.value)


def test_file_without_vae_weights(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(CheckpointError, match="no VAE weights") as err:
        load_sd_vae(path)
    assert str(path) in str(err.value)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": dict(_ours().state_dict()), "extra": _Malicious()}, path)
    with pytest.raises(CheckpointError, match="weights_only") as err:
        load_sd_vae(path, norm_groups=8)
    assert str(path) in str(err.value)
    assert not _EXECUTED


def test_impossible_norm_groups_for_file(tmp_path):
    path = save_sd_vae(_ours(), tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="norm_groups") as err:
        load_sd_vae(path, norm_groups=48)
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------------------------
# Shapes and config
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels,factor", [((32,), 1), ((32, 64), 2), ((16, 32, 32), 4)])
def test_shapes(channels, factor):
    model = AutoencoderKL(AutoencoderKLConfig(channels=channels, latent_channels=3), image_channels=2)
    assert model.downsampling_factor == factor
    x = torch.randn(2, 2, 16, 8)
    recon, mean, logvar = model(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == x.shape
    assert mean.shape == logvar.shape == (2, 3, 16 // factor, 8 // factor)
    assert logvar.min() >= -30 and logvar.max() <= 20


def test_forward_sampling():
    model = _ours()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        a = model(x, generator=torch.Generator().manual_seed(5))[0]
        b = model(x, generator=torch.Generator().manual_seed(5))[0]
        c = model(x, generator=torch.Generator().manual_seed(6))[0]
        recon, mean, _ = model(x, sample=False)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c)
    torch.testing.assert_close(recon, model.decode(mean), atol=0, rtol=0)


@pytest.mark.parametrize("kw,key", [(dict(channels=()), "model.channels"),
                                    (dict(channels=(32, 60)), "model.norm_groups"),
                                    (dict(norm_groups=0), "model.norm_groups"),
                                    (dict(latent_channels=0), "model.latent_channels"),
                                    (dict(layers_per_block=0), "model.layers_per_block"),
                                    (dict(kl_weight=-1.0), "model.kl_weight")])
def test_config_check(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        AutoencoderKLConfig(**kw).check()
    with pytest.raises(ConfigError):
        AutoencoderKL(AutoencoderKLConfig(**kw))
