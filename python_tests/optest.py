"""The shared op tester (the pattern of torchvision's ``RoIOpTester``): every registered op, on every
kernel backend and device, with valid arguments built in one place and its float64 reference.

:data:`KERNEL_BACKENDS` are ``(backend, device)`` pytest params: the C++ ops and their Triton twins
on CPU tensors (Triton under the interpreter) and on CUDA tensors (skipped without a GPU; ``make
gpu-check`` runs them, with Triton compiled). :func:`valid_args` gives each op's arguments for a
dtype and device, :data:`REFERENCE` its float64 reference in ``invkernels.reference``, whose
functions take the op's arguments in the op's order.
"""

from __future__ import annotations

import pytest
import torch

from invkernels import reference as R
from invkernels._validation import logdet_dtype
from invkernels.ops import actnorm, coupling, invconv
from invkernels.reference import coupling as RC
from invkernels.reference import invconv as RI

FAMILIES = (coupling, actnorm, invconv)
NS = torch.ops.invkernels

KERNEL_BACKENDS = [
    pytest.param(("cpp", "cpu"), id="cpp-cpu"),
    pytest.param(("triton", "cpu"), id="triton-cpu", marks=pytest.mark.triton),
    pytest.param(("cpp", "cuda"), id="cpp-cuda", marks=pytest.mark.cuda),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.cuda),
]

# The float64 reference of every op: the same arguments, the same outputs.
REFERENCE = {
    "affine_coupling_fwd": R.affine_coupling_fwd,
    "affine_coupling_inv": R.affine_coupling_inv,
    "affine_coupling_bwd": R.affine_coupling_vjp,
    "affine_coupling_inv_bwd": RC.affine_coupling_inv_bwd,
    "additive_coupling_fwd": R.additive_coupling_fwd,
    "additive_coupling_inv": R.additive_coupling_inv,
    "additive_coupling_bwd": R.additive_coupling_vjp,
    "additive_coupling_inv_bwd": RC.additive_coupling_inv_bwd,
    "actnorm_fwd": R.actnorm_fwd,
    "actnorm_inv": R.actnorm_inv,
    "actnorm_bwd": R.actnorm_vjp,
    "invconv_weight": RI.invconv_weight,
    "invconv_weight_bwd": RI.invconv_weight_vjp,
    "conv1x1": RI.conv1x1,
    "conv1x1_bwd": RI.conv1x1_vjp,
}

# The argument positions of the differentiable forward ops that get gradients (perm and sign are
# constants of the LU parameterization).
DIFFERENTIABLE = {
    "affine_coupling_fwd": (0, 1),
    "affine_coupling_inv": (0, 1),
    "additive_coupling_fwd": (0, 1),
    "additive_coupling_inv": (0, 1),
    "actnorm_fwd": (0, 1, 2),
    "actnorm_inv": (0, 1, 2),
    "invconv_weight": (1, 2, 4),
    "conv1x1": (0, 1, 2, 3),
}


def op_names() -> list[str]:
    """Every op of every family, in the families' order."""
    return [name for family in FAMILIES for name in family._FAMILY.names]


def op(name: str, backend: str):
    """The registered op ``name`` of ``backend`` (``"cpp"`` or ``"triton"``), its family registered."""
    family = next(f for f in FAMILIES if name in f._FAMILY.names)
    (family.cpp_ops if backend == "cpp" else family.triton_ops)()
    return getattr(NS, name if backend == "cpp" else name + "_triton")


def coupling_case(c=5, spatial=(3,), dtype=torch.float32, device="cpu", batch=2):
    """``(x, h affine, h additive, grad_logdet)`` of a coupling with ``c`` channels."""
    c2 = c - c // 2

    def rand(*shape, dt=dtype):
        return torch.randn(shape, dtype=dt, device=device)

    return (rand(batch, c, *spatial), rand(batch, 2 * c2, *spatial), rand(batch, c2, *spatial),
            rand(batch, dt=logdet_dtype(dtype)))


def weight_factors(c=5, dtype=torch.float32, device="cpu"):
    """LU factors ``(perm, lower, upper, sign, log_s)`` (full matrices: the op reads one triangle each)."""
    sign = torch.where(torch.rand(c) < 0.5, -1.0, 1.0)
    return (torch.randperm(c).to(device), *(t.to(dtype=dtype, device=device) for t in (
        0.5 * torch.randn(c, c), 0.5 * torch.randn(c, c), sign, 0.3 * torch.randn(c))))


