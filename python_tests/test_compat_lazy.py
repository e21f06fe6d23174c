"""invkernels.compat's modules import without their libraries, list their classes, and name the
missing library (and how to install it) when a class is used."""

from __future__ import annotations

import importlib
import sys

import pytest

# compat module -> (the library's package, pip's name for it, one of the module's classes)
LIBRARIES = {"freia": ("FrEIA", "FrEIA", "AllInOneBlock"), "nflows": ("nflows", "nflows", "AffineCouplingTransform"),
             "zuko": ("zuko", "zuko", "NICE"), "normflows": ("normflows", "normflows", "GlowBlock")}


@pytest.mark.parametrize("short", sorted(LIBRARIES))
def test_compat_module_imports_without_its_library_and_names_it_on_use(monkeypatch, short):
    package, distribution, cls = LIBRARIES[short]
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, f"invkernels.compat._{short}", raising=False)
    monkeypatch.delitem(sys.modules, f"invkernels.compat.{short}", raising=False)
    monkeypatch.setitem(sys.modules, package, None)
    module = importlib.import_module(f"invkernels.compat.{short}")
    assert dir(module) == sorted(module.__all__) and cls in module.__all__
    with pytest.raises(ImportError, match=rf"{package} is not installed \(pip install --no-deps {distribution}\)"):
        getattr(module, cls)
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        module.Nope  # noqa: B018
