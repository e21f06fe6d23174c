"""The classes of :mod:`invkernels.compat.freia` (this module imports FrEIA).

Each block computes what FrEIA's main branch computes (commit 4212496), with the same parameters
and the same draws from the random generators in the same order (a seed gives the same block).
Where a block's math is that of a fused op, the op runs:

- the affine coupling of ``AllInOneBlock`` (``y2 = x2 * exp(α tanh(0.1 a_s / α)) + 0.1 a_t``) is
  ``affine_coupling_fwd/inv(x, 0.1 a, "exp", α, passthrough=ceil(C / 2))`` unless ``gin_block``;
- the second half of the coupling blocks (``GLOWCouplingBlock``, ``RNVPCouplingBlock``) and
  ``AffineCouplingOneSided`` with a named clamp activation is the same op with
  ``passthrough=split_len1``: ATAN (``s = α 0.636 atan(a_s)``) is the op's ``"atan"`` scale on
  ``h = [a_s, a_t]``, TANH (``α tanh(a_s)``) its ``"exp"`` scale on ``[α a_s, a_t]`` and SIGMOID
  (``α 2 (sigmoid(a_s) - 1/2) = α tanh(a_s / 2)``) the ``"exp"`` scale on ``[α a_s / 2, a_t]``;
- ``ActNorm``'s ``(x - loc) / exp(log_scale)`` is ``actnorm_fwd/inv(x, -loc, -log_scale)``.

Everything else (callable clamps, GIN, the first half of the two-sided blocks, ``NICECouplingBlock``,
permutations) runs in tensor ops, as in FrEIA. The two-sided blocks mark the random state between
their halves (``rng_mark``) and rewind to it in their inverse (``rng_rewind``): the memory-free
``SequenceINN`` rebuilds them with the forward's dropout masks, although the inverse runs the
halves in the other order (outside a memory-free rebuild both do nothing).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Union

import numpy as np
import torch
import torch.nn.functional as TF
from FrEIA.framework import SequenceINN as _SequenceINN
from FrEIA.modules import InvertibleModule
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

import invkernels.ops as F
from invkernels import _state
from invkernels._validation import logdet_dtype
from invkernels.compat._lazy import count
from invkernels.nn.sequential import InvertibleSequential
from invkernels.nn.subnets import subnet_vjp, vjp
from invkernels.ops import coupling as coupling_ops

_LIBRARY = "freia"


def _clamp_activation(owner: str, activation) -> tuple[str | None, Callable]:
    """FrEIA's clamp activation ``f`` (``s = clamp * f(a)``) and its name (None for a callable)."""
    if isinstance(activation, str):
        functions = {"ATAN": lambda u: 0.636 * torch.atan(u), "TANH": torch.tanh,
                     "SIGMOID": lambda u: 2.0 * (torch.sigmoid(u) - 0.5)}
        if activation not in functions:
            raise ValueError(f'{owner}: Unknown clamp activation "{activation}" (use "ATAN", "TANH", "SIGMOID" or '
                             f'a callable)')
        return activation, functions[activation]
    if not callable(activation):
        raise TypeError(f"{owner}: clamp_activation should be 'ATAN', 'TANH', 'SIGMOID' or a callable, got "
                        f"{type(activation).__name__}")
    return None, activation


# FrEIA's clamp activations as an op scale and the factor of ``clamp`` that multiplies ``a_s``
# (None: ``a_s`` as it is).
_FUSED_ACTIVATIONS = {"ATAN": ("atan", None), "TANH": ("exp", 1.0), "SIGMOID": ("exp", 0.5)}


def _fusable_clamp(clamp) -> bool:
    return isinstance(clamp, (int, float)) and not isinstance(clamp, bool) and math.isfinite(clamp) and clamp > 0


def _with_conditions(x: torch.Tensor, c, conditional: bool) -> torch.Tensor:
    return torch.cat([x, *c], 1) if conditional else x


