"""The benchmark harness of the scripts in benchmarks/ (they import it as ``harness``: run as a script, a file's folder
is on sys.path): time callables with warm-up and the median of repeats, compare implementations
side by side in one run, and record results as JSON and as a table in docs/benchmarks.md.

Speeds are compared as ratios measured in the same run, with the candidates' repeats interleaved
(A, B, A, B, ...), so that a noisy, shared machine slows every candidate alike.
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from difflineage.checkpoint import latest_checkpoint
from difflineage.machine import machine_description
from difflineage.systems import load_config
from difflineage.train import Trainer

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "benchmarks.md"
RESULTS = REPO / "benchmarks" / "results"


@dataclass
class Timing:
    name: str
    median_s: float
    q25_s: float
    q75_s: float
    repeats: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q75_s - self.q25_s) / self.median_s if self.median_s else 0.0


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


MIB = 2.0 ** 20


def _vm(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MIB
    except OSError:
        pass
    return None


class Peak:
    """Peak memory over a ``with`` block: on CUDA ``max_memory_allocated`` (``above_resident``: minus what was
    allocated when the block began), on the CPU the process's peak RSS (VmHWM, reset when the block begins where
    Linux allows; else the peak since the process started)."""

    def __init__(self, device: torch.device, above_resident: bool = False):
        self.device, self.above = device, above_resident
        self.mib, self.resident_mib, self.how = float("nan"), float("nan"), ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.resident_mib = torch.cuda.memory_allocated(self.device) / MIB
            self.how = "torch.cuda.max_memory_allocated" + (" above what was resident" if self.above else "")
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
                self.how = "peak RSS of the process (VmHWM, reset before)"
            except OSError:
                self.how = "peak RSS of the process since it started (ru_maxrss)"
            self.resident_mib = _vm("VmRSS") or float("nan")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / MIB
            self.mib = peak - self.resident_mib if self.above else peak
        else:
            hwm = _vm("VmHWM") if "VmHWM" in self.how else None
            self.mib = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return False


def one_at_a_time(builders: dict[str, Callable[[], Callable[[], Any]]], device: torch.device, warmup: int = 2,
                 repeats: int = 6, rounds: int = 2) -> tuple[dict[str, Timing], dict[str, Peak]]:
    """Time cases that each hold a large copy of their own (a training copy: weights, gradients, optimizer state)
    with at most one alive at a time: ``builders[name]()`` makes the case's copy and returns its step; in each of
    ``rounds`` rounds every case in turn is built, warmed up, timed ``repeats / rounds`` times, and freed before
    the next is built. The rounds interleave the cases coarsely, so a slow phase of a shared machine does not fall
    on one case alone. Returns each case's timing (over every round) and its peak memory (the largest of its
    rounds, the copy's construction included)."""
    per_round = max(1, round(repeats / rounds))
    samples: dict[str, list[float]] = {name: [] for name in builders}
    peaks: dict[str, Peak] = {}
    for _ in range(rounds):
        for name, build in builders.items():
            with Peak(device) as peak:
                step = build()
                for _ in range(warmup):
                    step()
                _sync()
                for _ in range(per_round):
                    start = time.perf_counter()
                    step()
                    _sync()
                    samples[name].append(time.perf_counter() - start)
            if name not in peaks or peak.mib > peaks[name].mib:
                peaks[name] = peak
            del step
            torch._dynamo.reset()  # a compiled copy is held by the compiler's caches until they are dropped
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {name: _timing(name, xs) for name, xs in samples.items()}, peaks


def _timing(name: str, xs: list[float]) -> Timing:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return Timing(name=name, median_s=statistics.median(xs), q25_s=q[0], q75_s=q[2], repeats=len(xs))


def side_by_side(cases: dict[str, Callable[[], Any]], warmup: int = 3, repeats: int = 10) -> dict[str, Timing]:
    """Time every case ``repeats`` times after ``warmup`` calls, interleaving the cases."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    _sync()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            _sync()
            samples[name].append(time.perf_counter() - start)
    return {name: _timing(name, xs) for name, xs in samples.items()}


def record(name: str, title: str, rows: list[dict[str, Any]], notes: str = "", command: str = "",
           docs: Path = DOCS, results: Path = RESULTS) -> Path:
    """Write ``benchmarks/results/NAME.json`` and replace NAME's section of docs/benchmarks.md with a table."""
    machine = machine_description()
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"{name}.json"
    payload = {"name": name, "title": title, "machine": machine, "command": command,
               "date": time.strftime("%Y-%m-%d"), "rows": rows}
    out.write_text(json.dumps(payload, indent=2, default=_plain) + "\n")

    lines = [f"## {title}", "", f"Machine: {machine}. Date: {payload['date']}. Command: `{command}`", ""]
    if notes:
        lines += [notes, ""]
    section = "\n".join(lines) + "\n" + markdown_table(rows)
    write_section(name, section, docs)
    print(section)  # the same table on the terminal
    return out


