"""The benchmark harness, benchmarks/harness.py (benchmarks/ is not a package: the scripts import it as their
neighbour; here it is loaded from its path)."""

import importlib.util
import json
import sys
import time
from pathlib import Path


def _load_harness():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "harness.py"
    spec = importlib.util.spec_from_file_location("benchmarks_harness", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before it runs: its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


harness = _load_harness()


def test_side_by_side_times_every_case_and_ranks_them():
    t = harness.side_by_side({"fast": lambda: None, "slow": lambda: time.sleep(0.01)}, warmup=1, repeats=5)
    assert set(t) == {"fast", "slow"} and t["slow"].repeats == 5
    assert t["slow"].median_s >= 0.01 > t["fast"].median_s
    assert t["slow"].q25_s <= t["slow"].median_s <= t["slow"].q75_s


def test_record_writes_json_and_replaces_its_own_docs_section(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nintro\n")
    harness.record("demo", "Demo", [{"what": "x", "ms": 1.5}], notes="n", command="python demo.py", docs=docs,
                   results=tmp_path)
    harness.record("other", "Other", [{"what": "y", "ms": 2.0}], docs=docs, results=tmp_path)
    # rerun: replaced, not appended
    harness.record("demo", "Demo", [{"what": "x", "ms": 3.25}], docs=docs, results=tmp_path)
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nintro") and text.count("<!-- bench:demo -->") == 1
    assert "| x | 3.25 |" in text and "| x | 1.5 |" not in text and "| y | 2 |" in text
    assert "Machine:" in text
    data = json.loads((tmp_path / "demo.json").read_text())
    assert data["rows"] == [{"what": "x", "ms": 3.25}] and data["machine"]


def test_kept_rows_are_reused_only_under_the_same_setting_and_a_cut_line_is_measured_again(tmp_path):
    path = tmp_path / "rows.jsonl"
    first = harness.KeptRows(path, {"machine": "A", "n": 10})
    assert first.get("ddim-50") is None
    first.keep("ddim-50", {"FID": 12.5, "time": 3.0})
    first.keep("ddpm-250", {"FID": 11.0, "time": 9.0})
    with path.open("a") as f:
        f.write('{"key": "dpm-10", "setting": {"machine": "A", "n": 1')  # the interruption cut this one short
    again = harness.KeptRows(path, {"machine": "A", "n": 10})
    assert again.get("ddim-50") == {"FID": 12.5, "time": 3.0} and again.get("ddpm-250")["time"] == 9.0
    assert again.get("dpm-10") is None
    again.keep("dpm-10", {"FID": 13.0, "time": 0.5})  # measured again, on a line of its own
    assert harness.KeptRows(path, {"machine": "A", "n": 10}).get("dpm-10") == {"FID": 13.0, "time": 0.5}
    elsewhere = harness.KeptRows(path, {"machine": "B", "n": 10})  # another machine's times are not this one's
    assert elsewhere.get("ddim-50") is None


def test_a_benchmark_refuses_to_score_a_training_that_a_signal_stopped(tmp_path):
    import pytest

    from difflineage.train.trainer import TrainResult

    done = TrainResult(tmp_path, 400, "finished", tmp_path / "checkpoints" / "step_0000400", None)
    assert harness.finished(done) is done
    cut = TrainResult(tmp_path, 219, "interrupted", tmp_path / "checkpoints" / "step_0000219", None)
    with pytest.raises(SystemExit, match="interrupted at step 219; run this command again"):
        harness.finished(cut)


def test_a_study_reuses_a_complete_run_resumes_a_longer_one_and_refuses_one_trained_for_another(tmp_path):
    import pytest
    import yaml
    from helpers import tiny_vae_dict

    recipe = tmp_path / "tiny-vae.yaml"
    recipe.write_text(yaml.safe_dump(tiny_vae_dict()))
    run = harness.trained_run(str(recipe), [], tmp_path / "run", steps=2)
    first = run / "checkpoints" / "step_0000002" / "model.safetensors"
    made = first.stat().st_mtime_ns
    assert harness.trained_run(str(recipe), [], run, steps=2) == run and first.stat().st_mtime_ns == made  # reused
    harness.trained_run(str(recipe), [], run, steps=4)  # continued from step 2, not started again
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000002", "step_0000004"]
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert first.stat().st_mtime_ns == made and last["step"] == 4
    with pytest.raises(SystemExit, match="trained with model.latent_dim=4, not 6"):
        harness.trained_run(str(recipe), ["model.latent_dim=6"], run, steps=4, same=("model.latent_dim",))
    harness.trained_run(str(recipe), ["model.latent_dim=6"], run, steps=2, retrain=True, same=("model.latent_dim",))
    assert "latent_dim: 6" in (run / "config.yaml").read_text() and not (run / "checkpoints" / "step_0000004").exists()


def test_one_at_a_time_keeps_a_single_copy_alive_and_measures_each():
    import weakref

    import torch

    alive = weakref.WeakSet()
    built = []

    class Copy:  # stands for a training copy: weights, gradients, optimizer state
        def __init__(self):
            self.memory = bytearray(8 << 20)

    def builder(name):
        def build():
            assert len(alive) == 0, f"{name} is built while {len(alive)} other copy is alive"
            copy = Copy()
            alive.add(copy)
            built.append(name)
            return lambda: time.sleep(0.002) or copy
        return build

    timing, peaks = harness.one_at_a_time({n: builder(n) for n in ("a", "b", "c")}, torch.device("cpu"), warmup=1,
                                          repeats=4, rounds=2)
    assert built == ["a", "b", "c", "a", "b", "c"]  # each round builds every case anew, in turn
    assert len(alive) == 0
    assert all(t.repeats == 4 and t.median_s >= 0.002 for t in timing.values())
    assert all(peaks[n].mib > 8 for n in "abc")  # the peak includes the copy
