"""What every flow model shares: the standard normal base, log_prob, sample, bits per dimension
with uniform dequantization of discrete data."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from invkernels import _backend
from invkernels._validation import check_int
from invkernels.nn import ActNorm, InvConv1x1, InvertibleSequential, Permute
from invkernels.nn.sequential import check_memory_free

_LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` per sample, summed over every non-batch dim, in float32 or wider."""
    zf = z.to(torch.promote_types(z.dtype, torch.float32))
    return (-0.5 * (zf.square() + _LOG_2PI)).flatten(1).sum(1)


def uniform_dequantize(x: torch.Tensor, levels: int) -> torch.Tensor:
    """``(k + u) / levels`` with ``k = round(x * (levels - 1))`` and ``u ~ U[0, 1)`` (torch's global
    generator): data on the grid ``k / (levels - 1)`` spread uniformly over ``[0, 1)``. Computed in
    float32 or wider (a float16/bfloat16 ``k + u`` would round ``u`` away), returned in ``x``'s dtype."""
    xc = x.to(torch.promote_types(x.dtype, torch.float32))
    return ((torch.round(xc * (levels - 1)) + torch.rand_like(xc)) / levels).to(x.dtype)


def check_levels(name: str, levels) -> int:
    return check_int(name, "levels", levels, minimum=2)


def vector_flow(cls: str, features: int, blocks: int, hidden: int, mixing: str, actnorm: bool,
                memory_free: bool | str,
                backend: str | None, coupling: Callable[[int, int], nn.Module]) -> nn.Module:
    """The flow of the vector models (RealNVP, NeuralSplineFlow), its arguments checked with
    errors naming ``cls``: ``blocks`` times an optional ActNorm, a channel mixing layer
    (``"invconv"``: a learned LU-decomposed ``D x D`` mixing; ``"reverse"`` / ``"random"``: a fixed
    permutation) and ``coupling(features, hidden)``, as one :class:`InvertibleSequential`."""
    features = check_int(cls, "features", features)
    if features < 2:
        raise ValueError(f"{cls}: features should be >= 2 (a coupling splits them), got {features}")
    blocks = check_int(cls, "blocks", blocks)
    hidden = check_int(cls, "hidden", hidden)
    if mixing not in ("invconv", "reverse", "random"):
        raise ValueError(f"{cls}: mixing should be 'invconv', 'reverse' or 'random', got {mixing!r}")
    if not isinstance(actnorm, bool):
        raise ValueError(f"{cls}: actnorm should be True or False, got {actnorm!r}")
    check_memory_free(cls, memory_free)
    if backend is not None and backend not in _backend.BACKENDS:
        raise ValueError(f"{cls}: backend should be one of {_backend.BACKENDS}, got {backend!r}")
    layers: list[nn.Module] = []
    for _ in range(blocks):
        if actnorm:
            layers.append(ActNorm(features, backend=backend))
        layers.append(InvConv1x1(features, backend=backend) if mixing == "invconv" else Permute(features, mixing))
        layers.append(coupling(features, hidden))
    return InvertibleSequential(*layers, memory_free=memory_free)


def check_unconditional(model: torch.nn.Module, context) -> None:
    """ValueError unless ``context`` is None: ``model`` is unconditional and takes ``context=`` only
    for the API it shares with conditional models."""
    if context is not None:
        raise ValueError(f"{type(model).__name__}: the model is unconditional, so context should be None, got "
                         f"{type(context).__name__}; NeuralSplineFlow(..., context_features=...) is conditional")


