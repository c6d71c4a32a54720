"""Stable Diffusion's and DDPM's UNets: our UNet built from their diffusers configs matches diffusers' output to
1e-5, in both the diffusers and the original single-file layouts, and the maps go both ways."""

import pytest
import torch

from difflineage.errors import CheckpointError
from difflineage.interop.sd_unet import (
    config_from_diffusers,
    config_from_original,
    config_to_diffusers,
    from_ours,
    key_map,
    to_ours,
)
from difflineage.models.unet import UNet
from difflineage.nn.attention import Attention

diffusers = pytest.importorskip("diffusers")


def _sd_unet(version: int = 1, depth: int = 1) -> "diffusers.UNet2DConditionModel":
    torch.manual_seed(0)
    kw = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
              transformer_layers_per_block=depth)
    if version == 1:  # 1.x: a head count, convolutional projections
        kw.update(cross_attention_dim=24, attention_head_dim=4)
    else:  # 2.x: heads of one width (here 16), linear projections
        kw.update(cross_attention_dim=40, attention_head_dim=(2, 4, 4), use_linear_projection=True)
    model = diffusers.UNet2DConditionModel(**kw).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make every parameter matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _ddpm_unet() -> "diffusers.UNet2DModel":
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None, norm_num_groups=8,
        norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, dropout=0.1).eval()
    return model


def _ours(ref) -> tuple[UNet, dict]:
    cfg, extra = config_from_diffusers(dict(ref.config), "tiny")
    model = UNet(cfg, extra["in_channels"], extra["out_channels"], extra["sample_size"],
                 context_dim=extra["context_dim"]).eval()
    kmap = key_map(cfg, "diffusers", extra["sample_size"], cross=extra["context_dim"] is not None)
    model.load_state_dict(to_ours(ref.state_dict(), kmap, "tiny"), strict=True)
    return model, extra


@pytest.mark.parametrize("version,depth", [(1, 1), (2, 1), (2, 2)])
def test_sd_unet_matches_diffusers(version, depth):
    ref = _sd_unet(version, depth)
    ours, extra = _ours(ref)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 999])
    ctx = torch.randn(2, 7, extra["context_dim"], generator=g)
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx).sample
        got = ours(x, t, context=ctx)
    assert (got - want).abs().max().item() < 1e-5
    # odd latent sides (SD at 520 px): each upsampler reaches its skip's size, as diffusers forwards it
    x = torch.randn(1, 4, 13, 11, generator=g)
    with torch.no_grad():
        want = ref(x, t[:1], encoder_hidden_states=ctx[:1]).sample
        got = ours(x, t[:1], context=ctx[:1])
    assert got.shape == want.shape and (got - want).abs().max().item() < 1e-5


def test_ddpm_unet_matches_diffusers():
    ref = _ddpm_unet()
    ours, _ = _ours(ref)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([0, 517])
    with torch.no_grad():
        want = ref(x, t).sample
        got = ours(x, t)
    assert (got - want).abs().max().item() < 1e-5
    assert ours.cfg.dropout == pytest.approx(0.1) and ours.cfg.heads_at(64) == 1


def test_ddpm_old_attention_names_load():
    """The DDPM files on the hub predate diffusers 0.14: their attention is query/key/value/proj_attn."""
    ref = _ddpm_unet()
    old = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
           .replace("to_out.0.", "proj_attn."): v for k, v in ref.state_dict().items()}
    assert any(".query." in k for k in old)
    cfg, extra = config_from_diffusers(dict(ref.config))
    kmap = key_map(cfg, "diffusers", extra["sample_size"], cross=False)
    assert all(torch.equal(a, b) for a, b in zip(to_ours(old, kmap, "old").values(),
                                                 to_ours(ref.state_dict(), kmap, "new").values()))


@pytest.mark.parametrize("version", [1, 2])
def test_layouts_round_trip(version):
    """diffusers -> ours -> original -> ours -> diffusers gives back every tensor, and the original layout's shape
    alone rebuilds the config."""
    ref = _sd_unet(version)
    ours, extra = _ours(ref)
    cfg = ours.cfg
    original = from_ours(ours.state_dict(), key_map(cfg, "original", extra["sample_size"], cross=True))
    assert "input_blocks.0.0.weight" in original and "middle_block.1.proj_in.weight" in original
    inferred, more = config_from_original(original, heads=cfg.heads if not cfg.head_channels else None,
                                          head_channels=cfg.head_channels or None)
    assert (inferred.channels, inferred.channel_mult, inferred.num_res_blocks, inferred.linear_projection) == \
        (cfg.channels, cfg.channel_mult, cfg.num_res_blocks, cfg.linear_projection)
    assert more["context_dim"] == extra["context_dim"]
    back = to_ours(original, key_map(inferred, "original", more["sample_size"], cross=True), "original")
    assert set(back) == set(ours.state_dict()) and all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    again = from_ours(back, key_map(cfg, "diffusers", extra["sample_size"], cross=True))
    assert all(torch.equal(again[k], v) for k, v in ref.state_dict().items()) and set(again) == set(ref.state_dict())


