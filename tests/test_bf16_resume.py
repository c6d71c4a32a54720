"""Exact resume under bf16 autocast for every two-stage system: the training set's latents or codes are encoded
once, in full precision, before training, in a resumed run as in a straight one, so the continuation has the same
weights as a run that never stopped (bf16 autocast is forced on: it runs on every CPU, emulated where not native).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from helpers import state_equal, tiny_autoencoder_dict

from difflineage.checkpoint import checkpoints_of
from difflineage.systems import config_from_dict, load_config
from difflineage.train import Trainer, load_checkpoint

TINY = ["data.source=digits", "data.image_size=8", "train.batch_size=32", "train.log_every=1", "train.sample_every=0",
        "train.warmup_steps=0", "train.checkpoint_every=3", "train.bf16=true", "data.flip=true"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """The first stages, trained a few steps each: a KL autoencoder, a VQ-VAE, a dVAE; and a DiT on the first."""
    root = tmp_path_factory.mktemp("stages")
    Trainer(config_from_dict(tiny_autoencoder_dict(steps=3)), root / "ae", progress=False).fit()
    Trainer(load_config("vqvae-mnist", TINY + ["train.steps=3", "model.vq.downsample=1", "model.vq.channels=16",
                                               "model.vq.codes=16", "model.vq.code_dim=8"]), root / "vq",
            progress=False).fit()
    Trainer(load_config("dalle-dvae-mnist", TINY + ["train.steps=3", "model.dvae.downsample=1", "model.dvae.channels=16",
                                                    "model.dvae.codes=16", "model.dvae.code_dim=8"]), root / "dvae",
            progress=False).fit()
    Trainer(config_from_dict(_dit(root / "ae", steps=3)), root / "dit", progress=False).fit()
    return root


def _dit(first_stage, **train) -> dict:
    return {"system": "dit", "data": {"source": "digits", "image_size": 8, "channels": 1, "flip": True},
            "model": {"first_stage": str(first_stage), "condition": "class",
                      "dit": {"depth": 2, "hidden": 32, "heads": 2, "patch": 1},
                      "diffusion": {"timesteps": 100, "sample_steps": 5, "variance": "learned_range"}},
            "train": {"steps": 6, "batch_size": 32, "lr": 3e-3, "log_every": 1, "sample_every": 0, "checkpoint_every": 3,
                      "sample_n": 10, "ema_decay": 0.9, "bf16": True, **train}}


def _config(name: str, root):
    if name == "dit":
        return config_from_dict(_dit(root / "ae"))
    if name == "dydit":
        return config_from_dict({"system": "dydit", "data": {"source": "digits", "image_size": 8, "channels": 1,
                                                              "flip": True},
                                 "model": {"base": str(root / "dit"), "target": 0.5, "router_warmup": 4,
                                           "diffusion": {"sample_steps": 5}},
                                 "train": {"steps": 6, "batch_size": 32, "lr": 1e-2, "log_every": 1, "sample_every": 0,
                                           "checkpoint_every": 3, "sample_n": 10, "ema_decay": 0.9, "bf16": True}})
    if name == "vqvae_prior":
        return load_config("vqvae-prior-mnist", TINY + ["train.steps=6", f"model.first_stage={root / 'vq'}",
                                                        "model.prior.channels=16", "model.prior.layers=2"])
    return load_config("dalle-mnist", TINY + ["train.steps=6", f"model.first_stage={root / 'dvae'}",
                                              "model.transformer.width=32", "model.transformer.depth=1",
                                              "model.transformer.heads=2", "model.transformer.text_length=16"])


@pytest.mark.parametrize("name", ["dit", "dydit", "vqvae_prior", "dalle_prior"])
def test_a_two_stage_system_resumed_under_bf16_continues_exactly(stages, tmp_path, name):
    straight = Trainer(_config(name, stages), tmp_path / "straight", progress=False)
    straight.fit()
    Trainer(_config(name, stages), tmp_path / "resumed", stop_at=3, progress=False).fit()
    resumed = Trainer(None, tmp_path / "resumed", resume=True, progress=False)
    resumed.fit()
    assert not state_equal(straight.system.state_dict(), resumed.system.state_dict())
    assert not state_equal(straight.ema.module.state_dict(), resumed.ema.module.state_dict())


def test_a_latent_dit_killed_under_bf16_resumes_exactly(stages, tmp_path):
    """kill -9 while it trains (no stop checkpoint: the last periodic one is resumed), then --resume."""
    config = tmp_path / "dit.yaml"
    config.write_text(yaml.safe_dump(_dit(stages / "ae", steps=60)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "difflineage", "train", str(config), "--out", str(tmp_path / "killed"),
               "--no-progress"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not checkpoints_of(tmp_path / "killed") and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = load_checkpoint(checkpoints_of(tmp_path / "killed")[-1], training_state=True).step
    assert killed_at < 60, "the run finished before it was killed: nothing was resumed"
    subprocess.run(command + ["--resume"], env=env, check=True, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "difflineage", "train", str(config), "--out", str(tmp_path / "straight"),
                    "--no-progress"], env=env, check=True, stdout=subprocess.DEVNULL)
    a = load_checkpoint(tmp_path / "killed", training_state=True)
    b = load_checkpoint(tmp_path / "straight", training_state=True)
    assert a.step == b.step == 60
    assert not state_equal(a.model, b.model) and not state_equal(a.ema, b.ema)
    assert torch.equal(a.training_state["rng"][0]["cpu"], b.training_state["rng"][0]["cpu"])
