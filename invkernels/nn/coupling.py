"""Affine and additive coupling layers (RealNVP / Glow / NICE) on the fused coupling ops.

``x`` is split into ``x1 = x[:, :C // 2]`` (passed through, fed to the subnet) and
``x2 = x[:, C // 2:]`` (transformed). Math: docs/ops/coupling.md.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from invkernels import _backend, _validation
from invkernels.nn.subnets import SubnetFactory, call_subnet, conv_subnet, mlp_subnet, subnet_vjp, trained_tensors
from invkernels.ops import coupling as F

_SUBNET_DIMS = {"mlp": 2, "conv": 4}


def resolve_subnet(owner: str, subnet: str | SubnetFactory, hidden: int | None) -> SubnetFactory:
    """The factory of ``subnet`` (``"mlp"``, ``"conv"`` or a factory) with ``hidden`` applied."""
    if isinstance(subnet, str):
        if subnet not in _SUBNET_DIMS:
            raise ValueError(f"{owner}: subnet should be 'mlp', 'conv' or a factory(in, out), got {subnet!r}")
        kwargs = {} if hidden is None else {"hidden": hidden}
        return (mlp_subnet if subnet == "mlp" else conv_subnet)(**kwargs)
    if callable(subnet):
        if hidden is not None:
            raise ValueError(f"{owner}: hidden applies to subnet='mlp' or 'conv' only, got a factory and "
                             f"hidden={hidden!r}")
        return subnet
    if isinstance(subnet, (int, float)) and not isinstance(subnet, bool):
        raise TypeError(f"{owner}: subnet should be 'mlp', 'conv' or a factory(in, out), got the number {subnet!r}; "
                        f"the subnet's width is the keyword argument hidden={subnet!r}")
    raise ValueError(f"{owner}: subnet should be 'mlp', 'conv' or a factory(in, out), got {subnet!r}")


def subnet_input_dim(factory: SubnetFactory) -> int | None:
    """The input rank the default factories need (2 for ``"mlp"``, 4 for ``"conv"``), else None."""
    return _SUBNET_DIMS.get(getattr(factory, "kind", None))


def check_block_input(owner: str, x: torch.Tensor, x_name: str, channels: int, input_dim: int | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: {x_name} should be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{owner}: {x_name} should be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2 or x.shape[1] != channels:
        raise ValueError(f"{owner}: {x_name} should have shape [B, {channels}, ...], got {list(x.shape)}")
    if input_dim is not None and x.dim() != input_dim:
        kind = "mlp" if input_dim == 2 else "conv"
        other = "conv" if kind == "mlp" else "mlp"
        raise ValueError(f"{owner}: subnet='{kind}' expects {input_dim}-D inputs, got {x_name} with "
                         f"{x.dim()} dims; use subnet='{other}' or a factory")


def broadcast_context(owner: str, context: torch.Tensor, a: torch.Tensor, channels: int) -> torch.Tensor:
    """``context`` expanded to ``[B, channels, *spatial]`` of the subnet input ``a``: given as
    ``[B, channels, *spatial]``, as ``[B, channels]`` (one vector per sample, tiled over the
    positions) or as ``[channels]`` (one for the whole batch); a batch of 1 broadcasts. A view
    (the concatenation with ``a`` copies it once); its gradient sums over what was broadcast."""
    b, spatial = a.shape[0], tuple(a.shape[2:])
    shape = list(context.shape)
    ones = (1,) * len(spatial)
    view = None
    if context.dim() == 1:
        view = context.reshape(1, -1, *ones)
    elif context.dim() == 2 and spatial:
        view = context.reshape(*shape, *ones)
    elif context.dim() == a.dim() and tuple(shape[2:]) == spatial:
        view = context
    if view is not None and view.shape[0] in (1, b) and view.shape[1] == channels:
        return view.expand(b, channels, *spatial)
    tiled = f", {[b, channels]} (one vector per sample, tiled over the positions)" if spatial else ""
    forms = f"{[b, channels, *spatial]}{tiled} or {[channels]} (one for all)"
    raise ValueError(f"{owner}: context should have shape {forms}; a batch of 1 broadcasts; got {shape}")


def subnet_h(owner: str, subnet: nn.Module, a: torch.Tensor, context: torch.Tensor | None, context_channels: int,
             h_channels: int, dtype: torch.dtype) -> torch.Tensor:
    """``subnet([a, context])`` checked to have ``h_channels`` channels, in ``dtype``."""
    if context_channels:
        if context is None:
            raise ValueError(f"{owner}: context is required (context_channels={context_channels})")
        if not isinstance(context, torch.Tensor):
            raise TypeError(f"{owner}: context should be a tensor, got {type(context).__name__}")
        if context.dtype != a.dtype or context.device != a.device:
            raise ValueError(f"{owner}: context should have the input's dtype and device ({a.dtype} on {a.device}), "
                             f"got {context.dtype} on {context.device}; pass context.to(x)")
        a = torch.cat([a, broadcast_context(owner, context, a, context_channels)], dim=1)
    elif context is not None:
        raise ValueError(f"{owner}: context was given but the layer was built with context_channels=0")
    # Under autocast the subnet may return a lower precision than x; the coupling itself runs
    # in x's dtype, which keeps the inverse exact to that precision.
    h = call_subnet(owner, subnet, a, h_channels)
    return h if h.dtype == dtype else h.to(dtype)


def check_affine(owner: str, scale: str, clamp: float) -> None:
    if scale not in _validation.SCALES:
        raise ValueError(f"{owner}: scale should be {_validation.SCALE_CHOICES}, got {scale!r}")
    if isinstance(clamp, bool) or not (isinstance(clamp, (int, float)) and math.isfinite(clamp) and clamp > 0):
        raise ValueError(f"{owner}: clamp should be a positive finite number, got {clamp!r}")


class _Coupling(nn.Module):
    def __init__(self, channels: int, subnet: str | SubnetFactory, hidden: int | None, context_channels: int,
                 h_per_channel: int, backend: str | None, passthrough: int | None):
        super().__init__()
        name = type(self).__name__
        _validation.check_int(name, "channels", channels, minimum=2)
        _validation.check_int(name, "context_channels", context_channels, minimum=0)
        if passthrough is not None and (isinstance(passthrough, bool) or not isinstance(passthrough, int)
                                        or not 1 <= passthrough < channels):
            raise ValueError(f"{name}: passthrough should be None (channels // 2) or an integer in [1, channels) "
                             f"= [1, {channels}), got {passthrough!r}")
        if backend is not None:
            F.prepare(_backend.check_backend(backend))
        factory = resolve_subnet(name, subnet, hidden)
        self.channels = channels
        self.c1, self.c2 = _validation.split_channels(channels, passthrough)
        self.context_channels = context_channels
        self.backend = backend
        self._input_dim = subnet_input_dim(factory)
        self._h_channels = h_per_channel * self.c2
        self.subnet = factory(self.c1 + context_channels, self._h_channels)

    def _check_input(self, x: torch.Tensor, x_name: str) -> None:
        check_block_input(type(self).__name__, x, x_name, self.channels, self._input_dim)

    def _h(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        return self._subnet_h(x[:, : self.c1], context, x.dtype)

    def _subnet_h(self, x1: torch.Tensor, context: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        return subnet_h(type(self).__name__, self.subnet, x1, context, self.context_channels, self._h_channels,
                        dtype)

    def _subnet_backward(self, y: torch.Tensor, context: torch.Tensor | None, fused):
        """Memory-free backward of the coupling (see :meth:`inverse_backward`): the subnet runs once,
        with grad, on ``y``'s untouched half; ``fused(h) -> (x, grad_x, grad_h)`` is the fused
        inverse+backward op; the subnet's gradient reaching ``x1`` is added to ``grad_x``."""
        leaf = y[:, : self.c1].detach().requires_grad_()
        extra = trained_tensors(self.subnet, context)
        with torch.enable_grad():
            h = self._subnet_h(leaf, context, y.dtype)
        x, grad_x, grad_h = fused(h.detach())
        grads = subnet_vjp(h, [leaf, *extra], grad_h)
        if grads[0] is not None:
            grad_x[:, : self.c1].add_(grads[0])
        return x, grad_x, list(zip(extra, grads[1:]))

    def extra_repr(self) -> str:
        extra = f", context_channels={self.context_channels}" if self.context_channels else ""
        return f"channels={self.channels}, split=({self.c1}, {self.c2}){extra}"


