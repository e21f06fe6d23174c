"""The tensor between two blocks of a chain, held whole or as its two channel halves: the
bookkeeping that lets blocks on halves hand each other their halves without concatenating."""

from __future__ import annotations

import torch


class Flow:
    """The tensor between two blocks of a chain, held whole or as its two channel halves (the
    tensor is their concatenation). Blocks that split the same way hand each other the halves;
    :meth:`whole` concatenates them, once, where a block or the chain's output needs the tensor."""

    __slots__ = ("_whole", "_halves")

    def __init__(self, whole: torch.Tensor | None = None, halves: tuple[torch.Tensor, torch.Tensor] | None = None):
        self._whole, self._halves = whole, halves

    def split(self, c1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The halves at channel ``c1`` (views of the whole tensor when it is not held so split)."""
        if self._halves is not None and self._halves[0].shape[1] == c1:
            return self._halves
        x = self.whole()
        x1, x2 = x.split([c1, x.shape[1] - c1], dim=1)
        return x1, x2

    def whole(self) -> torch.Tensor:
        if self._whole is None:
            self._whole = torch.cat(self._halves, dim=1)
        return self._whole

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors held (the whole tensor, or its two halves)."""
        return (self._whole,) if self._whole is not None else self._halves


def add_logdets(total: torch.Tensor | None, logdet: torch.Tensor | None) -> torch.Tensor | None:
    if logdet is None:
        return total
    return logdet if total is None else total + logdet
