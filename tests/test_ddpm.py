import pytest
import torch
from helpers import tiny_ddpm_dict

import difflineage
from difflineage.config import DataConfig
from difflineage.data import load_dataset
from difflineage.errors import ConfigError
from difflineage.models.unet import UNet, UNetConfig
from difflineage.systems import config_from_dict
from difflineage.train import Trainer, build_system


def wake(system):
    """Give the zero-initialised layers small random weights, so an untrained network's output depends on
    its inputs and conditions (a fresh one predicts exactly zero)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in system.parameters():
            if p.abs().max() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return system


def resolved(condition="class", **model):
    d = tiny_ddpm_dict(condition)
    d["data"]["num_classes"] = 10
    d["model"].update(model)
    return config_from_dict(d)


@pytest.mark.parametrize("condition", ["none", "class", "caption"])
def test_unet_shapes_and_zero_initialised_output(condition):
    cfg = UNetConfig(channels=8, channel_mult=(1, 2, 2), attention_resolutions=(4, 2), heads=2, norm_groups=4)
    net = UNet(cfg, 3, 6, 8, num_classes=10 if condition == "class" else 0,
               context_dim=16 if condition == "caption" else None)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 999])
    kw = {"labels": torch.tensor([1, 10])} if condition == "class" else {}
    if condition == "caption":
        kw = {"context": torch.randn(2, 5, 16), "context_mask": torch.ones(2, 5, dtype=torch.bool), "pooled": torch.randn(2, 16)}
    out = net(x, t, **kw)
    assert out.shape == (2, 6, 8, 8)
    assert out.abs().max() == 0  # a fresh UNet predicts zero: every residual branch and the output start at zero


def test_unet_refuses_an_indivisible_side():
    with pytest.raises(ConfigError, match="divisible by 4"):
        UNet(UNetConfig(channels=8, channel_mult=(1, 2, 2), norm_groups=4, heads=2), 1, 1, 6)


def test_training_lowers_the_loss_on_fixed_noise():
    torch.manual_seed(0)
    system = build_system(resolved())
    batch = load_dataset(DataConfig(source="digits", image_size=8), "train").batch(range(64))
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 100, (64,), generator=g)
    noise = torch.randn(64, 1, 8, 8, generator=g)

    def fixed_loss():
        cond = system.condition_kwargs(batch["label"], None)
        return system.diffusion.training_losses(lambda x, tt: system.unet(x, tt, **cond), batch["image"], t, noise)["loss"].mean()

    before = fixed_loss().item()
    opt = torch.optim.AdamW(system.parameters(), lr=3e-3)
    for _ in range(40):
        loss, _ = system.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss().item() < 0.7 * before


def test_sampling_conditioning_and_guidance_scale_one():
    system = wake(build_system(resolved())).eval()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = system.sample(4, condition=3, generator=g(), guidance=1.0)
    b = system.sample(4, condition=3, generator=g(), guidance=1.0)
    c = system.sample(4, condition=5, generator=g(), guidance=1.0)
    assert a.shape == (4, 1, 8, 8) and torch.equal(a, b) and not torch.allclose(a, c)
    # guidance 1 is the conditional model alone: the chain run by hand with the conditional UNet agrees
    labels = torch.full((4,), 3)
    by_hand = system.chain(5).sample(lambda x, t: system.unet(x, t, labels=labels), (4, 1, 8, 8), sampler="ddim",
                                    generator=g(), progress=False)
    assert torch.allclose(a, by_hand.clamp(-1, 1), atol=1e-6)
    assert not torch.allclose(system.sample(4, condition=3, generator=g(), guidance=4.0), a)
    with pytest.raises(TypeError, match="unknown sampling options"):
        system.sample(2, temperature=0.5)


def test_caption_conditioning_reads_text():
    system = wake(build_system(resolved("caption"))).eval()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = system.sample(2, condition=["a handwritten digit one"] * 2, generator=g())
    b = system.sample(2, condition=["a handwritten digit two"] * 2, generator=g())
    assert not torch.allclose(a, b)
    # a class label is turned into its caption
    assert torch.equal(system.sample(2, condition=1, generator=g()), a)
    assert system.captions_for(torch.tensor([7])) == ["a handwritten digit seven"]


def test_bits_per_dim_bound_on_heldout_images():
    system = build_system(resolved()).eval()
    held = load_dataset(DataConfig(source="digits", image_size=8), "heldout")
    r = system.evaluate(held, generator=torch.Generator().manual_seed(0), progress=False, bpd_images=4, bpd_steps=10)
    assert r["bpd_images"] == 4 and r["bpd_steps"] == 10 and r["bpd_space"] == "pixels"
    assert 0 < r["bits_per_dim"] < float("inf") and 0 <= r["prior_bits_per_dim"] < 0.1


def test_train_checkpoint_and_sample_learned_variance(tmp_path):
    d = tiny_ddpm_dict()
    d["model"]["diffusion"]["variance"] = "learned_range"
    Trainer(config_from_dict(d), tmp_path, progress=False).fit()
    system = difflineage.load(tmp_path)
    assert system.unet.conv_out.out_channels == 2  # eps and the variance interpolation
    x = system.sample(3, generator=torch.Generator().manual_seed(1), steps=4, sampler="ddpm")
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    loss, metrics = system.train().loss(load_dataset(DataConfig(source="digits", image_size=8), "train").batch(range(8)))
    assert "vb" in metrics and torch.isfinite(loss)
