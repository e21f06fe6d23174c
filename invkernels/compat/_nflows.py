"""The classes of :mod:`invkernels.compat.nflows` (this module imports nflows).

Each class subclasses the nflows class of its name and keeps its constructor, masks (the
``identity_features`` / ``transform_features`` buffers), parameters and direction (``forward``:
x -> z with ``(outputs, logabsdet)``, ``inverse``: z -> x). Where nflows' math is a fused op's
math, the op runs:

- ``AdditiveCouplingTransform`` (``z2 = x2 * 1 + t``, log-det 0) is ``additive_coupling_fwd/inv``
  with ``passthrough=p`` (``p`` identity features) when there is no unconditional transform: on
  the input itself when the identity features are the first ``p`` (in order), else on the
  features gathered as ``[identity | transform]`` and scattered back (nflows gathers and scatters
  too; the gather is exact);
- ``PiecewiseRationalQuadraticCouplingTransform`` with ``tails="linear"`` (nflows'
  ``unconstrained_rational_quadratic_spline``) is ``rq_spline_fwd/inv``: on the whole input with
  ``passthrough=p`` when the identity features are the first ``p`` (in order) and there is no
  unconditional transform, else on nflows' transform split (``passthrough=0``); settings outside
  the op's range (``min_bin_width * num_bins >= 1``, fractions below 1e-6, a non-int ``num_bins``)
  and inputs other than float32 / float64 run nflows' code.

- ``AffineCouplingTransform`` (``z2 = x2 * (sigmoid(u + 2) + 1e-3) + t``) is
  ``affine_coupling_fwd/inv`` with the ``"sigmoid_eps"`` scale on ``h = [u | t]`` (nflows' params
  are ``[t | u]``), the mask handled as for the additive coupling.

Everything else runs nflows' own code (``super()``): an affine coupling with nflows main's
``scale_activation`` other than its default; the spline without tails (``tails=None``, the ``[0, 1]`` spline);
unconditional transforms of the identity features; subclasses that override the coupling math.
``SimpleRealNVP`` is nflows' flow built from this module's couplings (same draws, same order).
"""

from __future__ import annotations


import torch
from nflows.distributions.normal import StandardNormal
from nflows.flows.realnvp import SimpleRealNVP as _SimpleRealNVP
from nflows.nn import nets
from nflows.transforms import coupling as _coupling
from nflows.transforms.base import CompositeTransform
from nflows.transforms.normalization import BatchNorm
from torch.nn import functional as TF

import invkernels.ops as F
from invkernels._validation import SPLINE_MIN_FRACTION
from invkernels.compat._common import counted, nflows_spline_h
from invkernels.compat._lazy import count

_LIBRARY = "nflows"
_SPLINE_DTYPES = (torch.float32, torch.float64)


def _mask_layout(transform) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """``(ordered, perm, inverse perm)`` of a coupling's mask: ``ordered`` when the identity features
    are ``0, 1, ..., p - 1`` (the op's passed-through channels), ``perm`` the features as
    ``[identity | transform]``. Cached until the mask buffers change (``load_state_dict``)."""
    ident, trans = transform.identity_features, transform.transform_features
    key = (ident.data_ptr(), ident._version, trans.data_ptr(), trans._version, ident.device)
    cached = transform.__dict__.get("_invkernels_layout")
    if cached is None or cached[0] != key:
        arange = torch.arange(ident.numel(), device=ident.device, dtype=ident.dtype)
        perm = torch.cat([ident, trans])
        cached = (key, torch.equal(ident, arange), perm, torch.argsort(perm))
        transform.__dict__["_invkernels_layout"] = cached
    return cached[1], cached[2], cached[3]


def _assemble(inputs: torch.Tensor, transform, identity_split: torch.Tensor, transform_split: torch.Tensor):
    """nflows' scatter of the two splits into the output."""
    outputs = torch.empty_like(inputs)
    outputs[:, transform.identity_features, ...] = identity_split
    outputs[:, transform.transform_features, ...] = transform_split
    return outputs


