"""Inverting networks that are not invertible: reconstruct inputs from a layer's activations by
optimization with image priors (Mahendran & Vedaldi, 2015, :func:`invert`) or by a trained
decoder (:func:`fit_decoder`). Docs: docs/inversion.md.

The objective, per sample ``b``::

    ||φ(x_b) - φ0_b||² / ||φ0_b||²  +  λ_α ||x_b||_α^α  +  λ_TV TV^β(x_b)

with ``φ`` the activations of ``layer`` (captured by a forward hook), ``||x||_α^α = Σ |x|^α`` and
``TV^β(x) = Σ_{i,j} ((x[i, j+1] - x[i, j])² + (x[i+1, j] - x[i, j])²)^(β/2)`` over the last two
dimensions of images (``Σ_k |x[k+1] - x[k]|^β`` along the last dimension of vectors). The batch
loss is the sum of the per-sample losses, so with Adam every sample is solved independently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


class _Reached(Exception):
    """Raised by the hook to stop the forward once the layer has run."""


def _find_layer(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if not isinstance(layer, str) or layer not in modules or layer == "":
        names = ", ".join(repr(n) for n in modules if n) or "(none)"
        raise ValueError(f"invert: layer should be the name of a submodule of the model, got {layer!r}; "
                         f"valid names: {names}")
    return modules[layer]


def activations(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output of submodule ``layer`` (a name from ``model.named_modules()``) when ``model``
    runs on ``x``; the forward stops after that layer. Differentiable in ``x``."""
    module = _find_layer(model, layer)
    captured = []

    def hook(_module, _inputs, output):
        captured.append(output)
        raise _Reached

    handle = module.register_forward_hook(hook)
    try:
        model(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"invert: layer {layer!r} did not run in the model's forward")
    out = captured[0]
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"invert: layer {layer!r} returned {type(out).__name__}, not a tensor")
    return out


