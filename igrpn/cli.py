"""The ``igrpn`` command line.

    igrpn predict VOLUME... --checkpoint CKPT [--prior PRIOR.json] [--out FILE.csv|FILE.json]
    igrpn evaluate --profile P --manifest M --report-dir DIR [--prior PRIOR.json]
    igrpn markups-to-manifest IMAGE... --markups-dir DIR --split S --out MANIFEST.csv
    igrpn phantom --out DIR [--n N] [--seed S] [--grid G] [--spacing MM] [--manifest CSV]
    igrpn train | reproduce ...   (the options of python -m igrpn.train / igrpn.reproduce)

``main(argv)`` returns the exit status instead of exiting, so tests call it in-process. The
models are imported inside the commands that need them.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from igrpn.config import PROFILES

#: Suffixes ``igrpn predict --out`` understands, and the format each selects.
OUTPUT_FORMATS = {".csv": "csv", ".json": "json"}
#: Largest volume (voxels, from the file's header) that ``igrpn predict`` reads: 512³ voxels are
#: 0.5 GiB as float32, and reorientation and resampling hold a few copies at once.
MAX_SOURCE_VOXELS = 512 ** 3
#: Characters that make a VOLUME argument a glob pattern expanded here (when the shell did not).
_GLOB_CHARS = set("*?[")

EXIT_STATUS_TEXT = """\
exit status:
  0  every volume was processed
  1  a volume failed (each failure is reported on stderr, naming the file and the reason; the
     other volumes still run and are written), or the checkpoint, prior or output was unusable
  2  a usage error (unknown option, unsupported output suffix, ...)"""

PREDICT_EPILOG = """\
Each volume is reoriented to RAS, resampled to the checkpoint's isotropic spacing, normalised and
zero-padded up to the network's input multiple (8 voxels), so volumes of any size, spacing and
orientation work, however small. Size limits, checked from the file's header before the voxels
are read: a volume whose resampled grid would exceed {limit} voxels (igrpn.detect.MAX_GRID_VOXELS)
or whose file holds more than {source_limit} voxels (igrpn.cli.MAX_SOURCE_VOXELS) is refused:
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
nose_tip, chin; case, spaces and hyphens are forgiven) and writes a manifest (DESIGN columns,
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
    "train": ("igrpn.train", "train one detector (IG-RPN or a baseline)",
              "igrpn train --profile cpu --method rpn --seed 0 --out report/runs/rpn_ib"),
    "reproduce": ("igrpn.reproduce", "regenerate the data, trainings, tables, figures and REPORT.md",
                  "igrpn reproduce --profile cpu --out report"),
}


# --------------------------------------------------------------------------------------------
# Parsers


