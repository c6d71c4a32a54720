"""ADM's evaluator conventions: the npz layout, the reference-batch reader, the spatial features, the scores (the
metrics themselves are tested in test_eval.py)."""

import numpy as np
import pytest
import torch

from difflineage.errors import DataError
from difflineage.eval import adm
from difflineage.eval.inception import FIDInceptionV3, random_fid_inception
from difflineage.eval.metrics import precision_recall, statistics


@pytest.fixture(scope="module")
def net():
    """Random weights (the arithmetic, not the numbers of the real file), scaled so that activations neither die
    nor explode through the 11 blocks."""
    return random_fid_inception(seed=0)


def _images(n, seed, size=32):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (1, size, size, 3))
    return np.clip(base + rng.normal(0, 40, (n, size, size, 3)), 0, 255).astype(np.uint8)


def test_features_are_the_evaluators_pool_3_and_mixed_6_conv(net, tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=_images(3, 0))
    acts = adm.activations(net, tmp_path / "s.npz", progress=False)
    assert acts.pool.shape == (3, 2048) and acts.spatial.shape == (3, 17 * 17 * 7) and acts.logits.shape == (3, 1008)
    # the spatial features are the 1x1 branch of Mixed_6d, first 7 channels, in TF's H, W, C order
    x = (torch.from_numpy(_images(3, 0)).permute(0, 3, 1, 2).float() - 128) / 128
    with torch.no_grad():
        _, mixed_6 = net.features_and_spatial(x)
    assert mixed_6.shape == (3, 192, 17, 17) and (mixed_6 >= 0).all()  # after its ReLU
    want = mixed_6[:, :7].permute(0, 2, 3, 1).reshape(3, -1).double().numpy()
    assert np.allclose(acts.spatial, want, atol=1e-5)


def test_a_batch_is_scored_against_a_reference_batch(net, tmp_path):
    images = _images(24, 1)
    ref = adm.write_reference(tmp_path / "ref.npz", images, net, progress=False)
    stats = adm.read_reference(ref)
    assert stats["mu"].shape == (2048,) and stats["sigma_s"].shape == (2023, 2023)
    same = adm.activations(net, ref, progress=False)
    assert np.allclose(same.pool.mean(0), stats["mu"]) and precision_recall(same.pool, same.pool) == (1.0, 1.0)
    np.savez(tmp_path / "other.npz", arr_0=_images(24, 7))
    other = adm.score(tmp_path / "other.npz", ref, net, progress=False)
    assert other["samples"] == 24 and other["reference_images"] == 24 and other["sfid"] > 0
    # the FID is that of the samples' statistics against the reference's, checked with the eigenvalue identity
    # tr sqrt(S1 S2) = sum sqrt(eig(S1 S2)) instead of the evaluator's sqrtm
    acts = adm.activations(net, tmp_path / "other.npz", progress=False)
    mu, sigma = statistics(acts.pool)
    eig = np.linalg.eigvals(sigma @ stats["sigma"]).real.clip(min=0)
    fid = ((mu - stats["mu"]) ** 2).sum() + np.trace(sigma) + np.trace(stats["sigma"]) - 2 * np.sqrt(eig).sum()
    assert other["fid"] == pytest.approx(fid, rel=1e-3, abs=1e-6) and other["fid"] > 0.01
    assert other["inception_score"] >= 1.0 and 0 <= other["precision"] <= 1 and 0 <= other["recall"] <= 1
    assert other["feature_network"] == "InceptionV3 (tf resize)"


def test_the_npz_layout_and_the_reference_are_checked_by_name(tmp_path):
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(DataError, match="arr_0 is float32 .* ADM's layout is uint8 N x H x W x 3"):
        adm.check_npz(tmp_path / "f.npz")
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="holds no arr_0"):
        adm.check_npz(tmp_path / "x.npz")
    np.savez(tmp_path / "plain.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match="is not an ADM reference batch: it lacks mu, sigma, mu_s, sigma_s"):
        adm.read_reference(tmp_path / "plain.npz")


def test_the_score_command_refuses_a_missing_weights_file_and_a_plain_npz(tmp_path, capsys):
    from difflineage.cli import main

    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert main(["score", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "s.npz"),
                 "--inception-weights", str(tmp_path / "none.pth")]) == 2
    assert "pt_inception-2015-12-05-6726825d.pth" in capsys.readouterr().err
    torch.save({k: v for k, v in FIDInceptionV3().state_dict().items()}, tmp_path / "w.pth")
    assert main(["score", str(tmp_path / "s.npz"), "--reference", str(tmp_path / "s.npz"),
                 "--inception-weights", str(tmp_path / "w.pth"), "--no-progress"]) == 2
    assert "is not an ADM reference batch" in capsys.readouterr().err


def test_a_reference_batch_crops_as_the_training_run_is_told_to(tmp_path):
    from PIL import Image

    from difflineage.cli import main
    from difflineage.data.augment import adm_center_crop

    rng = np.random.default_rng(0)
    for i in range(40):  # wide images: the in-memory resize and ADM's centre crop cut them differently
        Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i:02d}.png")
    random_fid_inception(seed=0, path=tmp_path / "w.safetensors")
    common = ["reference", "--data", f"folder:{tmp_path}", "--image-size", "16", "--n", "4", "--no-progress",
              "--inception-weights", str(tmp_path / "w.safetensors")]  # 4: the fewest a reference batch may hold
    assert main([*common, "--out", str(tmp_path / "streamed.npz"), "--set", "data.stream=true"]) == 0
    assert main([*common, "--out", str(tmp_path / "memory.npz")]) == 0
    held_out = []
    for name in ("09", "19", "29", "39"):  # the held-out files
        with Image.open(tmp_path / f"{name}.png") as im:
            held_out.append(adm_center_crop(im, 16))
    want = np.stack(held_out)
    with np.load(tmp_path / "streamed.npz") as streamed, np.load(tmp_path / "memory.npz") as memory:
        assert np.array_equal(streamed["arr_0"], want) and not np.array_equal(memory["arr_0"], want)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_too_few_images_are_refused_in_one_line_before_any_feature_is_computed(net, tmp_path, n):
    ref = adm.write_reference(tmp_path / "ref.npz", _images(8, 1), net, progress=False)
    np.savez(tmp_path / "few.npz", arr_0=_images(8, 2)[:n])
    with pytest.raises(DataError, match=rf"few.npz holds {n} image\(s\); scoring needs at least 4"):
        adm.score(tmp_path / "few.npz", ref, net, progress=False)
    with pytest.raises(DataError, match=rf"holds {n} image\(s\); scoring needs at least 4"):
        adm.write_reference(tmp_path / "small_ref.npz", _images(8, 1)[:n], net, progress=False)
    assert adm.score(tmp_path / "ref.npz", ref, net, progress=False)["samples"] == 8  # four or more: scored
