"""The classes of :mod:`invkernels.compat.normflows` (this module imports normflows).

Each class subclasses the normflows class of its name and keeps its constructor, parameters,
buffers, state-dict layout and direction (``forward``: z -> x, the sampling direction, with
``(x, log_det)``; ``inverse``: x -> z). Where normflows' math is a fused op's math, the op runs:

- ``AffineCouplingBlock`` with ``split_mode="channel"`` or ``"channel_inv"``: with
  ``scale_map="sigmoid_inv"`` (``x2 = z2 * sigmoid(u + 2) + shift``, log-det ``Σ log sigmoid(u + 2)``)
  it is ``affine_coupling_fwd/inv(x, h, "sigmoid", passthrough=p)``, with ``scale=False``
  (``x2 = z2 + param``) ``additive_coupling_fwd/inv``; normflows' interleaved parameters
  (``shift = param[:, 0::2]``, ``u = param[:, 1::2]``) are gathered to the op's ``h = [u | shift]``
  (exact), ``p`` is the first chunk's size, and for ``"channel_inv"`` (conditioning on the last
  chunk) the channels are rolled to ``[z1 | z2]`` and back (exact);
- ``MaskedAffineFlow`` without a scale net (``s=None``: NICE, ``x = z + (1 - b) * t(b * z)``) and a
  0/1 mask constant along each channel is ``additive_coupling_fwd/inv`` with ``passthrough`` the
  channels of ``b = 1`` (gathered to the front and scattered back when they are not first); for
  non-finite values normflows' mask arithmetic spreads NaN into the passed-through features, the
  op leaves them;
- ``AffineConstFlow`` and ``ActNorm`` with one parameter per channel (``shape=(C, 1, 1)`` or
  ``(C,)``): normflows' ``z * exp(s) + t`` is ``actnorm_inv(z, -t, -s)`` and its inverse
  ``(x - t) * exp(-s)`` is ``actnorm_fwd(x, -t, -s)``. ``ActNorm``'s data-dependent initialization
  (on the first call, in whichever direction) is normflows' own code;
- ``Invertible1x1Conv`` on ``[B, C, H, W]``: the product is ``conv1x1``; with ``use_lu=True`` the
  weight ``P L U`` is ``invconv_weight`` (``perm`` read off normflows' permutation matrix ``P``) and
  the inverse weight ``invconv_inverse_weight`` (two triangular solves in float64, where normflows
  inverts ``L`` and ``U`` in float64); the dense weight is inverted as normflows inverts it;
- ``GlowBlock``: this module's coupling, 1x1 convolution and ActNorm; its ``inverse`` (x -> z),
  once the ActNorm is initialized, runs the ActNorm and the 1x1 convolution as one
  ``actnorm_conv1x1`` (``W ((x - t) * exp(-s))``);
- ``CoupledRationalQuadraticSpline`` with ``tails="linear"``: the conditional spline and the
  unconditional spline of the identity features are ``rq_spline_fwd/inv`` (``passthrough=0``);
  settings outside the op's range and inputs other than float32 / float64 run normflows' code.

Everything else runs normflows' own code (``super()``): the ``"exp"`` scale (normflows' is
unclamped, the op's ``exp`` scale is soft-clamped), the ``"sigmoid"`` scale (normflows' forward is
``z2 / sigmoid(u + 2) + shift``, which is not the op's ``x * s + t`` in either direction), the
checkerboard splits, ``MaskedAffineFlow`` with a scale net, per-element ``AffineConstFlow`` /
``ActNorm`` parameters, dtype mismatches and subclasses that override the math.
"""

from __future__ import annotations


import numpy as np
import torch
from normflows.flows import base as _base
from normflows.flows import mixing as _mixing
from normflows.flows import normalization as _normalization
from normflows.flows import reshape as _reshape
from normflows.flows.affine import coupling as _coupling
from normflows.flows.affine import glow as _glow
from normflows.flows.neural_spline import coupling as _spline_coupling
from normflows.flows.neural_spline import wrapper as _wrapper
from normflows.nets import cnn as _cnn
from normflows.nets import resnet as _resnet
from normflows.utils import masks as _masks
from torch import nn

import invkernels.ops as F
from invkernels._validation import SPLINE_MIN_FRACTION
from invkernels.compat._common import counted, nflows_spline_h
from invkernels.compat._lazy import count

