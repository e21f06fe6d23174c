"""ReversibleBlock: an error raised while computing a subnet says which one (``f`` or ``g``), the
shape of its input and the shape its output should have, in forward, inverse and memory-free
backward. The name is a note (PEP 678) on the error as raised: its type and message stay those of
the check or of the subnet, and tracebacks print the note under the message."""

import pytest
import torch
from torch import nn

from invkernels.nn import InvertibleSequential, ReversibleBlock


def notes(info: pytest.ExceptionInfo) -> str:
    return "\n".join(getattr(info.value, "__notes__", []))


def good(c_in: int, c_out: int) -> nn.Module:
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class GradDependent(nn.Module):
    """Right output shape without grad (the memory-free forward), one channel too few with grad
    (the memory-free backward's rebuild)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv(x)
        return h[:, 1:] if torch.is_grad_enabled() else h


@pytest.mark.parametrize("wrong", ["f", "g"])
def test_output_with_the_wrong_channels_names_the_subnet_in_forward(wrong):
    modules = {"f": good(2, 2), "g": good(2, 2)}
    modules[wrong] = nn.Conv2d(2, 3, 3, padding=1)
    block = ReversibleBlock(4, **modules)
    with pytest.raises(ValueError, match=r"ReversibleBlock: the subnet output should have shape \[2, 2, 5, 5\], "
                                         r"got \[2, 3, 5, 5\]") as info:
        block(torch.randn(2, 4, 5, 5))
    arg, other = ("x2", "x1") if wrong == "f" else ("y1", "x2")
    assert notes(info) == (f"ReversibleBlock: in subnet {wrong} ({wrong}({arg}) is the shift of {other}): its input "
                           f"has shape [2, 2, 5, 5], its output should have shape [2, 2, 5, 5]")


@pytest.mark.parametrize("wrong", ["f", "g"])
def test_output_with_the_wrong_spatial_shape_names_the_subnet_in_inverse(wrong):
    """Affine, odd channels (f: 3 -> 2 * 2, g: 2 -> 2 * 3); a stride-2 subnet halves H and W."""
    modules = {"f": good(3, 4), "g": good(2, 6)}
    c_in, c_out = (3, 4) if wrong == "f" else (2, 6)
    modules[wrong] = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
    block = ReversibleBlock(5, coupling="affine", **modules)
    with pytest.raises(ValueError, match=rf"the subnet output should have shape \[2, {c_out}, 6, 6\], "
                                         rf"got \[2, {c_out}, 3, 3\]") as info:
        block.inverse(torch.randn(2, 5, 6, 6))
    arg, other = ("x2", "x1") if wrong == "f" else ("y1", "x2")
    assert notes(info) == (f"ReversibleBlock: in subnet {wrong} ({wrong}({arg}) is the log-scale and shift of "
                           f"{other}): its input has shape [2, {c_in}, 6, 6], its output should have shape "
                           f"[2, {c_out}, 6, 6]")


@pytest.mark.parametrize("wrong", ["f", "g"])
def test_a_factory_building_a_subnet_that_raises_inside_is_named(wrong):
    """The factory builds the named subnet for one input channel too many: torch's own error is
    kept as it is, the note says which subnet raised it."""

    # Affine with 5 channels: f maps 3 channels to 2 * 2, g maps 2 to 2 * 3.
    wrong_out = {"f": 4, "g": 6}[wrong]

    def factory(c_in, c_out):
        return nn.Conv2d(c_in + (1 if c_out == wrong_out else 0), c_out, 1)

    block = ReversibleBlock(5, factory, coupling="affine")
    with pytest.raises(RuntimeError, match="expected input.* to have .* channels") as info:
        block(torch.randn(2, 5, 3, 3))
    assert f"ReversibleBlock: in subnet {wrong} " in notes(info)
    assert ("subnet g" if wrong == "f" else "subnet f") not in notes(info)


def test_a_subnet_returning_a_tuple_is_named():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    block = ReversibleBlock(4, f=nn.Linear(2, 2), g=Pair())
    with pytest.raises(TypeError, match="the subnet should return a tensor of shape") as info:
        block(torch.randn(3, 4))
    assert notes(info) == ("ReversibleBlock: in subnet g (g(y1) is the shift of x2): its input has shape [3, 2], its "
                           "output should have shape [3, 2]")


@pytest.mark.parametrize("wrong", ["f", "g"])
def test_memory_free_backward_names_the_subnet(wrong):
    """The memory-free forward runs the subnets without grad (right shape); the rebuild in backward
    runs them with grad, where the named one returns a channel too few."""
    modules = {"f": nn.Conv2d(2, 2, 1), "g": nn.Conv2d(2, 2, 1)}
    modules[wrong] = GradDependent(2, 2)
    model = InvertibleSequential(ReversibleBlock(4, **modules), ReversibleBlock(4, f=good(2, 2), g=good(2, 2)),
                                 memory_free=True)
    y, logdet = model(torch.randn(2, 4, 3, 3, requires_grad=True))
    with pytest.raises(ValueError, match=r"the subnet output should have shape \[2, 2, 3, 3\], got \[2, 1, 3, 3\]") \
            as info:
        (y.square().sum() + logdet.sum()).backward()
    arg, other = ("x2", "x1") if wrong == "f" else ("y1", "x2")
    assert notes(info) == (f"ReversibleBlock: in subnet {wrong} ({wrong}({arg}) is the shift of {other}): its input "
                           f"has shape [2, 2, 3, 3], its output should have shape [2, 2, 3, 3]")


def test_inverse_backward_names_the_subnet_and_counts_the_context_channels():
    block = ReversibleBlock(4, f=nn.Linear(5, 2), g=nn.Linear(5, 3), context_channels=3)
    y, context = torch.randn(6, 4), torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"should have shape \[6, 2\], got \[6, 3\]") as info:
        block.inverse_backward(y, torch.ones_like(y), torch.zeros(6), context=context)
    assert notes(info) == ("ReversibleBlock: in subnet g (g(y1) is the shift of x2): its input has shape [6, 5] "
                           "(y1 and context), its output should have shape [6, 2]")


def test_a_working_block_raises_nothing_and_errors_outside_the_subnets_get_no_note():
    block = ReversibleBlock(4, "mlp", hidden=8)
    x = torch.randn(3, 4)
    y, _ = block(x)
    torch.testing.assert_close(block.inverse(y), x)
    with pytest.raises(ValueError, match=r"x should have shape \[B, 4, ...\], got \[3, 5\]") as info:
        block(torch.randn(3, 5))
    assert notes(info) == ""
