"""The classes of :mod:`invkernels.compat.zuko` (this module imports zuko).

Each class subclasses the zuko class of its name and keeps its constructor, mask (True: the
constant features ``x_a``, zuko's convention), parameters, state dict and calling convention:
features-last inputs ``[*, D]``, a context that is batched, unbatched or broadcast, and lazy
transforms whose ``forward(c)`` returns a ``torch.distributions.Transform``. Where zuko's math is
a fused op's math, the op runs:

- a coupling whose univariate transformation is zuko's ``AdditiveTransform`` (``y_b = x_b + b``,
  log-det 0; e.g. ``univariate=AdditiveTransform, shapes=[()]``, NICE proper) is
  ``additive_coupling_fwd/inv`` with ``passthrough=p`` (``p`` constant features) on the features
  flattened to ``[N, D]``: on the input itself when the constant features are the first ``p`` (in
  order), else on the features gathered as ``[x_a | x_b]`` and scattered back (zuko gathers and
  scatters too; the gather is exact). The shift comes from zuko's own hyper network and
  ``meta``, called once as zuko calls it; the coupling runs fused when it is exactly
  ``DependentTransform(AdditiveTransform(b), 1)`` with ``b`` shaped, typed and placed like
  ``x_b`` (otherwise, e.g. an unbatched input with a batched context, zuko's code runs, with its
  broadcasting and its errors).

- a coupling with zuko's default univariate ``MonotonicAffineTransform`` (``y_b = exp(L) x_b + b``,
  ``L = a / (1 + |a| / -log(slope))``) is ``affine_coupling_fwd/inv`` with the ``"rational"`` scale
  (``clamp = -log(slope)``) on ``h = [a | b]``, laid out the same way; ``a`` and ``b`` come from
  zuko's hyper network as zuko's ``meta`` computes them (and zuko's transform is not built).

Everything else runs zuko's own code (``super()``): ``MonotonicRQSTransform``, whose
parametrization (soft-clamped inputs, no minimum bin size, ``exp`` knot derivatives) is not nflows'
that ``rq_spline_fwd/inv`` computes; any other univariate transformation;
``log_abs_det_jacobian(x, y)`` alone (no op computes only a log-det); empty inputs; subclasses that
override ``split`` or ``merge``. ``NICE`` and ``RealNVP`` are zuko's flows built from this module's
``GeneralCouplingTransform`` (same draws, same order).
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
from zuko import transforms as _transforms
from zuko.flows import coupling as _coupling
from zuko.utils import broadcast, unpack

import invkernels.ops as F
from invkernels.compat._common import counted
from invkernels.compat._lazy import count

_LIBRARY = "zuko"
_DEFAULT_SLOPE = inspect.signature(_transforms.MonotonicAffineTransform).parameters["slope"].default


class CouplingTransform(_transforms.CouplingTransform):
    """zuko's ``CouplingTransform`` (``y_a = x_a``, ``y_b = meta(x_a)(x_b)``); when ``meta(x_a)``
    is zuko's additive transformation, the coupling is ``additive_coupling_fwd/inv``."""

    __init__ = counted(_transforms.CouplingTransform, _LIBRARY)

    def _layout(self) -> tuple[bool, torch.Tensor, torch.Tensor]:
        """``(ordered, perm, inverse perm)``: ``ordered`` when the constant features are
        ``0, ..., p - 1`` (the op's passed-through channels), ``perm`` the features as ``[a | b]``."""
        cached = self.__dict__.get("_invkernels_layout")
        if cached is None:
            idx_a, idx_b = self.idx_a, self.idx_b
            perm = torch.cat([idx_a, idx_b])
            ordered = torch.equal(idx_a, torch.arange(idx_a.numel(), device=idx_a.device, dtype=idx_a.dtype))
            cached = (ordered, perm, torch.argsort(perm))
            self.__dict__["_invkernels_layout"] = cached
        return cached

    def _fusable(self, x: torch.Tensor) -> bool:
        cls = type(self)
        return (cls.split is _transforms.CouplingTransform.split and cls.merge is _transforms.CouplingTransform.merge
                and isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() >= 1 and x.numel() > 0
                and self.idx_b.numel() >= 1 and x.shape[-1] == self.idx_a.numel() + self.idx_b.numel())

    @staticmethod
    def _shift(f, x_b: torch.Tensor) -> torch.Tensor | None:
        """The shift ``b`` when ``f`` is zuko's ``y_b = x_b + b`` with ``b`` like ``x_b``, else None."""
        if type(f) is not _transforms.DependentTransform or f.reinterpreted != 1:
            return None
        base = f.base
        if type(base) is not _transforms.AdditiveTransform:
            return None
        shift = base.shift
        if not isinstance(shift, torch.Tensor) or shift.shape != x_b.shape or shift.dtype != x_b.dtype \
                or shift.device != x_b.device:
            return None
        return shift

    def _fused(self, x: torch.Tensor, x_a: torch.Tensor, x_b: torch.Tensor, shift: torch.Tensor,
               inverse: bool) -> torch.Tensor:
        features, p = x.shape[-1], self.idx_a.numel()
        flat, ordered = self._flat(x, x_a, x_b)
        op = F.additive_coupling_inv if inverse else F.additive_coupling_fwd
        y = op(flat, shift.reshape(-1, features - p).contiguous(), p)
        if not ordered:
            y = y.index_select(1, self._layout()[2])
        return y.reshape(x.shape)

    def _flat(self, x: torch.Tensor, x_a: torch.Tensor, x_b: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """The features as ``[N, D]`` with the constant ones first, and whether that is ``x``'s order."""
        features, p = x.shape[-1], self.idx_a.numel()
        ordered = self._layout()[0]
        if ordered:
            return x.reshape(-1, features).contiguous(), True
        return torch.cat([x_a.reshape(-1, p), x_b.reshape(-1, features - p)], -1), False

    def _affine(self, x: torch.Tensor, x_a: torch.Tensor, x_b: torch.Tensor, inverse: bool):
        """The monotonic affine coupling fused (``rational`` scale): ``(y, ladj)``, or None when zuko's
        parameters are not shaped like ``x_b`` (zuko broadcasts them; its code runs)."""
        shift, raw, slope = self._invkernels_affine(x_a)
        if shift.shape != x_b.shape or raw.shape != x_b.shape or shift.dtype != x_b.dtype \
                or shift.device != x_b.device:
            return None
        features, p = x.shape[-1], self.idx_a.numel()
        flat, ordered = self._flat(x, x_a, x_b)
        h = torch.cat([raw.reshape(-1, features - p), shift.reshape(-1, features - p)], -1)
        op = F.affine_coupling_inv if inverse else F.affine_coupling_fwd
        y, logdet = op(flat, h, "rational", -math.log(slope), p)
        if not ordered:
            y = y.index_select(1, self._layout()[2])
        return y.reshape(x.shape), logdet.reshape(x.shape[:-1])

    def _apply(self, x: torch.Tensor, inverse: bool):
        """``(y, ladj)`` fused, or None (then zuko's code) when the coupling is not additive."""
        x_a, x_b = self.split(x)
        if self.__dict__.get("_invkernels_affine") is not None:
            fused = self._affine(x, x_a, x_b, inverse)
            if fused is not None:
                return fused, None
        f = self.meta(x_a)
        shift = self._shift(f, x_b)
        if shift is None:
            return None, (x_a, x_b, f)
        # zuko: the sum over the last dimension of zeros_like(x_b).
        return (self._fused(x, x_a, x_b, shift, inverse), x.new_zeros(x.shape[:-1])), None

    def _call(self, x):
        if not self._fusable(x):
            return super()._call(x)
        fused, rest = self._apply(x, inverse=False)
        if fused is None:
            x_a, x_b, f = rest
            return self.merge(x_a, f(x_b), x.shape)
        return fused[0]

    def _inverse(self, y):
        if not self._fusable(y):
            return super()._inverse(y)
        fused, rest = self._apply(y, inverse=True)
        if fused is None:
            y_a, y_b, f = rest
            return self.merge(y_a, f.inv(y_b), y.shape)
        return fused[0]

    def call_and_ladj(self, x):
        if not self._fusable(x):
            return super().call_and_ladj(x)
        fused, rest = self._apply(x, inverse=False)
        if fused is None:
            x_a, x_b, f = rest
            y_b, ladj = f.call_and_ladj(x_b)
            return self.merge(x_a, y_b, x.shape), ladj
        return fused


class GeneralCouplingTransform(_coupling.GeneralCouplingTransform):
    """zuko's ``GeneralCouplingTransform`` (mask, hyper network ``hyper``, univariate
    transformation); ``forward(c)`` returns this module's ``CouplingTransform``. With ``features``
    1 it is zuko's ``ElementWiseTransform``, as zuko builds it."""

    __new__ = _coupling.GeneralCouplingTransform.__new__  # zuko's signature (inspect reads the first found)
    __init__ = counted(_coupling.GeneralCouplingTransform, _LIBRARY)

    def _affine_parameters(self, c, x: torch.Tensor):
        """zuko's ``meta`` up to the univariate transformation: ``(shift, raw scale, slope)`` of its
        ``MonotonicAffineTransform``."""
        if c is not None:
            x = torch.cat(broadcast(x, c, ignore=1), dim=-1)
        phi = unpack(self.hyper(x).unflatten(-1, (-1, self.total)), self.shapes)
        return phi[0], phi[1], _DEFAULT_SLOPE

    def forward(self, c=None):
        t = CouplingTransform(functools.partial(self.meta, c), self.mask)
        # The mask's layout, computed once per mask (zuko builds a CouplingTransform per call).
        key = (self.mask.data_ptr(), self.mask._version, self.mask.device)
        cached = self.__dict__.get("_invkernels_layout")
        if cached is None or cached[0] != key:
            cached = (key, t._layout())
            self.__dict__["_invkernels_layout"] = cached
        t._invkernels_layout = cached[1]
        if self.univariate is _transforms.MonotonicAffineTransform and len(self.shapes) == 2 \
                and all(tuple(shape) == () for shape in self.shapes):
            t._invkernels_affine = functools.partial(self._affine_parameters, c)
        return t


class NICE(_coupling.NICE):
    """zuko's ``NICE`` flow (coupling masks alternating or drawn at random, a diagonal normal base)
    built from this module's ``GeneralCouplingTransform``, with zuko's draws in zuko's order: a
    seed gives the flow zuko gives. Its default affine couplings run zuko's code; with
    ``univariate=AdditiveTransform, shapes=[()]`` they are fused."""

    @functools.wraps(_coupling.NICE.__init__)
    def __init__(self, features, context=0, transforms=3, randmask=False, **kwargs):
        temp = []
        for i in range(transforms):
            if randmask:
                mask = torch.randperm(features) % 2 == i % 2
            else:
                mask = torch.arange(features) % 2 == i % 2
            temp.append(GeneralCouplingTransform(features=features, context=context, mask=mask, **kwargs))
        base = _coupling.UnconditionalDistribution(
            _coupling.DiagNormal, loc=torch.zeros(features), scale=torch.ones(features), buffer=True)
        # zuko's Flow.__init__ (NICE.__init__ would build zuko's own couplings).
        super(_coupling.NICE, self).__init__(temp, base)
        count(self, _LIBRARY)


class RealNVP(_coupling.RealNVP, NICE):
    """zuko's ``RealNVP`` (zuko's ``NICE`` under another name), built as this module's ``NICE``."""
