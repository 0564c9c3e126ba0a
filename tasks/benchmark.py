"""Benchmarks: ``python -m tasks.benchmark [SECTION ...] [--quick] [--threads N]``.

Every number printed is a ratio measured side by side in one run (interleaved repeats, medians).
Sections are the modules of :mod:`tasks.benchmarks`; with none given, all run.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil

import torch

import tasks.benchmarks as _sections


def available_sections() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(_sections.__path__) if m.name != "common")


def main(argv: list[str] | None = None) -> None:
    sections = available_sections()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", help=f"which to run (default: all): {', '.join(sections)}")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in sections]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; available: {sections}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.sections or sections:
        importlib.import_module(f"tasks.benchmarks.{name}").run(quick=args.quick)


if __name__ == "__main__":
    main()