class _Coupling(InvertibleModule):
    """FrEIA's ``_BaseCouplingBlock``: split, clamp activation and conditions."""

    def __init__(self, dims_in, dims_c=None, clamp: float = 2.0, clamp_activation: Union[str, Callable] = "ATAN",
                 split_len: Union[float, int] = 0.5):
        dims_c = [] if dims_c is None else dims_c
        super().__init__(dims_in, dims_c)
        name = type(self).__name__
        self.channels = dims_in[0][0]
        self.ndims = len(dims_in[0])
        if isinstance(split_len, float):
            if not 0 <= split_len <= 1:
                raise ValueError(f"{name}: Float split_len must be in range [0, 1], but is: {split_len}")
            split_len = round(self.channels * split_len)
        elif not 0 <= split_len <= self.channels:
            raise ValueError(f"{name}: Integer split_len must be in range 0 <= split_len <= {self.channels}, "
                             f"but is: {split_len}")
        self.split_len1 = split_len
        self.split_len2 = self.channels - split_len
        self.clamp = clamp
        for shape in dims_c:
            if tuple(shape[1:]) != tuple(dims_in[0][1:]):
                raise ValueError(f"{name}: Dimensions of input {dims_in} and one or more conditions {dims_c} "
                                 f"don't agree.")
        self.conditional = len(dims_c) > 0
        self.condition_length = sum(shape[0] for shape in dims_c)
        self._clamp_name, self.f_clamp = _clamp_activation(name, clamp_activation)
        count(self, _LIBRARY)

    def _sum_dims(self) -> tuple[int, ...]:
        return tuple(range(1, self.ndims + 1))

    def _affine(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, rev: bool):
        """FrEIA's affine coupling of the active half ``x`` in tensor ops."""
        s = self.clamp * self.f_clamp(s)
        j = torch.sum(s, dim=self._sum_dims())
        if rev:
            return (x - t) * torch.exp(-s), -j
        return torch.exp(s) * x + t, j

    def _transform_second(self, x: torch.Tensor, a: torch.Tensor, rev: bool):
        """``x = [x1 | x2]`` with ``x2`` transformed by ``a = [a_s | a_t]``: ``(y, logdet)``."""
        if self._clamp_name in _FUSED_ACTIVATIONS and _fusable_clamp(self.clamp) and self.split_len2 > 0:
            scale, factor = _FUSED_ACTIVATIONS[self._clamp_name]
            h = a
            if factor is not None:
                per_channel = torch.ones(a.shape[1], *([1] * (a.dim() - 2)), dtype=a.dtype, device=a.device)
                per_channel[: self.split_len2] = factor * float(self.clamp)
                h = a * per_channel
            op = F.affine_coupling_inv if rev else F.affine_coupling_fwd
            return op(x.contiguous(), h.contiguous(), scale, float(self.clamp), self.split_len1)
        x1, x2 = torch.split(x, [self.split_len1, self.split_len2], dim=1)
        y2, j = self._affine(x2, a[:, : self.split_len2], a[:, self.split_len2:], rev)
        return torch.cat((x1, y2), 1), j

    def output_dims(self, input_dims):
        if len(input_dims) != 1:
            raise ValueError("Can only use 1 input")
        return input_dims


class NICECouplingBlock(_Coupling):
    """FrEIA's ``NICECouplingBlock``: ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)`` (log-det 0)."""

    def __init__(self, dims_in, dims_c=None, subnet_constructor: Callable = None,
                 split_len: Union[float, int] = 0.5):
        super().__init__(dims_in, dims_c, clamp=0.0, clamp_activation=lambda u: u, split_len=split_len)
        self.F = subnet_constructor(self.split_len2 + self.condition_length, self.split_len1)
        self.G = subnet_constructor(self.split_len1 + self.condition_length, self.split_len2)

    def forward(self, x, c=[], rev=False, jac=True):
        x1, x2 = torch.split(x[0], [self.split_len1, self.split_len2], dim=1)
        if not rev:
            y1 = x1 + self.F(_with_conditions(x2, c, self.conditional))
            _state.rng_mark()
            y2 = x2 + self.G(_with_conditions(y1, c, self.conditional))
        else:
            _state.rng_rewind(1)
            y2 = x2 - self.G(_with_conditions(x1, c, self.conditional))
            _state.rng_rewind(0)
            y1 = x1 - self.F(_with_conditions(y2, c, self.conditional))
        return (torch.cat((y1, y2), 1),), 0.0


