"""The compiled autograd of the coupling, ActNorm and 1x1-convolution ops (csrc/autograd.cpp): its backward runs the
fused backward op alone, and under create_graph=True the reference formula, as the Triton twins'
autograd does (the formulas themselves: gradcheck and gradgradcheck in test_op_matrix.py)."""

import pytest
import torch

from optest import OpsCalled, as_tuple, differentiable, differentiable_call, op_cases

DIFFERENTIABLE_CASES = [p for p in op_cases() if differentiable(p.values[0][0])]

# The ops whose C++ autograd is compiled (csrc/autograd.cpp), and the backward op each one runs
# (None: views of the output gradient, no op).
COMPILED_AUTOGRAD = {"affine_coupling_fwd": "affine_coupling_bwd", "affine_coupling_inv": "affine_coupling_bwd",
                     "additive_coupling_fwd": None, "additive_coupling_inv": None,
                     "actnorm_fwd": "actnorm_bwd", "actnorm_inv": "actnorm_bwd",
                     "invconv_weight": "invconv_weight_bwd", "conv1x1": "conv1x1_bwd"}
COMPILED_CASES = [p for p in DIFFERENTIABLE_CASES if p.values[0][0] in COMPILED_AUTOGRAD]


@pytest.mark.parametrize("case", COMPILED_CASES)
def test_compiled_autograd_runs_the_fused_backward(case):
    """The C++ autograd of the coupling, ActNorm and 1x1-convolution ops (csrc/autograd.cpp) runs the fused backward
    op alone, and under create_graph=True that op's Autograd kernel, which runs the reference
    formula and no op of this package (what test_gradgradcheck checks on the C++ backend), as the
    Triton twins do; the additive couplings run no op of this package."""
    call, inputs = differentiable_call(case, "cpp", "cpu")
    backward = COMPILED_AUTOGRAD[case[0]]
    additive = backward is None
    for create_graph in (False, True):
        out = [o for o in as_tuple(call(*inputs)) if o is not None and o.requires_grad]
        assert all("CppNode" in o.grad_fn.name() for o in out), [o.grad_fn.name() for o in out]
        seeds = [torch.randn_like(o).requires_grad_(create_graph) for o in out]
        with OpsCalled() as mode:
            grads = torch.autograd.grad(out, inputs, seeds, create_graph=create_graph, allow_unused=True)
        fused = [n for n in mode.names if n.startswith("invkernels::")]
        assert fused == ([] if additive or create_graph else [f"invkernels::{backward}"]), fused
        if not additive:
            arithmetic = [n for n in mode.names if not n.startswith("invkernels::") and n != "aten::detach"]
            assert bool(arithmetic) == create_graph, arithmetic
        assert all(g is None or g.requires_grad == create_graph for g in grads)
