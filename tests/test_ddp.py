"""Two processes under torchrun (gloo on the CPU) against one process on the same global batches."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import state_equal, tiny_regression_dict, tiny_vae_dict
from safetensors.torch import load_file

from difflineage.systems import config_from_dict
from difflineage.train import Trainer, load_checkpoint

WORKER = Path(__file__).parent / "ddp_worker.py"


def torchrun(cfg: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(WORKER), str(out / "cfg.yaml"), str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batches(tmp_path):
    cfg = tiny_regression_dict(steps=6, batch_size=32, checkpoint_every=3)
    torchrun(cfg, tmp_path / "ddp")
    r0, r1 = load_file(str(tmp_path / "ddp" / "rank0.safetensors")), load_file(str(tmp_path / "ddp" / "rank1.safetensors"))
    assert state_equal(r0, r1) == []  # DDP keeps the ranks bit-identical

    single = Trainer(config_from_dict(cfg), tmp_path / "single", progress=False)
    single.fit()
    ref = {k: v for k, v in single.system.state_dict().items()}
    assert state_equal(ref, r0, atol=1e-6) == []
    # every logged metric is averaged over the processes, as the loss is: the log does not depend on their number
    log = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    for a, b in zip(log(tmp_path / "single"), log(tmp_path / "ddp" / "run"), strict=True):
        assert abs(a["mse"] - b["mse"]) < 1e-6 and abs(a["loss"] - b["loss"]) < 1e-6
    initial = Trainer(config_from_dict(cfg, ["train.steps=1"]), tmp_path / "one", progress=False)
    initial.fit()
    assert state_equal(initial.system.state_dict(), r0, atol=1e-3) != []  # the comparison can fail: weights moved

    # Rank 0 wrote the checkpoints, with the random state of both ranks for an exact resume.
    ckpt = load_checkpoint(tmp_path / "ddp" / "run")
    assert ckpt.step == 6 and len(ckpt.training_state["rng"]) == 2 and ckpt.training_state["world_size"] == 2


@pytest.mark.slow
def test_vae_under_torchrun_keeps_ranks_identical(tmp_path):
    torchrun(tiny_vae_dict(steps=4, batch_size=16), tmp_path)
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert state_equal(r0, r1) == []
    assert (tmp_path / "run" / "samples.png").exists()
