"""A cohort run folder: each pair's outputs recorded when complete, checked on resumption, merged into one result.

A run folder (``learnsim-test``'s run folder, ``learnsim-register --pairs``' ``--out``) holds, per pair,
``pairs/<pair_id>/`` with the evaluator's files (:mod:`learnsim.evaluation.evaluator`) plus two of this module's:

* ``calibration_sample.npy``: the pair's calibration subsample, ``[3, K]`` float64 rows (uncertainty mm,
  disagreement, error), the pair's share of ``calibration_bins.csv``;
* ``pair.json`` (:data:`RECORD`), written last and atomically: the pair's table rows (``metrics.csv``,
  ``metrics_mean.csv``, ``metrics_before.csv``, its ``per_pair.csv`` row), or its failure, the settings digest,
  and the size and SHA-256 of every file the pair wrote.

A pair is complete when its record parses, was made with the same settings, and every file it names is there with
that size and hash (:meth:`CohortFolder.complete`): a pair killed half-way (no record) or whose file was damaged
since (hash differs) is registered again. :meth:`CohortFolder.merge` rebuilds the evaluator's tables from the
records in the pair list's order, so one process, N processes and a resumed run write the same files.

``cohort.json`` (:data:`MANIFEST`) holds the settings of the run folder; a later run with other settings is
refused in one line (or starts over with ``fresh``, which removes only the files named here).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from learnsim import io
from learnsim.evaluation.evaluator import Evaluator, _write_json

__all__ = ["CohortFolder", "RECORD", "MANIFEST", "CALIBRATION", "RUN_FILES", "PAIR_FILES", "pair_seed",
           "settings_digest", "shard", "eta_text"]

#: the per-pair record, written last: the pair is complete when it is there and its files match it
RECORD = "pair.json"
#: the run folder's settings
MANIFEST = "cohort.json"
#: the per-pair calibration subsample ([3, K] float64)
CALIBRATION = "calibration_sample.npy"
#: files of the run folder that the merge writes (``fresh`` removes these and nothing else at the top level;
#: learnsim-test's ``config.json`` is rewritten by every run, never removed)
RUN_FILES = ("metrics.csv", "metrics_mean.csv", "metrics_before.csv", "per_pair.csv", "calibration_bins.csv",
             "summary.json", "boxplots.png", "calibration.png", MANIFEST)
#: files of ``pairs/<pair_id>/`` that learnsim writes
PAIR_FILES = ("warped.nii.gz", "warped_seg.nii.gz", "disp_mm.nii.gz", "uncertainty_mm.nii.gz", "output_grid.png",
              "label_overlay.png", "summary.json", CALIBRATION, RECORD)
_VERSION = 1


def shard(n: int, rank: int, world: int) -> list[int]:
    """The pair indices of rank ``rank`` of ``world``: ``i % world == rank`` (no padding: shards differ by <= 1)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard: rank {rank} of world {world} is not a rank")
    return list(range(rank, n, world))


def pair_seed(seed: int, pair_id: str) -> int:
    """The torch seed of one pair: the run's ``seed`` and the pair's name, not its rank or position in a shard,
    so a pair draws the same samples on 1 or N processes and in a resumed run."""
    return (int(seed) * 1_000_003 + zlib.crc32(pair_id.encode())) % (2**63)


def _canonical(settings: Mapping[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))


def settings_digest(settings: Mapping[str, Any]) -> str:
    """SHA-256 of the settings (a JSON-able mapping): pairs registered under other settings are never reused."""
    return hashlib.sha256(_canonical(settings).encode()).hexdigest()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _first_difference(then: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    a, b = _flat(json.loads(_canonical(then))), _flat(json.loads(_canonical(now)))
    diffs = [f"{key} is {a.get(key, '<unset>')!r} there, {b.get(key, '<unset>')!r} here"
             for key in sorted(set(a) | set(b)) if a.get(key, "<unset>") != b.get(key, "<unset>")]
    return "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "") or "the settings differ"


def _file_entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": io.sha256_file(path)}


def _write_record(path: Path, record: Mapping[str, Any]) -> None:
    # plain JSON with NaN kept (allow_nan): the rows come back exactly as the evaluator made them
    with io.atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1, allow_nan=True) + "\n")


