"""Default subnet factories: ``factory(in_channels, out_channels) -> nn.Module``.

The last layer starts at zero, so a coupling layer starts as the identity (Glow's habit), which
keeps deep flows stable at the start of training.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn
from torch.autograd import Variable
from torch.autograd.graph import _engine_run_backward, log as _autograd_log

from invkernels import _state
from invkernels._validation import check_int, describe

SubnetFactory = Callable[[int, int], nn.Module]

_ENGINE = Variable._execution_engine
# Whether torch's engine wrapper left its context for compiled backwards (older torch keeps none).
_CONTEXT_IN_TLS = getattr(torch._C, "_is_key_in_tls", None)


def _check_subnet_dtype(owner: str, subnet: nn.Module, x: torch.Tensor) -> None:
    """ValueError when ``x``'s dtype is not that of the subnet's parameters, outside autocast."""
    param = next((p for p in subnet.parameters() if p.is_floating_point()), None)
    device_type = x.device.type if x.device.type in ("cpu", "cuda") else "cpu"
    if param is not None and param.dtype != x.dtype and not torch.is_autocast_enabled(device_type):
        raise ValueError(f"{owner}: the input has dtype {x.dtype} but the layer's subnet has parameters of dtype "
                         f"{param.dtype}; convert the model (e.g. model.to({x.dtype})) or the input "
                         f"(x.to({param.dtype}))")


def trained_tensors(module: nn.Module, context: torch.Tensor | None) -> list[torch.Tensor]:
    """What a backward through ``module`` (called with ``context``) gives gradients to: its
    parameters that require grad, each once, then ``context`` when it requires grad."""
    found = _state.trainable(_state.submodules(module))
    if context is not None and context.requires_grad:
        found.append(context)
    return found


def vjp(outputs: list[torch.Tensor], inputs: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """``torch.autograd.grad(outputs, inputs, grads, allow_unused=True)``, run by the autograd
    engine entry that ``torch.autograd.grad`` itself calls once it has normalized its arguments:
    that normalization (~13 µs a call on CPU, most of it comparing shapes through the symbolic-shape
    helpers) is the largest fixed cost of a memory-free block's backward, and the callers here
    hand over lists of plain tensors. Any output whose gradient differs from it in shape or dtype
    goes through ``torch.autograd.grad``, which raises its own error.

    Inside a backward (a memory-free chain's), the engine is entered directly: the outer
    ``backward`` or ``torch.autograd.grad`` already left its context for compiled backwards in the
    thread's state, where torch's wrapper would store it again and then erase it (~3 µs a call),
    also for the rest of the outer backward. Outside one, and with autograd's debug logging on,
    the call goes through that wrapper."""
    if all(map(_engine_ready, outputs, grads)):
        args = (tuple(outputs), tuple(grads), False, False, tuple(inputs), True, False)
        if (_CONTEXT_IN_TLS is None or _CONTEXT_IN_TLS("context")) and not _autograd_log.isEnabledFor(logging.DEBUG):
            return list(_ENGINE.run_backward(*args))
        return list(_engine_run_backward(*args))
    return list(torch.autograd.grad(outputs, inputs, grads, allow_unused=True))


def _engine_ready(output: torch.Tensor, grad) -> bool:
    """Whether ``grad`` is a plain tensor of ``output``'s shape and dtype (what the engine takes as is)."""
    return type(grad) is torch.Tensor and grad.shape == output.shape and grad.dtype == output.dtype


def subnet_vjp(h: torch.Tensor, inputs: list[torch.Tensor], grad_h: torch.Tensor) -> list[torch.Tensor | None]:
    """The gradients of ``inputs`` for ``grad_h`` through a subnet output ``h`` computed with grad
    (None for an input ``h`` does not depend on), also when ``h`` depends on none of them (a subnet
    whose output ignores its input and has no trained parameter)."""
    if not h.requires_grad:
        return [None] * len(inputs)
    return vjp([h], inputs, [grad_h])


def call_subnet(owner: str, subnet: nn.Module, x: torch.Tensor, channels: int) -> torch.Tensor:
    """``subnet(x)``, with errors that name ``owner`` when the input's dtype is not the subnet's
    (outside autocast) or the subnet returns anything but a tensor of ``x``'s shape with
    ``channels`` channels. The dtypes are compared only when the subnet fails or returns another
    dtype than ``x``'s, so a call that works costs no walk over the subnet's parameters."""
    try:
        h = subnet(x)
    except RuntimeError as error:
        try:
            _check_subnet_dtype(owner, subnet, x)
        except ValueError as mismatch:
            raise mismatch from error
        raise
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"{owner}: the subnet should return a tensor of shape {_want(x, channels)}, got {describe(h)}")
    if h.dtype != x.dtype:
        _check_subnet_dtype(owner, subnet, x)
    shape, given = h.shape, x.shape
    if not (len(shape) == len(given) and shape[1] == channels and shape[0] == given[0] and shape[2:] == given[2:]):
        raise ValueError(f"{owner}: the subnet output should have shape {_want(x, channels)}, got {list(shape)}")
    return h


def _want(x: torch.Tensor, channels: int) -> list[int]:
    return [x.shape[0], channels, *x.shape[2:]]


def mlp_subnet(hidden: int = 256, layers: int = 2) -> SubnetFactory:
    """MLP for ``[B, C]`` inputs: ``layers`` hidden Linear+ReLU layers of width ``hidden``."""
    check_int("mlp_subnet", "hidden", hidden)
    check_int("mlp_subnet", "layers", layers)

    def make(in_features: int, out_features: int) -> nn.Module:
        mods: list[nn.Module] = []
        width = in_features
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        last = nn.Linear(width, out_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(*mods, last)

    make.kind = "mlp"
    return make


def conv_subnet(hidden: int = 128, kernel_size: int = 3) -> SubnetFactory:
    """Glow's CNN for ``[B, C, H, W]`` inputs: conv k×k → ReLU → conv 1×1 → ReLU → conv k×k."""
    check_int("conv_subnet", "hidden", hidden)
    if isinstance(kernel_size, bool) or kernel_size not in (1, 3, 5, 7):
        raise ValueError(f"conv_subnet: kernel_size should be 1, 3, 5 or 7, got {kernel_size!r}")
    pad = kernel_size // 2

    def make(in_channels: int, out_channels: int) -> nn.Module:
        last = nn.Conv2d(hidden, out_channels, kernel_size, padding=pad)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size, padding=pad), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
            last)

    make.kind = "conv"
    return make
