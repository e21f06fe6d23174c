"""Two-sided reversible block (RevNet, MemCNN's couplings, FrEIA's GLOW / RNVP blocks).

With ``x1 = x[:, :C // 2]`` and ``x2 = x[:, C // 2:]``::

    additive:  y1 = x1 + f(x2),                 y2 = x2 + g(y1)
    affine:    (hs, t) = f(x2),  y1 = x1 * s(hs) + t,   (hs', t') = g(y1),  y2 = x2 * s(hs') + t'

``s`` is the couplings' scale function (``"exp"``: ``exp(clamp * tanh(hs / clamp))``, or
``"sigmoid"``), ``logdet`` the sum of both halves' ``log s``. The second half-step is the coupling
op itself (``y1`` passed through, ``x2`` transformed: docs/ops/coupling.md); the first transforms
the first channels from the last ones.
"""

from __future__ import annotations

import torch
from torch import nn

from invkernels import _backend, _validation
from invkernels.nn.coupling import check_affine, check_block_input, resolve_subnet, subnet_h, subnet_input_dim
from invkernels.nn.subnets import SubnetFactory
from invkernels.ops import coupling as F
from invkernels.reference.coupling import affine_half, affine_half_inv

_COUPLINGS = ("additive", "affine")


class ReversibleBlock(nn.Module):
    """Two-sided reversible coupling: ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)`` (``"additive"``), or
    the affine form with ``f``, ``g`` giving log-scale and shift of the other half.

    Args:
        channels: number of channels ``C`` (``>= 2``); ``f`` maps ``C - C // 2`` (+ context)
            channels to ``C // 2`` (twice that for ``"affine"``), ``g`` maps ``C // 2`` (+ context)
            to ``C - C // 2`` (twice that for ``"affine"``).
        subnet: ``"conv"`` (default, ``[B, C, H, W]`` inputs), ``"mlp"`` (``[B, C]``) or a factory
            ``(in_channels, out_channels) -> nn.Module`` building ``f`` and ``g``; not used when
            ``f`` and ``g`` are given.
        hidden: width of the ``"mlp"`` / ``"conv"`` subnets.
        coupling: ``"additive"`` (log-det 0) or ``"affine"``.
        scale, clamp: the affine scale function, as in :class:`~invkernels.nn.AffineCoupling`.
        context_channels: channels of ``context=``, concatenated to the input of ``f`` and ``g``.
        f, g: ready modules (the MemCNN / RevLib habit); both or neither.
        backend: ``"cpp"``, ``"triton"``, ``"reference"`` or None for ``invkernels.get_backend()``.

    ``forward(x, context=None) -> (y, logdet)``, ``inverse(y, context=None, return_logdet=False)``,
    and ``inverse_backward`` for memory-free chains (each subnet runs once, with grad).
    """

    def __init__(self, channels: int, subnet: str | SubnetFactory = "conv", *, hidden: int | None = None,
                 coupling: str = "additive", scale: str = "exp", clamp: float = 2.0, context_channels: int = 0,
                 f: nn.Module | None = None, g: nn.Module | None = None, backend: str | None = None):
        super().__init__()
        name = type(self).__name__
        _validation.check_int(name, "channels", channels, minimum=2)
        _validation.check_int(name, "context_channels", context_channels, minimum=0)
        if coupling not in _COUPLINGS:
            raise ValueError(f"{name}: coupling should be 'additive' or 'affine', got {coupling!r}")
        check_affine(name, scale, clamp)
        if coupling == "additive" and (scale, clamp) != ("exp", 2.0):
            raise ValueError(f"{name}: scale and clamp apply to coupling='affine', got coupling='additive' with "
                             f"scale={scale!r}, clamp={clamp!r}")
        if backend is not None:
            F.prepare(_backend.check_backend(backend))
        self.channels = channels
        self.c1, self.c2 = _validation.split_channels(channels)
        self.coupling = coupling
        self.scale = scale
        self.clamp = float(clamp)
        self.context_channels = context_channels
        self.backend = backend
        per = 2 if coupling == "affine" else 1
        self._f_channels, self._g_channels = per * self.c1, per * self.c2
        if (f is None) != (g is None):
            raise ValueError(f"{name}: f and g should be given together, got only {'f' if g is None else 'g'}")
        if f is not None:
            for label, module in (("f", f), ("g", g)):
                if not isinstance(module, nn.Module):
                    raise ValueError(f"{name}: {label} should be an nn.Module, got {type(module).__name__}")
            if hidden is not None:
                raise ValueError(f"{name}: hidden applies to the subnets built from subnet=, got f, g and "
                                 f"hidden={hidden!r}")
            self._input_dim = None
            self.f, self.g = f, g
        else:
            factory = resolve_subnet(name, subnet, hidden)
            self._input_dim = subnet_input_dim(factory)
            self.f = factory(self.c2 + context_channels, self._f_channels)
            self.g = factory(self.c1 + context_channels, self._g_channels)

    def _hf(self, x2, context, dtype):
        return subnet_h(type(self).__name__, self.f, x2, context, self.context_channels, self._f_channels, dtype)

    def _hg(self, y1, context, dtype):
        return subnet_h(type(self).__name__, self.g, y1, context, self.context_channels, self._g_channels, dtype)

    def _first(self, x1: torch.Tensor, hf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``y1`` and the per-sample log-det of the first half-step (None for additive)."""
        if self.coupling == "additive":
            return x1 + hf, None
        return affine_half(x1, hf, self.scale, self.clamp)

    def _first_inverse(self, y1: torch.Tensor, hf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x1`` and the per-sample log-det of the first half-step's inverse (None for additive)."""
        if self.coupling == "additive":
            return y1 - hf, None
        return affine_half_inv(y1, hf, self.scale, self.clamp)

    def _second(self, z: torch.Tensor, hg: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.coupling == "affine":
            op = F.affine_coupling_inv if inverse else F.affine_coupling_fwd
            return op(z, hg, self.scale, self.clamp, backend=self.backend)
        op = F.additive_coupling_inv if inverse else F.additive_coupling_fwd
        return op(z, hg, backend=self.backend), z.new_zeros(z.shape[0], dtype=_validation.logdet_dtype(z.dtype))

    def _check(self, x: torch.Tensor, x_name: str) -> None:
        check_block_input(type(self).__name__, x, x_name, self.channels, self._input_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x, "x")
        x1, x2 = x[:, : self.c1], x[:, self.c1:]
        y1, logdet1 = self._first(x1, self._hf(x2, context, x.dtype))
        y, logdet = self._second(torch.cat([y1, x2], dim=1), self._hg(y1, context, x.dtype), inverse=False)
        return y, logdet if logdet1 is None else logdet + logdet1

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None, return_logdet: bool = False):
        self._check(y, "y")
        z, logdet = self._second(y, self._hg(y[:, : self.c1], context, y.dtype), inverse=True)
        y1, x2 = z[:, : self.c1], z[:, self.c1:]
        x1, logdet1 = self._first_inverse(y1, self._hf(x2, context, y.dtype))
        x = torch.cat([x1, x2], dim=1)
        if not return_logdet:
            return x
        return x, logdet if logdet1 is None else logdet + logdet1

    def inverse_backward(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                         context: torch.Tensor | None = None):
        """Memory-free backward (used by :class:`~invkernels.nn.InvertibleSequential`): rebuild the
        input from ``y`` and return ``(x, grad_x, grads)``. ``g`` runs once with grad on ``y1``
        while the fused coupling op rebuilds ``x2`` and back-propagates the second half-step; then
        ``f`` runs once with grad on ``x2`` and the first half-step is back-propagated at the
        rebuilt ``x1``."""
        self._check(y, "y")
        c1 = self.c1
        extra_g = [t for t in (*self.g.parameters(), context) if t is not None and t.requires_grad]
        extra_f = [t for t in (*self.f.parameters(), context) if t is not None and t.requires_grad]
        leaf_y1 = y[:, :c1].detach().requires_grad_()
        with torch.enable_grad():
            hg = self._hg(leaf_y1, context, y.dtype)
        if self.coupling == "affine":
            z, grad_z, grad_hg = F.affine_coupling_inv_bwd(y, hg.detach(), grad_y, grad_logdet, self.scale,
                                                           self.clamp, backend=self.backend)
        else:
            z, grad_z, grad_hg = F.additive_coupling_inv_bwd(y, hg.detach(), grad_y, backend=self.backend)
        got_g = torch.autograd.grad(hg, [leaf_y1, *extra_g], grad_hg, allow_unused=True)
        grad_y1 = grad_z[:, :c1] if got_g[0] is None else grad_z[:, :c1] + got_g[0]
        y1, x2 = z[:, :c1], z[:, c1:]
        leaf_x2 = x2.detach().requires_grad_()
        with torch.enable_grad():
            hf = self._hf(leaf_x2, context, y.dtype)
            x1 = self._first_inverse(y1, hf.detach())[0].requires_grad_()
            h_leaf = hf.detach().requires_grad_()
            y1_again, logdet1 = self._first(x1, h_leaf)
        outputs, grads = [y1_again], [grad_y1]
        if logdet1 is not None:
            outputs.append(logdet1)
            grads.append(grad_logdet.to(logdet1.dtype))
        grad_x1, grad_hf = torch.autograd.grad(outputs, [x1, h_leaf], grads)
        got_f = torch.autograd.grad(hf, [leaf_x2, *extra_f], grad_hf, allow_unused=True)
        grad_x2 = grad_z[:, c1:] if got_f[0] is None else grad_z[:, c1:] + got_f[0]
        x = torch.cat([x1.detach(), x2], dim=1)
        return x, torch.cat([grad_x1, grad_x2], dim=1), [*zip(extra_g, got_g[1:]), *zip(extra_f, got_f[1:])]

    def extra_repr(self) -> str:
        affine = f", scale={self.scale!r}" + (f", clamp={self.clamp}" if self.scale == "exp" else "") \
            if self.coupling == "affine" else ""
        extra = f", context_channels={self.context_channels}" if self.context_channels else ""
        return f"channels={self.channels}, split=({self.c1}, {self.c2}), coupling={self.coupling!r}{affine}{extra}"
