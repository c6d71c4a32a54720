"""Images read from disk on demand: ADM's centre crop, stateless flips, ImageNet's layout, DataLoader workers, and a
resume in the middle of an epoch that is still exact."""

import numpy as np
import pytest
import torch
from helpers import fake_imagenet, state_equal
from PIL import Image

from difflineage.config import DataConfig
from difflineage.data import BatchStream, ImageDataset, ImageFiles, load_dataset
from difflineage.data.augment import adm_center_crop, flips
from difflineage.errors import DataError
from difflineage.systems import config_from_dict
from difflineage.train import Trainer


def test_adm_center_crop_on_a_hand_worked_case():
    """600 x 400, left third black, target 100: halved by a box filter twice (300 x 200, then 150 x 100, since
    the short side was at least 200 both times), no resize left to do, then the centre 100 columns: 25..124. The
    black-white edge at column 200 of 600 lands at 50 of 150, so at column 25 of the crop."""
    a = np.full((400, 600), 255, np.uint8)
    a[:, :200] = 0
    out = adm_center_crop(Image.fromarray(a), 100)
    assert out.shape == (100, 100)
    assert (out[:, :25] == 0).all() and (out[:, 25:] == 255).all()
    # a small image is enlarged bicubically to the target on its short side, then centre-cropped
    small = adm_center_crop(Image.fromarray(np.zeros((30, 60, 3), np.uint8)), 64)
    assert small.shape == (64, 64, 3)


def test_flips_are_half_different_each_epoch_and_the_same_everywhere():
    idx = np.arange(10000)
    e0, e1 = flips(7, 0, idx), flips(7, 1, idx)
    assert abs(e0.mean() - 0.5) < 0.02 and abs(e1.mean() - 0.5) < 0.02
    assert abs((e0 == e1).mean() - 0.5) < 0.02  # another half each epoch, not the same flip every time
    assert [bool(flips(7, 1, i)) for i in range(50)] == e1[:50].tolist()  # one image at a time, as a worker asks
    assert not np.array_equal(flips(8, 0, idx), e0)


def test_the_imagenet_layout_is_read_lazily_by_sorted_class_folder(tmp_path):
    root = fake_imagenet(tmp_path / "imagenet")
    cfg = DataConfig(source=f"imagenet:{root}", image_size=16, channels=3, flip=True)
    train, held = load_dataset(cfg, "train"), load_dataset(cfg, "heldout")
    assert isinstance(train, ImageFiles) and len(train) == 18 and len(held) == 6
    assert train.class_names == ("tench", "goldfish", "great white shark") and train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert all("/n01/" in f for f in train.files[:6])
    assert train.flip and not held.flip  # only the training split is augmented
    b = train.batch([0, 7], epoch=0)
    assert b["image"].shape == (2, 3, 16, 16) and b["label"].tolist() == [0, 1] and b["caption"] == ["tench", "goldfish"]
    assert b["image"][:, :, :4].mean() > b["image"][:, :, -4:].mean()  # the crop kept the picture upright
    with pytest.raises(DataError, match="has no val/ of class folders"):
        (root / "val").rename(tmp_path / "elsewhere")
        load_dataset(cfg, "heldout")


def _rgb_folder(root, n=40):
    rng = np.random.default_rng(1)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n // 2):
            a = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
            a[:, :3] = 255 * c  # an asymmetric stripe: flips change the picture
            Image.fromarray(a).save(root / f"c{c}" / f"{i}.png")
    return root


def test_workers_give_the_batches_decoding_here_gives_and_a_mid_epoch_start_too(tmp_path):
    files = load_dataset(DataConfig(source=f"folder:{_rgb_folder(tmp_path / 'f')}", image_size=8, channels=3,
                                    stream=True, flip=True), "train", seed=3)

    def take(stream, n):
        out = []
        for k, (e, p, b) in enumerate(stream):
            out.append((e, p, b["image"], b["index"], b["flip"]))
            if k + 1 == n:
                return out

    plain = take(BatchStream(files, 8, seed=3, workers=0), 10)  # 36 images: 4 batches per epoch
    workers = take(BatchStream(files, 8, seed=3, workers=2), 10)
    later = take(BatchStream(files, 8, seed=3, epoch=1, position=2, workers=2), 4)
    assert [(e, p) for e, p, *_ in plain] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1)]
    for a, b in zip(plain, workers):
        assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    for a, b in zip(plain[6:], later):
        assert a[:2] == b[:2] and torch.equal(a[2], b[2])
    assert any(f.any() for *_, f in plain) and not all(f.all() for *_, f in plain)
    # the image of a flipped entry is the mirror of the unflipped decode
    e, p, img, idx, flip = plain[0]
    k = int(flip.nonzero()[0])
    assert torch.equal(img[k], files.batch([int(idx[k])])["image"][0].flip(-1))