def build_parser() -> argparse.ArgumentParser:
    """The ``igrpn`` parser with every sub-command (delegated ones listed for ``--help`` only)."""
    from igrpn.detect import MAX_GRID_VOXELS

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
    predict.add_argument("--lambda", dest="prior_lambda", type=float, default=None, metavar="L",
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
    evaluate.add_argument("--manifest", required=True, help="data set manifest (its test split is used)")
    evaluate.add_argument("--report-dir", required=True, help="folder with runs/<run>/checkpoint.pt")
    evaluate.add_argument("--prior", default=None,
                          help="graph prior JSON (default: REPORT_DIR/runs/graph_prior.json if present)")
    evaluate.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    evaluate.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
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
    from igrpn import phantom as phantom_module  # its options, not repeated here

    phantom_module.add_arguments(phantom)
    phantom.set_defaults(handler=cmd_phantom)

    for name, (module, summary, _example) in DELEGATED.items():
        commands.add_parser(name, help=f"{summary} (options of python -m {module}; see igrpn {name} --help)",
                            add_help=False)
    return parser


def delegated_parser(name: str) -> argparse.ArgumentParser:
    """``python -m igrpn.<name>``'s own parser, named ``igrpn <name>`` and with our example."""
    module_name, summary, example = DELEGATED[name]
    parser = importlib.import_module(module_name).build_parser()
    parser.prog = f"igrpn {name}"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (f"Same options as python -m {module_name}.\n\nexample:\n  {example}\n\n"
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
        return _exit_code(stop)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except UsageError as error:
        print(f"igrpn {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as error:  # bad checkpoint, prior, manifest or output
        print(f"igrpn {args.command}: error: {error}", file=sys.stderr)
        return 1


class UsageError(ValueError):
    """A command line that cannot be run as given (exit status 2)."""


def _exit_code(stop: SystemExit) -> int:
    return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)


def _run_delegated(name: str, argv: list[str]) -> int:
    """``igrpn train|reproduce``: parse with the module's parser, then run its ``main``."""
    module_name = DELEGATED[name][0]
    try:
        module = importlib.import_module(module_name)
        parser = delegated_parser(name)
    except (ImportError, AttributeError) as error:
        print(f"igrpn {name}: error: {module_name} is not available ({error})", file=sys.stderr)
        return 1
    try:
        parser.parse_args(argv)  # --help and usage errors under the name "igrpn <name>"
    except SystemExit as stop:
        return _exit_code(stop)
    try:
        status = module.main(argv)
    except (ValueError, OSError) as error:  # bad manifest, case, checkpoint or output folder
        print(f"igrpn {name}: error: {error}", file=sys.stderr)
        return 1
    return int(status or 0)


# --------------------------------------------------------------------------------------------
# igrpn predict


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict every volume; failures are reported and skipped; returns the exit status."""
    from tqdm.auto import tqdm

    from igrpn.detect import Detector
    from igrpn.markups import markups_path_for

    out = Path(args.out) if args.out else None
    if out is not None:
        output_format(out)  # refuse an unknown suffix before any work
        check_writable(out)
    if args.prior_lambda is not None and args.prior is None:
        raise UsageError("--lambda only applies with --prior")
    paths, failures = expand_volume_args(args.volumes)
    n_inputs = len(paths) + len(failures)
    if args.markups:
        check_markups_names(paths, args.markups)

    detector = Detector.from_checkpoint(args.checkpoint, prior=args.prior,
                                        prior_lambda=args.prior_lambda or 0.0)
    markups_dir = prepare_markups_dir(args.markups) if args.markups else None
    for pattern, reason in failures:
        print(f"igrpn predict: error: {pattern}: {reason}", file=sys.stderr)
    results: list[tuple[str, "pandas.DataFrame"]] = []
    for path in tqdm(paths, desc="igrpn predict", unit="volume", disable=True if args.quiet else None):
        try:
            rows = predict_file(detector, path)
            if markups_dir is not None:
                write_selected_markups(markups_path_for(path, markups_dir), rows)
        except (ValueError, OSError, RuntimeError, MemoryError) as error:
            message = _one_line(error)
            reason = message if str(path) in message else f"{path}: {message}"
            failures.append((str(path), reason))
            tqdm.write(f"igrpn predict: error: {reason}", file=sys.stderr)
            continue
        results.append((str(path), rows))

    if results and out is not None:
        write_predictions(results, out)
        print(f"igrpn predict: wrote {len(results)} volume(s) to {out}", file=sys.stderr)
    elif results:
        print(format_landmarks(results))
    if failures:
        print(f"igrpn predict: {len(failures)} of {n_inputs} input(s) failed: "
              f"{', '.join(name for name, _ in failures)}", file=sys.stderr)
        if out is not None and not results:
            print(f"igrpn predict: nothing written to {out}", file=sys.stderr)
        return 1
    return 0


def expand_volume_args(arguments: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand glob patterns the shell left alone; drop repeats.

    Returns:
        (paths in order, [(pattern, reason)] for patterns that matched no file). A plain path that
        does not exist is kept: reading it reports "file not found" with the others.
    """
    paths, failures, seen = [], [], set()
    for argument in arguments:
        if _GLOB_CHARS & set(argument) and not os.path.exists(argument):
            matches = sorted(glob.glob(argument, recursive=True))
            if not matches:
                failures.append((argument, "no file matches this pattern"))
                continue
        else:
            matches = [argument]
        for match in matches:
            key = os.path.abspath(match)
            if key not in seen:
                seen.add(key)
                paths.append(Path(match))
    return paths, failures


def read_volume(path, spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI volume for prediction, checking the header before reading the voxels.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        spacing_mm: the checkpoint's isotropic spacing (for the size limit).

    Returns:
        (data float32 (X, Y, Z) or (X, Y, Z, 1), affine (4, 4) voxel → world mm).

    Raises:
        igrpn.data.CaseError (a ValueError) naming the file: missing, empty, not NIfTI, truncated,
        not a single 3D volume, more than ``MAX_SOURCE_VOXELS`` voxels, or a resampled grid
        above ``igrpn.detect.MAX_GRID_VOXELS``.
    """
    import nibabel as nib

    from igrpn.data import CaseError
    from igrpn.detect import check_grid_size

    name = str(path)
    if not os.path.isfile(path):
        what = "is a directory, not a NIfTI file" if os.path.isdir(path) else "file not found"
        raise CaseError(f"{name}: {what}")
    if os.path.getsize(path) == 0:
        raise CaseError(f"{name}: empty file")
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises many types for content it cannot parse
        raise CaseError(f"{name}: not a readable NIfTI file ({type(error).__name__}: {_one_line(error)})") from None
    if not isinstance(image, nib.Nifti1Pair):  # base class of NIfTI-1 and NIfTI-2 images
        raise CaseError(f"{name}: not a NIfTI file (read as {type(image).__name__})")
    shape = tuple(image.shape)
    if len(shape) == 4 and shape[3] > 1:
        raise CaseError(f"{name}: a 4D file holding {shape[3]} volumes (shape {shape}); "
                        "igrpn predicts on one 3D volume: save each volume as its own file")
    if len(shape) not in (3, 4):
        raise CaseError(f"{name}: not 3D: shape {shape} (expected (X, Y, Z) or (X, Y, Z, 1))")
    voxels = int(np.prod(shape, dtype=np.int64))
    if voxels > MAX_SOURCE_VOXELS:
        raise CaseError(f"{name}: too large: {'x'.join(map(str, shape))} = {voxels / 1e6:.1f} M voxels, above "
                        f"the limit of {round(MAX_SOURCE_VOXELS ** (1 / 3))}^3 = {MAX_SOURCE_VOXELS / 1e6:.1f} M "
                        "voxels (igrpn.cli.MAX_SOURCE_VOXELS); crop the volume around the face")
    affine = np.asarray(image.affine, dtype=np.float64)
    if np.all(np.isfinite(affine)) and abs(np.linalg.det(affine[:3, :3])) > 1e-12:
        try:
            check_grid_size(shape, affine, spacing_mm, name)  # before reading a huge file
        except ValueError as error:
            raise CaseError(str(error)) from None
    try:
        data = image.get_fdata(dtype=np.float32)
    except Exception as error:  # truncated or corrupt voxel data
        raise CaseError(f"{name}: cannot read the voxels, file truncated or corrupt "
                        f"({type(error).__name__}: {_one_line(error)})") from None
    return data, affine


def _one_line(error: BaseException) -> str:
    """An exception's message with its line breaks folded (one stderr line per failure)."""
    return " ".join(str(error).split())


def predict_file(detector, path) -> "pandas.DataFrame":
    """Read one volume and predict it; rows of ``Detector.predict`` with a leading ``volume`` column."""
    data, affine = read_volume(path, detector.profile.spacing_mm)
    rows = detector.predict(data, affine, name=str(path))
    rows.insert(0, "volume", str(path))
    return rows


def output_format(path: Path) -> str:
    """``"csv"`` or ``"json"`` from the suffix; :class:`UsageError` otherwise."""
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"{path}: unsupported output suffix {path.suffix!r}; use .csv or .json")
    return fmt


def check_writable(path: Path) -> None:
    """Fail early, before any prediction, when ``path`` cannot be written.

    Creates and removes a temporary file in the target directory (what the atomic write will do).

    Raises:
        OSError naming the file: directory missing, not a directory, not writable; path is a
        directory.
    """
    parent = path.parent
    if path.is_dir():
        raise IsADirectoryError(f"{path}: cannot write the output: it is a directory")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise FileNotFoundError(f"{path}: cannot write the output: directory {parent} {what}")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise PermissionError(f"{path}: cannot write the output in {parent}: "
                              f"{error.strerror or error}") from None
    os.close(fd)
    os.unlink(probe)


def check_markups_names(paths: list[Path], directory) -> None:
    """Refuse two volumes whose markups files would be the same (same name, other folders)."""
    from igrpn.markups import markups_path_for

    targets: dict[Path, Path] = {}
    for path in paths:
        target = markups_path_for(path, directory)
        if target in targets:
            raise UsageError(f"{targets[target]} and {path} would both write {target}; "
                             "predict them in separate runs or rename one")
        targets[target] = path


def prepare_markups_dir(directory) -> Path:
    """Create the markups folder if needed and check that it can be written."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"{directory}: cannot create the markups folder: {error.strerror or error}") from None
    check_writable(directory / "probe.mrk.json")
    return directory


def write_selected_markups(path: Path, rows) -> Path:
    """The selected landmarks of one volume's rows as a Slicer point list (LPS)."""
    from igrpn.markups import write_markups

    selected = selected_rows(rows)
    return write_markups(path, list(selected["landmark"]), selected[["x", "y", "z"]].to_numpy())


def selected_rows(rows):
    """The ``selected`` row of each landmark, in ``config.LANDMARKS`` order."""
    selected = rows[rows["selected"].astype(bool)]
    return selected.sort_values("class_id").reset_index(drop=True)


def write_predictions(results: list, path: Path) -> None:
    """Write ``[(volume, rows)]`` as CSV (every row) or JSON (per volume), atomically.

    JSON: ``[{"volume": name, "landmarks": [selected rows], "candidates": [all rows]}, ...]``.
    """
    import pandas as pd

    from igrpn.markups import atomic_write_text

    if output_format(path) == "csv":
        text = pd.concat([rows for _, rows in results], ignore_index=True).to_csv(index=False)
    else:
        document = [
            {"volume": name,
             "landmarks": _records(selected_rows(rows).drop(columns="volume")),
             "candidates": _records(rows.drop(columns="volume"))}
            for name, rows in results
        ]
        text = json.dumps(document, indent=2) + "\n"
    atomic_write_text(path, text)


def _records(frame) -> list[dict]:
    """DataFrame rows as JSON-ready dicts of Python scalars."""
    return [{key: (value.item() if hasattr(value, "item") else value) for key, value in record.items()}
            for record in frame.to_dict(orient="records")]


def format_landmarks(results: list) -> str:
    """A readable table of the selected landmarks of each volume."""
    blocks = []
    for name, rows in results:
        selected = selected_rows(rows)[["landmark", "score", "x", "y", "z", "i", "j", "k"]]
        selected = selected.rename(columns={"x": "x_mm", "y": "y_mm", "z": "z_mm"})
        table = selected.to_string(index=False, float_format=lambda v: f"{v:.2f}",
                                   formatters={"score": lambda v: f"{v:.3g}"})
        blocks.append(f"{name}  ({len(rows)} candidates; --out FILE for all of them)\n{table}")
    return "\n\n".join(blocks)


# --------------------------------------------------------------------------------------------
# igrpn phantom


def cmd_phantom(args: argparse.Namespace) -> int:
    """Generate the phantom data set; prints the manifest's path."""
    from igrpn.phantom import generate_dataset

    path = generate_dataset(args.out, n=args.n, seed=args.seed, n_test=args.n_test, grid=args.grid,
                            spacing_mm=args.spacing, manifest_path=args.manifest, progress=not args.quiet)
    print(path)
    return 0


# --------------------------------------------------------------------------------------------
# igrpn evaluate


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate the trained runs of a report folder and print Table 1 and Table 2."""
    from igrpn.config import RUN_CONFIGS, get_profile
    from igrpn.report import evaluate_runs, table_markdown, write_tables

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
    evaluation = evaluate_runs(get_profile(args.profile), args.manifest, report_dir, prior_path=prior,
                               n_boot=args.n_boot, seed=args.seed, progress=not args.quiet)
    tables = write_tables(evaluation, report_dir / "tables", n_boot=args.n_boot, seed=args.seed)
    print("Table 1 (ours (paper))\n\n" + table_markdown(tables["table1"]))
    print("Table 2 (ours (paper))\n\n" + table_markdown(tables["table2"]))
    print(f"runs evaluated: {', '.join(found)}; prior: {prior or 'none'}; tables: {report_dir / 'tables'}")
    return 0


# --------------------------------------------------------------------------------------------
# igrpn markups-to-manifest


def cmd_markups_to_manifest(args: argparse.Namespace) -> int:
    """Write a manifest from volumes and their ``.mrk.json`` landmarks."""
    import pandas as pd

    from igrpn.data import REQUIRED_COLUMNS
    from igrpn.markups import atomic_write_text, manifest_row_from_markups, markups_path_for, volume_stem

    out = Path(args.out)
    check_writable(out)
    images, unmatched = expand_volume_args(args.images)
    if unmatched:
        raise FileNotFoundError("; ".join(f"{pattern}: {reason}" for pattern, reason in unmatched))
    rows, problems = [], []
    for image in images:
        if not image.is_file():
            problems.append(f"{image}: file not found")
            continue
        relative = os.path.relpath(image.resolve(), out.resolve().parent)
        try:
            rows.append(manifest_row_from_markups(volume_stem(image), relative, args.split,
                                                  markups_path_for(image, args.markups_dir)))
        except ValueError as error:
            problems.append(str(error))
    if problems:  # nothing written unless every volume has its landmarks
        raise ValueError("no manifest written:\n  " + "\n  ".join(problems))
    atomic_write_text(out, pd.DataFrame(rows, columns=list(REQUIRED_COLUMNS)).to_csv(index=False))
    print(f"igrpn markups-to-manifest: wrote {len(rows)} row(s) to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