def alpha_norm(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``Σ |x|^α`` per sample, shape ``[B]``."""
    return x.abs().pow(alpha).flatten(1).sum(1)


def total_variation(x: torch.Tensor, beta: float) -> torch.Tensor:
    """``TV^β`` per sample, shape ``[B]``: for ``[B, ..., H, W]`` inputs the sum over pixels of
    ``(dx² + dy²)^(β/2)`` with forward differences (the last row and column use the differences
    that exist); for ``[B, D]`` inputs ``Σ |x[k+1] - x[k]|^β``."""
    if x.dim() >= 3:
        dx = x[..., :-1, 1:] - x[..., :-1, :-1]
        dy = x[..., 1:, :-1] - x[..., :-1, :-1]
        return (dx.square() + dy.square()).pow(beta / 2).flatten(1).sum(1)
    return (x[:, 1:] - x[:, :-1]).abs().pow(beta).sum(1)


@dataclass
class InversionResult:
    """What :func:`invert` found.

    Attributes:
        x: the reconstructions, shaped like the input.
        feature_error: ``||φ(x_b) - φ0_b|| / ||φ0_b||`` per sample.
        history: the batch loss at every iteration.
        iterations: iterations run (fewer than asked when the tolerance stopped it).
        psnr: when ``x0`` was given, ``10 log10(range² / MSE)`` per sample (range: the box, or the
            range of ``x0``); else None.
        input_error: when ``x0`` was given, ``||x_b - x0_b|| / ||x0_b||`` per sample; else None.
    """

    x: torch.Tensor
    feature_error: torch.Tensor
    history: list[float] = field(default_factory=list)
    iterations: int = 0
    psnr: torch.Tensor | None = None
    input_error: torch.Tensor | None = None


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


@torch.no_grad()
def _quality(model: nn.Module, layer: str, rec: torch.Tensor, target: torch.Tensor, x0: torch.Tensor | None,
             bounds: tuple[float, float] | None):
    """``(feature_error, psnr, input_error)`` of the reconstruction ``rec`` (the last two None
    without ``x0``); PSNR uses ``bounds`` or ``x0``'s range."""
    tiny = torch.finfo(rec.dtype).tiny
    feature_error = _per_sample_norm(activations(model, layer, rec) - target) / _per_sample_norm(target).clamp_min(tiny)
    if x0 is None:
        return feature_error, None, None
    span = (bounds[1] - bounds[0]) if bounds is not None else (x0.max() - x0.min()).item()
    mse = (rec - x0).flatten(1).square().mean(1).clamp_min(tiny)
    input_error = _per_sample_norm(rec - x0) / _per_sample_norm(x0).clamp_min(tiny)
    return feature_error, 10 * torch.log10(span**2 / mse), input_error


def invert(model: nn.Module, layer: str, target: torch.Tensor | None = None, x0: torch.Tensor | None = None, *,
           input_shape: tuple[int, ...] | None = None, init: torch.Tensor | None = None, steps: int = 500,
           optimizer: str = "adam", lr: float = 0.05, alpha: float = 6.0, lambda_alpha: float = 0.0,
           beta: float = 2.0, lambda_tv: float = 0.0, jitter: int = 0, bounds: tuple[float, float] | None = None,
           tol: float = 1e-9, progress: bool = False, seed: int | None = None) -> InversionResult:
    """Reconstruct a batch of inputs whose activations at ``layer`` match ``target``.

    Args:
        model: any ``nn.Module``; it is not changed (put it in eval mode first).
        layer: a submodule name from ``model.named_modules()``.
        target: the activations to match, ``[B, ...]``; or None to use those of ``x0``.
        x0: the true inputs, when known: their activations are the target (if ``target`` is None)
            and the result reports PSNR and input error against them.
        input_shape: shape of one input; needed when only ``target`` is given.
        init: the starting point ``[B, *input_shape]``; default small Gaussian noise (centred in
            ``bounds`` when given).
        steps: iterations at most. optimizer: ``"adam"`` or ``"lbfgs"``. lr: its learning rate.
        alpha, lambda_alpha: the α-norm prior ``λ_α Σ |x|^α``.
        beta, lambda_tv: the total-variation prior ``λ_TV TV^β(x)``.
        jitter: images only: each step shifts the input by up to ``jitter`` pixels (a random roll)
            before the model sees it.
        bounds: ``(low, high)`` box of the input range, enforced by projection after each step.
        tol: stop when the batch loss changes in one iteration by at most ``tol`` times its first
            value (0: run all ``steps`` unless the loss stops changing at all).
        progress: show a tqdm progress bar.
        seed: seeds the initial point and the jitter (torch's global generator otherwise).

    Returns:
        An :class:`InversionResult`.
    """
    _find_layer(model, layer)
    if optimizer not in ("adam", "lbfgs"):
        raise ValueError(f"invert: optimizer should be 'adam' or 'lbfgs', got {optimizer!r}")
    for name, value in (("steps", steps), ("jitter", jitter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "steps" else 0):
            raise ValueError(f"invert: {name} should be an integer >= {1 if name == 'steps' else 0}, got {value!r}")
    for name, value in (("lr", lr), ("alpha", alpha), ("beta", beta)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"invert: {name} should be a positive number, got {value!r}")
    for name, value in (("lambda_alpha", lambda_alpha), ("lambda_tv", lambda_tv), ("tol", tol)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"invert: {name} should be a number >= 0, got {value!r}")
    if bounds is not None and not (len(bounds) == 2 and bounds[0] < bounds[1]):
        raise ValueError(f"invert: bounds should be (low, high) with low < high, got {bounds!r}")
    if target is None and x0 is None:
        raise ValueError("invert: give target (activations to match) or x0 (inputs whose activations to match)")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if target is None:
        with torch.no_grad():
            target = activations(model, layer, x0)
    target = target.detach()
    if init is None:
        shape = tuple(x0.shape[1:]) if x0 is not None else input_shape
        if shape is None:
            raise ValueError("invert: input_shape is needed when neither x0 nor init is given")
        ref = x0 if x0 is not None else target
        init = 1e-2 * torch.randn((target.shape[0], *shape), generator=gen).to(dtype=ref.dtype, device=ref.device)
        if bounds is not None:
            init = init + (bounds[0] + bounds[1]) / 2
    if init.shape[0] != target.shape[0]:
        raise ValueError(f"invert: init has {init.shape[0]} samples but target has {target.shape[0]}")
    x = init.detach().clone().requires_grad_()
    target_norm2 = _per_sample_norm(target).square().clamp_min(torch.finfo(target.dtype).tiny)

    def per_sample_loss(inp):
        if jitter and inp.dim() >= 3:
            shifts = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist()
            inp = torch.roll(inp, shifts=shifts, dims=(-2, -1))
        phi = activations(model, layer, inp)
        loss = (phi - target).flatten(1).square().sum(1) / target_norm2
        if lambda_alpha:
            loss = loss + lambda_alpha * alpha_norm(inp, alpha)
        if lambda_tv:
            loss = loss + lambda_tv * total_variation(inp, beta)
        return loss

    opt = torch.optim.Adam([x], lr=lr) if optimizer == "adam" else \
        torch.optim.LBFGS([x], lr=lr, max_iter=1, max_eval=25, history_size=20, line_search_fn="strong_wolfe",
                          tolerance_grad=0.0, tolerance_change=0.0)
    history: list[float] = []
    from tqdm import tqdm  # noqa: PLC0415

    bar = tqdm(range(steps), desc=f"inverting {layer}", disable=not progress)
    iterations = 0
    for _ in bar:
        def closure():
            opt.zero_grad(set_to_none=True)
            loss = per_sample_loss(x).sum()
            loss.backward()
            return loss

        loss = opt.step(closure)
        if bounds is not None:
            with torch.no_grad():
                x.clamp_(bounds[0], bounds[1])
        iterations += 1
        history.append(float(loss.detach()))
        bar.set_postfix(loss=f"{history[-1]:.3g}")
        if len(history) > 1 and abs(history[-2] - history[-1]) <= tol * abs(history[0]):
            break
    bar.close()
    rec = x.detach()
    feature_error, psnr, input_error = _quality(model, layer, rec, target, x0, bounds)
    return InversionResult(rec, feature_error, history, iterations, psnr, input_error)


class Decoder(nn.Module):
    """A small decoder from activations of shape ``feature_shape`` back to inputs of shape
    ``input_shape`` (one sample each): convolutional when both are images (activations resized to
    the input's height and width, then three 3x3 convolutions), an MLP otherwise (reshaped to
    the input's shape)."""

    def __init__(self, feature_shape: tuple[int, ...], input_shape: tuple[int, ...], hidden: int = 64):
        super().__init__()
        self.feature_shape = tuple(feature_shape)
        self.input_shape = tuple(input_shape)
        self.conv = len(self.feature_shape) == 3 and len(self.input_shape) == 3
        if self.conv:
            c_in, c_out = self.feature_shape[0], self.input_shape[0]
            self.net = nn.Sequential(nn.Conv2d(c_in, hidden, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(hidden, c_out, 3, padding=1))
        else:
            d_in, d_out = math.prod(self.feature_shape), math.prod(self.input_shape)
            self.net = nn.Sequential(nn.Linear(d_in, 4 * hidden), nn.ReLU(), nn.Linear(4 * hidden, 4 * hidden),
                                     nn.ReLU(), nn.Linear(4 * hidden, d_out))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.conv:
            size = self.input_shape[1:]
            if tuple(features.shape[2:]) != size:
                features = nn.functional.interpolate(features, size=size, mode="bilinear", align_corners=False)
            return self.net(features)
        return self.net(features.flatten(1)).view(features.shape[0], *self.input_shape)


@dataclass
class DecoderResult:
    """What :func:`fit_decoder` trained: the decoder, the mean training loss per epoch, and
    :meth:`evaluate` to reconstruct held-out inputs (an :class:`InversionResult`)."""

    decoder: Decoder
    model: nn.Module
    layer: str
    history: list[float] = field(default_factory=list)

    @torch.no_grad()
    def evaluate(self, x0: torch.Tensor, bounds: tuple[float, float] | None = None) -> InversionResult:
        """Reconstruct ``x0`` from its activations; PSNR uses ``bounds`` (or ``x0``'s range)."""
        target = activations(self.model, self.layer, x0)
        rec = self.decoder(target)
        if bounds is not None:
            rec = rec.clamp(bounds[0], bounds[1])
        feature_error, psnr, input_error = _quality(self.model, self.layer, rec, target, x0, bounds)
        return InversionResult(rec, feature_error, psnr=psnr, input_error=input_error)


def fit_decoder(model: nn.Module, layer: str, data: torch.Tensor, *, epochs: int = 30, batch_size: int = 64,
                lr: float = 1e-3, hidden: int = 64, progress: bool = False, seed: int | None = None) -> DecoderResult:
    """Train a :class:`Decoder` from the activations of ``layer`` back to the inputs ``data``
    (``[N, ...]``) by mean squared error with Adam; ``model`` is not changed (put it in eval mode).

    Returns:
        A :class:`DecoderResult`; ``result.evaluate(held_out)`` reports the reconstruction quality.
    """
    _find_layer(model, layer)
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("hidden", hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"fit_decoder: {name} should be a positive integer, got {value!r}")
    if not isinstance(data, torch.Tensor) or data.dim() < 2 or data.shape[0] < 1:
        raise ValueError("fit_decoder: data should be a tensor [N, ...] with N >= 1")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        features = torch.cat([activations(model, layer, chunk) for chunk in torch.split(data, 512)])
    if seed is not None:
        torch.manual_seed(seed)
    decoder = Decoder(tuple(features.shape[1:]), tuple(data.shape[1:]), hidden).to(dtype=data.dtype,
                                                                                    device=data.device)
    opt = torch.optim.Adam(decoder.parameters(), lr=lr)
    from tqdm import tqdm  # noqa: PLC0415

    history = []
    for _ in tqdm(range(epochs), desc=f"decoder for {layer}", disable=not progress):
        order = torch.randperm(len(data), generator=gen)
        total = 0.0
        for idx in torch.split(order, batch_size):
            loss = (decoder(features[idx]) - data[idx]).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / len(data))
    decoder.eval()
    return DecoderResult(decoder, model, layer, history)
