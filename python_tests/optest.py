"""The shared op tester (the pattern of torchvision's ``RoIOpTester``): every registered op, on every
kernel backend and device, derived from the op families' descriptors (invkernels.ops._registry:
one :class:`OpFamily` per family, one :class:`OpDef` per op). Nothing here names an op: a family
enters the matrix by being made.

:data:`KERNEL_BACKENDS` are ``(backend, device)`` pytest params: the C++ ops and their Triton twins
on CPU tensors (Triton under the interpreter) and on CUDA tensors (skipped without a GPU; ``make
gpu-check`` runs them, with Triton compiled). :func:`valid_args` gives each op's example arguments
for a dtype and device, :func:`reference` its float64 reference, whose functions take the op's
arguments in the op's order.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import invkernels.ops  # noqa: F401  (makes every family of the package)
from invkernels._validation import logdet_dtype
from invkernels.ops._registry import FAMILIES, Example, OpDef

NS = torch.ops.invkernels

KERNEL_BACKENDS = [
    pytest.param(("cpp", "cpu"), id="cpp-cpu"),
    pytest.param(("triton", "cpu"), id="triton-cpu", marks=pytest.mark.triton),
    pytest.param(("cpp", "cuda"), id="cpp-cuda", marks=pytest.mark.cuda),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.cuda),
]


def family_of(name: str):
    return next(f for f in FAMILIES.values() if name in f.defs)


def descriptor(name: str) -> OpDef:
    return family_of(name).defs[name]


def op_names() -> list[str]:
    """Every op of every family, in the families' order."""
    return [name for family in FAMILIES.values() for name in family.names]


def reference(name: str):
    """The float64 reference of op ``name``: the same arguments, the same outputs."""
    return descriptor(name).reference


def differentiable(name: str) -> tuple[int, ...]:
    """The argument positions of op ``name`` that get gradients (empty for a backward op)."""
    return descriptor(name).differentiable


def op(name: str, backend: str):
    """The registered op ``name`` of ``backend`` (``"cpp"`` or ``"triton"``), its family registered."""
    family = family_of(name)
    (family.cpp if backend == "cpp" else family.triton)()
    return getattr(NS, name if backend == "cpp" else name + "_triton")


def coupling_case(c=5, spatial=(3,), dtype=torch.float32, device="cpu", batch=2):
    """``(x, h affine, h additive, grad_logdet)`` of a coupling with ``c`` channels."""
    c2 = c - c // 2

    def rand(*shape, dt=dtype):
        return torch.randn(shape, dtype=dt, device=device)

    return (rand(batch, c, *spatial), rand(batch, 2 * c2, *spatial), rand(batch, c2, *spatial),
            rand(batch, dt=logdet_dtype(dtype)))


def valid_args(name, spatial=(3,), dtype=torch.float32, device="cpu", channels=5, batch=2):
    """The example arguments of op ``name`` (by default 5 channels, 2 samples)."""
    return descriptor(name).example(Example(batch, channels, tuple(spatial), dtype, device))


def replaced(args, index, value):
    return (*args[:index], value, *args[index + 1:])


def op_cases() -> list:
    """``(name, variant)`` pytest params: every op in its example setting and in each of its variants."""
    return [pytest.param((name, variant), id=name if variant is None else f"{name}-{variant}")
            for name in op_names() for variant in (None, *descriptor(name).variants)]


def case_args(case, **kwargs):
    """valid_args of ``case = (name, variant)`` with the variant's replacements."""
    name, variant = case
    args = valid_args(name, **kwargs)
    for index, value in (descriptor(name).variants[variant] if variant is not None else {}).items():
        args = replaced(args, index, value(args) if callable(value) else value)
    return args


def to_device(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def on_meta(args):
    return tuple(to_device(a, "meta") for a in args)


def bad_arguments() -> list[tuple[str, int, object]]:
    """(op, argument index, bad value): every check of every op, in the C++ kernels' order. The values
    are CPU tensors; the matrix moves them to the device under test."""
    return [(name, index, value) for name in op_names() for index, value in descriptor(name).bad_arguments()]


# Python prints torch.float32 where C++ prints Float.
_CPP_DTYPE_NAMES = {str(torch.float32): "Float", str(torch.float64): "Double", str(torch.long): "Long",
                    str(torch.int32): "Int"}


def refusal(call) -> str:
    """The message of the ValueError ``call()`` raises, with dtypes spelled the C++ way."""
    with pytest.raises(ValueError) as info:
        call()
    text = str(info.value)
    for python_name, cpp_name in _CPP_DTYPE_NAMES.items():
        text = text.replace(python_name, cpp_name)
    return text


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def in_float64(args):
    """The arguments with every floating-point tensor in float64 (the reference's inputs)."""
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def strided(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a non-contiguous view (every other element of a buffer twice as large)."""
    return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]


# The 1x1 convolution's operands and layouts (test_conv1x1.py, test_triton_invconv.py).


def operands(shape, dtype=torch.float64, folded=True):
    c = shape[1]
    x = torch.randn(shape, dtype=dtype)
    w = torch.randn(c, c, dtype=dtype) / c**0.5
    if not folded:
        return x, w, None, None
    return x, w, 0.5 * torch.randn(c, dtype=dtype), 0.3 * torch.randn(c, dtype=dtype)


def layouts(x):
    """The same values in hostile layouts: channels-last (-like), spatial dims transposed (a copy),
    a strided slice along the channels."""
    out = {"contiguous": x}
    if x.dim() >= 3:
        out["channels_last"] = x.movedim(1, -1).contiguous().movedim(-1, 1)
    if x.dim() >= 4:
        out["transposed"] = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    out["sliced"] = torch.stack([x, torch.zeros_like(x)], dim=2).select(2, 0)
    return out


def as_double(*ts):
    return [None if t is None else t.detach().double() for t in ts]


def differentiable_positions(name, args):
    return [i for i in differentiable(name) if args[i] is not None]


def differentiable_call(case, backend, device):
    """``(call, inputs)``: the op of ``case`` as a function of its differentiable float64 arguments."""
    name, args = case[0], list(case_args(case, spatial=(2,), dtype=torch.float64, device=device))
    positions = differentiable_positions(name, args)
    inputs = [args[i].clone().requires_grad_() for i in positions]

    def call(*tensors):
        full = list(args)
        for i, t in zip(positions, tensors):
            full[i] = t
        return op(name, backend)(*full)

    return call, inputs


class OpsCalled(TorchDispatchMode):
    """Records the name of every op dispatched (backward included)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))
