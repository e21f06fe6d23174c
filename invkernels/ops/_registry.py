"""Per-backend registration of an op family (coupling, ActNorm, ...).

The C++ ops get their fake implementations and autograd formulas on first use, the Triton ops
(``<name>_triton``) their autograd formulas when the Triton module is first imported. After
that, a call only looks the ops up, which keeps the lookup traceable by torch.compile.
"""

from __future__ import annotations

import importlib
from typing import Callable, NamedTuple

import torch

from invkernels import _backend


class OpFamily:
    """The registered ops of one family, per backend.

    Args:
        names: op names in ``torch.ops.invkernels``, in the order of ``ops_type``'s fields.
        ops_type: a NamedTuple type holding one backend's ops.
        triton_module: the module that registers the ``<name>_triton`` ops when imported.
        register_fakes: registers the fake implementations of the C++ ops.
        register_autograd: ``register_autograd(suffix, ops)`` registers autograd for one backend.
    """

    def __init__(self, names: tuple[str, ...], ops_type: type[NamedTuple], triton_module: str,
                 register_fakes: Callable[[], None], register_autograd: Callable[[str, NamedTuple], None]):
        self._names = names
        self._ops_type = ops_type
        self._triton_module = triton_module
        self._register_fakes = register_fakes
        self._register_autograd = register_autograd
        self._registered: dict[str, NamedTuple] = {}

    def _bind(self, suffix: str) -> NamedTuple:
        ns = torch.ops.invkernels
        return self._ops_type(*(getattr(ns, name + suffix).default for name in self._names))

    def cpp(self) -> NamedTuple:
        """The C++ ops (CPU and CUDA kernels), with autograd and fake implementations registered."""
        if "cpp" not in self._registered:
            from invkernels import _extension  # noqa: PLC0415

            _extension.load()
            self._register_fakes()
            ops = self._bind("")
            self._register_autograd("", ops)
            self._registered["cpp"] = ops
        return self._registered["cpp"]

    def triton(self) -> NamedTuple:
        """The Triton ops, with autograd registered (imports triton on first use)."""
        if "triton" not in self._registered:
            importlib.import_module(self._triton_module)
            ops = self._bind("_triton")
            self._register_autograd("_triton", ops)
            self._registered["triton"] = ops
        return self._registered["triton"]

    def prepare(self, backend: str) -> None:
        """Register ``backend``'s ops now, so later (possibly compiled) calls only look them up."""
        if backend == "cpp":
            self.cpp()
        elif backend == "triton":
            self.triton()

    def for_tensor(self, backend: str | None, x: torch.Tensor) -> NamedTuple | None:
        """The ops of the chosen backend for ``x``; None means the pure-PyTorch reference (also the
        fallback of the C++ backend for devices other than CPU and CUDA)."""
        name = _backend.resolve(backend)
        if name == "reference" or (name == "cpp" and x.device.type not in ("cpu", "cuda")):
            return None
        ops = self._registered.get(name)
        return ops if ops is not None else (self.triton() if name == "triton" else self.cpp())
