"""``learnsim.evaluate``: register every pair of a pair list and evaluate the run (what ``learnsim-test`` wraps).

Two kinds of registration are evaluated the same way:

* a :class:`~learnsim.registration.VariationalRegistration` (a baseline or learnt metric): q_v is fitted from
  scratch per pair (its coarse-to-fine schedule, :meth:`~learnsim.registration.VariationalRegistration.fit_levels`),
  the posterior-mean transformation and ``max(no_samples, no_samples_uncertainty)`` samples are drawn;
* a :class:`~learnsim.voxelmorph.VoxelMorphModule`: the network's prediction (one deterministic sample),
  optionally refined by instance optimisation.

Each registered pair goes to :class:`~learnsim.evaluation.evaluator.Evaluator`, which writes the run's tables,
maps and figures. Samples are drawn from torch's global RNG: seed it first (``torch.manual_seed``) for a
reproducible run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from learnsim.divergence import FitDiverged
from learnsim.evaluation.cohort import CohortFolder, pair_seed
from learnsim.evaluation.evaluator import Evaluator
from learnsim.registration import FitProgress, VariationalRegistration

__all__ = ["evaluate", "Registered", "register_pair", "check_registrable", "UnregistrablePair", "PairRun"]


@dataclass
class Registered:
    """One registered pair, as the evaluator takes it.

    Attributes:
        mean_disp: ``[1, 3, D, H, W]`` displacement (voxels) of the posterior-mean (or predicted) transformation.
        samples: ``[N, 1, 3, D, H, W]`` displacements (voxels) of N >= 1 samples.
        seconds: registration time of the pair (CUDA-synchronised).
        extra: further per-pair values for ``per_pair.csv`` (final loss, fit seconds).
    """

    mean_disp: Tensor
    samples: Tensor
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


class UnregistrablePair(ValueError):
    """A pair that cannot be registered as given (e.g. the moving image misses the atlas' grid entirely)."""


def check_registrable(moving: Tensor) -> None:
    """Refuse a moving image that is constant on the working grid: resampled through its affine it missed the
    atlas (no overlap), so any transformation fits it equally badly."""
    if bool((moving == moving.reshape(-1)[0]).all()):
        raise UnregistrablePair(f"the moving image is constant ({float(moving.reshape(-1)[0]):g}) on the atlas' grid: "
                                "it does not overlap the atlas through the affines (check its affine)")


def register_pair(registration: Any, fixed: Tensor, moving: Tensor, mask: Tensor | None, n_samples: int,
                  desc: str = "q_v", instance_optimisation_iters: int = 0) -> Registered:
    """Register one pair (tensors ``[1, 1, D, H, W]`` on the registration's device) with q_v or a network."""
    check_registrable(moving)
    if not isinstance(registration, VariationalRegistration):  # a VoxelMorphModule: the network predicts
        mean_disp, samples, seconds = registration.register_batch(
            fixed, moving, mask, no_samples=1, instance_optimisation_iters=instance_optimisation_iters)
        return Registered(mean_disp, samples, seconds)
    t0 = time.perf_counter()
    shape = moving.shape[2:]
    with FitProgress(sum(registration.schedule.iters), desc=desc) as bar:
        fit = registration.fit_levels(fixed, moving, mask, training=False, progress=bar, log_every=4,
                                      on_level=bar.on_level)
    mean_disp = registration.mean_displacement(fit.params, shape)
    samples = registration.sample_displacements(fit.params, shape, n_samples)
    if moving.device.type == "cuda":
        torch.cuda.synchronize(moving.device)
    seconds = time.perf_counter() - t0
    extra: dict[str, Any] = {"final_loss": float(fit.loss.mean()), "fit_seconds": fit.seconds}
    extra.update(_likelihood_columns(registration, fit, fixed, moving, mask, mean_disp))
    return Registered(mean_disp, samples, seconds, extra)


def _likelihood_columns(registration: VariationalRegistration, fit: Any, fixed: Tensor, moving: Tensor,
                        mask: Tensor | None, mean_disp: Tensor) -> dict[str, float]:
    """``data_weight`` (the precision the fit ended with: learnt per pair or the metric's), and for a Gaussian
    metric its energy ratio ``rho`` to its baseline at the posterior mean (:mod:`learnsim.energy_ratio`)."""
    from learnsim.energies import StudentT
    from learnsim.energy_ratio import energy_ratio

    metric = registration.metric
    cols = {"data_weight": float(fit.precision.weight.mean()) if fit.precision is not None else
            float(metric.energy.weight)}
    if fit.precision is not None:
        cols["decimation"] = float(fit.precision.alpha.mean())
    if not isinstance(metric.energy, StudentT):
        cols["energy_ratio"] = float(energy_ratio(metric, fixed, moving, mean_disp, mask).mean())
    return cols


@dataclass
class PairRun:
    """Registers, evaluates and records one pair at a time (``learnsim.evaluate`` and every rank of a cohort run).

    Each pair is seeded by its name (:func:`~learnsim.evaluation.cohort.pair_seed`), evaluated by ``evaluator``,
    taken out of it again and recorded in ``folder`` (its rows on disk, not in memory); a pair that cannot be
    registered is recorded as failed.
    """

    registration: Any
    evaluator: Evaluator
    folder: CohortFolder
    device: torch.device
    n_draw: int
    seed: int = 0
    instance_optimisation_iters: int = 0
    echo: Callable[[str], None] | None = print
    prog: str = "learnsim-test"

    def __call__(self, batch: Mapping[str, Any], desc: str) -> None:
        pair_id = str(batch["pair_id"][0])
        self.folder.start_pair(pair_id)
        torch.manual_seed(pair_seed(self.seed, pair_id))
        fixed, moving, mask = (batch[k].to(self.device) for k in ("fixed", "moving", "fixed_mask"))
        try:
            reg = register_pair(self.registration, fixed, moving, mask, self.n_draw, desc,
                                self.instance_optimisation_iters)
        except (FitDiverged, UnregistrablePair) as exc:  # this pair only: reported, never averaged in
            self.folder.record_failure(pair_id, str(exc))
            if self.echo is not None:
                self.echo(f"{self.prog}: pair {pair_id}: FAILED (not averaged in): {exc}")
            return
        has_seg = bool(batch["has_seg"][0])
        row = self.evaluator.add_pair(
            pair_id, fixed.cpu(), moving.cpu(),
            batch["fixed_seg"] if has_seg else None, batch["moving_seg"] if has_seg else None,
            batch["fixed_mask"], batch["affine"][0], reg.samples.cpu(), reg.mean_disp.cpu(), reg.seconds, reg.extra,
        )
        self.folder.record_pair(pair_id, self.evaluator.pop_pair(pair_id))
        if self.echo is not None:
            self.echo(f"{self.prog}: pair {pair_id}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "pair"))


def evaluate(
    registration: Any,
    pairs: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    no_samples: int = 5,
    no_samples_uncertainty: int = 50,
    max_pairs: int | None = None,
    device: str | torch.device = "cpu",
    save_nifti: bool = True,
    figures: bool = True,
    seed: int = 0,
    run_name: str | None = None,
    instance_optimisation_iters: int = 0,
    echo: Callable[[str], None] | None = print,
    resume: Mapping[str, Any] | None = None,
) -> dict:
    """Register and evaluate every pair; write the run into ``out_dir``; return the run's summary.

    Args:
        registration: a :class:`~learnsim.registration.VariationalRegistration` (its metric on ``device``) or a
            :class:`~learnsim.voxelmorph.VoxelMorphModule`.
        pairs: batches of one pair each, as :class:`~learnsim.data.datamodule.PairDataModule`'s test or validation
            loader yields them (``fixed``, ``moving``, ``fixed_mask`` ``[1, 1, D, H, W]``, ``has_seg``, ``fixed_seg``,
            ``moving_seg``, ``affine`` ``[1, 4, 4]``, ``pair_id``).
        out_dir: the run folder (created).
        no_samples: posterior samples per pair for the DSC / ASD / HD95 table.
        no_samples_uncertainty: posterior samples per pair for the uncertainty map.
        max_pairs: evaluate only the first N pairs.
        seed: seeds each pair's samples (with the pair's name: :func:`~learnsim.evaluation.cohort.pair_seed`) and
            the evaluator's calibration voxel subsample.
        run_name: the run's name in plots (default: the folder's name).
        instance_optimisation_iters: VoxelMorph only: refinement steps from the network's output.
        echo: where the per-pair lines go (None: nowhere).
        resume: None: every pair is registered (learnsim's previous outputs in ``out_dir`` are replaced). The
            settings the outputs depend on (a JSON-able mapping): pairs of ``out_dir`` complete under the same
            settings are kept, not registered again (:mod:`learnsim.evaluation.cohort`); other settings are refused.
    """
    device = torch.device(device)
    kwargs = {"save_nifti": save_nifti, "figures": figures, "seed": seed, "metric_samples": no_samples,
              "run_name": run_name}
    folder = CohortFolder(out_dir, resume if resume is not None else {"resume": False, **kwargs})
    if resume is None:
        folder.clear()
    else:
        folder.check_settings()
    folder.write_manifest()
    run = PairRun(registration, Evaluator(out_dir, **kwargs), folder, device,
                  max(int(no_samples), int(no_samples_uncertainty)), seed, instance_optimisation_iters, echo)
    ids: list[str] = []
    skipped = 0
    for i, batch in enumerate(pairs):
        if max_pairs is not None and i >= max_pairs:
            break
        ids.append(str(batch["pair_id"][0]))
        if resume is not None and folder.complete(ids[-1]):
            skipped += 1
            continue
        run(batch, f"q_v {ids[-1]}")
    if skipped and echo is not None:
        echo(f"learnsim-test: {skipped} of {len(ids)} pairs already complete in {out_dir}: skipped")
    return folder.merge(ids, Evaluator(out_dir, **kwargs), echo)
