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
from learnsim.evaluation.evaluator import Evaluator, _write_json
from learnsim.registration import FitProgress, VariationalRegistration

__all__ = ["evaluate", "Registered", "register_pair", "check_registrable", "UnregistrablePair"]


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
        seed: seeds the evaluator's calibration voxel subsample (the samples use torch's global RNG).
        run_name: the run's name in plots (default: the folder's name).
        instance_optimisation_iters: VoxelMorph only: refinement steps from the network's output.
        echo: where the per-pair lines go (None: nowhere).
    """
    device = torch.device(device)
    evaluator = Evaluator(out_dir, save_nifti=save_nifti, figures=figures, seed=seed, metric_samples=no_samples,
                          run_name=run_name)
    n_draw = max(int(no_samples), int(no_samples_uncertainty))
    failed: list[dict[str, str]] = []
    for i, batch in enumerate(pairs):
        if max_pairs is not None and i >= max_pairs:
            break
        pair_id = str(batch["pair_id"][0])
        fixed, moving, mask = (batch[k].to(device) for k in ("fixed", "moving", "fixed_mask"))
        try:
            reg = register_pair(registration, fixed, moving, mask, n_draw, f"q_v {pair_id}", instance_optimisation_iters)
        except (FitDiverged, UnregistrablePair) as exc:  # this pair only: reported, never averaged in
            failed.append({"pair": pair_id, "reason": str(exc)})
            if echo is not None:
                echo(f"learnsim-test: pair {pair_id}: FAILED (not averaged in): {exc}")
            continue
        has_seg = bool(batch["has_seg"][0])
        row = evaluator.add_pair(
            pair_id, fixed.cpu(), moving.cpu(),
            batch["fixed_seg"] if has_seg else None, batch["moving_seg"] if has_seg else None,
            batch["fixed_mask"], batch["affine"][0], reg.samples.cpu(), reg.mean_disp.cpu(), reg.seconds, reg.extra,
        )
        if echo is not None:
            echo(f"learnsim-test: pair {pair_id}: " + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "pair"))
    return _record_failures(evaluator, failed, echo)


def _record_failures(evaluator: Evaluator, failed: list[dict[str, str]], echo: Callable[[str], None] | None) -> dict:
    """Finalise the run and add the failed pairs (``failed_pairs``: pair and reason; ``n_failed``) to its summary
    and ``summary.json``: the means cover only the pairs that registered."""
    summary = evaluator.finalize()
    summary["n_failed"] = len(failed)
    summary["failed_pairs"] = failed
    _write_json(evaluator.out_dir / "summary.json", summary)
    if failed and echo is not None:
        echo(f"learnsim-test: WARNING: {len(failed)} pair(s) failed and are not in the means: "
             + ", ".join(f["pair"] for f in failed) + " (summary.json, failed_pairs)")
    return summary
