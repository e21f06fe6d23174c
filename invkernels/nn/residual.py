"""Invertible residual blocks (i-ResNet, Behrmann et al. 2019): ``y = x + g(x)`` with ``g``
contractive, inverted by fixed-point iteration."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from invkernels._validation import check_int, logdet_dtype

_NORMALIZED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_tol(tol) -> float | None:
    if tol is None:
        return None
    if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"InvertibleResidual: tol should be a positive number or None, got {tol!r}")
    return float(tol)


class InvertibleResidual(nn.Module):
    """``y = x + g(x)``, ``g = lipschitz * subnet`` with every Linear / Conv layer of ``subnet``
    spectrally normalized (torch's ``spectral_norm`` parametrization, power iteration).

    With 1-Lipschitz activations (ReLU, ELU, tanh, ...) between them, ``Lip(g) <= lipschitz < 1``
    for Linear layers; for convolutions torch normalizes the reshaped kernel matrix, which bounds
    the convolution's norm only approximately, so :meth:`inverse` checks convergence itself.

    The map changes only in a training-mode ``forward``: its first step is ``n_power_iterations``
    power iterations of every spectral norm (what torch's parametrization does in training mode),
    and the map is then evaluated with the updated norms. :meth:`inverse`, the log-determinant and
    the memory-free rebuild (:meth:`inverse_backward`) evaluate the map as the last forward left
    it, in any mode, so ``inverse(forward(x)) = x`` also in training mode and memory-free
    gradients equal plain autograd's.

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
        tol: relative residual ``||x_{k+1} - x_k|| / (||y|| + ||x_{k+1}||)`` per sample at which the
            fixed-point inverse stops; None (default): ``16 * eps`` of the input's dtype (float32: 1.9e-6,
            float64: 3.6e-15), which the iteration reaches at ``lipschitz <= 0.9`` (its rounding floor
            measured below ``eps`` on MLP and conv subnets).
        max_iter: iterations at most; None (default): twice the iterations a contraction of
            ``lipschitz`` needs to reach ``tol``, plus 10.

    ``forward(x, context=None) -> (y, logdet)``; ``inverse(y, context=None, return_logdet=False, *,
    tol=None, max_iter=None) -> x`` by the Banach
    iteration ``x <- y - g(x)`` (``tol`` and ``max_iter`` default to the module's attributes, which
    the memory-free rebuild uses), which records ``last_inverse = {"iterations", "residual"}`` and
    raises RuntimeError when it does not converge.
    """

    # forward and inverse take ``context=`` like every block, and do not use it: a chain passes
    # none to this block (protocol.takes_context).
    uses_context = False

    def __init__(self, subnet: nn.Module, lipschitz: float = 0.9, logdet: str = "series", terms: int = 10,
                 samples: int = 1, n_power_iterations: int = 1, tol: float | None = None,
                 max_iter: int | None = None):
        super().__init__()
        if not isinstance(subnet, nn.Module):
            raise TypeError(f"InvertibleResidual: subnet should be an nn.Module, got {type(subnet).__name__}")
        if isinstance(lipschitz, bool) or not (isinstance(lipschitz, (int, float)) and 0 < lipschitz < 1):
            raise ValueError(f"InvertibleResidual: lipschitz should be in (0, 1) so that the block is invertible, "
                             f"got {lipschitz!r}")
        if logdet not in ("series", "exact"):
            raise ValueError(f"InvertibleResidual: logdet should be 'series' or 'exact', got {logdet!r}")
        for name, value in (("terms", terms), ("samples", samples), ("n_power_iterations", n_power_iterations)):
            check_int("InvertibleResidual", name, value)
        self.tol = _check_tol(tol)
        self.max_iter = None if max_iter is None else check_int("InvertibleResidual", "max_iter", max_iter)
        self._norms: list[tuple[nn.Module, nn.Module]] = []
        for module in list(subnet.modules()):
            if isinstance(module, _NORMALIZED):
                spectral_norm(module, n_power_iterations=n_power_iterations)
                self._norms.append((module, module.parametrizations.weight[0]))
        self.subnet = subnet
        self.lipschitz = float(lipschitz)
        self.logdet_mode = logdet
        self.terms = terms
        self.samples = samples
        self.last_inverse: dict[str, float] = {}
        self.train(self.training)

    def train(self, mode: bool = True):
        """Sets the mode as ``nn.Module.train`` does; the spectral norms themselves stay in eval mode
        (no power iteration when the map is evaluated): :meth:`forward` updates them explicitly."""
        super().train(mode)
        for _, norm in self._norms:
            norm.eval()
        return self

    @torch.no_grad()
    def update_spectral_norms(self) -> None:
        """Run ``n_power_iterations`` power iterations of every spectral norm (what a training-mode
        forward does first), updating their ``_u`` / ``_v`` vectors."""
        for module, norm in self._norms:
            norm.train()
            try:
                getattr(module, "weight")
            finally:
                norm.eval()

    def g(self, x: torch.Tensor) -> torch.Tensor:
        """The contractive residual ``lipschitz * subnet(x)``, with the spectral norms as they are."""
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
        jac = jac.to(logdet_dtype(jac.dtype))
        eye = torch.eye(d, dtype=jac.dtype, device=jac.device)
        return torch.linalg.slogdet(eye + jac).logabsdet

    def series_logdet(self, x: torch.Tensor, gx: torch.Tensor, create_graph: bool) -> torch.Tensor:
        """The Hutchinson estimate of the truncated power series (see the class docstring)."""
        total = x.new_zeros(x.shape[0], dtype=logdet_dtype(x.dtype))
        for _ in range(self.samples):
            v = torch.randn_like(x)
            w = v
            for k in range(1, self.terms + 1):
                (w,) = torch.autograd.grad(gx, x, w, retain_graph=True, create_graph=create_graph)
                total = total + ((-1) ** (k + 1) / k) * (w * v).flatten(1).to(total.dtype).sum(1)
        return total / self.samples

    def _map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + g(x), logdet)`` with the spectral norms as they are (no power iteration)."""
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

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            self.update_spectral_norms()
        return self._map(x)

    def _resolved(self, tol, max_iter, dtype: torch.dtype) -> tuple[float, int]:
        tol = _check_tol(tol)
        if max_iter is not None:
            check_int("InvertibleResidual", "max_iter", max_iter)
        tol = tol if tol is not None else self.tol if self.tol is not None else 16 * torch.finfo(dtype).eps
        max_iter = max_iter if max_iter is not None else self.max_iter
        if max_iter is None:
            max_iter = 2 * math.ceil(math.log(min(tol, 0.5)) / math.log(self.lipschitz)) + 10
        return tol, max_iter

    @torch.no_grad()
    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None, return_logdet: bool = False, *,
                tol: float | None = None, max_iter: int | None = None):
        """``x`` with ``x + g(x) = y`` by the fixed-point iteration ``x <- y - g(x)`` from ``x = y``,
        stopping when every sample's relative residual is at most ``tol``; ``tol`` and ``max_iter``
        default to the module's (see the class docstring). Never changes the module. With
        ``return_logdet``, ``(x, -logdet)`` with ``logdet`` the forward's estimate at ``x``."""
        x = self._fixed_point(y, tol, max_iter)
        return (x, -self._map(x)[1]) if return_logdet else x

    def _fixed_point(self, y: torch.Tensor, tol: float | None, max_iter: int | None) -> torch.Tensor:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"InvertibleResidual: y should be a tensor, got {type(y).__name__}")
        tol, max_iter = self._resolved(tol, max_iter, y.dtype if y.is_floating_point() else torch.float32)
        if y.shape[0] == 0:
            self.last_inverse = {"iterations": 0, "residual": 0.0}
            return y.clone()
        tiny = torch.finfo(y.dtype).tiny
        y_norm = y.flatten(1).norm(dim=1)
        x = y.clone()
        residual = math.inf
        it = 0
        for it in range(1, max_iter + 1):
            x_new = y - self.g(x)
            scale = (y_norm + x_new.flatten(1).norm(dim=1)).clamp_min(tiny)
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
            f"other than Linear/Conv must be 1-Lipschitz), or tol is below what {y.dtype} can reach")

    def inverse_backward(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor):
        """Memory-free backward (used by :class:`InvertibleSequential`): ``x`` rebuilt by
        :meth:`inverse`, then the map evaluated again at it with grad (no power iteration: the map
        of the forward) and back-propagated. Returns ``(x, grad_x, grads)``."""
        from invkernels.nn._memory_free import forward_vjp  # noqa: PLC0415

        x = self.inverse(y)
        params = [p for p in self.parameters() if p.requires_grad]
        grad_x, pairs = forward_vjp(self._map, x, grad_y, grad_logdet, params)
        return x, grad_x, pairs

    def extra_repr(self) -> str:
        return f"lipschitz={self.lipschitz}, logdet={self.logdet_mode!r}, terms={self.terms}, samples={self.samples}"
