"""``learnsim-compare``: compare evaluated runs (folders written by ``learnsim-test``).

    learnsim-compare RUN_A RUN_B [RUN_C ...] [--labels A B ...] [--out DIR] [--pairing pair|sample]
    learnsim-compare --table [--per-pair] RUN [RUN ...]

Default: print a table of mean DSC / ASD / HD95 / folding / SDlogJ / calibration per run and write into DIR
(default ./compare) summary_table.csv, wilcoxon.csv (paired Wilcoxon signed-rank test per structure, RUN_A
against each other run; paired on pair x structure with the samples of a pair averaged unless --pairing sample,
see learnsim.evaluation.compare), boxplots.png and calibration.png.

--table: print the README's markdown results table instead (a "before registration (affine only)" row from the
first run's metrics_before.csv, then one row per run); --per-pair adds the mean DSC per pair and run. Writes no
files; one run is enough.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="learnsim-compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="evaluated run folders; the first is the reference of the tests")
    parser.add_argument("--labels", nargs="+", help="display names, one per run (default: folder names)")
    parser.add_argument("--out", default="compare", help="output folder (default: ./compare)")
    parser.add_argument(
        "--pairing", choices=("pair", "sample"), default="pair", help="Wilcoxon pairing unit (default: pair)"
    )
    parser.add_argument("--no-figures", action="store_true", help="skip the PNGs")
    parser.add_argument("--table", action="store_true", help="print the README's markdown results table only")
    parser.add_argument("--per-pair", action="store_true", help="with --table: also the mean DSC per pair and run")
    return parser


def _table(runs: Sequence[str], per_pair: bool) -> None:
    from learnsim.evaluation.compare import markdown_table, per_pair_dsc, results_rows

    print(markdown_table(results_rows(runs)))
    if per_pair:
        table = per_pair_dsc(runs)
        print()
        print(
            markdown_table(
                [{"pair": pair, **{c: f"{v:.3f}" for c, v in values.items()}} for pair, values in table.iterrows()]
            )
        )


def _compare(args: argparse.Namespace) -> None:
    from learnsim.evaluation.compare import compare_runs, format_summary

    res = compare_runs(args.runs, args.out, labels=args.labels, pairing=args.pairing, figures=not args.no_figures)
    print(format_summary(res["summary"]))
    tests = res["wilcoxon"]
    if tests is not None:
        sig = tests[(tests["p_holm"] < 0.05) & (tests["structure"] != "all")]
        overall = tests[tests["structure"] == "all"]
        print("\nWilcoxon (all structures, per-pair means):")
        print(overall[["metric", "run_a", "run_b", "n", "mean_a", "mean_b", "p_value"]].to_string(index=False))
        print(f"\n{len(sig)} structure-level tests with Holm-adjusted p < 0.05")
    for name, path in res["files"].items():
        print(f"wrote {name}: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``learnsim-compare``; returns the exit status (2 for a folder that is not a run)."""
    args = build_parser().parse_args(argv)
    try:
        if args.table:
            _table(args.runs, args.per_pair)
        else:
            _compare(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"learnsim-compare: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
