"""Does the sampling headline hold on other models and seeds? Trains ``--pairs`` independent DiT/DyDiT pairs with
the quickstart's recipe (each its own autoencoder, DiT and lambda-0.5 DyDiT, with training seed 0, 1, ...), then, for
each pair and each of ``--seeds`` sampling seeds, scores the headline's configurations on ``--n`` guided samples
(FID on MNIST features and class accuracy) and times the headline ratios side by side. Also measures what the step
cache's calibration needs: how stable its schedule is with the number of calibration samples, and how its held-back
error (``cache.error``) follows the FID and accuracy change as more is reused, which sets ``STEP_CACHE_TOLERANCE``.

    python benchmarks/sampling_spread.py                       # trains runs/sampling-spread/pair-*, then measures

Every trained run is reused when complete and resumed when cut; every measured row is kept in
runs/sampling-spread/rows.jsonl as it is measured, so an interrupted run measures only what is missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import difflineage
from harness import SAMPLER_NAMES, KeptRows, add_sampling_protocol, record, side_by_side, trained_run

from difflineage.eval import evaluate_system
from difflineage.machine import machine_description

REPO = Path(__file__).resolve().parents[1]
NAMES = SAMPLER_NAMES


def train_pair(root: Path, seed: int, dit_steps: int = 1000, dydit_steps: int = 400,
               autoencoder_steps: int = 800) -> tuple[Path, Path]:
    """One DiT/DyDiT pair trained from nothing with training seed ``seed``, as the quickstart does (its own
    autoencoder first), then the DyDiT fine-tuned at lambda 0.5 (configs/dydit-mnist.yaml)."""
    pair = root / f"pair-{seed}"
    seeded = [f"train.seed={seed}"]
    ae = trained_run("autoencoder-mnist", seeded, pair / "autoencoder", autoencoder_steps, same=("train.seed",))
    dit = trained_run("dit-mnist", [*seeded, f"model.first_stage={ae}"], pair / "dit", dit_steps,
                      same=("train.seed", "model.first_stage"))
    dydit = trained_run("dydit-mnist", [*seeded, f"model.base={dit}", "model.target=0.5"], pair / "dydit",
                        dydit_steps, same=("train.seed", "model.base"))
    return dit, dydit


# The headline's configurations (model, sampler, steps, cached): the anchor, the best composition of the grid
# (benchmarks/sampling_pareto.py) and its neighbours, so that each lever's share can be read on every pair.
# cached: False (no cache), True (the share asked, whatever its error) or "fit" (as --fast: less where the held-back
# error passes the tolerance).
CONFIGS = [("DiT", "ddim", 50, False), ("DiT", "dpmpp_2m", 5, False), ("DiT", "dpmpp_2m", 5, True),
           ("DyDiT", "dpmpp_2m", 5, False), ("DyDiT", "dpmpp_2m", 5, True), ("DyDiT", "dpmpp_2m", 5, "fit"),
           ("DyDiT", "dpmpp_2m", 10, True)]
ANCHOR, HEADLINE, SLOW = "DiT DDIM-50", "DyDiT DPM-Solver++-5 + cache", "DiT DDPM-250"
# The tolerance sweep: the share reused against the held-back error and the FID and accuracy change.
SWEEP = [("DiT", "dpmpp_2m", 10), ("DyDiT", "dpmpp_2m", 5)]
FRACTIONS = [0.0, 0.1, 0.2, 0.3, 0.4]
CALIBRATION_NS = [4, 8, 16, 32, 64]


def label(model: str, sampler: str, steps: int, cached: bool) -> str:
    return f"{model} {NAMES[sampler]}-{steps}" + {False: "", True: " + cache", "fit": " + fitted cache"}[cached]


def options_of(system, sampler: str, steps: int, cached, reuse: float, seed: int) -> dict:
    options = {"sampler": sampler, "steps": steps}
    if cached:
        options["step_cache"] = system.calibrate_step_cache(reuse, steps=steps, sampler=sampler, seed=seed,
                                                            fit=cached == "fit")
    return options


def spread(values: list[float]) -> str:
    """mean (min-max) of the values."""
    return f"{statistics.mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=REPO / "runs" / "sampling-spread", help="where the pairs are trained")
    ap.add_argument("--pairs", type=int, default=2, help="independently trained DiT/DyDiT pairs")
    ap.add_argument("--seeds", type=int, default=2, help="sampling seeds per pair (noise, and the cache's calibration)")
    add_sampling_protocol(ap)
    ap.add_argument("--dit-steps", type=int, default=1000, help="training steps of each DiT (the recipe's)")
    ap.add_argument("--dydit-steps", type=int, default=400, help="fine-tuning steps of each DyDiT (the recipe's)")
    ap.add_argument("--autoencoder-steps", type=int, default=800, help="training steps of each autoencoder")
    ap.add_argument("--sweep-pairs", type=int, default=1, help="pairs on which the share reused is swept")
    ap.add_argument("--train-only", action="store_true", help="train the pairs and stop")
    args = ap.parse_args(argv)
    pairs = [train_pair(args.root, seed, args.dit_steps, args.dydit_steps, args.autoencoder_steps)
             for seed in range(args.pairs)]
    if args.train_only:
        return
    kept = KeptRows(args.root / "rows.jsonl", {"machine": machine_description(), "n": args.n, "batch": args.batch,
                                               "reuse": args.reuse, "root": str(args.root),
                                               "timing_n": args.timing_n, "repeats": args.repeats})

    def scored(key: str, system, seed: int, options: dict) -> dict:
        if kept.get(key) is None:
            print(key, file=sys.stderr)
            s = evaluate_system(system, n=args.n, features="mnist", seed=seed, progress=False, bpd_images=0,
                                batch_size=args.batch, sample_options=options)
            cache = options.get("step_cache")
            kept.keep(key, {"fid": s["fid"], "accuracy": s["class_accuracy"], "seconds": s["sampling_seconds"],
                            "real": s["fid_real"], **({"error": cache.error, "agreement": cache.agreement,
                                                       "reused": cache.reuse_fraction} if cache is not None else {})})
        return kept.get(key)

    rows, sweep_rows, stability_rows, timings = [], [], [], []
    for p, (dit_dir, dydit_dir) in enumerate(pairs):
        models = {"DiT": difflineage.load(dit_dir), "DyDiT": difflineage.load(dydit_dir)}
        for seed in range(args.seeds):
            for model, sampler, steps, cached in CONFIGS:
                options = options_of(models[model], sampler, steps, cached, args.reuse, seed)
                r = scored(f"pair {p} seed {seed} {label(model, sampler, steps, cached)}", models[model], seed, options)
                rows.append({"pair": p, "seed": seed, "config": label(model, sampler, steps, cached), **r})
        # What the cache's error says about quality: one sampling seed, every share (on the first --sweep-pairs).
        for model, sampler, steps in SWEEP if p < args.sweep_pairs else []:
            for fraction in FRACTIONS:
                options = {"sampler": sampler, "steps": steps}
                if fraction:
                    options["step_cache"] = models[model].calibrate_step_cache(fraction, steps=steps, sampler=sampler)
                r = scored(f"pair {p} sweep {label(model, sampler, steps, False)} reuse {fraction}", models[model], 0,
                           options)
                sweep_rows.append({"pair": p, "config": label(model, sampler, steps, False), "fraction": fraction,
                                   **r})
        # How stable the calibration is with its sample count: agreement of the two halves, and overlap of the
        # schedules of two calibrations on other noise.
        for model, sampler, steps in [("DiT", "ddim", 50), ("DiT", "dpmpp_2m", 5), ("DyDiT", "dpmpp_2m", 5)]:
            for n in CALIBRATION_NS:
                key = f"pair {p} stability {label(model, sampler, steps, False)} n {n}"
                if kept.get(key) is None:
                    a, b = (models[model].calibrate_step_cache(args.reuse, steps=steps, sampler=sampler, n=n,
                                                               seed=s, check=0) for s in (0, 100))
                    overlap = int((a.reuse & b.reuse).sum()) / max(1, int(a.reuse.sum()))
                    kept.keep(key, {"halves": min(a.agreement, b.agreement), "overlap": overlap})
                stability_rows.append({"pair": p, "config": label(model, sampler, steps, False), "n": n,
                                       **kept.get(key)})

    # Side by side on each pair (always timed anew): the anchor, DDPM-250, every configuration that holds on every
    # run (FID within 1.15x of the anchor's, accuracy at least 95%), and the old headline.
    holding = [c for c in CONFIGS if label(*c) != ANCHOR and holds([r for r in rows if r["config"] == label(*c)], rows)]
    timed_configs = [c for c in CONFIGS if c in holding or label(*c) == HEADLINE]
    for p, (dit_dir, dydit_dir) in enumerate(pairs):
        print(f"pair {p}: timing side by side", file=sys.stderr)
        models = {"DiT": difflineage.load(dit_dir), "DyDiT": difflineage.load(dydit_dir)}
        labels = torch.arange(args.timing_n) % 10
        cases = {ANCHOR: ("DiT", {"sampler": "ddim", "steps": 50}), SLOW: ("DiT", {"sampler": "ddpm", "steps": 250})}
        for model, sampler, steps, cached in timed_configs:
            cases[label(model, sampler, steps, cached)] = (
                model, options_of(models[model], sampler, steps, cached, args.reuse, 0))

        def job(model, options):
            return lambda: models[model].sample(args.timing_n, condition=labels,
                                                generator=torch.Generator().manual_seed(0), **options)
        timed = side_by_side({k: job(*v) for k, v in cases.items()}, warmup=1, repeats=args.repeats)
        timings.append({"pair": p, **{k: v.median_s for k, v in timed.items()}})

    write(args, rows, sweep_rows, stability_rows, timings, argv)


def holds(runs: list[dict], rows: list[dict]) -> bool:
    """Whether a configuration's runs all keep FID within 1.15x of the anchor's (same pair and seed) and class accuracy
    at least 95%."""
    anchors = {(r["pair"], r["seed"]): r for r in rows if r["config"] == ANCHOR}
    return bool(runs) and all(r["fid"] <= 1.15 * anchors[(r["pair"], r["seed"])]["fid"] and r["accuracy"] >= 0.95
                              for r in runs)


def write(args, rows, sweep_rows, stability_rows, timings, argv) -> None:
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r)
    anchors = {(r["pair"], r["seed"]): r for r in rows if r["config"] == ANCHOR}

    def ratios_to(config: str, slow: str = ANCHOR) -> list[float]:
        return [t[slow] / t[config] for t in timings if config in t]

    table = []
    for config, rs in by.items():
        fid = [r["fid"] / anchors[(r["pair"], r["seed"])]["fid"] for r in rs]
        timed = ratios_to(config)
        table.append({"configuration": config, "runs": len(rs), "FID": spread([r["fid"] for r in rs]),
                      "FID / DiT DDIM-50's": f"{statistics.mean(fid):.2f} ({min(fid):.2f}-{max(fid):.2f})",
                      "class accuracy (%)": spread([100 * r["accuracy"] for r in rs]),
                      "held-back error": f"{statistics.mean(r['error'] for r in rs):.3f}" if "error" in rs[0] else "-",
                      "reused": spread([100 * r["reused"] for r in rs]) + "%" if "reused" in rs[0] else "-",
                      "vs DiT DDIM-50, side by side": (f"{statistics.mean(timed):.1f}x ({min(timed):.1f}-"
                                                       f"{max(timed):.1f})" if timed else "-"),
                      "holds on every run": "yes" if holds(rs, rows) else "no"})
    real = statistics.mean(r["real"] for r in rows)
    seed_moves = [abs(a["fid"] - b["fid"]) for a in rows for b in rows
                  if a["pair"] == b["pair"] and a["config"] == b["config"] and a["seed"] < b["seed"]]
    holding = [c for c in by if c != ANCHOR and holds(by[c], rows) and ratios_to(c)]
    best = max(holding, key=lambda c: statistics.mean(ratios_to(c)), default=None)
    said = (f"The fastest configuration that holds on every run: **{best}**, "
            + ", ".join(f"{a:.1f}x" for a in ratios_to(best)) + " faster than DiT DDIM-50 and "
            + ", ".join(f"{a:.1f}x" for a in ratios_to(best, SLOW)) + " faster than DiT DDPM-250 (one figure per "
            "pair). " if best else "No configuration holds on every run. ")
    notes = (f"{args.pairs} DiT/DyDiT pairs, each trained from nothing with the quickstart's recipe (its own "
             f"autoencoder, {args.autoencoder_steps} steps; the DiT, {args.dit_steps} steps; the lambda-0.5 DyDiT, "
             f"{args.dydit_steps} steps; training seeds 0..{args.pairs - 1}) under `train.bf16: auto`; "
             f"{args.seeds} sampling seeds each (the noise and the cache's calibration), {args.n} guided samples per "
             f"configuration (guidance 3, fp32), FID on MNIST features (real-vs-real at this count: {real:.1f}). "
             f"Cells: mean (min-max) over the {args.pairs * args.seeds} runs. 'Holds': FID within 1.15x of DiT "
             f"DDIM-50's and class accuracy at least 95% on every run. The same configuration's FID moved by "
             f"{statistics.mean(seed_moves):.1f} on average (at most {max(seed_moves):.1f}) between two sampling seeds "
             f"of one pair. Speeds: timed side by side on each pair ({args.timing_n} samples per call, median of "
             f"{args.repeats} interleaved repeats; the holding configurations and the old headline, {HEADLINE}, "
             f"which is " + ", ".join(f"{a:.1f}x" for a in ratios_to(HEADLINE)) + " faster than DiT DDIM-50). "
             + said)
    sweep = [{"pair": r["pair"], "configuration": r["config"], "reused": f"{r.get('reused', 0.0):.0%}",
              "held-back error": f"{r.get('error', 0.0):.4f}", "FID": round(r["fid"], 1),
              "class accuracy (%)": round(100 * r["accuracy"], 1)} for r in sweep_rows]
    stability = [{"pair": r["pair"], "configuration": r["config"], "calibration samples": r["n"],
                  "halves agree": f"{r['halves']:.2f}", "two calibrations overlap": f"{r['overlap']:.2f}"}
                 for r in stability_rows]
    cmd = ("python benchmarks/sampling_spread.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    record("sampling_spread", "Sampling headline on independently trained pairs and seeds", table, notes, command=cmd)
    record("sampling_cache_tolerance", "Step cache: held-back error against FID and accuracy as more is reused",
           sweep, "One sampling seed per pair; reuse 0% is the plain sampler. The held-back error is the mean "
           "|cached - plain| of 8 held-back samples' pixels in [-1, 1] (calibrate_step_cache); FID on "
           f"{args.n} samples.", command=cmd)
    record("sampling_cache_stability", "Step cache: how stable its calibration is with the number of samples",
           stability, f"Reusing {args.reuse:.0%}. 'Halves agree': the share of the schedule's choices that each half "
           "of the calibration samples makes alone (the lower of two calibrations); 'two calibrations overlap': the "
           "share of one calibration's choices that a second, on other noise (seed 100), makes too.", command=cmd)
    out = REPO / "benchmarks" / "results" / "sampling_spread_summary.json"
    out.write_text(json.dumps({"rows": rows, "sweep": sweep_rows, "stability": stability_rows, "timings": timings,
                               "best": best, "speedup_vs_ddim50": ratios_to(best) if best else [],
                               "speedup_vs_ddpm250": ratios_to(best, SLOW) if best else [],
                               "machine": machine_description()}, indent=2) + "\n")
    print(notes)


if __name__ == "__main__":
    main()
