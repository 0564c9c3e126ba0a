"""What the jobs' command lines share: the run options of the training commands and the error boundary.

Every command keeps its own parser and help text; these helpers add the options whose meaning is the same
everywhere (``--config``, ``--set``, ``--output``, ``--resume`` ...) so they read and behave alike.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping

__all__ = ["add_config_arguments", "add_run_arguments", "flag_overrides", "run_command"]


def add_config_arguments(parser: argparse.ArgumentParser, *, default: str, recipe_dir: str, set_example: str) -> None:
    """``--config`` (a file, or a recipe name in ``recipe_dir``) and the repeatable ``--set KEY=VALUE``."""
    parser.add_argument("--config", default=default,
                        help=f"config file, or recipe name in {recipe_dir} (default: {default})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key, e.g. --set {set_example} (repeatable)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a training run's folder and length: ``--output``, ``--resume``, ``--stop-after-epoch``."""
    parser.add_argument("--output", help="output folder (sets train.output_dir)")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="STATE",
                        help="continue a run: from STATE, or without a value from OUTPUT/last_state.pt")
    parser.add_argument("--stop-after-epoch", type=int, metavar="N",
                        help="stop once N epochs are complete (resume later); the schedule still spans all epochs")


def flag_overrides(args: argparse.Namespace, flags: Mapping[str, str]) -> list[str]:
    """``KEY=VALUE`` overrides from the convenience flags that were given (``flags``: attribute -> config key),
    followed by the explicit ``--set`` ones, so ``--set`` wins."""
    given = [f"{key}={getattr(args, name)}" for name, key in flags.items() if getattr(args, name) is not None]
    return given + list(getattr(args, "set", []))


def run_command(run: Callable[[list[str] | None], object], argv: list[str] | None,
                user_errors: tuple[type[BaseException], ...]) -> None:
    """Console entry point around ``run``: user mistakes end as ``error: ...`` with exit status 1 (no traceback);
    anything else is a bug and keeps its traceback."""
    try:
        run(argv)
    except user_errors as e:
        sys.exit(f"error: {e}")
