"""The memory-free run of a chain: a ``torch.autograd.Function`` whose forward runs blocks without
recording and saves only the output, and whose backward rebuilds each block's input from its
output and back-propagates block by block, replaying what the forward did (RNG per subnet call,
train/eval flags, autocast) and checking what the rebuild reads (versions of parameters and
buffers, the input a block must not write, what a block's backward returns). Design:
docs/memory.md."""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
import weakref

import torch
import torch.distributed as dist
from torch import nn

from invkernels import _state
from invkernels._validation import logdet_dtype
from invkernels.nn._halves import Flow, add_logdets
from invkernels.nn.permute import Permute
from invkernels.nn.protocol import entered_by_call, split_of
from invkernels.nn.subnets import trained_tensors, vjp

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
    got = vjp(outputs, [leaf, *tensors], grads)
    grad_x = got[0] if got[0] is not None else torch.zeros_like(x)
    return grad_x, list(zip(tensors, got[1:]))


def generic_inverse_backward(block: nn.Module, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                              kwargs: dict, rng: _state.RngState | None):
    """Memory-free backward of any block with ``forward -> (y, logdet)`` and ``inverse``: rebuild
    the input with ``inverse`` (no grad), then run the forward again with grad and back-propagate."""
    with torch.no_grad():
        x = block.inverse(y, **kwargs)
    if rng is not None:
        rng.restore()
    context = kwargs.get("context")
    extra = trained_tensors(block, context)
    grad_x, pairs = forward_vjp(lambda leaf: block(leaf, **kwargs), x, grad_y, grad_logdet, extra)
    return x, grad_x, pairs


