"""Writing a cohort folder (shared by the demo and the UK Biobank builders).

Layout: ``atlas/``, ``subjects/<id>/`` with an image, ``mask.nii.gz`` and ``seg.nii.gz`` on the atlas grid,
``{train,val,test}.csv`` (paths relative to the CSV's folder) and ``manifest.json``. Every file is written
atomically; a finished file is trusted on a rerun only if its manifest entry has the same spec and sha256.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np

from learnsim.data.preprocess import Preprocessed
from learnsim.io import atomic_path, save_nifti, sha256_file

__all__ = [
    "CSV_COLUMNS",
    "remove_partials",
    "write_subject",
    "write_text",
    "write_json",
    "write_pairs_csv",
    "subject_files",
    "pair_row",
    "read_manifest",
    "is_finished",
]

CSV_COLUMNS = ("fixed", "moving", "fixed_mask", "moving_mask", "fixed_seg", "moving_seg")


def remove_partials(root: Path) -> list[Path]:
    """Delete temporary files an interrupted (killed) run left behind (``learnsim.io.atomic_path`` names them
    ``.<name>.<random>.partial<suffix>``); returns what was removed."""
    gone = []
    if root.is_dir():
        for p in sorted(root.rglob(".*.partial*")):
            if p.is_file():
                p.unlink()
                gone.append(p)
    return gone


def write_subject(
    root: Path, rel_folder: str, p: Preprocessed, image_name: str = "t1.nii.gz"
) -> dict[str, str]:
    """Write image (float32), mask (uint8) and seg (int16) of one subject under ``root/rel_folder``.

    Returns ``{path relative to root: sha256}``. gzip output is deterministic (nibabel writes mtime 0 and no
    file name), so equal arrays give equal bytes.
    """
    out = {}
    items = [
        (image_name, p.image, np.float32),
        ("mask.nii.gz", p.mask, np.uint8),
        ("seg.nii.gz", p.seg, np.int16),
    ]
    for name, array, dtype in items:
        if array is None:
            continue
        rel = f"{rel_folder}/{name}"
        save_nifti(root / rel, array, p.grid.affine, dtype)
        out[rel] = sha256_file(root / rel)
    return out


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_pairs_csv(path: Path, rows: list[dict[str, str]]) -> None:
    """A pair list with the standard header (missing keys -> empty cells)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n", restval="")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def subject_files(folder: str, written: Collection[str], image_name: str = "t1.nii.gz") -> dict[str, str | None]:
    """A subject's files as :func:`write_subject` names them: ``{"image": "<folder>/<image_name>", "mask":
    "<folder>/mask.nii.gz" or None, "seg": "<folder>/seg.nii.gz" or None}``; mask and seg only when in ``written``
    (the paths :func:`write_subject` returned)."""
    optional = {k: f"{folder}/{k}.nii.gz" for k in ("mask", "seg")}
    return {"image": f"{folder}/{image_name}", **{k: (v if v in written else None) for k, v in optional.items()}}


def pair_row(fixed: Mapping[str, str | None], moving: Mapping[str, str | None]) -> dict[str, str]:
    """One pair-list row (:data:`CSV_COLUMNS`) from the fixed and the moving subject's files (mappings with keys
    ``image``, ``mask``, ``seg``: a path, or None / missing for none; an empty cell in the CSV)."""
    row = {}
    for side, files in (("fixed", fixed), ("moving", moving)):
        if not files.get("image"):
            raise ValueError(f"pair_row: the {side} subject has no image")
        row[side] = str(files["image"])
        for kind in ("mask", "seg"):
            row[f"{side}_{kind}"] = str(files[kind]) if files.get(kind) else ""
    return {c: row[c] for c in CSV_COLUMNS}


def read_manifest(path: Path) -> dict:
    """The manifest as a dict, ``{}`` if absent or unreadable (then everything is rebuilt)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def is_finished(root: Path, entry: dict | None, spec: dict) -> bool:
    """Trust a subject only if its manifest entry has the same spec and every file's sha256 still matches."""
    if not entry or entry.get("spec") != spec:
        return False
    files = entry.get("files", {})
    return bool(files) and all((root / f).is_file() and sha256_file(root / f) == h for f, h in files.items())
