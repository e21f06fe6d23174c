"""The descriptor of an op family (coupling, ActNorm, ...) and its registration on every backend.

Every schema is written once, in csrc/invkernels.cpp. A family describes each of its ops once, as
an :class:`OpDef`: its argument checks and the empty outputs of valid arguments (what the fakes
and the Triton twins run), its float64 reference, example arguments, the other settings of its
non-tensor arguments, bad arguments, the kind of each output, the arguments it is differentiable
in. Everything generic is derived from the family's :class:`OpFamily`, which enters the registry
:data:`FAMILIES` when it is made:

- one fake implementation per op (checks, then empty outputs), which serves the C++ op
  ``invkernels::<name>`` and its Triton twin ``invkernels::<name>_triton`` alike;
- the Triton twins, defined by one loop over the registered C++ schemas
  (:func:`register_triton_twins`): each twin is a ``torch.library.custom_op`` with the C++ op's
  schema but the name, whose implementation runs the op's checks and then the family's Triton
  launcher (``LAUNCHERS[name]`` of its Triton module). A ``custom_op`` around the launch, with
  ``register_fake``, passes ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)`` under
  ``TRITON_INTERPRET=1``; ``triton_op`` + ``wrap_triton`` fails opcheck there (DESIGN.md). The
  Triton backend therefore needs the compiled extension: it holds the schemas;
- autograd for both backends from the family's one formula (``register_autograd(suffix, ops)``);
- the ahead-of-time compilation of its Triton kernels (invkernels.triton.aot runs the launches of
  the Triton module's ``aot_cases``);
- the op matrix of the tests (python_tests/test_op_matrix.py): every op on every backend against
  its reference, with tolerances by output kind.

Registration happens on a backend's first use. After that, a call only looks the ops up, which
keeps the lookup traceable by torch.compile.
"""

from __future__ import annotations

import importlib
import types
from typing import Any, Callable, Mapping, NamedTuple

import torch

from invkernels import _backend, _validation

# The kinds of op outputs, by what one output element sums; a comparison against the reference
# scales its absolute tolerance with that length (python_tests/tolerances.py). ``x`` is the op's
# first tensor argument with a batch (or, for the LU weight's ops, its first matrix).
OUTPUT_KINDS = {
    "elementwise": "a function of a fixed number of input elements (values, element gradients)",
    "logdet": "a sum over one sample's elements (a log-det): x.numel() / batch terms",
    "param_grad": "a sum over the batch and positions (a per-channel parameter's gradient): x.numel() / channels",
    "channel_mix": "a sum over the channels (a 1x1 product, the LU weight and its gradients): channels terms",
    "param_grad_channel_mix": "a sum over the batch, positions and channels (a folded ActNorm's gradient "
                              "behind the 1x1 product): x.numel() terms",
    "conditioned": "a function of one element whose rounding error scales with the data (a gradient through "
                   "a spline: the bin's partials, of the size of its slope over its width, chained to knots "
                   "that are sums over the bins): compared at twice the error of the reference computed in "
                   "the input's dtype",
}


