"""Tiny systems and configs shared by the tests (importable from subprocess workers too)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from difflineage.systems import SYSTEMS, System, config_from_dict


@dataclass
class TinyConfig:
    """A deterministic denoiser: with no random draws in its loss, N processes must follow 1 exactly."""

    hidden: int = 8
    nan_at_call: int = 0  # from this call of loss() on, the loss is NaN (0: never)
    grow_from_call: int = 0  # after this call of loss(), the loss grows by `growth` per call: a finite explosion
    growth: float = 30.0
    grow_from_step: int = 0  # the same by training step, so that a resumed run grows where a straight one does


class TinyRegression(System):
    name = "tiny"
    ModelConfig = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        c = config.data.channels or 1
        self.net = nn.Sequential(nn.Conv2d(c, config.model.hidden, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(config.model.hidden, c, 3, padding=1))
        self.calls = 0

    def loss(self, batch, step=None):
        self.calls += 1
        x = batch["image"]
        target = torch.roll(x, shifts=1, dims=-1)
        loss = F.mse_loss(self.net(x).float(), target)
        if self.config.model.nan_at_call and self.calls >= self.config.model.nan_at_call:
            loss = loss * float("nan")
        m = self.config.model
        if m.grow_from_call and self.calls > m.grow_from_call:
            loss = loss * m.growth ** (self.calls - m.grow_from_call)
        if m.grow_from_step and step is not None and step >= m.grow_from_step:
            loss = loss * m.growth ** (step + 1 - m.grow_from_step)
        return loss, {"mse": loss.detach()}

    @torch.no_grad()
    def sample(self, n, condition=None, generator=None, **options):
        c, s = self.config.data.channels or 1, self.config.data.image_size
        noise = torch.rand(n, c, s, s, generator=generator).to(self.device) * 2 - 1
        return self.net(noise).clamp(-1, 1)


def register() -> None:
    SYSTEMS.setdefault(TinyRegression.name, TinyRegression)


def tiny_vae_dict(**train) -> dict:
    """A VAE small enough to train a few steps in well under a second, on scikit-learn's 8x8 digits."""
    return {
        "system": "vae",
        "data": {"source": "digits", "image_size": 8, "channels": 1},
        "model": {"latent_dim": 4, "channels": [8], "hidden": 32},
        "train": {"steps": 8, "batch_size": 16, "lr": 1e-3, "log_every": 2, "sample_every": 0,
                  "checkpoint_every": 0, "sample_n": 10, "ema_decay": 0.9, **train},
    }


def tiny_vae(**train):
    return config_from_dict(tiny_vae_dict(**train))


def tiny_regression_dict(**train) -> dict:
    register()
    return {
        "system": "tiny",
        "data": {"source": "digits", "image_size": 8, "channels": 1},
        "model": {"hidden": 8},
        "train": {"steps": 6, "batch_size": 32, "lr": 1e-2, "log_every": 1, "sample_every": 0,
                  "checkpoint_every": 0, "sample_n": 4, "ema_decay": 0.9, **train},
    }


def state_equal(a: dict, b: dict, atol: float = 0.0) -> list[str]:
    """Names of the tensors that differ (beyond atol) between two state dicts; [] when all match."""
    assert a.keys() == b.keys(), (sorted(set(a) ^ set(b)))
    bad = []
    for k in a:
        if atol == 0.0:
            if not torch.equal(a[k], b[k]):
                bad.append(k)
        elif not torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0):
            bad.append(k)
    return bad


def tiny_ddpm_dict(condition: str = "class", **train) -> dict:
    """A DDPM small enough to train a few steps in a second, on 8x8 digits."""
    return {
        "system": "ddpm",
        "data": {"source": "digits", "image_size": 8, "channels": 1},
        "model": {"condition": condition,
                  "unet": {"channels": 8, "channel_mult": [1, 2], "attention_resolutions": [4], "heads": 2,
                           "norm_groups": 4},
                  "text": {"width": 16, "depth": 1, "heads": 2, "max_length": 32},
                  "diffusion": {"timesteps": 100, "sample_steps": 5, "guidance": 2.0}},
        "train": {"steps": 4, "batch_size": 16, "lr": 1e-3, "log_every": 2, "sample_every": 0,
                  "checkpoint_every": 0, "sample_n": 10, "ema_decay": 0.9, **train},
    }


