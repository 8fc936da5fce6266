"""Mean DSC, folding and SDlogJ against the likelihood precision (the sweep of scripts/precision_sweep.sh).

    python scripts/precision_figure.py SWEEP_DIR [NAME=LEARNT_RUN_DIR ...]

Reads ``SWEEP_DIR/{ssd,lcc}_w<precision>/per_pair.csv`` and ``{ssd,lcc}_auto``; each learnt run (a learnsim-test
folder of a learnt metric) is drawn at its effective precision ``weight x rho`` (mean ``data_weight`` x mean
``energy_ratio`` of its per-pair table). Writes ``precision_sweep.csv`` and ``precision_sweep.png``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def _row(run: Path, label: str, energy: str) -> dict:
    t = pd.read_csv(run / "per_pair.csv")
    ok = t[t["dsc_mean"].notna()]
    rho = float(ok["energy_ratio"].mean()) if "energy_ratio" in ok else 1.0
    return {"run": label, "energy": energy, "precision": float(ok["data_weight"].mean()), "rho": rho,
            "effective_precision": float(ok["data_weight"].mean()) * rho, "dsc": float(ok["dsc_mean"].mean()),
            "folding_voxels": float(ok["folding_voxels"].mean()), "sdlogj": float(ok["sdlogj"].mean()),
            "n_pairs": len(ok)}


def main(argv: list[str]) -> None:
    sweep = Path(argv[0])
    rows = []
    for run in sorted(sweep.iterdir()):
        m = re.fullmatch(r"(ssd|lcc)_(w[0-9.e+]+|auto)", run.name)
        if m and (run / "per_pair.csv").is_file():
            rows.append(_row(run, run.name, m.group(1)))
    for spec in argv[1:]:
        name, _, path = spec.partition("=")
        energy = "lcc" if "lcc" in name.lower() else "ssd"
        rows.append(_row(Path(path), name, energy))
    df = pd.DataFrame(rows)
    df.to_csv(sweep / "precision_sweep.csv", index=False)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for energy, colour in (("ssd", "tab:blue"), ("lcc", "tab:orange")):
        sub = df[(df["energy"] == energy) & df["run"].str.contains("_w")].sort_values("precision")
        for ax, col in zip(axes, ("dsc", "folding_voxels", "sdlogj"), strict=True):
            ax.plot(sub["precision"], sub[col], "o-", color=colour, label=f"{energy.upper()} fixed precision")
        other = df[(df["energy"] == energy) & ~df["run"].str.contains("_w")]
        for _, r in other.iterrows():
            marker = "*" if r["run"].endswith("_auto") else ("^" if "vb" in r["run"] else "s")
            for ax, col in zip(axes, ("dsc", "folding_voxels", "sdlogj"), strict=True):
                ax.plot([r["effective_precision"]], [r[col]], marker, ms=11, color=colour, mec="k")
                ax.annotate(r["run"], (r["effective_precision"], r[col]), fontsize=7, xytext=(4, 4),
                            textcoords="offset points")
    for ax, title in zip(axes, ("mean DSC (16 test pairs, samples)", "folding voxels per pair", "SDlogJ"),
                         strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("likelihood precision (learnt metrics: weight x rho)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Precision sweep on the demo test pairs (star: precision learnt per pair; triangle: learnt over the "
                 "training pairs; square: learnt metric at weight x rho)")
    fig.tight_layout()
    fig.savefig(sweep / "precision_sweep.png", dpi=110)
    print(df.to_string(index=False))


if __name__ == "__main__":
    main(sys.argv[1:])
