"""Multi-scale flow modules (RealNVP / Glow): space-to-depth ``Squeeze`` and factor-out ``Split``.

``Squeeze`` is a permutation of the entries (log-det 0) done by torch's ``pixel_unshuffle``.
``Split`` factors out the second half of the channels, ``z2 = x[:, C // 2:]``, the same split as
the coupling layers, and returns the log-density of ``z2`` under its prior in place of a log-det.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from invkernels import _validation
from invkernels.nn.subnets import SubnetFactory, call_subnet, conv_subnet, mlp_subnet

_PRIORS = ("gaussian", "learned")
_SUBNET_DIMS = {"mlp": 2, "conv": 4}
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _sum_per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).sum(dim=1)


def _shuffle(x: torch.Tensor, shape: list[int], unshuffle: bool, factor: int) -> torch.Tensor:
    # Eager pixel_(un)shuffle returns a tensor with zero elements unchanged, in the input's shape
    # (measured on torch 2.14.1), so empty tensors are reshaped to the right shape here.
    if x.numel() == 0:
        return x.reshape(shape)
    return F.pixel_unshuffle(x, factor) if unshuffle else F.pixel_shuffle(x, factor)


class Squeeze(nn.Module):
    """Space-to-depth: ``[B, C, H, W] -> [B, C * f * f, H / f, W / f]`` with ``f = factor``.

    Output channel ``c * f * f + i * f + j`` at position ``(h, w)`` holds input channel ``c`` at
    ``(h * f + i, w * f + j)``: the layout of ``torch.nn.functional.pixel_unshuffle`` (which this
    calls) and of Glow's ``squeeze2d``. The inverse is ``pixel_shuffle``. A permutation of the
    entries, so the log-det is 0.

    Args:
        factor: the spatial block size ``f`` (a positive integer, default 2).

    ``forward(x, context=None) -> (y, zeros[B])``; ``inverse(y, context=None, return_logdet=False) -> x``
    (or ``(x, zeros[B])``); ``context`` is accepted for a uniform block API and not used.
    """

    results_tested = True  # the chain trusts its memory-free results (protocol.checked_result)

    # forward and inverse take ``context=`` like every block, and do not use it: a chain passes
    # none to this block (protocol.takes_context).
    uses_context = False

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = _validation.check_int("Squeeze", "factor", factor)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.factor
        if x.dim() != 4:
            raise ValueError(f"Squeeze: x should be 4-D [B, C, H, W], got shape {list(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"Squeeze: x should have H and W divisible by factor={f}, got shape {list(x.shape)}")
        b, c, h, w = x.shape
        return _shuffle(x, [b, c * f * f, h // f, w // f], True, f), x.new_zeros(b, dtype=_validation.logdet_dtype(x.dtype))

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None, return_logdet: bool = False):
        f = self.factor
        if y.dim() != 4:
            raise ValueError(f"Squeeze: y should be 4-D [B, C, H, W], got shape {list(y.shape)}")
        if y.shape[1] % (f * f):
            raise ValueError(f"Squeeze: y should have C divisible by factor**2={f * f}, got shape {list(y.shape)}")
        b, c, h, w = y.shape
        x = _shuffle(y, [b, c // (f * f), h * f, w * f], False, f)
        return (x, y.new_zeros(y.shape[0], dtype=_validation.logdet_dtype(y.dtype))) if return_logdet else x

    def inverse_backward(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor):
        """Memory-free backward: ``(x, grad_x, [])``. The squeeze permutes entries, so the gradient
        goes back through the same rearrangement as the output (``grad_x = inverse(grad_y)``)."""
        return self.inverse(y), self.inverse(grad_y), []

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class Split(nn.Module):
    """Factor-out layer of multi-scale flows: keeps ``x1 = x[:, :C // 2]``, scores ``z2 = x[:, C // 2:]``.

    ``forward(x)`` returns ``(x1, log_pz2)`` where ``log_pz2[b] = log p(z2[b] | x1[b])`` is the
    log-density of the factored-out channels under the prior, summed over all non-batch dims.
    **It is not a Jacobian term**: ``x -> x1`` is not a bijection, and the Glow / FrEIA
    convention is to return this log-likelihood in the log-det slot so that summing the second
    outputs of all layers and adding the base log-density of the final latent gives ``log p(x)``.
    Nothing else is stored: keep ``z2`` yourself (``x[:, split.c1:]``) if you need it later.

    Priors:
        ``"gaussian"``: the standard normal, ``log p(z) = Σ -z² / 2 - log(2π) / 2``; no parameters.
        ``"learned"``: a diagonal Gaussian conditioned on ``x1``, ``h = subnet(x1)``,
        ``mean, hs = h.chunk(2, dim=1)``, ``log_std = clamp * tanh(hs / clamp)`` (so the std stays
        in ``[exp(-clamp), exp(clamp)]`` and the density never divides by an unbounded quantity).
        The subnet's last layer starts at zero, so the prior starts as the standard normal.

    Args:
        channels: number of channels ``C`` of ``x`` (``>= 2``; ``x1`` has ``C // 2`` channels and
            ``z2`` the other ``C - C // 2``, so odd ``C`` factors out the larger half).
        prior: ``"gaussian"`` (default) or ``"learned"``.
        hidden: ``"learned"`` only. None (default): the subnet is a single zero-initialized layer,
            a 3x3 conv (Glow's ``Conv2dZeros``) for ``subnet="conv"`` or a Linear for
            ``subnet="mlp"``. An integer: the coupling layers' subnet of that width
            (:func:`conv_subnet` / :func:`mlp_subnet`, last layer zero-initialized).
        subnet: ``"learned"`` only. ``"conv"`` (default, for ``[B, C, H, W]`` inputs), ``"mlp"``
            (for ``[B, C]``) or a factory ``(in_channels, out_channels) -> nn.Module`` called as
            ``factory(C // 2, 2 * (C - C // 2))``; zero-initialize its last layer to start at the
            standard normal.
        clamp: ``"learned"`` only: bound of the soft-clamped log-std (default 5.0).

    ``inverse(x1, z2=None, temperature=1.0, return_logdet=False)`` concatenates ``[x1, z2]``. With
    ``z2=None`` it draws ``z2 = mean + std * temperature * eps`` with ``eps ~ N(0, I)`` from torch's
    global generator (``temperature=0`` gives the mean); a given ``z2`` is used as is and
    ``temperature`` is ignored. With ``return_logdet=True`` it returns ``(x, -log p(z2 | x1))``
    under the untempered prior, so that ``forward(inverse(x1, z2))`` gives back the negated value.
    ``log_prob(z2, x1)`` computes ``log p(z2 | x1)`` directly (``x1`` may be omitted for the
    ``"gaussian"`` prior). Inputs may be ``[B, C]`` or ``[B, C, *spatial]`` (for ``"learned"``:
    those the subnet accepts). The log-density is computed and returned in float32 for float16,
    bfloat16 and float32 inputs, float64 for float64 (as every log-det of the package).
    """

    # Its inverse needs the factored-out half, which its output does not hold: InvertibleSequential
    # stores its activations instead of rebuilding them.
    memory_free_invertible = False

    def __init__(self, channels: int, prior: str = "gaussian", *, hidden: int | None = None,
                 subnet: str | SubnetFactory | None = None, clamp: float = 5.0):
        super().__init__()
        _validation.check_int("Split", "channels", channels, minimum=2)
        if not isinstance(prior, str) or prior not in _PRIORS:
            raise ValueError(f"Split: prior should be 'gaussian' or 'learned', got {prior!r}")
        if hidden is not None:
            _validation.check_int("Split", "hidden", hidden)
        self.channels = channels
        self.c1, self.c2 = _validation.split_channels(channels)
        self.prior = prior
        self.clamp = None
        self.subnet = None
        self._input_dim = None
        if prior == "gaussian":
            if hidden is not None or subnet is not None:
                raise ValueError(f"Split: hidden and subnet apply to prior='learned' only, got prior='gaussian' "
                                 f"with hidden={hidden!r}, subnet={subnet!r}")
            return
        if not (isinstance(clamp, (int, float)) and not isinstance(clamp, bool) and math.isfinite(clamp)
                and clamp > 0):
            raise ValueError(f"Split: clamp should be a positive finite number, got {clamp!r}")
        self.clamp = float(clamp)
        out_channels = 2 * self.c2
        if subnet is None:
            subnet = "conv"
        if isinstance(subnet, str):
            if subnet not in _SUBNET_DIMS:
                raise ValueError(f"Split: subnet should be 'conv', 'mlp' or a factory(in, out), got {subnet!r}")
            if hidden is not None:
                self.subnet = (conv_subnet if subnet == "conv" else mlp_subnet)(hidden)(self.c1, out_channels)
            else:
                last = nn.Conv2d(self.c1, out_channels, 3, padding=1) if subnet == "conv" else \
                    nn.Linear(self.c1, out_channels)
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)
                self.subnet = last
            self._input_dim = _SUBNET_DIMS[subnet]
        elif callable(subnet):
            if hidden is not None:
                raise ValueError(f"Split: hidden applies to subnet='conv' or 'mlp' only, got a factory and "
                                 f"hidden={hidden!r}")
            self.subnet = subnet(self.c1, out_channels)
            self._input_dim = _SUBNET_DIMS.get(getattr(subnet, "kind", None))
        else:
            raise ValueError(f"Split: subnet should be 'conv', 'mlp' or a factory(in, out), got {subnet!r}")

    def _check(self, t: torch.Tensor, name: str, channels: int) -> None:
        if t.dim() < 2 or t.shape[1] != channels:
            raise ValueError(f"Split: {name} should have shape [B, {channels}, ...], got {list(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"Split: {name} should be a floating-point tensor, got {t.dtype}")
        if self._input_dim is not None and t.dim() != self._input_dim:
            kind = "mlp" if self._input_dim == 2 else "conv"
            other = "conv" if kind == "mlp" else "mlp"
            raise ValueError(f"Split: subnet='{kind}' expects {self._input_dim}-D inputs, got {name} with "
                             f"{t.dim()} dims; use subnet='{other}' or a factory")

    def _check_z2(self, z2: torch.Tensor, x1: torch.Tensor) -> None:
        want = [x1.shape[0], self.c2, *x1.shape[2:]]
        if list(z2.shape) != want:
            raise ValueError(f"Split: z2 should have shape {want}, got {list(z2.shape)}")
        if z2.dtype != x1.dtype:
            raise ValueError(f"Split: z2 should have the dtype of x1 ({x1.dtype}), got {z2.dtype}")
        if z2.device != x1.device:
            raise ValueError(f"Split: z2 should be on the device of x1 ({x1.device}), got {z2.device}")

    def _mean_log_std(self, x1: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        h = call_subnet("Split", self.subnet, x1, 2 * self.c2)
        mean, hs = h.to(dtype).chunk(2, dim=1)
        return mean, self.clamp * torch.tanh(hs / self.clamp)

    def _log_prob(self, z2: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        z = z2.to(_validation.logdet_dtype(z2.dtype))
        if params is None:
            density = -0.5 * z.square() - _HALF_LOG_2PI
        else:
            mean, log_std = params
            density = -0.5 * ((z - mean) * torch.exp(-log_std)).square() - log_std - _HALF_LOG_2PI
        return _sum_per_sample(density)

    def _params(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.subnet is None:
            return None
        return self._mean_log_std(x1, _validation.logdet_dtype(x1.dtype))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x, "x", self.channels)
        x1, z2 = x[:, : self.c1], x[:, self.c1:]
        return x1, self._log_prob(z2, self._params(x1))

    def log_prob(self, z2: torch.Tensor, x1: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(z2 | x1)`` per sample, shape ``[B]`` (``x1`` is required by the ``"learned"`` prior)."""
        if x1 is None:
            if self.subnet is not None:
                raise ValueError("Split: x1 is required by prior='learned' (the prior is conditioned on it)")
            if z2.dim() < 2 or z2.shape[1] != self.c2:
                raise ValueError(f"Split: z2 should have shape [B, {self.c2}, ...], got {list(z2.shape)}")
            if not z2.is_floating_point():
                raise ValueError(f"Split: z2 should be a floating-point tensor, got {z2.dtype}")
            return self._log_prob(z2, None)
        self._check(x1, "x1", self.c1)
        self._check_z2(z2, x1)
        return self._log_prob(z2, self._params(x1))

    def inverse(self, x1: torch.Tensor, z2: torch.Tensor | None = None, temperature: float = 1.0,
                return_logdet: bool = False):
        self._check(x1, "x1", self.c1)
        if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
                and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"Split: temperature should be a finite number >= 0, got {temperature!r}")
        params = self._params(x1)
        if z2 is None:
            eps = torch.randn((x1.shape[0], self.c2, *x1.shape[2:]), dtype=x1.dtype, device=x1.device)
            if params is None:
                z2 = eps * temperature
            else:
                mean, log_std = params
                z2 = (mean + torch.exp(log_std) * (eps.to(mean.dtype) * temperature)).to(x1.dtype)
        else:
            self._check_z2(z2, x1)
        x = torch.cat([x1, z2], dim=1)
        return (x, -self._log_prob(z2, params)) if return_logdet else x

    def extra_repr(self) -> str:
        clamp = f", clamp={self.clamp}" if self.prior == "learned" else ""
        return f"channels={self.channels}, split=({self.c1}, {self.c2}), prior={self.prior!r}{clamp}"
