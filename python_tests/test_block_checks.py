"""Mistakes a user makes with blocks and chains are refused where they are made, with the argument
named: a half-implemented block on halves, the reconstruction check switched on between forward
and backward, wrong gradient shapes handed to a block's memory-free backward, a process group that
is not one, an empty output directory; and InvConv1x1's plain weight is contiguous."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from invkernels.nn import ActNorm, AffineCoupling, InvConv1x1, InvertibleSequential, Permute, ReversibleBlock


class HalfDone(nn.Module):
    """A block on halves with a forward but no memory-free backward."""

    split_channels = 2

    def forward_split(self, x1, x2):
        return x1, x2 + x1, None

    def inverse_split(self, y1, y2):
        return y1, y2 - y1, None

    def forward(self, x):
        y1, y2, _ = self.forward_split(*x.split([2, 2], dim=1))
        return torch.cat([y1, y2], 1), x.new_zeros(x.shape[0])

    def inverse(self, y):
        return torch.cat(self.inverse_split(*y.split([2, 2], dim=1))[:2], 1)


def test_a_block_on_halves_without_its_memory_free_backward_is_refused_when_added():
    with pytest.raises(TypeError, match=r"block 1 \(HalfDone\) works on halves .* has no inverse_backward_split"):
        InvertibleSequential(AffineCoupling(4, "mlp", hidden=8), HalfDone())


def test_switching_the_reconstruction_check_on_before_backward_keeps_the_backward_exact():
    torch.manual_seed(0)
    model = InvertibleSequential(AffineCoupling(4, "mlp", hidden=8), ReversibleBlock(4, "mlp", hidden=8)).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y, logdet = model(x)
    model.check_reconstruction = True
    (y.sum() + logdet.sum()).backward()
    assert x.grad is not None and model.reconstruction_errors == []


def test_reversible_block_backward_checks_the_gradient_shapes():
    block = ReversibleBlock(4, "mlp", hidden=8)
    y = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"grad_y should have the shape of y, \[3, 4\], got \[3, 5\]"):
        block.inverse_backward(y, torch.randn(3, 5), torch.randn(3))
    with pytest.raises(ValueError, match=r"grad_logdet should have shape \[batch\] = \[3\], got \[3, 1\]"):
        block.inverse_backward(y, torch.randn(3, 4), torch.randn(3, 1))
    with pytest.raises(ValueError, match=r"grad_y2 should have the shape of y2, \[3, 2\], got \[3, 1\]"):
        block.inverse_backward_split(y[:, :2], y[:, 2:], torch.randn(3, 2), torch.randn(3, 1), torch.randn(3))


def test_actnorm_refuses_a_process_group_that_is_not_one():
    with pytest.raises(ValueError, match=r"process_group should be None or a torch.distributed ProcessGroup .* "
                                         r"got 'gloo'"):
        ActNorm(4, process_group="gloo")


def test_the_plain_weight_of_invconv_is_contiguous():
    layer = InvConv1x1(5, lu=False)
    assert layer.w.is_contiguous()
    assert torch.nn.utils.parameters_to_vector(layer.parameters()).numel() == 25


@pytest.mark.parametrize("command", ["demo", "invert"])
def test_an_empty_output_directory_is_a_usage_error(command):
    out = subprocess.run([sys.executable, "-m", "invkernels", command, "--out", ""], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert "argument --out: should be a directory path, got ''" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("make", [lambda: ReversibleBlock(4, "mlp", hidden=8, context_channels=2),
                                  lambda: AffineCoupling(4, "mlp", hidden=8, context_channels=2)],
                         ids=["reversible", "coupling"])
def test_inputs_that_are_not_floating_point_tensors_are_refused_by_name(make):
    block = make()
    name = type(block).__name__
    context = torch.randn(2, 2)
    with pytest.raises(TypeError, match=rf"{name}: x should be a tensor, got list"):
        block([[1.0] * 4] * 2, context=context)
    with pytest.raises(ValueError, match=rf"{name}: x should be a floating-point tensor, got dtype torch.int64"):
        block(torch.ones(2, 4, dtype=torch.long), context=context)
    with pytest.raises(ValueError, match=rf"{name}: context should have the input's dtype and device "
                                         r"\(torch.float32 on cpu\), got torch.float64 on cpu"):
        block(torch.randn(2, 4), context=context.double())
    with pytest.raises(TypeError, match=rf"{name}: context should be a tensor, got list"):
        block(torch.randn(2, 4), context=[[0.0, 0.0]] * 2)


class ShiftOnHalves(nn.Module):
    """A third-party block on halves, ``y2 = x2 + tanh(x1) * w``, whose memory-free backward
    returns its input gradients instead of writing them into ``out=`` (or, ``bad_shape``, returns
    a gradient of the wrong shape)."""

    split_channels = 2

    def __init__(self, bad_shape=False):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 2, dtype=torch.float64).view(1, 2))
        self.bad_shape = bad_shape

    def forward_split(self, x1, x2):
        return x1, x2 + torch.tanh(x1) * self.w, None

    def inverse_split(self, y1, y2):
        return y1, y2 - torch.tanh(y1) * self.w, None

    def forward(self, x):
        y1, y2, _ = self.forward_split(*x.split([2, 2], dim=1))
        return torch.cat([y1, y2], 1), x.new_zeros(x.shape[0])

    def inverse(self, y):
        return torch.cat(self.inverse_split(*y.split([2, 2], dim=1))[:2], 1)

    def inverse_backward_split(self, y1, y2, grad_y1, grad_y2, grad_logdet, out=None):
        x1, x2, _ = self.inverse_split(y1, y2)
        grad_x1 = grad_y1 + grad_y2 * self.w * (1 - torch.tanh(x1) ** 2)
        grad_w = (grad_y2 * torch.tanh(x1)).sum(0, keepdim=True)
        if self.bad_shape:
            grad_x1 = grad_x1[:, :1]
        return x1, x2, grad_x1, grad_y2.clone(), [(self.w, grad_w)]


def test_a_block_that_returns_its_gradients_instead_of_writing_out_gets_exact_gradients():
    x = torch.randn(3, 4, dtype=torch.float64)
    grads = []
    for memory_free in (False, True):
        model = InvertibleSequential(ShiftOnHalves(), memory_free=memory_free)
        leaf = x.clone().requires_grad_()
        y, logdet = model(leaf)
        (y.sin().sum() + logdet.sum()).backward()
        grads.append((leaf.grad, model[0].w.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_block_whose_backward_returns_a_wrong_shape_is_named():
    model = InvertibleSequential(ShiftOnHalves(bad_shape=True))
    y, logdet = model(torch.randn(3, 4, dtype=torch.float64, requires_grad=True))
    with pytest.raises(ValueError, match=r"block 0 \(ShiftOnHalves\)\.inverse_backward_split returned item 2 of "
                                         r"\[3, 1\] torch.float64; it should have the shape and dtype of the "
                                         r"rebuilt input \(item 0\), \[3, 2\] torch.float64"):
        (y.sum() + logdet.sum()).backward()


class HalfPrecisionPermute(Permute):
    """A subclass of one of this package's blocks whose memory-free backward returns the rebuilt
    input in another dtype: the chain trusts only the classes that declare their results tested
    in their own body, so this one is checked."""

    def inverse_backward(self, y, grad_y, grad_logdet):
        x, grad_x, pairs = super().inverse_backward(y, grad_y, grad_logdet)
        return x.half(), grad_x, pairs


def test_a_subclass_of_a_trusted_block_is_checked_again():
    assert Permute.__dict__.get("results_tested") and "results_tested" not in HalfPrecisionPermute.__dict__
    model = InvertibleSequential(HalfPrecisionPermute(4, "reverse"), memory_free=True)
    y, logdet = model(torch.randn(3, 4, dtype=torch.float64, requires_grad=True))
    with pytest.raises(ValueError, match=r"block 0 \(HalfPrecisionPermute\)\.inverse_backward returned item 0 of "
                                         r"\[3, 4\] torch.float16; it should have the dtype of the block's output"):
        (y.sum() + logdet.sum()).backward()
