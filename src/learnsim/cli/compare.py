"""``learnsim-compare``: compare evaluated runs (folders written by ``learnsim-test``).

    learnsim-compare RUN_A RUN_B [RUN_C ...] [--labels A B ...] [--out DIR] [--pairing pair|sample]
    learnsim-compare --table [--per-pair] RUN [RUN ...]

Default: print a table of mean DSC / ASD / HD95 / folding / SDlogJ / calibration per run and write into DIR
(default ./compare) summary_table.csv, wilcoxon.csv (paired Wilcoxon signed-rank test per structure, RUN_A
against each other run; paired on pair x structure with the samples of a pair averaged unless --pairing sample,
see learnsim.evaluation.compare), boxplots.png and calibration.png.

--table: print the markdown results table (as in docs/results.md) instead (a "before registration (affine only)" row from the
first run's metrics_before.csv, then one row per run); --per-pair adds the mean DSC per pair and run. Writes no
files; one run is enough.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="learnsim-compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from learnsim.cli.help import version_line

    parser.add_argument("--version", action="version", version=version_line("learnsim-compare"))
    parser.add_argument("runs", nargs="+", help="evaluated run folders; the first is the reference of the tests")
    parser.add_argument("--labels", nargs="+", help="display names, one per run (default: folder names)")
    parser.add_argument("--out", default="compare", help="output folder (default: ./compare)")
    parser.add_argument(
        "--pairing", choices=("pair", "sample"), default="pair", help="Wilcoxon pairing unit (default: pair)"
    )
    parser.add_argument("--no-figures", action="store_true", help="skip the PNGs")
    parser.add_argument("--table", action="store_true", help="print the markdown results table only (as in docs/results.md)")
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


def _pairs(run: str) -> set[str] | None:
    """The pairs a run folder's ``metrics.csv`` holds (None when it cannot be read: loading the run says why)."""
    import pandas as pd

    try:
        return set(pd.read_csv(Path(run) / "metrics.csv", usecols=["pair"], dtype={"pair": str})["pair"])
    except (OSError, ValueError):
        return None


def pair_set_differences(runs: Sequence[str]) -> list[str]:
    """For each run evaluated on other pairs than the first, what differs (empty: every run has the same pairs)."""
    ref = _pairs(runs[0])
    problems = []
    for run in runs[1:]:
        pairs = _pairs(run)
        if ref is None or pairs is None or pairs == ref:
            continue
        missing, extra = sorted(ref - pairs), sorted(pairs - ref)
        parts = [f"lacks {len(missing)} pair(s) of {runs[0]} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"] if missing else []
        parts += [f"has {len(extra)} pair(s) {runs[0]} lacks ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})"] if extra else []
        problems.append(f"{run} {' and '.join(parts)}")
    return problems


def _check_out(out: str) -> None:
    """Refuse an ``--out`` that is an existing file, ``/`` or the home folder."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    target = path.resolve()
    if target == Path(target.anchor) or target == Path.home().resolve():
        raise ValueError(f"--out {out} is {target}, the root or home folder; choose a folder for the comparison")


def _compare(args: argparse.Namespace) -> None:
    from learnsim.evaluation.compare import compare_runs, format_summary

    _check_out(args.out)
    differences = pair_set_differences(args.runs)
    if differences:  # paired tests over different pairs pair nothing (n = 0, NaN)
        raise ValueError("the runs were evaluated on different pairs: " + "; ".join(differences)
                         + " (compare runs evaluated on the same pair list)")
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
    """Entry point of ``learnsim-compare``; returns the exit status: 1 with one line for a folder that is not a run,
    runs over different pairs, a bad ``--out`` or a full disk; 130 / 143 on Ctrl-C / SIGTERM."""
    from learnsim.interrupt import run_command

    args = build_parser().parse_args(argv)

    def body() -> None:
        if args.table:
            for line in pair_set_differences(args.runs):
                print(f"learnsim-compare: note: {line}", file=sys.stderr)
            _table(args.runs, args.per_pair)
        else:
            _compare(args)

    return run_command("learnsim-compare", body)



if __name__ == "__main__":
    sys.exit(main())
