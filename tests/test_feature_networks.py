import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difflineage.config import DataConfig
from difflineage.data import load_dataset
from difflineage.eval import classifier as clf
from difflineage.eval.inception import FIDInceptionV3, load_fid_inception
from difflineage.storage import sha256_of
from difflineage.train import CheckpointError


@pytest.fixture(scope="module")
def classifier():
    return clf.mnist_classifier()  # the shipped weights, checked against SHIPPED_SHA256


def shipped_metadata() -> dict:
    from safetensors import safe_open

    with safe_open(str(clf.SHIPPED_PATH), "pt") as f:
        return f.metadata()


def test_shipped_classifier_matches_its_hash_and_recorded_heldout_accuracy(classifier):
    from difflineage.storage import sha256_of

    assert sha256_of(clf.SHIPPED_PATH) == clf.SHIPPED_SHA256
    meta = shipped_metadata()
    held = load_dataset(DataConfig(source="mnist5k", image_size=32), "heldout")
    acc = clf.accuracy(classifier, held)
    # the recorded accuracy, to one of the 500 images (another CPU may round a near-tie the other way)
    assert abs(acc - float(meta["heldout_accuracy"])) <= 1 / 500 + 1e-9, (acc, meta["heldout_accuracy"])
    assert acc >= 0.97


def test_shipped_classifier_was_trained_from_todays_data_recipe_and_architecture():
    """Change the recipe, the architecture tag or mnist5k and this fails: retrain with the script and update
    SHIPPED_SHA256 and the docs' digit FIDs."""
    meta = shipped_metadata()
    train = load_dataset(DataConfig(source="mnist5k", image_size=32, resize="pad"), "train")
    assert meta["content_hash"] == clf.content_hash(train)
    assert json.loads(meta["recipe"]) == clf.RECIPE and meta["arch"] == clf.ARCH_VERSION
    assert all(v.dtype == torch.float32 for v in clf.mnist_classifier().state_dict().values())


def test_content_hash_covers_recipe_and_data(monkeypatch):
    train = load_dataset(DataConfig(source="mnist5k", image_size=32), "train")
    before = clf.content_hash(train)
    monkeypatch.setitem(clf.RECIPE, "epochs", 21)
    assert clf.content_hash(train) != before  # another recipe is another classifier
    monkeypatch.undo()
    assert clf.content_hash(train.subset(range(4000))) != before  # other data too


def test_missing_or_altered_classifier_weights_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors are missing.*benchmarks/train_mnist_classifier\.py"):
        clf.mnist_classifier(tmp_path / "nope.safetensors")
    altered = tmp_path / "mnist-classifier.safetensors"
    data = bytearray(clf.SHIPPED_PATH.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    altered.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"mnist-classifier\.safetensors have sha256 [0-9a-f]{64}, not the "
                       r"shipped .*altered.*benchmarks/train_mnist_classifier\.py"):
        clf.mnist_classifier(altered)
    assert clf.mnist_classifier(altered, sha256=sha256_of(altered)).training is False  # only the hash refused it


def test_classifier_reads_28px_and_rgb_images_as_it_reads_32px(classifier):
    d28 = load_dataset(DataConfig(source="mnist5k", image_size=28), "heldout").batch(range(8))["image"]
    d32 = load_dataset(DataConfig(source="mnist5k", image_size=32), "heldout").batch(range(8))["image"]
    assert torch.allclose(classifier.features(d28), classifier.features(d32))
    rgb = d32.expand(-1, 3, -1, -1)
    assert torch.allclose(classifier.features(rgb), classifier.features(d32), atol=1e-4)


@pytest.mark.slow
def test_training_script_reproduces_the_shipped_classifier(tmp_path, classifier):
    """The script retrains the shipped classifier (about 35 s on two cores). Another CPU may round differently in
    the last bits, so the check is on the held-out decisions, not on bit-equal weights."""
    out = tmp_path / "retrained.safetensors"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_mnist_classifier.py"
    subprocess.run([sys.executable, str(script), "--out", str(out)], check=True, capture_output=True)
    retrained = clf.mnist_classifier(out, sha256=sha256_of(out))
    held = load_dataset(DataConfig(source="mnist5k", image_size=32), "heldout")
    x = held.batch(range(len(held)))["image"]
    with torch.no_grad():
        agree = (retrained(x).argmax(1) == classifier(x).argmax(1)).float().mean().item()
    assert agree >= 0.98, agree
    assert abs(clf.accuracy(retrained, held) - float(shipped_metadata()["heldout_accuracy"])) <= 0.01


def test_fid_inception_loads_a_weights_file_strictly(tmp_path):
    net = FIDInceptionV3()
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}  # as old files are
    torch.save(state, tmp_path / "pt_inception.pth")
    loaded = load_fid_inception(tmp_path / "pt_inception.pth")
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        f = loaded.features(x)
        assert f.shape == (2, 2048) and torch.allclose(f, net.eval().features(x), atol=1e-5)
        assert loaded.logits_from_features(f).shape == (2, 1008)
    del state["fc.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="missing \\(1\\): fc.weight"):
        load_fid_inception(tmp_path / "broken.pth")


def test_missing_inception_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth.*--inception-weights"):
        load_fid_inception(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="downloads nothing"):
        load_fid_inception(None)


def test_tf1_bilinear_resize_on_a_hand_worked_case():
    """TF1's ResizeBilinear (align_corners=False, no half-pixel centres), as the FID graph resizes: output i reads
    input coordinate i * in / out. A row [0, 10, 20, 30] to 6 pixels reads 0, 2/3, 4/3, 2, 8/3, 10/3 (the last
    clamped to pixel 3): 0, 6.667, 13.333, 20, 26.667, 30. PyTorch's half-pixel bilinear reads (i + 0.5) * 4/6 - 0.5
    instead: 0, 5, 11.667, 18.333, 25, 30."""
    from difflineage.eval.inception import resize_299, tf1_bilinear_resize

    row = torch.tensor([0.0, 10.0, 20.0, 30.0]).view(1, 1, 1, 4).expand(1, 1, 3, 4)
    tf = tf1_bilinear_resize(row, (3, 6))
    assert torch.allclose(tf[0, 0, 1], torch.tensor([0, 20 / 3, 40 / 3, 20, 80 / 3, 30]), atol=1e-5)
    torch_style = torch.nn.functional.interpolate(row, size=(3, 6), mode="bilinear", align_corners=False)
    assert torch.allclose(torch_style[0, 0, 1], torch.tensor([0, 5, 35 / 3, 55 / 3, 25, 30]), atol=1e-5)
    # the columns: a column [0, 9] to 3 rows reads 0, 2/3, 4/3 -> 0, 6, 9 (clamped)
    col = torch.tensor([0.0, 9.0]).view(1, 1, 2, 1)
    assert torch.allclose(tf1_bilinear_resize(col, (3, 1)).flatten(), torch.tensor([0.0, 6.0, 9.0]))
    # the same size is the image itself; halving reads every other pixel (no averaging, as TF1 did)
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(tf1_bilinear_resize(x, (8, 8)), x, atol=1e-6)
    assert torch.allclose(tf1_bilinear_resize(x, (4, 4)), x[:, :, ::2, ::2], atol=1e-6)
    # at the FID's 256 -> 299 the two conventions differ by grey levels, which is why the choice is recorded
    img = torch.rand(1, 3, 256, 256) * 2 - 1
    gap = (resize_299(img, "tf") - resize_299(img, "pytorch-fid")).abs().mean() * 127.5
    assert gap > 2, gap
    with pytest.raises(ValueError, match="unknown Inception resize"):
        FIDInceptionV3(resize="antialias")
