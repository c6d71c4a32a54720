"""The lineage measured: all eight systems trained on OpenMoji at 32 px, each for the same wall-clock budget on this
machine with its own recipe, scored with the same shipped instrument, in one table; the same captions (or their
subgroups) drawn by every system side by side; quality against sampling time; and the seed's DiT and DyDiT claims
rechecked on this data (lineage_claims.py).

    python benchmarks/lineage.py                       # about 2.5 h on two CPU cores: --budget 7 minutes per system
    python benchmarks/lineage.py --skip-claims         # the table, the picture and the plot only

How the budget is spent:

1. **Measured, not guessed.** Every stage of every recipe trains a few steps first (``--measure-steps``, in
   ``ROOT/_speed/``) and its seconds per step are read from the trainer's logged throughput on this machine.
2. **Each system gets ``--budget`` minutes of training**, its earlier stages included: the CLIP stage (whose text tower
   DDPM, LDM and DALL-E use) and the KL autoencoder (LDM's and DiT's first stage) keep their recipes' steps, are trained
   once and are charged in full to every system that uses them; each system's own stages share what is left, in the
   proportions of their recipes (VQ-VAE: autoencoder and prior; DALL-E: dVAE and transformer). DALL-E's CLIP is not
   charged to it: it only reranks, and the table samples without reranking (the recipe's ``rerank: 1``). DyDiT is its DiT
   fine-tuned at its recipe's steps: its training time is the DiT's plus the fine-tuning, said in the table.
   The plan (steps of every stage, seconds per step, machine) is kept in ``ROOT/plan.json`` and reused, so an
   interrupted run continues with the same steps: a complete stage is reused, a cut one resumed.
3. **Scores**: ``--n`` samples per system (the held-out captions in turn for the caption systems; the subgroups in
   turn for the class-conditional ones), drawn with the recipe's sampler and again on the fast path
   (``sample --fast``: DPM-Solver++ 20 steps, the step cache for DiT/DyDiT, bf16 where native), each scored with the
   shipped instrument against the held-out emoji, every score beside the real images'. Scores are kept as each is
   measured (``ROOT/scores.jsonl``).

Writes docs/lineage.md (its generated sections), benchmarks/results/lineage.json, docs/images/lineage_grid.png,
docs/images/lineage_quality_time.png, and the README's results opening (its ``bench:lineage-readme`` section).
``--toy`` runs the whole thing with tiny networks in seconds (the test).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lineage_claims
import torch
from harness import (REPO, RESULTS, SAMPLER_NAMES, KeptRows, markdown_table, record, train_seconds,
                     trained_run, write_section)

import difflineage
from difflineage.data import load_dataset
from difflineage.eval import evaluate_system
from difflineage.eval.sampling import fast_sampling, recorded_options, to_unit
from difflineage.images import save_captioned_panels
from difflineage.machine import machine_description
from difflineage.systems import load_config

LINEAGE_MD = REPO / "docs" / "lineage.md"
IMAGES = REPO / "docs" / "images"
README = REPO / "README.md"


@dataclass(frozen=True)
class Stage:
    """One training stage: its recipe, the earlier stages it reads (config key -> stage), and whether the budget
    sets its steps (False: its recipe's steps, a shared part or a fine-tuning)."""

    recipe: str
    reads: dict[str, str] = field(default_factory=dict)
    scaled: bool = True


STAGES = {
    "vae": Stage("vae-openmoji"),
    "vqvae": Stage("vqvae-openmoji"),
    "vqvae-prior": Stage("vqvae-prior-openmoji", {"model.first_stage": "vqvae"}),
    "vqvae2": Stage("vqvae2-openmoji"),
    "vqvae2-prior": Stage("vqvae2-prior-openmoji", {"model.first_stage": "vqvae2"}),
    "clip": Stage("dalle-clip-openmoji", scaled=False),
    "dvae": Stage("dalle-dvae-openmoji"),
    "dalle": Stage("dalle-openmoji", {"model.first_stage": "dvae", "model.clip_stage": "clip"}),
    "ddpm": Stage("ddpm-openmoji", {"model.text_encoder": "clip"}),
    "autoencoder": Stage("autoencoder-openmoji", scaled=False),
    "ldm": Stage("ldm-openmoji", {"model.first_stage": "autoencoder", "model.text_encoder": "clip"}),
    "dit": Stage("dit-class-openmoji", {"model.first_stage": "autoencoder"}),
    "dydit": Stage("dydit-openmoji", {"model.base": "dit"}, scaled=False),
}


@dataclass(frozen=True)
class System:
    name: str
    page: str  # its page under docs/
    stages: tuple[str, ...]  # in training order; the last one is sampled
    what: str


SYSTEMS = (
    System("VAE", "vae.md", ("vae",), "conv VAE, 64-d latent, discretized Gaussian pixels"),
    System("VQ-VAE", "vqvae.md", ("vqvae", "vqvae-prior"), "VQ codes (8x8), PixelCNN prior over subgroups"),
    System("VQ-VAE-2", "vqvae.md", ("vqvae2", "vqvae2-prior"), "two code levels, PixelCNN priors over subgroups"),
    # DALL-E's CLIP stage reranks its samples; the table samples it without reranking (its recipe's rerank 1), so the
    # CLIP is not charged to its budget (it is the CLIP stage that DDPM and LDM pay for)
    System("DALL-E", "dalle.md", ("dvae", "dalle"), "dVAE tokens, transformer over BPE caption + image"),
    System("DDPM", "ddpm.md", ("clip", "ddpm"), "pixel UNet, cross-attention to the frozen CLIP text"),
    System("LDM", "ldm.md", ("clip", "autoencoder", "ldm"), "latent UNet, cross-attention to the frozen CLIP text"),
    System("DiT", "dit.md", ("autoencoder", "dit"), "latent DiT (6 x 256, patch 2), adaLN-Zero, subgroups"),
    System("DyDiT", "dydit.md", ("autoencoder", "dit", "dydit"), "the DiT fine-tuned to half its FLOPs"),
)

# --toy: every recipe at a tiny width, a couple of sampling steps (the test runs the whole benchmark in seconds)
TOY = {
    "vae-openmoji": ["model.channels=[8,8]", "model.hidden=16", "model.latent_dim=4"],
    "vqvae-openmoji": ["model.vq.channels=8", "model.vq.res_blocks=1", "model.vq.codes=8", "model.vq.code_dim=4"],
    "vqvae2-openmoji": ["model.vq.channels=8", "model.vq.res_blocks=1", "model.vq.codes=8", "model.vq.code_dim=4"],
    "vqvae-prior-openmoji": ["model.prior.channels=8", "model.prior.layers=1"],
    "vqvae2-prior-openmoji": ["model.prior.channels=8", "model.prior.layers=1"],
    "dalle-clip-openmoji": ["model.clip.embed=8", "model.clip.channels=8", "model.clip.text.width=8",
                            "model.clip.text.depth=1", "model.clip.text.heads=2"],
    "dalle-dvae-openmoji": ["model.dvae.channels=8", "model.dvae.res_blocks=1", "model.dvae.codes=8",
                            "model.dvae.code_dim=4"],
    "dalle-openmoji": ["model.transformer.width=16", "model.transformer.depth=1", "model.transformer.heads=2",
                       "model.transformer.text_vocab=300"],
    "ddpm-openmoji": ["model.unet.channels=8", "model.unet.channel_mult=[1,1,1]", "model.unet.heads=2",
                      "model.unet.norm_groups=4", "model.diffusion.sample_steps=2", "model.diffusion.timesteps=50"],
    "autoencoder-openmoji": ["model.channels=[8,8,8]", "model.norm_groups=4"],
    "ldm-openmoji": ["model.unet.channels=8", "model.unet.channel_mult=[1,1]", "model.unet.heads=2",
                     "model.unet.norm_groups=4", "model.diffusion.sample_steps=2", "model.diffusion.timesteps=50"],
    "dit-class-openmoji": ["model.dit.depth=1", "model.dit.hidden=16", "model.dit.heads=2",
                           "model.diffusion.sample_steps=2", "model.diffusion.timesteps=50"],
    "dydit-openmoji": ["model.diffusion.sample_steps=2", "model.router_warmup=1"],
}
TOY_TRAIN = ["train.steps=4", "train.batch_size=8", "train.warmup_steps=0", "train.sample_every=0", "train.sample_n=2"]


@dataclass
class Lineage:
    """Where the study lives and how big it is."""

    root: Path
    budget_s: float
    measure_steps: int = 30
    n: int = 690
    toy: bool = False
    docs: Path = LINEAGE_MD
    results: Path = RESULTS
    images: Path = IMAGES

    def overrides(self, key: str, under: Path | None = None) -> list[str]:
        """A stage's overrides: the earlier stages it reads (runs under ``under``, default the root), and the toy
        sizes under --toy."""
        stage = STAGES[key]
        reads = [f"{k}={(under or self.root) / v}" for k, v in stage.reads.items()]
        return reads + ((TOY.get(stage.recipe, []) + TOY_TRAIN) if self.toy else [])

    def recipe_steps(self, key: str) -> int:
        return load_config(STAGES[key].recipe, self.overrides(key)).train.steps


def stage_order() -> list[str]:
    """Every stage once, each after the stages it reads."""
    order: list[str] = []

    def add(key: str) -> None:
        for earlier in STAGES[key].reads.values():
            add(earlier)
        if key not in order:
            order.append(key)

    for s in SYSTEMS:
        for key in s.stages:
            add(key)
    return order


def seconds_per_step(run: Path, batch: int) -> float:
    """A run's seconds per step from the trainer's logged throughput (its first logged row, which holds the
    warm-up, left out where there are others)."""
    rates = [json.loads(line)["images_per_s"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "images_per_s" in line]
    if not rates:
        raise SystemExit(f"{run}: no logged throughput to measure the step time from; delete it and run again")
    return batch / statistics.median(rates[1:] or rates)


def measure(study: Lineage) -> dict[str, float]:
    """Seconds per training step of every stage on this machine: each trains ``measure_steps`` steps in
    ROOT/_speed/ (each later stage on the measured runs of the stages it reads)."""
    speed, under = {}, study.root / "_speed"
    every = max(1, study.measure_steps // 3)
    for key in stage_order():
        print(f"measuring {key}: {study.measure_steps} steps", file=sys.stderr)
        extra = [f"train.log_every={every}", "train.sample_every=0", f"train.checkpoint_every={study.measure_steps}"]
        run = trained_run(STAGES[key].recipe, study.overrides(key, under) + extra, under / key, study.measure_steps)
        batch = load_config(run / "config.yaml").train.batch_size
        speed[key] = seconds_per_step(run, batch)
    return speed


def plan(study: Lineage) -> dict[str, Any]:
    """The steps of every stage for the budget (kept in ROOT/plan.json and reused under the same budget): shared and
    fine-tuning stages at their recipe's steps, charged to every system that uses them; each system's own stages
    scaled together to fill what is left of its budget."""
    path = study.root / "plan.json"
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("budget_s") == study.budget_s and kept.get("toy") == study.toy:
            return kept
        print(f"{path} was planned for another budget: planning again", file=sys.stderr)
    speed = measure(study)
    steps: dict[str, int] = {}
    for s in SYSTEMS:
        new = [k for k in s.stages if k not in steps and STAGES[k].scaled]
        for k in s.stages:
            if k not in steps and k not in new:
                steps[k] = study.recipe_steps(k)
        charged = sum(steps[k] * speed[k] for k in s.stages if k not in new)
        left = study.budget_s - charged
        if new and left <= 0:
            raise SystemExit(f"--budget {study.budget_s / 60:g} min: {s.name}'s shared stages alone take "
                             f"{charged / 60:.1f} min here; give a larger budget")
        own = sum(study.recipe_steps(k) * speed[k] for k in new)
        for k in new:
            steps[k] = max(2, round(study.recipe_steps(k) * left / own))
    kept = {"budget_s": study.budget_s, "toy": study.toy, "machine": machine_description(),
            "seconds_per_step": {k: round(v, 5) for k, v in speed.items()}, "steps": steps}
    study.root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(kept, indent=2) + "\n")
    return kept


def train_all(study: Lineage, planned: dict[str, Any]) -> dict[str, Path]:
    """Every stage trained to its planned steps (a complete run reused, a cut one resumed)."""
    runs = {}
    for key in stage_order():
        stage = STAGES[key]
        print(f"training {key} ({stage.recipe}): {planned['steps'][key]} steps", file=sys.stderr)
        runs[key] = trained_run(stage.recipe, study.overrides(key), study.root / key, planned["steps"][key],
                                same=tuple(stage.reads))
    return runs


def likelihood(m: dict[str, Any]) -> str:
    """The system's own held-out likelihood, with what it is a likelihood of."""
    if "nll_iw_bits_per_dim" in m:
        return f"{m['nll_iw_bits_per_dim']:.3f} bits/dim (pixels, IWAE k={m['iw_samples']})"
    if "bits_per_dim" in m:
        space = "pixels" if m.get("bpd_space") == "pixels" else "latents"
        return f"{m['bits_per_dim']:.3f} bits/dim ({space}, bound, {m['bpd_images']} images)"
    if "prior_nll_bits_per_dim" in m:
        return f"{m['prior_nll_bits_per_dim']:.3f} bits/dim (codes under the prior, per pixel dim)"
    if "prior_nll_bits_per_image_token" in m:
        return f"{m['prior_nll_bits_per_image_token']:.2f} bits/image token (given the caption)"
    return "none"


def short_path(options: dict[str, Any], bf16: bool, said: str) -> str:
    """The fast path's choices in a few words, for the table (the full sentence is kept in the scores)."""
    parts = []
    if "sampler" in options:
        parts.append(f"{SAMPLER_NAMES.get(str(options['sampler']), options['sampler'])} {options['steps']}")
    if options.get("step_cache") is not None:
        parts.append(f"step cache {options['step_cache'].reuse_fraction:.0%}")
    if "compiled blocks" in said:
        parts.append("compiled")
    return ", ".join(parts + ["bf16" if bf16 else "fp32"])


def score(study: Lineage, s: System, system, kept: KeptRows, fast: bool) -> dict[str, Any]:
    """``evaluate`` of one system with its recipe's sampler, or on the fast path; kept as measured."""
    key = f"{s.name}:{'fast' if fast else 'default'}"
    if kept.get(key) is not None:
        return kept.get(key)
    options, bf16, said = ({}, False, "the recipe's sampler, fp32")
    if fast:
        options, bf16, said = fast_sampling(system, {}, seed=0, compile=not study.toy)
    print(f"scoring {s.name} ({said})", file=sys.stderr)
    m = evaluate_system(system, n=study.n, progress=False, sample_options=options, bf16=bf16, bpd_images=0 if fast
                        else (2 if study.toy else 50), k=8 if study.toy else 100, batch_size=250,
                        bpd_steps=5 if study.toy else None)
    m = {k: v for k, v in m.items() if not k.endswith("per_class")}
    m["path"] = short_path(options, bf16, said)
    m["path_said"] = said
    m["sample_options"] = recorded_options(options)
    kept.keep(key, m)
    return m


def row_of(study: Lineage, s: System, system, runs: dict[str, Path], planned: dict, plain: dict, fast: dict):
    trained = sum(p.numel() for p in system.parameters() if p.requires_grad)
    total = sum(p.numel() for p in system.parameters())
    minutes = sum(train_seconds(runs[k]) for k in s.stages) / 60
    per_image = plain["sampling_seconds"] / plain["samples"]
    row = {
        "system": f"[{s.name}]({s.page})", "what": s.what,
        "condition": "caption" if system.caption_conditioned else ("subgroup" if system.num_classes else "none"),
        "parameters (M)": round(total / 1e6, 2), "trained (M)": round(trained / 1e6, 2),
        "training (min)": round(minutes, 1),
        "steps": " + ".join(f"{k} {planned['steps'][k]}" for k in s.stages),
        "sampling (s / image)": float(f"{per_image:.3g}"),
        "fast path (s / image)": float(f"{fast['sampling_seconds'] / fast['samples']:.3g}"),
        "fast path": fast["path"],
        "FID": round(plain["fid"], 1), "FID fast": round(fast["fid"], 1), "FID real": round(plain["fid_real"], 1),
        "precision": round(plain["precision"], 3), "recall": round(plain["recall"], 3),
        "subgroup accuracy": round(plain["class_accuracy"], 3) if "class_accuracy" in plain else None,
        "retrieval top-5": round(plain["retrieval_top5"], 3) if "retrieval_top5" in plain else None,
        "CLIP score": round(plain["clip_score"], 1) if "retrieval_top5" in plain else None,
        "likelihood": likelihood(plain),
    }
    return row


def grid(study: Lineage, systems: dict[str, Any], captions: list[str], per: int = 2) -> Path:
    """The same captions drawn by every caption system, their subgroups by every class system, and unconditional
    samples of the VAE, seed 0, beside the real emoji."""
    data = next(iter(systems.values())).config.data
    train, held = load_dataset(data, "train"), load_dataset(data, "heldout")
    every = {c: (train, i) for i, c in enumerate(train.captions)}
    every.update({c: (held, i) for i, c in enumerate(held.captions)})
    picked = [c for c in captions if c in every]
    labels = torch.tensor([int(every[c][0].labels[every[c][1]]) for c in picked for _ in range(per)])
    names = train.class_names or ()
    panels = {"real (OpenMoji, CC BY-SA 4.0)": torch.stack(
        [to_unit(every[c][0].images[every[c][1]: every[c][1] + 1])[0] for c in picked for _ in range(per)])}
    for name, system in systems.items():
        g = torch.Generator().manual_seed(0)
        condition = ([c for c in picked for _ in range(per)] if system.caption_conditioned
                     else labels if system.num_classes else None)
        with torch.no_grad():
            panels[name] = system.sample(len(labels), condition=condition, generator=g).float().cpu().clamp(-1, 1)
    rows = [f"{c} [{names[int(labels[i * per])]}]" if names else c for i, c in enumerate(picked)]
    return save_captioned_panels(panels, rows, study.images / "lineage_grid.png", per_row=per)


def quality_time_plot(study: Lineage, rows: list[dict[str, Any]]) -> Path:
    """FID and subgroup accuracy against sampling seconds per image: one point per system with its recipe's sampler
    (filled) and on the fast path (open), joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, r in enumerate(rows):
        name = r["system"].split("]")[0].lstrip("[")
        colour = plt.get_cmap("tab10")(i % 10)  # one colour per system in both panels
        for ax, (plain, fast) in zip(axes, (("FID", "FID fast"), ("subgroup accuracy", "subgroup accuracy fast"))):
            if r.get(plain) is None:
                continue
            xs = [r["sampling (s / image)"], r["fast path (s / image)"]]
            ys = [r[plain], r.get(fast, r[plain])]
            ax.plot(xs, ys, "-", alpha=0.5, color=colour)
            ax.plot(xs[0], ys[0], "o", color=colour)
            ax.plot(xs[1], ys[1], "o", mfc="none", color=colour)
            ax.annotate(name, (xs[0], ys[0]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    real = rows[0]["FID real"]
    axes[0].axhline(real, ls=":", color="grey", label=f"real vs real ({real})")
    axes[0].set(xscale="log", xlabel="sampling seconds per image (log)", ylabel="FID (OpenMoji features), lower is better")
    axes[1].set(xscale="log", xlabel="sampling seconds per image (log)", ylabel="subgroup accuracy, higher is better")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"The lineage on OpenMoji: quality against sampling time (filled: recipe's sampler; open: fast path)\n"
                 f"{machine_description()}", fontsize=9)
    fig.tight_layout()
    out = study.images / "lineage_quality_time.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


README_COLUMNS = ("system", "condition", "parameters (M)", "training (min)", "sampling (s / image)",
                  "fast path (s / image)", "FID", "FID fast", "subgroup accuracy", "retrieval top-5")


def readme_summary(rows: list[dict[str, Any]], claims: dict[str, Any] | None, machine: str, budget_min: float,
                   readme: Path) -> Path:
    """The README's results open with the lineage: a short form of the table (each system linked to its page), the
    picture, and the claims' verdicts, written between the README's ``bench:lineage-readme`` markers."""
    short = [{key: (r[key].replace("](", "](docs/") if key == "system" else r[key]) for key in README_COLUMNS}
             for r in rows]
    real = rows[0]["FID real"]
    lines = [f"Every system of the lineage trained for the same {budget_min:g} minutes on one machine ({machine}), "
             "on OpenMoji's captioned colour emoji at 32 px, and scored with one instrument "
             f"(`python benchmarks/lineage.py`; FID of real held-out emoji against the training ones: {real}; "
             "caption retrieval: the drawn image's own caption in the scoring CLIP's top 5 of 100, chance 0.05). "
             "The full table, with training steps, precision and recall, CLIP score and likelihoods, and a plot of "
             "quality against sampling time, is in [docs/lineage.md](docs/lineage.md). Each figure is one training "
             "run and one draw of samples: read FID gaps of a few points as ties.", "",
             markdown_table(short).rstrip(), "",
             "![every system drawing the same captions or their subgroups](docs/images/lineage_grid.png)", ""]
    if claims:
        lines += ["The seed's DiT and DyDiT claims, rechecked on this data ([docs/lineage.md](docs/lineage.md)):", ""]
        lines += [f"- **{lineage_claims.TITLES[k]}**: {v['said']}" for k, v in claims.items()] + [""]
    return write_section("lineage-readme", "\n".join(lines), readme)


GRID_CAPTIONS = ["red heart", "cat face", "rocket", "red apple", "flag: Japan", "woman: dark skin tone"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=REPO / "runs" / "lineage")
    ap.add_argument("--budget", type=float, default=7.0, help="training minutes per system, its stages included")
    ap.add_argument("--measure-steps", type=int, default=30, help="steps each stage trains to measure its speed")
    ap.add_argument("--n", type=int, default=690, help="samples scored per system and sampling path")
    ap.add_argument("--skip-claims", action="store_true", help="the table, picture and plot only")
    ap.add_argument("--claim-steps", type=int, default=1000, help="training steps of every DiT of the claims")
    ap.add_argument("--claim-n", type=int, default=345, help="samples scored per DiT of the claims")
    ap.add_argument("--toy", action="store_true", help="tiny networks, a few steps: the whole study in seconds")
    ap.add_argument("--docs", type=Path, default=LINEAGE_MD, help="the page whose generated sections are written")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--images", type=Path, default=IMAGES)
    ap.add_argument("--readme", type=Path, default=README, help="whose bench:lineage-readme section is written")
    args = ap.parse_args(argv)
    study = Lineage(args.root, args.budget * 60, args.measure_steps, args.n, args.toy, args.docs, args.results,
                    args.images)
    started = time.perf_counter()
    planned = plan(study)
    runs = train_all(study, planned)
    digest = hashlib.sha256(json.dumps(planned["steps"], sort_keys=True).encode()).hexdigest()[:12]
    kept = KeptRows(study.root / "scores.jsonl", {"n": study.n, "plan": digest, "machine": machine_description()})
    rows, systems, table = [], {}, {}
    for s in SYSTEMS:
        system = difflineage.load(runs[s.stages[-1]])
        systems[s.name] = system
        plain, fast = score(study, s, system, kept, fast=False), score(study, s, system, kept, fast=True)
        table[s.name] = plain
        row = row_of(study, s, system, runs, planned, plain, fast)
        if "class_accuracy" in fast:
            row["subgroup accuracy fast"] = round(fast["class_accuracy"], 3)
        rows.append(row)
    grid(study, systems, GRID_CAPTIONS)
    quality_time_plot(study, rows)
    real = next(kept.get(f"{s.name}:default") for s in SYSTEMS if "retrieval_top5_real" in kept.get(f"{s.name}:default"))
    here = machine_description()
    where = ("this machine" if planned["machine"] == here else
             f"{planned['machine']} (where the step times were measured; the samples were drawn and timed here)")
    notes = (f"OpenMoji at 32 px, every system trained for a budget of {args.budget:g} min on {where} "
             f"(shared stages charged in full to each system that uses them; DyDiT: its DiT plus the fine-tuning), "
             f"its own recipe otherwise. {study.n} samples per system and sampling path, scored with the shipped "
             f"instrument against the {real['reference_images']} held-out emoji. Real images under the same "
             f"instrument: FID {rows[0]['FID real']} (training vs held-out), subgroup accuracy "
             f"{real['class_accuracy_real']:.3f}, caption retrieval top-5 {real['retrieval_top5_real']:.3f} (chance "
             f"0.05), CLIP score {real['clip_score_real']:.1f}.")
    command = "python benchmarks/lineage.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = record("lineage", "The lineage on OpenMoji: every system, one budget, one instrument", rows, notes=notes,
                 command=command.strip(), docs=study.docs, results=study.results)
    if not args.skip_claims:
        found = lineage_claims.run_all(study, runs, planned, systems, table, args.claim_steps, args.claim_n)
        payload = json.loads(out.read_text())
        payload["plan"] = planned
        payload["claims"] = {k: {"said": v["said"], "rows": v["rows"]} for k, v in found.items()}
        out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    readme_summary(rows, json.loads(out.read_text()).get("claims"), here, args.budget, args.readme)
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min", file=sys.stderr)


__all__ = ["Lineage", "STAGES", "SYSTEMS"]

if __name__ == "__main__":
    main()