class AffineCoupling(_Coupling):
    """Affine coupling ``y2 = x2 * s(hs) + t`` with ``(hs, t) = subnet([x1, context])``.

    Args:
        channels: number of channels ``C`` (``>= 2``).
        subnet: ``"mlp"`` (for ``[B, C]`` inputs), ``"conv"`` (for ``[B, C, H, W]``) or a factory
            ``(in_channels, out_channels) -> nn.Module``.
        hidden: width of the ``"mlp"`` / ``"conv"`` subnet (defaults 256 / 128).
        scale: ``"exp"`` (``s = exp(clamp * tanh(hs / clamp))``, default), ``"sigmoid"``
            (Glow, ``s = sigmoid(hs + 2)``), ``"sigmoid_eps"`` (nflows, ``sigmoid(hs + 2) + 1e-3``),
            ``"atan"`` (FrEIA's ATAN, ``log s = clamp * 0.636 atan(hs)``) or ``"rational"``
            (zuko, ``log s = hs / (1 + |hs| / clamp)``); all fused.
        clamp: bound of the log-scale of ``"exp"``, ``"atan"`` and ``"rational"``: ``s`` stays in
            ``[exp(-clamp), exp(clamp)]``.
        context_channels: channels of the optional ``context=`` concatenated to the subnet input.
        passthrough: channels ``x1 = x[:, :passthrough]`` that condition the subnet and pass through
            (``[1, C)``); None (default): ``C // 2``. Any split runs fused (the ops' ``passthrough``).
        backend: ``"cpp"``, ``"triton"``, ``"reference"`` or None for ``invkernels.get_backend()``.

    ``forward(x, context=None) -> (y, logdet)``; ``inverse(y, context=None) -> x``.
    """

    results_tested = True  # the chain trusts its memory-free results (protocol.checked_result)

    def __init__(self, channels: int, subnet: str | SubnetFactory = "mlp", *, hidden: int | None = None,
                 scale: str = "exp", clamp: float = 2.0, context_channels: int = 0, passthrough: int | None = None,
                 backend: str | None = None):
        check_affine("AffineCoupling", scale, clamp)
        super().__init__(channels, subnet, hidden, context_channels, 2, backend, passthrough)
        self.scale = scale
        self.clamp = float(clamp)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input(x, "x")
        return F.affine_coupling_fwd(x, self._h(x, context), self.scale, self.clamp, self.c1, backend=self.backend)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None, return_logdet: bool = False):
        self._check_input(y, "y")
        x, logdet = F.affine_coupling_inv(y, self._h(y, context), self.scale, self.clamp, self.c1,
                                          backend=self.backend)
        return (x, logdet) if return_logdet else x

    def inverse_backward(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                         context: torch.Tensor | None = None):
        """Memory-free backward (used by :class:`InvertibleSequential`): from the output ``y`` and the
        gradients of ``(y, logdet)``, rebuild the input ``x`` and return ``(x, grad_x, grads)`` with
        ``grads`` the ``(tensor, gradient)`` pairs of the parameters (and ``context``) that require
        grad. The subnet runs once, with grad, on ``y``'s untouched half; the fused
        ``affine_coupling_inv_bwd`` op rebuilds ``x2`` and back-propagates in one pass."""
        self._check_input(y, "y")
        return self._subnet_backward(y, context, lambda h: F.affine_coupling_inv_bwd(
            y, h, grad_y, grad_logdet, self.scale, self.clamp, self.c1, backend=self.backend))

    def extra_repr(self) -> str:
        clamp = f", clamp={self.clamp}" if self.scale == "exp" else ""
        return f"{super().extra_repr()}, scale={self.scale!r}{clamp}"


