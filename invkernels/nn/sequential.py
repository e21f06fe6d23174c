"""A chain of invertible blocks with memory-free backprop: activations are rebuilt through the
blocks' inverses during backward instead of being stored. Design: docs/memory.md; the block
protocol: :mod:`invkernels.nn.protocol`; the memory-free run: :mod:`invkernels.nn._memory_free`."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from invkernels import _state
from invkernels._validation import describe, logdet_dtype
from invkernels.nn import _memory_free
from invkernels.nn._halves import Flow, add_logdets
from invkernels.nn._memory_free import gathered
from invkernels.nn.protocol import (
    check_block,
    checked_result,
    entered_by_call,
    has_fused_inverse_backward,
    memory_free_capable,
    split_of,
    takes_context,
)

__all__ = ["AUTO_MEMORY_FREE_BYTES", "InvertibleSequential", "check_memory_free"]

# memory_free="auto": memory-free from this many bytes between blocks on (InvertibleSequential).
AUTO_MEMORY_FREE_BYTES = 16 * 2**20


def check_memory_free(owner: str, memory_free) -> None:
    """ValueError naming ``owner`` unless ``memory_free`` is True, False or ``"auto"``."""
    if not (isinstance(memory_free, bool) or (isinstance(memory_free, str) and memory_free == "auto")):
        raise ValueError(f"{owner}: memory_free should be True, False or 'auto', got {memory_free!r}")


def _inverse_returns_logdet(block: nn.Module) -> bool:
    try:
        return "return_logdet" in inspect.signature(block.inverse).parameters
    except (TypeError, ValueError):
        return False


class InvertibleSequential(nn.Module):
    """A chain of invertible blocks, ``forward(x, context=None) -> (y, logdet)`` with the log-dets
    summed, and ``inverse(y, context=None, return_logdet=False) -> x`` (or ``(x, logdet)``) through
    the blocks in reverse.

    With ``memory_free=True`` a training forward stores no activations: runs of blocks
    that can be inverted are computed without recording and only their output is kept; backward
    rebuilds each block's input from its output with the block's inverse and back-propagates
    block by block, so activation memory does not grow with depth. Blocks of this package do it
    in fused passes (``inverse_backward``: a coupling runs its subnet once in backward, on the
    untouched half it reads from the output); any other block with ``forward -> (y, logdet)`` and
    ``inverse`` is inverted and then run forward again with grad. Blocks without an inverse (or
    with ``memory_free_invertible = False``, e.g. :class:`~invkernels.nn.Split`) store their
    activations as usual.

    The rebuild replays what the forward did: the RNG state before each subnet call (dropout; as
    ``torch.utils.checkpoint`` does, per call; ``preserve_rng_state=False`` skips this), every
    submodule's train/eval flag (a ``model.eval()`` between forward and backward changes nothing),
    and the forward's autocast state, "off" included. A parameter modified in place between forward and
    backward is an error (the inputs could not be rebuilt). Under ``torch.no_grad()`` (or when
    nothing requires grad) the blocks simply run in turn, as with ``memory_free=False``. Under
    ``torch.compile`` each memory-free run is left to eager autograd (one graph break per run);
    the code around it is compiled.

    With ``memory_free="auto"`` (default) a training forward runs memory-free when it pays, stored
    otherwise: when the tensors it would hand between blocks, estimated as the input's bytes times
    the number of blocks that can be rebuilt, reach :attr:`auto_memory_free_bytes` (16 MiB; a stored
    step keeps several times that, the subnets' activations). Below it the activations are small
    and rebuilding them would only cost time: a tabular flow on ``[512, 8]`` stores its 16 KiB per
    block. The estimate does not see the subnets: a wide one keeps many times the tensors between
    blocks, so a model whose stored step would not fit asks for ``memory_free=True``. The rule is
    read at every forward (:meth:`runs_memory_free`); :func:`invkernels.diagnostics.saved_bytes`
    measures what a step keeps either way.

    Args:
        *blocks: modules with ``forward(x[, context]) -> (y, logdet)`` and ``inverse(y[, context])``.
        memory_free: rebuild activations in backward (True), let autograd store them (False), or
            ``"auto"``: memory-free from :attr:`auto_memory_free_bytes` on.
        preserve_rng_state: replay the RNG in backward, for subnets with dropout.
        check_reconstruction: debug option: also keep each block's input during the forward and,
            in backward, record the relative error of the rebuilt input in
            ``reconstruction_errors`` (a list of ``(block index, error)``). Costs the memory that
            memory-free backprop saves.
    """

    #: The estimated bytes between blocks (input bytes x blocks that can be rebuilt) from which
    #: ``memory_free="auto"`` runs memory-free; set on the class or on one chain.
    auto_memory_free_bytes: int = AUTO_MEMORY_FREE_BYTES
    # As a block of a memory-free chain, its inverse (a run of its blocks' inverses) cannot replay
    # the random numbers each block drew: the outer chain refuses it when it drew some.
    inverse_replays_rng = False

    def __init__(self, *blocks: nn.Module, memory_free: bool | str = "auto", preserve_rng_state: bool = True,
                 check_reconstruction: bool = False):
        super().__init__()
        for i, block in enumerate(blocks):
            check_block(i, block)
        check_memory_free("InvertibleSequential", memory_free)
        _memory_free.prepare_compile_boundary()
        for name, flag in (("preserve_rng_state", preserve_rng_state),
                           ("check_reconstruction", check_reconstruction)):
            if not isinstance(flag, bool):
                raise ValueError(f"InvertibleSequential: {name} should be True or False, got {flag!r}")
        self.blocks = nn.ModuleList(blocks)
        self.memory_free = memory_free
        self.preserve_rng_state = preserve_rng_state
        self.check_reconstruction = check_reconstruction
        self.reconstruction_errors: list[tuple[int, float]] = []
        self._context = [takes_context(b) for b in blocks]

    def runs_memory_free(self, x: torch.Tensor) -> bool:
        """Whether a training forward on ``x`` runs memory-free under the chain's ``memory_free``
        setting (for ``"auto"``: the input's bytes times the blocks that can be rebuilt, against
        :attr:`auto_memory_free_bytes`)."""
        if self.memory_free != "auto":
            return bool(self.memory_free)
        capable = sum(1 for block in self.blocks if memory_free_capable(block))
        return x.numel() * x.element_size() * capable >= self.auto_memory_free_bytes

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> nn.Module:
        return self.blocks[i]

    def _kwargs(self, i: int, context: torch.Tensor | None) -> dict:
        return {"context": context} if context is not None and self._context[i] else {}

    def forward_block(self, i: int, x: torch.Tensor, context: torch.Tensor | None = None):
        """``(y, logdet)`` of block ``i`` alone at ``x`` (with ``context`` if the block takes one),
        checked to be a pair of tensors with a ``[batch]`` log-det."""
        return self._checked_forward(i, self.blocks[i], x, context)

    def _checked_forward(self, i: int, block: nn.Module, x: torch.Tensor, context: torch.Tensor | None):
        out = block(x, **self._kwargs(i, context))
        if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
            raise TypeError(f"InvertibleSequential: block {i} ({type(block).__name__}) should return a tuple "
                            f"(y, logdet) of tensors, got {describe(out)}")
        if out[1].shape != (x.shape[0],):
            raise ValueError(f"InvertibleSequential: block {i} ({type(block).__name__}) returned a logdet of shape "
                             f"{list(out[1].shape)}; it should have shape [batch] = [{x.shape[0]}]")
        return out

    def inverse_block(self, i: int, y: torch.Tensor, context: torch.Tensor | None = None,
                      return_logdet: bool = False):
        """Block ``i``'s inverse at ``y`` (its parameters gathered when FSDP2 shards them), with
        ``return_logdet`` ``(x, logdet of the inverse)``: the block's own when its ``inverse`` takes
        ``return_logdet``, else minus its forward's log-det at ``x``. TypeError for a block without
        ``inverse``, ValueError for one whose inverse needs more than its output
        (``memory_free_invertible = False``)."""
        block = self.blocks[i]
        if not callable(getattr(block, "inverse", None)):
            raise TypeError(f"InvertibleSequential: block {i} ({type(block).__name__}) has no inverse")
        if not memory_free_capable(block):
            raise ValueError(
                f"InvertibleSequential: block {i} ({type(block).__name__}) cannot be inverted from the chain's "
                f"output: its inverse needs what its forward factored out (for Split, the half z2), which the "
                f"chain does not keep. Invert the blocks around it yourself, passing z2 to its inverse, or draw "
                f"samples with a model's sample()")
        kwargs = self._kwargs(i, context)
        with gathered(block):
            if not return_logdet:
                return block.inverse(y, **kwargs)
            if _inverse_returns_logdet(block):
                return block.inverse(y, return_logdet=True, **kwargs)
            x = block.inverse(y, **kwargs)
            with torch.no_grad():
                return x, -self._checked_forward(i, block, x, context)[1]

    def _inverse_backward(self, i: int, block: nn.Module, c1: int | None, flow: Flow, grad: Flow,
                          grad_logdet: torch.Tensor, context: torch.Tensor | None, rng: _state.RngState | None,
                          like: torch.Tensor | None):
        """Block ``i``'s memory-free backward on the flows of its output and of its gradient: the
        flows of its input and of that input's gradient, and the ``(tensor, gradient)`` pairs.
        ``c1``: the block's :func:`split_of`. With ``like`` (the chain's input, for the chain's first
        block) the input gradient of a block working on halves is written into one new tensor
        shaped as ``like``."""
        kwargs = self._kwargs(i, context)
        if c1 is not None:
            out = None
            if like is not None:
                buffer = torch.empty_like(like, memory_format=torch.contiguous_format)
                out = buffer.split([c1, like.shape[1] - c1], dim=1)
            y1, y2 = flow.split(c1)
            result = block.inverse_backward_split(y1, y2, *grad.split(c1), grad_logdet, out=out, **kwargs)
            x1, x2, grad_x1, grad_x2, pairs = checked_result(i, block, "inverse_backward_split", result, 5,
                                                              (y1, y2), True)
            if out is not None and (grad_x1 is not out[0] or grad_x2 is not out[1]):
                # The block returned its gradients instead of writing them into out=.
                out[0].copy_(grad_x1)
                out[1].copy_(grad_x2)
            return Flow(halves=(x1, x2)), Flow(buffer if out is not None else None, (grad_x1, grad_x2)), pairs
        y, grad_y = flow.whole(), grad.whole()
        if has_fused_inverse_backward(block):
            result = block.inverse_backward(y, grad_y, grad_logdet, **kwargs)
            x, grad_x, pairs = checked_result(i, block, "inverse_backward", result, 3, (y,), False)
        else:
            x, grad_x, pairs = _memory_free.generic_inverse_backward(block, y, grad_y, grad_logdet, kwargs, rng)
        return Flow(x), Flow(grad_x), pairs

    def forward_flow(self, i: int, flow: Flow, context: torch.Tensor | None, block: nn.Module, c1: int | None):
        """Block ``i`` (``block``) on the flow of its input: the flow of its output and its log-det
        (None for a block on halves whose log-det is 0). ``c1``: the block's :func:`split_of`. A
        block on halves takes its halves directly, unless something waits in
        ``nn.Module.__call__`` (hooks, FSDP2's unshard, ``block.compile()``): then it is called as
        any module, on the whole tensor."""
        if c1 is None or entered_by_call(block):
            y, logdet = self._checked_forward(i, block, flow.whole(), context)
            return Flow(y), logdet
        y1, y2, logdet = block.forward_split(*flow.split(c1), **self._kwargs(i, context))
        return Flow(halves=(y1, y2)), logdet

    def _runs(self) -> list[tuple[bool, tuple[int, ...]]]:
        """Consecutive blocks grouped as (memory-free, indices)."""
        runs: list[tuple[bool, list[int]]] = []
        for i, block in enumerate(self.blocks):
            capable = memory_free_capable(block)
            if runs and runs[-1][0] == capable:
                runs[-1][1].append(i)
            else:
                runs.append((capable, [i]))
        return [(capable, tuple(idx)) for capable, idx in runs]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"InvertibleSequential: x should be a tensor, got {type(x).__name__}")
        memory_free = torch.is_grad_enabled() and self.runs_memory_free(x) and (
            x.requires_grad or (context is not None and context.requires_grad)
            or any(p.requires_grad for p in self.parameters()))
        flow, logdet = Flow(x), None
        blocks = list(self.blocks)
        for capable, indices in self._runs():
            if memory_free and capable:
                out, run_logdet = _memory_free.memory_free_run(self, indices, flow.whole(), context)
                flow, logdet = Flow(out), add_logdets(logdet, run_logdet)
            else:
                for i in indices:
                    flow, block_logdet = self.forward_flow(i, flow, context, blocks[i], split_of(blocks[i]))
                    logdet = add_logdets(logdet, block_logdet)
        y = flow.whole()
        return y, logdet if logdet is not None else y.new_zeros(y.shape[0], dtype=logdet_dtype(y.dtype))

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None, return_logdet: bool = False):
        """``x`` from ``y`` through the blocks' inverses in reverse order; with ``return_logdet``
        ``(x, logdet)``, the summed log-dets of the inverses (minus the forward's at ``x``). A block
        whose inverse needs more than its output (``memory_free_invertible = False``, e.g.
        :class:`~invkernels.nn.Split`) raises ValueError: the chain does not keep what it factored
        out."""
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"InvertibleSequential: y should be a tensor, got {type(y).__name__}")
        flow = Flow(y)
        logdet = y.new_zeros(y.shape[0], dtype=logdet_dtype(y.dtype)) if return_logdet else None
        for i in reversed(range(len(self.blocks))):
            block, c1 = self.blocks[i], split_of(self.blocks[i])
            if c1 is None:
                out = self.inverse_block(i, flow.whole(), context, return_logdet)
                if return_logdet:
                    out, block_logdet = out
                    logdet = logdet + block_logdet
                flow = Flow(out)
                continue
            with gathered(block):
                x1, x2, block_logdet = block.inverse_split(*flow.split(c1), **self._kwargs(i, context))
            if return_logdet and block_logdet is not None:
                logdet = logdet + block_logdet
            flow = Flow(halves=(x1, x2))
        return (flow.whole(), logdet) if return_logdet else flow.whole()

    def extra_repr(self) -> str:
        return f"memory_free={self.memory_free!r}"
