"""Evaluation of registrations: overlap, distances, regularity, uncertainty and its calibration.

* :mod:`~learnsim.evaluation.metrics` — per-structure DSC / ASD / HD95 (true spacing), folding, SDlogJ,
  the subcortical structure table ``STRUCTURES``.
* :mod:`~learnsim.evaluation.uncertainty` — displacement std over posterior samples (mm) and its calibration.
* :mod:`~learnsim.evaluation.figures` — output grid, per-structure box plots, calibration plot (PNG).
* :mod:`~learnsim.evaluation.evaluator` — ``Evaluator``: the test CLI's per-pair / per-run bookkeeping and files.
* :mod:`~learnsim.evaluation.run` — :func:`learnsim.evaluate`: register a pair list and evaluate it (``learnsim-test``).
* :mod:`~learnsim.evaluation.cohort` — a run folder's per-pair records: completeness (hashes), resumption, the merge.
* :mod:`~learnsim.evaluation.sharding` — a cohort's pairs over Lightning's ranks (processes, GPUs, nodes).
* :mod:`~learnsim.evaluation.compare` — comparing evaluated runs (tables, paired Wilcoxon tests, plots).

Submodules are imported on demand (MONAI and matplotlib are slow to import).
"""