class RNVPCouplingBlock(_Coupling):
    """FrEIA's ``RNVPCouplingBlock``: two affine couplings, ``s`` and ``t`` from separate subnets."""

    def __init__(self, dims_in, dims_c=None, subnet_constructor: Callable = None, clamp: float = 2.0,
                 clamp_activation: Union[str, Callable] = "ATAN", split_len: Union[float, int] = 0.5):
        super().__init__(dims_in, dims_c, clamp, clamp_activation, split_len=split_len)
        self.subnet_s1 = subnet_constructor(self.split_len1 + self.condition_length, self.split_len2)
        self.subnet_t1 = subnet_constructor(self.split_len1 + self.condition_length, self.split_len2)
        self.subnet_s2 = subnet_constructor(self.split_len2 + self.condition_length, self.split_len1)
        self.subnet_t2 = subnet_constructor(self.split_len2 + self.condition_length, self.split_len1)

    def forward(self, x, c=[], rev=False, jac=True):
        x1, x2 = torch.split(x[0], [self.split_len1, self.split_len2], dim=1)
        cond = self.conditional
        if not rev:
            u2 = _with_conditions(x2, c, cond)
            y1, j1 = self._affine(x1, self.subnet_s2(u2), self.subnet_t2(u2), False)
            _state.rng_mark()
            y, j2 = self._transform_second(torch.cat((y1, x2), 1), self._a1(_with_conditions(y1, c, cond)), False)
            return (y,), j1 + j2
        _state.rng_rewind(1)
        half, j2 = self._transform_second(x[0], self._a1(_with_conditions(x1, c, cond)), True)
        y2 = half[:, self.split_len1:]
        u2 = _with_conditions(y2, c, cond)
        _state.rng_rewind(0)
        y1, j1 = self._affine(x1, self.subnet_s2(u2), self.subnet_t2(u2), True)
        return (torch.cat((y1, y2), 1),), j1 + j2

    def _a1(self, u1: torch.Tensor) -> torch.Tensor:
        """The second half's coefficients ``[s1 | t1]`` (FrEIA runs ``subnet_s1`` first)."""
        s1 = self.subnet_s1(u1)
        return torch.cat((s1, self.subnet_t1(u1)), 1)


class GLOWCouplingBlock(_Coupling):
    """FrEIA's ``GLOWCouplingBlock``: two affine couplings, ``[s, t]`` from one subnet each."""

    def __init__(self, dims_in, dims_c=None, subnet_constructor: Callable = None, clamp: float = 2.0,
                 clamp_activation: Union[str, Callable] = "ATAN", split_len: Union[float, int] = 0.5):
        super().__init__(dims_in, dims_c, clamp, clamp_activation, split_len=split_len)
        self.subnet1 = subnet_constructor(self.split_len1 + self.condition_length, self.split_len2 * 2)
        self.subnet2 = subnet_constructor(self.split_len2 + self.condition_length, self.split_len1 * 2)

    def _first(self, x1: torch.Tensor, u2: torch.Tensor, rev: bool):
        a2 = self.subnet2(u2)
        return self._affine(x1, a2[:, : self.split_len1], a2[:, self.split_len1:], rev)

    def forward(self, x, c=[], rev=False, jac=True):
        x1, x2 = torch.split(x[0], [self.split_len1, self.split_len2], dim=1)
        cond = self.conditional
        if not rev:
            y1, j1 = self._first(x1, _with_conditions(x2, c, cond), False)
            _state.rng_mark()
            y, j2 = self._transform_second(torch.cat((y1, x2), 1), self.subnet1(_with_conditions(y1, c, cond)),
                                           False)
            return (y,), j1 + j2
        _state.rng_rewind(1)
        half, j2 = self._transform_second(x[0], self.subnet1(_with_conditions(x1, c, cond)), True)
        y2 = half[:, self.split_len1:]
        _state.rng_rewind(0)
        y1, j1 = self._first(x1, _with_conditions(y2, c, cond), True)
        return (torch.cat((y1, y2), 1),), j1 + j2


