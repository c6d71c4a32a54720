"""The ImageNet-256 chain at toy size, each step the command a user runs (docs/imagenet.md): an ImageNet-layout
folder -> `extract` with an SD-VAE-layout file -> `train dit-s2-imagenet256` from the store -> `reference` from the
held-out images -> `evaluate --reference` over two torchrun processes (the DiT paper's sampling by default) -> an
ADM npz, identical to one process's, and its scores."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import fake_imagenet

import difflineage
from difflineage.eval.inception import random_fid_inception
from difflineage.eval.sampling import DIT_FID_SAMPLING, merge_shards, sample_shards
from difflineage.interop.sd_vae import save_sd_vae
from difflineage.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig

pytestmark = pytest.mark.slow


def difflineage_cli(*args, launcher=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *launcher, "-m", "difflineage", *map(str, args)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"difflineage {' '.join(map(str, args))}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_imagenet_chain_from_folder_to_fid(tmp_path):
    root = fake_imagenet(tmp_path / "imagenet", per_class=8, val=4)
    torch.manual_seed(0)  # an SD-VAE-layout file of random weights: f = 8, 4 latent channels, GroupNorm 32
    vae = save_sd_vae(AutoencoderKL(AutoencoderKLConfig(channels=(32, 32, 32, 32), layers_per_block=1,
                                                        latent_channels=4, norm_groups=32), image_channels=3),
                      tmp_path / "vae.safetensors")
    weights = tmp_path / "inception.safetensors"  # random weights: the arithmetic, not the numbers of the real file
    random_fid_inception(seed=0, path=weights)

    store, run = tmp_path / "store", tmp_path / "run"
    difflineage_cli("extract", "--first-stage", f"sd-vae:{vae}", "--data", f"imagenet:{root}", "--image-size", 32,
                    "--out", store, "--no-progress")
    difflineage_cli("train", "dit-s2-imagenet256", "--out", run, "--no-progress", "--set",
                    f"data.source=imagenet:{root}", f"data.latents={store}", "data.image_size=32",
                    f"model.first_stage=sd-vae:{vae}", "model.dit.name=custom", "model.dit.depth=1",
                    "model.dit.hidden=32", "model.dit.heads=2", "train.steps=4", "train.batch_size=8",
                    "train.log_every=2", "train.sample_every=0", "train.checkpoint_every=0", "train.sample_n=4")
    ref = tmp_path / "ref.npz"
    made = difflineage_cli("reference", "--data", f"imagenet:{root}", "--image-size", 32, "--inception-weights", weights,
                           "--out", ref, "--no-progress")
    assert "12 of the 12 heldout images, 32x32" in made
    with np.load(ref) as obj:
        assert obj["arr_0"].shape == (12, 32, 32, 3) and obj["mu"].shape == (2048,) and obj["sigma_s"].shape == (2023, 2023)

    out = difflineage_cli("evaluate", run, "--reference", ref, "--inception-weights", weights, "--num-samples", 8,
                          "--batch-size", 4, "--npz", tmp_path / "two.npz", "--out", tmp_path / "two.json",
                          "--no-progress", launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"))
    assert "sampler ddpm, steps 250, guidance 1.5; 2 processes" in out
    result = json.loads((tmp_path / "two.json").read_text())
    assert result["sample_options"] == DIT_FID_SAMPLING and result["processes"] == 2
    assert result["samples"] == 8 and result["reference_images"] == 12 and "ADM" in result["evaluator"]
    assert result["fid"] > 0 and result["sfid"] > 0 and result["inception_score"] >= 1.0
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    two = np.load(tmp_path / "two.npz")
    assert two["arr_0"].shape == (8, 32, 32, 3) and two["arr_0"].dtype == np.uint8 and two["arr_1"].max() < 3
    # one process draws the same batches: the samples do not depend on how many processes drew them. It draws them
    # with the processes' one thread, since a reduction's rounding on CPU depends on how many threads split it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sample_shards(difflineage.load(run), tmp_path / "one.parts", 8, batch_size=4, options=DIT_FID_SAMPLING,
                      progress=False)
    finally:
        torch.set_num_threads(threads)
    merge_shards(tmp_path / "one.parts", tmp_path / "one.npz", 8, 4)
    one = np.load(tmp_path / "one.npz")
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
