"""Running a user's module without changing it: its train/eval flags, its buffers, version counters.

Functions that only evaluate a model (anomaly scores, reconstruction diagnostics, inverting a
network) and the memory-free backward, which runs blocks a second time, use these so that the
model the user holds is left as it was.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable

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


def submodules(module: nn.Module) -> list[nn.Module]:
    """``module`` and its submodules, each once, in the order of ``module.modules()``, read from the
    modules' own tables (``modules()`` builds names that the per-step paths do not need)."""
    found = [module]
    if module._modules:
        _add_children(module._modules, found, {id(module)})
    return found


def _add_children(children: dict, found: list[nn.Module], seen: set[int]) -> None:
    for child in children.values():
        if child is not None and id(child) not in seen:
            seen.add(id(child))
            found.append(child)
            if child._modules:
                _add_children(child._modules, found, seen)


def trainable(modules: list[nn.Module]) -> list[torch.Tensor]:
    """The parameters of ``modules`` that require grad, each once, in the order of ``parameters()``."""
    found = {}
    for m in modules:
        for p in m._parameters.values():
            if p is not None and p.requires_grad:
                found.setdefault(id(p), p)
    return list(found.values())


@contextlib.contextmanager
def scratch_buffers(module: nn.Module, modules: list[nn.Module] | None = None):
    """Replace every buffer of ``module`` (and its submodules) by a copy for the block, then put the
    originals back untouched: what runs inside may write buffers (BatchNorm running statistics,
    spectral-norm vectors) without changing the module's state or its buffers' version counters.
    A buffer registered in several submodules gets one shared copy. Modules whose class sets
    ``buffers_read_only = True`` keep theirs, and with them whatever they cache from their
    buffers: their buffers are not written by a rebuild (fixed permutations and signs; ActNorm's
    initialization flag, which only a forward's data-dependent initialization sets). ``modules``:
    :func:`submodules` of ``module`` when the caller has them already."""
    copies: dict[int, torch.Tensor] = {}
    swapped = []
    for m in submodules(module) if modules is None else modules:
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


class RngState:
    """The RNG state now, of the CPU generator and of ``x``'s CUDA device when ``x`` is on one, to
    replay later as torch.utils.checkpoint does (so dropout draws the same mask)."""

    __slots__ = ("cpu", "cuda")

    def __init__(self, x: torch.Tensor):
        self.cpu = torch.get_rng_state()
        self.cuda = (x.device, torch.cuda.get_rng_state(x.device)) if x.is_cuda else None

    def devices(self) -> list:
        return [self.cuda[0]] if self.cuda is not None else []

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda[1], self.cuda[0])

    def advanced(self) -> bool:
        """Whether random numbers were drawn since this state was taken (the state differs now)."""
        if not torch.equal(self.cpu, torch.get_rng_state()):
            return True
        return self.cuda is not None and not torch.equal(self.cuda[1], torch.cuda.get_rng_state(self.cuda[0]))


class _RngTape(threading.local):
    """The RNG states of one block's subnet calls: recorded during a memory-free forward, replayed
    during its rebuild (:func:`recording_rng`, :func:`replaying_rng`)."""

    record: tuple[list, Callable[[], object]] | None = None
    replay: list | None = None


_TAPE = _RngTape()


class recording_rng:  # noqa: N801 - used as a context manager, like contextlib's
    """Within the block, each :func:`rng_mark` appends ``capture()`` (an object with ``restore()``)
    to ``states``. The memory-free chain records a block's forward this way, ``states[0]`` being
    the state before the block; it enters one for a run of blocks and moves it to each block's
    list with :meth:`into`. (A class, not a generator: entered once per run or per block.)"""

    __slots__ = ("_record", "_saved")

    def __init__(self, states: list | None, capture: Callable[[], object]):
        self._record = [states, capture]

    def into(self, states: list) -> None:
        """The marks from now on append to ``states``."""
        self._record[0] = states

    def __enter__(self):
        self._saved = _TAPE.record
        _TAPE.record = self._record
        return self

    def __exit__(self, *exc):
        _TAPE.record = self._saved


class replaying_rng:  # noqa: N801 - used as a context manager, like contextlib's
    """Within the block, :func:`rng_rewind` restores the states recorded by :func:`recording_rng`;
    entered once for a run of blocks, :meth:`into` moves it to another block's states."""

    __slots__ = ("_states", "_saved")

    def __init__(self, states: list | None):
        self._states = states

    def into(self, states: list | None) -> None:
        """The rewinds from now on restore ``states`` (while entered)."""
        _TAPE.replay = states

    def __enter__(self):
        self._saved = _TAPE.replay
        _TAPE.replay = self._states
        return self

    def __exit__(self, *exc):
        _TAPE.replay = self._saved


def rng_mark() -> None:
    """Called by a block in its forward before each subnet call after the first: while a memory-free
    forward records, the RNG state there is kept, so that a rebuild running the subnets in another
    order (a two-sided block rebuilds ``g`` before ``f``) draws each call's own random numbers."""
    record = _TAPE.record
    if record is not None:
        record[0].append(record[1]())


def rng_rewind(call: int) -> None:
    """Called by a block in its rebuild before running the subnet that was call ``call`` of its
    forward (0: the first): restores the RNG state the forward had there, while a rebuild replays."""
    replay = _TAPE.replay
    if replay is not None and call < len(replay):
        replay[call].restore()


@contextlib.contextmanager
def training_flags(flags: list[tuple[nn.Module, bool]]):
    """Set each module's ``training`` to the recorded flag, then restore the flags that changed.
    Set, not flipped: a module shared by several blocks is listed once per block. Only the flags
    that differ are written (``nn.Module.__setattr__`` costs about 1 µs)."""
    changed = []
    for m, flag in flags:
        if m.training != flag:
            changed.append((m, m.training))
            m.training = flag
    try:
        yield
    finally:
        for m, flag in reversed(changed):
            m.training = flag
