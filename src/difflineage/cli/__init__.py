"""The ``difflineage`` command: quickstart, train, sample, evaluate, score, reference, extract, convert, info, demo.

Every sub-command explains its options with ``--help``. Errors in the user's input (config,
data, checkpoint) print one message naming the problem and the fix, and exit with status 2;
a diverged run exits with status 1 and leaves its last good checkpoint in place.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from difflineage.cli import sampling, scoring, tools, training


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from difflineage.errors import CheckpointError, ConfigError, DataError, RunDirError, StorageError, TrainingDiverged

    try:
        return args.func(args) or 0
    except (ConfigError, DataError, CheckpointError, RunDirError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped at once by a second interrupt; the last checkpoint written is intact", file=sys.stderr)
        return 130


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("difflineage")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="difflineage", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"difflineage {_version()}")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    for commands in (training, sampling, scoring, tools):
        commands.add_parsers(sub)
    return p
