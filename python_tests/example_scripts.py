"""The scripts of examples/ as modules, for their tests: the folder is not a package, and its
scripts import their shared command-line types (examples/cli_types.py) from it, as they do when
run as ``python examples/NAME.py``."""

from __future__ import annotations

import importlib.util
import os
import sys

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name: str):
    """The module examples/<name>.py, loaded under the name ``example_<name>``."""
    if EXAMPLES not in sys.path:
        sys.path.append(EXAMPLES)
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
