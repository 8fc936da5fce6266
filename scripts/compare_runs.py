#!/usr/bin/env python
"""Compare evaluated learnsim runs side by side.

    python scripts/compare_runs.py RUN_A RUN_B [RUN_C ...] [--labels A B ...] [--out DIR] [--pairing pair|sample]

Each RUN is a folder written by the test CLI's evaluator (metrics.csv, per_pair.csv, summary.json). Prints a table of
mean DSC / ASD / HD95 / folding / SDlogJ / calibration per run and writes into DIR: summary_table.csv, wilcoxon.csv
(paired Wilcoxon signed-rank test per structure, RUN_A against each other run; by default paired on
pair x structure with the samples of a pair averaged, see learnsim.evaluation.compare), boxplots.png and
calibration.png.
"""

from __future__ import annotations

import argparse
import sys

from learnsim.evaluation.compare import compare_runs, format_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "runs", nargs="+", help="evaluated run folders; the first is the reference of the tests"
    )
    parser.add_argument("--labels", nargs="+", help="display names, one per run (default: folder names)")
    parser.add_argument("--out", default="compare", help="output folder (default: ./compare)")
    parser.add_argument(
        "--pairing", choices=("pair", "sample"), default="pair", help="Wilcoxon pairing unit (default: pair)"
    )
    parser.add_argument("--no-figures", action="store_true", help="skip the PNGs")
    args = parser.parse_args(argv)
    try:
        res = compare_runs(
            args.runs, args.out, labels=args.labels, pairing=args.pairing, figures=not args.no_figures
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"compare_runs: {exc}", file=sys.stderr)
        return 2
    print(format_summary(res["summary"]))
    tests = res["wilcoxon"]
    if tests is not None:
        sig = tests[(tests["p_holm"] < 0.05) & (tests["structure"] != "all")]
        overall = tests[tests["structure"] == "all"]
        print("\nWilcoxon (all structures, per-pair means):")
        print(
            overall[["metric", "run_a", "run_b", "n", "mean_a", "mean_b", "p_value"]].to_string(index=False)
        )
        print(f"\n{len(sig)} structure-level tests with Holm-adjusted p < 0.05")
    for name, path in res["files"].items():
        print(f"wrote {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
