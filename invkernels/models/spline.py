"""Neural spline flow (Durkan et al., 2019) for vectors, on the package's rational-quadratic spline
couplings, trained memory-free; optionally conditional (``context=``)."""

from __future__ import annotations

import math

import torch

from invkernels._validation import check_int
from invkernels.models.base import (
    FlowModel,
    check_temperature,
    latent_log_prob,
    standard_normal_log_prob,
    vector_flow,
)
from invkernels.nn import RQSplineCoupling
from invkernels.nn.spline import check_spline_settings


class NeuralSplineFlow(FlowModel):
    """Neural spline flow for vectors ``[B, D]``: ``blocks`` times ActNorm, a channel mixing layer
    and a rational-quadratic spline coupling (:class:`~invkernels.nn.RQSplineCoupling`) with an MLP
    subnet, as one memory-free :class:`InvertibleSequential`, over a standard normal base. Every
    coupling starts as the identity.

    Args:
        features: ``D`` (``>= 2``).
        blocks: number of coupling blocks.
        hidden: width of the MLP subnets.
        bins: number of spline bins.
        mixing: ``"invconv"`` (learned LU-decomposed ``D x D`` mixing, default), ``"reverse"`` or
            ``"random"`` (fixed permutations).
        tail_bound: the splines cover ``[-tail_bound, tail_bound]``; identity outside.
        context_features: width of the conditioning vector ``context`` (0: unconditional). Each
            coupling's subnet reads ``[x1, context]``.
        actnorm: ActNorm in each block (initialized from the first training batch).
        memory_free: train without storing the blocks' activations (True), storing them (False) or
            ``"auto"`` (default): memory-free where the activations are large
            (:class:`~invkernels.nn.InvertibleSequential`'s rule).
        backend: ``"cpp"``, ``"triton"``, ``"reference"`` or None for ``invkernels.get_backend()``.

    ``forward(x, context=None) -> (z, logdet)``; ``inverse(z, context=None, return_logdet=False) -> x``
    (or ``(x, logdet of the inverse)``);
    ``log_prob(x, context=None)``; ``sample(n, context=None, temperature=1.0)``;
    ``bits_per_dim(x, levels=256, context=None)``. A conditional model takes ``context`` of shape
    ``[B, context_features]`` (one row per sample) or ``[1, context_features]`` (one row for all).
    """

    def __init__(self, features: int, blocks: int = 8, hidden: int = 128, bins: int = 8, mixing: str = "invconv",
                 tail_bound: float = 3.0, context_features: int = 0, actnorm: bool = True,
                 memory_free: bool | str = "auto", backend: str | None = None):
        super().__init__(locals())
        cls = "NeuralSplineFlow"
        check_spline_settings(cls, bins, tail_bound, 1e-3, 1e-3, 1e-3)
        context_features = check_int(cls, "context_features", context_features, minimum=0)
        self.flow = vector_flow(cls, features, blocks, hidden, mixing, actnorm, memory_free, backend,
                                lambda d, width: RQSplineCoupling(d, "mlp", hidden=width, bins=bins,
                                                                  tail_bound=tail_bound,
                                                                  context_channels=context_features,
                                                                  backend=backend))
        self.event_shape = (features,)
        self.context_features = context_features

    def _context(self, context: torch.Tensor | None, like: torch.Tensor, rows: int) -> torch.Tensor | None:
        """``context`` checked against the model and broadcast to ``rows`` rows (a single row is
        repeated as a view): the subnets' conditioning input, in ``like``'s dtype and device."""
        cls = type(self).__name__
        if not self.context_features:
            if context is not None:
                raise ValueError(f"{cls}: context was given but the model was built with context_features=0")
            return None
        if context is None:
            raise ValueError(f"{cls}: context is required (context_features={self.context_features})")
        if not isinstance(context, torch.Tensor):
            raise TypeError(f"{cls}: context should be a tensor, got {type(context).__name__}")
        if context.dim() != 2 or context.shape[1] != self.context_features or context.shape[0] not in (1, rows):
            raise ValueError(f"{cls}: context should have shape [{rows}, {self.context_features}] (one row per "
                             f"sample) or [1, {self.context_features}] (one row for all), got {list(context.shape)}")
        if context.dtype != like.dtype or context.device != like.device:
            raise ValueError(f"{cls}: context should have the input's dtype and device ({like.dtype} on "
                             f"{like.device}), got {context.dtype} on {context.device}")
        return context.expand(rows, -1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input(x)
        return self.flow(x, self._context(context, x, x.shape[0]))

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None, return_logdet: bool = False):
        self._check_input(z, "z")
        return self.flow.inverse(z, self._context(context, z, z.shape[0]), return_logdet)

    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(x | context)`` per sample (nats), shape ``[B]``; float32 for float16, bfloat16 and
        float32 models, float64 for float64 ones."""
        z, logdet = self(x, context)
        return standard_normal_log_prob(z) + logdet.to(torch.promote_types(logdet.dtype, torch.float32))

    def sample(self, n: int, context: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
        """``n`` samples (given ``context``: one row per sample, or one row for all), drawn with the
        latent scaled by ``temperature`` (0 gives the mode path); uses torch's global generator.
        Runs without grad."""
        temperature = self._check_sample(n, context, temperature, "sample")
        with torch.no_grad():
            return self._sample(n, temperature, context)

    def rsample(self, n: int, context: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
        """:meth:`sample` with grad (:meth:`FlowModel.rsample`), given ``context`` as :meth:`sample`."""
        temperature = self._check_sample(n, context, temperature, "rsample")
        return self._sample(n, temperature, context)

    def _check_sample(self, n: int, context, temperature, method: str) -> float:
        """``n``, ``context`` and ``temperature`` of ``method`` checked: the temperature as a float."""
        cls = type(self).__name__
        check_int(cls, "n", n, minimum=0)
        if context is not None and not isinstance(context, torch.Tensor):
            raise TypeError(f"{cls}: context should be a tensor, got {type(context).__name__} (temperature is "
                            f"the third argument: {method}(n, temperature=...))")
        return check_temperature(cls, temperature)

    def sample_and_log_prob(self, n: int, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, log p(x | context))`` with grad (:meth:`FlowModel.sample_and_log_prob`)."""
        check_int(type(self).__name__, "n", n, minimum=0)
        p = next(self.parameters())
        z = torch.randn((n, *self.event_shape), dtype=p.dtype, device=p.device)
        x, logdet = self.flow.inverse(z, self._context(context, z, n), return_logdet=True)
        return x, latent_log_prob(z, logdet)

    def _sample(self, n: int, temperature: float, context: torch.Tensor | None = None) -> torch.Tensor:
        p = next(self.parameters())
        z = torch.randn((n, *self.event_shape), dtype=p.dtype, device=p.device) * temperature
        return self.flow.inverse(z, self._context(context, z, n))

    def bits_per_dim(self, x: torch.Tensor, levels: int = 256, context: torch.Tensor | None = None) -> torch.Tensor:
        """Negative log-likelihood in bits per dimension of discrete data ``x`` given ``context``, as
        :meth:`FlowModel.bits_per_dim`."""
        dims = math.prod(self.event_shape)
        y = self.dequantize(x, levels)
        return -(self.log_prob(y, context) - dims * math.log(levels)) / (dims * math.log(2))

    def extra_repr(self) -> str:
        return f"features={self.event_shape[0]}, context_features={self.context_features}"

