"""Issue 30: the wheel carries the Hydra configs and the data tables, and the configs are found from the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from learnsim.cli.config import config_dir

ROOT = Path(__file__).resolve().parents[1]


def test_configs_are_package_data_found_without_the_source_tree(monkeypatch, tmp_path):
    monkeypatch.delenv("LEARNSIM_CONF", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing relative to the working folder
    folder = Path(config_dir())
    assert folder.name == "conf" and folder.parent.name == "learnsim" and (folder / "train.yaml").is_file()
    assert not (ROOT / "conf").exists(), "one copy of the configs: inside the package only"
    monkeypatch.setenv("LEARNSIM_CONF", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="LEARNSIM_CONF"):
        config_dir()


@pytest.mark.download
def test_the_wheel_holds_the_configs_and_sources_and_no_tests(tmp_path):
    """Builds the wheel (pip fetches the build backend from PyPI) and reads its file list."""
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("learnsim-*.whl"))).namelist()
    confs = {n.split("learnsim/conf/", 1)[1] for n in names if n.startswith("learnsim/conf/")}
    on_disk = {str(p.relative_to(config_dir())) for p in Path(config_dir()).rglob("*.yaml")}
    assert confs == on_disk and "train.yaml" in confs and "experiment/demo.yaml" in confs
    assert "learnsim/data/sources.json" in names
    assert not [n for n in names if n.startswith(("tests/", "scripts/"))]
