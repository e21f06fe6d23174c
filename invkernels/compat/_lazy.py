"""Lazily built compat classes: a compat submodule names its classes in ``__all__`` and resolves
them, on first use, from its implementation module, which imports the peer library."""

from __future__ import annotations

import collections
import importlib

constructed: collections.Counter = collections.Counter()
"""How many compat objects were built, by ``"<library>.<ClassName>"`` (e.g. ``"freia.AllInOneBlock"``)."""


def count(obj: object, library: str) -> None:
    """Count one more ``obj`` built (called by every compat constructor)."""
    constructed[f"{library}.{type(obj).__name__}"] += 1


def resolver(module_name: str, library: str, distribution: str, names: list[str]):
    """The module ``__getattr__`` and ``__dir__`` of the compat module ``module_name``: the classes in
    ``names`` from ``invkernels.compat._<short name>``, which imports ``library``; ImportError naming
    the library and how to install it when it is missing."""
    short = module_name.rsplit(".", 1)[1]

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        try:
            impl = importlib.import_module(f"invkernels.compat._{short}")
        except ModuleNotFoundError as error:
            if error.name is None or error.name.split(".")[0] != library:
                raise
            raise ImportError(f"{module_name}.{name} subclasses {library}'s classes, and {library} is not "
                              f"installed (pip install --no-deps {distribution})") from error
        return getattr(impl, name)

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__