def test_a_streamed_run_resumed_mid_epoch_with_two_workers_is_exact(tmp_path):
    folder = _rgb_folder(tmp_path / "f")
    d = {"system": "vae", "data": {"source": f"folder:{folder}", "image_size": 8, "channels": 3, "stream": True,
                                   "flip": True, "workers": 2},
         "model": {"latent_dim": 4, "channels": [8], "hidden": 32},
         "train": {"steps": 10, "batch_size": 8, "lr": 1e-3, "log_every": 1, "sample_every": 0, "checkpoint_every": 0,
                   "sample_n": 4}}
    cfg = config_from_dict(d)
    straight = Trainer(cfg, tmp_path / "a", progress=False)
    straight.fit()
    assert Trainer(cfg, tmp_path / "b", stop_at=6, progress=False).fit().step == 6  # epoch 1, batch 2 of 4
    resumed = Trainer(None, tmp_path / "b", resume=True, progress=False)
    resumed.fit()
    assert state_equal(straight.system.state_dict(), resumed.system.state_dict()) == []
    assert state_equal(straight.ema.module.state_dict(), resumed.ema.module.state_dict()) == []


def test_sigterm_to_the_process_group_with_workers_still_saves_a_checkpoint(tmp_path):
    """SLURM, timeout and torchrun send SIGTERM to the whole process group, the DataLoader's workers included: the
    workers leave it to the trainer, which finishes its step and writes a checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from difflineage.train import load_checkpoint

    folder = _rgb_folder(tmp_path / "f")
    d = {"system": "vae", "data": {"source": f"folder:{folder}", "image_size": 8, "channels": 3, "stream": True,
                                   "workers": 1},
         "model": {"latent_dim": 4, "channels": [8], "hidden": 32},
         "train": {"steps": 100000, "batch_size": 8, "lr": 1e-3, "log_every": 1, "sample_every": 0,
                   "checkpoint_every": 0, "sample_n": 4}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(d))
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "difflineage", "train", str(tmp_path / "cfg.yaml"), "--out", str(run),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics, deadline = run / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopped by SIGTERM" in out, out
    assert load_checkpoint(run).step >= 3


def test_a_file_that_fails_to_decode_in_a_worker_is_named(tmp_path):
    folder = _rgb_folder(tmp_path / "f")
    bad = folder / "c0" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # the header parses; the pixels are cut off
    files = load_dataset(DataConfig(source=f"folder:{folder}", image_size=8, channels=3, stream=True), "train")
    with pytest.raises(DataError, match=f"{bad} could not be decoded as an image"):
        for _ in BatchStream(files, 36, workers=2):
            pass


def test_the_cache_of_a_flipped_set_gives_the_mirror_images_encodings():
    from difflineage.systems.frozen import CodeStage, EncodedTrainingSet

    images = torch.randint(0, 255, (6, 1, 4, 4), dtype=torch.uint8)
    data = ImageDataset(images=images, flip=True, seed=0)
    encode = lambda x: x[..., :2] * 2  # noqa: E731 - not mirror-symmetric: the left half only
    cache = EncodedTrainingSet(encode, data, torch.device("cpu"))
    batch = data.batch(range(6), epoch=0)
    assert batch["flip"].any() and not batch["flip"].all()
    assert torch.equal(cache.lookup(batch["index"], batch["flip"]), encode(batch["image"]))

    class LeftHalf(torch.nn.Module):
        def encode(self, x):
            return encode(x)

    # a first stage caches an in-memory set (training batches are looked up, mirror images included) ...
    stage = CodeStage(LeftHalf(), "a first stage", channels=1)
    stage.attach(data, torch.device("cpu"))
    assert stage.cache is not None
    assert torch.equal(stage.encode(batch, training=True), encode(batch["image"]))
    # ... and encodes a set streamed from disk batch by batch, never cached whole
    stage.attach(ImageFiles(files=[], labels=None, image_size=4, channels=1), torch.device("cpu"))
    assert stage.cache is None


def test_parquet_shards_in_the_hugging_face_imagenet_schema(tmp_path, monkeypatch):
    """An image struct with the encoded bytes and a ClassLabel label, as the imagenet-1k parquet files hold them."""
    import io

    datasets = pytest.importorskip("datasets")  # the [hf] extra; the test extra installs it
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["tench, Tinca tinca",
                                                                                                "goldfish"])})
    for split, n in (("train", 12), ("validation", 4)):
        rows = {"image": [], "label": []}
        for i in range(n):
            a = rng.integers(0, 255, (int(rng.integers(30, 60)), int(rng.integers(30, 60)), 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG")
            rows["image"].append({"bytes": buf.getvalue(), "path": None})
            rows["label"].append(i % 2)
        (tmp_path / "data").mkdir(exist_ok=True)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    cfg = DataConfig(source=f"parquet:{tmp_path}", image_size=16, channels=3, flip=True)
    train, held = load_dataset(cfg, "train"), load_dataset(cfg, "heldout")
    assert len(train) == 12 and len(held) == 4 and train.class_names == ("tench", "goldfish")
    b = train.batch([0, 3], epoch=0)
    assert b["image"].shape == (2, 3, 16, 16) and b["label"].tolist() == [0, 1] and b["caption"] == ["tench", "goldfish"]
    first = np.array(adm_center_crop(Image.open(io.BytesIO(datasets.Dataset.from_parquet(
        str(tmp_path / "data" / "train-00000-of-00001.parquet")).cast_column("image", datasets.Image(decode=False))[0]
        ["image"]["bytes"])).convert("RGB"), 16))
    assert torch.equal(train.batch([0])["image"][0], torch.from_numpy(first).permute(2, 0, 1).float() / 127.5 - 1)
    streamed = [b for _, (_, _, b) in zip(range(3), BatchStream(train, 4, workers=2))]  # through workers
    assert all(s["image"].shape == (4, 3, 16, 16) for s in streamed)
    with pytest.raises(DataError, match="has no validation-\\*.parquet"):
        (tmp_path / "data" / "validation-00000-of-00001.parquet").unlink()
        load_dataset(cfg, "heldout")


def _every_mode(folder):
    """One 8x8 file per mode, in one class folder of ten (the held-out split takes the tenth), each a known value:
    16-bit grey 25700 (= 100 in 8 bits), transparent and half-transparent pixels (composited on white)."""
    c = folder / "c0"
    c.mkdir(parents=True)
    wide = np.full((8, 8), 25700, np.uint16)
    wide[0, 0] = 65535
    Image.fromarray(wide).save(c / "a_i16.png")  # mode I;16
    la = np.zeros((8, 8, 2), np.uint8)
    la[..., 0], la[..., 1] = 10, 255
    la[0, 0] = (10, 0)  # transparent: white
    la[0, 1] = (10, 128)  # half-transparent: halfway to white, (10 x 128 + 255 x 127) / 255 = 132
    Image.fromarray(la, "LA").save(c / "b_la.png")
    rgba = Image.new("RGBA", (8, 8), (200, 0, 0, 255))
    rgba.putpixel((0, 0), (200, 0, 0, 0))
    rgba.save(c / "c_rgba.png")
    Image.fromarray(np.array(rgba)).save(c / "d_rgba_from_array.png")
    p = Image.new("P", (8, 8), 1)
    p.putpalette([0, 0, 255, 0, 200, 0])
    p.putpixel((0, 0), 0)
    p.save(c / "e_p.png", transparency=0)  # palette index 0 transparent
    for i in range(5):
        Image.new("L", (8, 8), 50).save(c / f"f_{i}.png")
    return folder


@pytest.mark.parametrize("stream", [False, True])
def test_every_image_mode_decodes_to_its_8_bit_values_in_memory_and_streamed(tmp_path, stream):
    folder = _every_mode(tmp_path / "modes")
    d = load_dataset(DataConfig(source=f"folder:{folder}", image_size=8, channels=3, stream=stream, resize="pad"), "train")
    x = d.batch(range(len(d)))["image"]
    px = ((x + 1) * 127.5).round().to(torch.int64)  # back to 0..255
    wide, la, rgba, rgba2, pal = (px[i] for i in range(5))  # the files in name order
    assert wide[0, 1, 1] == 100 and wide[0, 0, 0] == 255  # 16-bit scaled to 8 bits (was clipped: solid 255)
    assert la[:, 1, 1].tolist() == [10, 10, 10] and la[:, 0, 0].tolist() == [255, 255, 255]
    assert la[:, 0, 1].tolist() == [132, 132, 132]
    for image in (rgba, rgba2):
        assert image[:, 1, 1].tolist() == [200, 0, 0] and image[:, 0, 0].tolist() == [255, 255, 255]
    assert pal[:, 1, 1].tolist() == [0, 200, 0] and pal[:, 0, 0].tolist() == [255, 255, 255]
    grey = load_dataset(DataConfig(source=f"folder:{folder}", image_size=8, channels=1, stream=stream,
                                   resize="pad"), "train")
    g = ((grey.batch([0])["image"] + 1) * 127.5).round()
    assert g[0, 0, 1, 1] == 100 and g.shape[1] == 1


def test_a_streamed_folder_takes_its_channels_from_every_file_as_the_in_memory_one(tmp_path):
    folder = _rgb_folder(tmp_path / "f")
    grey = sorted((folder / "c1").glob("*.png"))[3]
    Image.open(grey).convert("L").save(grey)  # one grey file among colour ones
    for stream in (False, True):
        with pytest.raises(DataError, match="mixes channel counts"):
            load_dataset(DataConfig(source=f"folder:{folder}", image_size=8, channels=None, stream=stream), "train")
        fixed = load_dataset(DataConfig(source=f"folder:{folder}", image_size=8, channels=3, stream=stream), "train")
        assert fixed.shape[0] == 3
    Image.open(grey).convert("RGB").save(grey)
    assert load_dataset(DataConfig(source=f"folder:{folder}", image_size=8, channels=None, stream=True),
                        "train").shape[0] == 3
