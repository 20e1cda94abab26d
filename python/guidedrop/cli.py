"""Command line of ``python -m guidedrop``: demo, bench and show.

Errors a user can fix (unknown names, unavailable backends) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys


class UsageError(Exception):
    """A bad command line: printed as one line, exit status 2."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guidedrop",
                                     description="guided structured dropout: demo, bench, show")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small ResNet on digits with each layer")
    demo.add_argument("--quick", action="store_true", help="a few steps per layer (CI)")
    demo.add_argument("--epochs", type=int, default=None)
    demo.add_argument("--layers", default="all", help="comma-separated, 'none' = no layer")
    demo.add_argument("--device", default=None, help="default: cuda when present")
    demo.add_argument("--seed", type=int, default=0)

    from . import bench, show
    bench.add_parser(sub)
    show.add_parser(sub)

    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run
            run(args)
        elif args.command == "bench":
            bench.run(args)
        elif args.command == "show":
            show.run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except bench.MismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

