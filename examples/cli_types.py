"""Argument types shared by the example scripts' command lines: each parses one option's text and
raises ``argparse.ArgumentTypeError`` naming the value, to which argparse adds the option's name
(a usage error, exit status 2). The scripts import this module from their own folder, which is on
``sys.path`` when a script runs as ``python examples/NAME.py``."""

from __future__ import annotations

import argparse
import math


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
