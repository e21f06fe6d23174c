"""One matrix for every registered op on every kernel backend and device (python_tests/optest.py):
the float64 reference in float32 and float64, float16 / bfloat16 against the reference's own error
in that dtype, non-contiguous and channels-last inputs, empty batches and zero spatial sizes,
gradcheck and gradgradcheck of the differentiable ops, ``torch.library.opcheck``, and every bad
argument refused with the C++ CPU kernel's message (by the op and by its fake). The CUDA cases run
where a GPU is visible (``make gpu-check``)."""

import math
import os

import pytest
import torch

from optest import (
    KERNEL_BACKENDS,
    NS,
    OpsCalled,
    as_tuple,
    bad_arguments,
    case_args,
    descriptor,
    differentiable,
    differentiable_call,
    differentiable_positions,
    in_float64,
    on_meta,
    op,
    op_cases,
    op_names,
    reference,
    refusal,
    replaced,
    strided,
    to_device,
    valid_args,
)
from tolerances import assert_close, conditioned_atol, reduction_length

from invkernels.ops._registry import OUTPUT_KINDS

NAMES = op_names()
CASES = op_cases()
BAD_ARGUMENTS = bad_arguments()
# The ops with a batch and spatial positions (all but the 1x1 convolution's weight assembly).
BATCHED = [p for p in CASES if any(isinstance(a, torch.Tensor) and a.dim() >= 3 for a in case_args(p.values[0]))]
DIFFERENTIABLE_CASES = [p for p in CASES if differentiable(p.values[0][0])]
CUDA_BACKENDS = [p for p in KERNEL_BACKENDS if p.values[0][1] == "cuda"]