class Example(NamedTuple):
    """Sizes, dtype and device of an op's example arguments (:attr:`OpDef.example`)."""

    batch: int = 2
    channels: int = 5
    spatial: tuple[int, ...] = (3,)
    dtype: torch.dtype = torch.float32
    device: Any = "cpu"

    def randn(self, *shape: int, dtype: torch.dtype | None = None, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(shape, dtype=dtype or self.dtype, device=self.device)

    def batched(self, channels: int | None = None, scale: float = 1.0) -> torch.Tensor:
        """``[batch, channels, *spatial]`` (by default the example's channels)."""
        return self.randn(self.batch, self.channels if channels is None else channels, *self.spatial, scale=scale)

    def per_channel(self, scale: float = 1.0) -> torch.Tensor:
        return self.randn(self.channels, scale=scale)

    def grad_logdet(self) -> torch.Tensor:
        """A log-det's gradient: ``[batch]`` in the log-det dtype of the example's dtype."""
        return self.randn(self.batch, dtype=_validation.logdet_dtype(self.dtype))


_NO_VARIANTS: Mapping[str, Mapping[int, object]] = types.MappingProxyType({})


class OpDef(NamedTuple):
    """The descriptor of one registered op.

    Args:
        check: ``check(name, *args, **kwargs)`` validates the schema's arguments (keyword-only ones
            by keyword): a ValueError naming the op ``name``, the argument and its value, with the
            wording of csrc/checks.h. It checks everything any backend checks.
        outputs: ``outputs(*args, **kwargs)`` returns empty outputs with the shapes and dtypes the
            op returns for valid arguments (contiguous).
        reference: the float64 oracle (invkernels.reference): the op's arguments, its outputs.
        example: ``example(Example(...))`` returns valid arguments of the given sizes, dtype and
            device.
        output_kinds: the kind of each output, a key of :data:`OUTPUT_KINDS`.
        differentiable: the argument positions that get gradients through the op's autograd (empty
            for a backward op).
        variants: the other settings of the op's non-tensor (or optional) arguments, as name ->
            {argument position: value} replacing the example's; a value may be a function of the
            example's arguments (a tensor that must match the setting, e.g. parameters for fewer
            channels).
        bad_arguments: ``bad_arguments()`` returns ``[(position, value)]``: one argument of the
            example (sizes and dtype of ``Example()``, CPU) replaced by a value every backend
            refuses, one per check, in the C++ kernels' order.
    """

    check: Callable[..., None]
    outputs: Callable[..., object]
    reference: Callable[..., object] | None = None
    example: Callable[[Example], tuple] | None = None
    output_kinds: tuple[str, ...] = ()
    differentiable: tuple[int, ...] = ()
    variants: Mapping[str, Mapping[int, object]] = _NO_VARIANTS
    bad_arguments: Callable[[], list[tuple[int, object]]] | None = None


def contiguous_like(t: torch.Tensor) -> torch.Tensor:
    """An empty contiguous tensor with the shape, dtype and device of ``t`` (a fake output)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def logdet_like(x: torch.Tensor) -> torch.Tensor:
    """An empty log-det of a batch ``x``: ``[B]`` in ``logdet_dtype(x.dtype)`` (a fake output)."""
    return x.new_empty(x.shape[0], dtype=_validation.logdet_dtype(x.dtype))


def schema_of(name: str) -> str:
    """The schema of the registered C++ op ``invkernels::<name>`` without its name:
    ``"(Tensor x, ...) -> (...)"``."""
    from invkernels import _extension  # noqa: PLC0415

    _extension.load()
    schema = str(getattr(torch.ops.invkernels, name).default._schema)
    return schema[schema.index("("):]


def _checked(name: str, op: OpDef, run: Callable) -> Callable:
    """Op ``name``'s checks, then ``run`` with the same arguments."""

    def impl(*args, **kwargs):
        op.check(name, *args, **kwargs)
        return run(*args, **kwargs)

    return impl


def make_fake(name: str, op: OpDef) -> Callable:
    """The fake implementation of op ``name``: its checks, then its empty outputs."""
    return _checked(name, op, op.outputs)


def register_triton_twins(defs: Mapping[str, OpDef], fakes: Mapping[str, Callable],
                          launchers: Mapping[str, Callable]) -> None:
    """Define ``invkernels::<name>_triton`` for every op of ``defs``: the schema of the C++ op
    ``<name>``, the fake ``fakes[name]`` and, as implementation, the op's checks followed by
    ``launchers[name]`` (called with the schema's arguments: positional ones by position,
    keyword-only ones by keyword)."""
    missing = [name for name in defs if name not in launchers]
    if missing:
        raise ValueError(f"register_triton_twins: no Triton launcher for the ops {missing}")
    for name, op in defs.items():
        twin = torch.library.custom_op(f"invkernels::{name}_triton", _checked(name, op, launchers[name]),
                                       mutates_args=(), schema=schema_of(name))
        twin.register_fake(fakes[name])


def refused(*cases: tuple[int, Callable[[], object]]) -> Callable[[], list[tuple[int, object]]]:
    """:attr:`OpDef.bad_arguments` from ``(position, make_value)`` pairs (values made when asked)."""
    return lambda: [(position, make()) for position, make in cases]


# The Autograd kernels of the C++ backward ops (compiled_autograd), kept alive with the module.
_BACKWARD_AUTOGRAD = torch.library.Library("invkernels", "IMPL")


def compiled_autograd(forward_ops: tuple[str, ...], backward_op: str, fused: Callable, reference_vjp: Callable,
                      tensors: int) -> None:
    """For ops whose autograd is compiled (csrc/autograd.cpp): checks that the extension has it for
    ``forward_ops``, and registers the Autograd kernel of their backward op ``backward_op``, which
    that autograd calls through the dispatcher under ``create_graph=True``: ``reference_vjp`` (the
    same formula in differentiable tensor ops) when grad mode is on and one of the first ``tensors``
    arguments (tensors or None) requires grad, else ``fused`` (the op) below autograd."""
    for op in forward_ops:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"invkernels::{op}", "Autograd"):
            raise RuntimeError(f"invkernels: the compiled extension has no autograd for invkernels::{op}; rebuild "
                               "it (`make build`)")

    def kernel(*args, **kwargs):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:tensors]):
            return reference_vjp(*args, **kwargs)
        with torch._C._AutoDispatchBelowAutograd():
            return fused(*args, **kwargs)

    _BACKWARD_AUTOGRAD.impl(backward_op, kernel, "Autograd")


