"""Inverting networks that are not invertible: reconstruct inputs from a layer's activations by
optimization with image priors (Mahendran & Vedaldi, 2015, :func:`invert`) or by a trained
decoder (:func:`fit_decoder`). Docs: docs/inversion.md.

The objective, per sample ``b``::

    ||(φ(x_b) - φ0_b) / s_b||²  +  λ_α ||x_b||_α^α  +  λ_TV TV^β(x_b)

with ``φ`` the activations of ``layer`` (captured by a forward hook), ``s_b = ||φ0_b||`` (or
``sqrt(n)``, ``n`` the number of activations of one sample, for a sample whose target is exactly
zero, so that its term is the mean squared activation instead of a division by zero),
``||x||_α^α = Σ |x|^α`` and ``TV^β(x) = Σ_{i,j} ((x[i, j+1] - x[i, j])² + (x[i+1, j] - x[i, j])²)^(β/2)``
over the last two dimensions of images (``Σ_k |x[k+1] - x[k]|^β`` along the last dimension of
vectors). The gradient of the sum of the per-sample losses is taken with respect to the input
only. With Adam every sample is solved independently (its own stop rule, its own iteration
count); L-BFGS is a batch method (one line search for the whole batch).

The model is left exactly as it was: it runs in eval mode unless ``train_mode=True`` (its
submodules' flags restored after), what it writes to buffers goes to copies
(:func:`invkernels._state.scratch_buffers`), and no parameter's ``.grad`` or ``requires_grad``
is touched.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from invkernels import _state
from invkernels._validation import check_int
from invkernels.nn.sequential import InvertibleSequential


class _Reached(Exception):
    """Raised by the hook to stop the forward once the layer has run."""


def _find_layer(model: nn.Module, layer: str, owner: str) -> nn.Module:
    modules = dict(model.named_modules())
    if not isinstance(layer, str) or layer not in modules or layer == "":
        names = ", ".join(repr(n) for n in modules if n) or "(none)"
        raise ValueError(f"{owner}: layer should be the name of a submodule of the model, got {layer!r}; "
                         f"valid names: {names}")
    return modules[layer]


def _activations(model: nn.Module, layer: str, x: torch.Tensor, owner: str) -> torch.Tensor:
    module = _find_layer(model, layer, owner)
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
        raise ValueError(f"{owner}: layer {layer!r} did not run in the model's forward")
    out = captured[0]
    if isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out):
        # An invertible block's (y, logdet): its activations are y.
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{owner}: layer {layer!r} returned {type(out).__name__}, not a tensor")
    return out


def activations(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output of submodule ``layer`` (a name from ``model.named_modules()``; for an invertible
    block, which returns ``(y, logdet)``, its ``y``) when ``model`` runs on ``x``; the forward stops
    after that layer. Differentiable in ``x``. The model runs as
    it is (its train/eval mode, its buffers): :func:`invert` and :func:`fit_decoder` call this
    with the model in eval mode and its buffers swapped for copies."""
    return _activations(model, layer, x, "activations")


@contextlib.contextmanager
def _untouched(model: nn.Module, train_mode: bool):
    """The model in eval mode (unless ``train_mode``) with its buffers swapped for copies, for the
    block; its flags and buffers are put back after. Memory-free chains inside it store their
    activations meanwhile: the forward stops at the layer, whose output must carry the gradient
    to the input (a memory-free run computes its blocks without recording)."""
    chains = {m: m.memory_free for m in model.modules() if isinstance(m, InvertibleSequential) and m.memory_free}
    with _state.eval_mode(model, enabled=not train_mode), _state.scratch_buffers(model):
        for m in chains:
            m.memory_free = False
        try:
            yield model
        finally:
            for m, setting in chains.items():
                m.memory_free = setting


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
    """What :func:`invert` (or :meth:`DecoderResult.evaluate`) found.

    Attributes:
        x: the reconstructions, shaped like the input.
        feature_error: ``||φ(x_b) - φ0_b|| / ||φ0_b||`` per sample (``||φ(x_b)|| / sqrt(n)``, the
            root mean square activation, for a sample whose target is zero).
        history: ``[T, B]`` losses, ``T = iterations.max()``: ``history[t, b]`` is sample ``b``'s
            loss at the start of iteration ``t`` (from ``t = iterations[b]`` on, the loss at its
            final point, where it no longer moves). None for a decoder.
        iterations: ``[B]`` int64, the iterations each sample ran (fewer than ``steps`` when the
            tolerance stopped it; all equal with L-BFGS). None for a decoder.
        psnr: when ``x0`` was given, ``10 log10(range² / MSE)`` per sample (range: the box when
            both bounds are finite, else the range of ``x0``); else None.
        input_error: when ``x0`` was given, ``||x_b - x0_b|| / ||x0_b||`` per sample; else None.
    """

    x: torch.Tensor
    feature_error: torch.Tensor
    history: torch.Tensor | None = None
    iterations: torch.Tensor | None = None
    psnr: torch.Tensor | None = None
    input_error: torch.Tensor | None = None


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def _target_scale(target: torch.Tensor) -> torch.Tensor:
    """``s_b``, ``[B]``: ``||target_b||``, computed as ``m ||target_b / m||`` with ``m`` its largest
    magnitude so that squares neither overflow nor underflow; ``sqrt(n)`` where ``target_b`` is 0."""
    flat = target.flatten(1)
    peak = flat.abs().amax(1)
    nonzero = peak > 0
    peak = torch.where(nonzero, peak, torch.ones_like(peak))
    norm = (flat / peak[:, None]).norm(dim=1) * peak
    return torch.where(nonzero, norm, torch.full_like(norm, math.sqrt(flat.shape[1])))


