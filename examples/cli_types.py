"""Argument types shared by the example scripts' command lines: each parses one option's text and
raises ``argparse.ArgumentTypeError`` naming the value, to which argparse adds the option's name
(a usage error, exit status 2). The scripts import this module from their own folder, which is on
``sys.path`` when a script runs as ``python examples/NAME.py``."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the error names the value; argparse adds the option)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"should be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"should be a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"should be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"should be an integer >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"should be a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"should be a positive finite number, got {text!r}")
    return value
