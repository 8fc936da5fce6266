"""Loading a learnt metric from a checkpoint *given as a metric* (``--metric run.ckpt``, ``ckpt=``, ``metric_ckpt=``),
with the two refusals such a file needs beyond :meth:`~learnsim.metric.SimilarityMetric.from_checkpoint`:

* a VoxelMorph checkpoint holds no learnt metric, only the baseline its network was trained with: using it as a
  metric would silently register with that frozen baseline;
* a metric whose weights hold NaN or inf (a diverged training run) would send NaN fields into the kernels.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from learnsim.checkpoint import ModuleKind, checkpoint_module, load_checkpoint
from learnsim.metric import SimilarityMetric

__all__ = ["load_learnt_metric", "check_metric_finite"]


def check_metric_finite(metric: SimilarityMetric, source: str | os.PathLike) -> None:
    """Refuse a metric with a NaN or inf weight (or buffer), naming ``source`` and the first bad tensor."""
    named = list(metric.named_parameters()) + list(metric.named_buffers())
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{source}: the metric's weights hold NaN or inf ({name}); the training run diverged "
                             "(use an earlier checkpoint)")


def load_learnt_metric(ckpt: str | os.PathLike, key: str = "metric",
                       map_location: str | torch.device = "cpu") -> SimilarityMetric:
    """The learnt metric of a learnsim training checkpoint, in eval mode.

    Args:
        ckpt: the checkpoint.
        key: how the caller named the setting, for the messages (``--metric``, ``metric_ckpt``).

    Raises:
        FileNotFoundError: naming the checkpoint if it does not exist.
        ValueError: a VoxelMorph checkpoint (no learnt metric in it), no metric in it, or non-finite weights.
    """
    path = Path(ckpt)
    state = load_checkpoint(path, map_location)
    if checkpoint_module(state) is ModuleKind.VOXELMORPH:
        raise ValueError(f"{key} {path}: a VoxelMorph checkpoint holds no learnt metric (only its frozen baseline); "
                         "give a learnsim-train checkpoint of a learnt metric, or evaluate the network with "
                         "learnsim-test ckpt=...")
    del state
    metric = SimilarityMetric.from_checkpoint(path, map_location)
    check_metric_finite(metric, path)
    return metric
