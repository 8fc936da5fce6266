"""Registration accuracy and regularity metrics: pure functions on tensors.

Conventions (see :mod:`learnsim.spatial`): volumes are ``[B, C, D, H, W]``, displacements ``[B, 3, D, H, W]`` in
voxels, and a 4x4 NIfTI ``affine`` maps voxel index ``(d, h, w)`` to mm. The voxel spacing along tensor axis
``k`` is the norm of the affine's column ``k`` (:func:`spacing_from_affine`), which is right for any rotation,
flip or axis permutation (LPS, RAS, ...), so surface distances are in true mm even on anisotropic grids.

Overlap and surface metrics (per structure, between a warped moving segmentation and the fixed one):

* DSC: MONAI :func:`~monai.metrics.compute_dice`.
* ASD (mm): MONAI's *symmetric* average surface distance
  (:func:`~monai.metrics.compute_average_surface_distance`, ``symmetric=True``): the mean of the distances from
  every boundary voxel of A to the nearest boundary voxel of B **and** from every boundary voxel of B to A, pooled
  (so ``(sum d(A->B) + sum d(B->A)) / (|dA| + |dB|)``). Boundary voxels are the object's voxels that touch the
  background (6-neighbourhood erosion); distances are Euclidean between voxel centres, scaled by the spacing.
* HD95 (mm): MONAI :func:`~monai.metrics.compute_hausdorff_distance` with ``percentile=95``: the larger of the two
  directed 95th-percentile boundary distances.

Absent structures (documented contract, tested):

* absent in the fixed (reference) segmentation: DSC, ASD and HD95 are all NaN (nothing to compare against);
* present in the fixed but absent in the warped one: DSC = 0, ASD = HD95 = NaN (a distance to an empty surface
  is undefined; MONAI would give inf, which poisons means). Count NaNs when summarising.

Regularity (of ``phi = id + u``, det J from :func:`learnsim.spatial.jacobian_det`):

* folding: voxels with ``det J <= 0``, as a count and as a percentage of the voxels considered (whole grid, or a
  mask).
* SDlogJ: standard deviation (population, ddof 0) of ``log det J`` over the voxels with ``det J > 0`` (folded
  voxels have no logarithm and are reported by the folding count instead), optionally restricted to a mask
  (the evaluator uses the fixed brain mask: outside the brain there is no image signal and the deformation is
  only the regulariser's extrapolation).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from learnsim.grid import affine_to_numpy
from learnsim.spatial import jacobian_det

__all__ = [
    "STRUCTURES",
    "spacing_from_affine",
    "structure_metrics",
    "dice_per_structure",
    "folding",
    "sdlogj",
    "jacobian_stats",
]

#: Subcortical structures evaluated by the paper (FreeSurfer / FSL FIRST label ids -> names).
STRUCTURES: dict[int, str] = {
    10: "L thalamus",
    49: "R thalamus",
    11: "L caudate",
    50: "R caudate",
    12: "L putamen",
    51: "R putamen",
    13: "L pallidum",
    52: "R pallidum",
    17: "L hippocampus",
    53: "R hippocampus",
    18: "L amygdala",
    54: "R amygdala",
    26: "L accumbens",
    58: "R accumbens",
    16: "brain stem",
}

_NAN = float("nan")


def spacing_from_affine(affine: Tensor | np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing in mm along tensor axes ``(D, H, W)``: the norms of the affine's first three columns."""
    a = affine_to_numpy(affine)
    sp = np.linalg.norm(a[:3, :3], axis=0)
    if np.any(sp <= 0) or not np.all(np.isfinite(sp)):
        raise ValueError(f"spacing_from_affine: degenerate affine (column norms {sp.tolist()})")
    return float(sp[0]), float(sp[1]), float(sp[2])


def _check_seg(seg: Tensor, name: str, fn: str) -> Tensor:
    if seg.dim() == 5:
        if seg.shape[0] != 1 or seg.shape[1] != 1:
            raise ValueError(f"{fn}: {name} must be [1, 1, D, H, W] or [D, H, W]; got {tuple(seg.shape)}")
        seg = seg[0, 0]
    if seg.dim() != 3:
        raise ValueError(f"{fn}: {name} must be [1, 1, D, H, W] or [D, H, W]; got {tuple(seg.shape)}")
    return seg