_LIBRARY = "normflows"
_SPLINE_DTYPES = (torch.float32, torch.float64)

# normflows' classes, bound now: scripts/peer_suites.py replaces the public names in normflows'
# modules with this module's classes.
_Flow = _base.Flow
_Split, _Merge = _reshape.Split, _reshape.Merge
_AffineCoupling = _coupling.AffineCoupling
_AffineCouplingBlock = _coupling.AffineCouplingBlock
_AffineConstFlow = _coupling.AffineConstFlow
_MaskedAffineFlow = _coupling.MaskedAffineFlow
_ActNorm = _normalization.ActNorm
_Invertible1x1Conv = _mixing.Invertible1x1Conv
_GlowBlock = _glow.GlowBlock
_PRQCoupling = _spline_coupling.PiecewiseRationalQuadraticCoupling
_PRQCDF = _spline_coupling.PiecewiseRationalQuadraticCDF
_CoupledRationalQuadraticSpline = _wrapper.CoupledRationalQuadraticSpline


def _versions(*tensors: torch.Tensor) -> tuple:
    return tuple((t.data_ptr(), t._version, t.device, t.dtype, tuple(t.shape)) for t in tensors)


def _cached(owner: nn.Module, name: str, tensors: tuple, compute):
    """``compute()``, cached on ``owner`` until one of ``tensors`` changes (``load_state_dict``)."""
    key = _versions(*tensors)
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = (key, compute())
        owner.__dict__[name] = cached
    return cached[1]


def _is_float(z) -> bool:
    return isinstance(z, torch.Tensor) and z.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --- affine coupling ------------------------------------------------------------------------------


class _FusedWhereLaidOut:
    """``forward`` / ``inverse``: the fused path (``_fused``) where ``_layout`` finds the op's
    layout in the input, normflows' code (``super()``) where it returns None."""

    def forward(self, z):
        layout = self._layout(z)
        return super().forward(z) if layout is None else self._fused(z, layout, inverse=False)

    def inverse(self, z):
        layout = self._layout(z)
        return super().inverse(z) if layout is None else self._fused(z, layout, inverse=True)


class AffineCouplingBlock(_FusedWhereLaidOut, _AffineCouplingBlock):
    """normflows' ``AffineCouplingBlock`` (split, ``AffineCoupling``, merge); with a channel split,
    ``scale_map="sigmoid_inv"`` is ``affine_coupling_fwd/inv`` (``"sigmoid"``) and ``scale=False``
    ``additive_coupling_fwd/inv``."""

    __init__ = counted(_AffineCouplingBlock, _LIBRARY)

    def _layout(self, z) -> tuple[int, int, bool] | None:
        """``(first chunk size, passthrough, rolled)`` when the block runs fused on ``z``, else None."""
        if len(self.flows) != 3 or not _is_float(z) or z.dim() < 2 or z.shape[1] < 2:
            return None
        split, coupling, merge = self.flows
        if type(split) is not _Split or type(merge) is not _Merge or type(coupling) is not _AffineCoupling:
            return None
        if split.mode != merge.mode or split.mode not in ("channel", "channel_inv"):
            return None
        if coupling.scale and coupling.scale_map != "sigmoid_inv":
            return None
        first = (z.shape[1] + 1) // 2  # z.chunk(2, dim=1)'s first chunk
        if split.mode == "channel":
            return first, first, False
        return first, z.shape[1] - first, True

    def _fused(self, z: torch.Tensor, layout: tuple[int, int, bool], inverse: bool):
        first, p, rolled = layout
        coupling = self.flows[1]
        x = torch.cat([z[:, first:], z[:, :first]], 1) if rolled else z.contiguous()
        param = coupling.param_map(x[:, :p])
        transformed = x.shape[1] - p
        parts = 2 if coupling.scale else 1
        if param.dtype != x.dtype or param.shape != (x.shape[0], parts * transformed, *x.shape[2:]):
            # Not the op's h: normflows' code (and its errors).
            return super().inverse(z) if inverse else super().forward(z)
        log_det_tot = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        if coupling.scale:
            h = torch.cat([param[:, 1::2], param[:, 0::2]], 1)
            op = F.affine_coupling_inv if inverse else F.affine_coupling_fwd
            y, log_det = op(x, h, "sigmoid", 2.0, p)
            log_det_tot += log_det
        else:
            op = F.additive_coupling_inv if inverse else F.additive_coupling_fwd
            y = op(x, param.contiguous(), p)
        if rolled:
            y = torch.cat([y[:, p:], y[:, :p]], 1)
        return y, log_det_tot