@pytest.mark.parametrize("which", ["sd1", "sd2", "ddpm"])
def test_written_config_builds_the_same_network_in_diffusers(which):
    ref = _ddpm_unet() if which == "ddpm" else _sd_unet(1 if which == "sd1" else 2)
    ours, extra = _ours(ref)
    written = config_to_diffusers(ours.cfg, **extra)
    cls = getattr(diffusers, written.pop("_class_name"))
    rebuilt = cls(**written).eval()
    state = from_ours(ours.state_dict(), key_map(ours.cfg, "diffusers", extra["sample_size"],
                                                 cross=extra["context_dim"] is not None))
    rebuilt.load_state_dict(state, strict=True)
    x = torch.randn(1, extra["in_channels"], 16, 16)
    kw = {"encoder_hidden_states": torch.randn(1, 5, extra["context_dim"])} if extra["context_dim"] else {}
    with torch.no_grad():
        assert torch.allclose(rebuilt(x, torch.tensor([3]), **kw).sample, ref(x, torch.tensor([3]), **kw).sample,
                              atol=1e-6)


def test_a_file_of_another_model_is_named():
    ref = _sd_unet(1)
    cfg, extra = config_from_diffusers(dict(ref.config))
    kmap = key_map(cfg, "diffusers", extra["sample_size"], cross=True)
    state = dict(ref.state_dict())
    state.pop("conv_in.weight")
    state["text_model.embeddings.position_ids"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing \(1\): conv_in.weight.*unexpected \(1\): text_model"):
        to_ours(state, kmap, "unet.safetensors")
    with pytest.raises(CheckpointError, match="SDXL"):
        config_from_diffusers({**dict(ref.config), "addition_embed_type": "text_time"})
    with pytest.raises(CheckpointError, match="a VQModel"):
        config_from_diffusers({"_class_name": "VQModel"})


@pytest.mark.parametrize("branch", [0, 1, 3])
def test_feature_cache_reuses_exactly_what_a_full_pass_computed(branch):
    """A reuse call on the same input as the refresh before it gives the plain network's output (the shallow path
    and the cached deep features fit together); interval 1 is the plain network; the reuses are counted."""
    from difflineage.models.unet import FeatureCache

    ours, extra = _ours(_sd_unet(1))
    ours = ours.to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 16, 16).contiguous(memory_format=torch.channels_last)
    t, ctx = torch.tensor([10, 500]), torch.randn(2, 7, extra["context_dim"])
    with torch.no_grad():
        plain = ours(x, t, context=ctx)
        cache = FeatureCache(interval=3, branch=branch)
        outs = [ours(x, t, context=ctx, feature_cache=cache) for _ in range(4)]
        assert cache.reused == 2 and cache.calls == 4
        for out in outs:
            assert (out - plain).abs().max().item() < 1e-5
        other = ours(torch.randn_like(x), t, context=ctx, feature_cache=FeatureCache(interval=1))
        assert not torch.allclose(other, plain)


def test_upcast_attention_runs_in_float32_under_autocast():
    """SD 2.1 sets upcast_attention: its attention in float32 even under bf16 autocast; fp32 results unchanged."""
    ref = _sd_unet(2)
    ref.register_to_config(upcast_attention=True)
    ours, extra = _ours(ref)
    assert ours.cfg.upcast_attention
    seen = []
    attn = next(m for m in ours.modules() if isinstance(m, Attention))
    attn.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([5]), torch.randn(1, 7, extra["context_dim"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours(x, t, context=ctx)
    assert seen and seen[0] == torch.float32
    plain, _ = _ours(_sd_unet(2))
    seen.clear()
    attn = next(m for m in plain.modules() if isinstance(m, Attention))
    attn.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain(x, t, context=ctx)
    assert seen[0] == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(ours(x, t, context=ctx), plain(x, t, context=ctx))
