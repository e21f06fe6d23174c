"""The block protocol of :class:`~invkernels.nn.InvertibleSequential`, written once: what a block
must have to be chained, rebuilt in a memory-free backward, or handed halves; checked where a block
is added to a chain and where its memory-free backward returns. "Writing a block" in
docs/memory.md shows a block of one's own against it.

- every block: :class:`InvertibleBlock` (``forward -> (y, logdet)``, ``inverse``);
- a block with its own memory-free backward on the whole tensor: :class:`FusedInverseBackward`;
- a block on two channel halves, which a chain hands its halves without concatenating:
  :class:`BlockOnHalves` (``split_channels`` and three methods on halves, ``out=`` semantics
  included).

A block without a fused backward is rebuilt generically: its ``inverse``, then its ``forward``
again with grad. A block whose subnets draw random numbers and whose memory-free backward runs
them in another order than its forward marks each further subnet call in its forward with
``invkernels._state.rng_mark()`` and rewinds with ``rng_rewind(k)`` before rerunning call ``k``.
"""

from __future__ import annotations

import inspect
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks

from invkernels._validation import describe

Gradients = list[tuple[torch.Tensor, "torch.Tensor | None"]]


@runtime_checkable
class InvertibleBlock(Protocol):
    """Every block of a chain: ``forward(x[, context]) -> (y, logdet)`` with ``logdet`` of shape
    ``[batch]``, and ``inverse(y[, context]) -> x``. A block whose inverse needs more than its
    output sets ``memory_free_invertible = False`` (it then stores its activations)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class FusedInverseBackward(Protocol):
    """A block with its own memory-free backward (every block of this package has one):
    ``inverse_backward(y, grad_y, grad_logdet[, context]) -> (x, grad_x, grads)`` rebuilds the
    block's input ``x`` from its output ``y`` and back-propagates the gradients of ``(y, logdet)``
    through the block at ``x``; ``grads`` pairs each tensor that requires grad (parameters, the
    context) with its gradient (None for unused ones). ``grad_x`` is the full gradient of ``x``."""

    def inverse_backward(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                         **kwargs) -> tuple[torch.Tensor, torch.Tensor, Gradients]: ...


@runtime_checkable
class BlockOnHalves(Protocol):
    """A block on two channel halves ``x1 = x[:, :C1]``, ``x2 = x[:, C1:]`` (``C1 = split_channels``),
    beside its whole-tensor :class:`InvertibleBlock` methods. A log-det of None is 0.

    ``inverse_backward_split`` rebuilds the input halves from the output halves and back-propagates
    ``(grad_y1, grad_y2, grad_logdet)``: ``(x1, x2, grad_x1, grad_x2, grads)`` with ``grads`` the
    ``(tensor, gradient)`` pairs of its parameters (and context). With ``out`` (two tensors) it
    writes ``grad_x1, grad_x2`` into them and returns them; a block that returns other tensors has
    them copied in by the chain."""

    split_channels: int

    def forward_split(self, x1: torch.Tensor, x2: torch.Tensor, context: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...

    def inverse_split(self, y1: torch.Tensor, y2: torch.Tensor, context: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...

    def inverse_backward_split(self, y1: torch.Tensor, y2: torch.Tensor, grad_y1: torch.Tensor,
                               grad_y2: torch.Tensor, grad_logdet: torch.Tensor, context: torch.Tensor | None = None,
                               out: tuple[torch.Tensor, torch.Tensor] | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Gradients]: ...


def has_fused_inverse_backward(block: nn.Module) -> bool:
    """Whether ``block`` is a :class:`FusedInverseBackward` (checked by attribute: a runtime
    protocol check costs more than the small blocks it would dispatch)."""
    return callable(getattr(block, "inverse_backward", None))


def takes_context(block: nn.Module) -> bool:
    """Whether a chain passes its ``context`` to ``block``: its ``forward`` takes ``context`` and
    the block does not declare ``uses_context = False`` (accepting it only for a uniform API)."""
    if not getattr(block, "uses_context", True):
        return False
    try:
        return "context" in inspect.signature(block.forward).parameters
    except (TypeError, ValueError):
        return False


def _attribute(block: nn.Module, name: str, default):
    """``getattr(block, name, default)``, without the miss of ``nn.Module.__getattr__`` (an
    AttributeError raised and caught, ~1 µs) for the optional attributes the chain reads on every
    block at every step when a block does not have them. A class with a ``__getattr__`` of its
    own (``torch.compile``'s wrapper forwards to the compiled module) is asked as ``getattr`` asks."""
    cls = type(block)
    if (cls.__getattr__ is not nn.Module.__getattr__ or name in block.__dict__ or hasattr(cls, name)
            or name in block._parameters or name in block._buffers or name in block._modules):
        return getattr(block, name, default)
    return default


def memory_free_capable(block: nn.Module) -> bool:
    """Whether ``block`` can be rebuilt from its output: it has an ``inverse`` and does not set
    ``memory_free_invertible = False`` (as :class:`~invkernels.nn.Split` does, whose inverse needs
    the factored-out half)."""
    return callable(getattr(block, "inverse", None)) and _attribute(block, "memory_free_invertible", True)


def split_of(block: nn.Module) -> int | None:
    """The channel split ``C1`` at which ``block`` works on two halves, or None. Such a block has
    ``split_channels = C1`` and ``forward_split(x1, x2[, context]) -> (y1, y2, logdet or None)``,
    ``inverse_split(y1, y2[, context]) -> (x1, x2, logdet or None)`` and
    ``inverse_backward_split(y1, y2, grad_y1, grad_y2, grad_logdet[, context], out=None) ->
    (x1, x2, grad_x1, grad_x2, grads)`` (``out``: two tensors to write the input gradients into),
    with ``x1 = x[:, :C1]`` and ``x2 = x[:, C1:]`` (a log-det of None is 0)."""
    c1 = _attribute(block, "split_channels", None)
    return c1 if isinstance(c1, int) and not isinstance(c1, bool) and callable(getattr(block, "forward_split", None)) \
        else None


def entered_by_call(block: nn.Module) -> bool:
    """Whether calling ``block``'s methods directly would skip what ``nn.Module.__call__`` runs for
    it: its own or global forward / backward hooks (FSDP2's ``fully_shard`` registers its unshard
    as one, ``inversion.invert`` a hook that reads the block's output), or ``block.compile()``."""
    return bool(block._forward_hooks or block._forward_pre_hooks or block._backward_hooks
                or block._backward_pre_hooks or block._compiled_call_impl is not None
                or _module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks
                or _module_hooks._global_backward_hooks or _module_hooks._global_backward_pre_hooks)


def check_block(i: int, block: nn.Module) -> None:
    """TypeError, naming block ``i`` and what it lacks, unless it is an ``nn.Module`` with the
    methods of :class:`InvertibleBlock` and, when it works on halves (``split_channels`` and
    ``forward_split``), those of :class:`BlockOnHalves`."""
    if not isinstance(block, nn.Module):
        raise TypeError(f"InvertibleSequential: block {i} should be an nn.Module, got {type(block).__name__}")
    if split_of(block) is not None:
        missing = [m for m in ("inverse_split", "inverse_backward_split") if not callable(getattr(block, m, None))]
        if missing:
            raise TypeError(f"InvertibleSequential: block {i} ({type(block).__name__}) works on halves "
                            f"(split_channels and forward_split) but has no {' and no '.join(missing)}; "
                            f"a block on halves needs forward_split, inverse_split and "
                            f"inverse_backward_split (docs/memory.md)")


def checked_result(i: int, block: nn.Module, method: str, result, count: int, outputs: tuple[torch.Tensor, ...],
                    same_shape: bool):
    """``result`` of block ``i``'s memory-free backward ``method``: a tuple of ``count`` items, the
    rebuilt inputs (``len(outputs)`` tensors in the dtype of the block's outputs ``outputs``, of
    their shapes too with ``same_shape``: halves at the same split), then their gradients (each of
    its input's shape and dtype), then a list of ``(tensor, gradient)`` pairs. TypeError or
    ValueError naming the block otherwise, so that a third-party block cannot hand the chain
    tensors it would misread. A class of this package that sets ``results_tested = True`` in its own
    body (not inherited: a subclass may override the methods) returns what its tests check, and is
    not checked again here."""
    if type(block).__dict__.get("results_tested", False):
        return result
    n = len(outputs)
    if type(result) is tuple and len(result) == count and isinstance(result[-1], (list, tuple)):
        for k in range(n):
            x, g, y = result[k], result[n + k], outputs[k]
            if not (isinstance(x, torch.Tensor) and isinstance(g, torch.Tensor) and x.dtype == y.dtype
                    and g.dtype == y.dtype and g.shape == x.shape and (not same_shape or x.shape == y.shape)):
                break
        else:
            return result
    where = f"InvertibleSequential: block {i} ({type(block).__name__}).{method}"
    if not (isinstance(result, tuple) and len(result) == count):
        raise TypeError(f"{where} should return a tuple of {count} items, got {describe(result)}")
    for k, item in enumerate(result[:2 * n]):
        want = outputs[k] if k < n else result[k - n]
        if not isinstance(item, torch.Tensor) or item.dtype != want.dtype or (
                (same_shape or k >= n) and item.shape != want.shape):
            shown = f"{list(item.shape)} {item.dtype}" if isinstance(item, torch.Tensor) else type(item).__name__
            what = "the block's output" if k < n else f"the rebuilt input (item {k - n})"
            raise ValueError(f"{where} returned item {k} of {shown}; it should have the "
                             f"{'shape and ' if same_shape or k >= n else ''}dtype of {what}, "
                             f"{list(want.shape)} {want.dtype}")
    if not isinstance(result[-1], (list, tuple)):
        raise TypeError(f"{where} should return the (tensor, gradient) pairs last, got {describe(result[-1])}")
    return result