# Every op family made, by name (in the order they were made).
FAMILIES: dict[str, "OpFamily"] = {}


class OpFamily:
    """The descriptor of one op family, and its registered ops per backend. Making one enters it
    in :data:`FAMILIES`.

    Args:
        name: the family's name (``"coupling"``): the key in :data:`FAMILIES`.
        defs: op name in ``torch.ops.invkernels`` -> :class:`OpDef`, in the order of ``ops_type``'s
            fields.
        ops_type: a NamedTuple type holding one backend's ops.
        triton_module: the module whose ``LAUNCHERS`` maps every op name to its Triton launcher,
            whose ``gpu_configs()`` lists the tiles its kernels launch with on a GPU and whose
            ``aot_cases(dtype)`` yields launcher calls ``(op, args)`` on meta tensors that reach
            every one of them (invkernels.triton.aot).
        register_autograd: ``register_autograd(suffix, ops)`` registers autograd for one backend
            (``suffix`` is ``""`` or ``"_triton"``).
    """

    def __init__(self, name: str, defs: Mapping[str, OpDef], ops_type: type[NamedTuple], triton_module: str,
                 register_autograd: Callable[[str, NamedTuple], None]):
        if name in FAMILIES:
            raise ValueError(f"OpFamily: a family named {name!r} exists already")
        if len(defs) != len(ops_type._fields):
            raise ValueError(f"OpFamily {name!r}: {len(defs)} ops described but {ops_type.__name__} holds "
                             f"{len(ops_type._fields)}")
        self.name = name
        self.defs = dict(defs)
        self.names = tuple(self.defs)
        self.fakes = {name: make_fake(name, op) for name, op in self.defs.items()}
        self._ops_type = ops_type
        self.triton_module = triton_module
        self._register_autograd = register_autograd
        self._registered: dict[str, NamedTuple] = {}
        FAMILIES[name] = self

    def _bind(self, suffix: str) -> NamedTuple:
        ns = torch.ops.invkernels
        return self._ops_type(*(getattr(ns, name + suffix).default for name in self.names))

    def cpp(self) -> NamedTuple:
        """The C++ ops (CPU and CUDA kernels), with autograd and fake implementations registered."""
        if "cpp" not in self._registered:
            from invkernels import _extension  # noqa: PLC0415

            _extension.load()
            for name, fake in self.fakes.items():
                torch.library.register_fake(f"invkernels::{name}", fake)
            ops = self._bind("")
            self._register_autograd("", ops)
            self._registered["cpp"] = ops
        return self._registered["cpp"]

    def triton(self) -> NamedTuple:
        """The Triton ops, defined from the C++ schemas with autograd registered (imports triton
        and loads the compiled extension on first use)."""
        if "triton" not in self._registered:
            launchers = importlib.import_module(self.triton_module).LAUNCHERS
            register_triton_twins(self.defs, self.fakes, launchers)
            ops = self._bind("_triton")
            self._register_autograd("_triton", ops)
            self._registered["triton"] = ops
        return self._registered["triton"]

    def prepare(self, backend: str) -> None:
        """Register ``backend``'s ops now, so later (possibly compiled) calls only look them up."""
        if backend == "cpp":
            self.cpp()
        elif backend == "triton":
            self.triton()

    def for_tensor(self, backend: str | None, x: torch.Tensor) -> NamedTuple | None:
        """The ops of the chosen backend for ``x``; None means the pure-PyTorch reference (also the
        fallback of the C++ backend for devices other than CPU and CUDA)."""
        name = _backend.resolve(backend)
        if name == "reference" or (name == "cpp" and x.device.type not in ("cpu", "cuda")):
            return None
        ops = self._registered.get(name)
        return ops if ops is not None else (self.triton() if name == "triton" else self.cpp())
