import gzip
import json

import numpy as np
import pytest
import torch
from PIL import Image

from difflineage.config import DataConfig
from difflineage.data import load_dataset
from difflineage.errors import DataError


def test_mnist5k_fixed_split_from_the_installed_package():
    train = load_dataset(DataConfig(source="mnist5k", image_size=28), "train")
    held = load_dataset(DataConfig(source="mnist5k", image_size=28), "heldout")
    assert len(train) == 4500 and len(held) == 500
    assert torch.bincount(train.labels).tolist() == [450] * 10
    assert torch.bincount(held.labels).tolist() == [50] * 10
    # The two splits share no image, and the split is the same every time.
    tr = {bytes(x.numpy()) for x in train.images}
    assert not any(bytes(x.numpy()) in tr for x in held.images)
    again = load_dataset(DataConfig(source="mnist5k", image_size=28), "heldout")
    assert torch.equal(again.images, held.images)


def test_mnist5k_pad_and_resize_to_32():
    native = load_dataset(DataConfig(source="mnist5k", image_size=28), "heldout")
    padded = load_dataset(DataConfig(source="mnist5k", image_size=32, resize="pad"), "heldout")
    resized = load_dataset(DataConfig(source="mnist5k", image_size=32, resize="resize"), "heldout")
    assert padded.shape == resized.shape == (1, 32, 32)
    assert torch.equal(padded.images[:, :, 2:30, 2:30], native.images)  # centred, 2-pixel zero border
    assert padded.images[:, :, :2].sum() == 0
    assert not torch.equal(resized.images, padded.images)


def test_batch_layout_and_captions():
    ds = load_dataset(DataConfig(source="mnist5k", image_size=32), "heldout")
    b = ds.batch([0, 499])
    assert b["image"].shape == (2, 1, 32, 32) and b["image"].dtype == torch.float32
    assert b["image"].min() >= -1 and b["image"].max() <= 1 and b["image"].min() == -1
    assert b["label"].dtype == torch.long and b["label"].tolist() == [0, 9]
    assert b["caption"] == ["a handwritten digit zero", "a handwritten digit nine"]


def test_digits():
    ds = load_dataset(DataConfig(source="digits", image_size=8), "train")
    held = load_dataset(DataConfig(source="digits", image_size=8), "heldout")
    assert len(ds) + len(held) == 1797 and ds.shape == (1, 8, 8)
    assert ds.images.max() == 255 and ds.num_classes == 10


def _png(path, mode="L", size=(12, 10), value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)


def test_folder_with_classes_and_captions(tmp_path):
    for cls in ("cat", "dog"):
        for i in range(10):
            _png(tmp_path / cls / f"{i}.png", value=50 if cls == "cat" else 200)
    rows = [{"file": f"{c}/{i}.png", "caption": f"{c} number {i}"} for c in ("cat", "dog") for i in range(10)]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(source=f"folder:{tmp_path}", image_size=8, channels=None)
    train, held = load_dataset(cfg, "train"), load_dataset(cfg, "heldout")
    assert len(train) == 18 and len(held) == 2
    assert train.class_names == ("cat", "dog") and train.shape == (1, 8, 8)
    assert held.captions == ["cat number 9", "dog number 9"]
    assert held.labels.tolist() == [0, 1]
    assert held.images[0].float().mean() == pytest.approx(50, abs=1) and held.images[1].float().mean() == pytest.approx(200, abs=1)


def test_one_small_image_in_a_folder_does_not_shrink_the_others(tmp_path):
    rng = np.random.default_rng(0)
    pixels = {f"{i}.png": rng.integers(0, 256, (32, 32), dtype=np.uint8) for i in range(10)}
    pixels["0.png"] = rng.integers(0, 256, (16, 16), dtype=np.uint8)  # in the training split (9.png is held out)
    for name, arr in pixels.items():
        Image.fromarray(arr).save(tmp_path / name)
    train = load_dataset(DataConfig(source=f"folder:{tmp_path}", image_size=32, channels=1), "train")
    assert len(train) == 9 and all(np.array_equal(train.images[i, 0].numpy(), pixels[f"{i}.png"]) for i in range(1, 9))
    small = train.images[0, 0].numpy()  # the small one alone is centred on a zero border (resize=pad)
    assert np.array_equal(small[8:24, 8:24], pixels["0.png"]) and small[:8].max() == 0


def test_flat_folder_is_unlabelled_and_rgb_kept(tmp_path):
    for i in range(10):
        _png(tmp_path / f"{i}.jpg", mode="RGB")
    ds = load_dataset(DataConfig(source=f"folder:{tmp_path}", image_size=6, channels=None), "train")
    assert ds.labels is None and ds.captions is None and ds.shape == (3, 6, 6)
    assert ds.batch([0])["label"] is None


