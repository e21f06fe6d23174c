"""One matrix for every registered op on every kernel backend and device (python_tests/optest.py):
the float64 reference in float32 and float64, non-contiguous inputs, gradcheck of the
differentiable ops, and ``torch.library.opcheck``. The CUDA cases run where a GPU is visible."""

import pytest
import torch

from optest import (
    DIFFERENTIABLE,
    KERNEL_BACKENDS,
    REFERENCE,
    as_tuple,
    in_float64,
    op,
    op_names,
    strided,
    valid_args,
)
from tolerances import assert_close

NAMES = op_names()


def test_every_op_is_in_the_matrix():
    assert set(REFERENCE) == set(NAMES) and len(NAMES) == 15
    assert set(DIFFERENTIABLE) <= set(NAMES)


def assert_matches_reference(name, args, outputs):
    x = next(a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2)
    want = as_tuple(REFERENCE[name](*in_float64(args)))
    assert len(outputs) == len(want)
    for got, expected in zip(outputs, want):
        assert (got is None) == (expected is None)
        if got is not None:
            assert got.device == x.device
            # Log-dets and parameter gradients sum over the batch and positions.
            assert_close(got, expected, reduce_len=x.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_matches_the_float64_reference(backend_device, name, dtype):
    backend, device = backend_device
    args = valid_args(name, dtype=dtype, device=device)
    assert_matches_reference(name, args, as_tuple(op(name, backend)(*args)))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_non_contiguous_inputs(backend_device, name):
    backend, device = backend_device
    args = valid_args(name, spatial=(2, 3), dtype=torch.float64, device=device)
    views = tuple(strided(a) if isinstance(a, torch.Tensor) else a for a in args)
    assert not any(v.is_contiguous() for v in views if isinstance(v, torch.Tensor) and v.numel() > 1)
    assert_matches_reference(name, args, as_tuple(op(name, backend)(*views)))


@pytest.mark.parametrize("name", sorted(DIFFERENTIABLE))
@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_gradcheck(backend_device, name):
    backend, device = backend_device
    args = list(valid_args(name, spatial=(2,), dtype=torch.float64, device=device))
    inputs = [args[i].clone().requires_grad_() for i in DIFFERENTIABLE[name]]

    def call(*tensors):
        full = list(args)
        for i, t in zip(DIFFERENTIABLE[name], tensors):
            full[i] = t
        return op(name, backend)(*full)

    assert torch.autograd.gradcheck(call, inputs)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend_device", KERNEL_BACKENDS)
def test_opcheck(backend_device, name):
    backend, device = backend_device
    args = list(valid_args(name, dtype=torch.float64, device=device))
    for i in DIFFERENTIABLE.get(name, ()):
        args[i] = args[i].clone().requires_grad_()
    torch.library.opcheck(op(name, backend), tuple(args))
