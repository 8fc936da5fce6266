"""The learnt noise model, drawn: the training pairs' residuals against the Gaussian and the Student-t fits, and
where on a test pair the Student-t likelihood down-weights voxels (``E[tau_x]``).

    python -c 'from learnsim.evaluation.noise_figure import noise_figure_from_run as f; f(CKPT, DATA, OUT)'

(``scripts/demo.sh`` draws it from the ``demo_t`` run.) Left: the density of the standardised residual
``z = sqrt(w) r`` pooled over the training pairs under their fitted q_v (from the checkpoint's per-pair
histograms, :class:`learnsim.likelihood.ResidualHistogram`), with the Gaussian of the same data's ML precision and
the learnt Student-t, on a log scale (the tails are where the two differ). Right: a test pair's mid slice (atlas,
affine-only residual, and the weights ``E[tau_x] = (nu + 1) / (nu + w r_x^2)`` the Student-t gives its voxels).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["noise_figure", "noise_figure_from_run"]


def _student_t_pdf(z: np.ndarray, nu: float) -> np.ndarray:
    log = (math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
           - (nu + 1) / 2 * np.log1p(z * z / nu))
    return np.exp(log)


def noise_figure(hist_counts: np.ndarray, centres_r2: np.ndarray, precision: float, nu: float,
                 atlas: np.ndarray, residual: np.ndarray, path: str | os.PathLike) -> Path:
    """Draw the figure (module docstring).

    Args:
        hist_counts, centres_r2: pooled counts of squared residuals and their bins' ``r^2`` (``[bins]``).
        precision, nu: the learnt Student-t noise (``w``, ``nu``).
        atlas, residual: a 2D slice of the atlas and of a pair's residual ``F - M`` (same shape).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = hist_counts.sum()
    w_gauss = n / float((hist_counts * centres_r2).sum())
    # the r^2 histogram as a density of |z|, z = sqrt(w) r, on log-spaced bins (each bin's width in |z|)
    edges_r2 = np.sqrt(centres_r2[1:] * centres_r2[:-1])
    edges_r2 = np.concatenate([[centres_r2[0] ** 2 / edges_r2[0]], edges_r2, [centres_r2[-1] ** 2 / edges_r2[-1]]])
    z_edges = np.sqrt(precision * edges_r2)
    width = np.diff(z_edges)
    z = np.sqrt(precision * centres_r2)
    keep = hist_counts > 0
    density = hist_counts / n / width / 2  # two-sided: a density of z
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    ax = axes[0]
    ax.semilogy(z[keep], density[keep], "k.", ms=4, label="training residuals (pooled)")
    grid = np.linspace(0, max(8.0, float(z[keep].max())), 400)
    s = math.sqrt(precision / w_gauss)  # the Gaussian's std in units of z
    ax.semilogy(grid, np.exp(-0.5 * (grid / s) ** 2) / (s * math.sqrt(2 * math.pi)), "b-",
                label=f"Gaussian, ML precision {w_gauss:.3g}")
    ax.semilogy(grid, _student_t_pdf(grid, nu), "r-", label=f"Student-t, w {precision:.3g}, nu {nu:.3g}")
    ax.set_xlabel("|z| = sqrt(w) |r|")
    ax.set_ylabel("density")
    ax.set_ylim(max(1e-7, density[keep].min() / 3), None)
    ax.legend(fontsize=8)
    ax.set_title("residual distribution (log scale)")
    from learnsim.likelihood import student_t_weights

    tau = student_t_weights(residual**2, precision, nu)  # works on arrays too
    for a, img, title, cmap, lim in (
        (axes[1], atlas, "atlas (mid slice)", "gray", (0, 1)),
        (axes[2], residual, "affine-only residual F - M", "coolwarm", (-0.3, 0.3)),
        (axes[3], tau, "Student-t weight E[tau] (1 = SSD)", "viridis", (0, float(max(1.0, tau.max())))),
    ):
        im = a.imshow(np.rot90(img), cmap=cmap, vmin=lim[0], vmax=lim[1])
        a.set_title(title)
        a.axis("off")
        fig.colorbar(im, ax=a, fraction=0.046)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def noise_figure_from_run(ckpt: str | os.PathLike, data_dir: str | os.PathLike, path: str | os.PathLike,
                          dims: int = 48, pair: int = 0, intensity: str = "histmatch") -> Path:
    """:func:`noise_figure` for a ``demo_t``-style checkpoint (Student-t noise learnt over the training pairs) and
    test pair ``pair`` of a cohort folder.

    Raises:
        ValueError: naming the checkpoint if it holds no learnt Student-t noise.
    """
    from learnsim.checkpoint import load_checkpoint
    from learnsim.data.datamodule import PairDataModule
    from learnsim.likelihood import ResidualHistogram

    state = load_checkpoint(Path(ckpt))
    spec = (state.get("hyper_parameters") or {}).get("metric_spec") or {}
    pop = state.get("likelihood_population") or {}
    if "nu" not in spec or not pop.get("hists"):
        raise ValueError(f"{ckpt}: no learnt Student-t noise (train with likelihood=vb likelihood.noise=student_t)")
    pooled = ResidualHistogram()
    for counts in pop["hists"].values():
        pooled.counts += torch.tensor(counts, dtype=torch.float64)
    dm = PairDataModule(None, test_csv=Path(data_dir) / "test.csv", dims=dims, intensity=intensity)
    dm.setup("test")
    batch = next(b for i, b in enumerate(dm.test_dataloader()) if i == pair)
    mid = batch["fixed"].shape[2] // 2
    atlas = batch["fixed"][0, 0, mid].numpy()
    residual = (batch["fixed"] - batch["moving"])[0, 0, mid].numpy() * batch["fixed_mask"][0, 0, mid].numpy()
    return noise_figure(pooled.counts.numpy(), pooled.centres.numpy(), float(spec["precision"]), float(spec["nu"]),
                        atlas, residual, path)