def _label_boxes(seg: np.ndarray, labels: Sequence[int]) -> list[tuple[slice, ...] | None]:
    """Bounding box of each label in one pass over the volume (``None`` where the label is absent)."""
    top = max(int(max(labels)), 0)
    lut = np.zeros(top + 2, dtype=np.int32)
    for i, label in enumerate(labels):
        if label >= 0:
            lut[int(label)] = i + 1
    idx = lut[np.clip(seg, 0, top + 1)]  # ids outside the lookup (incl. > top) map to 0 via the spare slot
    return list(ndimage.find_objects(idx, max_label=len(labels)))


def _union_box(
    a: tuple[slice, ...], b: tuple[slice, ...], shape: Sequence[int], margin: int = 1
) -> tuple[slice, ...]:
    return tuple(
        slice(max(min(sa.start, sb.start) - margin, 0), min(max(sa.stop, sb.stop) + margin, n))
        for sa, sb, n in zip(a, b, shape, strict=True)
    )


def structure_metrics(
    warped_seg: Tensor,
    fixed_seg: Tensor,
    labels: Sequence[int] | Mapping[int, str],
    spacing: Sequence[float],
    surface: bool = True,
    hd95: bool = True,
) -> dict[int, dict[str, float]]:
    """Per-structure DSC, symmetric ASD (mm) and HD95 (mm).

    Args:
        warped_seg: ``[1, 1, D, H, W]`` or ``[D, H, W]`` integer label map (the moving segmentation warped, nearest).
        fixed_seg: same shape, the fixed segmentation (the reference).
        labels: label ids to evaluate (a dict's keys are used).
        spacing: voxel spacing in mm along ``(D, H, W)`` (see :func:`spacing_from_affine`).
        surface: compute ASD and HD95 (the costly part); ``False`` leaves them NaN.
        hd95: with ``surface``, compute HD95 too (``False`` leaves it NaN: ASD only).
    Returns:
        ``{label: {"dsc": ..., "asd_mm": ..., "hd95_mm": ...}}``; NaN for absent structures as documented in the
        module docstring.
    """
    fn = "structure_metrics"
    pred = _check_seg(warped_seg, "warped_seg", fn)
    ref = _check_seg(fixed_seg, "fixed_seg", fn)
    if pred.shape != ref.shape:
        raise ValueError(
            f"{fn}: warped_seg {tuple(pred.shape)} and fixed_seg {tuple(ref.shape)} differ in shape"
        )
    if len(spacing) != 3:
        raise ValueError(f"{fn}: spacing must have 3 entries (D, H, W); got {list(spacing)}")
    sp = [float(s) for s in spacing]
    label_list = [int(label) for label in labels]
    # MONAI is imported here, not with the module: learnsim-register's summary needs only mean_dice and
    # jacobian_stats, and importing MONAI costs ~2 s of a 30 s registration
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    pred_np = pred.detach().cpu().numpy()
    ref_np = ref.detach().cpu().numpy()
    out: dict[int, dict[str, float]] = {}
    if not label_list:
        return out
    # One pass per volume for all bounding boxes; each structure is then handled inside its own small box (MONAI
    # crops again and zero-pads, so cropping with a margin of 1 leaves every metric unchanged).
    boxes_pred = _label_boxes(pred_np, label_list)
    boxes_ref = _label_boxes(ref_np, label_list)
    for label, box_a, box_b in zip(label_list, boxes_pred, boxes_ref, strict=True):
        row = {"dsc": _NAN, "asd_mm": _NAN, "hd95_mm": _NAN}
        out[label] = row
        if box_b is None:
            continue
        if box_a is None:
            row["dsc"] = 0.0
            continue
        box = _union_box(box_a, box_b, pred_np.shape)
        ya = torch.from_numpy(pred_np[box] == label)[None, None].float()
        yb = torch.from_numpy(ref_np[box] == label)[None, None].float()
        row["dsc"] = float(compute_dice(ya, yb, include_background=True, ignore_empty=True)[0, 0])
        if surface:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row["asd_mm"] = float(
                    compute_average_surface_distance(
                        ya, yb, include_background=True, symmetric=True, spacing=sp
                    )[0, 0]
                )
                if hd95:
                    row["hd95_mm"] = float(
                        compute_hausdorff_distance(
                            ya, yb, include_background=True, percentile=95, spacing=sp
                        )[0, 0]
                    )
    return out


def dice_per_structure(
    warped_seg: Tensor, fixed_seg: Tensor, labels: Sequence[int] | Mapping[int, str]
) -> dict[int, float]:
    """DSC only (cheap): ``{label: dsc}`` with the same absent-structure rules as :func:`structure_metrics`."""
    res = structure_metrics(warped_seg, fixed_seg, labels, (1.0, 1.0, 1.0), surface=False)
    return {k: v["dsc"] for k, v in res.items()}


