"""Evaluator end to end on a small phantom: tables, summary, NIfTI outputs with the fixed affine, figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from learnsim.evaluation.evaluator import METRIC_COLUMNS, PER_PAIR_COLUMNS, Evaluator
from learnsim.evaluation.figures import calibration_plot, output_grid, plane_views, structure_boxplots

SHAPE = (12, 14, 16)
# LPS-like, anisotropic, axis-permuted voxel -> mm
AFFINE = np.array(
    [
        [0.0, 0.0, -0.7, 40.0],
        [-2.5, 0.0, 0.0, 60.0],
        [0.0, 1.0, 0.0, -30.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
STRUCTS = {10: "L thalamus", 49: "R thalamus", 16: "brain stem"}  # 16 is absent from the phantom
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _phantom() -> dict[str, torch.Tensor]:
    g = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in SHAPE], indexing="ij"))
    c = torch.tensor(SHAPE, dtype=torch.float32).view(3, 1, 1, 1) / 2
    r = (((g - c) / c) ** 2).sum(0).sqrt()
    img = ((1 - r).clamp(0, 1) * (1 + 0.3 * torch.sin(g[2] / 2)))[None, None]
    img = img / img.max()
    seg = torch.zeros(1, 1, *SHAPE, dtype=torch.int64)
    seg[..., 3:6, 4:8, 4:9] = 10
    seg[..., 6:9, 6:10, 8:12] = 49
    return {"img": img, "seg": seg, "mask": (r < 1)[None, None]}


def _png_ok(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5_000
    assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def identity_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """Two pairs: moving = fixed, all samples the identity (pair a), or a constant shift (pair b)."""
    out = tmp_path_factory.mktemp("run_identity")
    ph = _phantom()
    ev = Evaluator(out, structures=STRUCTS, seed=1, metric_samples=2)
    zeros = torch.zeros(3, 1, 3, *SHAPE)
    first = ev.add_pair(
        "a",
        ph["img"],
        ph["img"],
        ph["seg"],
        ph["seg"],
        ph["mask"],
        AFFINE,
        zeros,
        zeros[0],
        1.25,
        {"loss": 0.5},
    )
    shift = torch.zeros(1, 3, *SHAPE)
    shift[:, 1] = 2.0  # two voxels along H
    samples = torch.stack([shift - 0.5 * (shift != 0), shift + 0.5 * (shift != 0)])
    ev.add_pair(
        "b",
        ph["img"],
        ph["img"],
        ph["seg"],
        ph["seg"],
        None,
        torch.as_tensor(AFFINE),
        samples,
        shift,
        2.0,
        {"loss": 0.25},
    )
    summary = ev.finalize()
    return out, first, summary


def test_identity_pair_is_perfect(identity_run) -> None:
    out, first, _ = identity_run
    assert first["folding_voxels"] == 0 and first["folding_pct"] == 0.0
    assert first["sdlogj"] == pytest.approx(0.0, abs=1e-7)
    assert first["seconds"] == 1.25 and first["loss"] == 0.5
    assert first["n_samples"] == 3 and first["n_metric_samples"] == 2
    assert first["uncertainty_mean_mm"] == 0.0
    metrics = pd.read_csv(out / "metrics.csv")
    a = metrics[(metrics["pair"] == "a") & (metrics["label"] != 16)]
    assert len(a) == 2 * 2  # 2 samples x 2 present structures
    assert np.allclose(a["dsc"], 1.0) and np.all(a["asd_mm"] == 0) and np.all(a["hd95_mm"] == 0)


def test_tables_and_summary(identity_run) -> None:
    out, _, summary = identity_run
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics.columns) == METRIC_COLUMNS
    assert len(metrics) == 2 * 2 * len(STRUCTS)  # pairs x samples x structures
    assert set(metrics["sample"]) == {0, 1}
    absent = metrics[metrics["label"] == 16]
    assert absent[["dsc", "asd_mm", "hd95_mm"]].isna().all().all()
    mean_rows = pd.read_csv(out / "metrics_mean.csv")
    assert list(mean_rows.columns) == METRIC_COLUMNS and set(mean_rows["sample"]) == {-1}
    before = pd.read_csv(out / "metrics_before.csv")
    assert list(before.columns) == METRIC_COLUMNS and set(before["sample"]) == {-2}
    # moving seg = fixed seg in both pairs: DSC 1 before registration (NaN where the structure is absent);
    # pair a's posterior mean is the identity, so its rows equal the before rows
    present = before["label"] != 16
    assert np.allclose(before.loc[present, "dsc"], 1.0) and before.loc[~present, "dsc"].isna().all()
    a_mean, a_before = mean_rows[mean_rows["pair"] == "a"], before[before["pair"] == "a"]
    assert np.allclose(a_mean["dsc"].to_numpy(), a_before["dsc"].to_numpy(), equal_nan=True)
    per_pair = pd.read_csv(out / "per_pair.csv")
    assert list(per_pair.columns[: len(PER_PAIR_COLUMNS)]) == PER_PAIR_COLUMNS
    assert per_pair["pair"].tolist() == ["a", "b"] and per_pair["loss"].tolist() == [0.5, 0.25]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert summary["n_pairs"] == 2
    assert summary["structures"]["brain stem"]["dsc"]["n"] == 0
    assert summary["structures"]["brain stem"]["dsc"]["n_nan"] == 4
    assert summary["structures"]["L thalamus"]["label"] == 10
    for key in ("dsc", "asd_mm", "hd95_mm"):
        assert set(summary["overall"][key]) == {"mean", "std", "n", "n_nan"}
    assert summary["before_registration"]["dsc"]["mean"] == pytest.approx(1.0)
    assert summary["mean_transformation"]["dsc"]["mean"] < 1.0  # pair b's mean is shifted
    assert summary["seconds"]["mean"] == pytest.approx(1.625)
    assert "pooled_spearman_disagreement" in summary["calibration"]
    bins = pd.read_csv(out / "calibration_bins.csv")
    assert {"u_mean", "disagreement_mean", "error_mean", "n_voxels"} <= set(bins.columns)


def test_nifti_outputs_carry_the_fixed_affine(identity_run) -> None:
    out, _, _ = identity_run
    ph = _phantom()
    for pair in ("a", "b"):
        folder = out / "pairs" / pair
        for name in ("warped", "warped_seg", "disp_mm", "uncertainty_mm"):
            img = nib.load(str(folder / f"{name}.nii.gz"))
            assert np.allclose(img.affine, AFFINE), name
            assert np.allclose(img.get_sform(), AFFINE) and np.allclose(img.get_qform(), AFFINE, atol=1e-5)
            assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(AFFINE)
        # same array orientation as the tensors: voxel (d, h, w) on disk is voxel (d, h, w) in memory
        warped = nib.load(str(folder / "warped.nii.gz")).get_fdata()
        assert warped.shape == SHAPE
        if pair == "a":
            assert np.allclose(warped, ph["img"][0, 0].numpy(), atol=1e-6)
            seg = np.asarray(nib.load(str(folder / "warped_seg.nii.gz")).dataobj)
            assert np.array_equal(seg, ph["seg"][0, 0].numpy())
    disp = nib.load(str(out / "pairs" / "b" / "disp_mm.nii.gz")).get_fdata()
    assert disp.shape == (*SHAPE, 3)
    expected = AFFINE[:3, :3] @ np.array([0.0, 2.0, 0.0])  # 2 voxels along H = 2 mm along world z
    assert np.allclose(disp, expected.reshape(1, 1, 1, 3), atol=1e-6)
    unc = nib.load(str(out / "pairs" / "b" / "uncertainty_mm.nii.gz")).get_fdata()
    assert np.allclose(unc, 0.5 * 1.0, atol=1e-6)  # antithetic +/- 0.5 voxel along H (1.0 mm)


def test_figures_written(identity_run) -> None:
    out, _, _ = identity_run
    for path in (out / "pairs" / "a" / "output_grid.png", out / "boxplots.png", out / "calibration.png"):
        _png_ok(path)
    assert (out / "pairs" / "a" / "summary.json").is_file()


def test_bad_inputs_are_rejected(tmp_path: Path) -> None:
    ph = _phantom()
    ev = Evaluator(tmp_path, structures=STRUCTS, figures=False, save_nifti=False)
    zeros = torch.zeros(1, 1, 3, *SHAPE)
    args = (ph["img"], ph["img"], ph["seg"], ph["seg"], None, AFFINE)
    with pytest.raises(ValueError, match="pair_id"):
        ev.add_pair("../x", *args, zeros, zeros[0], 0.0)
    with pytest.raises(ValueError, match="sample_disps"):
        ev.add_pair("p", *args, zeros[0], zeros[0], 0.0)
    with pytest.raises(ValueError, match="both fixed_seg and moving_seg"):
        ev.add_pair("p", ph["img"], ph["img"], ph["seg"], None, None, AFFINE, zeros, zeros[0], 0.0)
    ev.add_pair("p", *args, zeros, zeros[0], 0.0)
    with pytest.raises(ValueError, match="already added"):
        ev.add_pair("p", *args, zeros, zeros[0], 0.0)
    assert not (tmp_path / "pairs" / "p" / "warped.nii.gz").exists()


def test_without_segmentations(tmp_path: Path) -> None:
    ph = _phantom()
    ev = Evaluator(tmp_path, structures=STRUCTS, figures=False)
    samples = torch.randn(4, 1, 3, *SHAPE) * 0.1
    res = ev.add_pair(
        "noseg", ph["img"], ph["img"], None, None, ph["mask"], AFFINE, samples, samples.mean(0), 0.1
    )
    assert res["n_metric_samples"] == 0 and math.isnan(res["spearman_error"])
    summary = ev.finalize()
    assert summary["overall"]["dsc"]["n"] == 0 and summary["n_pairs"] == 1
    assert len(pd.read_csv(tmp_path / "metrics.csv")) == 0
    assert not (tmp_path / "pairs" / "noseg" / "warped_seg.nii.gz").exists()


def test_plane_views_follow_the_affine() -> None:
    ras = np.diag([1.0, 1.0, 1.0, 1.0])
    views = {v.name: v for v in plane_views(ras, (10, 12, 14))}
    assert views["axial"].normal == 2 and views["coronal"].normal == 1 and views["sagittal"].normal == 0
    # coronal of RAS: rows = S/I axis (2) with superior on top, columns = L/R axis (0) with right on the right
    vol = np.zeros((10, 12, 14))
    vol[9, 6, 13] = 1.0  # far right, superior
    cut = views["coronal"].cut(vol)
    assert cut.shape == (14, 10) and cut[0, -1] == 1.0
    assert views["coronal"].edges == ("S", "I", "L", "R")
    lps = {v.name: v for v in plane_views(AFFINE, SHAPE)}
    # AFFINE: voxel axis 0 -> -y (P), 1 -> +z (S), 2 -> -x (L)
    assert lps["axial"].normal == 1 and lps["coronal"].normal == 0 and lps["sagittal"].normal == 2
    assert lps["axial"].aspect == pytest.approx(
        2.5 / 0.7
    )  # rows along A/P (2.5 mm), columns along L/R (0.7 mm)


def test_figure_functions_write_pngs(tmp_path: Path) -> None:
    ph = _phantom()
    disp = torch.randn(1, 3, *SHAPE) * 0.5
    output_grid(tmp_path / "grid.png", ph["img"], ph["img"], ph["img"], disp, AFFINE)  # no uncertainty: "n/a"
    _png_ok(tmp_path / "grid.png")
    rng = np.random.default_rng(0)
    runs = {
        name: pd.DataFrame(
            {
                "pair": np.repeat(["p0", "p1", "p2"], 4),
                "sample": 0,
                "structure": np.tile(["A", "B", "C", "D"], 3),
                "dsc": rng.uniform(0.6, 0.9, 12) + shift,
                "asd_mm": rng.uniform(0.5, 2.0, 12),
            }
        )
        for name, shift in (("baseline", 0.0), ("learnt", 0.05), ("third", -0.1))
    }
    structure_boxplots(runs, tmp_path / "box.png")
    _png_ok(tmp_path / "box.png")
    bins = pd.DataFrame(
        {"u_mean": [0.1, 0.2, 0.3], "disagreement_mean": [0.0, 0.1, 0.3], "error_mean": [0.1, 0.2, 0.2]}
    )
    calibration_plot({"baseline": bins, "learnt": bins * 1.1}, tmp_path / "cal.png")
    _png_ok(tmp_path / "cal.png")


def test_structure_missing_from_moving_is_nan_not_zero(tmp_path: Path) -> None:
    ph = _phantom()
    moving_seg = ph["seg"].clone()
    moving_seg[moving_seg == 49] = 0  # the moving subject has no R thalamus label at all
    ev = Evaluator(tmp_path, structures=STRUCTS, figures=False, save_nifti=False)
    zeros = torch.zeros(2, 1, 3, *SHAPE)
    ev.add_pair("m", ph["img"], ph["img"], ph["seg"], moving_seg, None, AFFINE, zeros, zeros[0], 0.0)
    summary = ev.finalize()
    rows = pd.read_csv(tmp_path / "metrics.csv").set_index(["sample", "label"])
    assert rows.loc[(0, 49), ["dsc", "asd_mm", "hd95_mm"]].isna().all()
    assert rows.loc[(0, 10), "dsc"] == pytest.approx(1.0)
    assert summary["structures"]["R thalamus"]["dsc"]["n_nan"] == 2
