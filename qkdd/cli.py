"""The ``qkdd`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qkdd import __version__
from qkdd.stages.cascade import VARIANTS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkdd", description="Quantum key distribution daemons and tools.")
    parser.add_argument("--version", action="version", version=f"qkdd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="run the benchmarks (Cascade, privacy amplification)")
    bench.add_argument("--quick", action="store_true", help="a subset that runs in under a minute")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    bench.add_argument(
        "--variant", action="append", choices=VARIANTS, help="Cascade variant(s) to run (default: all)"
    )
    bench.add_argument(
        "--frames", type=int, help="frames per (variant, QBER, size) cell, overriding defaults"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from qkdd import bench  # noqa: PLC0415 - keep `qkdd --help` fast

        if args.frames is not None and args.frames < 1:
            print("qkdd bench: --frames must be at least 1", file=sys.stderr)
            return 2
        variants = args.variant or (["optimized", "original"] if args.quick else list(VARIANTS))
        return bench.main(args.quick, args.json, variants, args.frames)
    return 2


if __name__ == "__main__":
    sys.exit(main())