class AffineCouplingOneSided(_Coupling):
    """FrEIA's ``AffineCouplingOneSided``: ``y2 = x2 * exp(s) + t`` with ``[s, t] = subnet(x1)``."""

    def __init__(self, dims_in, dims_c=None, subnet_constructor: Callable = None, clamp: float = 2.0,
                 clamp_activation: Union[str, Callable] = "ATAN", split_len: Union[float, int] = 0.5):
        super().__init__(dims_in, dims_c, clamp, clamp_activation, split_len=split_len)
        self.subnet = subnet_constructor(self.split_len1 + self.condition_length, 2 * self.split_len2)

    def forward(self, x, c=[], rev=False, jac=True):
        x1 = x[0][:, : self.split_len1]
        y, j = self._transform_second(x[0], self.subnet(_with_conditions(x1, c, self.conditional)), rev)
        return (y,), j


class AllInOneBlock(InvertibleModule):
    """FrEIA's ``AllInOneBlock``: affine coupling (soft clamp ``α tanh(0.1 a / α)``), a global affine
    ``Ψ(s_global) * u + t_global`` and a permutation, with FrEIA's options (GIN, soft and learned
    Householder permutations, the reversed pre-permutation, SIGMOID / SOFTPLUS / EXP global scales).
    The coupling is fused unless ``gin_block``."""

    def __init__(self, dims_in, dims_c=[], subnet_constructor: Callable = None, affine_clamping: float = 2.0,
                 gin_block: bool = False, global_affine_init: float = 1.0, global_affine_type: str = "SOFTPLUS",
                 permute_soft: bool = False, learned_householder_permutation: int = 0,
                 reverse_permutation: bool = False):
        super().__init__(dims_in, dims_c)
        channels = dims_in[0][0]
        self.input_rank = len(dims_in[0]) - 1
        self.sum_dims = tuple(range(1, 2 + self.input_rank))
        if len(dims_c) == 0:
            self.conditional = False
            self.condition_channels = 0
        else:
            if tuple(dims_c[0][1:]) != tuple(dims_in[0][1:]):
                raise ValueError(f"AllInOneBlock: Dimensions of input and condition don't agree: {dims_c} vs "
                                 f"{dims_in}.")
            self.conditional = True
            self.condition_channels = sum(dc[0] for dc in dims_c)
        self.splits = [channels - channels // 2, channels // 2]
        if self.input_rank > 3:
            raise ValueError(f"AllInOneBlock: Data is {1 + self.input_rank}D. Must be 1D-4D.")
        self._matrix_permutation = bool(permute_soft or learned_householder_permutation)
        self.in_channels = channels
        self.clamp = affine_clamping
        self.GIN = gin_block
        self.reverse_pre_permute = reverse_permutation
        self.householder = learned_householder_permutation
        if permute_soft and channels > 512:
            warnings.warn("Soft permutation will take a very long time to initialize with "
                          f"{channels} feature channels. Consider using hard permutation instead.")
        if global_affine_type == "SIGMOID":
            global_scale = 2.0 - np.log(10.0 / global_affine_init - 1.0)
        elif global_affine_type == "SOFTPLUS":
            global_scale = 2.0 * np.log(np.exp(0.5 * 10.0 * global_affine_init) - 1)
            self.softplus = nn.Softplus(beta=0.5)
        elif global_affine_type == "EXP":
            global_scale = np.log(global_affine_init)
        else:
            raise ValueError('AllInOneBlock: Global affine activation must be "SIGMOID", "SOFTPLUS" or "EXP", got '
                             f'{global_affine_type!r}')
        self.global_affine_type = global_affine_type
        shape = (1, channels, *([1] * self.input_rank))
        self.global_scale = nn.Parameter(torch.ones(shape) * float(global_scale))
        self.global_offset = nn.Parameter(torch.zeros(shape))
        if permute_soft:
            from scipy.stats import special_ortho_group  # noqa: PLC0415

            w = special_ortho_group.rvs(channels)
        else:
            w_index = torch.randperm(channels, requires_grad=False)
        if self.householder:
            self.vk_householder = nn.Parameter(0.2 * torch.randn(self.householder, channels), requires_grad=True)
            self.w_perm = None
            self.w_perm_inv = None
            # FrEIA fails here without permute_soft; the hard permutation's matrix starts the reflections.
            w0 = torch.from_numpy(w).float() if permute_soft else torch.eye(channels)[w_index]
            self.w_0 = nn.Parameter(w0, requires_grad=False)
        elif permute_soft:
            kernel = (channels, channels, *([1] * self.input_rank))
            self.w_perm = nn.Parameter(torch.from_numpy(w).float().view(kernel).contiguous(), requires_grad=False)
            self.w_perm_inv = nn.Parameter(torch.from_numpy(w.T).float().view(kernel).contiguous(),
                                           requires_grad=False)
        else:
            self.w_perm = nn.Parameter(w_index, requires_grad=False)
            self.w_perm_inv = nn.Parameter(torch.argsort(w_index), requires_grad=False)
        if subnet_constructor is None:
            raise ValueError("AllInOneBlock: Please supply a callable subnet_constructor function or object "
                             "(see docstring)")
        self.subnet = subnet_constructor(self.splits[0] + self.condition_channels, 2 * self.splits[1])
        self.last_jac = None
        count(self, _LIBRARY)

    def global_scale_activation(self, a: torch.Tensor) -> torch.Tensor:
        if self.global_affine_type == "SIGMOID":
            return 10 * torch.sigmoid(a - 2.0)
        if self.global_affine_type == "SOFTPLUS":
            return 0.1 * self.softplus(a)
        return torch.exp(a)

    def permute_function(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self._matrix_permutation:
            return (TF.linear, TF.conv1d, TF.conv2d, TF.conv3d)[self.input_rank](x, w)
        # FrEIA's x[:, w], as a gather along the channels (the same values; its backward scatters
        # without the accumulating index_put of advanced indexing).
        return x.index_select(1, w)

    def _construct_householder_permutation(self) -> torch.Tensor:
        w = self.w_0
        for vk in self.vk_householder:
            w = torch.mm(w, torch.eye(self.in_channels).to(w.device) - 2 * torch.ger(vk, vk) / torch.dot(vk, vk))
        for _ in range(self.input_rank):
            w = w.unsqueeze(-1)
        return w

    def _permute(self, x: torch.Tensor, rev: bool = False):
        if self.GIN:
            scale, perm_log_jac = 1.0, 0.0
        else:
            scale = self.global_scale_activation(self.global_scale)
            perm_log_jac = torch.sum(torch.log(scale))
        if rev:
            return (self.permute_function(x, self.w_perm_inv) - self.global_offset) / scale, perm_log_jac
        return self.permute_function(x * scale + self.global_offset, self.w_perm), perm_log_jac

    def _pre_permute(self, x: torch.Tensor, rev: bool = False) -> torch.Tensor:
        return self.permute_function(x, self.w_perm if rev else self.w_perm_inv)

    def _affine(self, x: torch.Tensor, a: torch.Tensor, rev: bool = False):
        a = a * 0.1
        ch = x.shape[1]
        sub_jac = self.clamp * torch.tanh(a[:, :ch] / self.clamp)
        if self.GIN:
            sub_jac = sub_jac - torch.mean(sub_jac, dim=self.sum_dims, keepdim=True)
        if not rev:
            return x * torch.exp(sub_jac) + a[:, ch:], torch.sum(sub_jac, dim=self.sum_dims)
        return (x - a[:, ch:]) * torch.exp(-sub_jac), -torch.sum(sub_jac, dim=self.sum_dims)

    def _fused_coupling(self) -> bool:
        """Whether the coupling runs as the fused op (not GIN's mean-free log-scales)."""
        return not self.GIN and self.splits[1] > 0 and _fusable_clamp(self.clamp)

    def _coupling(self, x: torch.Tensor, a: torch.Tensor, rev: bool):
        if self._fused_coupling():
            op = F.affine_coupling_inv if rev else F.affine_coupling_fwd
            return op(x.contiguous(), a * 0.1, "exp", float(self.clamp), self.splits[0])
        x1, x2 = torch.split(x, self.splits, dim=1)
        y2, j2 = self._affine(x2, a, rev)
        return torch.cat((x1, y2), 1), j2

    def fused_inverse_backward(self) -> bool:
        """Whether :meth:`inverse_backward` applies: the coupling runs fused, without the Householder
        reflections or the reversed pre-permutation."""
        return self._fused_coupling() and not (self.householder or self.reverse_pre_permute)

    def _global_affine_vjp(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor):
        """The global affine and the hard permutation, ``y = (u * s + t)[:, w_perm]`` with log-det
        ``pixels * sum(log s)``, undone and differentiated in closed form: ``(u, grad_u, pairs)`` with
        ``pairs`` the ``(parameter, gradient)`` of ``global_scale`` and ``global_offset`` that
        require grad (one gather of ``y`` and of ``grad_y``, where autograd ran the permutation's
        indexing backward)."""
        a = self.global_scale
        scale = self.global_scale_activation(a)
        u = (self.permute_function(y, self.w_perm_inv) - self.global_offset) / scale
        grad_z = self.permute_function(grad_y, self.w_perm_inv)
        dims = (0, *range(2, y.dim()))
        pairs = []
        if a.requires_grad:
            grad_scale = (grad_z * u).sum(dims, keepdim=True) + y[0, :1].numel() * grad_logdet.sum() / scale
            # d scale / d a, as autograd takes it: sigma(1 - sigma) from the sigmoid itself (not from the
            # scale, whose 1 - scale / 10 cancels near the cap); softplus is linear above its threshold.
            if self.global_affine_type == "SIGMOID":
                sigma = torch.sigmoid(a - 2.0)
                slope = 10.0 * sigma * (1.0 - sigma)
            elif self.global_affine_type == "SOFTPLUS":
                beta, threshold = self.softplus.beta, self.softplus.threshold
                slope = 0.1 * torch.where(a * beta > threshold, 1.0, torch.sigmoid(a * beta))
            else:
                slope = scale
            pairs.append((a, (grad_scale * slope).to(a.dtype)))
        if self.global_offset.requires_grad:
            pairs.append((self.global_offset, grad_z.sum(dims, keepdim=True)))
        return u, grad_z * scale, pairs

    def inverse_backward(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor, c=()):
        """Memory-free backward of the block (the compat ``SequenceINN`` calls it): from the output
        ``y`` and the gradients of ``(y, logdet)``, ``(x, grad_x, grads)`` with ``grads`` the
        ``(tensor, gradient)`` pairs of the parameters (and conditions) that require grad. The global
        affine and the permutation are undone and differentiated in tensor ops; the coupling is
        rebuilt and back-propagated by ``affine_coupling_inv_bwd``, its subnet run once, with grad."""
        if self._matrix_permutation:
            with torch.no_grad():
                u, _ = self._permute(y, rev=True)
            u_leaf = u.detach().requires_grad_()
            global_params = [p for p in (self.global_scale, self.global_offset) if p.requires_grad]
            with torch.enable_grad():
                y_again, global_jac = self._permute(u_leaf, rev=False)
                outer = (y_again * grad_y).sum() + y[0, :1].numel() * global_jac * grad_logdet.sum()
            grad_u, *grad_global = vjp([outer], [u_leaf, *global_params], [torch.ones_like(outer)])
            global_pairs = list(zip(global_params, grad_global))
        else:
            u, grad_u, global_pairs = self._global_affine_vjp(y, grad_y, grad_logdet)
        p = self.splits[0]
        x1 = u[:, :p].detach().requires_grad_()
        conditions = [t for t in c if isinstance(t, torch.Tensor) and t.requires_grad]
        extra = [*_state.trainable(_state.submodules(self.subnet)), *conditions]
        with torch.enable_grad():
            h = self.subnet(_with_conditions(x1, c, self.conditional)) * 0.1
        x, grad_x, grad_h = coupling_ops.affine_coupling_inv_bwd(u, h.detach(), grad_u.contiguous(), grad_logdet,
                                                                 "exp", float(self.clamp), p)
        grad_x1, *grad_extra = subnet_vjp(h, [x1, *extra], grad_h)
        if grad_x1 is not None:
            grad_x[:, :p].add_(grad_x1)
        return x, grad_x, [*global_pairs, *zip(extra, grad_extra)]

    def forward(self, x, c=[], rev=False, jac=True):
        if tuple(x[0].shape[1:]) != self.dims_in[0]:
            raise RuntimeError(f"Expected input of shape {self.dims_in[0]}, got {tuple(x[0].shape[1:])}.")
        if self.householder:
            self.w_perm = self._construct_householder_permutation()
            if rev or self.reverse_pre_permute:
                self.w_perm_inv = self.w_perm.transpose(0, 1).contiguous()
        if rev:
            x, global_scaling_jac = self._permute(x[0], rev=True)
            x = (x,)
        elif self.reverse_pre_permute:
            x = (self._pre_permute(x[0], rev=False),)
        x1 = x[0][:, : self.splits[0]]
        a1 = self.subnet(_with_conditions(x1, c, self.conditional))
        x_out, log_jac_det = self._coupling(x[0], a1, rev)
        if not rev:
            x_out, global_scaling_jac = self._permute(x_out, rev=False)
        elif self.reverse_pre_permute:
            x_out = self._pre_permute(x_out, rev=True)
        n_pixels = x_out[0, :1].numel()
        log_jac_det = log_jac_det + (-1) ** rev * n_pixels * global_scaling_jac
        return (x_out,), log_jac_det

    def output_dims(self, input_dims):
        return input_dims


class ActNorm(InvertibleModule):
    """FrEIA's ``ActNorm``: ``y = (x - loc) / exp(log_scale)`` per channel, initialized from the
    first batch (or ``init_data``) to zero mean and unit standard deviation; fused
    (``actnorm_fwd(x, -loc, -log_scale)``). The log-det is per sample (``[B]``), where FrEIA returns
    the same value unbatched."""

    def __init__(self, dims_in, dims_c=None, init_data: torch.Tensor = None):
        super().__init__(dims_in, dims_c)
        self.register_buffer("is_initialized", torch.tensor(False))
        dims = list(next(iter(dims_in)))
        dims[1:] = [1] * len(dims[1:])
        self.log_scale = nn.Parameter(torch.empty(1, *dims))
        self.loc = nn.Parameter(torch.empty(1, *dims))
        if init_data is not None:
            self.initialize(init_data)
        count(self, _LIBRARY)

    @property
    def scale(self) -> torch.Tensor:
        return torch.exp(self.log_scale)

    def initialize(self, batch: torch.Tensor) -> None:
        if batch.ndim != self.log_scale.ndim:
            raise ValueError(f"Expected batch of dimension {self.log_scale.ndim}, but got {batch.ndim}.")
        dims = [0, *range(2, batch.ndim)]
        loc = torch.mean(batch, dim=dims, keepdim=True)
        scale = torch.std(batch, dim=dims, keepdim=True)
        if torch.any(torch.isclose(scale, torch.tensor(0.0, dtype=scale.dtype, device=scale.device))):
            raise ValueError("Failed to initialize ActNorm: One or more channels have zero standard deviation.")
        self.log_scale.data[:] = torch.log(scale)
        self.loc.data[:] = loc
        self.is_initialized.data = torch.tensor(True)

    def output_dims(self, input_dims):
        if len(input_dims) != 1:
            raise ValueError("ActNorm: Can only use one input")
        return input_dims

    def forward(self, x, c=None, rev=False, jac=True):
        if c is not None:
            raise ValueError(f"{self.__class__.__name__} is unconditional.")
        x = x[0]
        if not self.is_initialized:
            self.initialize(x)
        bias = -self.loc.reshape(-1).to(x.dtype)
        log_scale = -self.log_scale.reshape(-1).to(x.dtype)
        op = F.actnorm_inv if rev else F.actnorm_fwd
        out, log_jac_det = op(x.contiguous(), bias, log_scale)
        return (out,), log_jac_det


class PermuteRandom(InvertibleModule):
    """FrEIA's ``PermuteRandom``: a fixed random channel permutation (NumPy's generator, reseeded
    with ``seed`` when given)."""

    def __init__(self, dims_in, dims_c=None, seed: Union[int, None] = None):
        super().__init__(dims_in, dims_c)
        self.in_channels = dims_in[0][0]
        if seed is not None:
            np.random.seed(seed)
        perm = np.random.permutation(self.in_channels)
        perm_inv = np.zeros_like(perm)
        perm_inv[perm] = np.arange(self.in_channels)
        self.perm = nn.Parameter(torch.LongTensor(perm), requires_grad=False)
        self.perm_inv = nn.Parameter(torch.LongTensor(perm_inv), requires_grad=False)
        count(self, _LIBRARY)

    def forward(self, x, rev=False, jac=True):
        return [x[0][:, self.perm_inv if rev else self.perm]], 0.0

    def output_dims(self, input_dims):
        if len(input_dims) != 1:
            raise ValueError(f"{self.__class__.__name__} can only use 1 input")
        return input_dims


class _ChainBlock(nn.Module):
    """A FrEIA module as an invkernels chain block: ``forward(x, context) -> (y, logdet)`` with a
    ``[B]`` log-det, ``inverse(y, context) -> x`` through ``rev=True``."""

    def __init__(self, module: nn.Module, conditional: bool):
        super().__init__()
        self.module = module
        self.uses_context = conditional

    def _run(self, x: torch.Tensor, context: torch.Tensor | None, rev: bool):
        if self.uses_context:
            out, logdet = self.module((x,), c=[context], rev=rev, jac=True)
        else:
            out, logdet = self.module((x,), rev=rev, jac=True)
        y = out[0]
        if not (isinstance(logdet, torch.Tensor) and logdet.shape == (y.shape[0],)):
            logdet = torch.zeros(y.shape[0], dtype=logdet_dtype(y.dtype), device=y.device) + logdet
        return y, logdet

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None):
        return self._run(x, context, False)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(y, context, True)[0]


class _FusedChainBlock(_ChainBlock):
    """A chain block whose module rebuilds its input and back-propagates in one pass
    (``inverse_backward``, e.g. :class:`AllInOneBlock`)."""

    def inverse_backward(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor,
                         context: torch.Tensor | None = None):
        return self.module.inverse_backward(y, grad_y, grad_logdet, [context] if self.uses_context else [])


class SequenceINN(_SequenceINN):
    """FrEIA's ``SequenceINN`` with ``memory_free``: with ``memory_free=True`` a forward that records
    gradients keeps no activations; backward rebuilds each block's input through its inverse
    (``rev=True``) and gives the gradients of plain autograd. It takes the blocks of any FrEIA
    version (this module's or FrEIA's own) and at most one condition index."""

    def __init__(self, *dims: int, force_tuple_output: bool = False, memory_free: bool = False):
        super().__init__(*dims, force_tuple_output=force_tuple_output)
        if not isinstance(memory_free, bool):
            raise TypeError(f"SequenceINN: memory_free should be a bool, got {type(memory_free).__name__}")
        self.memory_free = memory_free
        object.__setattr__(self, "_chain_cache", (None, None))
        count(self, _LIBRARY)

    def _chain(self) -> InvertibleSequential:
        key = tuple(id(m) for m in self.module_list) + tuple(self.conditions)
        cached_key, chain = self._chain_cache
        if cached_key != key:
            blocks = [(_FusedChainBlock if getattr(m, "fused_inverse_backward", lambda: False)() else _ChainBlock)(
                m, cond is not None) for m, cond in zip(self.module_list, self.conditions)]
            chain = InvertibleSequential(*blocks, memory_free=True)
            object.__setattr__(self, "_chain_cache", (key, chain))
        return chain

    def _check_rebuildable(self) -> None:
        """ValueError naming the block when a block of another library has dropout in training mode:
        its inverse may run its subnets in another order than its forward and so draw other masks
        (this module's blocks replay each half's draws)."""
        for i, module in enumerate(self.module_list):
            if type(module).__module__ == __name__:
                continue
            if any(isinstance(m, _DropoutNd) and m.training and m.p > 0 for m in module.modules()):
                raise ValueError(f"SequenceINN: memory_free=True cannot rebuild block {i} "
                                 f"({type(module).__module__}.{type(module).__name__}) with dropout in training "
                                 f"mode: its inverse may draw other dropout masks than its forward; use "
                                 f"invkernels.compat.freia's {type(module).__name__}, eval mode, or "
                                 f"memory_free=False")

    def forward(self, x_or_z, c=None, rev=False, jac=True):
        if not self.memory_free or rev or not torch.is_grad_enabled() or len(self.module_list) == 0:
            return super().forward(x_or_z, c, rev=rev, jac=jac)
        self._check_rebuildable()
        x = x_or_z if torch.is_tensor(x_or_z) else x_or_z[0]
        indices = sorted({cond for cond in self.conditions if cond is not None})
        if len(indices) > 1:
            raise ValueError(f"SequenceINN: memory_free=True takes blocks with one condition; these use "
                             f"conditions {indices}")
        context = None
        if indices:
            if c is None:
                raise ValueError(f"SequenceINN: c should be the list of conditions; the blocks use condition "
                                 f"{indices[0]}, got None")
            context = c[indices[0]]
        y, logdet = self._chain()(x, context)
        return ((y,) if self.force_tuple_output else y), logdet
