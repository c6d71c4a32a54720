"""Quality against sampling time for the quickstart DiT and its DyDiT: DDPM-250 (the papers' setting), DDIM at
50/25/10 steps and DPM-Solver++(2M) at 20/10/5 steps, each with and without the step cache, on DiT and on DyDiT
(lambda 0.5, fast path); FID (MNIST features) and class accuracy of ``--n`` guided samples, and the wall-clock time
of drawing them, all in one run. Writes the table (docs/benchmarks.md, benchmarks/results/sampling_pareto.json), the
plot of FID against time with its Pareto front (docs/images/sampling_pareto.png) and the cache's decisions for the
best composition (docs/images/step_cache_schedule.png).

    make quickstart                                              # the DiT, in runs/quickstart-dit
    python benchmarks/sampling_pareto.py --dit runs/quickstart-dit

The DyDiT is fine-tuned from ``--dit`` with configs/dydit-mnist.yaml at lambda 0.5 into ``--dydit`` unless that run
is complete. Every configuration draws the same labels and seeds (evaluate's: the classes in turn), guidance 3 as the
recipe. A cached configuration is calibrated first on 4 samples (its own time, reported apart: it is paid once per
model, sampler and step count). The times are those of drawing the ``--n`` scored samples, configurations
interleaved (DiT, DyDiT, ...); the headline ratios (the best composition against DiT DDIM-50 and DDPM-250) are then
timed again side by side with their repeats interleaved.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import difflineage
from harness import SAMPLER_NAMES, KeptRows, add_sampling_protocol, record, side_by_side, trained_run

from difflineage.eval import evaluate_system
from difflineage.eval.sampling import fast_sampling
from difflineage.machine import machine_description
from difflineage.models.step_cache import draw_schedule

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "docs" / "images"
SAMPLERS = [("ddpm", 250), ("ddim", 50), ("ddim", 25), ("ddim", 10), ("dpmpp_2m", 20), ("dpmpp_2m", 10),
            ("dpmpp_2m", 5)]
NAMES = SAMPLER_NAMES


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both time and FID (lower is better on both)."""
    return [i for i, (t, f) in enumerate(points)
            if not any((t2 <= t and f2 <= f) and (t2 < t or f2 < f) for t2, f2 in points)]