class _FusedCoupling:
    """The fused path of nflows' affine-family couplings: the identity features gathered first (when
    they are not already), the transform net run as nflows runs it, one op over the whole input."""

    def _fusable(self, inputs: torch.Tensor) -> bool:
        cls = type(self)
        base = self._nflows_base
        return (self.unconditional_transform is None and inputs.dim() in (2, 4)
                and inputs.shape[1] == self.features >= 2
                and cls._scale_and_shift is base._scale_and_shift
                and cls._coupling_transform_forward is _coupling.AffineCouplingTransform._coupling_transform_forward
                and cls._coupling_transform_inverse is _coupling.AffineCouplingTransform._coupling_transform_inverse
                and self._default_scale())

    def _default_scale(self) -> bool:
        return True

    def forward(self, inputs, context=None):
        if not self._fusable(inputs):
            return super().forward(inputs, context)
        return self._fused(inputs, context, inverse=False)

    def inverse(self, inputs, context=None):
        if not self._fusable(inputs):
            return super().inverse(inputs, context)
        return self._fused(inputs, context, inverse=True)

    def _fused(self, inputs: torch.Tensor, context, inverse: bool):
        ordered, perm, perm_inv = _mask_layout(self)
        x = inputs.contiguous() if ordered else inputs.index_select(1, perm)
        p = self.num_identity_features
        identity_split = x[:, :p].contiguous()
        params = self.transform_net(identity_split, context)
        want = (x.shape[0], self._transform_dim_multiplier() * (x.shape[1] - p), *x.shape[2:])
        if params.dtype != x.dtype or params.shape != want:
            # Not the op's h: nflows' tensor ops on the splits (and their errors).
            method = self._coupling_transform_inverse if inverse else self._coupling_transform_forward
            transform_split, logabsdet = method(x[:, p:], params)
            return _assemble(inputs, self, identity_split, transform_split), logabsdet
        y, logabsdet = self._op(x, params, p, inverse)
        if not ordered:
            y = y.index_select(1, perm_inv)
        return y, logabsdet


class AffineCouplingTransform(_FusedCoupling, _coupling.AffineCouplingTransform):
    """nflows' ``AffineCouplingTransform`` (``z2 = x2 * (sigmoid(u + 2) + 1e-3) + t``, params
    ``[t | u]``): ``affine_coupling_fwd/inv`` with the ``"sigmoid_eps"`` scale on ``h = [u | t]`` and
    ``passthrough`` the identity features (nflows main's ``scale_activation``, when not its default,
    runs nflows' code)."""

    __init__ = counted(_coupling.AffineCouplingTransform, _LIBRARY)
    _nflows_base = _coupling.AffineCouplingTransform

    def _default_scale(self) -> bool:
        default = getattr(type(self), "DEFAULT_SCALE_ACTIVATION", None)
        return getattr(self, "scale_activation", default) is default

    def _op(self, x: torch.Tensor, params: torch.Tensor, p: int, inverse: bool):
        n = x.shape[1] - p
        h = torch.cat([params[:, n:], params[:, :n]], 1)
        op = F.affine_coupling_inv if inverse else F.affine_coupling_fwd
        return op(x, h, "sigmoid_eps", 1.0, p)


class AdditiveCouplingTransform(_FusedCoupling, _coupling.AdditiveCouplingTransform):
    """nflows' ``AdditiveCouplingTransform`` (``z2 = x2 + t``, log-det 0), fused
    (``additive_coupling_fwd/inv`` with ``passthrough`` the number of identity features)."""

    __init__ = counted(_coupling.AdditiveCouplingTransform, _LIBRARY)
    _nflows_base = _coupling.AdditiveCouplingTransform

    def _op(self, x: torch.Tensor, params: torch.Tensor, p: int, inverse: bool):
        op = F.additive_coupling_inv if inverse else F.additive_coupling_fwd
        return op(x, params.contiguous(), p), params.new_zeros(x.shape[0])