class KeptRows:
    """The rows of a long benchmark kept in a JSON-lines file as each is measured, so that an interrupted run loses
    one row, not all: a rerun reuses the rows measured under the same ``setting`` (a dict that should name the
    machine, e.g. ``machine_description()``, when the rows hold times) and measures the rest."""

    def __init__(self, path: Path, setting: dict[str, Any]):
        self.path, self.setting = Path(path), setting
        self.rows: dict[str, dict[str, Any]] = {}
        # a last line cut short by an interruption gets a newline before the next row (read once, here)
        self._cut = self.path.is_file() and not self.path.read_bytes().endswith(b"\n") and self.path.stat().st_size > 0
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the interruption itself: measured again
                    continue
                if entry.get("setting") == setting:
                    self.rows[entry["key"]] = entry["row"]

    def get(self, key: str) -> Any:
        """The row kept under ``key`` for this setting, or None."""
        return self.rows.get(key)

    def keep(self, key: str, row: dict[str, Any]) -> None:
        self.rows[key] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(("\n" if self._cut else "") + json.dumps({"key": key, "setting": self.setting, "row": row},
                                                              default=_plain) + "\n")
        self._cut = False


def finished(result: Any) -> Any:
    """A benchmark's training ``result`` (a ``TrainResult``), or an exit naming where it stopped: a run stopped by a
    signal must not be scored as if it were trained (rerunning the benchmark resumes it)."""
    if result.status != "finished":
        raise SystemExit(f"training in {result.run_dir} was {result.status} at step {result.step}; run this command "
                         "again to continue it (it resumes from the checkpoint) before anything is scored")
    return result


def train_seconds(run: Path) -> float:
    """The training steps' own time (checkpoints and grids left out), from the run's logged throughput."""
    batch = load_config(run / "config.yaml").train.batch_size
    total, last = 0.0, 0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "images_per_s" in row:
            total += (row["step"] - last) * batch / row["images_per_s"]
            last = row["step"]
    return total


def trained_run(recipe: str, overrides: list[str], run_dir: Path, steps: int, retrain: bool = False,
                same: tuple[str, ...] = ()) -> Path:
    """``run_dir`` trained from ``recipe`` with ``overrides`` to ``steps``: reused when it is complete, resumed
    (exactly, from its last checkpoint) when it was interrupted, trained otherwise; ``retrain`` starts it again. A run
    kept from before must agree with this request at the config keys ``same`` (dotted; paths compared resolved), or
    this exits naming both values, so that a study never scores a model trained for another one."""
    run_dir = Path(run_dir)
    cfg = load_config(recipe, [*overrides, f"train.steps={steps}"])
    last = None if retrain else latest_checkpoint(run_dir)
    if last is not None:
        before = load_config(run_dir / "config.yaml").to_dict()
        for key in same:
            was, asked = _setting(before, key), _setting(cfg.to_dict(), key)
            if was != asked and not (isinstance(was, str) and isinstance(asked, str)
                                     and Path(was).resolve() == Path(asked).resolve()):
                sys.exit(f"{run_dir} was trained with {key}={was}, not {asked}: give another run folder, or retrain it")
        if int(last.name.split("_")[-1]) >= steps:  # checkpoints are named by their step
            print(f"reusing {run_dir}", file=sys.stderr)
            return run_dir
    finished(Trainer(cfg, run_dir, resume=True if last is not None else None,
                     overwrite=retrain and run_dir.exists()).fit())
    return run_dir


# The sampling benchmarks' (sampling_pareto.py, sampling_spread.py) names of the samplers, and the options of their
# shared protocol: FID and accuracy on --n guided samples in calls of --batch, a cache reusing --reuse, headline
# ratios timed side by side on --timing-n samples per call, --repeats times.
SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp_2m": "DPM-Solver++"}


def add_sampling_protocol(ap) -> None:
    ap.add_argument("--n", type=int, default=1000, help="samples per configuration for FID and accuracy")
    ap.add_argument("--reuse", type=float, default=0.2, help="share of block evaluations the cache reuses")
    ap.add_argument("--batch", type=int, default=250, help="samples per sampling call")
    ap.add_argument("--timing-n", type=int, default=100, help="samples per call in the side-by-side timing")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the side-by-side timing")


def _setting(raw: dict, key: str) -> Any:
    for part in key.split("."):
        raw = raw[part]
    return raw


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of ``rows``: every row's keys as columns, in order of first appearance."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_section(name: str, section: str, docs: Path = DOCS) -> Path:
    """Put ``section`` between NAME's markers in ``docs`` (replacing what was there), or append it with them."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = docs.read_text() if docs.exists() else "# Benchmarks\n\nEvery table here is written by a script in benchmarks/; rerun it to refresh.\n"
    block = f"{begin}\n{section}{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text)
    return docs


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return "" if v is None else str(v)


def _plain(v: Any) -> Any:
    if isinstance(v, Timing):
        return asdict(v)
    return str(v)
