"""learnsim-compare: the console command (comparison and README table), its install, the scripts that wrap it."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from learnsim.cli.compare import main

ROOT = Path(__file__).resolve().parents[1]
STRUCTS = {10: "L thalamus", 49: "R thalamus"}


def _run(folder: Path, dsc: float, before: float = 0.5) -> Path:
    """An evaluated run folder: 2 pairs x 2 samples x 2 structures, DSC = dsc + 0.1 * pair index."""
    rows, mean_rows, before_rows = [], [], []
    for p in range(2):
        for label, name in STRUCTS.items():
            for s in range(2):
                rows.append({"pair": f"p{p}", "sample": s, "structure": name, "label": label,
                             "dsc": dsc + 0.1 * p, "asd_mm": 1.0 + s, "hd95_mm": 3.0})
            mean_rows.append({**rows[-1], "sample": -1, "dsc": dsc + 0.1 * p + 0.01})
            before_rows.append({**rows[-1], "sample": -2, "dsc": before + 0.1 * p})
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)
    pd.DataFrame(mean_rows).to_csv(folder / "metrics_mean.csv", index=False)
    pd.DataFrame(before_rows).to_csv(folder / "metrics_before.csv", index=False)
    pd.DataFrame({"pair": ["p0", "p1"], "folding_voxels": [1, 2], "folding_pct": [0.0, 0.0], "sdlogj": [0.1, 0.3],
                  "seconds": [10.0, 20.0], "uncertainty_mean_mm": [0.5, 0.7], "spearman_disagreement": [0.3, 0.3],
                  "spearman_error": [0.1, 0.1]}).to_csv(folder / "per_pair.csv", index=False)
    (folder / "summary.json").write_text(json.dumps({"run": folder.name}))
    return folder


def test_compare_writes_tables_and_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _run(tmp_path / "test_ssd", 0.6), _run(tmp_path / "test_learnt", 0.7)
    out = tmp_path / "cmp"
    assert main([str(a), str(b), "--labels", "SSD", "learnt", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SSD" in printed and "learnt" in printed and "Wilcoxon" in printed
    assert pd.read_csv(out / "summary_table.csv")["run"].tolist() == ["SSD", "learnt"]
    assert (out / "wilcoxon.csv").is_file() and (out / "boxplots.png").stat().st_size > 5_000
    assert main([str(a), str(tmp_path / "nope"), "--out", str(out)]) == 1
    assert "learnsim-compare:" in capsys.readouterr().err


def test_compare_table_prints_the_readme_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _run(tmp_path / "test_ssd", 0.6), _run(tmp_path / "test_learnt", 0.7)
    assert main(["--table", "--per-pair", str(a), str(b)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| run | DSC (samples) | DSC (mean transf.) |")
    # before (mean of 0.5, 0.6) / ssd samples (0.6, 0.7) and posterior mean (+0.01) / learnt; std of pair means
    assert lines[2].startswith("| before registration (affine only) | 0.550 ± 0.071 | 0.550 |")
    assert lines[3].startswith("| ssd | 0.650 ± 0.071 | 0.660 | 1.50 | 3.00 | 3 | 0.200 | 0.60 | 15.0 |")
    assert lines[4].startswith("| learnt | 0.750 ± 0.071 | 0.760 |")
    assert lines[6] == "| pair | before | ssd mean | ssd samples | learnt mean | learnt samples |"
    assert lines[8] == "| p0 | 0.500 | 0.610 | 0.600 | 0.710 | 0.700 |"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_learnt", "test_ssd"]  # --table wrote nothing


def test_scripts_wrap_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    a = _run(tmp_path / "test_ssd", 0.6)
    monkeypatch.setattr(sys, "argv", ["demo_table.py", str(a)])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "scripts" / "demo_table.py"), run_name="__main__")
    assert exc.value.code == 0 and "| ssd | 0.650" in capsys.readouterr().out
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    assert "learnsim-compare --table" in demo and "learnsim-compare \"$OUT/test_ssd_baseline\"" in demo
    assert "scripts/compare_runs.py" not in demo and "scripts/demo_table.py" not in demo
    vxm = (ROOT / "scripts" / "demo_vxm.sh").read_text()
    assert "learnsim-compare --table" in vxm and "compare_runs.py" not in vxm and "demo_table.py" not in vxm


def test_pip_install_ships_learnsim_compare(tmp_path: Path) -> None:
    """``pip install .`` (of a copy of the source, no dependencies) installs a working learnsim-compare."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["learnsim-compare"] == "learnsim.cli.compare:main"
    src = tmp_path / "src_copy"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    # --target, not --prefix: pip install --prefix also uninstalls the environment's own learnsim
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-compile",
                    "-q", "--target", str(target), str(src)], check=True, capture_output=True)
    exe = target / "bin" / "learnsim-compare"
    assert exe.is_file()
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([str(exe), "--help"], env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
    assert "learnsim-compare RUN_A RUN_B" in out.stdout and "--table" in out.stdout
    # it runs from the installed copy, not from this checkout
    where = subprocess.run([sys.executable, "-c", "import learnsim.cli.compare as m; print(m.__file__)"], env=env,
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert where.startswith(str(target))
