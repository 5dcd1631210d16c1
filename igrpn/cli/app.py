"""The ``igrpn`` command line.

    igrpn predict VOLUME... --checkpoint CKPT [--prior PRIOR.json] [--out FILE.csv|FILE.json]
    igrpn evaluate --profile P --manifest M --report-dir DIR [--prior PRIOR.json]
    igrpn markups-to-manifest IMAGE... --markups-dir DIR --split S --out MANIFEST.csv
    igrpn phantom --out DIR [--n N] [--seed S] [--grid G] [--spacing MM] [--manifest CSV]
    igrpn train | reproduce ...   (the options of python -m igrpn.train / igrpn.reproduce)

``main(argv)`` returns the exit status instead of exiting, so tests call it in-process.
"""

from __future__ import annotations

import argparse
import sys

from igrpn import phantom as phantom_module
from igrpn import reproduce
from igrpn.cli.args import (EXIT_INTERRUPTED, EXIT_STATUS_TEXT, UsageError, exit_code, non_negative_float,
                            non_negative_int, positive_int)
from igrpn.cli.commands import cmd_evaluate, cmd_markups_to_manifest, cmd_phantom
from igrpn.cli.predict import MAX_SOURCE_VOXELS, cmd_predict
from igrpn.config import PROFILES
from igrpn.detect import MAX_GRID_VOXELS
from igrpn.training import loop as training_loop

PREDICT_EPILOG = """\
Each volume is reoriented to RAS, resampled to the checkpoint's isotropic spacing, normalised and
zero-padded up to the network's input multiple (8 voxels), so volumes of any size, spacing and
orientation work, however small. Size limits, checked from the file's header before the voxels
are read: a volume whose resampled grid would exceed {limit} voxels (igrpn.detect.MAX_GRID_VOXELS)
or whose file holds more than {source_limit} voxels (igrpn.cli.predict.MAX_SOURCE_VOXELS) is refused:
crop it around the face.

Output: one row per candidate box (the top-k per landmark after NMS): volume, landmark, class_id,
rank (0 = best score), selected (the answer for the landmark: top score, or the graph prior's
choice with --prior), score, x, y, z (world mm, RAS, the NIfTI affine's space), i, j, k (voxel
indices of the given volume), w, h, d (box size, mm). --out FILE.csv writes these rows;
--out FILE.json writes a list with one object per volume:
{{"volume", "landmarks": [the five selected rows], "candidates": [every row]}}. Files are written
atomically (a temporary file renamed), never half-written. Without --out, the five landmarks of
each volume are printed as a table.

{exit_status}

examples:
  igrpn predict scan.nii.gz --checkpoint report/runs/rpn_ib/checkpoint.pt
  igrpn predict 'scans/*.nii.gz' --checkpoint report/runs/rpn_ib/checkpoint.pt \\
      --prior report/runs/graph_prior.json --out landmarks.json --markups landmarks/"""

EVALUATE_EPILOG = """\
Predicts the manifest's test split with every trained configuration found under
REPORT_DIR/runs/<run>/checkpoint.pt (rpn_ib, rpn_noib, ssd_ib, ssd_noib, faster_rcnn, heatmap),
with and without the graph prior, writes REPORT_DIR/predictions/ and REPORT_DIR/tables/ (Table 1,
Table 2, the paired bootstraps of the paper's claims) and prints Table 1 and Table 2 as Markdown.
The prior defaults to REPORT_DIR/runs/graph_prior.json when that file exists.

example:
  igrpn evaluate --profile cpu --manifest data_manifest.csv --report-dir report"""

MARKUPS_EPILOG = """\
For every IMAGE, reads MARKUPS_DIR/<image name without .nii/.nii.gz>.mrk.json (a 3D Slicer point
list; LPS or RAS) whose point labels are the landmark names (left_eye, middle_eyebrow, right_eye,
nose_tip, chin; case, spaces and hyphens are forgiven) and writes a manifest (the columns of docs/design.md §3,
world mm in RAS) with case_id = the image name without suffix and image = its path relative to
the manifest. `igrpn predict --markups DIR` writes such files, to be corrected in Slicer.

example:
  igrpn markups-to-manifest scans/*.nii.gz --markups-dir landmarks --split train \\
      --out my_manifest.csv"""

PHANTOM_EPILOG = """\
The same data set as python -m igrpn.phantom with the same options: deterministic from --seed,
every file written atomically (an interrupted run leaves whole files only and simply runs again).
The default data set of the cpu and paper profiles is --n 152 --seed 0 --grid 128 --spacing 1.3.

example:
  igrpn phantom --out build/tiny --n 12 --n-test 4 --grid 64 --spacing 2.6"""

#: Commands that are the ``python -m igrpn.<module>`` entry points: (module, help, example).
DELEGATED = {
    "train": (training_loop, "igrpn.train", "train one detector (IG-RPN or a baseline)",
              "igrpn train --profile cpu --method rpn --seed 0 --out report/runs/rpn_ib"),
    "reproduce": (reproduce, "igrpn.reproduce", "regenerate the data, trainings, tables, figures and REPORT.md",
                  "igrpn reproduce --profile cpu --out report"),
}


# --------------------------------------------------------------------------------------------
# Parsers