def valid_args(name, spatial=(3,), dtype=torch.float32, device="cpu", channels=5, batch=2):
    """Valid arguments of op ``name`` (by default 5 channels, 2 samples)."""
    c = channels
    x, h, ha, gl = coupling_case(c, spatial, dtype, device, batch)
    g = torch.randn_like(x)
    b, ls = torch.randn(c, dtype=dtype, device=device), 0.3 * torch.randn(c, dtype=dtype, device=device)
    w = torch.randn(c, c, dtype=dtype, device=device) / c**0.5
    return {
        "affine_coupling_fwd": (x, h, "exp", 2.0),
        "affine_coupling_inv": (x, h, "exp", 2.0),
        "affine_coupling_bwd": (g, gl, x, h, "sigmoid", 2.0, True),
        "affine_coupling_inv_bwd": (x, h, g, gl, "exp", 2.0),
        "additive_coupling_fwd": (x, ha),
        "additive_coupling_inv": (x, ha),
        "additive_coupling_bwd": (g, True),
        "additive_coupling_inv_bwd": (x, ha, g),
        "actnorm_fwd": (x, b, ls),
        "actnorm_inv": (x, b, ls),
        "actnorm_bwd": (g, gl, x, b, ls, False),
        "invconv_weight": weight_factors(c, dtype, device),
        "invconv_weight_bwd": (w, *weight_factors(c, dtype, device)),
        "conv1x1": (x, w, b, ls),
        "conv1x1_bwd": (g, x, w, b, ls, [True, True, True]),
    }[name]


def replaced(args, index, value):
    return (*args[:index], value, *args[index + 1:])


# The other settings of each op's non-tensor arguments (and optional tensors), as replacements of
# valid_args' positions: the matrix runs every op in each of them.
VARIANTS = {
    "affine_coupling_fwd": {"sigmoid": {2: "sigmoid"}},
    "affine_coupling_inv": {"sigmoid": {2: "sigmoid", 3: 0.5}},
    "affine_coupling_bwd": {"exp-forward": {4: "exp", 6: False}},
    "affine_coupling_inv_bwd": {"sigmoid": {4: "sigmoid"}},
    "additive_coupling_bwd": {"forward": {1: False}},
    "actnorm_bwd": {"reverse": {5: True}},
    "conv1x1": {"unfolded": {2: None, 3: None}},
    "conv1x1_bwd": {"unfolded": {3: None, 4: None, 5: [True, True, False]}, "grad-x-only": {5: [True, False, False]}},
}


def op_cases() -> list:
    """``(name, variant)`` pytest params: every op in its valid_args setting and in each of its VARIANTS."""
    return [pytest.param((name, variant), id=name if variant is None else f"{name}-{variant}")
            for name in op_names() for variant in (None, *VARIANTS.get(name, {}))]


def case_args(case, **kwargs):
    """valid_args of ``case = (name, variant)`` with the variant's replacements."""
    name, variant = case
    args = valid_args(name, **kwargs)
    for index, value in (VARIANTS[name][variant] if variant is not None else {}).items():
        args = replaced(args, index, value)
    return args


