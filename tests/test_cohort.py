"""Cohort runs (issue 28): pairs sharded over gloo processes, resumable, one merged result identical to one process.

The phantom cohort has 3 pairs (odd: shards of 2 and 1); every run registers them with 3 q_v iterations on a
10x12x12 grid. Each process runs one thread, so 1 and 2 processes compute bit-identical numbers. The files of two
runs are compared byte for byte, except the wall-clock columns (``seconds``, ``fit_seconds``, ``eval_seconds``).
"""

from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import PhantomPairs

from learnsim.evaluation.cohort import MANIFEST, RECORD, CohortFolder, pair_seed, shard
from learnsim.evaluation.sharding import CohortJob, Ranks, fabric_settings, launch, run_rank

N_PAIRS = 3
DIMS = (10, 12, 12)
TIMING = ("seconds", "fit_seconds", "eval_seconds")
SETTINGS = {"test": "cohort", "q_v.no_iters": 3}


def _registration(device: torch.device):
    from learnsim.registration import VariationalRegistration
    from learnsim.transformation import SVF

    return VariationalRegistration.paper("ssd", transformation=SVF(4), no_iters=3)


class _Echo:
    """Collects the pair lines (one per registered pair); ``kill_after``: KeyboardInterrupt after that many."""

    def __init__(self, kill_after: int | None = None) -> None:
        self.lines: list[str] = []
        self.kill_after = kill_after

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if self.kill_after is not None and len(self.registered()) >= self.kill_after:
            raise KeyboardInterrupt("killed")

    def registered(self) -> list[str]:
        return [ln.split()[2].rstrip(":") for ln in self.lines if ln.startswith("learnsim-test: pair ")]


class _FileEcho(_Echo):
    """An echo that survives the process: each process appends its lines to ``<path>.<pid>`` (picklable)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def __call__(self, line: str) -> None:
        with open(f"{self.path}.{os.getpid()}", "a") as f:
            f.write(line + "\n")

    def collected(self) -> list[str]:
        self.lines = [ln for p in Path(self.path).parent.glob(Path(self.path).name + ".*")
                      for ln in p.read_text().splitlines()]
        return sorted(self.registered())


def _job(out: Path, echo, fresh: bool = False, settings: dict | None = None) -> CohortJob:
    ds = PhantomPairs(N_PAIRS, DIMS, disp_scale=4.0, thresholds=(0.6, 0.4), warp_seg=True)
    return CohortJob(out, ds, [f"pair{i}" for i in range(N_PAIRS)], settings or SETTINGS, _registration,
                     {"save_nifti": True, "figures": True, "seed": 0, "metric_samples": 2, "run_name": "cohort"},
                     n_draw=3, seed=0, fresh=fresh, echo=echo)


def _worker(rank: int, world: int, init_file: str, out: str, log: str, kill_after: int | None) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    echo = _Echo(kill_after)
    try:
        run_rank(_job(Path(out), echo), Ranks(rank, world))
    except KeyboardInterrupt:
        pass
    finally:
        Path(f"{log}.rank{rank}").write_text(json.dumps(echo.registered()))
        if world > 1:
            dist.destroy_process_group()


def _run(tmp: Path, out: Path, world: int, kill_after: int | None = None) -> list[str]:
    """Run the cohort job on ``world`` gloo processes (1: in this process, on one thread); returns the pairs
    registered (all ranks)."""
    if world == 1:
        threads, echo = torch.get_num_threads(), _Echo(kill_after)
        torch.set_num_threads(1)
        try:
            run_rank(_job(out, echo), Ranks())
        except KeyboardInterrupt:
            pass
        finally:
            torch.set_num_threads(threads)
        return sorted(echo.registered())
    log = tmp / f"log-{out.name}-{len(list(tmp.glob('log-*')))}"
    mp.spawn(_worker, args=(world, str(tmp / f"pg-{log.name}"), str(out), str(log), kill_after), nprocs=world)
    return sorted(p for r in range(world) for p in json.loads(Path(f"{log}.rank{r}").read_text()))


def _comparable(path: Path) -> bytes:
    """The file's bytes, wall-clock values taken out of the tables and JSON files that hold them."""
    if path.name == "per_pair.csv":
        df = pd.read_csv(path)
        return df.drop(columns=[c for c in TIMING if c in df]).to_csv(index=False).encode()
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        for d in (data, data.get("summary") or {}):
            for key in TIMING:
                d.pop(key, None)
        (data.get("files") or {}).pop("summary.json", None)  # its hash covers the pair's seconds
        return json.dumps(data, sort_keys=True).encode()
    return path.read_bytes()


