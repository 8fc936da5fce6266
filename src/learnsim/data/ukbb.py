"""UK Biobank-style cohorts: one folder per subject ID under a root, one subject as the atlas.

Default file names are those the original code read (see DATA.md)::

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
    is_finished,
    pair_row,
    read_manifest,
    remove_partials,
    subject_files,
    write_json,
    write_pairs_csv,
    write_subject,
)
from learnsim.data.preprocess import Volume, as_dims, preprocess, target_grid
from learnsim.data.progress import Progress
from learnsim.data.validate import DataValidationError

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
    unchanged and whose outputs still match their sha256.
    """
    root, out = Path(root), Path(out)
    dims = as_dims(dims)
    splits = {"train": list(train_ids), "val": list(val_ids), "test": list(test_ids)}
    names = {"image": image_name, "mask": mask_name, "seg": seg_name}

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
    for split, ids in splits.items():
        if atlas_id in ids:
            log(f"[learnsim-data] {split}: leaving out the atlas {atlas_id} (it is the fixed image)")
            splits[split] = [s for s in ids if s != atlas_id]

    def files(sid: str) -> dict[str, Path | None]:
        return {k: (root / sid / n if n else None) for k, n in names.items()}

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    remove_partials(out)
    manifest_path = out / "manifest.json"
    if link_originals:
        def absolute(sid: str) -> dict[str, str | None]:
            return {k: str(p.resolve()) if p else None for k, p in files(sid).items()}

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
        write_json(manifest_path, manifest)
        log(
            f"[learnsim-data] wrote pair lists for {sum(map(len, splits.values()))} subjects in {out} (originals linked)"
        )
        return manifest

    old = {
        e["id"]: e
        for e in read_manifest(manifest_path).get("volumes", [])
        if isinstance(e, dict) and "id" in e
    }
    atlas_vol = Volume.load(root / atlas_id / image_name)
    grid = target_grid(atlas_vol.data.shape, atlas_vol.affine, dims)
    entries = []

    def manifest(complete: bool) -> dict:
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

    def process(sid: str, rel: str, split: str) -> dict:
        f = files(sid)
        spec = {
            "version": UKBB_VERSION,
            "dims": list(dims),
            "inputs": {k: _fingerprint(p) for k, p in f.items() if p},
        }
        entry = {"id": rel, "subject": sid, "split": split, "spec": spec}
        if is_finished(out, old.get(rel), spec):
            entry["files"] = old[rel]["files"]
            progress.step(f"[learnsim-data] {sid}: up to date")
            return entry
        p = preprocess(
            Volume.load(f["image"]),
            grid,
            Volume.load(f["mask"]) if f["mask"] else None,
            Volume.load(f["seg"]) if f["seg"] else None,
        )
        for note in p.notes:
            progress.log(f"[learnsim-data]   {note}")
        entry["files"] = write_subject(out, rel, p, image_name="image.nii.gz")
        progress.step(f"[learnsim-data] {sid} ({split}): written to {out / rel}")
        return entry

    # one progress step per subject, the atlas included ("k/N" and the time left; a bar on a terminal)
    progress = Progress(1 + sum(map(len, splits.values())), f"cohort -> {out}", log)
    atlas_entry = process(atlas_id, "atlas", "atlas")
    entries.append(atlas_entry)
    write_json(manifest_path, manifest(False))
    for split, ids in splits.items():
        rows = []
        for sid in ids:
            e = process(sid, f"subjects/{sid}", split)
            entries.append(e)
            write_json(manifest_path, manifest(False))
            rows.append(
                pair_row(
                    subject_files("atlas", atlas_entry["files"], "image.nii.gz"),
                    subject_files(f"subjects/{sid}", e["files"], "image.nii.gz"),
                )
            )
        write_pairs_csv(out / f"{split}.csv", rows)
    progress.close()
    final = manifest(True)
    write_json(manifest_path, final)
    log(
        f"[learnsim-data] UK Biobank-style cohort in {out}: {sum(map(len, splits.values()))} subjects, dims {dims}, {time.time() - t0:.1f} s"
    )
    return final
