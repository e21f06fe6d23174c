"""Which implementation the functional ops and modules use.

``"cpp"`` (default): the registered C++ ops, CPU or CUDA kernels by the tensors' device.
``"triton"``: the Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
``"reference"``: the pure-PyTorch implementations (any device).
"""

from __future__ import annotations

import contextlib

BACKENDS = ("cpp", "triton", "reference")
_current = {"backend": "cpp"}


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend should be one of {BACKENDS}, got {backend!r}")
    return backend


def set_backend(backend: str) -> None:
    """Set the default backend of the functional ops and modules (registering its ops now)."""
    from invkernels.ops import prepare  # noqa: PLC0415

    prepare(check_backend(backend))
    _current["backend"] = backend


def get_backend() -> str:
    """The default backend now in effect."""
    return _current["backend"]


@contextlib.contextmanager
def use_backend(backend: str):
    """Use ``backend`` as the default within a ``with`` block, then restore the previous one."""
    previous = _current["backend"]
    set_backend(backend)
    try:
        yield
    finally:
        _current["backend"] = previous


def resolve(backend: str | None) -> str:
    return get_backend() if backend is None else check_backend(backend)
