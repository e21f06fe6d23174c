"""Running a user's module without changing it: its train/eval flags, its buffers, version counters.

Functions that only evaluate a model (anomaly scores, reconstruction diagnostics, inverting a
network) and the memory-free backward, which runs blocks a second time, use these so that the
model the user holds is left as it was.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module, enabled: bool = True):
    """Put ``module`` and all its submodules in eval mode for the block (with ``enabled``), then
    restore every submodule's own ``training`` flag."""
    if not enabled:
        yield module
        return
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def scratch_buffers(module: nn.Module):
    """Replace every buffer of ``module`` (and its submodules) by a copy for the block, then put the
    originals back untouched: what runs inside may write buffers (BatchNorm running statistics,
    spectral-norm vectors) without changing the module's state or its buffers' version counters.
    A buffer registered in several submodules gets one shared copy. Modules whose class sets
    ``buffers_read_only = True`` keep theirs, and with them whatever they cache from their
    buffers: their buffers are not written by a rebuild (fixed permutations and signs; ActNorm's
    initialization flag, which only a forward's data-dependent initialization sets)."""
    copies: dict[int, torch.Tensor] = {}
    swapped = []
    for m in module.modules():
        if getattr(type(m), "buffers_read_only", False):
            continue
        for name, buf in m._buffers.items():
            if buf is None:
                continue
            if id(buf) not in copies:
                with torch.no_grad():
                    copies[id(buf)] = buf.clone()
            swapped.append((m, name, buf))
            m._buffers[name] = copies[id(buf)]
    try:
        yield module
    finally:
        for m, name, buf in swapped:
            m._buffers[name] = buf


def version(t: torch.Tensor) -> int | None:
    """``t``'s version counter, or None for inference tensors (which have none)."""
    return None if t.is_inference() else t._version
