"""The latent store: difflineage extract, its shards and checks, and two-stage systems trained from it."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_autoencoder_dict, tiny_ddpm_dict

import difflineage
from difflineage.config import DataConfig
from difflineage.data import DIGIT_NAMES, load_dataset
from difflineage.data.store import LatentStore, StoreDataset
from difflineage.errors import DataError, RunDirError
from difflineage.extract import extract
from difflineage.systems import config_from_dict, load_config
from difflineage.train import Trainer

DIGITS = DataConfig(source="digits", image_size=8, channels=1)  # 1,618 training images


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    run = tmp_path_factory.mktemp("ae")
    Trainer(config_from_dict(tiny_autoencoder_dict()), run, progress=False).fit()
    return run


@pytest.fixture(scope="module")
def store(autoencoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s"
    extract(str(autoencoder), DIGITS, out, shard_size=500, batch_size=64, progress=False)
    return out


def _listing(root: Path) -> dict:
    return json.loads((root / "store.json").read_text())["shards"]


def test_the_store_holds_each_image_and_its_mirror_across_shard_boundaries(store, autoencoder):
    s = LatentStore.open(store, verify=True)
    assert len(s) == 1618 and [sh["count"] for sh in s.meta["shards"]] == [500, 500, 500, 118]
    assert sorted(p.name for p in store.iterdir() if p.suffix == ".bin") == \
        [f"shard_{k:06d}.{a}.bin" for k in range(4) for a in ("mean", "std")]  # a few large files, none per image
    ae = difflineage.load(autoencoder).ae
    data = load_dataset(DIGITS, "train")
    idx = [0, 499, 500, 1617]  # both sides of a shard boundary, and the last image
    x = data.batch(idx)["image"]
    with torch.no_grad():
        mean, logvar = ae.encode(x)
        mean_m, _ = ae.encode(x.flip(-1))
    got = s.arrays(idx)
    assert got["mean"].dtype == torch.float16 and got["mean"].shape == (4, 2, *mean.shape[1:])
    assert torch.allclose(got["mean"][:, 0].float(), mean, atol=2e-3, rtol=1e-3)
    assert torch.allclose(got["mean"][:, 1].float(), mean_m, atol=2e-3, rtol=1e-3)  # the mirror image's own encoding
    assert torch.allclose(got["std"][:, 0].float(), torch.exp(0.5 * logvar), atol=2e-3, rtol=1e-3)
    assert s.labels.tolist() == data.labels.tolist()


def test_training_draws_fresh_latents_and_fresh_flips_on_every_visit(store):
    ds = StoreDataset(LatentStore.open(store), flip=True, seed=0)
    idx = list(range(200))
    b0, b1 = ds.batch(idx, epoch=0), ds.batch(idx, epoch=1)
    assert 0.4 < b0["flip"].float().mean() < 0.6 and not torch.equal(b0["flip"], b1["flip"])
    plain = ds.store.arrays(idx)["mean"]
    for b in (b0, b1):
        want = torch.where(b["flip"].view(-1, 1, 1, 1), plain[:, 1], plain[:, 0]).float()
        assert torch.equal(b["latent_mean"], want)


def ldm_dict(first_stage, **extra):
    d = tiny_ddpm_dict(**{"steps": 6, **extra})
    d["system"] = "ldm"
    d["model"]["first_stage"] = str(first_stage)
    d["model"]["unet"]["channel_mult"] = [1]
    return d


def test_a_latent_model_trains_from_the_store(store, autoencoder, tmp_path):
    d = ldm_dict(autoencoder)
    d["data"]["latents"] = str(store)
    d["data"]["flip"] = True
    t = Trainer(config_from_dict(d), tmp_path / "run", progress=False)
    assert t.fit().status == "finished"
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in log)
    # its latent scale comes from the store's draws: close to the one measured from the images
    from_images = Trainer(config_from_dict(ldm_dict(autoencoder, steps=1)), tmp_path / "images", progress=False)
    from_images.fit()
    assert abs(t.system.space.latent_scale.item() / from_images.system.space.latent_scale.item() - 1) < 0.05
    assert difflineage.load(tmp_path / "run").sample(2).shape == (2, 1, 8, 8)
    # each visit draws a fresh z = mean + std * eps: the draws average to the stored mean, and differ
    space = t.system.space.train()
    batch = StoreDataset(LatentStore.open(store)).batch(range(50))
    draws = torch.stack([space.encode(batch) / space.latent_scale for _ in range(400)])
    assert not torch.equal(draws[0], draws[1])
    assert (draws.mean(0) - batch["latent_mean"]).abs().mean() < 0.1 * batch["latent_std"].mean()


def test_a_store_from_another_first_stage_or_size_is_refused_by_name(store, autoencoder, tmp_path):
    other = tmp_path / "other-ae"
    Trainer(config_from_dict(tiny_autoencoder_dict(seed=5)), other, progress=False).fit()
    d = ldm_dict(other)
    d["data"]["latents"] = str(store)
    with pytest.raises(DataError, match=f"was made with the first stage {autoencoder}.*not with this run's {other}"):
        Trainer(config_from_dict(d), tmp_path / "r1", progress=False).fit()
    d = ldm_dict(autoencoder)
    d["data"].update(latents=str(store), image_size=16)
    with pytest.raises(DataError, match="its images were 8 px, this run's data.image_size is 16"):
        Trainer(config_from_dict(d), tmp_path / "r2", progress=False).fit()
    d = ldm_dict(autoencoder)
    d["data"].update(latents=str(store), source="mnist5k")
    with pytest.raises(DataError, match="it encodes digits, this run's data.source is mnist5k"):
        Trainer(config_from_dict(d), tmp_path / "r3", progress=False).fit()


def test_an_interrupted_extraction_resumes_to_the_same_store(store, autoencoder, tmp_path):
    copy = tmp_path / "s"
    subprocess.run(["cp", "-r", str(store), str(copy)], check=True)
    for f in copy.glob("shard_000002*"):
        f.unlink()  # as if stopped during shard 2: its files never renamed into place, no store.json yet
    (copy / "store.json").unlink()
    (copy / ".tmp-shard_000002.mean.bin").write_bytes(b"\0" * 100)
    with pytest.raises(DataError, match="its extraction has not finished"):
        LatentStore.open(copy)
    extract(str(autoencoder), DIGITS, copy, shard_size=500, batch_size=64, progress=False)
    assert _listing(copy) == _listing(store) and not list(copy.glob(".tmp-*"))
    # the same settings again: nothing to do; other settings into the same folder: refused by name
    extract(str(autoencoder), DIGITS, copy, shard_size=500, batch_size=64, progress=False)
    with pytest.raises(RunDirError, match="made with other settings \\(shard_size differ"):
        extract(str(autoencoder), DIGITS, copy, shard_size=400, progress=False)


def test_a_corrupt_or_truncated_shard_is_named(store, tmp_path):
    copy = tmp_path / "s"
    subprocess.run(["cp", "-r", str(store), str(copy)], check=True)
    f = copy / "shard_000001.std.bin"
    raw = bytearray(f.read_bytes())
    raw[1000] ^= 0xFF
    f.write_bytes(bytes(raw))
    LatentStore.open(copy)  # sizes are right: only the checksum can tell
    with pytest.raises(DataError, match=f"{f} is corrupt: its sha256 differs"):
        LatentStore.open(copy, verify=True)
    f.write_bytes(bytes(raw[:-10]))
    with pytest.raises(DataError, match=f"{f} is truncated or padded"):
        LatentStore.open(copy)


def test_two_processes_under_torchrun_write_the_store_one_process_writes(autoencoder, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["extract", "--first-stage", str(autoencoder), "--data", "digits", "--image-size", "8", "--shard-size", "500",
            "--no-progress"]
    one = subprocess.run([sys.executable, "-m", "difflineage", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                          "-m", "difflineage", *args, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    assert _listing(tmp_path / "one") == _listing(tmp_path / "two")


def test_a_vq_prior_trains_from_a_store_of_codes(tmp_path):
    tiny = ["data.source=digits", "data.image_size=8", "train.batch_size=32", "train.log_every=1", "train.sample_every=0",
            "train.warmup_steps=0", "train.checkpoint_every=0"]
    ae = load_config("vqvae-mnist", tiny + ["train.steps=10", "model.vq.downsample=1", "model.vq.channels=16",
                                            "model.vq.codes=16", "model.vq.code_dim=8"])
    Trainer(ae, tmp_path / "ae", progress=False).fit()
    meta = extract(str(tmp_path / "ae"), DIGITS, tmp_path / "codes", shard_size=1000, progress=False)
    assert meta["kind"] == "codes" and meta["arrays"]["codes0"] == {"dtype": "int16", "shape": [2, 4, 4]}
    prior = load_config("vqvae-prior-mnist", tiny + ["train.steps=5", f"model.first_stage={tmp_path / 'ae'}",
                                                     "model.prior.channels=16", "model.prior.layers=2",
                                                     f"data.latents={tmp_path / 'codes'}"])
    t = Trainer(prior, tmp_path / "prior", progress=False)
    assert t.fit().status == "finished"
    b = StoreDataset(LatentStore.open(tmp_path / "codes")).batch([0, 1])
    with torch.no_grad():
        assert torch.equal(t.system.codes_of(b), t.system.vqvae.encode(load_dataset(DIGITS, "train").batch([0, 1])["image"]))


def test_dydit_fine_tunes_a_latent_dit_from_the_store(store, autoencoder, tmp_path):
    """DyDiT over a latent DiT: the base's first stage made the store, so the store is accepted; the base's latent
    scale is kept."""
    dit = {"system": "dit", "data": {"source": "digits", "image_size": 8, "channels": 1},
           "model": {"first_stage": str(autoencoder), "condition": "class",
                     "dit": {"depth": 2, "hidden": 32, "heads": 2, "patch": 2},
                     "diffusion": {"timesteps": 100, "sample_steps": 5, "guidance": 2.0, "variance": "learned_range"}},
           "train": {"steps": 4, "batch_size": 32, "lr": 3e-3, "log_every": 1, "sample_every": 0, "checkpoint_every": 0,
                     "sample_n": 10}}
    base = Trainer(config_from_dict(dit), tmp_path / "dit", progress=False)
    base.fit()
    dydit = {"system": "dydit", "data": {"source": "digits", "image_size": 8, "channels": 1, "latents": str(store)},
             "model": {"base": str(tmp_path / "dit"), "target": 0.5, "router_warmup": 2,
                       "diffusion": {"sample_steps": 5, "guidance": 2.0}},
             "train": {"steps": 4, "batch_size": 32, "lr": 1e-3, "log_every": 1, "sample_every": 0,
                       "checkpoint_every": 0, "sample_n": 10, "ema_decay": 0.0}}
    t = Trainer(config_from_dict(dydit), tmp_path / "dydit", progress=False)
    assert t.fit().status == "finished"
    assert t.system.space.latent_scale.item() == base.system.space.latent_scale.item()


def test_a_stable_diffusion_vae_file_with_its_own_group_count_is_extracted(tmp_path):
    from difflineage.interop import load_sd_vae, save_sd_vae
    from difflineage.models.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig

    torch.manual_seed(0)  # a small SD-layout VAE with 4 GroupNorm groups (Stable Diffusion's have 32)
    vae = AutoencoderKL(AutoencoderKLConfig(channels=[8, 8], latent_channels=2, norm_groups=4), 1)
    path = save_sd_vae(vae, tmp_path / "vae.safetensors", layout="ldm")
    meta = extract(f"sd-vae:{path}", DIGITS, tmp_path / "s", shard_size=1000, progress=False, vae_norm_groups=4)
    assert meta["kind"] == "gaussian" and meta["count"] == 1618
    got = LatentStore.open(tmp_path / "s", verify=True).arrays([3])
    with torch.no_grad():
        mean, _ = load_sd_vae(path, norm_groups=4).encode(load_dataset(DIGITS, "train").batch([3])["image"])
    assert torch.allclose(got["mean"][:, 0].float(), mean, atol=2e-3, rtol=1e-3)


def _copy(store: Path, to: Path) -> Path:
    subprocess.run(["cp", "-r", str(store), str(to)], check=True)
    return to


def test_extract_again_repairs_a_damaged_store_shard_by_shard(store, autoencoder, tmp_path, capsys):
    copy = _copy(store, tmp_path / "s")
    f = copy / "shard_000001.std.bin"
    raw = bytearray(f.read_bytes())
    raw[1000] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="re-encodes only those that are damaged"):
        LatentStore.open(copy, verify=True)
    untouched = (copy / "shard_000002.mean.bin").stat().st_mtime_ns
    capsys.readouterr()
    extract(str(autoencoder), DIGITS, copy, shard_size=500, batch_size=64, progress=False)
    err = capsys.readouterr().err
    assert "shard_000001 is damaged (shard_000001.std.bin differs from its sha256)" in err
    assert "damaged" not in err.replace("shard_000001 is damaged", "").replace("are damaged", "")  # only that one
    assert (copy / "shard_000002.mean.bin").stat().st_mtime_ns == untouched
    LatentStore.open(copy, verify=True)
    assert _listing(copy) == _listing(store)


def test_a_sidecar_that_lost_a_label_is_caught_and_repaired(store, autoencoder, tmp_path):
    copy = _copy(store, tmp_path / "s")
    side_file = copy / "shard_000001.json"
    side = json.loads(side_file.read_text())
    side["labels"], side["captions"] = side["labels"][1:], side["captions"][1:]  # every later label would shift by one
    side_file.write_text(json.dumps(side))
    with pytest.raises(DataError, match="sidecar .*shard_000001.json .*is corrupt: its sha256 differs"):
        LatentStore.open(copy, verify=True)
    with pytest.raises(DataError, match="shard_000001.json holds 499 labels for the shard's 500 items"):
        LatentStore.open(copy).labels
    extract(str(autoencoder), DIGITS, copy, shard_size=500, batch_size=64, progress=False)
    assert LatentStore.open(copy, verify=True).labels.tolist() == LatentStore.open(store).labels.tolist()


def test_an_empty_sidecar_left_by_a_crash_is_encoded_again(store, autoencoder, tmp_path):
    copy = _copy(store, tmp_path / "s")
    (copy / "store.json").unlink()
    (copy / "shard_000002.json").write_text("")  # renamed into place, its data never reached the disk
    extract(str(autoencoder), DIGITS, copy, shard_size=500, batch_size=64, progress=False)
    assert _listing(copy) == _listing(store)
    (copy / "extract.json").write_text("{")
    with pytest.raises(RunDirError, match="extract.json is unreadable or corrupt .*delete the folder and extract again"):
        extract(str(autoencoder), DIGITS, copy, shard_size=500, batch_size=64, progress=False)


def test_a_store_is_refused_by_a_run_that_would_caption_or_crop_its_images_otherwise(store):
    from difflineage.data.store import open_store_dataset

    ds = open_store_dataset(DataConfig(source="digits", image_size=8, channels=1, latents=str(store)))
    assert ds.captions[0] == f"a handwritten digit {DIGIT_NAMES[int(ds.store.labels[0])]}"
    with pytest.raises(DataError, match="its captions were made as 'a handwritten digit \\{name\\}', this run's "
                                        "data.caption_template makes 'a photo of \\{name\\}'"):
        open_store_dataset(DataConfig(source="digits", image_size=8, channels=1, latents=str(store),
                                      caption_template="a photo of {name}"))
    with pytest.raises(DataError, match="brought to size by in-memory, resize=pad, this run's by in-memory, resize=resize"):
        open_store_dataset(DataConfig(source="digits", image_size=8, channels=1, latents=str(store), resize="resize"))
    with pytest.raises(DataError, match="its class names are zero, one, two ..."):
        open_store_dataset(DataConfig(source="digits", image_size=8, channels=1, latents=str(store),
                                      class_names=[str(i) for i in range(10)]))


def test_extract_takes_a_first_stage_from_what_a_run_offers():
    """Each stage system that offers its network as a first stage (ProvidesFirstStage) is one, of its kind; a prior
    or a diffusion model is refused by name."""
    from difflineage.errors import CheckpointError
    from difflineage.extract import first_stage_for

    fixtures = Path(__file__).parent / "fixtures" / "systems"
    for name, kind, module in (("autoencoder_kl", "gaussian", "ae"), ("vqvae_ae", "codes", "vqvae"),
                               ("vqvae2_ae", "codes", "vqvae"), ("dalle_dvae", "codes", "dvae")):
        stage = first_stage_for(str(fixtures / name), torch.device("cpu"))
        assert stage.kind == kind and stage.spec == str(fixtures / name)
        # the very weights of the run, frozen
        assert stage.digest == difflineage.weights.state_digest(getattr(difflineage.load(fixtures / name), module).state_dict())
        assert not any(p.requires_grad for p in stage.module.parameters())
    for name, what in (("vqvae_prior", "vqvae run (stage prior)"), ("dalle_prior", "dalle run (stage prior)"),
                       ("ddpm_class", "ddpm run")):
        with pytest.raises(CheckpointError, match=re.escape(f"is a {what}, not a first stage")):
            first_stage_for(str(fixtures / name), torch.device("cpu"))