def _fsdp_units(modules: list[nn.Module]) -> list[nn.Module]:
    """The modules among ``modules`` that FSDP2 (``fully_shard``) manages."""
    if not (dist.is_available() and dist.is_initialized()):
        return []
    from torch.distributed.fsdp import FSDPModule  # noqa: PLC0415

    return [m for m in modules if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(block: nn.Module, modules: list[nn.Module] | None = None):
    """FSDP2 keeps parameters sharded outside forwards: the units inside ``block`` are gathered
    (``unshard``) for the block's inverse or rebuild and resharded after. Gradients computed for
    the gathered parameters stay in their ``.grad``, which FSDP reduce-scatters when the
    backward ends. ``modules``: :func:`_state.submodules` of ``block`` when the caller has them."""
    units = _fsdp_units(_state.submodules(block) if modules is None else modules)
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


class _Plan:
    """What a memory-free run reads of its blocks' structure, gathered by walking their modules
    and reused at the next step while :meth:`holds` (a training loop runs the same structure at
    every step; only versions change, which are read at every step).

    ``blocks``: the run's blocks; ``modules``: each block's :func:`_state.submodules`; ``flat``:
    all of them, ``training`` their train/eval flags and ``flags`` the pairs of both, which the
    rebuild replays. ``where``: every non-empty ``_modules``, ``_parameters`` and ``_buffers``
    table of them as ``(block index, module, kind, table)`` (named by :func:`_watched_name`),
    ``keys`` its keys, ``tables`` the tables alone, and ``held`` the objects they held, in order:
    a table that gains, loses or swaps an entry no longer holds them; ``empty_where``, ``empty``:
    the empty tables alike. ``tensors``: the parameters and buffers that rebuilding
    the inputs reads, each once, frozen parameters included (not the running statistics of a
    train-mode normalization, which its output does not read); ``params``: the parameters that
    require grad (the run's inputs); ``grad_flags``: every parameter's ``requires_grad``, and
    ``frozen`` the ids of those without it. ``scratch[k]``: whether block ``k`` has buffers a
    rebuild may write (see :func:`_state.scratch_buffers`)."""

    __slots__ = ("blocks", "modules", "flat", "training", "flags", "tables", "where", "keys", "empty", "held",
                 "tensors", "params", "all_params", "grad_flags", "frozen", "scratch", "empty_where")

    def __init__(self, seq, indices):
        blocks = list(seq.blocks)
        self.blocks = [blocks[i] for i in indices]
        self.modules = [_state.submodules(block) for block in self.blocks]
        self.flat = [m for block_modules in self.modules for m in block_modules]
        self.training = [m.training for m in self.flat]
        self.flags = list(zip(self.flat, self.training))
        self.where, self.keys, self.empty_where = [], [], []
        self.scratch, seen = [], set()
        self.tensors, self.all_params = [], []
        for i, block_modules in zip(indices, self.modules):
            writable = False
            for m in block_modules:
                for kind, table in (("submodule", m._modules), ("parameter", m._parameters), ("buffer", m._buffers)):
                    if table:
                        self.where.append((i, m, kind, table))
                        self.keys.append(tuple(table))
                    else:
                        self.empty_where.append((i, m, kind, table))
                if m._parameters:
                    self.all_params += [p for p in m._parameters.values() if p is not None]
                    self._watch(m._parameters, seen)
                if m._buffers:
                    writable = writable or not getattr(type(m), "buffers_read_only", False)
                    # A train-mode batch or instance norm normalizes with the batch's own statistics: the
                    # rebuild (which replays train mode) reads none of its buffers, only writes copies.
                    if not (m.training and isinstance(m, nn.modules.batchnorm._NormBase)):
                        self._watch(m._buffers, seen)
            self.scratch.append(writable)
        self.tables = [where[3] for where in self.where]
        self.empty = [where[3] for where in self.empty_where]
        self.held = self._now()
        self.grad_flags = [p.requires_grad for p in self.all_params]
        self.frozen = {id(p) for p, flag in zip(self.all_params, self.grad_flags) if not flag}
        self.params = _state.trainable(self.flat)

    def _watch(self, table: dict, seen: set) -> None:
        for t in table.values():
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                self.tensors.append(t)

    def _now(self) -> list:
        return [*itertools.chain.from_iterable(table.values() for table in self.tables)]

    def tables_hold(self) -> bool:
        """Whether each table holds what it held (the empty ones nothing)."""
        now = self._now()
        return len(now) == len(self.held) and all(map(operator.is_, now, self.held)) and not any(map(len, self.empty))

    def same_structure(self, seq, indices) -> bool:
        """Whether the run's blocks are the same and each table holds what it held."""
        blocks = list(seq.blocks)
        return all(map(operator.is_, [blocks[i] for i in indices], self.blocks)) and self.tables_hold()

    def holds(self, seq, indices) -> bool:
        """Whether the plan still describes the run: :meth:`same_structure`, and the same train/eval
        flags and ``requires_grad`` flags."""
        return (self.same_structure(seq, indices) and [m.training for m in self.flat] == self.training
                and [p.requires_grad for p in self.all_params] == self.grad_flags)


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def run_plan(seq, indices) -> _Plan:
    """The :class:`_Plan` of the run ``indices`` of ``seq``: the last one while it holds, else a
    new one (kept per chain, dropped with it)."""
    plans = _PLANS.get(seq)
    if plans is None:
        plans = _PLANS[seq] = {}
    plan = plans.get(indices)
    if plan is None or not plan.holds(seq, indices):
        plan = _replan(seq, indices)
    return plan


def _replan(seq, indices) -> _Plan:
    """A new plan for the run ``indices``, replacing those of the runs it overlaps (the chain's
    blocks changed): a plan keeps its modules alive."""
    plans = _PLANS[seq]
    for key in [key for key in plans if not set(key).isdisjoint(indices)]:
        del plans[key]
    plan = plans[indices] = _Plan(seq, indices)
    return plan


def _watched_name(seq, where: tuple, key) -> str:
    i, module, kind, _ = where
    prefix = next((name for name, m in seq.blocks[i].named_modules() if m is module), None)
    path = key if not prefix else f"{prefix}.{key}"
    return f"{kind} blocks.{i}.{path}"


def _changed(seq, where: tuple, key: str, what: str) -> RuntimeError:
    return RuntimeError(
        f"InvertibleSequential: the {_watched_name(seq, where, key)}, needed to rebuild the activations in the "
        f"memory-free backward, {what} between the forward and the backward (for example an optimizer step, "
        f"load_state_dict or a buffer update before backward). Run backward first.")


def _check_unchanged(seq, indices, plan: _Plan, versions: list) -> None:
    """RuntimeError when a tensor the rebuild reads was modified in place, or replaced (itself or a
    module holding it), or a table of the run's modules changed, between the forward and this
    backward (as autograd raises for the tensors it saved). ``versions``: those of
    ``plan.tensors`` at the end of the forward."""
    now_versions = _versions(plan.tensors)
    if now_versions == versions and plan.same_structure(seq, indices):
        return
    blocks = list(seq.blocks)
    for i, block_modules in zip(indices, plan.modules):
        if _state.submodules(blocks[i]) != block_modules:
            raise RuntimeError(
                f"InvertibleSequential: a submodule of block {i} ({type(blocks[i]).__name__}) was replaced "
                f"between the forward and the memory-free backward, which rebuilds the activations with the "
                f"modules the forward ran. Run backward first.")
    changed = {id(t): (version, now) for t, version, now in zip(plan.tensors, versions, now_versions) if now != version}
    held = iter(plan.held)
    for where, keys in zip(plan.where, plan.keys):
        for key in keys:
            was = next(held)
            if id(was) in changed:
                version, now = changed[id(was)]
                raise _changed(seq, where, key, f"was modified by an inplace operation (version {version} -> {now})")
            if where[2] != "submodule" and where[3].get(key) is not was:
                raise _changed(seq, where, key, "was replaced by another tensor")
    for where, keys in [*zip(plan.where, plan.keys), *((where, ()) for where in plan.empty_where)]:
        now_keys = tuple(where[3])
        if now_keys != keys:
            key = next((k for k in now_keys if k not in keys), None) or next(k for k in keys if k not in now_keys)
            what = "was added to" if key in now_keys else "was removed from"
            raise RuntimeError(
                f"InvertibleSequential: the {_watched_name(seq, where, key)} {what} the modules of the memory-free "
                f"run between the forward and the backward, which rebuilds the activations with what the forward "
                f"read. Run backward first.")
    raise RuntimeError("InvertibleSequential: the modules of the memory-free run changed between the forward and the "
                       "backward, which rebuilds the activations with what the forward read. Run backward first.")


def _input_modified(seq, i: int) -> None:
    """RuntimeError for block ``i``, which wrote its input in place during the memory-free forward
    (which runs without recording, where plain autograd would raise): the rebuild needs the input
    as the block read it, and the caller's tensor must not change."""
    block = seq.blocks[i]
    raise RuntimeError(
        f"InvertibleSequential: block {i} ({type(block).__name__}) modified its input in place during the "
        f"memory-free forward (for example a subnet whose first layer works in place, such as "
        f"nn.ReLU(inplace=True), on the half it reads). The input is needed as it was to rebuild the "
        f"activations in backward, and plain autograd refuses this too: make that layer out of place.")


def _draws_not_replayed(seq, i: int) -> None:
    """NotImplementedError for block ``i``, which drew random numbers in the memory-free forward but
    whose inverse cannot replay them in the order its forward drew them (``inverse_replays_rng =
    False``: a chain of blocks inside the chain): the rebuilt input would be silently wrong."""
    block = seq.blocks[i]
    raise NotImplementedError(
        f"InvertibleSequential: block {i} ({type(block).__name__}) drew random numbers (dropout in a subnet?) "
        f"during the memory-free forward, and its inverse cannot replay them block by block, so the memory-free "
        f"backward would rebuild a wrong input. Pass its blocks to the outer chain instead of nesting the chain, "
        f"or run it outside the memory-free chain, or build the outer chain with preserve_rng_state=False if the "
        f"random numbers need not be replayed.")


def _by_index(block: nn.Module, c1: int | None) -> bool:
    """Whether the run applies ``block`` itself, by index: a :class:`Permute` (this class exactly,
    its ``forward`` not replaced on the instance) with nothing waiting in ``nn.Module.__call__``,
    unless it exchanges halves (``c1`` not None), which the chain hands on without moving data. It
    draws no random numbers and its log-det is 0, so the run keeps no RNG state for it; its
    buffers are checked as every block's are."""
    return (c1 is None and type(block) is Permute and "forward" not in block.__dict__
            and not entered_by_call(block))


def _logdet_after_permute(logdet: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The running log-det after a permutation applied by index at ``x``: as if its zeros, in
    ``logdet_dtype(x.dtype)``, were added (the sum of a block's half-precision log-dets goes on in
    float32, as in a chain that calls the permutation)."""
    dtype = logdet_dtype(x.dtype)
    if logdet is None:
        return x.new_zeros(x.shape[0], dtype=dtype)
    return logdet if logdet.dtype == dtype else logdet.to(torch.promote_types(logdet.dtype, dtype))


class _MemoryFreeChain(torch.autograd.Function):
    """Forward of a run of memory-free blocks without recording, saving only the output; backward
    rebuilds each block's input from its output and back-propagates block by block."""

    @staticmethod
    def forward(ctx, seq, indices, plan, x, context, *params):
        ctx.seq, ctx.indices = seq, indices
        x_in = x
        ctx.rng = []
        # Each block that the run applies by index (_by_index).
        ctx.by_index = []
        # Each block's split_of, read once for the forward and the backward.
        ctx.splits = []
        ctx.debug_inputs = []
        # The debug option as it was in the forward (switching it on before backward finds no inputs kept).
        ctx.check = seq.check_reconstruction
        ctx.autocast = _AutocastState(x)
        logdet = None
        flow = Flow(x)
        capture = functools.partial(_state.RngState, x)
        preserve = seq.preserve_rng_state
        # The state before the run (for the devices to fork and the rerun under create_graph=True).
        ctx.start_rng = capture() if preserve else None
        with _state.recording_rng(None, capture) if preserve else contextlib.nullcontext() as recording:
            for k, (i, block) in enumerate(zip(indices, plan.blocks)):
                if ctx.check:
                    ctx.debug_inputs.append(flow.whole())
                c1 = split_of(block)
                ctx.splits.append(c1)
                by_index = _by_index(block, c1)
                ctx.by_index.append(by_index)
                if by_index:
                    ctx.rng.append(None)
                    whole = flow.whole()
                    logdet = _logdet_after_permute(logdet, whole)
                    flow = Flow(block.permuted(whole))
                    continue
                inputs = flow.tensors()
                before = _versions(inputs)
                # The state before the block, and before each further subnet call the block marks.
                states = ([ctx.start_rng] if k == 0 else [capture()]) if preserve else None
                ctx.rng.append(states)
                if preserve:
                    recording.into(states)
                flow, block_logdet = seq.forward_flow(i, flow, context, block, c1)
                if _versions(inputs) != before:
                    _input_modified(seq, i)
                if preserve and not getattr(type(block), "inverse_replays_rng", True) and states[0].advanced():
                    _draws_not_replayed(seq, i)
                logdet = add_logdets(logdet, block_logdet)
        x = flow.whole()
        if logdet is None:
            logdet = x.new_zeros(x.shape[0], dtype=logdet_dtype(x.dtype))
        ctx.params = params
        if not plan.tables_hold():
            # A block registered or reassigned something in its forward (a subnet's buffer made at its first
            # call, a buffer updated by assignment, FSDP2 keeping its gathered parameters): the rebuild reads
            # what the modules hold now.
            plan = _replan(seq, indices)
        ctx.plan, ctx.versions = plan, _versions(plan.tensors)
        # The chain's input is saved too, for create_graph=True (docs/memory.md, "What a memory-free
        # run keeps": no memory of its own where the caller or the layer before keeps it).
        ctx.save_for_backward(x_in, x, context)
        return x, logdet

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        seq = ctx.seq
        x_in, y, context = ctx.saved_tensors
        _check_unchanged(seq, ctx.indices, ctx.plan, ctx.versions)
        if torch.is_grad_enabled():
            return _MemoryFreeChain._backward_with_graph(ctx, x_in, context, grad_y, grad_logdet)
        grads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        errors = []
        devices = ctx.start_rng.devices() if ctx.start_rng is not None else []
        flow, grad = Flow(y), Flow(grad_y)
        sharded = dist.is_available() and dist.is_initialized()
        with torch.random.fork_rng(devices=devices, enabled=seq.preserve_rng_state), ctx.autocast(), \
                _state.training_flags(ctx.plan.flags), _state.replaying_rng(None) as replaying:
            for k in reversed(range(len(ctx.indices))):
                i, states = ctx.indices[k], ctx.rng[k]
                if ctx.by_index[k]:
                    block = ctx.plan.blocks[k]
                    flow = Flow(block.unpermuted(flow.whole(), "y"))
                    grad = Flow(block.unpermuted(grad.whole(), "grad_y"))
                    if ctx.check:
                        errors.append(_reconstruction_error(i, flow, ctx.debug_inputs[k]))
                    continue
                rng = states[0] if states is not None else None
                if rng is not None:
                    rng.restore()
                block_modules = ctx.plan.modules[k]
                block = block_modules[0]
                like = x_in if k == 0 else None
                replaying.into(states)
                if ctx.plan.scratch[k] or sharded:
                    # The rebuild reruns the block (train-mode subnets included): what it writes to buffers
                    # (BatchNorm running statistics) goes to copies, so the forward's update counts once.
                    with _state.scratch_buffers(block, block_modules), gathered(block, block_modules):
                        flow, grad, pairs = seq._inverse_backward(i, block, ctx.splits[k], flow, grad, grad_logdet,
                                                                      context, rng, like)
                else:
                    flow, grad, pairs = seq._inverse_backward(i, block, ctx.splits[k], flow, grad, grad_logdet,
                                                                  context, rng, like)
                for t, g in pairs:
                    if g is not None:
                        previous = grads.get(id(t))
                        grads[id(t)] = (t, g if previous is None else previous[1] + g)
                if ctx.check:
                    errors.append(_reconstruction_error(i, flow, ctx.debug_inputs[k]))
        if ctx.check:
            seq.reconstruction_errors = sorted(errors)
        returned = {id(p) for p in ctx.params} | ({id(context)} if context is not None else set())
        for t, g in grads.values():
            if id(t) not in returned and id(t) not in ctx.plan.frozen:
                # The gathered copy of an FSDP-sharded parameter (not an input of this function):
                # its gradient goes where autograd would put it, for FSDP to reduce-scatter. A
                # parameter frozen in the forward and unfrozen before backward gets none, as with
                # plain autograd.
                t.grad = g if t.grad is None else t.grad + g
        grad_context = grads[id(context)][1] if context is not None and id(context) in grads else None
        return (None, None, None, grad.whole(), grad_context,
                *(grads[id(p)][1] if id(p) in grads else None for p in ctx.params))

    @staticmethod
    def _backward_with_graph(ctx, x, context, grad_y, grad_logdet):
        """Under ``create_graph=True``: run the forward again with grad from the saved input and
        back-propagate through it with a graph, so higher derivatives are exact."""
        seq = ctx.seq
        devices = ctx.start_rng.devices() if ctx.start_rng is not None else []
        with torch.random.fork_rng(devices=devices, enabled=seq.preserve_rng_state), ctx.autocast(), \
                _state.training_flags(ctx.plan.flags), contextlib.ExitStack() as scratch:
            for i, block_modules in zip(ctx.indices, ctx.plan.modules):
                scratch.enter_context(_state.scratch_buffers(seq.blocks[i], block_modules))
            # The forward is run again in its own order from the state before the run.
            if ctx.start_rng is not None:
                ctx.start_rng.restore()
            with torch.enable_grad():
                out, logdet = x, None
                for i in ctx.indices:
                    out, block_logdet = seq.forward_block(i, out, context)
                    logdet = block_logdet if logdet is None else logdet + block_logdet
        given_context = context is not None and context.requires_grad
        inputs = [t for t in (x, context if given_context else None, *ctx.params)
                  if t is not None and t.requires_grad]
        # A log-det that depends on nothing (only permutations or additive couplings) has no graph.
        outputs = [(t, g) for t, g in ((out, grad_y), (logdet, grad_logdet)) if t.requires_grad]
        got = iter(torch.autograd.grad([t for t, _ in outputs], inputs, [g for _, g in outputs], create_graph=True,
                                       allow_unused=True))
        grad_x = next(got) if x.requires_grad else None
        grad_context = next(got) if given_context else None
        return (None, None, None, grad_x, grad_context, *got)


def _reconstruction_error(i: int, flow: Flow, stored: torch.Tensor) -> tuple[int, float]:
    """Block ``i``'s relative error of the rebuilt input (``flow``) against the ``stored`` one
    (``check_reconstruction``)."""
    scale = stored.detach().double().norm().clamp_min(torch.finfo(torch.float64).tiny)
    return i, ((flow.whole().double() - stored.double()).norm() / scale).item()


def memory_free_run(seq, indices, x, context):
    """Runs one memory-free run eagerly: torch.compile leaves it to autograd (one graph break per
    run), because its backward rebuilds activations by running the blocks' own code
    (:func:`prepare_compile_boundary` puts it behind ``torch.compiler.disable``)."""
    plan = run_plan(seq, indices)
    return _MemoryFreeChain.apply(seq, indices, plan, x, context, *plan.params)


_BOUNDARY: list = []


def prepare_compile_boundary() -> None:
    """Replace :func:`memory_free_run` by itself behind ``torch.compiler.disable``, once. The
    decorator imports torch._dynamo, a second that ``import invkernels`` does not pay; a chain
    pays it when it is built, because a compiled model is traced before any of its code runs. The
    chain calls the function through this module, so it finds the replacement."""
    global memory_free_run
    if not _BOUNDARY:
        memory_free_run = torch.compiler.disable(memory_free_run)
        _BOUNDARY.append(memory_free_run)