def _assert_same_files(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert "pairs/pair2/warped.nii.gz" in files_a and "boxplots.png" in files_a and "calibration_bins.csv" in files_a
    for rel in files_a:
        assert _comparable(a / rel) == _comparable(b / rel), rel


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted one-process run."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "one"
    assert _run(tmp, out, 1) == [f"pair{i}" for i in range(N_PAIRS)]
    return out


def test_shards_and_seeds_do_not_depend_on_the_ranks() -> None:
    assert shard(5, 0, 2) == [0, 2, 4] and shard(5, 1, 2) == [1, 3] and shard(1, 1, 2) == []
    assert sorted(i for r in range(3) for i in shard(7, r, 3)) == list(range(7))
    assert pair_seed(0, "pair3") == pair_seed(0, "pair3") != pair_seed(0, "pair4")
    assert fabric_settings(None) is None and fabric_settings({"devices": 1}) is None
    ddp = fabric_settings({"accelerator": "cpu", "devices": 2, "num_nodes": 3,
                           "strategy": {"process_group_backend": "gloo"}})
    assert ddp == {"accelerator": "cpu", "devices": 2, "num_nodes": 3, "process_group_backend": "gloo",
                   "start_method": "popen"}
    with pytest.raises(ValueError, match="trainer.num_nodes"):
        fabric_settings({"devices": 2, "num_nodes": 0})


def test_two_processes_write_the_one_process_files(reference: Path, tmp_path: Path) -> None:
    """3 pairs on 2 gloo ranks (2 + 1): every pair registered once, files identical to one process's."""
    assert _run(tmp_path, tmp_path / "two", 2) == [f"pair{i}" for i in range(N_PAIRS)]
    _assert_same_files(reference, tmp_path / "two")
    assert pd.read_csv(tmp_path / "two" / "per_pair.csv")["pair"].tolist() == [f"pair{i}" for i in range(N_PAIRS)]


def test_killed_run_resumes_to_the_uninterrupted_files(reference: Path, tmp_path: Path, monkeypatch) -> None:
    """Killed after 1 pair, with a second half-written (a file, no record): the re-run on 2 processes registers
    only the 2 missing pairs (one each) and ends with the uninterrupted run's files; a third run registers nothing."""
    out = tmp_path / "resumed"
    assert _run(tmp_path, out, 1, kill_after=1) == ["pair0"]
    assert not (out / "per_pair.csv").exists()
    half = out / "pairs" / "pair1"
    half.mkdir(parents=True)
    (half / "warped.nii.gz").write_bytes(b"half")
    # the re-run through Lightning Fabric's launcher (as learnsim-test trainer=ddp_sim; spawn, not a new command)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread per process, as the reference
    echo = _FileEcho(str(tmp_path / "fabric-echo"))
    ddp = {"accelerator": "cpu", "devices": 2, "num_nodes": 1, "process_group_backend": "gloo", "start_method": "spawn"}
    summary = launch(ddp, partial(run_rank, _job(out, echo)), torch.device("cpu"))
    assert summary["n_pairs"] == N_PAIRS and echo.collected() == ["pair1", "pair2"]
    _assert_same_files(reference, out)
    assert _run(tmp_path, out, 1) == []
    _assert_same_files(reference, out)


def test_corrupt_pair_output_is_redone(reference: Path, tmp_path: Path) -> None:
    """A damaged file of a complete pair (same size, other bytes) and a deleted one: those two pairs only."""
    out = tmp_path / "damaged"
    shutil.copytree(reference, out)
    target = out / "pairs" / "pair1" / "disp_mm.nii.gz"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    (out / "pairs" / "pair2" / "uncertainty_mm.nii.gz").unlink()
    folder = CohortFolder(out, SETTINGS)
    assert [folder.complete(f"pair{i}") for i in range(N_PAIRS)] == [True, False, False]
    assert _run(tmp_path, out, 1) == ["pair1", "pair2"]
    _assert_same_files(reference, out)


def test_other_settings_are_refused_and_fresh_keeps_foreign_files(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "other"
    shutil.copytree(reference, out)
    (out / "notes.txt").write_text("mine")
    (out / "pairs" / "pair0" / "my_seg.nii.gz").write_text("mine")
    other = {**SETTINGS, "q_v.no_iters": 4}
    with pytest.raises(ValueError, match=rf"{MANIFEST}: .*q_v.no_iters is 3 there, 4 here.*fresh"):
        run_rank(_job(out, None, settings=other), Ranks())
    removed = CohortFolder(out, other).clear()
    assert removed > 10 and not (out / "per_pair.csv").exists() and not (out / "pairs" / "pair1").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "pairs" / "pair0" / "my_seg.nii.gz").is_file()
    assert not (out / "pairs" / "pair0" / RECORD).exists()
    assert CohortFolder(out, other).clear() == 0  # no cohort.json now: not a run folder, nothing removed
    (out / "summary.json").write_text("the user's")
    assert CohortFolder(out, other).clear() == 0 and (out / "summary.json").read_text() == "the user's"


def test_learnsim_test_resumes_in_its_run_folder(cfg_test, tmp_path: Path, capsys) -> None:
    """The same learnsim-test config into the same run folder: the pair is skipped, the files stay."""
    from learnsim.cli.test import evaluate

    out = tmp_path / "run"
    first = evaluate(cfg_test, out)
    table = (out / "per_pair.csv").read_bytes()
    assert "learnsim-test: pair s4:" in capsys.readouterr().out
    again = evaluate(cfg_test, out)
    text = capsys.readouterr().out
    assert "1 of 1 pairs already complete" in text and "learnsim-test: pair s4:" not in text
    assert (out / "per_pair.csv").read_bytes() == table and again["overall"] == first["overall"]


def test_learnsim_register_pairs_registers_a_cohort_and_resumes(phantom_cohort: Path, tmp_path: Path,
                                                                capsys) -> None:
    from learnsim.cli.register import main

    out = tmp_path / "reg"
    argv = ["--pairs", str(phantom_cohort / "train.csv"), "--out", str(out), "--metric", "ssd", "--no-figures",
            "dims=16", "no_iters=3", "no_samples=2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "learnsim-register: 2 pairs registered" in text and text.count("learnsim-register: pair ") == 2
    per_pair = pd.read_csv(out / "per_pair.csv")
    assert per_pair["pair"].tolist() == ["s1", "s2"] and (out / "pairs" / "s2" / "warped.nii.gz").is_file()
    (out / "pairs" / "s1" / "warped.nii.gz").write_bytes(b"damaged")
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "1 of 2 pairs already complete" in text and text.count("learnsim-register: pair ") == 1
    assert main(argv + ["--fresh"]) == 0
    assert capsys.readouterr().out.count("learnsim-register: pair ") == 2
    assert main(argv[:-1] + ["no_samples=3"]) == 1  # other settings: one line, nothing changed
    assert "cohort.json: this run folder was made with other settings" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("x")
    assert main(["--pairs", str(phantom_cohort / "train.csv"), "--out", str(foreign)]) == 1
    assert "is not a cohort run folder" in capsys.readouterr().err and (foreign / "mine.txt").is_file()


@pytest.mark.slow
def test_learnsim_test_command_on_two_cpu_processes_then_resumed_on_one(phantom_cohort: Path, tmp_path: Path) -> None:
    """The command a user types: ``learnsim-test ... trainer=ddp_sim hydra.run.dir=DIR`` (Lightning starts the second
    process by re-running the command) registers 3 pairs over 2 ranks; the same command on one process then skips
    all 3 and rewrites the same tables."""
    import subprocess
    import sys

    rows = (phantom_cohort / "train.csv").read_text().splitlines()
    test_rows = (phantom_cohort / "test.csv").read_text().splitlines()
    (phantom_cohort / "test.csv").write_text("\n".join([rows[0], *rows[1:], *test_rows[1:]]) + "\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "learnsim.cli.test", "+experiment=demo", "metric=ssd",
           f"paths.data_dir={phantom_cohort}", "data.dims=16", "data.intensity=minmax", "logger=none",
           "transformation.no_steps=3", "q_v.no_iters=3", "no_samples=2", "no_samples_uncertainty=3", "device=cpu",
           "figures=false", "save_nifti=false", f"hydra.run.dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([*cmd, "trainer=ddp_sim"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "3/3 pairs done" in two.stdout and "2 processes" in two.stdout
    table = (out / "per_pair.csv").read_bytes()
    assert pd.read_csv(out / "per_pair.csv")["pair"].tolist() == ["s1", "s2", "s4"]
    one = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    assert "3 of 3 pairs already complete" in one.stdout and "learnsim-test: pair " not in one.stdout
    assert (out / "per_pair.csv").read_bytes() == table
