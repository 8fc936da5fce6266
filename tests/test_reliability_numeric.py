"""Issue 29 (crash and silent-wrong-result items): non-finite values never reach memory outside a kernel's arrays, a
diverged fit is detected, inputs that cannot be registered are refused, and every numeric setting of
``learnsim-register``, ``learnsim-test`` and ``learnsim-train`` is either refused with one line naming the key and its
range or runs to a finite result."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import blob
from omegaconf import OmegaConf

from learnsim import api
from learnsim.cli import register as register_cli
from learnsim.data.validate import DataValidationError, validate_pairs
from learnsim.divergence import FitDiverged
from learnsim.kernels import use_backend
from learnsim.metric import build_metric
from learnsim.metric_checkpoint import load_learnt_metric
from learnsim.ranges import CONFIG_KEYS, REGISTER_KEYS, check_config, warn_ignored_lr
from learnsim.registration import VariationalRegistration
from learnsim.transformation import SVF

# A crash here (a NaN coordinate sent a tap index past the array) kills the interpreter: run it in a child process.
_KERNEL_PROBE = textwrap.dedent('''
    import torch
    from learnsim.kernels import ops

    for dtype in (torch.float32, torch.float64):
        for bad in (float("nan"), float("inf"), -float("inf"), 1e30, -1e30):
            for where in ("one", "all"):
                v = torch.zeros(2, 3, 8, 9, 10, dtype=dtype)
                if where == "one":
                    v[0, 0, 3, 4, 5] = bad
                    v[1, 2, 0, 0, 0] = bad
                else:
                    v.fill_(bad)
                leaf = v.clone().requires_grad_(True)
                ops.integrate_svf(leaf, 4).sum().backward()
                img = torch.rand(1, 1, 8, 9, 10, dtype=dtype, requires_grad=True)
                disp = v.clone().requires_grad_(True)
                warped = ops.warp(img, disp)
                warped.sum().backward()
                assert torch.isfinite(img.grad).any() or where == "all"
                ops.smooth(v, [0.25, 0.5, 0.25])
                ops.l2_gradient_energy(v.clone().requires_grad_(True), 1.0)
                m = warped.detach()[:1].clone().requires_grad_(True)
                ops.lcc(img.detach(), m, None, 1).sum().backward()
                lv = v[:, :1].clone().requires_grad_(True)
                pair, ent = ops.antithetic_pair(v[:, :1], lv, v[:, None, :1].clone(), torch.randn_like(lv),
                                                torch.randn(2, 1, dtype=dtype))
                (pair.sum() + ent.sum()).backward()
    print("kernels ok")
''')


def test_kernels_survive_nan_inf_and_huge_coordinates():
    """Issue 29 item 7: every numba kernel run on fields holding NaN, +-inf and +-1e30 returns (exit 0, no signal)."""
    proc = subprocess.run([sys.executable, "-c", _KERNEL_PROBE], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-2000:]}"
    assert "kernels ok" in proc.stdout


# ------------------------------------------------------------------------------------------- shared tiny inputs
SHAPE = (12, 14, 10)
AFF = np.diag([2.0, 2.0, 2.0, 1.0])


def _save(path: Path, arr: np.ndarray, aff: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(arr, AFF if aff is None else aff), path)
    return str(path)


@pytest.fixture()
def pair(tmp_path: Path) -> dict[str, str]:
    """A 12x14x10 pair of shifted blobs (NIfTI) and the moving image's label map."""
    moving = blob(SHAPE, (7, 6, 5), 3.0)
    return {"fixed": _save(tmp_path / "fixed.nii.gz", blob(SHAPE, (6, 7, 5), 3.0)),
            "moving": _save(tmp_path / "moving.nii.gz", moving),
            "seg": _save(tmp_path / "seg.nii.gz", (moving > 0.5).astype(np.int16))}


def _cli(pair: dict[str, str], out: Path, *extra: str) -> int:
    return register_cli.main([pair["fixed"], pair["moving"], "--out", str(out), "--no-figures", "no_iters=2",
                              "no_samples=2", *extra])


def _one_line(exc: SystemExit, *words: str) -> str:
    msg = str(exc.code)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


