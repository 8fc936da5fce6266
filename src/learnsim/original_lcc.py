"""The original release's ``CNN_LCC`` energy, formula and learnt window as they are.

The original ``CNN_LCC.encode`` (``model/model.py`` of the original code) differs from learnsim's
:func:`~learnsim.energies.lcc_terms` in two ways, and a learnt CNN_LCC was learnt with it:

* each voxel is centred by **its own** window mean before the window sums: ``cross = K * ((F - u_F)(M - u_M))``,
  ``var_F = K * (F - u_F)^2`` with ``u = (K * x) / 27`` (learnsim: ``sum(F M) - n mean_F mean_M`` per window);
* ``K`` is a full 3x3x3 convolution (replicate padding, no bias) whose 27 weights are **learnt** with the encoder
  (ones at initialisation), and the means divide by the constant 27, not by the sum of the weights.

The energy is ``-sum_mask cross^2 / (var_F var_M + 1e-5)`` (the original ``LCC`` data loss), times ``weight``.
"""

from __future__ import annotations

import copy

import torch.nn.functional as F
from torch import Tensor

from learnsim.energies import LCC
from learnsim.metric import SimilarityMetric

__all__ = ["OriginalLCC", "original_lcc_terms"]


def _window(x: Tensor, kernel: Tensor) -> Tensor:
    """``K * x`` per channel, replicate padding: ``[B, C, D, H, W] -> same``."""
    p = kernel.shape[-1] // 2
    b, c = x.shape[:2]
    y = F.conv3d(F.pad(x.reshape(b * c, 1, *x.shape[2:]), (p,) * 6, mode="replicate"), kernel.to(x.dtype))
    return y.reshape(b, c, *x.shape[2:])


def original_lcc_terms(fixed: Tensor, warped: Tensor, kernel: Tensor, eps: float = 1e-5) -> Tensor:
    """Voxel-wise ``cross^2 / (var_F var_M + eps)`` of the original CNN_LCC, ``[B, C, D, H, W]``.

    Args:
        fixed: ``[B or 1, C, D, H, W]`` features of F. warped: ``[B, C, D, H, W]`` features of M o phi.
        kernel: the window ``[1, 1, k, k, k]`` (the original's ``kernel.weight``).
    """
    if fixed.shape[0] != warped.shape[0]:
        fixed = fixed.expand(warped.shape[0], *fixed.shape[1:])
    size = float(kernel.shape[-1] ** 3)  # the original divides by (2s + 1)^3 whatever the weights
    df = fixed - _window(fixed, kernel) / size
    dm = warped - _window(warped, kernel) / size
    cross = _window(df * dm, kernel)
    return cross * cross / (_window(df * df, kernel) * _window(dm * dm, kernel) + eps)


class OriginalLCC(LCC):
    """The original CNN_LCC data term on feature maps: ``forward(fixed, warped, mask) -> [B]`` (module docstring).

    Args:
        kernel: the 3x3x3 window ``[1, 1, 3, 3, 3]`` (a buffer: frozen, saved with the module).
        weight: multiplies the energy (the likelihood precision, as :class:`~learnsim.energies.LCC`'s).
    """

    def __init__(self, kernel: Tensor, weight: float = 1.0) -> None:
        size = int(kernel.shape[-1])
        if tuple(kernel.shape) != (1, 1, size, size, size) or size % 2 == 0:
            raise ValueError(f"OriginalLCC: kernel must be [1, 1, k, k, k] with k odd; got {tuple(kernel.shape)}")
        super().__init__(radius=size // 2, learnable_window=False, weight=weight)
        self.register_buffer("kernel", kernel.detach().clone().float())

    def forward(self, fixed: Tensor, warped: Tensor, mask: Tensor | None = None) -> Tensor:
        terms = original_lcc_terms(fixed, warped, self.kernel)
        if mask is not None:
            terms = terms * mask
        e = -terms.flatten(1).sum(1)
        return e if self.weight == 1.0 else self.weight * e

    @staticmethod
    def metric_with(features: SimilarityMetric, kernel: Tensor) -> SimilarityMetric:
        """A CNN_LCC metric with ``features``' encoder and the original LCC on ``kernel``.

        Its :attr:`~learnsim.metric.SimilarityMetric.spec` says ``cnn_lcc`` with ``original_lcc: True``; the spec
        cannot rebuild the learnt window (load the release file again instead).
        """
        metric = SimilarityMetric(OriginalLCC(kernel), True, features.spec["no_features"],
                                  features.spec["negative_slope"])
        metric.encoder = copy.deepcopy(features.encoder)
        metric.spec["original_lcc"] = True
        return metric