class AdditiveCoupling(_Coupling):
    """Additive (NICE) coupling ``y2 = x2 + t`` with ``t = subnet([x1, context])``; log-det 0.

    Arguments as :class:`AffineCoupling`, without ``scale`` and ``clamp``.
    """

    results_tested = True  # the chain trusts its memory-free results (protocol.checked_result)

    def __init__(self, channels: int, subnet: str | SubnetFactory = "mlp", *, hidden: int | None = None,
                 context_channels: int = 0, passthrough: int | None = None, backend: str | None = None):
        super().__init__(channels, subnet, hidden, context_channels, 1, backend, passthrough)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input(x, "x")
        y = F.additive_coupling_fwd(x, self._h(x, context), self.c1, backend=self.backend)
        return y, x.new_zeros(x.shape[0], dtype=_validation.logdet_dtype(x.dtype))

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None, return_logdet: bool = False):
        self._check_input(y, "y")
        x = F.additive_coupling_inv(y, self._h(y, context), self.c1, backend=self.backend)
        return (x, y.new_zeros(y.shape[0], dtype=_validation.logdet_dtype(y.dtype))) if return_logdet else x

    def inverse_backward(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                         context: torch.Tensor | None = None):
        """Memory-free backward, as :meth:`AffineCoupling.inverse_backward` (the log-det is 0, so
        ``grad_logdet`` is not used)."""
        self._check_input(y, "y")
        return self._subnet_backward(y, context, lambda h: F.additive_coupling_inv_bwd(
            y, h, grad_y, self.c1, backend=self.backend))
