"""Two-sided reversible block (RevNet, MemCNN's couplings, FrEIA's GLOW / RNVP blocks).

With ``x1 = x[:, :C // 2]`` and ``x2 = x[:, C // 2:]``::

    additive:  y1 = x1 + f(x2),                 y2 = x2 + g(y1)
    affine:    (hs, t) = f(x2),  y1 = x1 * s(hs) + t,   (hs', t') = g(y1),  y2 = x2 * s(hs') + t'

``s`` is the couplings' scale function (``"exp"``: ``exp(clamp * tanh(hs / clamp))``, or
``"sigmoid"``), ``logdet`` the sum of both halves' ``log s`` (docs/ops/coupling.md). The block
works on the two halves as separate tensors (:meth:`ReversibleBlock.forward_split`): in an
:class:`~invkernels.nn.InvertibleSequential` consecutive blocks hand each other their halves, so
a chain concatenates them once, for its output, and the subnets read contiguous halves.
"""

from __future__ import annotations

import torch
from torch import nn

from invkernels import _state, _validation
from invkernels.nn.coupling import check_affine, check_block_input, resolve_subnet, subnet_h, subnet_input_dim
from invkernels.nn.subnets import SubnetFactory, subnet_vjp, trained_tensors
from invkernels.reference.coupling import affine_half, affine_half_inv, affine_half_vjp

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

    ``forward(x, context=None) -> (y, logdet)``, ``inverse(y, context=None, return_logdet=False)``;
    on halves ``forward_split``, ``inverse_split``; and ``inverse_backward`` /
    ``inverse_backward_split`` for memory-free chains (each subnet runs once, with grad).
    """

    results_tested = True  # the chain trusts its memory-free results (protocol.checked_result)

    def __init__(self, channels: int, subnet: str | SubnetFactory = "conv", *, hidden: int | None = None,
                 coupling: str = "additive", scale: str = "exp", clamp: float = 2.0, context_channels: int = 0,
                 f: nn.Module | None = None, g: nn.Module | None = None):
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
        self.channels = channels
        self.c1, self.c2 = _validation.split_channels(channels)
        self.coupling = coupling
        self.scale = scale
        self.clamp = float(clamp)
        self.context_channels = context_channels
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
        try:
            return subnet_h(type(self).__name__, self.f, x2, context, self.context_channels, self._f_channels, dtype)
        except Exception as error:
            self._name_subnet(error, "f", x2)
            raise

    def _hg(self, y1, context, dtype):
        try:
            return subnet_h(type(self).__name__, self.g, y1, context, self.context_channels, self._g_channels, dtype)
        except Exception as error:
            self._name_subnet(error, "g", y1)
            raise

    def _name_subnet(self, error: Exception, label: str, a: torch.Tensor) -> None:
        """Adds a note to ``error``, raised while computing subnet ``label`` (``"f"`` or ``"g"``) on
        ``a``: which subnet, its input's shape and the output shape it should have. Only the error
        path pays for it (a ``try`` costs nothing until something raises)."""
        arg, other = ("x2", "x1") if label == "f" else ("y1", "x2")
        what = "shift" if self.coupling == "additive" else "log-scale and shift"
        channels = self._f_channels if label == "f" else self._g_channels
        spatial = list(a.shape[2:])
        given = [a.shape[0], a.shape[1] + self.context_channels, *spatial]
        want = [a.shape[0], channels, *spatial]
        with_context = f" ({arg} and context)" if self.context_channels else ""
        if not hasattr(error, "add_note"):  # Python 3.10: exceptions have no notes
            return
        error.add_note(f"{type(self).__name__}: in subnet {label} ({label}({arg}) is the {what} of {other}): its input "
                       f"has shape {given}{with_context}, its output should have shape {want}")

    @property
    def split_channels(self) -> int:
        """``C // 2``: where :meth:`forward_split` splits the channels (a chain passes the two
        halves from block to block without concatenating them)."""
        return self.c1

    def _step(self, a: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One half-step ``a -> a + h`` (or ``a * s + t``) and its log-det (None for additive)."""
        if self.coupling == "additive":
            return a + h, None
        return affine_half(a, h, self.scale, self.clamp)

    def _step_inverse(self, b: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.coupling == "additive":
            return b - h, None
        return affine_half_inv(b, h, self.scale, self.clamp)

    def _step_vjp(self, grad_b: torch.Tensor, grad_logdet: torch.Tensor, a: torch.Tensor, h: torch.Tensor):
        """``(grad_a, grad_h)`` of :meth:`_step` at ``(a, h)``."""
        if self.coupling == "additive":
            return grad_b, grad_b
        return affine_half_vjp(grad_b, grad_logdet, a, h, self.scale, self.clamp)

    def _check(self, x: torch.Tensor, x_name: str) -> None:
        check_block_input(type(self).__name__, x, x_name, self.channels, self._input_dim)

    def _check_halves(self, a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            sa, sb = a.shape, b.shape
            # What the checks below require, read once (a block on halves runs this per call).
            if (len(sa) == len(sb) >= 2 and sa[1] == self.c1 and sb[1] == self.c2 and sa[0] == sb[0]
                    and sa[2:] == sb[2:] and (self._input_dim is None or len(sa) == self._input_dim)
                    and a.is_floating_point() and b.is_floating_point()):
                return
        name = type(self).__name__
        check_block_input(name, a, names[0], self.c1, self._input_dim)
        check_block_input(name, b, names[1], self.c2, self._input_dim)
        if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:] or a.dim() != b.dim():
            raise ValueError(f"{name}: {names[0]} and {names[1]} should have the same batch and spatial sizes, got "
                             f"{list(a.shape)} and {list(b.shape)}")

    def _check_grads(self, tensors, grads, names, grad_logdet: torch.Tensor) -> None:
        """ValueError unless each gradient has its tensor's shape and ``grad_logdet`` is ``[batch]``."""
        name = type(self).__name__
        for t, g, (t_name, g_name) in zip(tensors, grads, names):
            if not isinstance(g, torch.Tensor) or g.shape != t.shape:
                got = list(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise ValueError(f"{name}: {g_name} should have the shape of {t_name}, {list(t.shape)}, got {got}")
        batch = tensors[0].shape[0]
        if not isinstance(grad_logdet, torch.Tensor) or grad_logdet.shape != (batch,):
            got = list(grad_logdet.shape) if isinstance(grad_logdet, torch.Tensor) else type(grad_logdet).__name__
            raise ValueError(f"{name}: grad_logdet should have shape [batch] = [{batch}], got {got}")

    def _zeros(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], dtype=_validation.logdet_dtype(x.dtype))

    def forward_split(self, x1: torch.Tensor, x2: torch.Tensor, context: torch.Tensor | None = None):
        """The block on the two halves ``x1 = x[:, :C // 2]``, ``x2 = x[:, C // 2:]``:
        ``(y1, y2, logdet)`` with ``logdet`` None for the additive coupling (0)."""
        self._check_halves(x1, x2, ("x1", "x2"))
        y1, logdet1 = self._step(x1, self._hf(x2, context, x1.dtype))
        _state.rng_mark()
        y2, logdet2 = self._step(x2, self._hg(y1, context, x1.dtype))
        return y1, y2, None if logdet1 is None else logdet1 + logdet2

    def inverse_split(self, y1: torch.Tensor, y2: torch.Tensor, context: torch.Tensor | None = None):
        """``(x1, x2, logdet)`` of the inverse on the output's halves (``logdet`` None for additive)."""
        self._check_halves(y1, y2, ("y1", "y2"))
        _state.rng_rewind(1)
        x2, logdet2 = self._step_inverse(y2, self._hg(y1, context, y1.dtype))
        _state.rng_rewind(0)
        x1, logdet1 = self._step_inverse(y1, self._hf(x2, context, y1.dtype))
        return x1, x2, None if logdet1 is None else logdet1 + logdet2

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x, "x")
        y1, y2, logdet = self.forward_split(*x.split([self.c1, self.c2], dim=1), context)
        return torch.cat([y1, y2], dim=1), self._zeros(x) if logdet is None else logdet

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None, return_logdet: bool = False):
        self._check(y, "y")
        x1, x2, logdet = self.inverse_split(*y.split([self.c1, self.c2], dim=1), context)
        x = torch.cat([x1, x2], dim=1)
        if not return_logdet:
            return x
        return x, self._zeros(y) if logdet is None else logdet

    def inverse_backward_split(self, y1: torch.Tensor, y2: torch.Tensor, grad_y1: torch.Tensor, grad_y2: torch.Tensor,
                               grad_logdet: torch.Tensor, context: torch.Tensor | None = None,
                               out: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Memory-free backward on halves: ``(x1, x2, grad_x1, grad_x2, grads)`` from the output's
        halves and their gradients. ``g`` runs once with grad on ``y1`` (rebuilding ``x2``), then
        ``f`` once with grad on ``x2`` (rebuilding ``x1``); each half-step's VJP is taken at its
        rebuilt input. ``out``: two tensors the input gradients are written into (views of the
        chain's gradient buffer)."""
        self._check_halves(y1, y2, ("y1", "y2"))
        self._check_grads((y1, y2), (grad_y1, grad_y2), (("y1", "grad_y1"), ("y2", "grad_y2")), grad_logdet)
        dtype = y1.dtype
        extra_g, extra_f = trained_tensors(self.g, context), trained_tensors(self.f, context)
        leaf = y1.detach().requires_grad_()
        # g drew its random numbers after f in the forward (a memory-free chain replays both states).
        _state.rng_rewind(1)
        with torch.enable_grad():
            hg = self._hg(leaf, context, dtype)
        hg_value = hg.detach()
        x2 = self._step_inverse(y2, hg_value)[0]
        grad_x2, grad_hg = self._step_vjp(grad_y2, grad_logdet, x2, hg_value)
        got_g = subnet_vjp(hg, [leaf, *extra_g], grad_hg)
        additive = self.coupling == "additive"
        if got_g[0] is not None:
            grad_y1 = torch.add(grad_y1, got_g[0], out=out[0]) if additive and out is not None else grad_y1 + got_g[0]
        leaf = x2.detach().requires_grad_()
        _state.rng_rewind(0)
        with torch.enable_grad():
            hf = self._hf(leaf, context, dtype)
        hf_value = hf.detach()
        x1 = self._step_inverse(y1, hf_value)[0]
        grad_x1, grad_hf = self._step_vjp(grad_y1, grad_logdet, x1, hf_value)
        got_f = subnet_vjp(hf, [leaf, *extra_f], grad_hf)
        if out is not None:
            if got_f[0] is None:
                out[1].copy_(grad_x2)
            else:
                torch.add(grad_x2, got_f[0], out=out[1])
            if grad_x1 is not out[0]:
                out[0].copy_(grad_x1)
            grad_x1, grad_x2 = out
        elif got_f[0] is not None:
            grad_x2 = grad_x2 + got_f[0]
        return x1, x2, grad_x1, grad_x2, [*zip(extra_g, got_g[1:]), *zip(extra_f, got_f[1:])]

    def inverse_backward(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                         context: torch.Tensor | None = None):
        """Memory-free backward (used by :class:`~invkernels.nn.InvertibleSequential`): rebuild the
        input from ``y`` and return ``(x, grad_x, grads)`` (:meth:`inverse_backward_split` on the
        halves, the gradient written into one buffer)."""
        self._check(y, "y")
        self._check_grads((y,), (grad_y,), (("y", "grad_y"),), grad_logdet)
        sizes = [self.c1, self.c2]
        grad_x = torch.empty_like(y, memory_format=torch.contiguous_format)
        x1, x2, _, _, grads = self.inverse_backward_split(*y.split(sizes, dim=1), *grad_y.split(sizes, dim=1),
                                                          grad_logdet, context, out=grad_x.split(sizes, dim=1))
        return torch.cat([x1, x2], dim=1), grad_x, grads

    def extra_repr(self) -> str:
        affine = f", scale={self.scale!r}" + (f", clamp={self.clamp}" if self.scale == "exp" else "") \
            if self.coupling == "affine" else ""
        extra = f", context_channels={self.context_channels}" if self.context_channels else ""
        return f"channels={self.channels}, split=({self.c1}, {self.c2}), coupling={self.coupling!r}{affine}{extra}"
