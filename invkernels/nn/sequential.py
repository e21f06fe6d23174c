"""A chain of invertible blocks with memory-free backprop: activations are rebuilt through the
blocks' inverses during backward instead of being stored. Design: docs/memory.md."""

from __future__ import annotations

import contextlib
import inspect
from typing import NamedTuple, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules import module as _module_hooks

from invkernels import _state
from invkernels._validation import describe, logdet_dtype


Gradients = list[tuple[torch.Tensor, "torch.Tensor | None"]]


@runtime_checkable
class FusedInverseBackward(Protocol):
    """A block with its own memory-free backward (every block of this package has one):
    ``inverse_backward(y, grad_y, grad_logdet[, context]) -> (x, grad_x, grads)`` rebuilds the
    block's input ``x`` from its output ``y`` and back-propagates the gradients of ``(y, logdet)``
    through the block at ``x``; ``grads`` pairs each tensor that requires grad (parameters, the
    context) with its gradient (None for unused ones). ``grad_x`` is the full gradient of ``x``."""

    def inverse_backward(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                         **kwargs) -> tuple[torch.Tensor, torch.Tensor, Gradients]: ...


def has_fused_inverse_backward(block: nn.Module) -> bool:
    """Whether ``block`` is a :class:`FusedInverseBackward` (checked by attribute: a runtime
    protocol check costs more than the small blocks it would dispatch)."""
    return callable(getattr(block, "inverse_backward", None))


def _takes_context(block: nn.Module) -> bool:
    try:
        return "context" in inspect.signature(block.forward).parameters
    except (TypeError, ValueError):
        return False


def memory_free_capable(block: nn.Module) -> bool:
    """Whether ``block`` can be rebuilt from its output: it has an ``inverse`` and does not set
    ``memory_free_invertible = False`` (as :class:`~invkernels.nn.Split` does, whose inverse needs
    the factored-out half)."""
    return callable(getattr(block, "inverse", None)) and getattr(block, "memory_free_invertible", True)


def split_of(block: nn.Module) -> int | None:
    """The channel split ``C1`` at which ``block`` works on two halves, or None. Such a block has
    ``split_channels = C1`` and ``forward_split(x1, x2[, context]) -> (y1, y2, logdet or None)``,
    ``inverse_split(y1, y2[, context]) -> (x1, x2, logdet or None)`` and
    ``inverse_backward_split(y1, y2, grad_y1, grad_y2, grad_logdet[, context], out=None) ->
    (x1, x2, grad_x1, grad_x2, grads)`` (``out``: two tensors to write the input gradients into),
    with ``x1 = x[:, :C1]`` and ``x2 = x[:, C1:]`` (a log-det of None is 0)."""
    c1 = getattr(block, "split_channels", None)
    return c1 if isinstance(c1, int) and not isinstance(c1, bool) and callable(getattr(block, "forward_split", None)) \
        else None


def _entered_by_call(block: nn.Module) -> bool:
    """Whether calling ``block``'s methods directly would skip what ``nn.Module.__call__`` runs for
    it: its own or global forward / backward hooks (FSDP2's ``fully_shard`` registers its unshard
    as one, ``inversion.invert`` a hook that reads the block's output), or ``block.compile()``."""
    return bool(block._forward_hooks or block._forward_pre_hooks or block._backward_hooks
                or block._backward_pre_hooks or block._compiled_call_impl is not None
                or _module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks
                or _module_hooks._global_backward_hooks or _module_hooks._global_backward_pre_hooks)