class CohortFolder:
    """The run folder of a cohort: records, completeness, ``fresh``, the settings check and the merge.

    Args:
        out_dir: the run folder.
        settings: what the outputs depend on (JSON-able; not the number of processes, the device or the output
            folder); stored in :data:`MANIFEST` and, as a digest, in every record.
        prog: the command, for messages.
    """

    def __init__(self, out_dir: str | os.PathLike, settings: Mapping[str, Any], prog: str = "learnsim-test") -> None:
        self.out_dir = Path(out_dir)
        self.settings = dict(settings)
        self.digest = settings_digest(self.settings)
        self.prog = prog
        #: how the command starts over (named in messages)
        self.fresh_hint = "fresh=true" if prog == "learnsim-test" else "--fresh"

    def pair_dir(self, pair_id: str) -> Path:
        """``<out_dir>/pairs/<pair_id>``: the pair's files and its record."""
        return self.out_dir / "pairs" / pair_id

    # ------------------------------------------------------------------------------------------ settings, fresh
    def check_settings(self) -> None:
        """Refuse a run folder made with other settings (one line naming the file and the first differing key)."""
        path = self.out_dir / MANIFEST
        if not path.is_file():
            return
        try:
            then = json.loads(path.read_text(encoding="utf-8"))["settings"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.prog}: {path}: unreadable ({exc}); re-run with {self.fresh_hint} to start over") from None
        if settings_digest(then) != self.digest:
            raise ValueError(f"{self.prog}: {path}: this run folder was made with other settings "
                             f"({_first_difference(then, self.settings)}); re-run with {self.fresh_hint} to start over "
                             "in it, or "
                             "choose another run folder")

    def write_manifest(self) -> None:
        """Write :data:`MANIFEST` (the settings of this run folder)."""
        _write_json(self.out_dir / MANIFEST, {"written_by": self.prog, "version": _VERSION, "settings": self.settings,
                                             "settings_sha256": self.digest})

    def clear(self) -> int:
        """``fresh``: remove learnsim's files of this run folder (:data:`RUN_FILES`, :data:`PAIR_FILES` under
        ``pairs/*/``, and their temporary files), and the folders they leave empty; anything else stays. Only a
        folder marked by :data:`MANIFEST` (a cohort run's) is touched: elsewhere the names may be the user's.
        Returns the number of files removed."""
        removed = 0
        if not (self.out_dir / MANIFEST).is_file():
            return 0
        folders = [self.out_dir] + (sorted(p for p in (self.out_dir / "pairs").iterdir() if p.is_dir()
                                           and not p.is_symlink()) if (self.out_dir / "pairs").is_dir() else [])
        for folder in folders:
            names = RUN_FILES if folder == self.out_dir else PAIR_FILES
            patterns = [io.partial_pattern(folder / n) for n in names]
            for entry in folder.iterdir():
                if entry.is_file() and (entry.name in names or any(p.fullmatch(entry.name) for p in patterns)):
                    entry.unlink()
                    removed += 1
            if folder != self.out_dir:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty
        with contextlib.suppress(OSError):
            (self.out_dir / "pairs").rmdir()
        return removed

    # --------------------------------------------------------------------------------------------------- records
    def load(self, pair_id: str) -> dict[str, Any] | None:
        """The record of a pair, or None when absent, unreadable or made with other settings."""
        try:
            record = json.loads((self.pair_dir(pair_id) / RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("version") != _VERSION or record.get("settings") != self.digest:
            return None
        return record if record.get("pair") == pair_id else None

    def complete(self, pair_id: str) -> bool:
        """Whether the pair's outputs are complete: its record is valid and every file it names has the recorded
        size and SHA-256 (read in full: a damaged file makes the pair incomplete)."""
        record = self.load(pair_id)
        if record is None:
            return False
        for name, entry in record.get("files", {}).items():
            path = self.pair_dir(pair_id) / name
            try:
                if not path.is_file() or path.stat().st_size != entry["size"] or io.sha256_file(path) != entry["sha256"]:
                    return False
            except (OSError, KeyError, TypeError):
                return False
        return True

    def done(self, pair_id: str) -> bool:
        """Cheap: whether the pair's record exists (for progress counts; :meth:`complete` checks it)."""
        return (self.pair_dir(pair_id) / RECORD).is_file()

    def start_pair(self, pair_id: str) -> None:
        """Before (re-)registering a pair: drop its old record, so a kill from here on leaves it incomplete."""
        with contextlib.suppress(FileNotFoundError):
            (self.pair_dir(pair_id) / RECORD).unlink()

    def record_pair(self, pair_id: str, state: Mapping[str, Any]) -> None:
        """Record a pair evaluated by :meth:`Evaluator.add_pair` (``state`` from :meth:`Evaluator.pop_pair`)."""
        pair_dir = self.pair_dir(pair_id)
        calibration = state.get("calibration")
        if calibration is not None:
            with io.atomic_path(pair_dir / CALIBRATION) as tmp, open(tmp, "wb") as f:
                np.save(f, np.stack([np.asarray(a, dtype=np.float64) for a in calibration]))
        files = {name: _file_entry(pair_dir / name) for name in PAIR_FILES
                 if name != RECORD and (pair_dir / name).is_file()}
        _write_record(pair_dir / RECORD, {
            "version": _VERSION, "pair": pair_id, "settings": self.digest, "status": "ok",
            **{k: state[k] for k in ("summary", "metrics", "metrics_mean", "metrics_before")}, "files": files})

    def record_failure(self, pair_id: str, reason: str) -> None:
        """Record a pair that could not be registered (reported in ``summary.json``, never averaged in)."""
        _write_record(self.pair_dir(pair_id) / RECORD, {"version": _VERSION, "pair": pair_id, "settings": self.digest,
                                                        "status": "failed", "reason": reason, "files": {}})

    # ----------------------------------------------------------------------------------------------------- merge
    def merge(self, pair_ids: Sequence[str], evaluator: Evaluator,
              echo: Callable[[str], None] | None = print) -> dict[str, Any]:
        """Write the run's tables, ``summary.json`` and figures from the records of ``pair_ids`` (in that order)
        through a fresh ``evaluator`` (its settings those of the run); returns the summary.

        Raises:
            ValueError: a pair of the list has no valid record (naming the pair and the record's path).
        """
        failed: list[dict[str, str]] = []
        for pair_id in pair_ids:
            record = self.load(pair_id)
            if record is None:
                raise ValueError(f"{self.prog}: {self.pair_dir(pair_id) / RECORD}: missing or made with other settings; "
                                 "cannot merge (re-run the same command to register the missing pairs)")
            if record["status"] == "failed":
                failed.append({"pair": pair_id, "reason": str(record.get("reason"))})
                continue
            calibration = None
            if CALIBRATION in record["files"]:
                calibration = tuple(np.load(self.pair_dir(pair_id) / CALIBRATION, allow_pickle=False))
            evaluator.restore_pair(record["summary"], record["metrics"], record["metrics_mean"],
                                   record["metrics_before"], calibration)
        summary = evaluator.finalize()
        summary["n_failed"] = len(failed)
        summary["failed_pairs"] = failed
        _write_json(self.out_dir / "summary.json", summary)
        if failed and echo is not None:
            echo(f"{self.prog}: WARNING: {len(failed)} pair(s) failed and are not in the means: "
                 + ", ".join(f["pair"] for f in failed) + " (summary.json, failed_pairs)")
        return summary


def eta_text(seconds: float) -> str:
    """``"1h02m"``, ``"3m05s"`` or ``"12s"`` for a time left in seconds ("?" when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"

