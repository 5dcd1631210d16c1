"""``igrpn phantom``, ``igrpn evaluate`` and ``igrpn markups-to-manifest``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

from igrpn.cli.predict import expand_volume_args, one_line
from igrpn.config import get_profile, RUN_CONFIGS
from igrpn.data import CaseError, open_nifti, REQUIRED_COLUMNS
from igrpn.data.markups import manifest_row_from_markups, markups_path_for, volume_stem
from igrpn.evaluation.runs import evaluate_runs
from igrpn.evaluation.tables import table_markdown, write_tables
from igrpn.io import atomic_write_text, check_writable
from igrpn.phantom import check_manifest_path, command_manifest, generate_dataset


def cmd_phantom(args: argparse.Namespace) -> int:
    """Generate the phantom data set; prints the manifest's path."""

    check_manifest_path(args.out, args.manifest)
    path = generate_dataset(args.out, n=args.n, seed=args.seed, n_test=args.n_test, grid=args.grid,
                            spacing_mm=args.spacing, manifest_path=args.manifest, progress=not args.quiet)
    print(path)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate the trained runs of a report folder and print Table 1 and Table 2."""

    report_dir = Path(args.report_dir)
    found = [run for run in RUN_CONFIGS if (report_dir / "runs" / run / "checkpoint.pt").is_file()]
    if not found:
        raise FileNotFoundError(f"{report_dir}: no trained run (expected runs/<run>/checkpoint.pt for "
                                f"a run among {list(RUN_CONFIGS)})")
    prior = args.prior
    if prior is not None and not Path(prior).is_file():
        raise FileNotFoundError(f"{prior}: graph prior file not found")
    if prior is None and (report_dir / "runs" / "graph_prior.json").is_file():
        prior = report_dir / "runs" / "graph_prior.json"

    manifest = command_manifest(args.profile, args.manifest, progress=not args.quiet)
    evaluation = evaluate_runs(get_profile(args.profile), manifest, report_dir, prior_path=prior,
                               n_boot=args.n_boot, seed=args.seed, progress=not args.quiet)
    tables = write_tables(evaluation, report_dir / "tables", n_boot=args.n_boot, seed=args.seed)
    print("Table 1 (ours (paper))\n\n" + table_markdown(tables["table1"]))
    print("Table 2 (ours (paper))\n\n" + table_markdown(tables["table2"]))
    print(f"runs evaluated: {', '.join(found)}; prior: {prior or 'none'}; tables: {report_dir / 'tables'}")
    return 0


def cmd_markups_to_manifest(args: argparse.Namespace) -> int:
    """Write a manifest from volumes and their ``.mrk.json`` landmarks; nothing unless every
    volume is a 3D NIfTI file with a unique name and all five landmarks."""
    out = Path(args.out)
    check_writable(out)
    images, unmatched, _ = expand_volume_args(args.images)
    if unmatched:
        raise FileNotFoundError("; ".join(f"{pattern}: {reason}" for pattern, reason in unmatched))
    rows, problems, by_case = [], [], {}
    for image in images:
        case_id = volume_stem(image)
        if case_id in by_case:  # the case_id is the file name: read_manifest would refuse the pair
            problems.append(f"{by_case[case_id]} and {image} would both be case_id {case_id!r}; rename one")
            continue
        by_case[case_id] = image
        relative = os.path.relpath(image.resolve(), out.resolve().parent)
        try:
            check_manifest_image(image)
            rows.append(manifest_row_from_markups(case_id, relative, args.split,
                                                  markups_path_for(image, args.markups_dir)))
        except ValueError as error:
            problems.append(one_line(error))
    if problems:  # nothing written unless every volume has its landmarks
        raise ValueError(f"{out}: no manifest written: " + "; ".join(problems))
    atomic_write_text(out, pd.DataFrame(rows, columns=list(REQUIRED_COLUMNS)).to_csv(index=False))
    print(f"igrpn markups-to-manifest: wrote {len(rows)} row(s) to {out}", file=sys.stderr)
    return 0


def check_manifest_image(image: Path) -> None:
    """Refuse an image a manifest cannot use: not a NIfTI file, not one 3D volume, complex or
    colour voxels (from the header; the voxels are not read)."""

    header_image, _ = open_nifti(image, str(image))
    shape = tuple(header_image.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise CaseError(f"{image}: not 3D: shape {shape} (expected (X, Y, Z) or (X, Y, Z, 1))")
