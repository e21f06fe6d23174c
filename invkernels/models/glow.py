"""Glow (Kingma & Dhariwal, 2018) and RealNVP (Dinh et al., 2017) on the package's fused layers,
trained memory-free."""

from __future__ import annotations

import torch
from torch import nn

from invkernels._validation import check_int, logdet_dtype
from invkernels.models.base import FlowModel, check_unconditional, latent_log_prob, vector_flow
from invkernels.nn import AffineCoupling, GlowStep, InvertibleSequential, Split, Squeeze
from invkernels.nn.glow import check_coupling
from invkernels.nn.spline import check_spline_settings


class Glow(FlowModel):
    """Multi-scale Glow for images ``[B, C, H, W]`` with values in ``[0, 1]``.

    Each of the ``levels`` levels is a :class:`Squeeze` and ``steps`` :class:`GlowStep` s (ActNorm,
    LU-decomposed 1x1 convolution, affine or rational-quadratic spline coupling), run as one memory-free
    :class:`InvertibleSequential`; every level but the last ends with a :class:`Split` that factors
    out half the channels under a Gaussian prior (``prior="learned"``: conditioned on the kept half).
    The final latent has a standard normal base. Inputs are centred (``x - 0.5``) first.

    Args:
        in_shape: ``(C, H, W)``; ``H`` and ``W`` divisible by ``2 ** levels``.
        levels, steps: number of levels and of Glow steps per level.
        hidden: width of the coupling subnets (Glow uses 512).
        prior: ``"gaussian"`` or ``"learned"`` prior of the factored-out halves.
        scale: affine coupling scale, ``"sigmoid"`` (Glow) or ``"exp"``.
        memory_free: train without storing the steps' activations (True), storing them (False) or
            ``"auto"`` (default): memory-free where the activations are large, per level
            (:class:`~invkernels.nn.InvertibleSequential`'s rule).
        coupling: ``"affine"`` (Glow's), ``"additive"`` or ``"spline"`` (:class:`RQSplineCoupling`, identity at
            initialization).
        bins, tail_bound: the spline couplings' bins and range ``[-tail_bound, tail_bound]``.
        backend: ``"cpp"``, ``"triton"``, ``"reference"`` or None for ``invkernels.get_backend()``.

    ``forward(x, context=None) -> (z, logdet)`` with ``z`` the latents of every level flattened and
    concatenated (the factored-out halves in level order, then the final latent) and ``logdet``
    including the priors of the factored-out halves, so ``log p(x) = log N(z_final; 0, I) + logdet``;
    ``inverse(z, context=None, return_logdet=False) -> x`` (with ``return_logdet``, ``(x, log |det
    dx/dz|)``, the levels' Jacobians without the priors); ``context`` is for the uniform API of
    conditional models and must be None; ``log_prob(x)``; ``sample(n, temperature)``; ``bits_per_dim(x, levels)``.
    """

    def __init__(self, in_shape: tuple[int, int, int], levels: int = 3, steps: int = 8, hidden: int = 512,
                 prior: str = "gaussian", scale: str = "sigmoid", memory_free: bool | str = "auto",
                 backend: str | None = None, *, coupling: str = "affine", bins: int = 8, tail_bound: float = 3.0):
        super().__init__(locals())
        cls = "Glow"
        check_coupling(cls, coupling)
        if coupling == "spline":
            check_spline_settings(cls, bins, tail_bound, 1e-3, 1e-3, 1e-3)
        if not (isinstance(in_shape, (tuple, list)) and len(in_shape) == 3):
            raise ValueError(f"{cls}: in_shape should be (C, H, W), got {in_shape!r}")
        c, h, w = (check_int(cls, "in_shape entries", v) for v in in_shape)
        levels = check_int(cls, "levels", levels)
        steps = check_int(cls, "steps", steps)
        hidden = check_int(cls, "hidden", hidden)
        if h % 2**levels or w % 2**levels:
            raise ValueError(f"{cls}: H and W should be divisible by 2 ** levels = {2**levels}, got in_shape "
                             f"{tuple(in_shape)}")
        self.event_shape = (c, h, w)
        self.levels = levels
        self.flows = nn.ModuleList()
        self.splits = nn.ModuleList()
        self._latent_shapes: list[tuple[int, ...]] = []
        for level in range(levels):
            c, h, w = 4 * c, h // 2, w // 2
            self.flows.append(InvertibleSequential(
                Squeeze(), *(GlowStep(c, hidden=hidden, scale=scale, backend=backend, coupling=coupling, bins=bins,
                                      tail_bound=tail_bound) for _ in range(steps)),
                memory_free=memory_free))
            if level < levels - 1:
                split = Split(c, prior=prior)
                self.splits.append(split)
                self._latent_shapes.append((split.c2, h, w))
                c = split.c1
        self._latent_shapes.append((c, h, w))

    def _sizes(self) -> list[int]:
        return [s[0] * s[1] * s[2] for s in self._latent_shapes]

    def _final_latent(self, z: torch.Tensor) -> torch.Tensor:
        return z[:, -self._sizes()[-1]:]

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input(x)
        check_unconditional(self, context)
        h = x - 0.5
        logdet = x.new_zeros(x.shape[0], dtype=logdet_dtype(x.dtype))
        parts = []
        for level, flow in enumerate(self.flows):
            h, level_logdet = flow(h)
            logdet = logdet + level_logdet
            if level < self.levels - 1:
                split = self.splits[level]
                parts.append(h[:, split.c1:].flatten(1))
                h, log_pz2 = split(h)
                logdet = logdet + log_pz2
        parts.append(h.flatten(1))
        return torch.cat(parts, dim=1), logdet

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None, return_logdet: bool = False):
        check_unconditional(self, context)
        total = sum(self._sizes())
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"Glow: z should be a tensor, got {type(z).__name__}")
        if z.dim() != 2 or z.shape[1] != total:
            raise ValueError(f"Glow: z should have shape [B, {total}] (forward's latents), got {list(z.shape)}")
        self._check_dtype(z, "z")
        parts = list(torch.split(z, self._sizes(), dim=1))
        h = parts[-1].reshape(z.shape[0], *self._latent_shapes[-1])
        logdet = z.new_zeros(z.shape[0], dtype=logdet_dtype(z.dtype))
        for level in reversed(range(self.levels)):
            if level < self.levels - 1:
                h = self.splits[level].inverse(h, z2=parts[level].reshape(z.shape[0], *self._latent_shapes[level]))
            h, level_logdet = self.flows[level].inverse(h, return_logdet=True)
            logdet = logdet + level_logdet
        return (h + 0.5, logdet) if return_logdet else h + 0.5

    def _sample(self, n: int, temperature: float) -> torch.Tensor:
        p = next(self.parameters())
        h = torch.randn((n, *self._latent_shapes[-1]), dtype=p.dtype, device=p.device) * temperature
        for level in reversed(range(self.levels)):
            if level < self.levels - 1:
                h = self.splits[level].inverse(h, temperature=temperature)
            h = self.flows[level].inverse(h)
        return h + 0.5


