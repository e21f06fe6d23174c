"""A fixed permutation of the channels (log-det 0), the cheap mixing layer between couplings."""

from __future__ import annotations

import torch
from torch import nn

from invkernels import _state, _validation


class Permute(nn.Module):
    """``y = x[:, perm]`` with a fixed permutation of the ``C`` channels; log-det 0.

    Args:
        channels: number of channels ``C``.
        kind: ``"reverse"`` (RealNVP's alternation, default), ``"swap"`` (the two halves
            exchanged: ``y = [x[:, C // 2:], x[:, :C // 2]]``, RevNet's and FrEIA's half swap) or
            ``"random"`` (drawn once from torch's global generator and kept in the state dict).
        perm: a permutation of ``0 .. C - 1`` given directly (a sequence or an integer tensor),
            instead of ``kind``.

    ``forward(x) -> (y, zeros[B])``; ``inverse(y) -> x``. Inputs ``[B, C, *spatial]`` or ``[B, C]``.
    A half swap of even ``C`` is bookkeeping in a chain: :class:`~invkernels.nn.InvertibleSequential`
    hands the two halves on exchanged (``forward_split``), without moving data. A memory-free run
    applies any other permutation by index itself, with no RNG state or log-det of its own, and
    undoes it by index in backward (a subclass, or one with hooks, through ``inverse_backward``).
    """

    results_tested = True  # the chain trusts its memory-free results (protocol.checked_result)

    # perm and inverse_perm are fixed: the memory-free backward need not copy them (_state).
    buffers_read_only = True

    # forward and inverse take ``context=`` like every block, and do not use it: a chain passes
    # none to this block (protocol.takes_context).
    uses_context = False

    def __init__(self, channels: int, kind: str | None = None, *, perm=None):
        super().__init__()
        _validation.check_int("Permute", "channels", channels)
        if perm is not None:
            if kind is not None:
                raise ValueError(f"Permute: give kind or perm, not both; got kind={kind!r} and perm")
            try:
                perm = torch.as_tensor(perm)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"Permute: perm should be a permutation of 0..{channels - 1}, got {perm!r}") from e
            if perm.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
                perm = perm.long()
            _validation.check_permutation("Permute", "perm", perm, channels, "perm")
            kind = "custom"
        else:
            kind = "reverse" if kind is None else kind
            if kind not in ("reverse", "swap", "random"):
                raise ValueError(f"Permute: kind should be 'reverse', 'swap' or 'random', got {kind!r}")
            half = channels // 2
            perm = {"reverse": lambda: torch.arange(channels - 1, -1, -1),
                    "swap": lambda: torch.cat([torch.arange(half, channels), torch.arange(half)]),
                    "random": lambda: torch.randperm(channels)}[kind]()
        self.channels = channels
        self.kind = kind
        self.register_buffer("perm", perm.clone())
        self.register_buffer("inverse_perm", torch.argsort(perm))
        self._swap_key: tuple | None = None
        self._swap = False
        self._update_swap()

    def _update_swap(self) -> None:
        """Whether ``perm`` is the half swap, read again only after the buffer changed (replaced,
        written in place, or converted: :meth:`_apply` forgets the answer). Called at every step
        of a chain, so the key is what is cheapest to read (~0.3 µs, against 2.5 µs for the device
        and address)."""
        perm = self._buffers["perm"]
        key = (id(perm), _state.version(perm) if perm.is_inference() else perm._version)
        if key != self._swap_key:
            c, half = self.channels, self.channels // 2
            swap = torch.cat([torch.arange(half, c), torch.arange(half)])
            self._swap = c % 2 == 0 and perm.device.type != "meta" and torch.equal(perm.cpu(), swap)
            self._swap_key = key

    def _apply(self, fn, recurse=True):
        self._swap_key = None
        return super()._apply(fn, recurse)

    @property
    def split_channels(self) -> int | None:
        """``C // 2`` when the permutation exchanges two halves of equal size (even ``C``), else
        None: a chain then hands on the halves exchanged instead of permuting the tensor. Under
        ``torch.compile`` / ``torch.export`` (which cannot read a buffer's address or version) the
        answer is the one read last outside tracing: at construction, at ``load_state_dict``, or at
        the last eager call."""
        if not torch.compiler.is_compiling():
            self._update_swap()
        return self.channels // 2 if self._swap else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A permutation that is not one (or an inverse that does not match it) would silently
        # drop and duplicate channels while the log-det still says 0.
        perm = state_dict.get(prefix + "perm")
        if perm is not None:
            _validation.check_permutation("Permute", "perm", perm, self.channels, prefix + "perm")
        inverse = state_dict.get(prefix + "inverse_perm")
        if inverse is not None:
            _validation.check_permutation("Permute", "inverse_perm", inverse, self.channels, prefix + "inverse_perm")
            reference = perm if perm is not None else self.perm
            if not torch.equal(inverse.to(reference.device)[reference], torch.arange(self.channels,
                                                                                       device=reference.device)):
                raise ValueError(f"Permute: buffer 'inverse_perm' (state dict key '{prefix}inverse_perm') should be "
                                 f"the inverse of perm (argsort(perm)), got {inverse.tolist()} for perm "
                                 f"{reference.tolist()}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if perm is not None and inverse is None:
            self.inverse_perm.copy_(torch.argsort(self.perm))
        self._update_swap()

    def _check(self, x: torch.Tensor, name: str) -> None:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"Permute: {name} should have shape [B, {self.channels}, ...], got {list(x.shape)}")

    def permuted(self, x: torch.Tensor) -> torch.Tensor:
        """``x[:, perm]``, checked (the forward without its log-det, which is 0)."""
        self._check(x, "x")
        return x.index_select(1, self.perm)

    def unpermuted(self, y: torch.Tensor, name: str = "y") -> torch.Tensor:
        """``y[:, argsort(perm)]``, checked (``name``: the argument named in the error)."""
        self._check(y, name)
        return y.index_select(1, self.inverse_perm)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.permuted(x), x.new_zeros(x.shape[0], dtype=_validation.logdet_dtype(x.dtype))

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None, return_logdet: bool = False):
        x = self.unpermuted(y)
        return (x, y.new_zeros(y.shape[0], dtype=_validation.logdet_dtype(y.dtype))) if return_logdet else x

    def inverse_backward(self, y: torch.Tensor, grad_y: torch.Tensor, grad_logdet: torch.Tensor):
        """Memory-free backward: ``(x, grad_x, [])``, both the permutation undone by index
        (``grad_x = grad_y[:, argsort(perm)]``: the Jacobian is the permutation matrix)."""
        return self.unpermuted(y), self.unpermuted(grad_y, "grad_y"), []

    def _check_halves(self, a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> None:
        half = self.channels // 2
        if self.split_channels is None:
            raise ValueError(f"Permute: forward_split needs the half swap of an even channel count, got "
                             f"kind={self.kind!r} with channels={self.channels}")
        for t, name in zip((a, b), names):
            if t.dim() < 2 or t.shape[1] != half:
                raise ValueError(f"Permute: {name} should have shape [B, {half}, ...], got {list(t.shape)}")

    def forward_split(self, x1: torch.Tensor, x2: torch.Tensor):
        """The half swap on halves: ``(x2, x1, None)`` (log-det 0), no data moved."""
        self._check_halves(x1, x2, ("x1", "x2"))
        return x2, x1, None

    def inverse_split(self, y1: torch.Tensor, y2: torch.Tensor):
        self._check_halves(y1, y2, ("y1", "y2"))
        return y2, y1, None

    def inverse_backward_split(self, y1: torch.Tensor, y2: torch.Tensor, grad_y1: torch.Tensor, grad_y2: torch.Tensor,
                               grad_logdet: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Memory-free backward of the half swap on halves: the halves and their gradients
        exchanged back (copied into ``out`` when given)."""
        self._check_halves(y1, y2, ("y1", "y2"))
        if out is not None:
            out[0].copy_(grad_y2)
            out[1].copy_(grad_y1)
            grad_y2, grad_y1 = out
        return y2, y1, grad_y2, grad_y1, []

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kind={self.kind!r}"