def check_temperature(name: str, temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{name}: temperature should be a finite number >= 0, got {temperature!r}")
    return float(temperature)


def latent_log_prob(z: torch.Tensor, logdet_inverse: torch.Tensor) -> torch.Tensor:
    """``log p(x)`` of ``x = f^{-1}(z)`` from its latent ``z`` and ``log |det dx/dz|`` (an
    :class:`InvertibleSequential`'s ``inverse(z, return_logdet=True)``), float32 or wider."""
    logdet_inverse = logdet_inverse.to(torch.promote_types(logdet_inverse.dtype, torch.float32))
    return standard_normal_log_prob(z) - logdet_inverse


# What a saved model file holds (FlowModel.save).
SAVE_FORMAT = "invkernels.models/1"


class FlowModel(nn.Module):
    """Base of the flow models: ``forward(x) -> (z, logdet)``, ``inverse(z) -> x``,
    ``log_prob(x)``, ``sample(n, temperature)`` (no grad), ``rsample(n, temperature)`` and
    ``sample_and_log_prob(n)`` (with grad) and ``bits_per_dim(x, levels)``.

    Subclasses define ``event_shape`` (the shape of one sample), ``forward``, ``inverse`` and
    ``_sample(n, temperature)``; ``forward``'s ``logdet`` already includes the log-density of
    everything factored out along the way, so ``log p(x) = log N(z_final; 0, I) + logdet`` with
    ``z_final`` what :meth:`_final_latent` picks out of ``z``. Inputs must have the dtype of the
    model's parameters (outside autocast); log-densities are float32 or wider whatever that dtype.
    """

    event_shape: tuple[int, ...]

    def __init__(self, arguments: dict | None = None):
        """``arguments``: the subclass's constructor arguments, ``locals()`` at the start of its
        ``__init__`` (what :meth:`save` writes and :meth:`load` rebuilds the model from)."""
        super().__init__()
        self._arguments = {k: v for k, v in (arguments or {}).items() if k not in ("self", "__class__")}

    def save(self, path, metadata: dict | None = None) -> None:
        """Write the model to ``path``: its class, its constructor arguments and its state dict
        (plus ``metadata``, e.g. a training configuration, kept as given), in a file that
        :meth:`load` reads with ``torch.load(weights_only=True)``."""
        saved = {"format": SAVE_FORMAT, "class": type(self).__name__, "arguments": self._arguments,
                 "state_dict": self.state_dict(), "metadata": metadata}
        with open(path, "wb") as f:  # an unwritable path raises the OSError that names it
            torch.save(saved, f)

    @classmethod
    def load(cls, path, map_location=None) -> "FlowModel":
        """The model saved by :meth:`save` at ``path``, built from its constructor arguments with its
        state dict loaded (``torch.load(weights_only=True)``: the file cannot run code), in eval
        mode. ``Glow.load`` checks that the file holds a Glow; ``FlowModel.load`` takes any model
        of the package. The file's ``metadata`` is in the model's ``saved_metadata``."""
        saved = torch.load(path, map_location=map_location, weights_only=True)
        if not (isinstance(saved, dict) and saved.get("format") == SAVE_FORMAT):
            raise ValueError(f"{cls.__name__}.load: {path} is not a model saved by FlowModel.save (format "
                             f"{SAVE_FORMAT!r}); a bare state dict loads with model.load_state_dict")
        classes = {c.__name__: c for c in _model_classes()}
        model_cls = classes.get(saved["class"])
        if model_cls is None or not issubclass(model_cls, cls):
            raise ValueError(f"{cls.__name__}.load: {path} holds a {saved['class']}, not a {cls.__name__}"
                             + (f"; use {saved['class']}.load" if model_cls is not None else ""))
        model = model_cls(**saved["arguments"])
        model.load_state_dict(saved["state_dict"])
        model.saved_metadata = saved.get("metadata")
        return model.eval()

    def _check_input(self, x: torch.Tensor, name: str = "x") -> None:
        cls = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{cls}: {name} should be a tensor, got {type(x).__name__}")
        if x.dim() != len(self.event_shape) + 1 or tuple(x.shape[1:]) != tuple(self.event_shape):
            raise ValueError(f"{cls}: {name} should have shape [B, {', '.join(map(str, self.event_shape))}], "
                             f"got {list(x.shape)}")
        self._check_dtype(x, name)

    def _check_dtype(self, x: torch.Tensor, name: str) -> None:
        """ValueError naming both dtypes when ``x`` is not floating-point or (outside autocast) not
        of the parameters' dtype."""
        cls = type(self).__name__
        if not x.is_floating_point():
            raise ValueError(f"{cls}: {name} should be a floating-point tensor, got {x.dtype}")
        dtype = self._parameter_dtype()
        autocast = torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)
        if dtype is not None and x.dtype != dtype and not autocast:
            raise ValueError(f"{cls}: {name} has dtype {x.dtype} but the model's parameters are {dtype}: pass "
                             f"{name}.to({dtype}), or convert the model with model.to({x.dtype})")

    def _parameter_dtype(self) -> torch.dtype | None:
        """The dtype of the model's floating-point parameters (None when it has none)."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), None)

    def _final_latent(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` per sample (nats), shape ``[B]``, for continuous ``x``; float32 for float16,
        bfloat16 and float32 models, float64 for float64 ones."""
        z, logdet = self(x)
        logdet = logdet.to(torch.promote_types(logdet.dtype, torch.float32))
        return standard_normal_log_prob(self._final_latent(z)) + logdet

    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """``n`` samples, drawn with the latents scaled by ``temperature`` (0 gives the mode path);
        uses torch's global generator. Runs without grad."""
        check_int(type(self).__name__, "n", n, minimum=0)
        temperature = check_temperature(type(self).__name__, temperature)
        with torch.no_grad():
            return self._sample(n, temperature)

    def _sample(self, n: int, temperature: float) -> torch.Tensor:
        raise NotImplementedError

    def rsample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """``n`` samples drawn as :meth:`sample` draws them, with grad: ``x = f^{-1}(z)`` for ``z``
        drawn first, so ``x`` is differentiable in the parameters (the reparameterization used by
        reverse-KL training and variational inference). An ActNorm layer not initialized yet
        initializes from the latents, as every first training-mode inverse does."""
        check_int(type(self).__name__, "n", n, minimum=0)
        temperature = check_temperature(type(self).__name__, temperature)
        return self._sample(n, temperature)

    def sample_and_log_prob(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, log p(x))`` for ``n`` samples, both with grad: the reverse-KL loss of a target
        density ``p*`` is ``(log_p - log_p_star(x)).mean()``. ``log p(x)`` is the model's density at
        its own samples, float32 or wider as :meth:`log_prob` gives it."""
        check_int(type(self).__name__, "n", n, minimum=0)
        return self._sample_and_log_prob(n)

    def _sample_and_log_prob(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._sample(n, 1.0)
        return x, self.log_prob(x)

    def dequantize(self, x: torch.Tensor, levels: int) -> torch.Tensor:
        """Uniform dequantization of data in ``{0, 1/(levels-1), ..., 1}``: ``(k + u) / levels`` with
        ``k = round(x * (levels - 1))`` and ``u ~ U[0, 1)`` (torch's global generator), computed in
        float32 or wider and returned in ``x``'s dtype.

        ``x`` may be stored in any floating dtype: the grid check allows the rounding of that dtype
        (``k / (levels - 1)`` rounded to float16 or bfloat16 passes). Raises ValueError for values
        outside ``[0, 1]`` or off the ``levels``-level grid, and for a dtype too coarse to hold
        ``levels`` distinct values in ``[0, 1]`` (bfloat16: at most 256, float16: 2048)."""
        cls = type(self).__name__
        levels = check_levels(cls, levels)
        self._check_input(x)
        finfo = torch.finfo(x.dtype)
        if levels - 1 >= 2 / finfo.eps:
            raise ValueError(f"{cls}: x in {x.dtype} cannot hold {levels} distinct levels in [0, 1] (at most "
                             f"{int(2 / finfo.eps)}: its spacing just below 1 is {finfo.eps / 2:.3g}); store the "
                             f"data and the model in a wider dtype (e.g. model.float() and x.float())")
        if x.numel() and (bool((x < 0).any()) or bool((x > 1).any()) or not bool(torch.isfinite(x).all())):
            raise ValueError(f"{cls}: x should hold values in [0, 1] (data with {levels} levels scaled to "
                             f"[0, 1]), got values in [{x.min().item():.4g}, {x.max().item():.4g}]")
        if x.numel():
            xc = x.to(torch.promote_types(x.dtype, torch.float32))
            k = xc * (levels - 1)
            distance = (k - k.round()).abs()
            # k / (levels - 1) stored in x's dtype is off by at most half its spacing at x,
            # finfo.eps * 2 ** (exponent - 2) for x = mantissa * 2 ** exponent, mantissa in [0.5, 1).
            _, exponent = torch.frexp(xc)
            rounding = torch.ldexp(torch.full_like(xc, finfo.eps / 4), exponent) * (levels - 1)
            excess = distance - rounding
            if excess.max().item() > 1e-3:
                worst = int(excess.flatten().argmax())
                raise ValueError(f"{cls}: x should lie on the grid of {levels} levels k / {levels - 1}; the value "
                                 f"{xc.flatten()[worst].item():.6g} is {distance.flatten()[worst].item():.3g} "
                                 f"levels from it (the rounding of {x.dtype} allows "
                                 f"{rounding.flatten()[worst].item():.3g})")
        return uniform_dequantize(x, levels)

    def bits_per_dim(self, x: torch.Tensor, levels: int = 256) -> torch.Tensor:
        """Negative log-likelihood in bits per dimension of discrete data ``x`` (values
        ``k / (levels - 1)``), per sample: ``-(log p(x̃) - D log(levels)) / (D log 2)`` with ``x̃`` the
        uniformly dequantized data in ``[0, 1)`` (an upper bound of the discrete model's NLL), in
        float32 or wider (:meth:`dequantize` says which ``x`` it takes)."""
        dims = math.prod(self.event_shape)
        y = self.dequantize(x, levels)
        return -(self.log_prob(y) - dims * math.log(levels)) / (dims * math.log(2))


def _model_classes() -> list[type]:
    """Every subclass of :class:`FlowModel` defined so far (the package's models, a user's too)."""
    found, todo = [], [FlowModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.append(sub)
            todo.append(sub)
    return found