def _channel_mask(b: torch.Tensor):
    """``(ordered, perm, inverse perm, passthrough)`` of a 0/1 mask ``b`` (``[1, C, ...]``) constant
    along each channel, passthrough = the channels of ``b = 1``; None for any other mask."""
    if b.dim() < 2 or b.shape[0] != 1 or b.shape[1] < 2 or not b.is_floating_point():
        return None
    per_channel = b[0].reshape(b.shape[1], -1)
    first = per_channel[:, :1]
    if not bool(((first == 0) | (first == 1)).all()) or not bool((per_channel == first).all()):
        return None
    keep = first[:, 0] == 1
    ident = torch.nonzero(keep).flatten()
    trans = torch.nonzero(~keep).flatten()
    if ident.numel() == 0 or trans.numel() == 0:
        return None
    perm = torch.cat([ident, trans])
    ordered = bool(torch.equal(perm, torch.arange(b.shape[1], device=b.device)))
    return ordered, perm, torch.argsort(perm), ident.numel()


class MaskedAffineFlow(_FusedWhereLaidOut, _MaskedAffineFlow):
    """normflows' ``MaskedAffineFlow``; without a scale net (``s=None``, NICE) and with a 0/1 mask
    constant along each channel it is ``additive_coupling_fwd/inv``."""

    __init__ = counted(_MaskedAffineFlow, _LIBRARY)

    def _layout(self, z):
        if self.s is not torch.zeros_like or not isinstance(self.t, nn.Module) or not _is_float(z):
            return None
        b = self.b
        if b.dtype != z.dtype or z.dim() != b.dim() or z.shape[1:] != b.shape[1:]:
            return None
        if type(self).forward is not MaskedAffineFlow.forward or type(self).inverse is not MaskedAffineFlow.inverse:
            return None
        return _cached(self, "_invkernels_mask", (b,), lambda: _channel_mask(b))

    def _fused(self, z: torch.Tensor, layout, inverse: bool):
        ordered, perm, perm_inv, p = layout
        trans = self.t(self.b * z)
        if trans.dtype != z.dtype or trans.shape != z.shape:
            return super().inverse(z) if inverse else super().forward(z)
        nan = torch.tensor(np.nan, dtype=z.dtype, device=z.device)
        trans = torch.where(torch.isfinite(trans), trans, nan)
        x = z.contiguous() if ordered else z.index_select(1, perm)
        shift = trans[:, p:] if ordered else trans.index_select(1, perm[p:])
        op = F.additive_coupling_inv if inverse else F.additive_coupling_fwd
        y = op(x, shift.contiguous(), p)
        if not ordered:
            y = y.index_select(1, perm_inv)
        # normflows' log-det: Σ (1 - b) * 0.
        return y, torch.zeros(z.shape[0], dtype=torch.result_type(self.b, z), device=z.device)


# --- ActNorm ----------------------------------------------------------------------------------------


class _FusedAffineConst(_AffineConstFlow):
    """normflows' ``AffineConstFlow`` math on ``actnorm_fwd/inv`` for per-channel parameters."""

    def _per_channel(self, z) -> bool:
        s, t = self.s, self.t
        return (_is_float(z) and z.dim() == s.dim() >= 2 and s.shape == t.shape and s.shape[0] == 1
                and s.shape[1] == z.shape[1] and all(d == 1 for d in s.shape[2:])
                and s.dtype == t.dtype == z.dtype and s.device == z.device == t.device)

    def _log_det(self, z: torch.Tensor, sign: int):
        """normflows' log-det (a 0-dim tensor)."""
        if len(self.batch_dims) > 1:
            prod_batch_dims = np.prod([z.size(i) for i in self.batch_dims[1:]])
        else:
            prod_batch_dims = 1
        return (-prod_batch_dims if sign < 0 else prod_batch_dims) * torch.sum(self.s)

    def forward(self, z):
        if not self._per_channel(z):
            return super().forward(z)
        x, _ = F.actnorm_inv(z.contiguous(), -self.t.reshape(-1), -self.s.reshape(-1))
        return x, self._log_det(z, 1)

    def inverse(self, z):
        if not self._per_channel(z):
            return super().inverse(z)
        x, _ = F.actnorm_fwd(z.contiguous(), -self.t.reshape(-1), -self.s.reshape(-1))
        return x, self._log_det(z, -1)


