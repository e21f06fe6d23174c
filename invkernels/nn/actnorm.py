"""ActNorm (Glow): a per-channel affine layer initialized from the data, on the fused ActNorm ops."""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import nn

from invkernels import _backend, _distributed, _validation
from invkernels.ops import actnorm as F


class ActNorm(nn.Module):
    """Per-channel ``y = (x + bias) * exp(log_scale)`` with ``logdet = S * Σ log_scale``.

    Data-dependent initialization (``data_init=True``, Glow's): the first call in training mode,
    in either direction, sets ``bias`` and ``log_scale`` from its batch so that this call's output
    has zero mean and unit standard deviation per channel: for ``forward(x)`` the output ``y``
    (``bias = -mean(x)``, ``log_scale = -log std(x)``), for ``inverse(y)`` (a flow first used
    latent→data, as normflows does) the output ``x`` (``log_scale = log std(y)``,
    ``bias = mean(y) / std(y)``). The statistics are computed in float64 whatever the input dtype.
    After that both are ordinary parameters. A channel whose standard deviation is at most ``eps``
    (constant in this batch) is centred but not scaled (its ``log_scale`` is 0), with a warning; a
    batch with NaN or Inf values raises ValueError. A call in eval mode before initialization
    raises RuntimeError (evaluation never initializes).

    Whether the initialization has happened is the buffer ``initialized``, saved in the state dict;
    a state dict that holds ``bias`` or ``log_scale`` but no ``initialized`` (e.g. loaded with
    ``strict=False``) counts as initialized. :attr:`is_initialized` tells, :meth:`mark_initialized`
    keeps the current parameters as they are. With ``data_init=False`` the layer starts as the
    identity and is never initialized from data.

    Distributed training: when a process group is initialized (or ``process_group`` is given),
    the statistics are merged over the group's ranks (count, mean and sum of squared deviations in
    float64), so every rank gets the parameters a single process would compute from the
    concatenated batch, whatever the shard sizes. Every rank must then make its first training call
    together (as data-parallel training does). Pass ``process_group=dist.new_group([rank])`` per rank
    to initialize from the local batch only. Under FSDP2 (``fully_shard``) the values are written
    to the parameter shards too.

    Args:
        channels: number of channels ``C``.
        eps: standard deviation at or below which a channel counts as constant at initialization.
        backend: ``"cpp"``, ``"triton"``, ``"reference"`` or None for ``invkernels.get_backend()``.
        data_init: initialize from the first training batch (default) or start as the identity.
        process_group: the group whose ranks share the initialization (default: the default
            group when torch.distributed is initialized, else none).

    ``forward(x) -> (y, logdet)`` for ``x`` of shape ``[B, C, *spatial]``; ``inverse(y) -> x``.
    """

    results_tested = True  # the chain trusts its memory-free results (protocol.checked_result)

    # The `initialized` flag is written by the data-dependent initialization of a forward only; the
    # memory-free backward (inverse_backward) never writes it, so it need not be copied (_state).
    buffers_read_only = True

    # forward and inverse take ``context=`` like every block, and do not use it: a chain passes
    # none to this block (protocol.takes_context).
    uses_context = False

    def __init__(self, channels: int, eps: float = 1e-6, backend: str | None = None, *, data_init: bool = True,
                 process_group=None):
        super().__init__()
        _validation.check_int("ActNorm", "channels", channels)
        if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"ActNorm: eps should be a positive finite number, got {eps!r}")
        if not isinstance(data_init, bool):
            raise ValueError(f"ActNorm: data_init should be True or False, got {data_init!r}")
        if backend is not None:
            F.prepare(_backend.check_backend(backend))
        self.channels = channels
        self.eps = float(eps)
        self.backend = backend
        self.data_init = data_init
        if process_group is not None and not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
            raise ValueError(f"ActNorm: process_group should be None or a torch.distributed ProcessGroup (e.g. "
                             f"dist.new_group(ranks)), got {process_group!r}")
        self.process_group = process_group
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(not data_init))
        self._initialized = not data_init

    @property
    def is_initialized(self) -> bool:
        """Whether the parameters hold their data-dependent initialization (or were loaded, or marked)."""
        return self._initialized

    @torch.no_grad()
    def mark_initialized(self) -> None:
        """Keep the current parameters: no data-dependent initialization will overwrite them."""
        self.initialized.fill_(True)
        self._initialized = True

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "initialized" in state_dict:
            self._initialized = bool(self.initialized)
        elif prefix + "bias" in state_dict or prefix + "log_scale" in state_dict:
            self.mark_initialized()

    def _check(self, x: torch.Tensor, name: str) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ActNorm: {name} should be a tensor, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"ActNorm: {name} should have shape [B, {self.channels}, ...], got {list(x.shape)}")

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, inverse: bool = False) -> None:
        """Set the parameters from the batch ``x`` (what the first training-mode call does): the
        forward's input, or with ``inverse=True`` the inverse's input (the latent side)."""
        self._check(x, "y" if inverse else "x")
        if not x.is_floating_point():
            raise ValueError(f"ActNorm: the initialization batch should be floating-point, got {x.dtype}")
        flat = x.detach().transpose(0, 1).reshape(self.channels, -1).to(torch.float64)
        count, mean, m2 = _distributed.channel_moments(flat, _distributed.sync_group(self.process_group))
        if count < 2:
            raise ValueError(f"ActNorm: data-dependent initialization needs at least 2 values per channel, "
                             f"got {count} (x of shape {list(x.shape)})")
        std = (m2 / count).sqrt()
        bad = ~(torch.isfinite(mean) & torch.isfinite(std))
        if bool(bad.any()):
            raise ValueError(f"ActNorm: the initialization batch has NaN or Inf values in channel(s) "
                             f"{bad.nonzero().flatten().tolist()}; the parameters were left uninitialized")
        constant = std <= self.eps
        if bool(constant.any()):
            warnings.warn(f"ActNorm: channel(s) {constant.nonzero().flatten().tolist()} have standard deviation "
                          f"<= eps={self.eps:g} in the initialization batch; they are centred but not scaled "
                          f"(log_scale 0)", RuntimeWarning, stacklevel=3)
        std = torch.where(constant, torch.ones_like(std), std)
        if inverse:
            log_scale, bias = std.log(), mean / std
        else:
            log_scale, bias = -std.log(), -mean
        _distributed.write_parameter(self, "bias", bias)
        _distributed.write_parameter(self, "log_scale", log_scale)
        self.mark_initialized()

    def initialize_if_needed(self, x: torch.Tensor, inverse: bool = False) -> None:
        """What every call does first: with ``data_init``, a training-mode call before initialization
        initializes from ``x`` (its input); an eval-mode one raises RuntimeError."""
        if self._initialized:
            return
        if bool(self.initialized):
            # The buffer was written without this module knowing (DistributedDataParallel
            # broadcasts buffers from rank 0).
            self._initialized = True
            return
        if not self.training:
            raise RuntimeError(
                "ActNorm: not initialized, and this call is in eval mode, which never initializes: run a batch "
                "in training mode first (the first training-mode call, forward or inverse, sets the parameters "
                "from its data), load a trained state dict, or call mark_initialized() to keep the current "
                "parameters")
        self.initialize(x, inverse)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x, "x")
        self.initialize_if_needed(x)
        return F.actnorm_fwd(x, self.bias.to(x.dtype), self.log_scale.to(x.dtype), backend=self.backend)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None, return_logdet: bool = False):
        self._check(y, "y")
        self.initialize_if_needed(y, inverse=True)
        x, logdet = F.actnorm_inv(y, self.bias.to(y.dtype), self.log_scale.to(y.dtype), backend=self.backend)
        return (x, logdet) if return_logdet else x

    def inverse_backward(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor):
        """Memory-free backward (used by :class:`InvertibleSequential`): ``(x, grad_x, grads)`` with
        ``x`` rebuilt from ``y`` by the fused inverse and the gradients from the fused ``actnorm_bwd``
        op; ``grads`` pairs each parameter that requires grad with its gradient."""
        self._check(y, "y")
        bias, log_scale = self.bias.to(y.dtype), self.log_scale.to(y.dtype)
        x, _ = F.actnorm_inv(y, bias, log_scale, backend=self.backend)
        grad_x, grad_bias, grad_log_scale = F.actnorm_vjp(grad_y, grad_logdet, x, bias, log_scale,
                                                          backend=self.backend)
        grads = [(p, g.to(p.dtype)) for p, g in ((self.bias, grad_bias), (self.log_scale, grad_log_scale))
                 if p.requires_grad]
        return x, grad_x, grads

    def extra_repr(self) -> str:
        return f"channels={self.channels}, initialized={self._initialized}"


def uninitialized(model: nn.Module) -> list[str]:
    """Names of the :class:`ActNorm` layers in ``model`` that still wait for their data-dependent
    initialization (empty when there are none)."""
    return [name or type(model).__name__ for name, m in model.named_modules()
            if isinstance(m, ActNorm) and not m.is_initialized]


def check_initialized(model: nn.Module, owner: str) -> None:
    """ValueError naming ``owner`` and the layers when ``model`` has uninitialized ActNorm layers."""
    names = uninitialized(model)
    if names:
        listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ValueError(f"{owner}: the model's ActNorm layers are not initialized ({listed}): train the model "
                         f"first (the first training-mode call initializes them from its data) or load a trained "
                         f"state dict; evaluating an untrained flow never initializes them")
