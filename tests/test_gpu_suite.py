"""benchmarks/gpu_suite.sh at tiny sizes on the CPU: every table is there, with finite positive throughputs and
memory, the same-weights check against diffusers passed, and the table written with the machine's name. Speed is
not asserted (it depends on the machine)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("diffusers")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite")
    # from another directory, as a user may run it; --no-compile: inductor's C++ compilation takes minutes here
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--tiny", "--device", "cpu",
                          "--no-compile", "--out", str(out)], cwd=out, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, json.loads((out / "gpu_suite.json").read_text())


def test_every_row_is_there_with_positive_throughput_and_memory(suite):
    _, data = suite
    rows = data["rows"]
    assert set(rows) == {"trainer", "vs_diffusers", "dydit", "sampling"}
    trainer = {r["config"]: r for r in rows["trainer"]}
    assert set(trainer) == {"DiT-XL/2 (tiny)", "DiT-B/2 (tiny)"}
    for r in trainer.values():
        assert r["bf16"] is True and r["steps timed"] >= 1
        assert all(_positive(r[k]) for k in ("steps/s", "images/s", "peak memory (MiB)")), r
        assert r["images/s"] == pytest.approx(r["steps/s"] * r["batch"])

    vs = rows["vs_diffusers"]
    for config in ("DiT-XL/2 (tiny)", "DiT-B/2 (tiny)"):
        candidates = [r["candidate"] for r in vs if r["config"] == config]
        assert any(c.startswith("ours") for c in candidates) and any(c.startswith("diffusers") for c in candidates)
    assert all(_positive(r[k]) for r in vs for k in ("steps/s", "images/s", "step peak memory (MiB)"))

    dydit = rows["dydit"]
    assert [r["density (width, tokens)"] for r in dydit] == ["0.5,1", "0.75,0.6"]
    for r in dydit:
        assert r["config"] == "DyDiT-XL/2 (tiny)" and r["batch"] == 2
        assert all(_positive(r[f"{m} images/s"]) for m in ("DiT", "DyDiT fast", "DyDiT masked"))
        assert 0 < r["FLOPs ratio (counted)"] < 1 and r["max |fast - masked|"] < 0.1

    sampling = {(r["config"], r["model"]): r for r in rows["sampling"]}
    assert set(sampling) == {("DiT-XL/2 (tiny)", "DiT"), ("DyDiT-XL/2 (tiny)", "DyDiT fast"),
                             ("DyDiT-XL/2 (tiny)", "DyDiT masked"), ("DiT-B/2 (tiny)", "DiT")}
    assert all(_positive(r["images/s"]) and _positive(r["peak memory, 2-step call (MiB)"]) for r in sampling.values())


def test_ours_and_diffusers_hold_the_same_weights(suite):
    _, data = suite
    checks = data["same_weights"]
    assert len(checks) == 2 and all(c["passed"] for c in checks)
    assert all(c["max |ours - diffusers| (fp32 forward)"] < 1e-4 for c in checks)


def test_the_table_names_the_machine_and_the_command(suite):
    out, data = suite
    text = (out / "gpu_suite.md").read_text()
    assert data["device"] == "cpu" and data["device_name"] and data["device_name"] in text
    assert "<!-- bench:gpu_suite -->" in text and "<!-- /bench:gpu_suite -->" in text
    assert "bash benchmarks/gpu_suite.sh --tiny" in text and data["torch"] in text
    for heading in ("1. The Trainer", "2. One training step", "3. DyDiT", "4. Sampling"):
        assert heading in text
    docs = REPO / "docs" / "benchmarks.md"
    assert "GPU suite: " + data["device_name"] not in docs.read_text()  # --out keeps docs/benchmarks.md as it was
