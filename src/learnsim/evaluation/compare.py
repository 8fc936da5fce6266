"""Compare evaluated runs (folders written by :class:`learnsim.evaluation.evaluator.Evaluator`).

Statistics: a paired Wilcoxon signed-rank test (:func:`scipy.stats.wilcoxon`, two-sided, ``zero_method="wilcox"``)
per structure between the first (reference) run and each other run. The unit of pairing is the **registration
pair x structure, averaged over the posterior samples** (``pairing="pair"``, default): the samples of one pair are
draws from one posterior, not independent registrations, and sample ``i`` of one run has no counterpart in another
run, so pairing them would be arbitrary and inflate the sample size. ``pairing="sample"`` pairs on
pair x sample x structure (matching sample indices) for completeness. Only pairs present in both runs, with finite
values in both, enter a test. An extra structure ``"all"`` tests the per-pair mean over structures. Holm-Bonferroni
adjusted p-values over the structures of each (metric, run) family are given too.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from learnsim.evaluation import figures as figs
from learnsim.evaluation.evaluator import METRIC_COLUMNS
from learnsim.io import atomic_path

__all__ = [
    "Run",
    "load_run",
    "summary_table",
    "format_summary",
    "wilcoxon_tests",
    "holm",
    "compare_runs",
    "results_rows",
    "per_pair_dsc",
    "markdown_table",
]

Pairing = Literal["pair", "sample"]
_METRICS = ("dsc", "asd_mm", "hd95_mm")


@dataclass
class Run:
    """One evaluated run: its tables as written by the evaluator."""

    name: str
    path: Path
    metrics: pd.DataFrame
    per_pair: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)
    calibration: pd.DataFrame | None = None


def load_run(path: str | os.PathLike, name: str | None = None) -> Run:
    """Read ``metrics.csv``, ``per_pair.csv``, ``summary.json`` and (if present) ``calibration_bins.csv``.

    Raises:
        FileNotFoundError: naming the run folder and the missing file.
        ValueError: when ``metrics.csv`` lacks a required column.
    """
    path = Path(path)
    for required in ("metrics.csv", "per_pair.csv", "summary.json"):
        if not (path / required).is_file():
            raise FileNotFoundError(f"load_run: {path} has no {required} (is it an evaluated run folder?)")
    metrics = pd.read_csv(path / "metrics.csv", dtype={"pair": str, "structure": str})
    missing = [c for c in METRIC_COLUMNS if c not in metrics.columns]
    if missing:
        raise ValueError(f"load_run: {path / 'metrics.csv'} lacks columns {missing}")
    per_pair = pd.read_csv(path / "per_pair.csv", dtype={"pair": str})
    summary = json.loads((path / "summary.json").read_text())
    calib = pd.read_csv(path / "calibration_bins.csv") if (path / "calibration_bins.csv").is_file() else None
    return Run(name or path.resolve().name, path, metrics, per_pair, summary, calib)


def _mean(x: pd.Series | np.ndarray) -> float:
    arr = np.asarray(x, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def _std(x: pd.Series | np.ndarray) -> float:
    arr = np.asarray(x, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.std(ddof=1)) if arr.size > 1 else float("nan")


def summary_table(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per run: means (and stds) over pair x sample x structure rows of DSC / ASD / HD95, over pairs of
    folding / SDlogJ / seconds, and the calibration Spearman correlations (mean over pairs)."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {
            "run": run.name,
            "n_pairs": int(run.metrics["pair"].nunique()) if len(run.metrics) else len(run.per_pair),
        }
        for col in _METRICS:
            row[f"{col}_mean"] = _mean(run.metrics[col])
            row[f"{col}_std"] = _std(run.metrics[col])
        for col in (
            "folding_voxels",
            "folding_pct",
            "sdlogj",
            "seconds",
            "spearman_disagreement",
            "spearman_error",
            "data_weight",  # the likelihood: the precision of the fits and the energy ratio to the baseline
            "energy_ratio",
        ):
            vals = run.per_pair[col] if col in run.per_pair else pd.Series(dtype=float)
            row[f"{col}_mean"] = _mean(vals)
            if col in ("folding_pct", "sdlogj"):
                row[f"{col}_std"] = _std(vals)
        rows.append(row)
    return pd.DataFrame(rows)


def format_summary(table: pd.DataFrame) -> str:
    """The summary table as aligned text: ``mean +/- std`` for DSC, ASD, HD95, folding %, SDlogJ, then calibration."""

    def pm(row: pd.Series, col: str, fmt: str) -> str:
        mean, std = row.get(f"{col}_mean", np.nan), row.get(f"{col}_std", np.nan)
        if not np.isfinite(mean):
            return "n/a"
        return f"{mean:{fmt}} +/- {std:{fmt}}" if np.isfinite(std) else f"{mean:{fmt}}"

    view = pd.DataFrame(
        {
            "run": table["run"],
            "pairs": table["n_pairs"],
            "DSC": [pm(r, "dsc", ".3f") for _, r in table.iterrows()],
            "ASD (mm)": [pm(r, "asd_mm", ".3f") for _, r in table.iterrows()],
            "HD95 (mm)": [pm(r, "hd95_mm", ".2f") for _, r in table.iterrows()],
            "folding vox": [f"{v:.1f}" if np.isfinite(v) else "n/a" for v in table["folding_voxels_mean"]],
            "folding %": [pm(r, "folding_pct", ".4f") for _, r in table.iterrows()],
            "SDlogJ": [pm(r, "sdlogj", ".4f") for _, r in table.iterrows()],
            "rho(unc,disagr)": [
                f"{v:.3f}" if np.isfinite(v) else "n/a" for v in table["spearman_disagreement_mean"]
            ],
            "rho(unc,err)": [f"{v:.3f}" if np.isfinite(v) else "n/a" for v in table["spearman_error_mean"]],
            "seconds": [f"{v:.1f}" if np.isfinite(v) else "n/a" for v in table["seconds_mean"]],
            "precision": [f"{v:.4g}" if np.isfinite(v) else "n/a" for v in table["data_weight_mean"]],
            "energy ratio": [f"{v:.4g}" if np.isfinite(v) else "n/a" for v in table["energy_ratio_mean"]],
        }
    )
    return view.to_string(index=False)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (NaNs stay NaN and are not counted)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    m = order.size
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adj, 1.0)
    return out


def _paired_values(ref: pd.DataFrame, other: pd.DataFrame, metric: str, pairing: Pairing) -> pd.DataFrame:
    keys = ["pair", "structure"] if pairing == "pair" else ["pair", "sample", "structure"]
    a = ref.groupby(keys, sort=False)[metric].mean().rename("a")
    b = other.groupby(keys, sort=False)[metric].mean().rename("b")
    return pd.concat([a, b], axis=1, join="inner").reset_index()


def _wilcoxon(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = b - a
    if d.size == 0 or np.all(d == 0):
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
        except ValueError:
            return float("nan"), float("nan")
    return float(res.statistic), float(res.pvalue)


def wilcoxon_tests(
    runs: Sequence[Run], metrics: Sequence[str] = _METRICS, pairing: Pairing = "pair"
) -> pd.DataFrame:
    """Paired Wilcoxon signed-rank tests of every run against ``runs[0]``, per metric and structure.

    Returns:
        DataFrame with columns ``metric, structure, label, run_a, run_b, n, mean_a, mean_b, median_diff
        (b - a), statistic, p_value, p_holm``; ``structure == "all"`` tests the per-unit mean over structures.
        ``n`` counts the paired units with finite values in both runs; the test is NaN when ``n == 0`` or all
        differences are zero.
    """
    if len(runs) < 2:
        raise ValueError(f"wilcoxon_tests: need at least two runs; got {len(runs)}")
    if pairing not in ("pair", "sample"):
        raise ValueError(f"wilcoxon_tests: pairing must be 'pair' or 'sample'; got {pairing!r}")
    ref = runs[0]
    labels = dict(zip(ref.metrics["structure"], ref.metrics["label"], strict=False))
    rows = []
    for other in runs[1:]:
        for metric in metrics:
            paired = _paired_values(ref.metrics, other.metrics, metric, pairing)
            family = []
            structures = list(dict.fromkeys(paired["structure"]))
            unit = ["pair"] if pairing == "pair" else ["pair", "sample"]
            overall = (
                paired.dropna(subset=["a", "b"]).groupby(unit, sort=False)[["a", "b"]].mean().reset_index()
            )
            overall["structure"] = "all"
            for structure, sub in [
                *((s, paired[paired["structure"] == s]) for s in structures),
                ("all", overall),
            ]:
                sub = sub[np.isfinite(sub["a"]) & np.isfinite(sub["b"])]
                a, b = sub["a"].to_numpy(float), sub["b"].to_numpy(float)
                stat, p = _wilcoxon(a, b)
                family.append(
                    {
                        "metric": metric,
                        "structure": structure,
                        "label": labels.get(structure, -1) if structure != "all" else -1,
                        "run_a": ref.name,
                        "run_b": other.name,
                        "n": int(a.size),
                        "mean_a": float(a.mean()) if a.size else float("nan"),
                        "mean_b": float(b.mean()) if b.size else float("nan"),
                        "median_diff": float(np.median(b - a)) if a.size else float("nan"),
                        "statistic": stat,
                        "p_value": p,
                    }
                )
            # Holm over the structures of this (metric, run) family, "all" excluded (it is not a separate question)
            per_structure = [r for r in family if r["structure"] != "all"]
            for r, padj in zip(per_structure, holm([r["p_value"] for r in per_structure]), strict=True):
                r["p_holm"] = float(padj)
            family[-1]["p_holm"] = family[-1]["p_value"]
            rows.extend(family)
    cols = [
        "metric",
        "structure",
        "label",
        "run_a",
        "run_b",
        "n",
        "mean_a",
        "mean_b",
        "median_diff",
        "statistic",
        "p_value",
        "p_holm",
    ]
    return pd.DataFrame(rows, columns=cols)


def _structure_order(runs: Sequence[Run]) -> list[str]:
    return list(dict.fromkeys(s for run in runs for s in run.metrics["structure"].astype(str)))


def compare_runs(
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    labels: Sequence[str] | None = None,
    pairing: Pairing = "pair",
    figures: bool = True,
) -> dict[str, Any]:
    """Load runs, write ``summary_table.csv``, ``wilcoxon.csv`` and (with ``figures``) ``boxplots.png`` (DSC and
    ASD per structure, runs side by side) and ``calibration.png`` (runs with calibration bins) into ``out_dir``.

    Args:
        paths: evaluated run folders; the first one is the reference of the tests.
        labels: display names (default the folder names); must be unique.
    Returns:
        ``{"runs": [...], "summary": DataFrame, "wilcoxon": DataFrame | None, "files": {name: Path}}``.
    """
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"compare_runs: {len(labels)} labels for {len(paths)} runs")
    runs = [load_run(p, labels[i] if labels else None) for i, p in enumerate(paths)]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"compare_runs: run names must be unique (pass labels); got {names}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    table = summary_table(runs)
    with atomic_path(out / "summary_table.csv") as tmp:
        table.to_csv(tmp, index=False)
    files["summary_table"] = out / "summary_table.csv"
    tests = None
    if len(runs) > 1:
        tests = wilcoxon_tests(runs, pairing=pairing)
        with atomic_path(out / "wilcoxon.csv") as tmp:
            tests.to_csv(tmp, index=False)
        files["wilcoxon"] = out / "wilcoxon.csv"
    if figures:
        order = _structure_order(runs)
        files["boxplots"] = figs.structure_boxplots(
            {r.name: r.metrics for r in runs}, out / "boxplots.png", ("dsc", "asd_mm"), order
        )
        calib: Mapping[str, pd.DataFrame] = {r.name: r.calibration for r in runs if r.calibration is not None}
        if calib:
            files["calibration"] = figs.calibration_plot(calib, out / "calibration.png")
    return {"runs": runs, "summary": table, "wilcoxon": tests, "files": files}


# ---------------------------------------------------------------------------------------------- the results tables (docs/results.md)
def _run_label(path: Path) -> str:
    return path.name.removeprefix("test_")


def _result_row(name: str, m: pd.DataFrame, mean: pd.DataFrame | None, pp: pd.DataFrame | None) -> dict[str, str]:
    def cell(v: float, fmt: str) -> str:
        return f"{v:{fmt}}" if np.isfinite(v) else "n/a"

    per_pair = m.groupby("pair")["dsc"].mean()
    return {
        "run": name,
        "DSC (samples)": f"{cell(_mean(m['dsc']), '.3f')} ± {cell(_std(per_pair), '.3f')}",
        "DSC (mean transf.)": cell(_mean(mean["dsc"]), ".3f") if mean is not None else "n/a",
        "ASD mm": cell(_mean(m["asd_mm"]), ".2f"),
        "HD95 mm": cell(_mean(m["hd95_mm"]), ".2f"),
        "folding voxels": str(int(pp["folding_voxels"].sum())) if pp is not None else "0",
        "SDlogJ": cell(_mean(pp["sdlogj"]), ".3f") if pp is not None else "0",
        "uncertainty mm": cell(_mean(pp["uncertainty_mean_mm"]), ".2f")
        if pp is not None and "uncertainty_mean_mm" in pp
        else "n/a",
        "s / pair": cell(_mean(pp["seconds"]), ".1f") if pp is not None else "0",
    }


def results_rows(paths: Sequence[str | os.PathLike]) -> list[dict[str, str]]:
    """The results table (docs/results.md), one dict of formatted cells per row: first "before registration (affine
    only)" from the first run's ``metrics_before.csv`` (when present), then one row per run folder (name without
    a ``test_`` prefix): mean DSC over pairs x samples x structures ± the std of the per-pair means, the
    posterior-mean DSC, ASD and HD95 (mm), total folding voxels, SDlogJ, uncertainty (mm) and seconds per pair."""
    runs = [Path(p) for p in paths]
    if not runs:
        raise ValueError("results_rows: no run folder given")
    for run in runs:
        for f in ("metrics.csv", "per_pair.csv"):
            if not (run / f).is_file():
                raise FileNotFoundError(f"results_rows: {run} has no {f} (is it an evaluated run folder?)")
    rows = []
    before = runs[0] / "metrics_before.csv"
    if before.is_file():
        b = pd.read_csv(before, dtype={"pair": str})
        rows.append(_result_row("before registration (affine only)", b, b, None))
    for run in runs:
        mean = run / "metrics_mean.csv"
        rows.append(
            _result_row(
                _run_label(run),
                pd.read_csv(run / "metrics.csv", dtype={"pair": str}),
                pd.read_csv(mean, dtype={"pair": str}) if mean.is_file() else None,
                pd.read_csv(run / "per_pair.csv", dtype={"pair": str}),
            )
        )
    return rows


def per_pair_dsc(paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Mean DSC per pair (index) over structures: ``before`` (first run's ``metrics_before.csv``), then per run
    ``<name> mean`` (posterior-mean transformation) and ``<name> samples``; rounded to 3 decimals."""
    runs = [Path(p) for p in paths]
    cols: dict[str, pd.Series] = {}
    first = runs[0] / "metrics_before.csv"
    if first.is_file():
        cols["before"] = pd.read_csv(first, dtype={"pair": str}).groupby("pair")["dsc"].mean()
    for run in runs:
        name = _run_label(run)
        if (run / "metrics_mean.csv").is_file():
            cols[f"{name} mean"] = pd.read_csv(run / "metrics_mean.csv", dtype={"pair": str}).groupby("pair")["dsc"].mean()
        cols[f"{name} samples"] = pd.read_csv(run / "metrics.csv", dtype={"pair": str}).groupby("pair")["dsc"].mean()
    return pd.DataFrame(cols).round(3)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A GitHub markdown table of ``rows`` (columns: the first row's keys)."""
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
