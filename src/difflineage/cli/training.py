"""``difflineage quickstart`` (a system's recipes trained stage by stage, then sampled and scored) and
``difflineage train`` (one config, resumable, under torchrun as DistributedDataParallel)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from difflineage.cli.common import format_metrics, heldout, is_main_process

# Each system's quickstart: its stages in order, as (recipe, run sub-directory or "" for the run itself,
# overrides of that stage). An override may name an earlier stage's checkpoint as {SUB-DIRECTORY}.
# The first entry is the default system (the flagship).
QUICKSTART_RECIPES = {
    "dit": [("autoencoder-mnist", "autoencoder", ["train.steps=800"]),
            ("dit-mnist", "", ["model.first_stage={autoencoder}"])],
    "vae": [("vae-mnist", "", [])],
    "ddpm": [("ddpm-mnist", "", [])],
    "ldm": [("autoencoder-mnist", "autoencoder", []), ("ldm-mnist", "", ["model.first_stage={autoencoder}"])],
    "vqvae": [("vqvae-mnist", "autoencoder", []), ("vqvae-prior-mnist", "", ["model.first_stage={autoencoder}"])],
    "vqvae2": [("vqvae2-mnist", "autoencoder", []), ("vqvae2-prior-mnist", "", ["model.first_stage={autoencoder}"])],
    "dalle": [("dalle-dvae-mnist", "dvae", []), ("dalle-clip-mnist", "clip", []),
              ("dalle-mnist", "", ["model.first_stage={dvae}", "model.clip_stage={clip}"])],
}
DEFAULT_SYSTEM = next(iter(QUICKSTART_RECIPES))


def add_parsers(sub) -> None:
    q = sub.add_parser("quickstart", help="train the default recipe of a system on mnist5k, then sample and score it",
                       description="Train a system's ready-made recipe on the embedded mnist5k digits, write a sample "
                                   "grid, pictures and held-out metrics, and print where they are. Re-running resumes "
                                   "an interrupted quickstart.")
    q.add_argument("--system", default=DEFAULT_SYSTEM, choices=list(QUICKSTART_RECIPES),
                   help=f"which system (default: {DEFAULT_SYSTEM}, the flagship)")
    q.add_argument("--out", type=Path, default=None, help="run directory (default: runs/quickstart-SYSTEM)")
    q.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override recipe values of the final stage, e.g. train.steps=500, of a named "
                        "earlier stage, e.g. autoencoder-mnist:train.steps=400, or of every stage, e.g. "
                        "'*:train.bf16=false'")
    q.add_argument("--eval-k", type=int, default=200, help="importance samples per image for the held-out NLL (default 200)")
    q.add_argument("--eval-n", type=int, default=500, help="samples scored with FID/KID/IS/precision/recall (default 500)")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quickstart)

    t = sub.add_parser("train", help="train from a config file or recipe name",
                       description="Train from a YAML config (or a recipe name from configs/). Runs under torchrun "
                                   "as DistributedDataParallel: torchrun --nproc_per_node N -m difflineage train CONFIG.")
    t.add_argument("config", nargs="?", help="YAML file or recipe name (e.g. vae-mnist); optional with --resume")
    t.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. model.latent_dim=2 train.steps=2000")
    t.add_argument("--out", type=Path, default=None, help="run directory (default: runs/CONFIG-NAME)")
    t.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                   help="continue exactly from the latest checkpoint of --out (or from CKPT)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (without it, or --resume, such a directory is refused)")
    t.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="write a checkpoint and stop at STEP, as an interruption would (for time-sliced jobs)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from difflineage.checkpoint import resolve_checkpoint
    from difflineage.systems import load_config
    from difflineage.train import Trainer

    if args.config is None and not args.resume:
        raise SystemExit("difflineage train: give CONFIG (a YAML file or recipe name), or --resume")
    config = load_config(args.config, args.overrides) if args.config else None
    run_dir = args.out
    if run_dir is None:
        if args.config is None:
            raise SystemExit("difflineage train --resume without CONFIG needs --out RUN_DIR (or --resume CKPT with --out)")
        run_dir = Path("runs") / Path(args.config).stem
    resume = args.resume
    if config is None and args.overrides:  # continue with changed settings: the checkpoint's config, overridden
        config = load_config(resolve_checkpoint(run_dir if resume is True else resume) / "config.yaml", args.overrides)
    result = Trainer(config, run_dir, resume=resume, stop_at=args.stop_at, progress=not args.no_progress,
                     overwrite=args.overwrite).fit()
    if is_main_process():
        line = f"{result.status} at step {result.step}: checkpoint {result.checkpoint}"
        print(line + (f", samples {result.samples}" if result.samples else ""))
    return 0 if result.status != "interrupted" else 130


def cmd_quickstart(args) -> int:
    from difflineage.checkpoint import latest_checkpoint
    from difflineage.eval import evaluate_system
    from difflineage.systems import load, load_config
    from difflineage.train import Trainer
    from difflineage.train.rundir import holds_run

    run_dir = args.out or Path("runs") / f"quickstart-{args.system}"
    again = " ".join(["difflineage quickstart --system", args.system, *(["--out", shlex.quote(str(args.out))] if args.out else []),
                      *(["--set", *map(shlex.quote, args.overrides)] if args.overrides else [])])
    earlier: dict[str, str] = {}  # sub-directory -> checkpoint of the stages trained so far
    stages = QUICKSTART_RECIPES[args.system]
    known = {recipe for recipe, _, _ in stages} | {"*"}
    for o in args.overrides:
        if ":" in o.split("=", 1)[0] and o.split(":", 1)[0] not in known:
            print(f"error: --set {o}: {o.split(':', 1)[0]!r} is not a stage of the {args.system} quickstart "
                  f"({', '.join(sorted(known - {'*'}))}, or * for every stage)", file=sys.stderr)
            return 2
    for recipe, sub, stage_overrides in stages:
        # --set KEY=VALUE applies to the final stage, --set RECIPE:KEY=VALUE to that stage
        mine = [o.split(":", 1)[1] for o in args.overrides if o.startswith((recipe + ":", "*:"))]
        plain = [o for o in args.overrides if ":" not in o.split("=", 1)[0]]
        overrides = [o.format(**earlier) for o in stage_overrides] + (plain if not sub else []) + mine
        config = load_config(recipe, overrides)
        stage_dir = run_dir / sub if sub else run_dir
        resume = latest_checkpoint(stage_dir) is not None
        if resume:
            print(f"resuming the quickstart run in {stage_dir}")
        print(f"training {recipe} into {stage_dir}")
        # a stage that stopped before its first checkpoint has nothing to resume: it starts again
        result = Trainer(config, stage_dir, resume=resume or None, progress=not args.no_progress,
                         overwrite=not resume and holds_run(stage_dir), resume_command=again).fit()
        if result.status != "finished":
            return 130
        earlier[sub] = str(result.checkpoint)
    system = load(result.checkpoint)
    pictures = system.pictures(heldout(system), run_dir)
    metrics = evaluate_system(system, n=args.eval_n, k=args.eval_k, bpd_images=20, progress=not args.no_progress,
                              out=run_dir / "metrics.json", checkpoint=result.checkpoint)
    print(f"\nquickstart ({args.system}) finished: {result.step} steps in {run_dir}/")
    lines = {"samples": result.samples, **pictures, "loss curve": run_dir / "loss.png",
             "metrics": run_dir / "metrics.json", "checkpoint": result.checkpoint}
    width = max(len(name) for name in lines) + 2
    for name, path in lines.items():
        print(f"  {name + ':':<{width}}{path}")
    print(format_metrics(metrics))
    return 0