class RealNVP(FlowModel):
    """RealNVP for vectors ``[B, D]``: ``blocks`` times ActNorm, a channel mixing layer and an
    affine coupling with an MLP subnet, as one memory-free :class:`InvertibleSequential`, over a
    standard normal base.

    Args:
        features: ``D`` (``>= 2``).
        blocks: number of coupling blocks.
        hidden: width of the MLP subnets.
        mixing: ``"invconv"`` (learned LU-decomposed ``D x D`` mixing, default), ``"reverse"`` or
            ``"random"`` (fixed permutations).
        scale: coupling scale, ``"exp"`` (soft-clamped, default) or ``"sigmoid"``.
        actnorm: ActNorm in each block (initialized from the first training batch).
        memory_free: train without storing the blocks' activations (True), storing them (False) or
            ``"auto"`` (default): memory-free where the activations are large
            (:class:`~invkernels.nn.InvertibleSequential`'s rule).
        backend: ``"cpp"``, ``"triton"``, ``"reference"`` or None for ``invkernels.get_backend()``.
    """

    def __init__(self, features: int, blocks: int = 8, hidden: int = 256, mixing: str = "invconv",
                 scale: str = "exp", actnorm: bool = True, memory_free: bool | str = "auto",
                 backend: str | None = None):
        super().__init__(locals())
        self.flow = vector_flow("RealNVP", features, blocks, hidden, mixing, actnorm, memory_free, backend,
                                lambda d, width: AffineCoupling(d, "mlp", hidden=width, scale=scale, backend=backend))
        self.event_shape = (features,)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input(x)
        check_unconditional(self, context)
        return self.flow(x)

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None, return_logdet: bool = False):
        self._check_input(z, "z")
        check_unconditional(self, context)
        return self.flow.inverse(z, return_logdet=return_logdet)

    def _sample(self, n: int, temperature: float) -> torch.Tensor:
        p = next(self.parameters())
        return self.flow.inverse(torch.randn((n, *self.event_shape), dtype=p.dtype, device=p.device) * temperature)

    def _sample_and_log_prob(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = next(self.parameters())
        z = torch.randn((n, *self.event_shape), dtype=p.dtype, device=p.device)
        x, logdet = self.flow.inverse(z, return_logdet=True)
        return x, latent_log_prob(z, logdet)
