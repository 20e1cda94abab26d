"""Command line of ``python -m guidedrop``: demo, bench and show.

A bad command line (unknown names, numbers out of range, a device that is not here, an
unwritable path) prints one line ``error: ...`` on stderr and exits with status 2, before
any work starts; a backend that disagrees with the reference in ``bench`` exits with 1,
and so does a run whose stdout is closed by its reader (``| head``), quietly.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

import torch

SEED_MAX = 2**32 - 1  # torch.manual_seed takes up to 2**64 - 1; the demo adds run numbers


class UsageError(Exception):
    """A bad command line: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors (unknown options, bad numbers) raised as UsageError:
    one line instead of the usage text."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Any argument that starts with a minus and a digit is a value, not an option (none of
        # ours looks like that): argparse's own pattern takes only plain numbers, so
        # "--budget -1e3" or "--shapes -1x4x8x8" said "expected one argument" instead of what
        # is wrong with the value.
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str):
        raise UsageError(message)


def _number_in(convert, noun: str, lo, hi):
    """An argparse type: ``convert(s)`` (a ``noun``) in [lo, hi]."""

    def parse(s: str):
        try:
            v = convert(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {noun}") from None
        if not lo <= v <= hi:  # false for nan too
            raise argparse.ArgumentTypeError(f"{s} is out of range: give {span}")
        return v

    span = f"{lo:g} to {hi:g}" if convert is float else f"{lo} to {hi}"
    parse.__name__ = noun.split()[-1]  # argparse names the type in its messages
    parse.span = span  # for --help: tests/test_cli.py checks each option's help gives it
    return parse


def int_in(lo: int, hi: int):
    """An argparse type: an integer in [lo, hi]."""
    return _number_in(int, "an integer", lo, hi)


def float_in(lo: float, hi: float):
    """An argparse type: a finite real number in [lo, hi] (float() takes nan and inf)."""
    return _number_in(float, "a number", lo, hi)


def needs(what: str, extra: str) -> UsageError:
    """The error for an optional dependency that is missing: ``what`` needs it, and the
    extra of guidedrop that installs it, as the README installs it (from a clone: a
    ``guidedrop[...]`` requirement would look for the package on an index)."""
    return UsageError(f'{what}: pip install ".[{extra}]" in the guidedrop repository')


def seed_arg(parser, default: int = 0) -> None:
    parser.add_argument("--seed", type=int_in(0, SEED_MAX), default=default,
                        help=f"random seed, 0 to {SEED_MAX} (default {default})")


def threads_arg(parser) -> None:
    parser.add_argument("--threads", type=int_in(1, 4096), default=None,
                        help="torch CPU threads, 1 to 4096 (default: torch's); 1 is "
                             "steadier on a busy machine")


def comma_list(s: str, option: str) -> list[str]:
    """The entries of a comma-separated option, each once, in order; UsageError for an
    empty entry ("a,,b", "a,"), which is a typo rather than a request for nothing."""
    parts = [p.strip() for p in s.split(",")]
    if "" in parts:
        raise UsageError(f"{option} {s!r} has an empty entry")
    return list(dict.fromkeys(parts))


def parse_device(s: str | None) -> torch.device:
    """``s`` ('cpu', 'cuda', 'cuda:1'; None = cuda when present) as a device these layers
    run on, checked by allocating on it; UsageError otherwise."""
    try:
        # `s is None`, not `not s`: an explicit empty --device "" is a bad name, not the default
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if s is None else s)
    except (RuntimeError, ValueError):
        raise UsageError(f"device {s!r} is not a device name; give cpu or cuda[:i]") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {s!r}: guidedrop runs on cpu or cuda, not {device.type}")
    if device.type == "cpu" and device.index not in (None, 0):
        raise UsageError(f"device {s!r}: there is one CPU device, cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"device {s!r} is not available here ({_first_line(e)})") from None
    return device


def console(stderr: bool = False):
    """A rich Console for tables: the terminal's width, or unbounded when the output goes to
    a file or pipe (rich would otherwise assume 80 columns and fold the columns; our tables
    are only as wide as their cells: bench --graph --dry-run's is over 200)."""
    from rich.console import Console
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 10_000)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m guidedrop`` (its errors raise UsageError)."""
    from . import __version__
    parser = _Parser(prog="python -m guidedrop",
                     description="guided structured dropout: demo, bench, show")
    parser.add_argument("--version", action="version",
                        version=f"guidedrop {__version__} (torch {torch.__version__})")
    # not required: main() names the commands when none is given
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,show}")

    from . import bench, demo, show
    demo.add_parser(sub)
    bench.add_parser(sub)
    show.add_parser(sub)
    return parser


def quiet_torch_logs() -> None:
    """torch.compile on a CPU imports torch.utils.cpp_extension, which logs "No CUDA runtime
    is found, using CUDA_HOME=..." where a CUDA toolkit is installed without a GPU: nothing
    the user asked about (bench's compile provider), and not for their screen either."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    from . import bench, demo, dispatch, show

    quiet_torch_logs()
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UsageError("give a command: demo, bench or show (python -m guidedrop "
                             "<command> --help says what each does)")
        try:  # a typo in it fails every command, also bench and show, which pick their own
            dispatch.requested()
        except ValueError as e:
            raise UsageError(str(e)) from None
        if args.command == "demo":
            demo.run(args)
        elif args.command == "bench":
            bench.run(args)
        elif args.command == "show":
            show.run(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
    except BrokenPipeError:
        # The reader of stdout went away (`| head -1`): stop quietly with status 1, as rich
        # does when it prints; stdout to /dev/null, so that the flush at exit cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except bench.MismatchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