def registered_ops() -> set[str]:
    """Every op the dispatcher knows in the invkernels namespace but the Triton twins."""
    names = (n.split("::", 1)[1].split(".", 1)[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("invkernels::"))
    return {n for n in names if not n.endswith("_triton")}


def test_every_registered_op_has_a_complete_descriptor():
    """A schema in csrc/invkernels.cpp without a family descriptor would be silently untested."""
    registered = registered_ops()
    assert registered == set(NAMES), (f"registered ops without a descriptor: {sorted(registered - set(NAMES))}; "
                                      f"descriptors without a registered op: {sorted(set(NAMES) - registered)}")
    for name in NAMES:
        d = descriptor(name)
        assert callable(d.reference) and callable(d.example), name
        outputs = as_tuple(d.outputs(*valid_args(name)))
        assert len(d.output_kinds) == len(outputs) and set(d.output_kinds) <= set(OUTPUT_KINDS), name
        assert d.bad_arguments is not None and d.bad_arguments(), name
        schema = getattr(NS, name).default._schema
        assert all(0 <= i < len(schema.arguments) for i in d.differentiable), name
        for variant in d.variants.values():
            assert all(0 <= i < len(schema.arguments) for i in variant), name


def main_tensor(args):
    """The op's first argument with a batch (or the LU weight's first matrix)."""
    return next(a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2)


def assert_matches_reference(name, args, outputs):
    """Every output against the float64 reference, at the tolerance of its dtype scaled by the
    number of terms its kind sums (tolerances.reduction_length); the output's dtype is the one the
    reference gives for inputs of this dtype (the log-det's float32 for half inputs)."""
    x = main_tensor(args)
    want = as_tuple(reference(name)(*in_float64(args)))
    low = as_tuple(reference(name)(*args)) if x.dtype != torch.float64 else want
    assert len(outputs) == len(want) == len(descriptor(name).output_kinds)
    for got, expected, dtype_ref, kind in zip(outputs, want, low, descriptor(name).output_kinds):
        assert (got is None) == (expected is None)
        if got is not None:
            assert got.device == x.device
            assert got.dtype == dtype_ref.dtype, (name, kind, got.dtype, dtype_ref.dtype)
            if kind == "conditioned":
                assert_close(got, expected, atol=conditioned_atol(got, dtype_ref, expected))
            else:
                assert_close(got, expected, reduce_len=reduction_length(kind, x))


ELEMENTWISE = [(name, k) for name in NAMES for k, kind in enumerate(descriptor(name).output_kinds)
               if kind == "elementwise"]


@pytest.mark.parametrize("perturbation", ["one-element-off-by-1e-4", "computed-in-bfloat16"])
@pytest.mark.parametrize("name,index", ELEMENTWISE, ids=[f"{n}-{k}" for n, k in ELEMENTWISE])
def test_a_perturbed_elementwise_output_fails_the_matrix(name, index, perturbation):
    """The C++ kernel's float32 output of the many-tiles case (64 channels, 3 x 17 x 9), one
    element moved by 1e-4 or the whole output rounded to bfloat16, is refused; a tolerance scaled
    by the input's size (atol 0.059 here) lets the element moved by 1e-4 through."""
    args = case_args((name, None), spatial=(17, 9), channels=64, batch=3)
    outputs = list(as_tuple(op(name, "cpp")(*args)))
    assert_matches_reference(name, args, tuple(outputs))
    exact = as_tuple(reference(name)(*in_float64(args)))[index]
    out = outputs[index]
    if perturbation == "computed-in-bfloat16":
        outputs[index] = out.to(torch.bfloat16).float()
    else:
        # The element of least magnitude: there rtol cannot absorb the 1e-4.
        at = exact.abs().flatten().argmin()
        outputs[index] = out.flatten().index_add(0, at.view(1), torch.full((1,), 1e-4)).view_as(out)
    with pytest.raises(AssertionError):
        assert_matches_reference(name, args, tuple(outputs))
    if perturbation == "one-element-off-by-1e-4":
        assert_close(outputs[index], exact, reduce_len=main_tensor(args).numel())


# Inputs [B, C], [B, C, S], [B, C, H, W] and [B, C, D, H, W] (the 1x1 convolution routes each
# differently).
# Inputs [B, C, D, H, W] of one sample with an even channel count, and [B, C, S] with 3 channels
# (a passthrough half of one channel).
SHAPES = {
    "vectors": {"spatial": ()},
    "1-d": {"spatial": (3,)},
    "2-d": {"spatial": (2, 3)},
    "3-d-one-sample-even-channels": {"spatial": (2, 2, 3), "channels": 6, "batch": 1},
    "3-channels": {"spatial": (5,), "channels": 3, "batch": 3},
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_matches_the_float64_reference(backend_device, case, dtype, shape):
    backend, device = backend_device
    name, args = case[0], case_args(case, dtype=dtype, device=device, **shape)
    assert_matches_reference(name, args, as_tuple(op(name, backend)(*args)))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_matches_the_float64_reference_over_many_tiles(backend_device, case):
    """64 channels, 3 samples of 17 x 9 positions: several programs, thread blocks and chunks per
    launch, and partial tiles at every edge."""
    backend, device = backend_device
    name, args = case[0], case_args(case, spatial=(17, 9), device=device, channels=64, batch=3)
    assert_matches_reference(name, args, as_tuple(op(name, backend)(*args)))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_non_contiguous_inputs(backend_device, case):
    backend, device = backend_device
    name, args = case[0], case_args(case, spatial=(2, 3), dtype=torch.float64, device=device)
    views = tuple(strided(a) if isinstance(a, torch.Tensor) else a for a in args)
    assert not any(v.is_contiguous() for v in views if isinstance(v, torch.Tensor) and v.numel() > 1)
    assert_matches_reference(name, args, as_tuple(op(name, backend)(*views)))


@pytest.mark.parametrize("case", BATCHED)
@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_channels_last_inputs(backend_device, case):
    backend, device = backend_device
    name, args = case[0], case_args(case, spatial=(2, 3), dtype=torch.float64, device=device)
    views = tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4
                  else a for a in args)
    assert any(not v.is_contiguous() for v in views if isinstance(v, torch.Tensor))
    assert_matches_reference(name, args, as_tuple(op(name, backend)(*views)))


def relative_error(t: torch.Tensor, exact: torch.Tensor) -> float:
    return ((t.double() - exact).norm() / exact.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_reduced_precision_error_is_at_most_twice_the_reference_in_that_dtype(backend_device, case, dtype):
    """Half inputs: every output in the reference's dtype, no further from the float64 result than
    twice the reference run in that dtype (the kernels compute in float32). A log-det, a float32
    sum of one sample's terms, may also be off by the rounding of those terms, ``sqrt(n)`` float32
    steps relative (n terms per sample): one draw's reference error can fall well below it by
    cancellation, and which of two float32 sums cancels more is the luck of the summation order."""
    backend, device = backend_device
    name, args = case[0], case_args(case, spatial=(6, 6), dtype=dtype, device=device, channels=8)
    exact = as_tuple(reference(name)(*in_float64(args)))
    low = as_tuple(reference(name)(*args))
    ours = as_tuple(op(name, backend)(*args))
    # The interpreter truncates Triton's bfloat16 stores where a GPU rounds them to nearest (checked:
    # its results are the float32 ones truncated, bit for bit), which doubles the rounding error.
    interpreted = backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    factor = 4 if interpreted and dtype == torch.bfloat16 else 2
    assert len(ours) == len(exact)
    x = main_tensor(args)
    for got, ref, want, kind in zip(ours, low, exact, descriptor(name).output_kinds):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.dtype == ref.dtype and got.shape == want.shape
            bound = factor * relative_error(ref, want)
            if kind == "logdet":
                bound = max(bound, math.sqrt(reduction_length(kind, x)) * torch.finfo(torch.float32).eps)
            assert relative_error(got, want) <= bound


@pytest.mark.parametrize("sizes", [{"batch": 0}, {"spatial": (0, 3)}, {"batch": 0, "spatial": ()}],
                         ids=["empty-batch", "zero-spatial-size", "no-vectors"])
@pytest.mark.parametrize("case", BATCHED)
@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_empty_inputs(backend_device, case, sizes):
    """No elements: the reference's shapes and dtypes, and its values (zero parameter gradients
    and log-dets)."""
    backend, device = backend_device
    name, args = case[0], case_args(case, **{"spatial": (2, 3), "device": device, **sizes})
    want = as_tuple(reference(name)(*args))
    got = as_tuple(op(name, backend)(*args))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert (g.shape, g.dtype) == (w.shape, w.dtype)
            assert_close(g, w)


def interpreted(backend, device):
    return backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("case", DIFFERENTIABLE_CASES)
@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_gradcheck(backend_device, case):
    """Interpreted Triton runs gradcheck's fast mode (the Jacobian against random vectors, one
    backward per check instead of one per output element); the full Jacobian runs on the C++
    backend and wherever Triton is compiled."""
    assert torch.autograd.gradcheck(*differentiable_call(case, *backend_device), fast_mode=interpreted(*backend_device))


# Under create_graph=True both backends run the same backward: the family's formula in
# differentiable reference ops (invkernels/ops/<family>.py), fed with the op's inputs (and, for an
# inverse, its output, which test_matches_the_float64_reference checks on every backend). So the
# second derivatives are checked once per op and device, on the C++ backend.
CPP_BACKENDS = [p for p in KERNEL_BACKENDS if p.values[0][0] == "cpp"]


@pytest.mark.parametrize("case", DIFFERENTIABLE_CASES)
@pytest.mark.parametrize("backend_device", CPP_BACKENDS)
def test_gradgradcheck(backend_device, case):
    """create_graph=True: the backward formulas run in differentiable ops."""
    assert torch.autograd.gradgradcheck(*differentiable_call(case, *backend_device))


@pytest.mark.triton
@pytest.mark.parametrize("case", DIFFERENTIABLE_CASES)
def test_the_backends_share_the_double_backward(case):
    """What makes test_gradgradcheck on the C++ backend cover the Triton twins: a twin's backward
    calls its fused backward op, except with grad mode on inside backward (create_graph=True), where
    it calls no invkernels op at all, only the family's reference formula. The additive couplings'
    backward is views of the output gradient (the reference formula) in both modes."""
    call, inputs = differentiable_call(case, "triton", "cpu")
    for create_graph in (False, True):
        out = [o for o in as_tuple(call(*inputs)) if o is not None and o.requires_grad]
        with OpsCalled() as mode:
            torch.autograd.grad([o.sum() for o in out], inputs, create_graph=create_graph, allow_unused=True)
        fused = [n for n in mode.names if n.startswith("invkernels::")]
        if create_graph or case[0] in ("additive_coupling_fwd", "additive_coupling_inv"):
            assert fused == []
        else:
            assert fused and all(n.endswith("_bwd_triton") for n in fused), fused


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_opcheck(backend_device, case, requires_grad):
    backend, device = backend_device
    name, args = case[0], list(case_args(case, dtype=torch.float64, device=device))
    for i in differentiable_positions(name, args):
        args[i] = args[i].clone().requires_grad_(requires_grad)
    torch.library.opcheck(op(name, backend), tuple(args))


@pytest.mark.parametrize("case", BATCHED)
@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_opcheck_channels_last(backend_device, case):
    """The fake gives the real op's output layouts (channels-last outputs where the op keeps them)."""
    backend, device = backend_device
    args = case_args(case, spatial=(2, 3), device=device)
    torch.library.opcheck(op(case[0], backend), tuple(
        a.contiguous(memory_format=torch.channels_last) if isinstance(a, torch.Tensor) and a.dim() == 4 else a
        for a in args))


def test_every_op_has_bad_argument_cases():
    assert {name for name, _, _ in BAD_ARGUMENTS} == set(NAMES)


@pytest.mark.parametrize("case", range(len(BAD_ARGUMENTS)),
                         ids=[f"{n}-{i}-{k}" for k, (n, i, _) in enumerate(BAD_ARGUMENTS)])
@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_bad_arguments_are_refused_with_one_message(backend_device, case):
    """The op on every backend and device, and its fake, refuse with the C++ CPU kernel's
    message: the one fake checks everything the kernels check, with their wording."""
    backend, device = backend_device
    name, index, bad = BAD_ARGUMENTS[case]
    cpu_args = replaced(valid_args(name), index, bad)
    expected = refusal(lambda: op(name, "cpp")(*cpu_args))
    assert expected.startswith(f"{name}: ")
    args = tuple(to_device(a, device) for a in cpu_args)
    assert refusal(lambda: op(name, backend)(*args)) == expected
    assert refusal(lambda: op(name, backend)(*on_meta(args))) == expected


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend_device", CUDA_BACKENDS)
def test_a_cpu_tensor_among_cuda_tensors_is_refused(backend_device, name):
    backend, device = backend_device
    args = valid_args(name, device=device)
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    for i in tensors[1:]:
        with pytest.raises(ValueError, match="device"):
            op(name, backend)(*replaced(args, i, args[i].cpu()))