class _Flow:
    """The tensor between two blocks of a chain, held whole or as its two channel halves (the
    tensor is their concatenation). Blocks that split the same way hand each other the halves;
    :meth:`whole` concatenates them, once, where a block or the chain's output needs the tensor."""

    __slots__ = ("_whole", "_halves")

    def __init__(self, whole: torch.Tensor | None = None, halves: tuple[torch.Tensor, torch.Tensor] | None = None):
        self._whole, self._halves = whole, halves

    def split(self, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The halves at channel ``c1`` (views of the whole tensor when it is not held so split)."""
        if self._halves is not None and self._halves[0].shape[1] == c1:
            return self._halves
        x = self.whole()
        x1, x2 = x.split([c1, x.shape[1] - c1], dim=1)
        return x1, x2

    def whole(self) -> torch.Tensor:
        if self._whole is None:
            self._whole = torch.cat(self._halves, dim=1)
        return self._whole

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors held (the whole tensor, or its two halves)."""
        return (self._whole,) if self._whole is not None else self._halves


def _add_logdets(total: torch.Tensor | None, logdet: torch.Tensor | None) -> torch.Tensor | None:
    if logdet is None:
        return total
    return logdet if total is None else total + logdet


class _AutocastState:
    """Autocast settings of the forward's device type, re-entered in backward."""

    def __init__(self, x: torch.Tensor):
        self.device_type = x.device.type if x.device.type in ("cpu", "cuda") else "cpu"
        self.enabled = torch.is_autocast_enabled(self.device_type)
        self.dtype = torch.get_autocast_dtype(self.device_type)

    def __call__(self):
        # A forward without autocast is replayed without it too, whatever the backward runs in.
        if not self.enabled:
            return torch.autocast(self.device_type, enabled=False)
        return torch.autocast(self.device_type, dtype=self.dtype)


def forward_vjp(forward, x: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                tensors: list[torch.Tensor]):
    """Run ``forward(leaf) -> (y, logdet)`` with grad on a copy of ``x`` and back-propagate
    ``(grad_y, grad_logdet)``: ``(grad_x, [(t, grad of t) for t in tensors])``."""
    leaf = x.detach().requires_grad_()
    with torch.enable_grad():
        out, logdet = forward(leaf)
    outputs, grads = [out], [grad_y]
    if logdet.requires_grad:
        outputs.append(logdet)
        grads.append(grad_logdet.to(logdet.dtype))
    got = torch.autograd.grad(outputs, [leaf, *tensors], grads, allow_unused=True)
    grad_x = got[0] if got[0] is not None else torch.zeros_like(x)
    return grad_x, list(zip(tensors, got[1:]))


def _generic_inverse_backward(block: nn.Module, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                              kwargs: dict, rng: _state.RngState | None):
    """Memory-free backward of any block with ``forward -> (y, logdet)`` and ``inverse``: rebuild
    the input with ``inverse`` (no grad), then run the forward again with grad and back-propagate."""
    with torch.no_grad():
        x = block.inverse(y, **kwargs)
    if rng is not None:
        rng.restore()
    context = kwargs.get("context")
    extra = [t for t in (*block.parameters(), context) if t is not None and t.requires_grad]
    grad_x, pairs = forward_vjp(lambda leaf: block(leaf, **kwargs), x, grad_y, grad_logdet, extra)
    return x, grad_x, pairs


def _fsdp_units(block: nn.Module) -> list[nn.Module]:
    """The modules inside ``block`` that FSDP2 (``fully_shard``) manages."""
    if not (dist.is_available() and dist.is_initialized()):
        return []
    from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415

    return [m for m in block.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def _gathered(block: nn.Module):
    """FSDP2 keeps parameters sharded outside forwards: the units inside ``block`` are gathered
    (``unshard``) for the block's inverse or rebuild and resharded after. Gradients computed for
    the gathered parameters stay in their ``.grad``, which FSDP reduce-scatters when the
    backward ends."""
    units = _fsdp_units(block)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def _versions(tensors: list[torch.Tensor]) -> list[int | None]:
    """The version counters of ``tensors`` (None for an inference tensor, which has none)."""
    try:
        return [t._version for t in tensors]
    except RuntimeError:  # an inference tensor has no version counter
        return [_state.version(t) for t in tensors]


class _Watched(NamedTuple):
    """Every parameter and buffer of a run of blocks that rebuilding their inputs reads, with its
    version at the end of the forward, frozen parameters included (not the running statistics of
    a train-mode normalization, which its output does not read). ``where[k]`` names
    ``tensors[k]`` for :func:`_watched_name`. ``training``: every submodule's train/eval flag in the
    forward, which the rebuild replays."""

    where: list[tuple]
    tensors: list[torch.Tensor]
    versions: list[int | None]
    training: list[tuple[nn.Module, bool]]


def _watched(seq, indices) -> _Watched:
    seen, where, tensors, training = set(), [], [], []
    for i in indices:
        for m in seq.blocks[i].modules():
            training.append((m, m.training))
            # A train-mode batch or instance norm normalizes with the batch's own statistics: the
            # rebuild (which replays train mode) reads none of its buffers, only writes copies.
            unread = m.training and isinstance(m, nn.modules.batchnorm._NormBase)
            for kind, items in (("parameter", m._parameters), ("buffer", {} if unread else m._buffers)):
                for key, t in items.items():
                    if t is not None and id(t) not in seen:
                        seen.add(id(t))
                        where.append((i, m, kind, key))
                        tensors.append(t)
    return _Watched(where, tensors, _versions(tensors), training)


def _tensor_ids(seq, indices) -> set[int]:
    """The ids of every parameter and buffer of the blocks ``indices``, as they are now."""
    return {id(t) for i in indices for m in seq.blocks[i].modules()
            for items in (m._parameters, m._buffers) for t in items.values() if t is not None}


def _trained_parameters(seq, indices) -> list[torch.Tensor]:
    """The parameters of the blocks ``indices`` that require grad, each once (read from the
    modules' own tables: ``parameters()`` builds names this hot path does not need)."""
    found = {id(p): p for i in indices for m in seq.blocks[i].modules() for p in m._parameters.values()
             if p is not None and p.requires_grad}
    return list(found.values())


def _watched_name(seq, where: tuple) -> str:
    i, module, kind, key = where
    prefix = next((name for name, m in seq.blocks[i].named_modules() if m is module), None)
    path = key if not prefix else f"{prefix}.{key}"
    return f"{kind} blocks.{i}.{path}"


def _check_unchanged(seq, indices, watched: _Watched) -> None:
    """RuntimeError when a tensor the rebuild reads was modified in place, or replaced, between the
    forward and this backward (as autograd raises for the tensors it saved)."""
    now_versions = _versions(watched.tensors)
    now = _tensor_ids(seq, indices)
    if now_versions == watched.versions and all(id(t) in now for t in watched.tensors):
        return
    for where, t, version, now_version in zip(watched.where, watched.tensors, watched.versions, now_versions):
        changed = now_version != version
        if changed or id(t) not in now:
            what = (f"was modified by an inplace operation (version {version} -> {now_version})" if changed
                    else "was replaced by another tensor")
            raise RuntimeError(
                f"InvertibleSequential: the {_watched_name(seq, where)}, needed to rebuild the activations in the "
                f"memory-free backward, {what} between the forward and the backward (for example an optimizer "
                f"step, load_state_dict or a buffer update before backward). Run backward first.")


def _checked_result(i: int, block: nn.Module, method: str, result, count: int, outputs: tuple[torch.Tensor, ...],
                    same_shape: bool):
    """``result`` of block ``i``'s memory-free backward ``method``: a tuple of ``count`` items, the
    rebuilt inputs (``len(outputs)`` tensors in the dtype of the block's outputs ``outputs``, of
    their shapes too with ``same_shape``: halves at the same split), then their gradients (each of
    its input's shape and dtype), then a list of ``(tensor, gradient)`` pairs. TypeError or
    ValueError naming the block otherwise, so that a third-party block cannot hand the chain
    tensors it would misread."""
    where = f"InvertibleSequential: block {i} ({type(block).__name__}).{method}"
    if not (isinstance(result, tuple) and len(result) == count):
        raise TypeError(f"{where} should return a tuple of {count} items, got {describe(result)}")
    n = len(outputs)
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


def _check_input_kept(seq, i: int, before: list[int | None], inputs: tuple[torch.Tensor, ...]) -> None:
    """RuntimeError when block ``i`` wrote its input in place during the memory-free forward (which
    runs without recording, where plain autograd would raise): the rebuild needs the input as the
    block read it, and the caller's tensor must not change."""
    if _versions(list(inputs)) != before:
        block = seq.blocks[i]
        raise RuntimeError(
            f"InvertibleSequential: block {i} ({type(block).__name__}) modified its input in place during the "
            f"memory-free forward (for example a subnet whose first layer works in place, such as "
            f"nn.ReLU(inplace=True), on the half it reads). The input is needed as it was to rebuild the "
            f"activations in backward, and plain autograd refuses this too: make that layer out of place.")


class _MemoryFreeChain(torch.autograd.Function):
    """Forward of a run of memory-free blocks without recording, saving only the output; backward
    rebuilds each block's input from its output and back-propagates block by block."""

    @staticmethod
    def forward(ctx, seq, indices, x, context, *params):
        ctx.seq, ctx.indices = seq, indices
        x_in = x
        ctx.rng = []
        ctx.debug_inputs = []
        # The debug option as it was in the forward (switching it on before backward finds no inputs kept).
        ctx.check = seq.check_reconstruction
        ctx.autocast = _AutocastState(x)
        logdet = None
        flow = _Flow(x)
        for i in indices:
            inputs = flow.tensors()
            if ctx.check:
                ctx.debug_inputs.append(flow.whole())
            before = _versions(inputs)
            if seq.preserve_rng_state:
                # The state before the block, and before each further subnet call the block marks.
                states = [_state.RngState(x)]
                ctx.rng.append(states)
                with _state.recording_rng(states, lambda: _state.RngState(x)):
                    flow, block_logdet = seq.forward_flow(i, flow, context)
            else:
                ctx.rng.append(None)
                flow, block_logdet = seq.forward_flow(i, flow, context)
            _check_input_kept(seq, i, before, inputs)
            logdet = _add_logdets(logdet, block_logdet)
        x = flow.whole()
        if logdet is None:
            logdet = x.new_zeros(x.shape[0], dtype=logdet_dtype(x.dtype))
        ctx.params = params
        ctx.watched = _watched(seq, indices)
        # The chain's input is saved too, only for create_graph=True (its storage is the caller's
        # tensor or the previous chain's saved output, so it costs no memory of its own).
        ctx.save_for_backward(x_in, x, context)
        return x, logdet

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        seq = ctx.seq
        x_in, y, context = ctx.saved_tensors
        _check_unchanged(seq, ctx.indices, ctx.watched)
        if torch.is_grad_enabled():
            return _MemoryFreeChain._backward_with_graph(ctx, x_in, context, grad_y, grad_logdet)
        grads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        errors = []
        devices = ctx.rng[0][0].devices() if ctx.rng and ctx.rng[0] is not None else []
        flow, grad = _Flow(y), _Flow(grad_y)
        with torch.random.fork_rng(devices=devices, enabled=seq.preserve_rng_state), ctx.autocast(), \
                _state.training_flags(ctx.watched.training):
            for k in reversed(range(len(ctx.indices))):
                i, states = ctx.indices[k], ctx.rng[k]
                rng = states[0] if states is not None else None
                if rng is not None:
                    rng.restore()
                block = seq.blocks[i]
                # The rebuild reruns the block (train-mode subnets included): what it writes to
                # buffers (BatchNorm running statistics) goes to copies, so the forward's update counts once.
                with _state.scratch_buffers(block), _gathered(block), _state.replaying_rng(states):
                    flow, grad, pairs = seq._inverse_backward(i, block, flow, grad, grad_logdet, context, rng,
                                                              x_in if k == 0 else None)
                for t, g in pairs:
                    if g is not None:
                        previous = grads.get(id(t))
                        grads[id(t)] = (t, g if previous is None else previous[1] + g)
                if ctx.check:
                    stored = ctx.debug_inputs[k]
                    scale = stored.detach().double().norm().clamp_min(torch.finfo(torch.float64).tiny)
                    errors.append((i, ((flow.whole().double() - stored.double()).norm() / scale).item()))
        if ctx.check:
            seq.reconstruction_errors = sorted(errors)
        returned = {id(p) for p in ctx.params} | ({id(context)} if context is not None else set())
        for t, g in grads.values():
            if id(t) not in returned:
                # The gathered copy of an FSDP-sharded parameter (not an input of this function):
                # its gradient goes where autograd would put it, for FSDP to reduce-scatter.
                t.grad = g if t.grad is None else t.grad + g
        grad_context = grads[id(context)][1] if context is not None and id(context) in grads else None
        return (None, None, grad.whole(), grad_context,
                *(grads[id(p)][1] if id(p) in grads else None for p in ctx.params))

    @staticmethod
    def _backward_with_graph(ctx, x, context, grad_y, grad_logdet):
        """Under ``create_graph=True``: run the forward again with grad from the saved input and
        back-propagate through it with a graph, so higher derivatives are exact."""
        seq = ctx.seq
        devices = ctx.rng[0][0].devices() if ctx.rng and ctx.rng[0] is not None else []
        with torch.random.fork_rng(devices=devices, enabled=seq.preserve_rng_state), ctx.autocast(), \
                _state.training_flags(ctx.watched.training), contextlib.ExitStack() as scratch:
            for i in ctx.indices:
                scratch.enter_context(_state.scratch_buffers(seq.blocks[i]))
            # The forward is run again in its own order from the state before the run.
            if ctx.rng and ctx.rng[0] is not None:
                ctx.rng[0][0].restore()
            with torch.enable_grad():
                out, logdet = x, None
                for i in ctx.indices:
                    out, block_logdet = seq.forward_block(i, out, context)
                    logdet = block_logdet if logdet is None else logdet + block_logdet
        given_context = context is not None and context.requires_grad
        inputs = [t for t in (x, context if given_context else None, *ctx.params)
                  if t is not None and t.requires_grad]
        got = iter(torch.autograd.grad((out, logdet), inputs, (grad_y, grad_logdet), create_graph=True,
                                       allow_unused=True))
        grad_x = next(got) if x.requires_grad else None
        grad_context = next(got) if given_context else None
        return (None, None, grad_x, grad_context, *got)


@torch._dynamo.disable
def _memory_free_run(seq, indices, x, context, params):
    """Runs one memory-free run eagerly: torch.compile leaves it to autograd (one graph break per
    run), because its backward rebuilds activations by running the blocks' own code."""
    return _MemoryFreeChain.apply(seq, indices, x, context, *params)


class InvertibleSequential(nn.Module):
    """A chain of invertible blocks, ``forward(x, context=None) -> (y, logdet)`` with the log-dets
    summed, and ``inverse(y, context=None) -> x`` through the blocks in reverse.

    With ``memory_free=True`` (default) a training forward stores no activations: runs of blocks
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

    Args:
        *blocks: modules with ``forward(x[, context]) -> (y, logdet)`` and ``inverse(y[, context])``.
        memory_free: rebuild activations in backward (True) or let autograd store them (False).
        preserve_rng_state: replay the RNG in backward, for subnets with dropout.
        check_reconstruction: debug option: also keep each block's input during the forward and,
            in backward, record the relative error of the rebuilt input in
            ``reconstruction_errors`` (a list of ``(block index, error)``). Costs the memory that
            memory-free backprop saves.
    """

    def __init__(self, *blocks: nn.Module, memory_free: bool = True, preserve_rng_state: bool = True,
                 check_reconstruction: bool = False):
        super().__init__()
        for i, block in enumerate(blocks):
            if not isinstance(block, nn.Module):
                raise TypeError(f"InvertibleSequential: block {i} should be an nn.Module, got {type(block).__name__}")
        for name, flag in (("memory_free", memory_free), ("preserve_rng_state", preserve_rng_state),
                           ("check_reconstruction", check_reconstruction)):
            if not isinstance(flag, bool):
                raise ValueError(f"InvertibleSequential: {name} should be True or False, got {flag!r}")
        for i, block in enumerate(blocks):
            if split_of(block) is not None:
                missing = [m for m in ("inverse_split", "inverse_backward_split") if not callable(getattr(block, m, None))]
                if missing:
                    raise TypeError(f"InvertibleSequential: block {i} ({type(block).__name__}) works on halves "
                                    f"(split_channels and forward_split) but has no {' and no '.join(missing)}; "
                                    f"a block on halves needs forward_split, inverse_split and "
                                    f"inverse_backward_split (docs/memory.md)")
        self.blocks = nn.ModuleList(blocks)
        self.memory_free = memory_free
        self.preserve_rng_state = preserve_rng_state
        self.check_reconstruction = check_reconstruction
        self.reconstruction_errors: list[tuple[int, float]] = []
        self._context = [_takes_context(b) for b in blocks]

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

    def inverse_block(self, i: int, y: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Block ``i``'s inverse at ``y`` (its parameters gathered when FSDP2 shards them); TypeError
        for a block without ``inverse``, ValueError for one whose inverse needs more than its output
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
        with _gathered(block):
            return block.inverse(y, **self._kwargs(i, context))

    def _inverse_backward(self, i: int, block: nn.Module, flow: _Flow, grad: _Flow, grad_logdet: torch.Tensor,
                          context: torch.Tensor | None, rng: _state.RngState | None, like: torch.Tensor | None):
        """Block ``i``'s memory-free backward on the flows of its output and of its gradient: the
        flows of its input and of that input's gradient, and the ``(tensor, gradient)`` pairs. With
        ``like`` (the chain's input, for the chain's first block) the input gradient of a block
        working on halves is written into one new tensor shaped as ``like``."""
        kwargs = self._kwargs(i, context)
        c1 = split_of(block)
        if c1 is not None:
            out = None
            if like is not None:
                buffer = torch.empty_like(like, memory_format=torch.contiguous_format)
                out = buffer.split([c1, like.shape[1] - c1], dim=1)
            y1, y2 = flow.split(c1)
            result = block.inverse_backward_split(y1, y2, *grad.split(c1), grad_logdet, out=out, **kwargs)
            x1, x2, grad_x1, grad_x2, pairs = _checked_result(i, block, "inverse_backward_split", result, 5,
                                                              (y1, y2), True)
            if out is not None and (grad_x1 is not out[0] or grad_x2 is not out[1]):
                # The block returned its gradients instead of writing them into out=.
                out[0].copy_(grad_x1)
                out[1].copy_(grad_x2)
            return _Flow(halves=(x1, x2)), _Flow(buffer if out is not None else None, (grad_x1, grad_x2)), pairs
        y, grad_y = flow.whole(), grad.whole()
        if has_fused_inverse_backward(block):
            result = block.inverse_backward(y, grad_y, grad_logdet, **kwargs)
            x, grad_x, pairs = _checked_result(i, block, "inverse_backward", result, 3, (y,), False)
        else:
            x, grad_x, pairs = _generic_inverse_backward(block, y, grad_y, grad_logdet, kwargs, rng)
        return _Flow(x), _Flow(grad_x), pairs

    def forward_flow(self, i: int, flow: _Flow, context: torch.Tensor | None):
        """Block ``i`` on the flow of its input: the flow of its output and its log-det (None for
        a block on halves whose log-det is 0). A block on halves takes its halves directly, unless
        something waits in ``nn.Module.__call__`` (hooks, FSDP2's unshard, ``block.compile()``):
        then it is called as any module, on the whole tensor."""
        block = self.blocks[i]
        c1 = split_of(block)
        if c1 is None or _entered_by_call(block):
            y, logdet = self._checked_forward(i, block, flow.whole(), context)
            return _Flow(y), logdet
        y1, y2, logdet = block.forward_split(*flow.split(c1), **self._kwargs(i, context))
        return _Flow(halves=(y1, y2)), logdet

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
        records = torch.is_grad_enabled() and (
            x.requires_grad or (context is not None and context.requires_grad)
            or any(p.requires_grad for p in self.parameters()))
        flow, logdet = _Flow(x), None
        for capable, indices in self._runs():
            if self.memory_free and records and capable:
                params = _trained_parameters(self, indices)
                out, run_logdet = _memory_free_run(self, indices, flow.whole(), context, params)
                flow, logdet = _Flow(out), _add_logdets(logdet, run_logdet)
            else:
                for i in indices:
                    flow, block_logdet = self.forward_flow(i, flow, context)
                    logdet = _add_logdets(logdet, block_logdet)
        y = flow.whole()
        return y, logdet if logdet is not None else y.new_zeros(y.shape[0], dtype=logdet_dtype(y.dtype))

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` from ``y`` through the blocks' inverses in reverse order. A block whose inverse needs
        more than its output (``memory_free_invertible = False``, e.g. :class:`~invkernels.nn.Split`)
        raises ValueError: the chain does not keep what it factored out."""
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"InvertibleSequential: y should be a tensor, got {type(y).__name__}")
        flow = _Flow(y)
        for i in reversed(range(len(self.blocks))):
            block, c1 = self.blocks[i], split_of(self.blocks[i])
            if c1 is None:
                flow = _Flow(self.inverse_block(i, flow.whole(), context))
                continue
            with _gathered(block):
                x1, x2, _ = block.inverse_split(*flow.split(c1), **self._kwargs(i, context))
            flow = _Flow(halves=(x1, x2))
        return flow.whole()

    def extra_repr(self) -> str:
        return f"memory_free={self.memory_free}"
