"""learnsim: variational Bayesian similarity learning for atlas-based diffeomorphic registration of 3D brain MRI.

The public face, imported on first use (``import learnsim`` stays light):

* :func:`register` (:mod:`learnsim.api`): register a moving image to a fixed one with a baseline or learnt metric;
* :func:`load_metric`: a checkpoint's learnt metric (:meth:`learnsim.metric.SimilarityMetric.from_checkpoint`), or
  an original release CNN_SSD / CNN_LCC file (:mod:`learnsim.original_release`);
* :func:`load_network`: a VoxelMorph network, learnsim's checkpoint or an original release file;
* :func:`evaluate` (:mod:`learnsim.evaluation.run`): register and evaluate a pair list, as ``learnsim-test`` does.
"""

from __future__ import annotations

import os as _os
from typing import Any

# PyTorch (its bundled libgomp) and learnsim's numba kernels (the system libgomp) each keep an OpenMP thread pool,
# and an idle pool spins (~300k iterations by default) after every parallel region, on the cores the other pool
# is about to use. The q_v loop alternates between the two dozens of times per iteration: on a 2-core machine
# that spinning cost up to 2-4x (docs/speed.md). Each runtime reads this once, when it loads, so it applies in
# full when learnsim is imported before torch (the console scripts are); a value set by the user wins.
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"
__all__ = ["register", "load_metric", "load_network", "evaluate", "__version__"]

_LAZY = {"register": "learnsim.api", "load_metric": "learnsim.api", "load_network": "learnsim.api",
         "evaluate": "learnsim.evaluation.run"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'learnsim' has no attribute {name!r}")
