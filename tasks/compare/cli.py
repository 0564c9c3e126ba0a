"""``vmamba-compare`` / ``python -m tasks.compare``: compare models side by side on this machine.

Parameters, GMACs (FLOPs / 2, scans counted), throughput and peak memory at several resolutions (each
measured in its own child process, medians of repeats), growth exponents of time and memory against the
token count, and accuracy after training every model with the same recipe and budget on the same data.
Writes CSVs, a Markdown table, PNG plots and an environment record into the output folder.

Examples:
  python -m tasks.compare                                   # configs/compare/classification.yaml
  python -m tasks.compare --config segmentation             # MONAI SwinUNETR / UNETR vs ours, MRI default
  python -m tasks.compare --models vit_tiny_patch16_224,convnext_atto --resolutions 224,384 --no-accuracy
  python -m tasks.compare speed.trials=3 accuracy.overrides.epochs=5 --out runs/compare/mine
"""
from __future__ import annotations

import argparse
import sys

from .config import CompareConfig, describe_config, load_config


def _int_list(text: str) -> str:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or not all(v.isdigit() for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return "[" + ",".join(values) + "]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmamba-compare",
        description=__doc__,
        epilog="Config options (set in the YAML or as KEY=VALUE overrides):\n" + describe_config(CompareConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. speed.repeats=5 accuracy.overrides.epochs=3")
    parser.add_argument("--config", default="classification",
                        help="a YAML file, or the name of one in configs/compare/ (default: classification)")
    parser.add_argument("--out", help="output folder (overrides the config's 'output')")
    parser.add_argument("--models", help="comma-separated model names replacing the config's list (timm names "
                        "for classification; monai / backbones class names for segmentation)")
    parser.add_argument("--resolutions", type=_int_list, help="comma-separated sizes, e.g. 224,384,512,1024")
    parser.add_argument("--no-accuracy", action="store_true", help="skip training (speed and cost only)")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed and memory measurements")
    parser.add_argument("--threads", type=int, help="threads per measurement (speed.threads)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"output={args.out}")
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        overrides.append("models=[" + ",".join("{name: %s}" % n for n in names) + "]")
    if args.resolutions:
        overrides.append(f"speed.resolutions={args.resolutions}")
    if args.no_accuracy:
        overrides.append("accuracy.enabled=false")
    if args.no_speed:
        overrides.append("speed.enabled=false")
    if args.threads is not None:
        overrides.append(f"speed.threads={args.threads}")
    from .runner import run_compare

    try:
        cfg = load_config(args.config, overrides)
        result = run_compare(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"vmamba-compare: error: {err}", file=sys.stderr)
        return 2
    from .report import markdown_tables

    print()
    print(markdown_tables(result))
    print(f"\nwrote {cfg.output}/ (results.md, summary.csv, measurements.csv, plots, environment.json) "
          f"in {result.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
