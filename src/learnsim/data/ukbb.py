"""UK Biobank-style cohorts: one folder per subject ID under a root, one subject as the atlas.

Default file names are those the original code read (docs/data.md#your-cohort)::

    <root>/<ID>/T2_FLAIR_unbiased_brain_affine_to_mni.nii.gz     image (brain-extracted, bias-corrected)
    <root>/<ID>/T1_brain_mask_affine_to_mni.nii.gz                brain mask
    <root>/<ID>/T1_first_all_fast_firstseg_affine_to_mni.nii.gz   FSL FIRST labels (FreeSurfer-compatible ids)

:func:`build_ukbb` preprocesses every volume with :func:`learnsim.data.preprocess.preprocess` onto the atlas grid
and writes ``atlas/``, ``subjects/<ID>/{image,mask,seg}.nii.gz``, the pair lists and ``manifest.json`` (the same
layout as the demo cohort). With ``link_originals=True`` it only writes pair lists pointing at the original
files; :class:`learnsim.data.dataset.PairDataset` then runs the same preprocessing when it loads them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from learnsim.data.cohort import (
    PlannedSubject,
    cohort_layout,
    open_cohort,
    pair_row,
    write_cohort,
    write_json,
    write_pairs_csv,
)
from learnsim.data.preprocess import Preprocessed, Volume, as_dims, preprocess, target_grid
from learnsim.data.validate import DataValidationError
from learnsim.grid import Grid

__all__ = ["UKBB_IMAGE", "UKBB_MASK", "UKBB_SEG", "read_ids", "build_ukbb"]

UKBB_IMAGE = "T2_FLAIR_unbiased_brain_affine_to_mni.nii.gz"
UKBB_MASK = "T1_brain_mask_affine_to_mni.nii.gz"
UKBB_SEG = "T1_first_all_fast_firstseg_affine_to_mni.nii.gz"
UKBB_VERSION = 1


def read_ids(path: str | os.PathLike) -> list[str]:
    """Subject IDs from a text file: one per line (first comma/whitespace field), blank lines and ``#`` skipped."""
    ids = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(line.replace(",", " ").split()[0])
    return ids


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _check_inputs(root: Path, atlas_id: str, splits: dict[str, list[str]], names: dict[str, str | None]) -> None:
    """Every missing subject folder or file and every duplicated id, reported at once (``DataValidationError``)."""
    problems = []
    for sid in [atlas_id] + [s for ids in splits.values() for s in ids]:
        for kind, name in names.items():
            if name and not (root / sid / name).is_file():
                problems.append(f"subject {sid}: {kind} file {root / sid / name} not found")
    for split, ids in splits.items():
        dup = sorted({s for s in ids if ids.count(s) > 1})
        if dup:
            problems.append(f"{split} ids: duplicated {dup}")
    if problems:
        raise DataValidationError(root, sorted(set(problems), key=problems.index))


def _files(root: Path, sid: str, names: dict[str, str | None]) -> dict[str, Path | None]:
    return {k: (root / sid / n if n else None) for k, n in names.items()}


def _link_originals(
    root: Path, atlas_id: str, splits: dict, names: dict, dims: tuple[int, int, int], out: Path, log: Callable[..., None]
) -> dict:
    """Pair lists pointing at the original files (absolute paths) and a short manifest; nothing is resampled."""

    def absolute(sid: str) -> dict[str, str | None]:
        return {k: str(p.resolve()) if p else None for k, p in _files(root, sid, names).items()}

    for split, ids in splits.items():
        write_pairs_csv(out / f"{split}.csv", [pair_row(absolute(atlas_id), absolute(sid)) for sid in ids])
    manifest = {
        "what": "UK Biobank-style cohort, pair lists pointing at the original files",
        "root": str(root.resolve()),
        "atlas": atlas_id,
        "dims": list(dims),
        "names": names,
        "splits": splits,
    }
    write_json(out / "manifest.json", manifest)
    log(f"[learnsim-data] wrote pair lists for {sum(map(len, splits.values()))} subjects in {out} (originals linked)")
    return manifest


