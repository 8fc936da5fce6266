"""Which implementation runs the q_v hot path: the numba CPU kernels or the plain PyTorch operators.

``auto`` (the default) uses the numba kernels for CPU tensors when numba imports, and PyTorch otherwise (CUDA
tensors always take the PyTorch path, whose kernels are already fused on the GPU). ``torch`` forces the PyTorch
path everywhere; ``numba`` asks for the kernels and raises if numba is missing.

Set it with the environment variable ``LEARNSIM_KERNELS=auto|numba|torch`` or, in code, with
:func:`use_backend` (a context manager) / :func:`set_backend`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch

__all__ = ["BACKENDS", "get_backend", "set_backend", "use_backend", "numba_available", "use_numba"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "numba", "torch")
_state: dict[str, object] = {"backend": None, "numba": None, "warned": False}


def numba_available() -> bool:
    """Whether the numba kernels import (numba installed and its LLVM runtime loads); checked once."""
    if _state["numba"] is None:
        try:
            from learnsim.kernels import trilinear_numba  # noqa: F401

            _state["numba"] = True
        except Exception as exc:  # ImportError, or an LLVM/runtime failure on an exotic platform
            _state["numba"] = False
            log.warning("learnsim: numba kernels unavailable (%s); using the PyTorch path", exc)
    return bool(_state["numba"])


def get_backend() -> str:
    """The backend in force: the last :func:`set_backend`, else ``$LEARNSIM_KERNELS``, else ``auto``."""
    if _state["backend"] is not None:
        return str(_state["backend"])
    value = os.environ.get("LEARNSIM_KERNELS", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"LEARNSIM_KERNELS={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


def set_backend(name: str | None) -> None:
    """Force a backend for this process (``None``: back to ``$LEARNSIM_KERNELS`` / ``auto``)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r}: expected one of {', '.join(BACKENDS)}")
    _state["backend"] = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with the given backend, restoring the previous choice after it."""
    previous = _state["backend"]
    set_backend(name)
    try:
        yield
    finally:
        _state["backend"] = previous


def use_numba(*tensors: torch.Tensor) -> bool:
    """Whether an operation on ``tensors`` should run the numba kernels (all on CPU, float32/float64)."""
    backend = get_backend()
    if backend == "torch":
        return False
    if any(t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) for t in tensors):
        return False  # numba is CPU-only: CUDA (or half-precision) tensors take the PyTorch path whatever is asked
    if not numba_available():
        if backend == "numba":
            raise RuntimeError("LEARNSIM_KERNELS=numba but numba is not importable: pip install numba")
        return False
    return True
