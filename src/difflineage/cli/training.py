"""``difflineage quickstart`` (a system's recipes trained stage by stage, then sampled and scored) and
``difflineage train`` (one config, resumable, under torchrun as DistributedDataParallel)."""

from __future__ import annotations

import shlex
from pathlib import Path

from difflineage.cli.common import format_metrics, heldout, is_main_process

from difflineage.train.recipes import DEFAULT_SYSTEM, QUICKSTART_RECIPES


def add_parsers(sub) -> None:
    q = sub.add_parser("quickstart", help="train the default recipe of a system on mnist5k, then sample and score it",
                       description="Train a system's ready-made recipe on the embedded mnist5k digits (text-to-image: "
                                   "on OpenMoji's captioned emoji), write a sample grid, pictures and held-out metrics, "
                                   "and print where they are. Re-running resumes an interrupted quickstart.")
    q.add_argument("--system", default=DEFAULT_SYSTEM, choices=list(QUICKSTART_RECIPES),
                   help=f"which system (default: {DEFAULT_SYSTEM}, the flagship)")
    q.add_argument("--out", type=Path, default=None, help="run directory (default: runs/quickstart-SYSTEM)")
    q.add_argument("--data", default=None, metavar="SOURCE",
                   help="train on this data instead of the digits, e.g. folder:PATH (each stage's recipe fitted to it: "
                        "size, channels, classes or captions)")
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
    t.add_argument("config", nargs="?", metavar="CONFIG|SYSTEM",
                   help="YAML file or recipe name (e.g. vae-mnist), or a system (" + ", ".join(QUICKSTART_RECIPES)
                        + "): its stages in order, as the quickstart trains them; optional with --resume")
    t.add_argument("--data", default=None, metavar="SOURCE",
                   help="train on this data, e.g. folder:PATH: the recipe fitted to it (size, channels, classes or "
                        "captions, the settings that depend on the image size), each change printed")
    t.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. model.latent_dim=2 train.steps=2000")
    t.add_argument("--model", default=None, metavar="DIT-NAME",
                   help="a DiT size by the paper's name, as the official scripts take it (DiT-XL/2, DiT-B/4, ...): "
                        "model.dit.name for a DiT or DyDiT recipe")
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
    from difflineage.config import resolve_config_path
    from difflineage.errors import ConfigError
    from difflineage.systems import load_config
    from difflineage.train import Trainer
    from difflineage.train.recipes import fit_recipe

    if args.config is None and not args.resume:
        raise SystemExit("difflineage train: give CONFIG (a YAML file or recipe name) or a SYSTEM, or --resume")
    if args.model is not None:
        args.overrides = [*args.overrides, f"model.dit.name={args.model}"]
    if args.config in QUICKSTART_RECIPES and not Path(args.config).is_file():  # a system: its stages in order
        result = _train_stages(args, args.out or Path("runs") / _run_name(args.config, args.data), args.config,
                               ["difflineage", "train", args.config])
        if result.status == "finished":
            print(f"{result.status} at step {result.step}: checkpoint {result.checkpoint}"
                  + (f", samples {result.samples}" if result.samples else ""))
        return 0 if result.status == "finished" else 130
    if args.data is not None and args.resume:
        raise SystemExit("difflineage train: --data fits a recipe to new data; a resumed run goes on with the data it "
                         "was fitted to (leave --data out)")
    if args.data is not None:
        resolve_config_path(args.config)  # an unknown recipe is named before any data is read
        fitted = fit_recipe(args.config, args.data, args.overrides)
        for line in fitted.notes:
            print(f"fitted {Path(args.config).stem}: {line}")
        config = fitted.config
    else:
        try:
            config = load_config(args.config, args.overrides) if args.config else None
        except ConfigError as exc:
            if args.config and not Path(args.config).is_file() and "no recipe of that name" in str(exc):
                raise ConfigError(f"{exc}; or a system: {', '.join(QUICKSTART_RECIPES)}") from None
            raise
    run_dir = args.out
    if run_dir is None:
        if args.config is None:
            raise SystemExit("difflineage train --resume without CONFIG needs --out RUN_DIR (or --resume CKPT with --out)")
        run_dir = Path("runs") / _run_name(Path(args.config).stem, args.data)
    resume = args.resume
    if config is None and args.overrides:  # continue with changed settings: the checkpoint's config, overridden
        config = load_config(resolve_checkpoint(run_dir if resume is True else resume) / "config.yaml", args.overrides)
    result = Trainer(config, run_dir, resume=resume, stop_at=args.stop_at, progress=not args.no_progress,
                     overwrite=args.overwrite).fit()
    if is_main_process():
        line = f"{result.status} at step {result.step}: checkpoint {result.checkpoint}"
        print(line + (f", samples {result.samples}" if result.samples else ""))
    return 0 if result.status != "interrupted" else 130


def _run_name(name: str, data: str | None) -> str:
    """runs/NAME, or runs/NAME-FOLDER for a recipe trained on a folder (or other source) of the user's."""
    if data is None:
        return name
    return f"{name}-{Path(data.split(':', 1)[-1]).expanduser().resolve().name or 'data'}"


def _train_stages(args, run_dir: Path, system: str, command: list[str]):
    """``system``'s stages trained in order into ``run_dir`` (an existing run resumes), fitted to ``args.data``;
    ``command`` is how the user started it (printed, with the options, as the way to resume)."""
    from difflineage.storage import remove_tree
    from difflineage.train.recipes import train_stages

    if getattr(args, "overwrite", False) and run_dir.exists():
        remove_tree(run_dir)
    again = " ".join([*command, *(["--data", shlex.quote(args.data)] if args.data else []),
                      *(["--out", shlex.quote(str(args.out))] if args.out else []),
                      *(["--set", *map(shlex.quote, args.overrides)] if args.overrides else [])])
    return train_stages(system, run_dir, data=args.data, overrides=args.overrides, progress=not args.no_progress,
                        resume_command=again)


def cmd_quickstart(args) -> int:
    from difflineage.eval import evaluate_system
    from difflineage.eval.features import data_instrument
    from difflineage.systems import load

    run_dir = args.out or Path("runs") / (f"quickstart-{args.system}" if args.data is None
                                          else _run_name(args.system, args.data))
    result = _train_stages(args, run_dir, args.system, ["difflineage", "quickstart", "--system", args.system])
    if result.status != "finished":
        return 130
    system = load(result.checkpoint)
    pictures = system.pictures(heldout(system), run_dir)
    n = args.eval_n
    if (system.config.data.channels or 1) != 1 and data_instrument(system.config.data.source) is None:
        # colour images are scored on InceptionV3, whose weights are the user's (OpenMoji has its own, shipped)
        print(f"sample scores of colour images need InceptionV3's weights (a file of yours): difflineage evaluate "
              f"{run_dir} --inception-weights FILE; here, the held-out scores only")
        n = 0
    metrics = evaluate_system(system, n=n, k=args.eval_k, bpd_images=20, progress=not args.no_progress,
                              out=run_dir / "metrics.json", checkpoint=result.checkpoint)
    print(f"\nquickstart ({args.system}) finished: {result.step} steps in {run_dir}/")
    lines = {"samples": result.samples, **pictures, "loss curve": run_dir / "loss.png",
             "metrics": run_dir / "metrics.json", "checkpoint": result.checkpoint}
    width = max(len(name) for name in lines) + 2
    for name, path in lines.items():
        print(f"  {name + ':':<{width}}{path}")
    print(format_metrics(metrics))
    return 0
