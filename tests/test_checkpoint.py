import pytest
import torch
from helpers import state_equal, tiny_vae

import difflineage
from difflineage.train import CheckpointError, Trainer, load_checkpoint, load_state_dict_strict


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    Trainer(tiny_vae(steps=4, checkpoint_every=2), run, progress=False).fit()
    return run


def test_checkpoint_directory_layout(trained):
    ckpts = sorted((trained / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_0000002", "step_0000004"]
    files = sorted(p.name for p in ckpts[-1].iterdir())
    assert files == ["checksums.sha256", "config.yaml", "ema.safetensors", "model.safetensors", "training_state.pt"]
    assert not list((trained / "checkpoints").glob(".tmp-*"))
    for name in ("metrics.jsonl", "loss.png", "samples.png", "config.yaml"):
        assert (trained / name).exists(), name


def test_round_trip_rebuilds_the_same_system(trained):
    ckpt = load_checkpoint(trained)  # a run directory resolves to its latest checkpoint
    assert ckpt.path.name == "step_0000004" and ckpt.step == 4
    system = difflineage.load(trained)
    assert state_equal(system.state_dict(), ckpt.ema) == []
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    again = difflineage.load(ckpt.path)
    assert torch.equal(system.sample(4, generator=g()), again.sample(4, generator=g()))
    raw = difflineage.load(ckpt.path, use_ema=False)
    assert state_equal(raw.state_dict(), ckpt.model) == []
    assert state_equal(raw.state_dict(), system.state_dict()) != []  # EMA differs from the raw weights


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_file_is_refused_by_name(trained, tmp_path):
    ck = _copy(trained / "checkpoints" / "step_0000004", tmp_path / "ck")
    f = ck / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside a weight
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{f} is corrupt"):
        difflineage.load(ck)


def test_truncated_file_is_refused_by_name_even_without_checksums(trained, tmp_path):
    ck = _copy(trained / "checkpoints" / "step_0000004", tmp_path / "ck")
    (ck / "checksums.sha256").unlink()
    f = ck / "ema.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{f} is corrupt or truncated"):
        difflineage.load(ck)


def test_training_state_never_unpickles_code(trained, tmp_path):
    ck = _copy(trained / "checkpoints" / "step_0000004", tmp_path / "ck")
    (ck / "checksums.sha256").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"step": 1, "payload": Evil()}, ck / "training_state.pt")
    with pytest.raises(CheckpointError, match=r"training_state.pt: refused: it holds pickled code or objects "
                                              r"\(it names print\)") as err:
        load_checkpoint(ck)
    # torch's own advice (retry with weights_only=False) is exactly what must not be done with such a file
    assert "will likely succeed" not in str(err.value) and "Do not load it with weights_only=False" in str(err.value)


def test_a_checkpoint_missing_one_file_is_named_for_what_it_lacks(trained, tmp_path):
    ck = _copy(trained / "checkpoints" / "step_0000004", tmp_path / "ck")
    (ck / "config.yaml").unlink()
    with pytest.raises(CheckpointError) as err:
        difflineage.load(ck)
    assert "has model.safetensors but lacks config.yaml" in str(err.value)
    assert "lacks config.yaml and model.safetensors" not in str(err.value)


def test_a_text_file_named_pt_is_called_not_a_torch_file(tmp_path):
    from difflineage.weights import read_weights

    f = tmp_path / "weights.pt"
    f.write_text("email me for the real weights\n")
    with pytest.raises(CheckpointError) as err:
        read_weights(f, "DiT weights")
    msg = str(err.value)
    assert msg.startswith(f"{f}: not a torch file (it starts with b'email me'") and "expected DiT weights" in msg
    zipped = tmp_path / "cut.pt"
    torch.save({"w": torch.zeros(1000)}, zipped)
    zipped.write_bytes(zipped.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="a damaged or truncated torch file"):
        read_weights(zipped, "DiT weights")


def test_strict_loading_names_every_problem():
    net = torch.nn.Linear(3, 2)
    bad = {"weight": torch.zeros(2, 4), "extra.bias": torch.zeros(1)}
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(net, bad, "other.safetensors")
    msg = str(err.value)
    assert "missing (1): bias" in msg and "unexpected (1): extra.bias" in msg
    assert "weight: file (2, 4) vs model (2, 3)" in msg


def test_missing_checkpoint_message(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        difflineage.load(tmp_path / "nothing")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="holds no complete checkpoint yet"):
        difflineage.load(tmp_path / "run")


def test_checkpoint_files_are_written_a_tensor_at_a_time_and_read_by_safetensors(tmp_path):
    """save_safetensors writes what safetensors' own writer would hold whole in memory: every dtype, shared memory,
    empty and 0-d tensors and the metadata come back bit for bit."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from difflineage.weights import save_safetensors

    base = torch.randn(4, 6)
    state = {"w": base, "view": base[1:3], "bf16": torch.randn(3, 5).bfloat16(), "half": torch.randn(7).half(),
             "long": torch.arange(5), "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 3),
             "scalar": torch.tensor(2.5), "t": base.t()}
    save_safetensors(state, tmp_path / "x.safetensors", metadata={"step": "7"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"step": "7"}


def test_a_sample_grid_of_many_classes_draws_about_n_images():
    """ImageNet's 1,000 classes: the training grid spreads sample_n classes, instead of one image of every class
    (1,000 images at 250 steps on rank 0, which ran the rehearsal of the XL recipe out of memory)."""
    from types import SimpleNamespace

    from difflineage.systems.base import System

    labels, per_class = System.grid_labels(SimpleNamespace(num_classes=1000), 16)
    assert len(labels) == 16 and per_class == 0 and labels[0] == 0 and labels[-1] == 999
    assert len(set(labels.tolist())) == 16
    labels, per_class = System.grid_labels(SimpleNamespace(num_classes=10), 20)
    assert per_class == 2 and labels.tolist() == [c for c in range(10) for _ in range(2)]