class PiecewiseRationalQuadraticCouplingTransform(_coupling.PiecewiseRationalQuadraticCouplingTransform):
    """nflows' ``PiecewiseRationalQuadraticCouplingTransform``; with ``tails="linear"`` the spline
    is ``rq_spline_fwd/inv`` (``passthrough=p`` on the whole input when the ``p`` identity features
    come first, else on nflows' transform split)."""

    __init__ = counted(_coupling.PiecewiseRationalQuadraticCouplingTransform, _LIBRARY)

    def _settings_fusable(self) -> bool:
        bins = self.num_bins
        if self.tails != "linear" or isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            return False
        if type(self)._piecewise_cdf is not _coupling.PiecewiseRationalQuadraticCouplingTransform._piecewise_cdf:
            return False
        bound = self.tail_bound
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or \
                not torch.finfo(torch.float32).tiny <= bound <= torch.finfo(torch.float32).max:
            return False
        fractions = [(self.min_bin_width, 1 / bins), (self.min_bin_height, 1 / bins), (self.min_derivative, 1)]
        return all(not isinstance(v, bool) and isinstance(v, (int, float)) and SPLINE_MIN_FRACTION <= v < limit
                   for v, limit in fractions)

    def _settings(self) -> tuple:
        return (self.num_bins, float(self.tail_bound), float(self.min_bin_width), float(self.min_bin_height),
                float(self.min_derivative))

    def _op_params(self, params: torch.Tensor, x: torch.Tensor, transformed: int) -> torch.Tensor | None:
        return nflows_spline_h(params, x, transformed, self.num_bins, self.transform_net)

    def _split_fusable(self, inputs: torch.Tensor) -> bool:
        return inputs.dim() in (2, 4) and inputs.dtype in _SPLINE_DTYPES and inputs.shape[1] >= 1 \
            and self._settings_fusable()

    def _coupling_transform(self, inputs, transform_params, inverse=False):
        h = self._op_params(transform_params, inputs, inputs.shape[1]) if self._split_fusable(inputs) else None
        if h is None:
            return super()._coupling_transform(inputs, transform_params, inverse)
        op = F.rq_spline_inv if inverse else F.rq_spline_fwd
        return op(inputs.contiguous(), h, *self._settings(), passthrough=0)

    def _whole_fusable(self, inputs: torch.Tensor) -> bool:
        return (self.unconditional_transform is None and inputs.dim() in (2, 4) and inputs.shape[1] == self.features
                and inputs.dtype in _SPLINE_DTYPES and self.num_transform_features >= 1
                and type(self)._coupling_transform
                is PiecewiseRationalQuadraticCouplingTransform._coupling_transform
                and self._settings_fusable() and _mask_layout(self)[0])

    def forward(self, inputs, context=None):
        if not self._whole_fusable(inputs):
            return super().forward(inputs, context)
        return self._whole(inputs, context, inverse=False)

    def inverse(self, inputs, context=None):
        if not self._whole_fusable(inputs):
            return super().inverse(inputs, context)
        return self._whole(inputs, context, inverse=True)

    def _whole(self, inputs: torch.Tensor, context, inverse: bool):
        x = inputs.contiguous()
        p = self.num_identity_features
        identity_split = x[:, :p].contiguous()
        params = self.transform_net(identity_split, context)
        h = self._op_params(params, x, self.features - p)
        if h is None:
            transform_split, logabsdet = super()._coupling_transform(x[:, p:], params, inverse)
            return _assemble(inputs, self, identity_split, transform_split), logabsdet
        op = F.rq_spline_inv if inverse else F.rq_spline_fwd
        return op(x, h, *self._settings(), passthrough=p)


class SimpleRealNVP(_SimpleRealNVP):
    """nflows' ``SimpleRealNVP`` (alternating masks, a ``ResidualNet`` per coupling, optional batch
    norm between layers, standard normal base) built from this module's ``AffineCouplingTransform``
    (or ``AdditiveCouplingTransform`` with ``use_volume_preserving``), with nflows' draws in nflows'
    order: a seed gives the flow nflows gives."""

    def __init__(self, features, hidden_features, num_layers, num_blocks_per_layer, use_volume_preserving=False,
                 activation=TF.relu, dropout_probability=0.0, batch_norm_within_layers=False,
                 batch_norm_between_layers=False):
        coupling_constructor = AdditiveCouplingTransform if use_volume_preserving else AffineCouplingTransform
        mask = torch.ones(features)
        mask[::2] = -1

        def create_resnet(in_features, out_features):
            return nets.ResidualNet(in_features, out_features, hidden_features=hidden_features,
                                    num_blocks=num_blocks_per_layer, activation=activation,
                                    dropout_probability=dropout_probability, use_batch_norm=batch_norm_within_layers)

        layers = []
        for _ in range(num_layers):
            layers.append(coupling_constructor(mask=mask, transform_net_create_fn=create_resnet))
            mask *= -1
            if batch_norm_between_layers:
                layers.append(BatchNorm(features=features))
        # nflows' Flow.__init__ (SimpleRealNVP.__init__ would build nflows' own couplings).
        super(_SimpleRealNVP, self).__init__(transform=CompositeTransform(layers),
                                             distribution=StandardNormal([features]))
        count(self, _LIBRARY)
