"""Invertible residual blocks (i-ResNet, Behrmann et al. 2019): ``y = x + g(x)`` with ``g``
contractive, inverted by fixed-point iteration."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

_NORMALIZED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class InvertibleResidual(nn.Module):
    """``y = x + g(x)``, ``g = lipschitz * subnet`` with every Linear / Conv layer of ``subnet``
    spectrally normalized (torch's ``spectral_norm`` parametrization, power iteration).

    With 1-Lipschitz activations (ReLU, ELU, tanh, ...) between them, ``Lip(g) <= lipschitz < 1``
    for Linear layers; for convolutions torch normalizes the reshaped kernel matrix, which bounds
    the convolution's norm only approximately, so :meth:`inverse` checks convergence itself.

    Log-determinant ``log det(I + J_g)`` per sample:
        ``"series"`` (default): ``Σ_{k=1}^{terms} (-1)^{k+1} tr(J_g^k) / k`` with each trace from
        ``samples`` Hutchinson probes ``vᵀ J^k v`` (``v ~ N(0, I)``), by vector-Jacobian products;
        differentiable (unbiased for the truncated series, truncation error at most
        ``D · lipschitz^(terms+1) / ((terms+1)(1-lipschitz))`` for ``D`` dimensions).
        ``"exact"``: ``slogdet(I + J_g)`` of the dense per-sample Jacobian (``D`` backward passes),
        for small inputs and tests.

    Args:
        subnet: the residual function's module (input and output of the same shape).
        lipschitz: the bound in ``(0, 1)`` (default 0.9).
        logdet: ``"series"`` or ``"exact"``.
        terms: terms of the power series. samples: Hutchinson probes per sample.
        n_power_iterations: power iterations per training forward of each spectral norm.

    ``forward(x) -> (y, logdet)``; ``inverse(y, tol=1e-10, max_iter=200) -> x`` by the Banach
    iteration ``x <- y - g(x)``, which records ``last_inverse = {"iterations", "residual"}`` and
    raises RuntimeError when it does not converge.
    """

    def __init__(self, subnet: nn.Module, lipschitz: float = 0.9, logdet: str = "series", terms: int = 10,
                 samples: int = 1, n_power_iterations: int = 1):
        super().__init__()
        if not isinstance(subnet, nn.Module):
            raise TypeError(f"InvertibleResidual: subnet should be an nn.Module, got {type(subnet).__name__}")
        if not (isinstance(lipschitz, (int, float)) and 0 < lipschitz < 1):
            raise ValueError(f"InvertibleResidual: lipschitz should be in (0, 1) so that the block is invertible, "
                             f"got {lipschitz!r}")
        if logdet not in ("series", "exact"):
            raise ValueError(f"InvertibleResidual: logdet should be 'series' or 'exact', got {logdet!r}")
        for name, value in (("terms", terms), ("samples", samples), ("n_power_iterations", n_power_iterations)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"InvertibleResidual: {name} should be a positive integer, got {value!r}")
        for module in list(subnet.modules()):
            if isinstance(module, _NORMALIZED):
                spectral_norm(module, n_power_iterations=n_power_iterations)
        self.subnet = subnet
        self.lipschitz = float(lipschitz)
        self.logdet_mode = logdet
        self.terms = terms
        self.samples = samples
        self.last_inverse: dict[str, float] = {}

    def g(self, x: torch.Tensor) -> torch.Tensor:
        """The contractive residual ``lipschitz * subnet(x)``."""
        return self.lipschitz * self.subnet(x)

    def _leaf(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if x.requires_grad:
            return x, True
        return x.detach().requires_grad_(), False

    def exact_logdet(self, x: torch.Tensor, gx: torch.Tensor | None = None, create_graph: bool = False) -> torch.Tensor:
        """``log|det(I + J_g(x_b))|`` per sample from the dense Jacobian (``D`` backward passes)."""
        with torch.enable_grad():
            if gx is None:
                x, _ = self._leaf(x)
                gx = self.g(x)
            flat = gx.flatten(1)
            d = flat.shape[1]
            rows = [torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True, create_graph=create_graph)[0].flatten(1)
                    for i in range(d)]
        jac = torch.stack(rows, dim=1)
        eye = torch.eye(d, dtype=jac.dtype, device=jac.device)
        return torch.linalg.slogdet(eye + jac).logabsdet

    def series_logdet(self, x: torch.Tensor, gx: torch.Tensor, create_graph: bool) -> torch.Tensor:
        """The Hutchinson estimate of the truncated power series (see the class docstring)."""
        total = x.new_zeros(x.shape[0])
        for _ in range(self.samples):
            v = torch.randn_like(x)
            w = v
            for k in range(1, self.terms + 1):
                (w,) = torch.autograd.grad(gx, x, w, retain_graph=True, create_graph=create_graph)
                total = total + ((-1) ** (k + 1) / k) * (w * v).flatten(1).sum(1)
        return total / self.samples

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad_mode = torch.is_grad_enabled()
        with torch.enable_grad():
            leaf, _ = self._leaf(x)
            gx = self.g(leaf)
            if self.logdet_mode == "exact":
                logdet = self.exact_logdet(leaf, gx, create_graph=grad_mode)
            else:
                logdet = self.series_logdet(leaf, gx, create_graph=grad_mode)
        if not grad_mode:
            return x + gx.detach(), logdet.detach()
        return x + gx, logdet

    @torch.no_grad()
    def inverse(self, y: torch.Tensor, tol: float = 1e-10, max_iter: int = 200) -> torch.Tensor:
        if not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"InvertibleResidual: tol should be positive, got {tol!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"InvertibleResidual: max_iter should be a positive integer, got {max_iter!r}")
        scale = y.flatten(1).norm(dim=1).clamp_min(torch.finfo(y.dtype).tiny)
        x = y.clone()
        residual = math.inf
        for it in range(1, max_iter + 1):
            x_new = y - self.g(x)
            residual = ((x_new - x).flatten(1).norm(dim=1) / scale).max().item()
            x = x_new
            if residual <= tol:
                self.last_inverse = {"iterations": it, "residual": residual}
                return x
            if not math.isfinite(residual) or residual > 1e12:
                break
        self.last_inverse = {"iterations": it, "residual": residual}
        raise RuntimeError(
            f"InvertibleResidual: the fixed-point inverse did not converge: relative residual {residual:.3g} after "
            f"{it} iterations (tol {tol:g}); g is not contractive enough here (lipschitz={self.lipschitz}; layers "
            f"other than Linear/Conv must be 1-Lipschitz)")

    def extra_repr(self) -> str:
        return f"lipschitz={self.lipschitz}, logdet={self.logdet_mode!r}, terms={self.terms}, samples={self.samples}"