class AffineConstFlow(_FusedAffineConst):
    """normflows' ``AffineConstFlow`` (``z * exp(s) + t``); per-channel parameters run
    ``actnorm_inv(z, -t, -s)`` (forward) and ``actnorm_fwd(x, -t, -s)`` (inverse)."""

    __init__ = counted(_AffineConstFlow, _LIBRARY)


class ActNorm(_ActNorm, _FusedAffineConst):
    """normflows' ``ActNorm``: its data-dependent initialization (normflows' code, on the first
    call in either direction), then ``AffineConstFlow``'s math, fused for per-channel parameters."""

    # MRO: ActNorm, normflows' ActNorm, _FusedAffineConst, normflows' AffineConstFlow: normflows'
    # ActNorm.forward initializes and calls super().forward, which is the fused one.
    __init__ = counted(_ActNorm, _LIBRARY)


# --- invertible 1x1 convolution ---------------------------------------------------------------------


def _lu_perm(module) -> torch.Tensor | None:
    """The ``perm`` of normflows' permutation matrix ``P`` (``(P M)[i] = M[perm[i]]``), None when ``P``
    is not a permutation matrix, ``eye`` not the identity or ``sign_S`` not ±1."""
    P, eye, sign = module.P, module.eye, module.sign_S
    c = module.num_channels
    if P.shape != (c, c) or eye.shape != (c, c) or sign.shape != (c,):
        return None
    if not bool(((P == 0) | (P == 1)).all()) or not bool((P.sum(0) == 1).all()) or not bool((P.sum(1) == 1).all()):
        return None
    if not torch.equal(eye, torch.eye(c, dtype=eye.dtype, device=eye.device)):
        return None
    if not bool(((sign == 1) | (sign == -1)).all()):
        return None
    return P.argmax(1)


class Invertible1x1Conv(_Invertible1x1Conv):
    """normflows' ``Invertible1x1Conv`` (``forward``: ``W⁻¹ z``, ``inverse``: ``W x``) on ``conv1x1``;
    with ``use_lu=True`` the weights come from ``invconv_weight`` / ``invconv_inverse_weight``."""

    __init__ = counted(_Invertible1x1Conv, _LIBRARY)

    def _perm(self) -> torch.Tensor | None:
        return _cached(self, "_invkernels_perm", (self.P, self.eye, self.sign_S), lambda: _lu_perm(self))

    def _fusable(self, z) -> bool:
        if not _is_float(z) or z.dim() != 4 or z.shape[1] != self.num_channels:
            return False
        if type(self)._assemble_W is not _Invertible1x1Conv._assemble_W:
            return False
        if self.use_lu:
            params = (self.L, self.U, self.log_S, self.sign_S)
            return (all(p.dtype == z.dtype and p.device == z.device for p in params)
                    and self.P.device == z.device and self._perm() is not None)
        return self.W.dtype == z.dtype and self.W.device == z.device and self.W.shape == (z.shape[1],) * 2

    def _weight(self, inverse: bool) -> torch.Tensor:
        if self.use_lu:
            factors = (self._perm(), self.L, self.U, self.sign_S, self.log_S)
            return F.invconv_inverse_weight(*factors) if inverse else F.invconv_weight(*factors)
        if not inverse:
            return self.W
        if self.W.dtype == torch.float64:
            return torch.inverse(self.W)
        return torch.inverse(self.W.double()).type(self.W.dtype)

    def _log_det(self, z: torch.Tensor, inverse: bool):
        """normflows' log-det (a 0-dim tensor); ``inverse``: of ``inverse``."""
        log_det = torch.sum(self.log_S) if self.use_lu else torch.slogdet(self.W)[1]
        if not inverse:
            log_det = -log_det
        return log_det * z.size(2) * z.size(3)

    def forward(self, z):
        if not self._fusable(z):
            return super().forward(z)
        return F.conv1x1(z, self._weight(True)), self._log_det(z, False)

    def inverse(self, z):
        if not self._fusable(z):
            return super().inverse(z)
        return F.conv1x1(z, self._weight(False)), self._log_det(z, True)


