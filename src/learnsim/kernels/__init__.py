"""Fused kernels for the q_v hot path (numba on CPU), with the plain PyTorch path as the reference and fallback.

* :mod:`learnsim.kernels.backend`: which path runs (``LEARNSIM_KERNELS=auto|numba|torch``).
* :mod:`learnsim.kernels.trilinear_numba`: the CPU kernels (squaring step, warp, smoothing, regulariser).
* :mod:`learnsim.kernels.ops`: the ``torch.autograd.Function`` wrappers with hand-written adjoints.
"""

from learnsim.kernels.backend import get_backend, numba_available, set_backend, use_backend, use_numba

__all__ = ["get_backend", "set_backend", "use_backend", "use_numba", "numba_available"]
