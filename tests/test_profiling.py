"""The time profile of a registration (learnsim.profiling, learnsim-register --profile): counts what it says."""

from __future__ import annotations

import json
import time
from functools import partial

import nibabel as nib
import numpy as np
import torch
from conftest import blob

from learnsim import profiling
from learnsim.api import register
from learnsim.cli import register as register_cli

_blob = partial(blob, scale=4.0)


def test_stage_is_a_shared_noop_when_not_profiling():
    assert profiling.active_profile() is None
    assert profiling.stage("warp") is profiling.stage("energy")  # one object: no clock, no allocation
    profiling.count_iterations()  # harmless outside a profile


def test_stage_times_add_up_per_section_and_nest():
    with profiling.profiling() as prof:
        with profiling.section("level 1/1 4x4x4"):
            for _ in range(3):
                with profiling.stage("integration"):
                    time.sleep(0.01)
                    with profiling.stage("squarings"):  # nested: counted, not added to the level's top stages
                        time.sleep(0.005)
                profiling.count_iterations()
        with profiling.stage("loading"):
            time.sleep(0.01)
    d = prof.as_dict()
    level = d["level 1/1 4x4x4"]
    assert level["iterations"] == 3
    assert level["stages"]["integration"]["calls"] == 3 and level["stages"]["squarings"]["calls"] == 3
    assert level["stages"]["integration"]["seconds"] >= level["stages"]["squarings"]["seconds"] >= 0.015
    assert level["stages"]["integration"]["seconds"] >= 0.045 and level["seconds"] >= level["stages"]["integration"]["seconds"]
    assert level["stages"]["integration"]["ms_per_iteration"] >= 15.0
    assert d[profiling.OUTSIDE]["stages"]["loading"]["calls"] == 1
    table = prof.table()
    assert "level 1/1 4x4x4 | 3 |" in table and "loading" in table
    assert profiling.active_profile() is None


def test_register_profile_has_every_level_and_stage():
    shape = (16, 16, 16)
    fixed = torch.from_numpy(_blob(shape, (8, 8, 8)))
    moving = torch.from_numpy(_blob(shape, (9, 8, 7)))
    with profiling.profiling() as prof:
        register(fixed, moving, "ssd", level_iters=[6, 4, 3], no_samples=2, device="cpu")
    d = prof.as_dict()
    levels = [k for k in d if k.startswith("level")]
    assert levels == ["level 1/3 4x4x4", "level 2/3 8x8x8", "level 3/3 16x16x16"]
    assert [d[k]["iterations"] for k in levels] == [6, 4, 3]
    for k in levels:
        stages = d[k]["stages"]
        for name in ("sampling", "smoothing", "integration", "warp", "energy", "regulariser", "backward", "optimiser"):
            assert stages[name]["calls"] == d[k]["iterations"] or name == "energy", (k, name)  # energy: + a(F) once
        assert stages["energy"]["calls"] == d[k]["iterations"] + 1
    outside = d[profiling.OUTSIDE]["stages"]
    assert {"loading", "histogram matching", "output samples", "pyramid"} <= set(outside) | set(d[levels[0]]["stages"])


def test_register_cli_profile_prints_and_records(tmp_path, capsys):
    shape, aff = (16, 18, 20), np.diag([2.0, 2.0, 2.0, 1.0])
    paths = {}
    for name, arr in (("fixed", _blob(shape, (8, 9, 10))), ("moving", _blob(shape, (9, 9, 11)))):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr, aff), paths[name])
    out = tmp_path / "out"
    register_cli.main([str(paths["fixed"]), str(paths["moving"]), "--out", str(out), "--profile", "--no-figures",
                       "level_iters=4,3", "no_samples=2"])
    text = capsys.readouterr().out
    assert "profile" in text and "level 2/2 16x18x20 | 3 |" in text and "NIfTI writing" not in text.split("profile")[0]
    info = json.loads((out / "registration.json").read_text())
    assert info["profile"]["level 1/2 8x9x10"]["iterations"] == 4
    outside = info["profile"][profiling.OUTSIDE]["stages"]
    assert {"NIfTI writing (overlapped)", "summary", "output samples"} <= set(outside)