# ------------------------------------------------------------------------------------------- 8: divergence
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_diverged_fit_stops_with_one_line_and_writes_nothing(pair, tmp_path, backend):
    """Issue 29 item 8: lr=1000 diverges (NaN loss): one line naming the keys to lower, nothing written (was: rc 0,
    all-NaN disp_mm / uncertainty_mm and '0 folding voxels'; a segfault with the numba kernels)."""
    out = tmp_path / "out"
    with use_backend(backend), pytest.raises(SystemExit) as exc:
        _cli(pair, out, "no_iters=20", "lr=1000")
    _one_line(exc.value, "diverged", "lr", "level_lr", "data_weight")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_fit_raises_fit_diverged_on_a_nan_field():
    """A q_v that holds NaN (e.g. a NaN warm start) is reported by the fit itself, with the iteration."""
    reg = VariationalRegistration.paper("ssd", no_iters=3)
    fixed = torch.from_numpy(blob(SHAPE, (6, 7, 5), 3.0))[None, None]
    params = reg.init_params(1, SHAPE)
    params.loc[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(FitDiverged, match="iteration"):
        reg.fit(fixed, fixed, params=params)


def test_learnsim_test_marks_a_diverged_pair_failed(cfg_test, tmp_path):
    """learnsim-test: a diverged pair is FAILED, not averaged in, and listed in summary.json (was: NaN averaged)."""
    from learnsim.cli.test import evaluate

    cfg = cfg_test.copy()
    cfg.q_v.level_lr = [1000.0, 1000.0, 1000.0]
    cfg.q_v.level_iters = [16, 16, 16]
    summary = evaluate(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["n_failed"] == 1 and saved["n_failed"] == 1 and summary["n_pairs"] == 0
    assert "diverged" in saved["failed_pairs"][0]["reason"]


def test_evaluate_marks_a_pair_without_overlap_failed(tmp_path):
    """Issue 29 item 9: a moving image that missed the atlas (all zero on its grid) is FAILED, not averaged in."""
    from conftest import PhantomPairs

    from learnsim.evaluation.run import evaluate as run_evaluation

    data = PhantomPairs(n=2, dims=(12, 12, 12))
    batches = []
    for i in range(2):
        item = data[i]
        if i == 1:
            item["moving"] = torch.zeros_like(item["moving"])
        batches.append({k: (v.unsqueeze(0) if isinstance(v, torch.Tensor) else [v]) for k, v in item.items()})
    reg = VariationalRegistration.paper("ssd", no_iters=2, transformation=SVF(3))
    lines: list[str] = []
    summary = run_evaluation(reg, batches, tmp_path / "run", no_samples=2, no_samples_uncertainty=2,
                             save_nifti=False, figures=False, echo=lines.append)
    assert summary["n_pairs"] == 1 and summary["n_failed"] == 1
    assert summary["failed_pairs"][0]["pair"] == "pair1" and "overlap" in summary["failed_pairs"][0]["reason"]
    assert any("WARNING" in line and "pair1" in line for line in lines)


# ------------------------------------------------------------------------------------------- 9: no overlap
def test_moving_image_without_overlap_is_refused(pair, tmp_path):
    """Issue 29 item 9: a moving image 1000 mm away was registered as an all-zero image (rc 0), validate said OK."""
    far = AFF.copy()
    far[0, 3] = 1000.0
    moving = _save(tmp_path / "far.nii.gz", blob(SHAPE, (7, 6, 5), 3.0), far)
    with pytest.raises(ValueError, match="does not overlap"):
        api.register(pair["fixed"], moving, "ssd", no_iters=2, no_samples=0)
    with pytest.raises(ValueError, match="does not overlap"):  # with histmatch: not "empty mask"
        api.register(pair["fixed"], moving, "ssd", no_iters=2, no_samples=0, histmatch=True)
    (tmp_path / "pairs.csv").write_text(f"fixed,moving\n{pair['fixed']},{moving}\n")
    with pytest.raises(DataValidationError, match="does not overlap"):
        validate_pairs(tmp_path / "pairs.csv")


def test_values_beyond_float32_are_refused(pair, tmp_path):
    """Issue 29 item 9: float64 values beyond float32's range became inf, then an all-zero image."""
    huge = blob(SHAPE, (7, 6, 5), 3.0).astype(np.float64) * 1e300
    moving = _save(tmp_path / "huge.nii.gz", huge)
    with pytest.raises(ValueError, match="float32"):
        api.register(pair["fixed"], moving, "ssd", no_iters=2, no_samples=0)
    (tmp_path / "pairs.csv").write_text(f"fixed,moving\n{pair['fixed']},{moving}\n")
    with pytest.raises(DataValidationError, match="float32"):
        validate_pairs(tmp_path / "pairs.csv")


# ------------------------------------------------------------------------------------------- 10: labels
def test_label_ids_beyond_int16_survive_preprocessing():
    """Issue 29 item 10: label 40000 became -25536 (int16 cast)."""
    from learnsim.data.preprocess import Grid, resample_to_grid

    labels = np.zeros(SHAPE, np.int32)
    labels[3:6, 3:6, 3:6] = 40000
    labels[7:9, 7:9, 2:4] = 17
    out = resample_to_grid(labels, AFF, Grid(SHAPE, AFF), "labels")
    assert set(np.unique(out).tolist()) == {0, 17, 40000}
    small = resample_to_grid(np.where(labels == 40000, 5, labels), AFF, Grid(SHAPE, AFF), "labels")
    assert small.dtype == np.int16  # ids that fit keep int16


def test_register_keeps_label_ids_beyond_int16(pair, tmp_path):
    seg = np.where(nib.load(pair["seg"]).get_fdata() > 0, 40000, 0).astype(np.int32)
    pair = {**pair, "seg": _save(tmp_path / "seg40k.nii.gz", seg)}
    out = tmp_path / "out"
    assert _cli(pair, out, "--seg", pair["seg"]) == 0
    assert set(np.unique(np.asarray(nib.load(out / "warped_seg.nii.gz").dataobj)).tolist()) <= {0, 40000}
    assert 40000 in np.asarray(nib.load(out / "warped_seg.nii.gz").dataobj)


def test_non_integer_labels_are_refused(pair, tmp_path):
    """Issue 29 item 10: labels 1.5 / 10.4 were rounded silently, in register and in learnsim-data validate."""
    seg = (blob(SHAPE, (7, 6, 5), 3.0) > 0.5) * 10.4
    path = _save(tmp_path / "frac.nii.gz", seg.astype(np.float32))
    with pytest.raises(ValueError, match="non-integer"):
        api.register(pair["fixed"], pair["moving"], "ssd", moving_seg=path, no_iters=2, no_samples=0)
    (tmp_path / "pairs.csv").write_text(
        f"fixed,moving,fixed_seg,moving_seg\n{pair['fixed']},{pair['moving']},{pair['seg']},{path}\n")
    with pytest.raises(DataValidationError, match="non-integer"):
        validate_pairs(tmp_path / "pairs.csv")


# ------------------------------------------------------------------------------------------- 17/18: inputs
@pytest.mark.parametrize("bad", ["nan", "singular"])
@pytest.mark.parametrize("side", ["fixed", "moving"])
def test_nan_or_singular_affine_is_refused(pair, tmp_path, bad, side):
    """Issue 29 17/18: a NaN affine ('SVD did not converge') or a singular one ended in a traceback."""
    aff = AFF.copy()
    if bad == "nan":
        aff[0, 0] = np.nan
    else:
        aff[2, :3] = 0.0
    arr = np.asarray(nib.load(pair[side]).dataobj)
    img = nib.Nifti1Image(arr, None)
    img.header.set_sform(aff, code=1)
    img.header.set_qform(None, code=0)
    path = tmp_path / f"bad_{side}.nii.gz"
    nib.save(img, path)
    with pytest.raises(SystemExit) as exc:
        _cli({**pair, side: str(path)}, tmp_path / "out")
    _one_line(exc.value, "affine")
    with pytest.raises(ValueError, match="affine"):
        t = torch.from_numpy(blob(SHAPE, (6, 7, 5), 3.0))
        api.register(t, torch.roll(t, 1, 0), "ssd", affine=aff, no_iters=2, no_samples=0)


def test_rgb_and_complex_nifti_are_refused(pair, tmp_path):
    """Issue 29 17/18: an RGB NIfTI ended in a traceback; a complex one lost its imaginary part silently."""
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = (blob(SHAPE, (7, 6, 5), 3.0) * 255).astype(np.uint8)
    cplx = blob(SHAPE, (7, 6, 5), 3.0).astype(np.complex64) * (1 + 1j)
    for name, arr in (("rgb", rgb), ("complex", cplx)):
        path = _save(tmp_path / f"{name}.nii.gz", arr)
        with pytest.raises(SystemExit) as exc:
            _cli({**pair, "moving": path}, tmp_path / "out")
        _one_line(exc.value, "one real value per voxel")


# ------------------------------------------------------------------------------------------- 15, 16: metrics
def test_upper_case_metric_name_records_its_own_schedule():
    """Issue 29 item 15: --metric LCC registered as LCC but recorded the SSD schedule."""
    assert register_cli._energy("LCC") == "lcc" and register_cli._energy("Cnn_LCC") == "lcc"
    assert register_cli._energy("SSD") == "ssd"


def test_voxelmorph_checkpoint_is_refused_as_a_metric(pair, tmp_path):
    """Issue 29 item 16: a VoxelMorph checkpoint given as a metric silently used its frozen baseline."""
    from learnsim.checkpoint import MODULE_KEY, ModuleKind

    ckpt = tmp_path / "vxm.ckpt"
    torch.save({MODULE_KEY: ModuleKind.VOXELMORPH.value, "state_dict": {"net.w": torch.zeros(1)},
                "hyper_parameters": {"metric_spec": {"kind": "ssd"}}}, ckpt)
    with pytest.raises(SystemExit) as exc:
        _cli(pair, tmp_path / "out", "--metric", str(ckpt))
    _one_line(exc.value, "VoxelMorph")
    with pytest.raises(ValueError, match="VoxelMorph"):
        api.register(pair["fixed"], pair["moving"], str(ckpt), no_iters=2, no_samples=0)
    with pytest.raises(ValueError, match="VoxelMorph"):
        load_learnt_metric(ckpt, "metric_ckpt")


def test_metric_with_nan_weights_is_refused(pair):
    """Issue 29 item 7: a metric checkpoint with NaN weights sent NaN fields into the kernels."""
    metric = build_metric("cnn_ssd")
    with torch.no_grad():
        next(metric.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or inf"):
        api.register(pair["fixed"], pair["moving"], metric, no_iters=2, no_samples=0)


# ------------------------------------------------------------------------------------------- 11, 12: settings
def test_learnsim_test_refuses_negative_or_nan_weights_and_unknown_split(cfg_test, tmp_path):
    """Issue 29 items 11, 12: metric.energy.weight=-100 ran (DSC 0.824 -> 0.150, rc 0); split=foo evaluated the
    validation pairs."""
    from learnsim.cli.test import evaluate

    for key, value in (("metric.energy.weight", -100.0), ("reg_loss.w_reg", -5.0), ("reg_loss.w_reg", float("nan")),
                       ("q_v.rank", 0), ("metric.energy.weight", float("inf")), ("split", "foo")):
        cfg = cfg_test.copy()
        OmegaConf.update(cfg, key, value)
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            evaluate(cfg, tmp_path / "run")
    cfg = cfg_test.copy()
    cfg.device = "cuda" if not torch.cuda.is_available() else "foo"
    with pytest.raises(ValueError, match="device"):
        evaluate(cfg, tmp_path / "run")


def test_learnsim_train_refuses_negative_weights(cfg_train):
    """Issue 29 item 11: learnsim-train accepted reg_loss.w_reg=-5 and NaN weights."""
    from learnsim.cli.train import train

    for key, value in (("reg_loss.w_reg", -5.0), ("metric.energy.weight", float("nan")), ("q_v.lr", float("inf"))):
        cfg = cfg_train.copy()
        OmegaConf.update(cfg, key, value)
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            train(cfg)


def test_q_v_lr_under_level_lr_warns(cfg_test, capsys):
    """Issue 29 item 11: q_v.lr was silently ignored under q_v=c2f (every demo experiment)."""
    msg = warn_ignored_lr(cfg_test, "learnsim-test", overrides=["q_v.lr=0.2"])
    assert msg is not None and "q_v.level_lr" in msg and "ignored" in capsys.readouterr().err
    assert warn_ignored_lr(cfg_test, "learnsim-test", overrides=["q_v.no_iters=3"]) is None


# ------------------------------------------------------------------------------------------- fuzz
FUZZ = [0, -1, float("nan"), float("inf"), 1e30, 10**30]


def _outcome(run, key: str) -> str:
    """``"ran"``, or ``"refused"`` with one line naming ``key`` (or the divergence); anything else fails the test."""
    try:
        run()
        return "ran"
    except (SystemExit, ValueError) as exc:
        msg = str(exc.code if isinstance(exc, SystemExit) else exc)
        assert "\n" not in msg and "Traceback" not in msg, (key, msg)
        assert key.split(".")[-1] in msg or "diverged" in msg, (key, msg)
        return "refused"


@pytest.mark.parametrize("key", sorted(REGISTER_KEYS))
def test_fuzz_register_numeric_keys(pair, tmp_path, key):
    """Every numeric key of learnsim-register with 0, -1, nan, inf, 1e30 and a huge int: refused with one line
    naming the key (and its range), or a run to finite outputs; never a signal or a traceback."""
    for i, value in enumerate(FUZZ):
        out = tmp_path / f"out{i}"
        if _outcome(lambda out=out, value=value: _cli(pair, out, f"{key}={value}"), key) == "ran":
            disp = np.asarray(nib.load(out / "disp_mm.nii.gz").dataobj)
            assert np.isfinite(disp).all(), (key, value)
        else:
            assert not out.exists()


def _config_keys(cfg) -> list[str]:
    return [k for k in CONFIG_KEYS if OmegaConf.select(cfg, k, default="<absent>") != "<absent>"]


def test_fuzz_learnsim_test_numeric_keys(cfg_test, tmp_path):
    """The same for every numeric key of learnsim-test (the shared table, learnsim.ranges); values that pass run
    the phantom test pair at 16^3 with 3 q_v iterations to a finite result (or a pair reported failed)."""
    from learnsim.cli.test import evaluate

    ran = []
    for key in _config_keys(cfg_test):
        for i, value in enumerate(FUZZ):
            cfg = cfg_test.copy()
            OmegaConf.update(cfg, key, value)
            out = tmp_path / f"{key}_{i}"
            result: dict = {}
            if _outcome(lambda cfg=cfg, out=out, result=result: result.update(evaluate(cfg, out)), key) == "ran":
                ran.append((key, value))
                assert result["n_pairs"] + result.get("n_failed", 0) == 1, (key, value)
                if result["n_pairs"]:
                    assert math.isfinite(result["overall"]["dsc"]["mean"]), (key, value)
    assert ("q_v.u_init", 0) in ran and ("reg_loss.w_reg", 0) in ran  # the values in range did run


def test_fuzz_learnsim_train_numeric_keys(cfg_train, tmp_path):
    """The same for every numeric key of learnsim-train: out-of-range values are refused before training starts;
    the values in range are the ones the table accepts (each already runs in learnsim-test's fuzz), and one of
    them trains one epoch to a finite loss."""
    from learnsim.cli.train import train

    accepted = []
    for key in _config_keys(cfg_train):
        for value in FUZZ:
            cfg = cfg_train.copy()
            OmegaConf.update(cfg, key, value)
            if _outcome(lambda cfg=cfg: check_config(cfg), key) == "ran":
                accepted.append((key, value))
    assert all(v in (0, -1) for _k, v in accepted), accepted
    cfg = cfg_train.copy()
    OmegaConf.update(cfg, "reg_loss.w_reg", 0)
    OmegaConf.update(cfg, "q_v.u_init", -1)
    result = train(cfg)
    assert result["ckpt"] is not None and all(math.isfinite(v) for v in result["metrics"].values())


def test_learnsim_train_stops_on_a_diverged_fit(cfg_train):
    """Issue 29 item 8: learnsim-train with a learning rate that diverges stops with the divergence (one line from
    the CLI's guard: a ValueError), not with NaN metric weights."""
    from learnsim.cli.train import train

    cfg = cfg_train.copy()
    cfg.q_v.level_lr = [1000.0, 1000.0, 1000.0]
    cfg.q_v.level_iters = [16, 16, 16]
    with pytest.raises(FitDiverged, match="diverged"):
        train(cfg)


def test_cohort_writer_keeps_label_ids_beyond_int16(tmp_path):
    """Issue 29 item 10, learnsim-data ukbb / demo: the subject's seg is written in its own integer type."""
    from learnsim.data.cohort import write_subject
    from learnsim.data.preprocess import Grid, Preprocessed

    seg = np.zeros(SHAPE, np.int32)
    seg[2:5, 2:5, 2:5] = 40000
    p = Preprocessed(np.zeros(SHAPE, np.float32), None, seg, Grid(SHAPE, AFF))
    write_subject(tmp_path, "s1", p)
    assert 40000 in np.asarray(nib.load(tmp_path / "s1" / "seg.nii.gz").dataobj)
    small = Preprocessed(np.zeros(SHAPE, np.float32), None, (seg > 0).astype(np.int16) * 17, Grid(SHAPE, AFF))
    write_subject(tmp_path, "s2", small)
    assert nib.load(tmp_path / "s2" / "seg.nii.gz").get_data_dtype() == np.int16
