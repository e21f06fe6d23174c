"""Counting the calls of the functional ops (``invkernels.ops.<name>``) that code under test makes:
which paths of a module run fused."""

from __future__ import annotations

import invkernels.ops


def spy(monkeypatch, names, module=invkernels.ops) -> dict[str, int]:
    """Wrap ``module.<name>`` (``invkernels.ops`` by default) for each of ``names`` (undone by
    ``monkeypatch``); the returned dict counts their calls."""
    calls = {name: 0 for name in names}
    for name in names:
        original = getattr(module, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
    return calls
