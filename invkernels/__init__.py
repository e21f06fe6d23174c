"""invkernels: fused, exact, memory-free invertible neural network layers for PyTorch.

Every invertible module maps data to latent in ``forward`` and returns ``(y, logdet)`` with a
per-sample ``logdet`` of shape ``[batch]``; ``inverse(y)`` maps back. The fused kernels are
registered as ``torch.ops.invkernels.*`` (C++ CPU and CUDA backends) and
``torch.ops.invkernels.*_triton``; :func:`set_backend` picks which ones the modules use.
"""

from invkernels import _extension
from invkernels._backend import BACKENDS, get_backend, set_backend, use_backend
from invkernels._extension import build_info

_extension.load()

from invkernels import diagnostics, inversion, nn, ops, reference  # noqa: E402

ops.prepare("cpp")

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "build_info",
    "diagnostics",
    "get_backend",
    "inversion",
    "nn",
    "ops",
    "reference",
    "set_backend",
    "use_backend",
]
