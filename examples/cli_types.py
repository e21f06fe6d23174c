"""What the example scripts' command lines share: argument types, each parsing one option's text and
raising ``argparse.ArgumentTypeError`` naming the value, to which argparse adds the option's name
(a usage error, exit status 2); and the ``--out`` option with its check. The scripts import this
module from their own folder, which is on ``sys.path`` when a script runs as
``python examples/NAME.py``."""

from __future__ import annotations

import argparse
import math
import os

from invkernels.demo import check_out_dir


def _number(kind: type, what: str, accept):
    """An argparse type: ``kind(text)`` when ``accept(value)``, else an error saying it should be ``what``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"should be {what}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"should be {what}, got {text!r}")
        return value

    return parse


positive_int = _number(int, "a positive integer", lambda v: v >= 1)
non_negative_int = _number(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _number(float, "a positive finite number", lambda v: math.isfinite(v) and v > 0)


def add_out_option(parser: argparse.ArgumentParser, name: str) -> None:
    """``--out``: the output directory, by default ``examples_output/NAME``."""
    parser.add_argument("--out", default=os.path.join("examples_output", name),
                        help=f"output directory (default: examples_output/{name})")


def check_out_option(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str, files) -> None:
    """A usage error naming ``--out`` when ``args.out`` cannot take the script's output ``files``
    (:func:`invkernels.demo.check_out_dir`)."""
    try:
        check_out_dir(f"{name}.py", args.out, files)
    except ValueError as e:
        parser.error(f"argument --out: {e}")