def to_device(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def on_meta(args):
    return tuple(to_device(a, "meta") for a in args)


# (op, argument index, bad value): every check of every op, in the C++ kernels' order. The values
# are CPU tensors; the matrix moves them to the device under test.
BAD_ARGUMENTS = [
    ("affine_coupling_fwd", 0, torch.randn(5)),
    ("affine_coupling_fwd", 0, torch.randn(2, 1, 3)),
    ("affine_coupling_fwd", 0, torch.ones(2, 5, 3, dtype=torch.long)),
    ("affine_coupling_fwd", 1, torch.randn(2, 5, 3)),
    ("affine_coupling_fwd", 1, torch.randn(3, 6, 3)),
    ("affine_coupling_fwd", 1, torch.randn(2, 6, 4)),
    ("affine_coupling_fwd", 1, torch.randn(2, 6)),
    ("affine_coupling_fwd", 1, torch.randn(2, 6, 3, dtype=torch.float64)),
    ("affine_coupling_fwd", 2, "softplus"),
    ("affine_coupling_fwd", 3, -1.0),
    ("affine_coupling_inv", 1, torch.randn(2, 4, 3)),
    ("affine_coupling_inv", 3, 1e39),
    ("affine_coupling_bwd", 0, torch.randn(2, 4, 3)),
    ("affine_coupling_bwd", 0, torch.randn(2, 5, 3, dtype=torch.float64)),
    ("affine_coupling_bwd", 1, torch.randn(3)),
    ("affine_coupling_bwd", 1, torch.randn(2, dtype=torch.float64)),
    ("affine_coupling_bwd", 3, torch.randn(2, 3, 3)),
    ("affine_coupling_bwd", 4, "softplus"),
    ("affine_coupling_inv_bwd", 1, torch.randn(2, 5, 3)),
    ("affine_coupling_inv_bwd", 2, torch.randn(2, 5, 4)),
    ("affine_coupling_inv_bwd", 3, torch.randn(1)),
    ("affine_coupling_inv_bwd", 5, 0.0),
    ("additive_coupling_fwd", 1, torch.randn(2, 6, 3)),
    ("additive_coupling_fwd", 1, torch.randn(3, 3, 3)),
    ("additive_coupling_inv", 0, torch.randn(2, 1, 3)),
    ("additive_coupling_inv", 1, torch.randn(2, 3, 3, dtype=torch.float64)),
    ("additive_coupling_bwd", 0, torch.randn(2)),
    ("additive_coupling_bwd", 0, torch.randn(2, 1, 3)),
    ("additive_coupling_bwd", 0, torch.ones(2, 5, 3, dtype=torch.long)),
    ("additive_coupling_inv_bwd", 1, torch.randn(2, 2, 3)),
    ("additive_coupling_inv_bwd", 2, torch.randn(2, 4, 3)),
    ("additive_coupling_inv_bwd", 2, torch.randn(2, 5, 3, dtype=torch.float64)),
    ("actnorm_fwd", 0, torch.randn(5)),
    ("actnorm_fwd", 1, torch.randn(4)),
    ("actnorm_fwd", 2, torch.randn(5, dtype=torch.float64)),
    ("actnorm_inv", 1, torch.randn(5, 1)),
    ("actnorm_bwd", 0, torch.randn(2, 5, 4)),
    ("actnorm_bwd", 0, torch.randn(2, 5, 3, dtype=torch.float64)),
    ("actnorm_bwd", 1, torch.randn(3)),
    ("actnorm_bwd", 1, torch.randn(2, dtype=torch.float64)),
    ("actnorm_bwd", 3, torch.randn(4)),
    ("actnorm_bwd", 4, torch.randn(5, dtype=torch.float64)),
    ("invconv_weight", 0, torch.randperm(4)),
    ("invconv_weight", 0, torch.arange(5, dtype=torch.int32)),
    ("invconv_weight", 1, torch.randn(5, 4)),
    ("invconv_weight", 1, torch.ones(5, 5, dtype=torch.long)),
    ("invconv_weight", 2, torch.randn(4, 4)),
    ("invconv_weight", 2, torch.randn(5, 5, dtype=torch.float64)),
    ("invconv_weight", 3, torch.ones(4)),
    ("invconv_weight", 4, torch.randn(5, dtype=torch.float64)),
    ("invconv_weight_bwd", 0, torch.randn(4, 4)),
    ("invconv_weight_bwd", 0, torch.randn(5, 5, dtype=torch.float64)),
    ("invconv_weight_bwd", 5, torch.randn(3)),
    ("conv1x1", 0, torch.randn(5)),
    ("conv1x1", 0, torch.ones(2, 5, 3, dtype=torch.long)),
    ("conv1x1", 1, torch.randn(4, 4)),
    ("conv1x1", 1, torch.randn(5, 5, dtype=torch.float64)),
    ("conv1x1", 2, None),
    ("conv1x1", 2, torch.randn(4)),
    ("conv1x1", 3, torch.randn(5, dtype=torch.float64)),
    ("conv1x1_bwd", 0, torch.randn(2, 5, 4)),
    ("conv1x1_bwd", 0, torch.randn(2, 5, 3, dtype=torch.float64)),
    ("conv1x1_bwd", 2, torch.randn(5, 4)),
    ("conv1x1_bwd", 4, None),
]

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