def _feature_term(phi: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``||(φ_b - φ0_b) / s_b||²`` per sample."""
    return ((phi - target).flatten(1) / scale[:, None]).square().sum(1)


def _check_bounds(owner: str, bounds) -> tuple[float, float] | None:
    """``bounds`` as two floats (either may be infinite), or None; a ValueError when it is not a
    pair of numbers with low < high."""
    if bounds is None:
        return None
    ok = isinstance(bounds, (tuple, list)) and len(bounds) == 2 and \
        all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
    if not ok or math.isnan(bounds[0]) or math.isnan(bounds[1]) or not bounds[0] < bounds[1]:
        raise ValueError(f"{owner}: bounds should be (low, high), numbers with low < high (either may be "
                         f"infinite), got {bounds!r}")
    return float(bounds[0]), float(bounds[1])


def _check_batch(owner: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 1 or t.shape[0] < 1:
        described = f"{t.dtype} tensor of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{owner}: {name} should be a floating-point tensor [B, ...] with B >= 1, got {described}")
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"{owner}: {name} should be finite, got NaN or Inf in sample(s) {bad}")


@torch.no_grad()
def _quality(model: nn.Module, layer: str, rec: torch.Tensor, target: torch.Tensor, x0: torch.Tensor | None,
             bounds: tuple[float, float] | None, owner: str):
    """``(feature_error, psnr, input_error)`` of the reconstruction ``rec`` (the last two None
    without ``x0``); PSNR uses the box of ``bounds`` when both are finite, else ``x0``'s range."""
    tiny = torch.finfo(rec.dtype).tiny
    feature_error = _feature_term(_activations(model, layer, rec, owner), target, _target_scale(target)).sqrt()
    if x0 is None:
        return feature_error, None, None
    finite_box = bounds is not None and math.isfinite(bounds[0]) and math.isfinite(bounds[1])
    span = (bounds[1] - bounds[0]) if finite_box else (x0.max() - x0.min()).item()
    mse = (rec - x0).flatten(1).square().mean(1).clamp_min(tiny)
    input_error = _per_sample_norm(rec - x0) / _per_sample_norm(x0).clamp_min(tiny)
    return feature_error, 10 * torch.log10(span**2 / mse), input_error


def invert(model: nn.Module, layer: str, target: torch.Tensor | None = None, x0: torch.Tensor | None = None, *,
           input_shape: tuple[int, ...] | None = None, init: torch.Tensor | None = None, steps: int = 500,
           optimizer: str = "adam", lr: float = 0.05, alpha: float = 6.0, lambda_alpha: float = 0.0,
           beta: float = 2.0, lambda_tv: float = 0.0, jitter: int = 0, bounds: tuple[float, float] | None = None,
           tol: float = 1e-9, progress: bool = False, seed: int | None = None,
           train_mode: bool = False) -> InversionResult:
    """Reconstruct a batch of inputs whose activations at ``layer`` match ``target``.

    The model is not changed: it runs in eval mode (``train_mode=True`` runs it in train mode:
    dropout active, BatchNorm on batch statistics) and every submodule's flag is restored after;
    what it writes to buffers goes to copies; gradients are taken with respect to the input only,
    so no parameter's ``.grad`` or ``requires_grad`` changes.

    Args:
        model: any ``nn.Module``.
        layer: a submodule name from ``model.named_modules()``.
        target: the activations to match, exactly the shape of ``layer``'s output for the input
            batch (batch size included); finite, and not zero in every sample (a sample whose
            target is zero is matched in mean square, see the module docstring); or None to use
            the activations of ``x0``.
        x0: the true inputs ``[B, ...]``, when known: their activations are the target (if
            ``target`` is None) and the result reports PSNR and input error against them.
        input_shape: shape of one input; needed when only ``target`` is given.
        init: the starting point, shaped like ``x0`` (``[B, *input_shape]``); default small
            Gaussian noise (std 0.01) around the midpoint of ``bounds`` when both are finite, else
            around the point of the box nearest 0; the start is projected onto the box.
        steps: iterations at most. optimizer: ``"adam"`` or ``"lbfgs"``. lr: its learning rate.
        alpha, lambda_alpha: the α-norm prior ``λ_α Σ |x|^α``.
        beta, lambda_tv: the total-variation prior ``λ_TV TV^β(x)``.
        jitter: images only: each step shifts the input by up to ``jitter`` pixels (a random roll,
            the same for the whole batch) before the model sees it.
        bounds: ``(low, high)`` box of the input range, either may be infinite, enforced by
            projection after each step.
        tol: Adam: a sample stops (its input no longer changes) once its loss changes in one
            iteration by at most ``tol`` times its first value; the others go on. L-BFGS, a batch
            method: the whole batch stops when the batch loss (the sum) does so. 0: run all
            ``steps`` unless the loss stops changing at all.
        progress: show a tqdm progress bar.
        seed: seeds the initial point and the jitter (torch's global generator otherwise). With
            Adam and the same ``init``, a batch gives what each sample gives alone when
            ``jitter=0`` or ``seed`` is fixed (in eval mode, where samples do not interact).
        train_mode: run the model in train mode instead of eval mode.

    Returns:
        An :class:`InversionResult`.
    """
    owner = "invert"
    _find_layer(model, layer, owner)
    if optimizer not in ("adam", "lbfgs"):
        raise ValueError(f"invert: optimizer should be 'adam' or 'lbfgs', got {optimizer!r}")
    check_int(owner, "steps", steps)
    check_int(owner, "jitter", jitter, minimum=0)
    for name, value in (("lr", lr), ("alpha", alpha), ("beta", beta)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"invert: {name} should be a positive number, got {value!r}")
    for name, value in (("lambda_alpha", lambda_alpha), ("lambda_tv", lambda_tv), ("tol", tol)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"invert: {name} should be a number >= 0, got {value!r}")
    bounds = _check_bounds(owner, bounds)
    if target is None and x0 is None:
        raise ValueError("invert: give target (activations to match) or x0 (inputs whose activations to match)")
    given = {name: t for name, t in (("target", target), ("x0", x0), ("init", init)) if t is not None}
    for name, t in given.items():
        _check_batch(owner, name, t)
    sizes = {name: t.shape[0] for name, t in given.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise ValueError(f"invert: target, x0 and init should have the same batch size, got {listed}")
    if x0 is not None and init is not None and init.shape != x0.shape:
        raise ValueError(f"invert: init should have the shape of x0, {list(x0.shape)}, got {list(init.shape)}")
    reference = x0 if x0 is not None else init
    if input_shape is not None:
        input_shape = tuple(input_shape)
        if reference is not None and input_shape != tuple(reference.shape[1:]):
            name = "x0" if x0 is not None else "init"
            raise ValueError(f"invert: input_shape should be the shape of one sample of {name}, "
                             f"{list(reference.shape[1:])}, got {list(input_shape)}")
    elif reference is None:
        raise ValueError("invert: input_shape is needed when neither x0 nor init is given")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if init is None:
        shape = (next(iter(sizes.values())), *(tuple(x0.shape[1:]) if x0 is not None else input_shape))
        ref = x0 if x0 is not None else target
        centre = 0.0
        if bounds is not None:
            finite = math.isfinite(bounds[0]) and math.isfinite(bounds[1])
            centre = (bounds[0] + bounds[1]) / 2 if finite else min(max(0.0, bounds[0]), bounds[1])
        init = 1e-2 * torch.randn(shape, generator=gen).to(dtype=ref.dtype, device=ref.device) + centre
    x = init.detach().clone()
    if bounds is not None:
        x.clamp_(bounds[0], bounds[1])
    x.requires_grad_()

    with _untouched(model, train_mode):
        with torch.no_grad():
            if target is None:
                target = _activations(model, layer, x0, owner)
                _check_batch(owner, "target (the activations of x0)", target)
            else:
                expected = _activations(model, layer, x.detach(), owner).shape
                if target.shape != expected:
                    raise ValueError(f"invert: target should have the shape of the output of layer {layer!r} for "
                                     f"the input batch, {list(expected)}, got {list(target.shape)}")
        target = target.detach()
        scale = _target_scale(target)
        if not (target != 0).any():
            raise ValueError("invert: target is zero in every sample, so ||φ(x) - φ0|| / ||φ0|| is undefined "
                             "(a batch in which only some samples are zero is fine)")
        history, iterations = _optimize(model, layer, x, target, scale, owner, steps=steps, optimizer=optimizer,
                                        lr=lr, alpha=alpha, lambda_alpha=lambda_alpha, beta=beta,
                                        lambda_tv=lambda_tv, jitter=jitter, bounds=bounds, tol=tol,
                                        progress=progress, gen=gen)
        rec = x.detach()
        feature_error, psnr, input_error = _quality(model, layer, rec, target, x0, bounds, owner)
    return InversionResult(rec, feature_error, history, iterations, psnr, input_error)


def _warn_if_stuck(owner: str, layer: str, grad: torch.Tensor, losses: torch.Tensor) -> None:
    """A RuntimeWarning naming the samples whose loss is positive but whose gradient at the starting
    point is exactly zero: the optimizer cannot move them, and they would stop at once, at their
    starting point, with nothing said."""
    stuck = (grad.flatten(1).abs().amax(1) == 0) & (losses > 0)
    if bool(stuck.any()):
        samples = stuck.nonzero().flatten().tolist()
        warnings.warn(f"{owner}: the gradient at the starting point is exactly zero for samples {samples} (for "
                      f"example every ReLU before layer {layer!r} inactive there), so the optimization cannot move "
                      f"them; start elsewhere with init= (or another seed=)", RuntimeWarning, stacklevel=3)


def _optimize(model: nn.Module, layer: str, x: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, owner: str,
              *, steps: int, optimizer: str, lr: float, alpha: float, lambda_alpha: float, beta: float,
              lambda_tv: float, jitter: int, bounds: tuple[float, float] | None, tol: float, progress: bool,
              gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimize the per-sample losses over ``x`` in place; ``(history [T, B], iterations [B])``."""
    from tqdm import tqdm  # noqa: PLC0415

    def per_sample_loss(inp):
        if jitter and inp.dim() >= 3:
            shifts = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist()
            inp = torch.roll(inp, shifts=shifts, dims=(-2, -1))
        loss = _feature_term(_activations(model, layer, inp, owner), target, scale)
        if lambda_alpha:
            loss = loss + lambda_alpha * alpha_norm(inp, alpha)
        if lambda_tv:
            loss = loss + lambda_tv * total_variation(inp, beta)
        return loss

    def evaluate():
        """The per-sample losses at ``x``; sets ``x.grad`` to the gradient of their sum."""
        with torch.enable_grad():
            losses = per_sample_loss(x)
            (x.grad,) = torch.autograd.grad(losses.sum(), x)
        return losses.detach()

    batch = x.shape[0]
    iterations = torch.zeros(batch, dtype=torch.int64, device=x.device)
    active = torch.ones(batch, dtype=torch.bool, device=x.device)
    rows: list[torch.Tensor] = []
    bar = tqdm(range(steps), desc=f"inverting {layer}", disable=not progress)
    if optimizer == "adam":
        opt = torch.optim.Adam([x], lr=lr)
        keep = active.view(batch, *([1] * (x.dim() - 1)))
        every = True
        for step in bar:
            losses = evaluate()
            if step == 0:
                _warn_if_stuck(owner, layer, x.grad, losses)
            before = None if every else x.detach().clone()
            opt.step()
            with torch.no_grad():
                if bounds is not None:
                    x.clamp_(bounds[0], bounds[1])
                if before is not None:
                    # A sample that has stopped keeps its point; Adam moved the whole tensor.
                    x.copy_(torch.where(keep, x, before))
            iterations += active
            rows.append(losses)
            if len(rows) > 1:
                active &= (rows[-2] - losses).abs() > tol * rows[0].abs()
                every = bool(active.all())
            if progress:
                bar.set_postfix(loss=f"{losses.sum().item():.3g}", active=int(active.sum()))
            if not every and not active.any():
                break
    else:
        opt = torch.optim.LBFGS([x], lr=lr, max_iter=1, max_eval=25, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=0.0, tolerance_change=0.0)
        evaluations: list[torch.Tensor] = []
        sums: list[float] = []

        def closure():
            evaluations.append(evaluate())
            if len(rows) == 0 and len(evaluations) == 1:
                _warn_if_stuck(owner, layer, x.grad, evaluations[0])
            return evaluations[-1].sum()

        for _ in bar:
            evaluations.clear()
            opt.step(closure)
            if bounds is not None:
                with torch.no_grad():
                    x.clamp_(bounds[0], bounds[1])
            iterations += 1
            rows.append(evaluations[0])
            sums.append(float(evaluations[0].sum()))
            if progress:
                bar.set_postfix(loss=f"{sums[-1]:.3g}")
            if len(sums) > 1 and abs(sums[-2] - sums[-1]) <= tol * abs(sums[0]):
                break
    bar.close()
    x.grad = None
    return torch.stack(rows), iterations


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
    :meth:`evaluate` to reconstruct held-out inputs (an :class:`InversionResult`). ``train_mode``
    is the mode the model ran in to make the decoder's training features; evaluation uses it too."""

    decoder: Decoder
    model: nn.Module
    layer: str
    history: list[float] = field(default_factory=list)
    train_mode: bool = False

    @torch.no_grad()
    def evaluate(self, x0: torch.Tensor, bounds: tuple[float, float] | None = None) -> InversionResult:
        """Reconstruct ``x0`` (``[N, *decoder.input_shape]``) from its activations, clamped to
        ``bounds`` when given; PSNR uses the box when both bounds are finite, else ``x0``'s range.
        The model is left as it was (eval mode unless ``train_mode``, buffers on copies)."""
        owner = "DecoderResult.evaluate"
        bounds = _check_bounds(owner, bounds)
        _check_batch(owner, "x0", x0)
        if tuple(x0.shape[1:]) != self.decoder.input_shape:
            raise ValueError(f"{owner}: x0 should be [N, {', '.join(map(str, self.decoder.input_shape))}] like the "
                             f"decoder's training data, got {list(x0.shape)}")
        with _untouched(self.model, self.train_mode):
            target = _activations(self.model, self.layer, x0, owner)
            rec = self.decoder(target)
            if bounds is not None:
                rec = rec.clamp(bounds[0], bounds[1])
            feature_error, psnr, input_error = _quality(self.model, self.layer, rec, target, x0, bounds, owner)
        return InversionResult(rec, feature_error, psnr=psnr, input_error=input_error)


def fit_decoder(model: nn.Module, layer: str, data: torch.Tensor, *, epochs: int = 30, batch_size: int = 64,
                lr: float = 1e-3, hidden: int = 64, progress: bool = False, seed: int | None = None,
                train_mode: bool = False) -> DecoderResult:
    """Train a :class:`Decoder` from the activations of ``layer`` back to the inputs ``data``
    (``[N, ...]``, finite) by mean squared error with Adam.

    The model is not changed: its activations are computed without gradients, in eval mode
    (``train_mode=True``: in train mode), with its buffers swapped for copies and every
    submodule's flag restored after.

    Returns:
        A :class:`DecoderResult`; ``result.evaluate(held_out)`` reports the reconstruction quality.
    """
    owner = "fit_decoder"
    _find_layer(model, layer, owner)
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("hidden", hidden)):
        check_int(owner, name, value)
    _check_batch(owner, "data", data)
    if data.dim() < 2:
        raise ValueError(f"fit_decoder: data should be a tensor [N, ...] of at least 2 dimensions, got "
                         f"shape {list(data.shape)}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad(), _untouched(model, train_mode):
        features = torch.cat([_activations(model, layer, chunk, owner) for chunk in torch.split(data, 512)])
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
    return DecoderResult(decoder, model, layer, history, train_mode)