def plot(rows: list[dict], front: list[int], path: Path, real: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {"DiT": "tab:blue", "DyDiT": "tab:orange"}
    markers = {"ddpm": "s", "ddim": "o", "dpmpp_2m": "^"}
    for model in colours:
        for sampler in markers:
            for cached in (False, True):
                pts = sorted((r["_time"], r["_fid"]) for r in rows
                             if r["model"] == model and r["_sampler"] == sampler and r["_cached"] == cached)
                if not pts:
                    continue
                ax.plot(*zip(*pts), color=colours[model], marker=markers[sampler], linestyle="--" if cached else "-",
                        markerfacecolor="white" if cached else colours[model], alpha=0.85,
                        label=f"{model} {NAMES[sampler]}{' + cache' if cached else ''}")
    for r in rows:
        ax.annotate(str(r["steps"]), (r["_time"], r["_fid"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    best = sorted((rows[i]["_time"], rows[i]["_fid"]) for i in front)
    ax.plot(*zip(*best), color="black", linewidth=2.5, alpha=0.25, label="Pareto front")
    ax.axhline(real, color="grey", linestyle=":", label=f"real vs real ({real:.1f})")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel(f"seconds to draw the {rows[0]['_n']} samples (log scale)")
    ax.set_ylabel("FID (MNIST features)")
    ax.set_title("Sampling: FID against time (numbers: sampler steps)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dit", default="runs/quickstart-dit", help="the quickstart DiT run")
    ap.add_argument("--dydit", default="runs/dydit-mnist/lambda-0.5", help="its DyDiT (fine-tuned here if missing)")
    ap.add_argument("--target", type=float, default=0.5, help="the DyDiT's lambda when it is fine-tuned here")
    ap.add_argument("--dydit-steps", type=int, default=400, help="fine-tuning steps when the DyDiT is made here")
    add_sampling_protocol(ap)
    ap.add_argument("--rows", type=Path, default=REPO / "runs" / "sampling-pareto" / "rows.jsonl",
                    help="where each configuration's row is kept as it is measured (a rerun resumes from it)")
    args = ap.parse_args(argv)
    dydit = trained_run("dydit-mnist", [f"model.base={args.dit}", f"model.target={args.target}"], Path(args.dydit),
                        args.dydit_steps, same=("model.base",))
    models = {"DiT": difflineage.load(args.dit), "DyDiT": difflineage.load(dydit)}

    configs = [(model, sampler, steps, cached) for sampler, steps in SAMPLERS for cached in (False, True)
               for model in models]
    # Each configuration's row is kept as soon as it is measured, so an interruption loses one configuration, not
    # the grid; a rerun reuses only rows measured on this machine with these models and settings.
    kept = KeptRows(args.rows, {"machine": machine_description(), "dit": args.dit, "dydit": args.dydit, "n": args.n,
                                "batch": args.batch, "reuse": args.reuse})
    rows, options_of = [], {}
    for i, (model, sampler, steps, cached) in enumerate(configs):
        system = models[model]
        options = {"sampler": sampler, "steps": steps}
        label = f"{model} {NAMES[sampler]}-{steps}{' + cache' if cached else ''}"
        calibration_s = 0.0
        if cached:
            start = time.perf_counter()
            options["step_cache"] = system.calibrate_step_cache(args.reuse, steps=steps, sampler=sampler, n=4)
            calibration_s = time.perf_counter() - start
        options_of[label] = (model, options)
        if kept.get(label) is not None:
            print(f"[{i + 1}/{len(configs)}] {label}: measured before on this machine ({args.rows})", file=sys.stderr)
            rows.append(kept.get(label))
            continue
        print(f"[{i + 1}/{len(configs)}] {label}", file=sys.stderr)
        scores = evaluate_system(system, n=args.n, features="mnist", progress=False, bpd_images=0,
                                 batch_size=args.batch, sample_options=options)
        rows.append({"model": model, "sampler": NAMES[sampler], "steps": steps,
                     "cache": f"{options['step_cache'].reuse_fraction:.0%} reused" if cached else "-",
                     "sampling (s)": round(scores["sampling_seconds"], 1),
                     "calibration (s)": round(calibration_s, 1) if cached else "-",
                     "FID": round(scores["fid"], 1), "class accuracy": f"{100 * scores['class_accuracy']:.1f}%",
                     "_time": scores["sampling_seconds"], "_fid": scores["fid"], "_acc": scores["class_accuracy"],
                     "_sampler": sampler, "_cached": cached, "_label": label, "_n": args.n,
                     "_real": scores["fid_real"]})
        kept.keep(label, rows[-1])

    anchor = next(r for r in rows if r["_label"] == "DiT DDIM-50")
    slow = next(r for r in rows if r["_label"] == "DiT DDPM-250")
    for r in rows:
        r["vs DiT DDIM-50"] = f"{anchor['_time'] / r['_time']:.1f}x"
        r["vs DiT DDPM-250"] = f"{slow['_time'] / r['_time']:.1f}x"
        r["FID / DiT DDIM-50's"] = f"{r['_fid'] / anchor['_fid']:.2f}"
    good = [r for r in rows if r["_fid"] <= 1.15 * anchor["_fid"] and r["_acc"] >= 0.95]
    if not good:
        print("no configuration is within 1.15x of DiT DDIM-50's FID with 95% accuracy; the anchor is the best",
              file=sys.stderr)
    best = min(good or [anchor], key=lambda r: r["_time"])
    front = pareto([(r["_time"], r["_fid"]) for r in rows])
    for i, r in enumerate(rows):
        r["Pareto"] = "yes" if i in front else ""

    print("timing the headline side by side", file=sys.stderr)
    labels = torch.arange(args.timing_n) % 10
    headline = [anchor["_label"], slow["_label"], best["_label"]]

    def job(label):
        model, options = options_of[label]

        def run():
            models[model].sample(args.timing_n, condition=labels, generator=torch.Generator().manual_seed(0),
                                 **options)
        return run

    cases = {k: job(k) for k in dict.fromkeys(headline)}
    # The one switch (sample/evaluate --fast) on a DiT of its own, since it compiles the blocks in place; and the best
    # composition with compiled blocks when it is a DiT one. Compilation is paid in the warm-up call.
    fast_dit = difflineage.load(args.dit)
    fast_options, _, said = fast_sampling(fast_dit, {}, seed=0)
    fast_label = f"DiT --fast ({said})"
    options_of[fast_label] = ("DiT --fast", fast_options)
    models["DiT --fast"] = fast_dit
    cases[fast_label] = job(fast_label)
    if best["model"] == "DiT" and "compiled blocks" in said:
        options_of[best["_label"] + " + compiled blocks"] = ("DiT --fast", options_of[best["_label"]][1])
        cases[best["_label"] + " + compiled blocks"] = job(best["_label"] + " + compiled blocks")
    timed = side_by_side(cases, warmup=1, repeats=args.repeats)
    speedup_ddim = timed[anchor["_label"]].median_s / timed[best["_label"]].median_s
    speedup_ddpm = timed[slow["_label"]].median_s / timed[best["_label"]].median_s

    real = rows[0]["_real"]
    notes = (f"The quickstart DiT (`{args.dit}`) and its DyDiT at lambda {models['DyDiT'].config.model.target} "
             f"(`{args.dydit}`, fast path), guidance 3, {args.n} samples per configuration in calls of {args.batch} "
             f"(fp32); FID and class accuracy on MNIST features (the shipped classifier; real-vs-real FID at this "
             f"count: {real:.1f}). Cache: {args.reuse:.0%} of the block evaluations reused, calibrated on 4 samples. "
             f"Best composition (the fastest with FID within 1.15x of DiT DDIM-50's and accuracy at least 95%): "
             f"**{best['_label']}**, FID {best['_fid']:.1f} against {anchor['_fid']:.1f}, accuracy "
             f"{100 * best['_acc']:.1f}%. Timed again side by side ({args.timing_n} samples per call, median of "
             f"{args.repeats} interleaved repeats): **{speedup_ddim:.1f}x** faster than DiT DDIM-50 (target 8x) and "
             f"**{speedup_ddpm:.1f}x** faster than DiT DDPM-250 (target 40x). Side by side, seconds per call: "
             + "; ".join(f"{k} {v.median_s:.2f}" for k, v in timed.items()) + ". "
             "![FID against sampling time](images/sampling_pareto.png)")
    IMAGES.mkdir(parents=True, exist_ok=True)
    plot(rows, front, IMAGES / "sampling_pareto.png", real)
    best_cached = min((r for r in good if r["_cached"]), key=lambda r: r["_time"], default=None)
    if best_cached is not None:
        model, options = options_of[best_cached["_label"]]
        draw_schedule(options["step_cache"], IMAGES / "step_cache_schedule.png",
                      title=f"{best_cached['_label']}: residual change per block and step (calibration)")
    table = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    cmd = "python benchmarks/sampling_pareto.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record("sampling_pareto", "Sampling: FID against time, few-step solvers, step caching and DyDiT composed", table,
           notes, command=cmd.strip())
    out = REPO / "benchmarks" / "results" / "sampling_pareto_headline.json"
    out.write_text(json.dumps({"best": best["_label"], "fid_best": best["_fid"], "fid_ddim50": anchor["_fid"],
                               "accuracy_best": best["_acc"], "speedup_vs_ddim50": speedup_ddim,
                               "speedup_vs_ddpm250": speedup_ddpm,
                               "timings_s": {k: v.median_s for k, v in timed.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
