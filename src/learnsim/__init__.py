"""learnsim: variational Bayesian similarity learning for atlas-based diffeomorphic registration of 3D brain MRI.

The public face, imported on first use (``import learnsim`` stays light):

* :func:`register` (:mod:`learnsim.api`): register a moving image to a fixed one with a baseline or learnt metric;
* :func:`load_metric`: a checkpoint's learnt metric (:meth:`learnsim.metric.SimilarityMetric.from_checkpoint`);
* :func:`evaluate` (:mod:`learnsim.evaluation.run`): register and evaluate a pair list, as ``learnsim-test`` does.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["register", "load_metric", "evaluate", "__version__"]

_LAZY = {"register": "learnsim.api", "load_metric": "learnsim.api", "evaluate": "learnsim.evaluation.run"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'learnsim' has no attribute {name!r}")
