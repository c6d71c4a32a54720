"""DDPM's released model layout (``google/ddpm-cifar10-32``: a diffusers UNet2DModel folder with its scheduler config)
as a runnable difflineage checkpoint: the UNet equal to diffusers' to 1e-5, sampled with DDPM, DDIM and DPM-Solver++,
and written back as a folder diffusers loads."""

import json

import pytest
import torch

from difflineage.convert import checkpoint_as_ddpm_folder, ddpm_as_checkpoint
from difflineage.errors import CheckpointError
from difflineage.systems import load

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The CIFAR-10 model's layout at toy width: channels 32 x (1, 2, 2), attention at the middle level, one head,
    dropout 0.1, DDPM's timestep embedding and padding, the old attention names of the hub's files."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None, norm_eps=1e-6,
        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, dropout=0.1).eval()
    folder = tmp_path_factory.mktemp("ddpm-cifar10-32")
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(variance_type="fixed_large"))
    pipe.save_pretrained(str(folder))
    return folder, unet


def test_checkpoint_samples_with_every_sampler(released, tmp_path):
    folder, unet = released
    ckpt = ddpm_as_checkpoint(folder, tmp_path / "ckpt")
    system = load(ckpt).eval()
    assert system.config.model.diffusion.variance == "fixed_large" and system.config.model.unet.dropout == pytest.approx(0.1)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        assert (system.unet(x, t) - unet(x, t).sample).abs().max().item() < 1e-5
    assert (system.config.model.diffusion.sampler, system.config.model.diffusion.sample_steps) == ("ddpm", 1000)
    for sampler, steps in (("ddpm", 50), ("ddim", 10), ("dpmpp_2m", 10)):
        images = system.sample(2, generator=torch.Generator().manual_seed(0), sampler=sampler, steps=steps)
        assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all() and images.abs().max() <= 1


def test_written_folder_loads_in_diffusers(released, tmp_path):
    folder, unet = released
    ckpt = ddpm_as_checkpoint(folder, tmp_path / "ckpt")
    out = checkpoint_as_ddpm_folder(ckpt, tmp_path / "back")
    again = diffusers.DDPMPipeline.from_pretrained(str(out))
    assert again.scheduler.config.variance_type == "fixed_large"
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([250])
    with torch.no_grad():
        assert torch.allclose(again.unet.eval()(x, t).sample, unet(x, t).sample, atol=1e-6)


def test_refusals(released, tmp_path):
    folder, _ = released
    with pytest.raises(CheckpointError, match="no config.json"):
        ddpm_as_checkpoint(tmp_path, tmp_path / "x")
    other = tmp_path / "other"
    other.mkdir()
    config = json.loads((folder / "unet" / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(CheckpointError, match="a UNet2DConditionModel; a DDPM model's UNet is a UNet2DModel"):
        ddpm_as_checkpoint(other, tmp_path / "x")
