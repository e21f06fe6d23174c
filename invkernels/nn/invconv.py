"""Invertible 1x1 convolution (Glow), LU-decomposed, with a cached float64-built inverse."""

from __future__ import annotations

import torch
from torch import nn

from invkernels import _backend, _state, _validation
from invkernels.ops import invconv as F
from invkernels.reference.invconv import lu_factors, random_rotation


class InvConv1x1(nn.Module):
    """``y = W x`` at every position of ``x`` (``[B, C, *spatial]`` or ``[B, C]``), ``logdet = S * log|det W|``.

    With ``lu=True`` (default) ``W = P L (U + diag(sign * exp(log_s)))``: ``P`` a fixed
    permutation (buffer ``perm``), ``L`` unit lower-triangular (parameter ``lower``, strict lower
    triangle used), ``U`` strictly upper-triangular (parameter ``upper``), ``sign`` a fixed ±1
    vector (buffer) and ``log_s`` a parameter, so ``logdet = S * Σ log_s`` costs ``O(C)``. With
    ``lu=False`` ``W`` is the plain parameter ``w`` and ``logdet = S * slogdet(W)`` (float64).
    Both start from a random rotation (Glow), drawn from torch's global generator.

    The inverse multiplies by ``W⁻¹``, built in float64 (for ``lu=True`` from the factors by two
    triangular solves, never by inverting the dense ``W``; for ``lu=False`` by
    ``torch.linalg.inv``) and cast once to the input dtype. It is cached while the parameters are
    unchanged (the same tensors with the same version counters, storage, dtype and device), so
    repeated sampling costs one GEMM per call. While grad mode is on and a parameter requires
    grad, the inverse is rebuilt on every call so that gradients flow through it: sample under
    ``torch.no_grad()`` to use the cache. Writes through ``param.data`` bypass the version
    counters; call :meth:`clear_inverse_cache` after such writes.

    Args:
        channels: number of channels ``C``.
        lu: LU parameterization (True) or a dense weight (False).
        backend: backend of the weight assembly and the product: ``"cpp"``, ``"triton"`` (both use
            the C++ ops), ``"reference"`` or None for ``invkernels.get_backend()``.

    ``forward(x) -> (y, logdet)``; ``inverse(y, return_logdet=False) -> x`` (or ``(x, -logdet)``).
    """

    results_tested = True  # the chain trusts its memory-free results (protocol.checked_result)

    # perm and sign are fixed: the memory-free backward need not copy them (_state), and the
    # cached inverse built from them stays valid.
    buffers_read_only = True

    # forward and inverse take ``context=`` like every block, and do not use it: a chain passes
    # none to this block (protocol.takes_context).
    uses_context = False

    def __init__(self, channels: int, lu: bool = True, backend: str | None = None):
        super().__init__()
        _validation.check_int("InvConv1x1", "channels", channels)
        if not isinstance(lu, bool):
            raise ValueError(f"InvConv1x1: lu should be True or False, got {lu!r}")
        # Registered now so that compiled forwards only look the op up ("cpp" and "triton" use it).
        F.prepare("cpp" if backend is None else _backend.check_backend(backend))
        self.channels = channels
        self.lu = lu
        self.backend = backend
        # Ordinary tensors even when built under torch.inference_mode (inference tensors have no
        # version counters, which the inverse cache and the memory-free backward check).
        with torch.inference_mode(False):
            rotation = random_rotation(channels)
            if lu:
                perm, lower, upper, sign, log_s = lu_factors(rotation)
                self.register_buffer("perm", perm)
                self.register_buffer("sign", sign.float())
                self.lower = nn.Parameter(lower.float())
                self.upper = nn.Parameter(upper.float())
                self.log_s = nn.Parameter(log_s.float())
            else:
                self.w = nn.Parameter(rotation.float().contiguous())
        self._cache: tuple | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # perm and sign are not learned, so nothing else would catch a bad value: a perm that is
        # not a permutation makes W singular and a sign other than +-1 changes |det W|, while the
        # log-det S * Σ log_s would still be reported.
        if self.lu:
            perm = state_dict.get(prefix + "perm")
            if perm is not None:
                _validation.check_permutation("InvConv1x1", "perm", perm, self.channels, prefix + "perm")
            sign = state_dict.get(prefix + "sign")
            if sign is not None and (not isinstance(sign, torch.Tensor) or sign.shape != (self.channels,)
                                     or not bool((sign.abs() == 1).all())):
                got = sign.tolist() if isinstance(sign, torch.Tensor) and sign.numel() <= 32 else sign
                raise ValueError(f"InvConv1x1: buffer 'sign' (state dict key '{prefix}sign') should have shape "
                                 f"[{self.channels}] with every entry +1 or -1, got {got}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _state_tensors(self) -> tuple[torch.Tensor, ...]:
        if self.lu:
            return self.perm, self.lower, self.upper, self.sign, self.log_s
        return (self.w,)

    def _check(self, x: torch.Tensor, name: str) -> None:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"InvConv1x1: {name} should have shape [B, {self.channels}, ...], got {list(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"InvConv1x1: {name} should be a floating-point tensor, got {x.dtype}")

    def weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W`` (``[C, C]``, differentiable in the parameters) in ``dtype`` (default: the parameters').

        Assembled in the wider of the parameters' dtype and ``dtype``, then cast once."""
        if not self.lu:
            return self.w if dtype is None else self.w.to(dtype)
        perm, lower, upper, sign, log_s = self._state_tensors()
        dtype = lower.dtype if dtype is None else dtype
        compute = torch.promote_types(lower.dtype, dtype)
        if not (lower.dtype == upper.dtype == sign.dtype == log_s.dtype == compute):
            lower, upper, sign, log_s = (t.to(compute) for t in (lower, upper, sign, log_s))
        w = F.invconv_weight(perm, lower, upper, sign, log_s, backend=self.backend)
        return w if w.dtype == dtype else w.to(dtype)

    def _build_inverse(self, dtype: torch.dtype) -> torch.Tensor:
        if self.lu:
            return F.invconv_inverse_weight(*self._state_tensors(), dtype=dtype)
        return F.dense_inverse_weight(self.w, dtype=dtype)

    def _cache_valid(self, tensors: tuple[torch.Tensor, ...], key: tuple) -> bool:
        if self._cache is None:
            return False
        cached_tensors, cached_key, _ = self._cache
        return cached_key == key and all(a is b for a, b in zip(cached_tensors, tensors))

    def inverse_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W⁻¹`` built in float64 and cast once to ``dtype`` (default: the parameters').

        Cached while the parameters are unchanged; rebuilt (uncached, differentiable) while grad
        mode is on and a parameter requires grad.
        """
        dtype = self._state_tensors()[1 if self.lu else 0].dtype if dtype is None else dtype
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters(recurse=False)):
            return self._build_inverse(dtype)
        tensors = self._state_tensors()
        if any(t.is_inference() for t in tensors):
            # No version counters to tell whether a cached inverse is still valid.
            return self._build_inverse(dtype)
        key = (dtype, *((_state.version(t), t.data_ptr(), t.dtype, t.device) for t in tensors))
        if self._cache_valid(tensors, key):
            return self._cache[2]
        # A normal tensor even under inference_mode, so the cached value can later be used by autograd.
        with torch.inference_mode(False), torch.no_grad():
            inv = self._build_inverse(dtype)
        self._cache = (tensors, key, inv)
        return inv

    def clear_inverse_cache(self) -> None:
        """Drop the cached ``W⁻¹`` (needed only after writes that bypass version counters, e.g. ``param.data``)."""
        self._cache = None

    @torch.no_grad()
    def cond(self) -> torch.Tensor:
        """The 2-norm condition number of ``W`` (``torch.linalg.cond`` in float64), a 0-d float64 tensor.

        A round trip in a dtype with machine epsilon ``eps`` can lose up to about ``cond * eps``
        relative accuracy."""
        return torch.linalg.cond(self.weight(torch.float64))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x, "x")
        w = self.weight(x.dtype)
        return F.conv1x1(x, w, backend=self.backend), self._logdet(x)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None, return_logdet: bool = False):
        self._check(y, "y")
        x = F.conv1x1(y, self.inverse_weight(y.dtype), backend=self.backend)
        if not return_logdet:
            return x
        return x, -self._logdet(y)

    def _logdet(self, x: torch.Tensor) -> torch.Tensor:
        return F.lu_logdet(self.log_s, x) if self.lu else F.dense_logdet(self.w, x)

    def weight_backward(self, w: torch.Tensor, grad_w: torch.Tensor, x: torch.Tensor,
                        grad_logdet: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The ``(parameter, gradient)`` pairs of the parameters that require grad (none: ``[]``), for
        the gradient ``grad_w`` of the weight ``w = self.weight(...)`` (built with grad) and
        ``grad_logdet`` of the log-det at ``x``."""
        params = [p for p in self.parameters(recurse=False) if p.requires_grad]
        if not params:
            return []
        outputs, grads = [w], [grad_w]
        with torch.enable_grad():
            logdet = self._logdet(x)
        if logdet.requires_grad:
            outputs.append(logdet)
            grads.append(grad_logdet)
        return list(zip(params, torch.autograd.grad(outputs, params, grads, allow_unused=True)))

    def inverse_backward(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor):
        """Memory-free backward (used by :class:`InvertibleSequential`): ``(x, grad_x, grads)`` with
        ``x = W⁻¹ y`` (the cached float64-built inverse), ``grad_x`` and the weight gradient from
        the fused ``conv1x1_bwd`` op, and the parameter gradients through the weight assembly."""
        self._check(y, "y")
        with torch.no_grad():
            x = F.conv1x1(y, self.inverse_weight(y.dtype), backend=self.backend)
        with torch.enable_grad():
            w = self.weight(y.dtype)
        needs_w = any(p.requires_grad for p in self.parameters(recurse=False))
        grad_x, grad_w, _, _ = F.conv1x1_vjp(grad_y, x, w.detach(), output_mask=(True, needs_w, False),
                                             backend=self.backend)
        return x, grad_x, self.weight_backward(w, grad_w, x, grad_logdet) if needs_w else []

    def extra_repr(self) -> str:
        return f"channels={self.channels}, lu={self.lu}"
