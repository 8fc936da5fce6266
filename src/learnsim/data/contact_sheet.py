"""The contact sheet of the demo's training sources: one axial slice of each, aligned and masked, beside the atlas.

``python -m learnsim.data.contact_sheet docs/training_sources.png`` (or :func:`contact_sheet`) draws it and prints
each source's correlation with the atlas (the alignment check of :func:`learnsim.data.demo.aligned_sources`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from learnsim.data.demo import aligned_sources
from learnsim.io import atomic_path

__all__ = ["contact_sheet", "main"]


def contact_sheet(
    out: str | os.PathLike,
    dims: int = 128,
    train_sources: str | Sequence[str] = "all",
    z_mm: float = 18.0,
    cache: str | None = None,
    log: Callable[..., None] = print,
) -> dict[str, float]:
    """Draw the atlas and every training source (axial slice nearest ``z_mm`` in MNI, mm) into the PNG ``out``.

    Returns ``{source name: correlation with the atlas in its brain mask}`` (also printed through ``log``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    atlas, sources, corr = aligned_sources(dims, train_sources, cache, log)
    grid = atlas.grid
    # the axial slice (third axis of the RAS working grid) whose centre is nearest z_mm
    k = int(np.clip(np.rint((z_mm - grid.affine[2, 3]) / grid.affine[2, 2]), 0, grid.shape[2] - 1))
    panels = [("atlas: ICBM 2009c", atlas.image)] + [
        (f"{name}  r={corr[name]:.2f}", p.image) for name, p in sources.items()
    ]
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.3 * rows))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, (title, img) in zip(np.ravel(axes), panels, strict=False):
        ax.imshow(np.rot90(img[:, :, k]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.contour(np.rot90(atlas.mask[:, :, k]), levels=[0.5], colors="tab:red", linewidths=0.6)
        ax.set_title(title, fontsize=9)
    fig.suptitle(
        f"demo training sources after alignment and masking, axial z = {grid.affine[2, 3] + k * grid.affine[2, 2]:.0f} mm "
        "(red: atlas brain mask; r: correlation with the atlas in it)",
        fontsize=9,
    )
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90, format="png", metadata={"Software": None})
    plt.close(fig)
    for name, r in corr.items():
        log(f"{name:14s} correlation with the atlas after alignment and masking: {r:.3f}")
    return corr


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m learnsim.data.contact_sheet OUT.png [--dims N] [--train-sources all]``."""
    ap = argparse.ArgumentParser(prog="python -m learnsim.data.contact_sheet", description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dims", type=int, default=128)
    ap.add_argument("--train-sources", default="all")
    ap.add_argument("--z-mm", type=float, default=18.0)
    args = ap.parse_args(argv)
    contact_sheet(args.out, args.dims, args.train_sources, args.z_mm)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
