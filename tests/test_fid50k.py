"""FID-50K as the papers compute it: ADM's npz written and read in pieces, sampling into batch files that resume,
merged in order. Two torchrun processes, and the scoring against a reference batch: test_imagenet_chain.py."""

import zipfile

import numpy as np
import pytest
from helpers import tiny_ddpm_dict

import difflineage
from difflineage.errors import DataError
from difflineage.eval import adm
from difflineage.eval.sampling import DIT_FID_SAMPLING, fid_sampling_defaults, merge_shards, sample_shards
from difflineage.systems import config_from_dict
from difflineage.train import Trainer


def test_npz_is_written_and_read_in_pieces_as_np_savez_would(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 5, 6, 3), dtype=np.uint8)
    labels = np.arange(10) % 4
    path = adm.write_npz(tmp_path / "s.npz", images.shape, (images[s : s + 3] for s in range(0, 10, 3)),
                         extra={"arr_1": labels})
    with np.load(path) as obj:  # what the evaluator and numpy read
        assert np.array_equal(obj["arr_0"], images) and np.array_equal(obj["arr_1"], labels)
    assert adm.check_npz(path) == (10, 5, 6, 3)
    assert np.array_equal(np.concatenate(list(adm.batches_of(path, 4))), images)
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)  # compressed members are read as a stream too
    assert np.array_equal(np.concatenate(list(adm.batches_of(tmp_path / "c.npz", 4))), images)
    # a header that promises more images than were given is refused, and nothing is left behind
    with pytest.raises(DataError, match="9 images were written.*not the 10"):
        adm.write_npz(tmp_path / "short.npz", images.shape, [images[:9]])
    assert not list(tmp_path.glob("short.npz*"))


def test_a_truncated_npz_is_refused_by_name(tmp_path):
    images = np.zeros((6, 4, 4, 3), np.uint8)
    with zipfile.ZipFile(tmp_path / "t.npz", "w") as zf, zf.open("arr_0.npy", "w") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": (6, 4, 4, 3)})
        fh.write(images[:4].tobytes())
    assert adm.check_npz(tmp_path / "t.npz") == (6, 4, 4, 3)  # the header alone looks fine
    with pytest.raises(DataError, match="ends after 4 of its 6 images"):
        list(adm.batches_of(tmp_path / "t.npz", 4))


def test_dit_and_dydit_default_to_the_papers_fid_sampling():
    from difflineage.systems import DDPMSystem, DiTSystem, DyDiTSystem, LDMSystem

    assert fid_sampling_defaults(DiTSystem) == fid_sampling_defaults(DyDiTSystem) == DIT_FID_SAMPLING
    assert DIT_FID_SAMPLING == {"sampler": "ddpm", "steps": 250, "guidance": 1.5}
    assert fid_sampling_defaults(DDPMSystem) == fid_sampling_defaults(LDMSystem) == {}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny class-conditional pixel DiT with the papers' 1000-step schedule (so 250 respaced steps exist)."""
    d = tmp_path_factory.mktemp("dit")
    cfg = tiny_ddpm_dict()
    cfg.update(system="dit", model={"condition": "class", "dit": {"depth": 1, "hidden": 16, "heads": 2, "patch": 4},
                                    "diffusion": {"timesteps": 1000, "sample_steps": 5, "guidance": 2.0}})
    cfg["train"].update(steps=3, sample_every=0)
    Trainer(config_from_dict(cfg), d, progress=False).fit()
    return d


def test_sampling_into_parts_resumes_and_refuses_other_settings(run, tmp_path):
    system = difflineage.load(run)
    folder = tmp_path / "s.npz.parts"
    options = {"steps": 4}
    assert sample_shards(system, folder, 10, batch_size=3, seed=1, options=options, checkpoint=run, progress=False) == 4
    merge_shards(folder, tmp_path / "s.npz", 10, 3)
    first = np.load(tmp_path / "s.npz")
    assert first["arr_0"].shape == (10, 8, 8, 3) and first["arr_0"].dtype == np.uint8
    assert np.array_equal(first["arr_0"][..., 0], first["arr_0"][..., 2])  # a gray image in all three channels
    labels = first["arr_1"]
    assert labels.min() >= 0 and labels.max() < 10 and not np.array_equal(labels, np.arange(10) % 10)  # uniform draws
    # an interrupted run: two batches never written, one caught half-way; drawing again draws only those
    (folder / "batch-000001.npz").unlink()
    (folder / "batch-000003.npz").unlink()
    (folder / "batch-000003.tmp.npz").write_bytes(b"half a file")
    assert sample_shards(system, folder, 10, batch_size=3, seed=1, options=options, checkpoint=run, progress=False) == 2
    assert not list(folder.glob("*.tmp.npz"))
    merge_shards(folder, tmp_path / "again.npz", 10, 3)
    again = np.load(tmp_path / "again.npz")
    assert np.array_equal(again["arr_0"], first["arr_0"]) and np.array_equal(again["arr_1"], labels)
    # the same parts folder asked for other samples: refused, naming what differs, and nothing is touched
    with pytest.raises(DataError, match="seed: 1 there, 2 now"):
        sample_shards(system, folder, 10, batch_size=3, seed=2, options=options, checkpoint=run, progress=False)
    raw = difflineage.load(run, use_ema=False)  # the same checkpoint's raw weights: other samples, refused too
    with pytest.raises(DataError, match="weights: '[0-9a-f]{16}' there"):
        sample_shards(raw, folder, 10, batch_size=3, seed=1, options=options, checkpoint=run, progress=False)
    (folder / "batch-000000.npz").unlink()
    with pytest.raises(DataError, match="lacks 1 of its 4 batches.*batch-000000.npz.*run the same command again"):
        merge_shards(folder, tmp_path / "x.npz", 10, 3)


def test_evaluate_reference_needs_inception_weights(run, tmp_path, capsys):
    from difflineage.cli import main

    assert main(["evaluate", str(run), "--reference", str(tmp_path / "ref.npz"), "--num-samples", "4"]) == 2
    assert "--reference needs --inception-weights" in capsys.readouterr().err


def test_sample_and_evaluate_write_npz_files_that_score_reads(run, tmp_path):
    from difflineage.cli import main

    assert main(["sample", str(run), "--n", "4", "--label", "3", "--steps", "2", "--out", str(tmp_path / "g.png"),
                 "--npz", str(tmp_path / "s.npz")]) == 0
    assert adm.check_npz(tmp_path / "s.npz") == (4, 8, 8, 3)  # gray samples in ADM's RGB layout
    with np.load(tmp_path / "s.npz") as obj:
        assert obj["arr_1"].tolist() == [3, 3, 3, 3]  # and their labels, as guided-diffusion's sampler writes them


def test_a_damaged_part_is_named_with_what_to_do(run, tmp_path):
    """One bit flipped in a part's pixels: the merge names that part (the zip's CRC catches it) instead of a raw
    BadZipFile."""
    system = difflineage.load(run)
    folder = tmp_path / "s.npz.parts"
    sample_shards(system, folder, 6, batch_size=3, seed=1, options={"steps": 2}, checkpoint=run, progress=False)
    part = folder / "batch-000001.npz"
    raw = bytearray(part.read_bytes())
    raw[raw.index(b"NUMPY") + 140] ^= 0x01  # a pixel of arr_0, past its header
    part.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"{part} .*CRC.*delete it and run the same command again"):
        merge_shards(folder, tmp_path / "s.npz", 6, 3)
