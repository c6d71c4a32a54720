"""The seed's DiT and DyDiT claims rechecked on OpenMoji, as part of benchmarks/lineage.py (run that; this module has
no command of its own):

1. **Gflops drive FID**: class-conditional latent DiTs of three sizes (S 4x128, B 6x256, L 8x384) at patch 2 and 4 over
   the lineage's autoencoder latents (8x8x8: 16 or 4 tokens), each trained the same ``--claim-steps``; FID and subgroup
   accuracy against the network's Gflops (multiply-accumulates per image and step, the paper's unit).
2. **adaLN-Zero is best of the four conditioning blocks**: size B, patch 2, the same steps, each block.
3. **More sampling steps do not replace a bigger model**: the three patch-2 sizes sampled with DDIM at several steps.
4. **DyDiT**: the FLOPs ratio it reaches on the sampling path against its target, its sampling time against its DiT's
   side by side (fp32, and bf16 where native), and its FID against its DiT's (the lineage table's models).

Each statement is computed from the numbers (it says "holds" or "does not hold"), and each figure names the machine.
The training budget of these studies is fixed in steps, not minutes, as the paper's comparisons are.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from harness import KeptRows, markdown_table, side_by_side, trained_run, write_section

import difflineage
from difflineage.eval import bf16_autocast, evaluate_system
from difflineage.eval.flops import count_flops, sampling_macs
from difflineage.eval.sampling import native_bf16
from difflineage.machine import machine_description

SIZES = {"S": (4, 128, 2), "B": (6, 256, 4), "L": (8, 384, 6)}  # depth, hidden, heads
TOY_SIZES = {"S": (1, 8, 2), "B": (1, 16, 2), "L": (2, 16, 2)}
PATCHES = (2, 4)
BLOCKS = ("adaln_zero", "cross_attention", "in_context", "adaln")
SAMPLING_STEPS = (10, 25, 50)


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (no ties expected among Gflops or FIDs)."""
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for i, j in enumerate(order):
            r[j] = float(i)
        return r
    a, b = ranks(xs), ranks(ys)
    n = len(a)
    if n < 2:
        return float("nan")
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    var = (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)) ** 0.5
    return cov / var if var else float("nan")


def network_gmacs(system) -> float:
    """Multiply-accumulates (G) of the denoising network for one image and one step (the paper's "Gflops")."""
    passes = system.forward_passes()
    key = next(k for k in passes if k.startswith("sampling:"))
    return count_flops(passes[key]).gmacs


