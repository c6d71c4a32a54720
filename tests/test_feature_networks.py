import pytest
import torch

from difflineage.config import DataConfig
from difflineage.data import load_dataset
from difflineage.eval import classifier as clf
from difflineage.eval.inception import FIDInceptionV3, load_fid_inception
from difflineage.train import CheckpointError


@pytest.fixture(scope="module")
def classifier():
    return clf.mnist_classifier(progress=False)  # trained once per machine, then read from the cache


def test_mnist_classifier_meets_its_heldout_accuracy(classifier):
    held = load_dataset(DataConfig(source="mnist5k", image_size=32), "heldout")
    assert clf.accuracy(classifier, held) >= 0.97


def test_classifier_reads_28px_and_rgb_images_as_it_reads_32px(classifier):
    d28 = load_dataset(DataConfig(source="mnist5k", image_size=28), "heldout").batch(range(8))["image"]
    d32 = load_dataset(DataConfig(source="mnist5k", image_size=32), "heldout").batch(range(8))["image"]
    assert torch.allclose(classifier.features(d28), classifier.features(d32))
    rgb = d32.expand(-1, 3, -1, -1)
    assert torch.allclose(classifier.features(rgb), classifier.features(d32), atol=1e-4)


def test_classifier_cache_is_keyed_by_content(classifier, monkeypatch):
    train = load_dataset(DataConfig(source="mnist5k", image_size=32), "train")
    before = clf._content_hash(train)
    assert (clf.cache_dir() / f"mnist-classifier-{before}.safetensors").exists()
    monkeypatch.setitem(clf.RECIPE, "epochs", 21)
    assert clf._content_hash(train) != before  # another recipe is another classifier
    monkeypatch.undo()
    assert clf._content_hash(train.subset(range(4000))) != before  # other data too


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
