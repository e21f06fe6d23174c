"""What memory-free backprop saves and what it costs in accuracy.

Memory-free backprop (:class:`~invkernels.nn.InvertibleSequential`) keeps no activations and
rebuilds each block's input from its output; rounding makes the rebuilt inputs drift from the true
ones, more with depth and in low precision. :func:`saved_bytes` measures the memory a training
step keeps, memory-free and stored; :func:`reconstruction_error` measures the drift for a model
and a batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from invkernels import _state
from invkernels.nn.actnorm import check_initialized
from invkernels.nn.protocol import memory_free_capable
from invkernels.nn.sequential import InvertibleSequential


@dataclass
class ReconstructionReport:
    """Relative errors ``||x̂ - x|| / ||x||`` (float64 norms) of rebuilt inputs.

    Attributes:
        total: the model's input rebuilt from its output by its inverse (for an
            :class:`InvertibleSequential`, ``per_block[0]``).
        per_block: for an :class:`InvertibleSequential`, the input of each block rebuilt from the
            model's output by inverting the blocks after it in turn, as memory-free backprop does
            (blocks that store their activations restart the chain from their stored input).
        local: for an :class:`InvertibleSequential`, each block's input rebuilt by that block's
            inverse from its exact output (the error one block adds).

    Every inverse runs with the random numbers of the forward replayed per subnet call, as the
    memory-free backward does: train-mode dropout draws the forward's masks.
    """

    total: float
    per_block: list[float] = field(default_factory=list)
    local: list[float] = field(default_factory=list)


@dataclass
class SavedBytes:
    """Bytes of activations one training forward keeps for backward: distinct storages autograd
    saves (``torch.autograd.graph.saved_tensors_hooks``), the model's parameters and buffers and
    the input excluded.

    Attributes:
        memory_free: with every :class:`InvertibleSequential` of the model memory-free.
        stored: with every one storing its activations (plain autograd).
        current: with the model's own settings (``memory_free="auto"`` decides per chain and input).
    """

    memory_free: int
    stored: int
    current: int

    def __str__(self) -> str:
        def mib(n: int) -> str:
            return f"{n / 2**20:.3f} MiB"

        return (f"saved activations per step: memory-free {mib(self.memory_free)}, stored {mib(self.stored)}, "
                f"as set now {mib(self.current)}")


def saved_bytes(model: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None) -> SavedBytes:
    """The activation bytes a training step of ``model`` on ``x`` keeps, memory-free and stored:
    ``print(invkernels.diagnostics.saved_bytes(model, x))``.

    Runs three forwards with grad (no backward) in the mode the model is in, and leaves the model
    as it was: its chains' ``memory_free`` settings, the random state and what its blocks write to
    buffers are restored; a model whose ActNorm layers are not initialized yet raises ValueError
    (measuring never initializes them). The stored forward needs the memory it measures.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"saved_bytes: x should be a tensor, got {type(x).__name__}")
    check_initialized(model, "saved_bytes")
    kwargs = {} if context is None else {"context": context}
    chains = {m: m.memory_free for m in model.modules() if isinstance(m, InvertibleSequential)}
    owned = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), x)}

    def measure(setting) -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in owned:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        for m, own in chains.items():
            m.memory_free = own if setting is None else setting
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, **kwargs)
        return sum(storages.values())

    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []), _state.scratch_buffers(model):
        try:
            return SavedBytes(memory_free=measure(True), stored=measure(False), current=measure(None))
        finally:
            for m, own in chains.items():
                m.memory_free = own


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    ref = b.detach().double()
    return ((a.detach().double() - ref).norm() / ref.norm().clamp_min(torch.finfo(torch.float64).tiny)).item()


@torch.no_grad()
def _replayed(states: list, inverse):
    """``inverse()`` with the RNG of the forward that recorded ``states`` replayed per subnet call
    (dropout draws the forward's masks, in whatever order the inverse runs the subnets)."""
    states[0].restore()
    with _state.replaying_rng(states):
        return inverse()


def reconstruction_error(model: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None,
                         autocast_dtype: torch.dtype | None = None) -> ReconstructionReport:
    """Measure how exactly ``model`` rebuilds ``x`` from its output.

    Args:
        model: a module with ``forward(x[, context]) -> (y, logdet)`` and ``inverse(y[, context])``;
            an :class:`InvertibleSequential` also gets per-block errors. It runs in the mode it is
            in (in training mode the same RNG draws are replayed for each block, as memory-free
            backprop does for subnets with dropout) and is left as it was: what its blocks write
            to buffers (BatchNorm statistics) is discarded, and a model whose ActNorm layers are
            not initialized yet raises ValueError (measuring never initializes them).
        x: a batch of inputs.
        context: the conditioning input, for models that take one.
        autocast_dtype: run forward and inverse under ``torch.autocast`` with this dtype (for
            example ``torch.bfloat16`` to measure bf16 subnets).

    Returns:
        A :class:`ReconstructionReport`.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"reconstruction_error: x should be a tensor, got {type(x).__name__}")
    if not callable(getattr(model, "inverse", None)):
        raise TypeError(f"reconstruction_error: model ({type(model).__name__}) has no inverse")
    check_initialized(model, "reconstruction_error")
    kwargs = {} if context is None else {"context": context}
    device_type = x.device.type if x.device.type in ("cpu", "cuda") else "cpu"
    amp = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with amp, torch.random.fork_rng(devices=[x.device] if x.is_cuda else []), _state.scratch_buffers(model):
        if not isinstance(model, InvertibleSequential):
            states = [_state.RngState(x)]
            with _state.recording_rng(states, lambda: _state.RngState(x)):
                y, _ = model(x, **kwargs)
            return ReconstructionReport(total=_rel(_replayed(states, lambda: model.inverse(y, **kwargs)), x))
        inputs, states = [], []
        h = x
        for i in range(len(model)):
            inputs.append(h)
            states.append([_state.RngState(x)])
            with _state.recording_rng(states[i], lambda: _state.RngState(x)):
                h, _ = model.forward_block(i, h, context)
        local = []
        for i in range(len(model)):
            states[i][0].restore()
            out, _ = model.forward_block(i, inputs[i], context)
            local.append(_rel(_replayed(states[i], lambda: model.inverse_block(i, out, context)), inputs[i])
                         if memory_free_capable(model[i]) else 0.0)
        per_block = [0.0] * len(model)
        rebuilt = h
        for i in reversed(range(len(model))):
            if memory_free_capable(model[i]):
                rebuilt = _replayed(states[i], lambda: model.inverse_block(i, rebuilt, context))
            else:
                rebuilt = inputs[i]
            per_block[i] = _rel(rebuilt, inputs[i])
        total = per_block[0]
    return ReconstructionReport(total=total, per_block=per_block, local=local)