def _planned(
    root: Path, sid: str, rel: str, split: str, names: dict, grid: Grid, out: Path, dims: tuple[int, int, int]
) -> PlannedSubject:
    """Subject ``sid`` preprocessed onto ``grid`` into ``out/rel``; rebuilt when its inputs' size or mtime change."""
    f = _files(root, sid, names)

    def make(log: Callable[..., None]) -> tuple[Preprocessed, dict]:
        load = lambda key: Volume.load(f[key]) if f[key] else None  # noqa: E731
        p = preprocess(Volume.load(f["image"]), grid, load("mask"), load("seg"))
        for note in p.notes:
            log(f"[learnsim-data]   {note}")
        return p, {}

    return PlannedSubject(
        folder=rel,
        split=split,
        head={"id": rel, "subject": sid, "split": split},
        spec={"version": UKBB_VERSION, "dims": list(dims), "inputs": {k: _fingerprint(p) for k, p in f.items() if p}},
        make=make,
        done=lambda *_: f"[learnsim-data] {sid} ({split}): written to {out / rel}",
        label=sid,
    )


def build_ukbb(
    root: str | os.PathLike,
    atlas_id: str,
    train_ids: Sequence[str],
    out: str | os.PathLike,
    val_ids: Sequence[str] = (),
    test_ids: Sequence[str] = (),
    dims: int | Sequence[int] = 128,
    image_name: str = UKBB_IMAGE,
    mask_name: str | None = UKBB_MASK,
    seg_name: str | None = UKBB_SEG,
    link_originals: bool = False,
    log: Callable[..., None] = print,
) -> dict:
    """Preprocess a cohort onto the atlas grid (or link the originals) and write ``{train,val,test}.csv``.

    Every missing subject folder or file is reported at once (``DataValidationError``) before anything is written.
    The atlas is left out of the moving subjects. Reruns skip subjects whose inputs (size, mtime) and settings are
    unchanged and whose outputs still match their sha256 (:func:`learnsim.data.cohort.write_cohort`).
    """
    root, out = Path(root), Path(out)
    dims = as_dims(dims)
    splits = {"train": list(train_ids), "val": list(val_ids), "test": list(test_ids)}
    names = {"image": image_name, "mask": mask_name, "seg": seg_name}
    _check_inputs(root, atlas_id, splits, names)
    for split, ids in splits.items():
        if atlas_id in ids:
            log(f"[learnsim-data] {split}: leaving out the atlas {atlas_id} (it is the fixed image)")
            splits[split] = [s for s in ids if s != atlas_id]

    t0 = time.time()
    # refuses a non-empty folder that is not a learnsim cohort; removes only our own temporary files
    folders = ["atlas", *(f"subjects/{sid}" for ids in splits.values() for sid in ids)]
    open_cohort(out, "learnsim-data ukbb", cohort_layout(folders, "image.nii.gz"))
    if link_originals:
        return _link_originals(root, atlas_id, splits, names, dims, out, log)

    header = Grid.from_nifti(root / atlas_id / image_name)
    grid = target_grid(header.shape, header.affine, dims)
    subjects = [_planned(root, atlas_id, "atlas", "atlas", names, grid, out, dims)]
    subjects += [
        _planned(root, sid, f"subjects/{sid}", split, names, grid, out, dims)
        for split, ids in splits.items()
        for sid in ids
    ]

    def manifest(entries: list[dict], complete: bool) -> dict:
        return {
            "what": "UK Biobank-style cohort preprocessed by learnsim (RAS, centred cube, resized, min-max [0, 1])",
            "complete": complete,
            "root": str(root.resolve()),
            "atlas": atlas_id,
            "grid": grid.to_dict(),
            "names": names,
            "splits": splits,
            "volumes": entries,
        }

    final = write_cohort(out, subjects, manifest, f"cohort -> {out}", log, image_name="image.nii.gz")
    log(
        f"[learnsim-data] UK Biobank-style cohort in {out}: {sum(map(len, splits.values()))} subjects, dims {dims}, {time.time() - t0:.1f} s"
    )
    return final
