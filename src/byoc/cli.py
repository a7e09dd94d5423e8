"""The ``byoc`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from byoc import __version__

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from byoc.trickle.__main__ import run_demo

    return asyncio.run(run_demo())


def _bench(args: argparse.Namespace) -> int:
    if args.which == "pipeline":
        from byoc.bench.pipeline import main as bench_pipeline

        return bench_pipeline(args.rest)
    raise SystemExit(f"unknown benchmark {args.which!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="byoc", description="Production runtime for Livepeer BYOC containers."
    )
    parser.add_argument("--version", action="version", version=f"byoc {__version__}")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="run the loopback demo")
    demo.set_defaults(handler=_demo)
    bench = commands.add_parser("bench", help="run a benchmark (pipeline)", add_help=False)
    bench.add_argument("which", choices=["pipeline"], help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="its options (see byoc bench NAME --help)")
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
