import pytest
import torch
from helpers import tiny_autoencoder_dict

import difflineage
from difflineage.data import load_dataset
from difflineage.errors import ConfigError
from difflineage.systems import build_system, config_from_dict
from difflineage.systems.spaces import LatentSpace, PixelSpace
from difflineage.train import Trainer


def tiny_dit_dict(first_stage: str = "", **train) -> dict:
    return {
        "system": "dit",
        "data": {"source": "digits", "image_size": 8, "channels": 1},
        "model": {"first_stage": first_stage, "condition": "class",
                  "dit": {"depth": 2, "hidden": 32, "heads": 2, "patch": 2},
                  "diffusion": {"timesteps": 100, "sample_steps": 5, "guidance": 2.0, "variance": "learned_range"}},
        "train": {"steps": 30, "batch_size": 32, "lr": 3e-3, "log_every": 1, "sample_every": 0, "checkpoint_every": 0,
                  "sample_n": 10, "ema_decay": 0.9, **train},
    }


def test_pixel_dit_trains_lowers_the_loss_and_samples(tmp_path):
    import json

    Trainer(config_from_dict(tiny_dit_dict()), tmp_path, progress=False).fit()
    log = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["mse"] for r in log[:5]) / 5, sum(r["mse"] for r in log[-5:]) / 5
    assert last < 0.8 * first
    system = difflineage.load(tmp_path)
    assert isinstance(system.space, PixelSpace) and system.dit.out_channels == 2  # learned sigma
    x = system.sample(4, condition=3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert "vb" in log[-1]  # the hybrid loss


def test_latent_dit_over_a_first_stage(tmp_path):
    Trainer(config_from_dict(tiny_autoencoder_dict()), tmp_path / "ae", progress=False).fit()
    Trainer(config_from_dict(tiny_dit_dict(str(tmp_path / "ae"), steps=2)), tmp_path / "dit", progress=False).fit()
    system = difflineage.load(tmp_path / "dit")
    assert isinstance(system.space, LatentSpace) and (system.channels, system.side) == (2, 4)
    assert system.sample(2, condition=1, generator=torch.Generator().manual_seed(0)).shape == (2, 1, 8, 8)


def test_official_guidance_touches_only_the_first_channels():
    d = tiny_dit_dict()
    d["data"]["channels"] = 3
    d["data"]["num_classes"] = 10
    d["data"]["source"] = "digits"
    d["model"]["guidance_channels"] = 1
    from difflineage.train import build_system

    system = build_system(config_from_dict(d))

    def net(x, t, labels):  # a fake network whose output is its label, on every channel
        return torch.ones(len(x), 6, 8, 8) * labels.float().view(-1, 1, 1, 1)

    system.dit.forward = net
    cond, null = {"labels": torch.tensor([4])}, {"labels": torch.tensor([10])}
    out = system.guide(2.0, cond, null)(torch.zeros(1, 3, 8, 8), torch.tensor([0]))
    assert out[0, 0, 0, 0] == pytest.approx(10 + 2 * (4 - 10)) and out[0, 1, 0, 0] == 4 and out[0, 3, 0, 0] == 4


def test_dit_system_needs_a_condition():
    d = tiny_dit_dict()
    d["model"]["condition"] = "none"
    with pytest.raises(ConfigError, match="class or a caption"):
        config_from_dict(d)


def _caption_dit(block: str):
    from difflineage.train import build_system

    d = tiny_dit_dict()
    d["data"]["num_classes"] = 10
    d["model"].update(condition="caption", text={"width": 16, "depth": 1, "heads": 2, "max_length": 32})
    d["model"]["dit"]["block"] = block
    system = build_system(config_from_dict(d)).eval()
    with torch.no_grad():  # wake the zero-initialised output layers so the condition shows
        for p in system.dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return system


@pytest.mark.parametrize("block", ["adaln_zero", "adaln", "cross_attention", "in_context", "adaln_zero_cross"])
def test_caption_conditioned_dit_reads_the_text(block):
    system = _caption_dit(block)
    assert not hasattr(system.dit, "y_embedder") and hasattr(system.dit, "text_pooled")
    assert hasattr(system.dit, "text_tokens") == (block in ("cross_attention", "adaln_zero_cross"))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = system.sample(2, condition=["a handwritten digit one"] * 2, generator=g())
    b = system.sample(2, condition=["a handwritten digit two"] * 2, generator=g())
    assert a.shape == (2, 1, 8, 8) and not torch.allclose(a, b)
    assert torch.equal(system.sample(2, condition=1, generator=g()), a)  # a label becomes its caption
    loss, _ = system.train().loss(load_dataset(system.config.data, "train").batch(range(4)))
    loss.backward()  # the text encoder trains with the DiT
    assert system.dit.text_pooled.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in system.text.parameters())


def test_the_text_block_is_for_captions_only():
    d = tiny_dit_dict()
    d["data"]["num_classes"] = 10
    d["model"]["dit"]["block"] = "adaln_zero_cross"
    with pytest.raises(ConfigError, match="adaln_zero_cross attends to a caption's tokens: it needs model.condition=caption"):
        build_system(config_from_dict(d))


@pytest.mark.parametrize("block", ["cross_attention", "adaln_zero_cross"])
def test_cross_attention_ignores_padding_tokens(block):
    system = _caption_dit(block)
    cond = system.condition_kwargs(None, ["a handwritten digit one"])
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([10])
    out = system.dit(x, t, **cond)
    padded = dict(cond, context=cond["context"].clone())
    padded["context"][~cond["context_mask"]] = 100.0  # garbage where the mask says padding
    assert torch.allclose(system.dit(x, t, **padded), out, atol=1e-6)
    padded["context"][cond["context_mask"]] += 1.0
    assert not torch.allclose(system.dit(x, t, **padded), out, atol=1e-4)


def test_bf16_sampling_stays_close_to_fp32(tmp_path, capsys):
    from difflineage.cli import main
    from difflineage.eval import bf16_autocast

    system = _caption_dit("adaln_zero")
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    exact = system.sample(4, condition=2, generator=g())
    with bf16_autocast("cpu"):
        fast = system.sample(4, condition=2, generator=g()).float()
    assert fast.dtype == torch.float32 and 0 < (fast - exact).abs().max() < 0.1
    Trainer(config_from_dict(tiny_dit_dict(steps=2)), tmp_path, progress=False).fit()
    assert main(["evaluate", str(tmp_path), "--n", "20", "--bf16", "--bpd-images", "0", "--no-progress",
                 "--features", "mnist", "--out", str(tmp_path / "m.json")]) == 0
    assert '"sampled_in": "bf16 autocast"' in (tmp_path / "m.json").read_text()
    assert main(["sample", str(tmp_path), "--n", "10", "--bf16", "--out", str(tmp_path / "s.png")]) == 0
