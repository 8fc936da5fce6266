"""scripts/peers.py without its peers: the missing-package error, the coordinate conversions, the CSV writer and
summary, and a whole run on a phantom cohort with stand-in registrations whose run folders learnsim-compare reads.

FireANTs and ANTsPy are never imported here (they are an optional extra, ``pip install .[peers]``)."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from learnsim.spatial import to_sampling_grid

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "peers.py"


@pytest.fixture
def peers(monkeypatch):
    spec = importlib.util.spec_from_file_location("learnsim_peers_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _missing(name: str):
    raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def test_import_does_not_need_the_peers(peers):
    assert not {"fireants", "ants", "SimpleITK"} & set(vars(peers))  # imported only inside the registrations
    assert set(peers.METHODS) == {"fireants", "ants"}
    assert peers.PER_PAIR_COLUMNS[:2] == ["method", "pair"]
    # the column names shared with learnsim-test's per_pair.csv
    from learnsim.evaluation.evaluator import PER_PAIR_COLUMNS

    assert set(PER_PAIR_COLUMNS) - {"pair"} <= set(peers.PER_PAIR_COLUMNS) and "dsc_mean" in peers.PER_PAIR_COLUMNS


@pytest.mark.parametrize("method, package", [("fireants", "fireants"), ("ants", "antspyx")])
def test_missing_peer_error(peers, monkeypatch, method, package):
    monkeypatch.setattr(peers, "_import", _missing)
    with pytest.raises(peers.MissingPeerError) as err:
        peers.require_peer(method)
    msg = str(err.value)
    assert "pip install .[peers]" in msg and repr(package) in msg and method in msg


def test_main_reports_missing_peer(peers, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(peers, "_import", _missing)
    monkeypatch.setattr(peers, "configure_threads", lambda threads, seed: None)  # leave this process' threads
    rc = peers.main([str(tmp_path), "--out", str(tmp_path / "out"), "--methods", "ants"])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install .[peers]" in err and "antspyx" in err
    assert not (tmp_path / "out").exists()  # nothing is written before the check


def test_configure_threads(peers, monkeypatch):
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "MKL_NUM_THREADS",
                "ANTS_RANDOM_SEED"):
        monkeypatch.setenv(var, "x")  # restored after the test
    before = torch.get_num_threads()
    try:
        peers.configure_threads(1, 7)
        import os

        assert os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "1" and os.environ["ANTS_RANDOM_SEED"] == "7"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads"):
        peers.configure_threads(0, 0)


def test_fireants_coords_round_trip(peers):
    """grid_sample coordinates of id + u (learnsim's own conversion) give u back, on a non-cubic grid."""
    g = torch.Generator().manual_seed(0)
    disp = torch.randn(1, 3, 5, 6, 7, generator=g, dtype=torch.float64)
    coords = to_sampling_grid(disp)  # [1, D, H, W, 3], normalised (x, y, z), align_corners=True
    back = peers.fireants_coords_to_displacement(coords.float())
    assert back.shape == (1, 3, 5, 6, 7) and back.dtype == torch.float32
    assert torch.allclose(back.double(), disp, atol=1e-5)
    with pytest.raises(ValueError):
        peers.fireants_coords_to_displacement(torch.zeros(1, 5, 6, 7, 2))


def test_ants_field_conversion(peers):
    field = np.zeros((4, 5, 6, 3), np.float32)
    field[..., 0] = 3.0  # mm along axis D
    field[1, 2, 3, 2] = -1.0  # mm along axis W at one voxel
    disp = peers.ants_field_to_displacement(field, (1.5, 2.0, 0.5))
    assert disp.shape == (1, 3, 4, 5, 6)
    assert torch.allclose(disp[0, 0], torch.full((4, 5, 6), 2.0))
    assert float(disp[0, 2, 1, 2, 3]) == -2.0 and float(disp[0, 1].abs().max()) == 0.0
    with pytest.raises(ValueError):
        peers.ants_field_to_displacement(np.zeros((4, 5, 6)), (1, 1, 1))


def _row(peers, method: str, pair: str, before: float, after: float, folding: int, seconds: float) -> dict:
    return peers.PerPairRow(
        method, pair, before, after, after + 0.01, folding, 0.0, 0.1, seconds, 2 * seconds, 1e-7, 2
    ).as_dict()


def test_csv_writer_and_summary(peers, tmp_path):
    rows = [
        _row(peers, "fireants", "a", 0.5, 0.7, 0, 40.0),
        _row(peers, "ants", "a", 0.5, 0.65, 2, 50.0),
        _row(peers, "fireants", "b", 0.6, 0.8, 0, 44.0),
        _row(peers, "ants", "b", 0.6, float("nan"), 4, 54.0),
    ]
    path = peers.write_csv(tmp_path / "sub" / "peers_per_pair.csv", rows, peers.PER_PAIR_COLUMNS)
    with path.open() as fh:
        back = list(csv.DictReader(fh))
    assert list(back[0]) == peers.PER_PAIR_COLUMNS and len(back) == 4
    assert back[3]["dsc_mean"] == ""  # NaN -> empty cell
    assert float(back[0]["dsc_mean"]) == 0.7 and back[1]["method"] == "ants"
    assert not list(tmp_path.glob("sub/*.tmp"))

    summary = peers.summarise(rows)
    assert [s["method"] for s in summary] == ["fireants", "ants"]
    fa, an = summary
    assert fa["n_pairs"] == 2 and math.isclose(fa["dsc_mean"], 0.75) and math.isclose(fa["dsc_before_mean"], 0.55)
    assert math.isclose(fa["seconds"], 42.0) and math.isclose(fa["cpu_seconds"], 84.0) and fa["folding_voxels"] == 0.0 and fa["threads"] == 2
    assert math.isclose(an["dsc_mean"], 0.65)  # the NaN pair is skipped
    assert an["folding_voxels"] == 3.0 and math.isclose(an["seconds"], 52.0)
    out = peers.write_csv(tmp_path / "peers_summary.csv", summary, peers.SUMMARY_COLUMNS)
    with out.open() as fh:
        assert next(csv.reader(fh)) == peers.SUMMARY_COLUMNS
    table = peers.markdown_table(summary)
    assert "FireANTs greedy" in table and "ANTs SyN" in table and "| 0.750 |" in table and "| 42.0 |" in table


def test_run_on_a_phantom_cohort(peers, monkeypatch, tmp_path, ukbb_root, capsys):
    """The whole script with stand-in registrations: identity (ANTs) and a constant one-voxel shift (FireANTs).

    Its run folders are read by learnsim-compare's table unchanged, and the per-pair CSV agrees with them."""
    from learnsim.data.ukbb import build_ukbb
    from learnsim.evaluation.compare import compare_runs, results_rows

    build_ukbb(ukbb_root, "1000", ["1001"], tmp_path / "cohort", test_ids=["1003", "1004"], dims=16, log=lambda *_: None)
    monkeypatch.setattr(peers, "_import", lambda name: types.ModuleType(name))
    monkeypatch.setattr(peers, "configure_threads", lambda threads, seed: None)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)

    def fake(shift: float):
        def register(fixed, moving, moving_seg, spacing, progress, **kwargs):
            disp = torch.zeros(1, 3, *fixed.shape)
            disp[:, 0] = shift
            from learnsim.spatial import warp, warp_labels

            m = torch.from_numpy(moving)[None, None]
            s = torch.from_numpy(moving_seg.astype(np.int64))[None, None]
            return peers.PeerResult(disp, 1.5 + shift, 3.0, warp_labels(s, disp), warp(m, disp), {"shift": shift})

        return register

    monkeypatch.setattr(peers, "register_fireants", fake(1.0))
    monkeypatch.setattr(peers, "register_ants", fake(0.0))
    out = tmp_path / "out"
    rc = peers.main([str(tmp_path / "cohort"), "--out", str(out), "--no-nifti", "--no-figures", "--no-surface"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "pair 1/2" in text and "pair 2/2" in text and "fireants" in text and "ants" in text

    with (out / "peers_per_pair.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {r["method"] for r in rows} == {"fireants", "ants"}
    for r in rows:
        assert float(r["native_warp_mad"]) < 1e-6 and r["threads"] == "2"
        assert float(r["dsc_mean"]) == pytest.approx(float(r["dsc_native_mean"]))
        if r["method"] == "ants":  # identity: after == before, no folding
            assert float(r["dsc_mean"]) == pytest.approx(float(r["dsc_before_mean"]))
            assert r["folding_voxels"] == "0" and float(r["seconds"]) == 1.5
    with (out / "peers_summary.csv").open() as fh:
        summary = {r["method"]: r for r in csv.DictReader(fh)}
    assert set(summary) == {"fireants", "ants"} and summary["ants"]["n_pairs"] == "2"
    assert float(summary["fireants"]["seconds"]) == 2.5

    runs = [out / "fireants_greedy", out / "ants_syn"]
    for run in runs:
        assert (run / "peer.json").is_file() and (run / "metrics_before.csv").is_file()
    table = results_rows(runs)
    assert [r["run"] for r in table] == ["before registration (affine only)", "fireants_greedy", "ants_syn"]
    res = compare_runs(runs, tmp_path / "cmp", figures=False)
    assert list(res["summary"]["run"]) == ["fireants_greedy", "ants_syn"]
    # the per-pair CSV's after-DSC is the run folder's, pair by pair
    import pandas as pd

    pp = pd.read_csv(out / "ants_syn" / "per_pair.csv", dtype={"pair": str})
    mine = {r["pair"]: float(r["dsc_mean"]) for r in rows if r["method"] == "ants"}
    assert dict(zip(pp["pair"], pp["dsc_mean"], strict=True)) == pytest.approx(mine)
