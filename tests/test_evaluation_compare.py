"""Run comparison: summary table, paired Wilcoxon tests, the compare_runs script."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from learnsim.evaluation.compare import compare_runs, holm, load_run, wilcoxon_tests

ROOT = Path(__file__).resolve().parents[1]
STRUCTS = {10: "L thalamus", 49: "R thalamus", 16: "brain stem"}
PAIRS = [f"sub{i:02d}" for i in range(8)]


def _fake_run(folder: Path, dsc_shift: float, seed: int, samples: int = 3) -> Path:
    """A run folder as the Evaluator writes it, with DSC = base + dsc_shift (same base for every run)."""
    rng = np.random.default_rng(0)  # same base values in every run: the differences are exactly dsc_shift
    noise = np.random.default_rng(seed)
    rows = []
    for pair in PAIRS:
        for sample in range(samples):
            for label, name in STRUCTS.items():
                base = rng.uniform(0.6, 0.85)
                rows.append(
                    {
                        "pair": pair,
                        "sample": sample,
                        "structure": name,
                        "label": label,
                        "dsc": base + dsc_shift,
                        "asd_mm": 1.0 + noise.uniform(0.0, 0.2),
                        "hd95_mm": np.nan
                        if name == "brain stem" and sample == 0
                        else 3.0 + noise.uniform(0, 1),
                    }
                )
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)
    pd.DataFrame(
        {
            "pair": PAIRS,
            "folding_voxels": noise.integers(0, 10, len(PAIRS)),
            "folding_pct": noise.uniform(0, 0.01, len(PAIRS)),
            "sdlogj": noise.uniform(0.1, 0.2, len(PAIRS)),
            "seconds": 30.0,
            "spearman_disagreement": 0.4,
            "spearman_error": 0.2,
        }
    ).to_csv(folder / "per_pair.csv", index=False)
    (folder / "summary.json").write_text(json.dumps({"run": folder.name}))
    pd.DataFrame(
        {
            "bin": [0, 1, 2],
            "u_mean": [0.1, 0.2, 0.4],
            "disagreement_mean": [0.0, 0.05, 0.2],
            "error_mean": [0.01, 0.03, 0.1],
        }
    ).to_csv(folder / "calibration_bins.csv", index=False)
    return folder


def test_holm() -> None:
    adj = holm([0.01, 0.04, np.nan, 0.03])
    assert adj[0] == pytest.approx(0.03) and adj[3] == pytest.approx(0.06) and adj[1] == pytest.approx(0.06)
    assert np.isnan(adj[2])


def test_wilcoxon_pairs_on_pair_x_structure(tmp_path: Path) -> None:
    a = load_run(_fake_run(tmp_path / "a", 0.0, 1))
    b = load_run(_fake_run(tmp_path / "b", 0.05, 2))
    same = load_run(_fake_run(tmp_path / "same", 0.0, 3))
    tests = wilcoxon_tests([a, b, same])
    dsc = tests[(tests["metric"] == "dsc") & (tests["run_b"] == "b")].set_index("structure")
    assert set(dsc.index) == {*STRUCTS.values(), "all"}
    # 8 pairs, every difference +0.05: exact two-sided p = 2 / 2^8
    assert (dsc["n"] == len(PAIRS)).all()
    assert dsc.loc["L thalamus", "p_value"] == pytest.approx(2 / 256)
    assert dsc.loc["L thalamus", "median_diff"] == pytest.approx(0.05)
    assert dsc.loc["L thalamus", "label"] == 10
    assert dsc.loc["L thalamus", "p_holm"] == pytest.approx(3 * 2 / 256)
    # identical values: no test possible
    same_dsc = tests[(tests["metric"] == "dsc") & (tests["run_b"] == "same")]
    assert same_dsc["p_value"].isna().all()
    # NaN-tolerant: brain stem HD95 has a NaN in sample 0 only; the sample mean still pairs all 8
    hd = tests[(tests["metric"] == "hd95_mm") & (tests["run_b"] == "b")].set_index("structure")
    assert hd.loc["brain stem", "n"] == len(PAIRS)
    by_sample = wilcoxon_tests([a, b], metrics=["dsc"], pairing="sample")
    assert by_sample.set_index("structure").loc["L thalamus", "n"] == 3 * len(PAIRS)
    with pytest.raises(ValueError, match="two runs"):
        wilcoxon_tests([a])


def test_compare_runs_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _fake_run(tmp_path / "baseline_run", 0.0, 1)
    b = _fake_run(tmp_path / "learnt_run", 0.05, 2)
    out = tmp_path / "cmp"
    script = runpy.run_path(str(ROOT / "scripts" / "compare_runs.py"), run_name="compare_runs")
    rc = script["main"]([str(a), str(b), "--labels", "baseline", "learnt", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "learnt" in printed and "SDlogJ" in printed
    tests = pd.read_csv(out / "wilcoxon.csv")
    assert list(tests.columns) == [
        "metric", "structure", "label", "run_a", "run_b", "n", "mean_a", "mean_b", "median_diff", "statistic",
        "p_value", "p_holm",
    ]  # fmt: skip
    assert set(tests["run_b"]) == {"learnt"} and set(tests["metric"]) == {"dsc", "asd_mm", "hd95_mm"}
    table = pd.read_csv(out / "summary_table.csv")
    assert table["run"].tolist() == ["baseline", "learnt"]
    assert table.loc[1, "dsc_mean"] - table.loc[0, "dsc_mean"] == pytest.approx(0.05)
    for png in ("boxplots.png", "calibration.png"):
        assert (out / png).stat().st_size > 5_000
    # a folder that is not a run: a clear error and exit code 1
    assert script["main"]([str(a), str(tmp_path / "nope"), "--out", str(out)]) == 1
    assert "no metrics.csv" in capsys.readouterr().err


def test_compare_runs_rejects_duplicate_names(tmp_path: Path) -> None:
    a = _fake_run(tmp_path / "x" / "run", 0.0, 1)
    b = _fake_run(tmp_path / "y" / "run", 0.0, 2)
    with pytest.raises(ValueError, match="unique"):
        compare_runs([a, b], tmp_path / "out", figures=False)
    res = compare_runs([a, b], tmp_path / "out", labels=["x", "y"], figures=False)
    assert (tmp_path / "out" / "wilcoxon.csv").is_file() and "boxplots" not in res["files"]