def build_parser() -> argparse.ArgumentParser:
    """The ``igrpn`` parser with every sub-command (delegated ones listed for ``--help`` only)."""

    parser = argparse.ArgumentParser(
        prog="igrpn", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="IG-RPN: five fetal facial landmarks in 3D ultrasound (Chen et al., ISBI 2020).",
        epilog="examples:\n  igrpn predict scan.nii.gz --checkpoint report/runs/rpn_ib/checkpoint.pt\n"
               "  igrpn reproduce --profile smoke\n  igrpn <command> --help",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    epilog = PREDICT_EPILOG.format(limit=f"{round(MAX_GRID_VOXELS ** (1 / 3))}^3",
                                   source_limit=f"{round(MAX_SOURCE_VOXELS ** (1 / 3))}^3",
                                   exit_status=EXIT_STATUS_TEXT)
    predict = commands.add_parser(
        "predict", help="the five landmarks of NIfTI volumes, in world mm and voxels",
        description="Detect the five landmarks (left_eye, middle_eyebrow, right_eye, nose_tip, chin)\n"
                    "in each NIfTI volume, with the alternative candidates.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_argument("volumes", nargs="+", metavar="VOLUME",
                         help="NIfTI files (.nii/.nii.gz); quoted glob patterns are expanded")
    predict.add_argument("--checkpoint", required=True, help="a checkpoint.pt written by igrpn train")
    predict.add_argument("--prior", default=None, help="graph prior JSON (e.g. report/runs/graph_prior.json): "
                         "choose among the top-k candidates with the graph prior (paper Eq. 4)")
    predict.add_argument("--lambda", dest="prior_lambda", type=non_negative_float, default=None, metavar="L",
                         help="with --prior: weight of the candidates' log-scores beside the prior's "
                              "penalty (default 0, the paper's method)")
    predict.add_argument("--out", default=None, metavar="FILE",
                         help="write every candidate to FILE.csv or FILE.json (default: print a table)")
    predict.add_argument("--markups", default=None, metavar="DIR",
                         help="also write DIR/<volume>.mrk.json (3D Slicer point list, LPS) with the "
                              "five selected landmarks; DIR is created if missing")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(handler=cmd_predict)

    evaluate = commands.add_parser(
        "evaluate", help="Table 1 and Table 2 from the trained runs of a report folder",
        description="Evaluate every trained configuration on a manifest's test split.",
        epilog=EVALUATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.add_argument("--profile", required=True, choices=sorted(PROFILES))
    evaluate.add_argument("--manifest", default=None,
                          help="data set manifest (its test split is used; default: the profile's own data set, "
                               "generated when missing)")
    evaluate.add_argument("--report-dir", required=True, help="folder with runs/<run>/checkpoint.pt")
    evaluate.add_argument("--prior", default=None,
                          help="graph prior JSON (default: REPORT_DIR/runs/graph_prior.json if present)")
    evaluate.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples (default: %(default)s)")
    evaluate.add_argument("--seed", type=non_negative_int, default=0, help="bootstrap seed (default: %(default)s)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.set_defaults(handler=cmd_evaluate)

    to_manifest = commands.add_parser(
        "markups-to-manifest", help="a manifest from volumes and their 3D Slicer landmark files",
        description="Build a manifest from NIfTI volumes and 3D Slicer markups (.mrk.json) files.",
        epilog=MARKUPS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    to_manifest.add_argument("images", nargs="+", metavar="IMAGE", help="NIfTI volumes")
    to_manifest.add_argument("--markups-dir", required=True, help="folder of <image name>.mrk.json files")
    to_manifest.add_argument("--split", required=True, choices=["train", "test"], help="split of every row")
    to_manifest.add_argument("--out", required=True, help="manifest CSV to write")
    to_manifest.set_defaults(handler=cmd_markups_to_manifest)

    phantom = commands.add_parser(
        "phantom", help="generate the synthetic fetal-face ultrasound data set",
        description="Write N phantom volumes OUT/<case_id>.nii.gz and their manifest "
                    "(the options of python -m igrpn.phantom).",
        epilog=PHANTOM_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)

    phantom_module.add_arguments(phantom)
    phantom.set_defaults(handler=cmd_phantom)

    for name, (_module, entry_point, summary, _example) in DELEGATED.items():
        commands.add_parser(name, help=f"{summary} (options of python -m {entry_point}; see igrpn {name} --help)",
                            add_help=False)
    return parser


def delegated_parser(name: str) -> argparse.ArgumentParser:
    """``python -m igrpn.<name>``'s own parser, named ``igrpn <name>`` and with our example."""
    module, entry_point, _summary, example = DELEGATED[name]
    parser = module.build_parser()
    parser.prog = f"igrpn {name}"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (f"Same options as python -m {entry_point}.\n\nexample:\n  {example}\n\n"
                     "exit status: 0 done, 1 failed (the reason on stderr), 2 usage error")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``igrpn`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        return _run_delegated(argv[0], argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2)
        return exit_code(stop)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except KeyboardInterrupt:  # every output is atomic: whole files or none are left
        print(f"igrpn {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as error:
        print(f"igrpn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:  # bad checkpoint, prior, manifest or output
        print(f"igrpn {args.command}: error: {error}", file=sys.stderr)
        return 1


def _run_delegated(name: str, argv: list[str]) -> int:
    """``igrpn train|reproduce``: parse with the module's parser, then run its ``main``."""
    module = DELEGATED[name][0]
    parser = delegated_parser(name)
    try:
        parser.parse_args(argv)  # --help and usage errors under the name "igrpn <name>"
    except SystemExit as stop:
        return exit_code(stop)
    try:
        status = module.main(argv)
    except KeyboardInterrupt:  # checkpoints and logs are written atomically
        print(f"igrpn {name}: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as error:  # bad manifest, case, checkpoint or output folder
        print(f"igrpn {name}: error: {error}", file=sys.stderr)
        return 1
    return int(status or 0)