def _check_detj(detj: Tensor, fn: str) -> Tensor:
    if detj.dim() != 5 or detj.shape[1] != 1:
        raise ValueError(f"{fn}: det J must be [B, 1, D, H, W]; got {tuple(detj.shape)}")
    return detj


def _check_mask(mask: Tensor | None, like: Tensor, fn: str) -> Tensor | None:
    if mask is None:
        return None
    if mask.dim() == 3:
        mask = mask[None, None]
    if mask.shape[2:] != like.shape[2:]:
        raise ValueError(f"{fn}: mask grid {tuple(mask.shape)} does not match {tuple(like.shape)}")
    return (mask > 0).to(like.device).expand_as(like)


def folding(detj: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Folded voxels (``det J <= 0``).

    Args:
        detj: ``[B, 1, D, H, W]`` Jacobian determinants.
        mask: optional ``[B or 1, 1, D, H, W]`` (or ``[D, H, W]``) region; default the whole grid.
    Returns:
        ``(count, percent)``, each ``[B]``: the number of folded voxels and their percentage of the voxels
        considered (0 when the region is empty).
    """
    detj = _check_detj(detj, "folding")
    region = _check_mask(mask, detj, "folding")
    folded = detj <= 0
    if region is not None:
        folded = folded & region
        total = region.flatten(1).sum(1).double()
    else:
        total = torch.full((detj.shape[0],), float(detj[0].numel()), dtype=torch.float64, device=detj.device)
    count = folded.flatten(1).sum(1)
    pct = torch.where(total > 0, 100.0 * count.double() / total.clamp_min(1), torch.zeros_like(total))
    return count, pct


def sdlogj(detj: Tensor, mask: Tensor | None = None) -> Tensor:
    """Standard deviation (ddof 0) of ``log det J`` over voxels with ``det J > 0`` (and inside ``mask``).

    Args:
        detj: ``[B, 1, D, H, W]``.
        mask: optional region as in :func:`folding`.
    Returns:
        ``[B]`` float64 (NaN where no voxel qualifies). Dimensionless.
    """
    detj = _check_detj(detj, "sdlogj")
    region = _check_mask(mask, detj, "sdlogj")
    valid = detj > 0
    if region is not None:
        valid = valid & region
    out = []
    for b in range(detj.shape[0]):
        vals = detj[b][valid[b]].double()
        out.append(
            torch.log(vals).std(correction=0) if vals.numel() > 0 else torch.tensor(_NAN, dtype=torch.float64)
        )
    return torch.stack(out).cpu()


def jacobian_stats(disp: Tensor, mask: Tensor | None = None) -> dict[str, float]:
    """Regularity summary of one transformation ``id + disp`` (``disp`` ``[1, 3, D, H, W]``, voxels).

    Returns ``folding_voxels`` / ``folding_pct`` over the whole grid, ``folding_voxels_mask`` /
    ``folding_pct_mask`` inside ``mask`` (NaN without a mask), ``sdlogj`` inside ``mask`` (whole grid without one),
    and ``detj_min`` / ``detj_max``.
    """
    if disp.dim() != 5 or disp.shape[:2] != (1, 3):
        raise ValueError(f"jacobian_stats: disp must be [1, 3, D, H, W] (voxels); got {tuple(disp.shape)}")
    detj = jacobian_det(disp)
    count, pct = folding(detj)
    res = {
        "folding_voxels": int(count[0]),
        "folding_pct": float(pct[0]),
        "folding_voxels_mask": _NAN,
        "folding_pct_mask": _NAN,
        "sdlogj": float(sdlogj(detj, mask)[0]),
        "detj_min": float(detj.min()),
        "detj_max": float(detj.max()),
    }
    if mask is not None:
        mcount, mpct = folding(detj, mask)
        res["folding_voxels_mask"] = int(mcount[0])
        res["folding_pct_mask"] = float(mpct[0])
    return res


def mean_dice(pred: Tensor, target: Tensor, labels: Sequence[int] | None = None) -> Tensor:
    """Mean Dice over labels of one pair's label maps (any shape, integer), in torch on any device (for logging).

    ``labels`` defaults to the non-zero labels present in ``target``; a label absent from both maps is skipped.
    Returns a 0-dim tensor, NaN if no label counts.
    """
    if labels is None:
        labels = [int(x) for x in torch.unique(target).tolist() if x != 0]
    scores = []
    for lab in labels:
        p, t = pred == lab, target == lab
        denom = p.sum() + t.sum()
        if denom > 0:
            scores.append(2.0 * (p & t).sum() / denom)
    return torch.stack(scores).float().mean() if scores else torch.tensor(math.nan, device=pred.device)