def tiny_autoencoder_dict(**train) -> dict:
    return {
        "system": "autoencoder_kl",
        "data": {"source": "digits", "image_size": 8, "channels": 1},
        "model": {"channels": [8, 8], "latent_channels": 2, "norm_groups": 4, "kl_weight": 1e-4},
        "train": {"steps": 3, "batch_size": 16, "lr": 1e-3, "log_every": 1, "sample_every": 0,
                  "checkpoint_every": 0, "sample_n": 4, "ema_decay": 0.9, **train},
    }


def run_as_printed(command: str, *extra: str, **kwargs):
    """Run a command the way a user pastes it from difflineage's advice: ``difflineage ...`` through the installed
    console script (beside this Python), else ``python -m difflineage ...``."""
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    argv = shlex.split(command)
    assert argv and argv[0] == "difflineage", command
    script = Path(sys.executable).with_name("difflineage")
    argv = [str(script), *argv[1:]] if script.exists() else [sys.executable, "-m", "difflineage", *argv[1:]]
    return subprocess.run([*argv, *extra], capture_output=True, text=True, **kwargs)


def fake_imagenet(root, per_class=6, val=2):
    """ImageNet's layout at toy size: train/<wnid>/*.JPEG of mixed sizes, val/<wnid>/, and Kaggle's synset file."""
    rng = np.random.default_rng(0)
    wnids = ["n02", "n01", "n03"]  # out of order on purpose: classes go by sorted name
    for split, n in (("train", per_class), ("val", val)):
        for k, w in enumerate(wnids):
            (root / split / w).mkdir(parents=True)
            for i in range(n):
                h, wd = int(rng.integers(40, 90)), int(rng.integers(40, 90))
                a = np.full((h, wd, 3), 40 * (k + 1), np.uint8)
                a[: h // 2] = 250  # structure: top half bright
                Image.fromarray(a).save(root / split / w / f"{w}_{i}.JPEG", quality=95)
    (root / "LOC_synset_mapping.txt").write_text("n01 tench, Tinca tinca\nn02 goldfish\nn03 great white shark, white shark\n")
    return root


def make_clip_vocab(folder, captions, pad_token: str = "<|endoftext|>", vocab_size: int = 600):
    """A small byte-level BPE vocabulary with CLIP's conventions (``</w>`` word ends, its start and end tokens),
    trained on ``captions`` and written as ``vocab.json`` and ``merges.txt`` (a model folder's ``tokenizer/``)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet + [a + "</w>" for a in alphabet],
                                  end_of_word_suffix="</w>", show_progress=False,
                                  special_tokens=["!", "<|startoftext|>", "<|endoftext|>"])
    tok.train_from_iterator([c.lower() for c in captions], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": pad_token, "model_max_length": 77}))
    return folder


def make_tiny_sd(version: int, folder, captions):
    """A tiny Stable Diffusion ``StableDiffusionPipeline`` (1.x or 2.x) with random weights: UNet 32/64 (64/128 for
    2.x's 64-wide heads), a 2-layer text tower, a 2-level VAE, 32 GroupNorm groups (which a single file cannot record),
    its tokenizer a CLIP-style vocabulary trained on ``captions``; saved as a diffusers folder; the pipeline returned."""
    import diffusers
    import transformers

    torch.manual_seed(0)
    if version == 1:
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
        act, pad = "quick_gelu", "<|endoftext|>"
    else:
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=(1, 2), use_linear_projection=True, norm_num_groups=32)
        act, pad = "gelu", "!"
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    tok_dir = make_clip_vocab(folder / "tokenizer", captions, pad_token=pad)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=1, max_position_embeddings=77, hidden_act=act, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                                  latent_channels=4, norm_num_groups=32, sample_size=16).eval()
    sched_cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                     set_alpha_to_one=False, steps_offset=1,
                     prediction_type="epsilon" if version == 1 else "v_prediction")
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(**sched_cfg), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(folder))
    return pipe