class Claims:
    def __init__(self, study, runs: dict[str, Path], planned: dict[str, Any], systems: dict[str, Any],
                 steps: int, n: int):
        self.study, self.runs, self.planned, self.systems = study, runs, planned, systems
        self.steps, self.n = steps, n
        self.sizes = TOY_SIZES if study.toy else SIZES
        self.sampling_steps = (2, 3) if study.toy else SAMPLING_STEPS
        self.batch = difflineage.systems.load_config("dit-class-openmoji", study.overrides("dit")).train.batch_size
        self.kept = KeptRows(study.root / "claims" / "scores.jsonl",
                             {"steps": steps, "n": n, "machine": machine_description()})

    def dit(self, size: str, patch: int, block: str = "adaln_zero") -> Path:
        depth, hidden, heads = self.sizes[size]
        name = f"{size}{patch}" + ("" if block == "adaln_zero" else f"-{block}")
        overrides = self.study.overrides("dit") + [
            f"model.dit.depth={depth}", f"model.dit.hidden={hidden}", f"model.dit.heads={heads}",
            f"model.dit.patch={patch}", f"model.dit.block={block}"]
        print(f"claims: DiT {name}, {self.steps} steps", file=sys.stderr)
        return trained_run("dit-class-openmoji", overrides, self.study.root / "claims" / name, self.steps,
                           same=("model.first_stage", "model.dit.block", "model.dit.patch", "model.dit.hidden"))

    def scores(self, run: Path, key: str, **sample_options) -> dict[str, Any]:
        if self.kept.get(key) is None:
            system = difflineage.load(run)
            m = evaluate_system(system, n=self.n, progress=False, bpd_images=0, sample_options=sample_options)
            self.kept.keep(key, {"fid": m["fid"], "fid_real": m["fid_real"], "accuracy": m["class_accuracy"],
                                 "gmacs": network_gmacs(system), "seconds": m["sampling_seconds"],
                                 "parameters (M)": sum(p.numel() for p in system.net.parameters()) / 1e6})
        return self.kept.get(key)

    # -- 1. Gflops ---------------------------------------------------------------------------------------

    def gflops(self) -> dict[str, Any]:
        rows = []
        for patch in PATCHES:
            for size in self.sizes:
                s = self.scores(self.dit(size, patch), f"{size}{patch}")
                rows.append({"model": f"{size}/{patch}", "Gflops": round(s["gmacs"], 4),
                             "parameters (M)": round(s["parameters (M)"], 2), "FID": round(s["fid"], 1),
                             "subgroup accuracy": round(s["accuracy"], 3)})
        rho = spearman([r["Gflops"] for r in rows], [r["FID"] for r in rows])
        within = {p: [r["FID"] for r in rows if r["model"].endswith(f"/{p}")] for p in PATCHES}
        monotone = {p: all(a > b for a, b in zip(f, f[1:])) for p, f in within.items()}
        said = (f"Spearman rank correlation of Gflops and FID over the {len(rows)} models: {rho:+.2f} (-1: more "
                f"Gflops, lower FID in every pair). Within a patch size, FID falls with every step up in size: "
                + ", ".join(f"patch {p}: {'holds' if ok else 'does not hold'}" for p, ok in monotone.items()) + ".")
        self.plot_gflops(rows)
        return {"rows": rows, "spearman": rho, "monotone_within_patch": monotone, "said": said}

    def plot_gflops(self, rows):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 4))
        for patch in PATCHES:
            mine = [r for r in rows if r["model"].endswith(f"/{patch}")]
            ax.plot([r["Gflops"] for r in mine], [r["FID"] for r in mine], "o-", label=f"patch {patch}")
            for r in mine:
                ax.annotate(r["model"], (r["Gflops"], r["FID"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xscale="log", xlabel="Gflops (MACs per image and step)", ylabel="FID (OpenMoji features)",
               title=f"DiT on OpenMoji, {self.steps} steps each\n{machine_description()}")
        ax.title.set_fontsize(8)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.study.images / "lineage_dit_gflops.png", dpi=100)
        plt.close(fig)

    # -- 2. conditioning blocks ---------------------------------------------------------------------------

    def blocks(self) -> dict[str, Any]:
        rows = []
        for block in BLOCKS:
            s = self.scores(self.dit("B", 2, block), "B2" + ("" if block == "adaln_zero" else f"-{block}"))
            rows.append({"block": block, "Gflops": round(s["gmacs"], 4), "parameters (M)": round(s["parameters (M)"], 2),
                         "FID": round(s["fid"], 1), "subgroup accuracy": round(s["accuracy"], 3)})
        best = min(rows, key=lambda r: r["FID"])
        said = (f"Lowest FID: {best['block']} ({best['FID']}). adaLN-Zero best of the four: "
                f"{'holds' if best['block'] == 'adaln_zero' else 'does not hold'} at {self.steps} steps.")
        return {"rows": rows, "best": best["block"], "said": said}

    # -- 3. sampling steps against model size ------------------------------------------------------------

    def steps_vs_size(self) -> dict[str, Any]:
        rows = []
        for size in self.sizes:
            run = self.dit(size, 2)
            recipe = difflineage.systems.load_config(run / "config.yaml").model.diffusion.sample_steps
            for k in self.sampling_steps:  # the recipe's own step count is the Gflops study's score of this model
                s = self.scores(run, f"{size}2") if k == recipe else self.scores(run, f"{size}2@{k}", steps=k)
                rows.append({"model": f"{size}/2", "DDIM steps": k,
                             "sampling Gflops per image": round(s["gmacs"] * k * 2, 3),  # guided: two halves
                             "FID": round(s["fid"], 1), "subgroup accuracy": round(s["accuracy"], 3)})
        small, large = list(self.sizes)[0], list(self.sizes)[-1]
        best_small = min((r for r in rows if r["model"] == f"{small}/2"), key=lambda r: r["FID"])
        fewest_large = next(r for r in rows if r["model"] == f"{large}/2")
        holds = best_small["FID"] > fewest_large["FID"]
        said = (f"{small}/2 at its best ({best_small['DDIM steps']} steps, {best_small['sampling Gflops per image']} "
                f"Gflops per image) has FID {best_small['FID']}; {large}/2 at {fewest_large['DDIM steps']} steps "
                f"({fewest_large['sampling Gflops per image']} Gflops) has {fewest_large['FID']}. More steps do not "
                f"replace the bigger model: {'holds' if holds else 'does not hold'}.")
        return {"rows": rows, "holds": holds, "said": said}

    # -- 4. DyDiT ----------------------------------------------------------------------------------------

    def dydit(self, table: dict[str, dict[str, Any]]) -> dict[str, Any]:
        dit, dydit = self.systems["DiT"], self.systems["DyDiT"]
        n = 4 if self.study.toy else 50
        macs = {}
        for k, m in (("DiT", dit), ("DyDiT", dydit)):
            per_step = sampling_macs(m, n)  # (t, MACs per image) per sampler step
            macs[k] = sum(x for _, x in per_step) / len(per_step)
        ratio = macs["DyDiT"] / macs["DiT"]
        labels = torch.arange(n) % dit.num_classes
        timings = {}
        for precision in ("fp32", "bf16") if native_bf16(dit.device) else ("fp32",):
            def job(m, bf16=precision == "bf16"):
                def run():
                    with bf16_autocast(m.device, bf16):
                        m.sample(n, condition=labels, generator=torch.Generator().manual_seed(0))
                return run
            t = side_by_side({"DiT": job(dit), "DyDiT": job(dydit)}, warmup=1, repeats=1 if self.study.toy else 3)
            timings[precision] = t["DiT"].median_s / t["DyDiT"].median_s
        fid = table["DyDiT"]["fid"] / table["DiT"]["fid"]
        target = dydit.config.model.target
        rows = [{"FLOPs target": target, "FLOPs ratio reached (counted)": round(ratio, 3),
                 **{f"speed-up {p} (side by side)": f"{v:.2f}x" for p, v in timings.items()},
                 "FID DiT": round(table["DiT"]["fid"], 1), "FID DyDiT": round(table["DyDiT"]["fid"], 1),
                 "FID ratio": round(fid, 2),
                 "subgroup accuracy DiT / DyDiT": f"{table['DiT']['class_accuracy']:.3f} / "
                                                 f"{table['DyDiT']['class_accuracy']:.3f}"}]
        reached = abs(ratio - target) <= 0.1
        faster = all(v > 1 for v in timings.values())
        holds_fid = fid <= 1.1
        said = (f"FLOPs target {target}: reached {ratio:.2f} ({'holds' if reached else 'does not hold'}, within 0.1); "
                f"faster side by side: {'holds' if faster else 'does not hold'} ("
                + ", ".join(f"{p} {v:.2f}x" for p, v in timings.items()) + "); FID held within 10% of its DiT's: "
                f"{'holds' if holds_fid else 'does not hold'} (ratio {fid:.2f}).")
        return {"rows": rows, "said": said}


TITLES = {"gflops": "Gflops drive FID", "blocks": "adaLN-Zero is best of the four conditioning blocks",
          "steps_vs_size": "More sampling steps do not replace a bigger model",
          "dydit": "DyDiT reaches its FLOPs target, samples faster and holds FID"}
PICTURES = {"gflops": "lineage_dit_gflops.png"}


def run_all(study, runs: dict[str, Path], planned: dict[str, Any], systems: dict[str, Any],
            table: dict[str, dict[str, Any]], steps: int, n: int) -> dict[str, Any]:
    """Every claim measured, its section of the lineage page written; returns what each found."""
    claims = Claims(study, runs, planned, systems, steps, n)
    found = {"gflops": claims.gflops(), "blocks": claims.blocks(), "steps_vs_size": claims.steps_vs_size(),
             "dydit": claims.dydit(table)}
    for name, result in found.items():
        lines = [f"### {TITLES[name]}", "", f"Machine: {machine_description()}. "
                 + (f"Every DiT trained {steps} steps (batch {claims.batch}) on the lineage's "
                    f"autoencoder latents; {n} samples each (the subgroups in turn, DDIM 50, guidance 3 unless the "
                    "row says otherwise)." if name != "dydit" else "The lineage table's DiT and DyDiT."), "",
                 f"**{result['said']}**", ""]
        if name in PICTURES:
            lines += [f"![{TITLES[name]}](images/{PICTURES[name]})", ""]
        write_section(f"lineage-{name}", "\n".join(lines) + "\n" + markdown_table(result["rows"]), study.docs)
    (study.root / "claims" / "found.json").write_text(json.dumps(found, indent=2, default=str) + "\n")
    return found
