"""The label-contour overlay: file written, size, one contour colour per structure present; evaluator and register."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from learnsim.evaluation.figures import label_overlay, label_overlay_size, structure_colours

SHAPE = (24, 26, 22)
STRUCTS = {10: "L thalamus", 49: "R thalamus", 17: "L hippocampus", 53: "R hippocampus"}
RAS = np.diag([2.0, 2.0, 2.0, 1.0])


def _volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A smooth image, a fixed segmentation with 3 of the 4 structures, and a shifted moving one."""
    g = np.random.default_rng(0)
    img = np.clip(g.normal(0.5, 0.1, SHAPE), 0, 1).astype(np.float32)
    seg = np.zeros(SHAPE, dtype=np.int64)
    seg[6:12, 8:14, 8:14] = 10
    seg[13:19, 8:14, 8:14] = 49
    seg[7:11, 15:20, 6:11] = 17  # 53 (R hippocampus) is absent everywhere
    moving = np.roll(seg, (2, 1, -1), axis=(0, 1, 2))
    return img, seg, moving


def _colour_pixels(png: np.ndarray, rgb: tuple[float, float, float], tol: float = 0.02) -> int:
    return int((np.abs(png[..., :3] - np.asarray(rgb)[None, None]) < tol).all(-1).sum())


def test_label_overlay_writes_png_of_documented_size(tmp_path: Path) -> None:
    img, seg, moving = _volumes()
    path = label_overlay(tmp_path / "a" / "ov.png", img, moving, RAS, fixed_seg=seg, moving_seg=moving,
                         structures=STRUCTS, dpi=40, title="t")
    assert path.is_file() and path.stat().st_size > 2_000
    h, w = imread(path).shape[:2]
    assert (w, h) == label_overlay_size(3, legend=True, dpi=40)
    # documented: (0.25 + 2.4 * columns + 1.7) x (2.4 * 3 + 0.5) inches
    assert (w, h) == (366, 308)
    # one column (no fixed or moving segmentation), no legend: narrower, same height
    one = label_overlay(tmp_path / "one.png", torch.from_numpy(img)[None, None], torch.from_numpy(moving)[None, None],
                        torch.from_numpy(RAS), structures=STRUCTS, legend=False, dpi=40)
    h1, w1 = imread(one).shape[:2]
    assert (w1, h1) == (106, 308)


def test_label_overlay_draws_one_colour_per_structure_present(tmp_path: Path) -> None:
    img, seg, moving = _volumes()
    colours = structure_colours(list(STRUCTS))
    assert len(set(colours.values())) == len(STRUCTS)  # distinct
    assert all(not np.allclose(c, c[0]) for c in colours.values())  # no grey: it would vanish on the image
    # legend off: every coloured pixel comes from a contour
    png = imread(label_overlay(tmp_path / "ov.png", img, moving, RAS, fixed_seg=seg, moving_seg=moving,
                               structures=STRUCTS, legend=False, dpi=80))
    for label in (10, 49, 17):
        assert _colour_pixels(png, colours[label]) > 20, STRUCTS[label]
    assert _colour_pixels(png, colours[53]) == 0  # absent structure: no contour
    # a structure only the fixed segmentation has is drawn too (atlas column), with its own colour
    no_hippo = np.where(moving == 17, 0, moving)
    png = imread(label_overlay(tmp_path / "ov2.png", img, no_hippo, RAS, fixed_seg=seg, structures=STRUCTS,
                               legend=False, reference_outlines=False, dpi=80))
    assert _colour_pixels(png, colours[17]) > 5
    png = imread(label_overlay(tmp_path / "ov3.png", img, no_hippo, RAS, structures=STRUCTS, legend=False, dpi=80))
    assert _colour_pixels(png, colours[17]) == 0 and _colour_pixels(png, colours[10]) > 20


def test_label_overlay_rejects_a_segmentation_on_another_grid(tmp_path: Path) -> None:
    img, seg, _ = _volumes()
    with pytest.raises(ValueError, match="label_overlay: fixed_seg"):
        label_overlay(tmp_path / "x.png", img, seg, RAS, fixed_seg=seg[:-1])
    assert not (tmp_path / "x.png").exists()


def test_evaluator_writes_label_overlay_per_pair(tmp_path: Path) -> None:
    from learnsim.evaluation.evaluator import Evaluator

    img, seg, moving = _volumes()
    t = lambda a, dt=torch.float32: torch.from_numpy(np.ascontiguousarray(a)).to(dt)[None, None]  # noqa: E731
    ev = Evaluator(tmp_path, structures=STRUCTS, save_nifti=False, calibration_voxels=100)
    disp = torch.zeros(1, 3, *SHAPE)
    ev.add_pair("p0", t(img), t(img), t(seg, torch.long), t(moving, torch.long), None, RAS, disp[None].repeat(2, 1, 1, 1, 1, 1),
                disp, 0.1)
    ev.add_pair("p1", t(img), t(img), None, None, None, RAS, disp[None], disp, 0.1)
    assert (tmp_path / "pairs" / "p0" / "label_overlay.png").stat().st_size > 2_000
    assert (tmp_path / "pairs" / "p0" / "output_grid.png").is_file()
    assert not (tmp_path / "pairs" / "p1" / "label_overlay.png").exists()  # no segmentations, no overlay


def test_register_cli_writes_figures_with_seg(tmp_path: Path) -> None:
    from learnsim.cli.register import main
    from learnsim.io import save_nifti

    img, seg, moving = _volumes()
    paths = {}
    for name, arr, dt in (("fixed", img, np.float32), ("moving", np.roll(img, 1, 0), np.float32),
                          ("seg", moving, np.int16), ("fixed_seg", seg, np.int16)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        save_nifti(paths[name], arr, RAS, dt)
    out = tmp_path / "reg"
    assert main([str(paths["fixed"]), str(paths["moving"]), "--seg", str(paths["seg"]), "--fixed-seg",
                 str(paths["fixed_seg"]), "--out", str(out), "no_iters=2", "no_samples=2", "no_steps=2"]) == 0
    info = json.loads((out / "registration.json").read_text())
    assert info["figures"] == ["output_grid.png", "label_overlay.png"]
    h, w = imread(out / "label_overlay.png").shape[:2]
    assert (w, h) == label_overlay_size(3)  # atlas, before, after
    out2 = tmp_path / "reg2"
    assert main([str(paths["fixed"]), str(paths["moving"]), "--out", str(out2), "no_iters=2", "no_samples=2",
                 "no_steps=2"]) == 0
    assert (out2 / "output_grid.png").is_file() and not (out2 / "label_overlay.png").exists()
