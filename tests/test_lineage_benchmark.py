"""benchmarks/lineage.py end to end at toy size: every system of the lineage planned for one budget from measured step
times, trained, scored on both sampling paths with the OpenMoji instrument, drawn side by side, and the seed's claims
rechecked; a second run reuses every stage and score instead of training or sampling again."""

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "openmoji-cache"))


def load_lineage():
    sys.path.insert(0, str(BENCH))  # the scripts import their neighbours (harness, lineage_claims) by name
    spec = importlib.util.spec_from_file_location("lineage", BENCH / "lineage.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_whole_lineage_study_runs_at_toy_size_and_a_rerun_reuses_it(tmp_path):
    lineage = load_lineage()
    args = ["--toy", "--budget", "0.05", "--measure-steps", "3", "--n", "8", "--claim-steps", "2", "--claim-n", "8",
            "--root", str(tmp_path / "runs"), "--docs", str(tmp_path / "lineage.md"),
            "--results", str(tmp_path / "results"), "--images", str(tmp_path / "images"),
            "--readme", str(tmp_path / "README.md")]
    lineage.main(args)
    out = json.loads((tmp_path / "results" / "lineage.json").read_text())
    rows = out["rows"]
    assert [r["system"].split("]")[0][1:] for r in rows] == [s.name for s in lineage.SYSTEMS]
    plan = json.loads((tmp_path / "runs" / "plan.json").read_text())
    speed, steps = plan["seconds_per_step"], plan["steps"]
    for s in lineage.SYSTEMS:  # each system's own stages fill what its shared ones leave of the budget
        own = [k for k in s.stages if lineage.STAGES[k].scaled and s.name != "DyDiT"]
        if own:
            spent = sum(steps[k] * speed[k] for k in s.stages)
            assert spent == pytest.approx(plan["budget_s"], rel=0.3) or any(steps[k] == 2 for k in own)
    for r in rows:
        assert math.isfinite(r["FID"]) and r["FID real"] > 0 and r["sampling (s / image)"] >= 0  # rounded: a toy VAE is ~0
        assert r["likelihood"] != "none" and "bits" in r["likelihood"]
    by = {r["system"].split("]")[0][1:]: r for r in rows}
    assert by["LDM"]["retrieval top-5"] is not None and by["VAE"]["subgroup accuracy"] is None
    assert by["DiT"]["fast path"].startswith("DPM-Solver++ 20") and "step cache" in by["DiT"]["fast path"]
    assert set(out["claims"]) == {"gflops", "blocks", "steps_vs_size", "dydit"}
    for claim in out["claims"].values():
        assert re.search(r"\b(holds|does not hold)\b", claim["said"]) and claim["rows"]
    assert len(out["claims"]["gflops"]["rows"]) == 6 and len(out["claims"]["blocks"]["rows"]) == 4
    page = (tmp_path / "lineage.md").read_text()
    for section in ("lineage", "lineage-gflops", "lineage-blocks", "lineage-steps_vs_size", "lineage-dydit"):
        assert f"<!-- bench:{section} -->" in page
    readme = (tmp_path / "README.md").read_text()  # the README's results open with the short table and the picture
    assert "<!-- bench:lineage-readme -->" in readme and "[DyDiT](docs/dydit.md)" in readme
    assert "docs/images/lineage_grid.png" in readme and readme.count("does not hold") + readme.count("holds") >= 4
    for picture in ("lineage_grid.png", "lineage_quality_time.png", "lineage_dit_gflops.png"):
        assert (tmp_path / "images" / picture).stat().st_size > 1000

    # a second run: same plan, every stage and score reused (nothing trained or sampled again)
    scored = (tmp_path / "runs" / "scores.jsonl").read_text()
    claimed = (tmp_path / "runs" / "claims" / "scores.jsonl").read_text()
    lineage.main(args)
    assert json.loads((tmp_path / "runs" / "plan.json").read_text()) == plan
    assert (tmp_path / "runs" / "scores.jsonl").read_text() == scored
    assert (tmp_path / "runs" / "claims" / "scores.jsonl").read_text() == claimed


    # a budget that the shared stages alone exceed is refused by name (the measured step times are reused)
    with pytest.raises(SystemExit, match="shared stages alone take"):
        lineage.main([a if a != "0.05" else "0.0001" for a in args])