def test_folder_errors_name_the_path_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=f"'{tmp_path / 'missing'}' does not exist"):
        load_dataset(DataConfig(source=f"folder:{tmp_path / 'missing'}"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no images.*png"):
        load_dataset(DataConfig(source=f"folder:{tmp_path / 'empty'}"), "train")


def test_unreadable_files_are_listed_not_dropped(tmp_path):
    for i in range(10):
        _png(tmp_path / f"{i}.png")
    (tmp_path / "3.png").write_bytes(b"not a png at all")
    (tmp_path / "5.png").write_bytes(b"")
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(source=f"folder:{tmp_path}", image_size=8), "train")
    msg = str(err.value)
    assert "2 file(s)" in msg and str(tmp_path / "3.png") in msg and str(tmp_path / "5.png") in msg


def test_mixed_channels_error_and_fix(tmp_path):
    for i in range(10):
        _png(tmp_path / f"{i}.png", mode="L" if i % 2 else "RGB")
    with pytest.raises(DataError, match="mixes channel counts.*data.channels=1"):
        load_dataset(DataConfig(source=f"folder:{tmp_path}", image_size=8, channels=None), "train")
    ds = load_dataset(DataConfig(source=f"folder:{tmp_path}", image_size=8, channels=1), "train")
    assert ds.shape == (1, 8, 8)


def _idx(path, array, gz):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", 12), ("t10k", 5)):
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz)
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, (n,)), gz)
    cfg = DataConfig(source=f"mnist-idx:{tmp_path}", image_size=28)
    train, held = load_dataset(cfg, "train"), load_dataset(cfg, "heldout")
    assert len(train) == 12 and len(held) == 5 and train.shape == (1, 28, 28)
    raw = np.frombuffer((gzip.decompress if gz else bytes)((tmp_path / f"t10k-images-idx3-ubyte{suffix}").read_bytes())[16:], np.uint8)
    assert torch.equal(held.images.flatten(), torch.from_numpy(raw.copy()))


def test_mnist_idx_errors(tmp_path):
    with pytest.raises(DataError, match="has no train-images-idx file"):
        load_dataset(DataConfig(source=f"mnist-idx:{tmp_path}"), "train")
    _idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28)), False)
    _idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((4,)), False)
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataError, match=f"'{f}' is truncated"):
        load_dataset(DataConfig(source=f"mnist-idx:{tmp_path}"), "train")


def _classes(root, n=10):
    for cls in ("cat", "dog"):
        for i in range(n):
            _png(root / cls / f"{i}.png", value=50 if cls == "cat" else 200)
    return root


def test_a_folders_default_caption_is_its_class_name(tmp_path):
    held = load_dataset(DataConfig(source=f"folder:{_classes(tmp_path)}", image_size=8), "heldout")
    assert held.captions == ["cat", "dog"]  # not "a handwritten digit cat"
    custom = load_dataset(DataConfig(source=f"folder:{tmp_path}", image_size=8, caption_template="a photo of a {name}"),
                          "heldout")
    assert custom.captions == ["a photo of a cat", "a photo of a dog"]


def test_a_caption_line_whose_file_escapes_the_folder_is_refused(tmp_path):
    root = _classes(tmp_path / "data")
    _png(tmp_path / "outside.png")
    rows = [{"file": f"{c}/{i}.png", "caption": "x"} for c in ("cat", "dog") for i in range(10)]
    rows.insert(3, {"file": "../outside.png", "caption": "sneaked in"})
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"captions.jsonl line 4 names '../outside.png', which lies outside the dataset"):
        load_dataset(DataConfig(source=f"folder:{root}", image_size=8), "train")


def test_a_symbolic_link_out_of_the_folder_is_refused_by_name(tmp_path):
    root = _classes(tmp_path / "data")
    _png(tmp_path / "elsewhere" / "secret.png")
    (root / "cat" / "link.png").symlink_to(tmp_path / "elsewhere" / "secret.png")
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(source=f"folder:{root}", image_size=8), "train")
    assert f"links to 1 file(s) outside itself: {root / 'cat' / 'link.png'} -> {tmp_path / 'elsewhere' / 'secret.png'}" \
        in str(err.value)
    (root / "cat" / "link.png").unlink()
    (root / "cat" / "inside.png").symlink_to(root / "cat" / "0.png")  # a link that stays inside is fine
    assert len(load_dataset(DataConfig(source=f"folder:{root}", image_size=8), "train")) == 19


def test_train_checks_the_heldout_split_when_it_starts(tmp_path):
    """A broken held-out image (every tenth file) is named by `train` before it trains, not later by `evaluate`."""
    import subprocess
    import sys

    import yaml

    root = _classes(tmp_path / "data")
    (root / "dog" / "9.png").write_bytes(b"this is not a png")  # the dog class's held-out image
    cfg = {"system": "vae", "data": {"source": f"folder:{root}", "image_size": 8},
           "model": {"latent_dim": 2, "channels": [8], "hidden": 16},
           "train": {"steps": 2, "batch_size": 4, "sample_every": 0, "checkpoint_every": 0}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "difflineage", "train", str(tmp_path / "c.yaml"), "--out",
                          str(tmp_path / "run"), "--no-progress"], capture_output=True, text=True)
    assert out.returncode == 2 and str(root / "dog" / "9.png") in out.stderr, out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("stream", [False, True])
def test_hugging_face_metadata_jsonl_gives_the_captions(tmp_path, stream):
    """The image-folder convention of Hugging Face datasets: metadata.jsonl with file_name and text (other columns
    ignored), read as captions.jsonl is, streamed or in memory; both files at once are refused."""
    for cls in ("cat", "dog"):
        for i in range(10):
            _png(tmp_path / cls / f"{i}.png", value=50 if cls == "cat" else 200)
    rows = [{"file_name": f"{c}/{i}.png", "text": f"a {c}, number {i}", "source": "drawn"} for c in ("cat", "dog")
            for i in range(10)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(source=f"folder:{tmp_path}", image_size=8, channels=None, stream=stream)
    held = load_dataset(cfg, "heldout")
    captions = held.captions if not stream else [held.caption_of(i) for i in range(len(held))]
    assert captions == ["a cat, number 9", "a dog, number 9"]
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "cat/0.png", "caption": "x"}))
    with pytest.raises(DataError, match="holds both captions.jsonl and metadata.jsonl: keep the one"):
        load_dataset(cfg, "train")
    (tmp_path / "captions.jsonl").unlink()
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "cat/0.png"}))
    with pytest.raises(DataError, match=r'metadata.jsonl line 1 is not a \{"file_name": ..., "text": ...\} object'):
        load_dataset(cfg, "train")