# --- Glow -------------------------------------------------------------------------------------------


class GlowBlock(_GlowBlock):
    """normflows' ``GlowBlock`` (coupling, 1x1 convolution, ActNorm) built from this module's classes,
    with normflows' draws in normflows' order; ``inverse`` folds the initialized ActNorm into the
    1x1 convolution (``actnorm_conv1x1``)."""

    def __init__(self, channels, hidden_channels, scale=True, scale_map="sigmoid", split_mode="channel", leaky=0.0,
                 init_zeros=True, use_lu=True, net_actnorm=False):
        _Flow.__init__(self)  # normflows' GlowBlock.__init__ would build normflows' own layers
        self.flows = nn.ModuleList([])
        kernel_size = (3, 1, 3)
        num_param = 2 if scale else 1
        if "channel" == split_mode:
            channels_ = ((channels + 1) // 2,) + 2 * (hidden_channels,)
            channels_ += (num_param * (channels // 2),)
        elif "channel_inv" == split_mode:
            channels_ = (channels // 2,) + 2 * (hidden_channels,)
            channels_ += (num_param * ((channels + 1) // 2),)
        elif "checkerboard" in split_mode:
            channels_ = (channels,) + 2 * (hidden_channels,)
            channels_ += (num_param * channels,)
        else:
            raise NotImplementedError("Mode " + split_mode + " is not implemented.")
        param_map = _cnn.ConvNet2d(channels_, kernel_size, leaky, init_zeros, actnorm=net_actnorm)
        self.flows += [AffineCouplingBlock(param_map, scale, scale_map, split_mode)]
        if channels > 1:
            self.flows += [Invertible1x1Conv(channels, use_lu)]
        self.flows += [ActNorm((channels,) + (1, 1))]
        count(self, _LIBRARY)

    def _foldable(self, z) -> bool:
        if len(self.flows) != 3:
            return False
        conv, actnorm = self.flows[1], self.flows[2]
        return (type(conv) is Invertible1x1Conv and type(actnorm) is ActNorm and bool(actnorm.data_dep_init_done)
                and conv._fusable(z) and actnorm._per_channel(z))

    def inverse(self, z):
        if not self._foldable(z):
            return super().inverse(z)
        coupling, conv, actnorm = self.flows
        log_det_tot = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        # normflows: ActNorm.inverse ((z - t) * exp(-s)), then the 1x1 convolution's inverse (W ·).
        u, _ = F.actnorm_conv1x1(z.contiguous(), conv._weight(False), -actnorm.t.reshape(-1),
                                 -actnorm.s.reshape(-1))
        log_det_tot += actnorm._log_det(z, -1)
        log_det_tot += conv._log_det(z, True)
        u, log_det = coupling.inverse(u)
        log_det_tot += log_det
        return u, log_det_tot


# --- neural spline flows ----------------------------------------------------------------------------


def _spline_settings_fusable(bins, tails, tail_bound, min_bin_width, min_bin_height, min_derivative) -> bool:
    if not isinstance(tails, str) or tails != "linear" or isinstance(bins, bool) or not isinstance(bins, int) \
            or bins < 1:
        return False
    if isinstance(tail_bound, bool) or not isinstance(tail_bound, (int, float)) or \
            not torch.finfo(torch.float32).tiny <= tail_bound <= torch.finfo(torch.float32).max:
        return False
    fractions = [(min_bin_width, 1 / bins), (min_bin_height, 1 / bins), (min_derivative, 1)]
    return all(not isinstance(v, bool) and isinstance(v, (int, float)) and SPLINE_MIN_FRACTION <= v < limit
               for v, limit in fractions)


class _FusedCDF(_PRQCDF):
    """normflows' ``PiecewiseRationalQuadraticCDF`` (the unconditional spline of the identity
    features) on ``rq_spline_fwd/inv`` with linear tails."""

    def _fusable(self, inputs) -> bool:
        widths = self.unnormalized_widths
        bins = widths.shape[-1]
        return (isinstance(inputs, torch.Tensor) and inputs.dtype in _SPLINE_DTYPES and inputs.dim() >= 2
                and tuple(inputs.shape[1:]) == tuple(widths.shape[:-1])
                and all(p.dtype == inputs.dtype and p.device == inputs.device
                        for p in (widths, self.unnormalized_heights, self.unnormalized_derivatives))
                and self.unnormalized_heights.shape == widths.shape
                and self.unnormalized_derivatives.shape == (*widths.shape[:-1], bins - 1)
                and _spline_settings_fusable(bins, self.tails, getattr(self, "tail_bound", None), self.min_bin_width,
                                             self.min_bin_height, self.min_derivative))

    def _spline(self, inputs, inverse=False):
        if not self._fusable(inputs):
            return super()._spline(inputs, inverse)
        bins = self.unnormalized_widths.shape[-1]
        params = torch.cat([self.unnormalized_widths, self.unnormalized_heights, self.unnormalized_derivatives], -1)
        h = params.movedim(-1, 1).flatten(0, 1)  # [C * (3 bins - 1), *spatial]
        h = h[None].expand(inputs.shape[0], *h.shape).contiguous()
        op = F.rq_spline_inv if inverse else F.rq_spline_fwd
        return op(inputs.contiguous(), h, bins, float(self.tail_bound), float(self.min_bin_width),
                  float(self.min_bin_height), float(self.min_derivative), passthrough=0)


class _FusedPRQCoupling(_PRQCoupling):
    """normflows' ``PiecewiseRationalQuadraticCoupling`` with the conditional spline (and the
    unconditional one) on ``rq_spline_fwd/inv``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if type(self.unconditional_transform) is _PRQCDF:
            self.unconditional_transform.__class__ = _FusedCDF  # same parameters, fused _spline

    def _op_params(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """The op's ``h`` from the net's params (normflows scales them as nflows does)."""
        return nflows_spline_h(params, x, x.shape[1], self.num_bins, self.transform_net)

    def _coupling_transform(self, inputs, transform_params, inverse=False):
        fusable = (inputs.dim() in (2, 4) and inputs.dtype in _SPLINE_DTYPES and inputs.shape[1] >= 1
                   and type(self)._piecewise_cdf is _PRQCoupling._piecewise_cdf
                   and _spline_settings_fusable(self.num_bins, self.tails, getattr(self, "tail_bound", None),
                                                self.min_bin_width, self.min_bin_height, self.min_derivative))
        h = self._op_params(transform_params, inputs) if fusable else None
        if h is None:
            return super()._coupling_transform(inputs, transform_params, inverse)
        op = F.rq_spline_inv if inverse else F.rq_spline_fwd
        return op(inputs.contiguous(), h, self.num_bins, float(self.tail_bound), float(self.min_bin_width),
                  float(self.min_bin_height), float(self.min_derivative), passthrough=0)


class CoupledRationalQuadraticSpline(_CoupledRationalQuadraticSpline):
    """normflows' ``CoupledRationalQuadraticSpline`` (a ``PiecewiseRationalQuadraticCoupling`` with an
    alternating mask and an unconditional spline of the identity features, run backwards) with both
    splines on ``rq_spline_fwd/inv`` for ``tails="linear"``."""

    def __init__(self, num_input_channels, num_blocks, num_hidden_channels, num_context_channels=None, num_bins=8,
                 tails="linear", tail_bound=3.0, activation=nn.ReLU, dropout_probability=0.0, reverse_mask=False):
        _Flow.__init__(self)  # normflows' __init__ would build normflows' own coupling

        def transform_net_create_fn(in_features, out_features):
            return _resnet.ResidualNet(in_features=in_features, out_features=out_features,
                                       context_features=num_context_channels, hidden_features=num_hidden_channels,
                                       num_blocks=num_blocks, activation=activation(),
                                       dropout_probability=dropout_probability, use_batch_norm=False)

        self.prqct = _FusedPRQCoupling(
            mask=_masks.create_alternating_binary_mask(num_input_channels, even=reverse_mask),
            transform_net_create_fn=transform_net_create_fn, num_bins=num_bins, tails=tails, tail_bound=tail_bound,
            apply_unconditional_transform=True)
        count(self, _LIBRARY)
