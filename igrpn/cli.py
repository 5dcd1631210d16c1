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
import json
import os
import sys
from pathlib import Path

import numpy as np

from igrpn import phantom as phantom_module
from igrpn import reproduce
from igrpn.training import loop as training_loop
from igrpn.config import get_profile, PROFILES, RUN_CONFIGS
from igrpn.data import CaseError, open_nifti, REQUIRED_COLUMNS
from igrpn.data.markups import manifest_row_from_markups, markups_path_for, markups_text, volume_stem
from igrpn.detect import check_grid_size, Detector, MAX_GRID_VOXELS
from igrpn.evaluation.runs import evaluate_runs
from igrpn.evaluation.tables import table_markdown, write_tables
from igrpn.io import atomic_write_files, atomic_write_text, check_writable
from igrpn.phantom import check_manifest_path, command_manifest, generate_dataset

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
    predict.add_argument("--lambda", dest="prior_lambda", type=_non_negative_float, default=None, metavar="L",
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
    evaluate.add_argument("--n-boot", type=_positive_int, default=1000, help="bootstrap resamples (default: %(default)s)")
    evaluate.add_argument("--seed", type=_non_negative_int, default=0, help="bootstrap seed (default: %(default)s)")
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
        return _exit_code(stop)
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


class UsageError(ValueError):
    """A command line that cannot be run as given (exit status 2)."""


#: Exit status after Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130


def _number(text: str, kind: type, least: float, what: str):
    """``kind(text)`` if it is finite and >= ``least``, else the usage error ``must be {what}``."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not (np.isfinite(value) and value >= least):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(text, int, 1, "a positive integer")


def _non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(text, int, 0, "an integer >= 0")


def _non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (NaN and inf refused)."""
    return _number(text, float, 0.0, "a finite number >= 0")


def _exit_code(stop: SystemExit) -> int:
    return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)


def _run_delegated(name: str, argv: list[str]) -> int:
    """``igrpn train|reproduce``: parse with the module's parser, then run its ``main``."""
    module = DELEGATED[name][0]
    parser = delegated_parser(name)
    try:
        parser.parse_args(argv)  # --help and usage errors under the name "igrpn <name>"
    except SystemExit as stop:
        return _exit_code(stop)
    try:
        status = module.main(argv)
    except KeyboardInterrupt:  # checkpoints and logs are written atomically
        print(f"igrpn {name}: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError) as error:  # bad manifest, case, checkpoint or output folder
        print(f"igrpn {name}: error: {error}", file=sys.stderr)
        return 1
    return int(status or 0)


# --------------------------------------------------------------------------------------------
# igrpn predict


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict every volume; failures are reported and skipped; returns the exit status.

    Nothing is written before every volume has run: the output and the markups files are then
    written together, all or none (``markups.atomic_write_files``), so Ctrl-C or a failure leaves
    the files as they were.
    """

    out = Path(args.out) if args.out else None
    if out is not None:
        if out.is_dir():  # before the suffix: "--out results" names a folder, not a format
            raise IsADirectoryError(f"{out}: cannot write the output: it is a directory (give a .csv or .json file)")
        output_format(out)  # refuse an unknown suffix before any work
        check_writable(out)
    if args.prior_lambda is not None and args.prior is None:
        raise UsageError("--lambda only applies with --prior")
    paths, failures, repeats = expand_volume_args(args.volumes)
    for name in repeats:
        print(f"igrpn predict: note: {name} is given more than once; predicted once", file=sys.stderr)
    n_inputs = len(paths) + len(failures)
    if args.markups:
        check_markups_names(paths, args.markups)

    detector = Detector.from_checkpoint(args.checkpoint, prior=args.prior,
                                        prior_lambda=args.prior_lambda or 0.0)
    markups_dir, created = prepare_markups_dir(args.markups) if args.markups else (None, False)
    for pattern, reason in failures:
        print(f"igrpn predict: error: {pattern}: {reason}", file=sys.stderr)
    try:
        results, markups = _predict_all(detector, paths, failures, markups_dir, quiet=args.quiet)
    except KeyboardInterrupt:
        _remove_if_empty(markups_dir, created)
        print("igrpn predict: interrupted (Ctrl-C): nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    try:
        _write_outputs(results, markups, out)
    finally:
        _remove_if_empty(markups_dir, created)
    if failures:
        print(f"igrpn predict: {len(failures)} of {n_inputs} input(s) failed: "
              f"{', '.join(name for name, _ in failures)}", file=sys.stderr)
        if out is not None and not results:
            print(f"igrpn predict: nothing written to {out}", file=sys.stderr)
        return 1
    return 0


def _predict_all(detector, paths: list[Path], failures: list, markups_dir, quiet: bool) -> tuple[list, dict]:
    """Predict each volume, appending each failure to ``failures`` (and reporting it).

    Returns:
        ([(volume, rows)], {markups path: its text}) of the volumes that ran; nothing is written.
    """
    from tqdm.auto import tqdm


    results, markups = [], {}
    for path in tqdm(paths, desc="igrpn predict", unit="volume", disable=True if quiet else None):
        try:
            rows, notes = predict_file(detector, path)
            if markups_dir is not None:
                target = markups_path_for(path, markups_dir)
                markups[target] = selected_markups_text(target, rows)
        except (ValueError, OSError, RuntimeError, MemoryError) as error:
            message = _one_line(error)
            reason = message if str(path) in message else f"{path}: {message}"
            failures.append((str(path), reason))
            tqdm.write(f"igrpn predict: error: {reason}", file=sys.stderr)
            continue
        for note in notes:
            tqdm.write(f"igrpn predict: note: {note}", file=sys.stderr)
        results.append((str(path), rows))
    return results, markups


def _write_outputs(results: list, markups: dict, out: Path | None) -> None:
    """Write the predictions (or print them) and the markups files, all or none."""

    files = dict(markups)
    if results and out is not None:
        files[out] = predictions_text(results, out)
    atomic_write_files(files)
    if results and out is not None:
        print(f"igrpn predict: wrote {len(results)} volume(s) to {out}", file=sys.stderr)
    elif results:
        print(format_landmarks(results))
    if markups:
        print(f"igrpn predict: wrote {len(markups)} markups file(s) to {Path(next(iter(markups))).parent}",
              file=sys.stderr)


def _remove_if_empty(folder, created: bool) -> None:
    """Remove a folder this run created when nothing was written into it."""
    if folder is not None and created:
        try:
            folder.rmdir()  # fails, as it should, when the folder holds anything
        except OSError:
            pass


def expand_volume_args(arguments: list[str]) -> tuple[list[Path], list[tuple[str, str]], list[str]]:
    """Expand glob patterns the shell left alone; drop repeats.

    Returns:
        (paths in order, [(pattern, reason)] for patterns that matched no file, the paths given
        more than once, once each). A plain path that does not exist is kept: reading it reports
        "file not found" with the others.
    """
    paths, failures, seen, repeats = [], [], set(), []
    for argument in arguments:
        if _GLOB_CHARS & set(argument) and not os.path.exists(argument):
            matches = sorted(glob.glob(argument, recursive=True))
            if not matches:
                failures.append((argument, "no file matches this pattern"))
                continue
        else:
            matches = [argument]
        for match in matches:
            key = os.path.realpath(match)  # a link to a volume given too is the same volume
            if key not in seen:
                seen.add(key)
                paths.append(Path(match))
            elif match not in repeats:
                repeats.append(match)
    return paths, failures, repeats


def read_volume(path, spacing_mm: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a NIfTI volume for prediction, checking the header before reading the voxels.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        spacing_mm: the checkpoint's isotropic spacing (for the size limit).

    Returns:
        (data float32 (X, Y, Z) or (X, Y, Z, 1), affine (4, 4) voxel → world mm, notes to show
        the user: see ``igrpn.data.check_nifti_header``).

    Raises:
        igrpn.data.CaseError (a ValueError) naming the file: missing, empty, not NIfTI, truncated,
        complex or colour voxels, not a single 3D volume, more than ``MAX_SOURCE_VOXELS`` voxels,
        or a resampled grid above ``igrpn.detect.MAX_GRID_VOXELS``.
    """

    name = str(path)
    image, notes = open_nifti(path, name)
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
    return data, affine, notes


def _one_line(error: BaseException) -> str:
    """An exception's message with its line breaks folded (one stderr line per failure)."""
    return " ".join(str(error).split())


def predict_file(detector, path) -> tuple["pandas.DataFrame", list[str]]:
    """Read one volume and predict it.

    Returns:
        (rows of ``Detector.predict`` with a leading ``volume`` column, notes of
        :func:`read_volume` to show the user).
    """
    data, affine, notes = read_volume(path, detector.profile.spacing_mm)
    rows = detector.predict(data, affine, name=str(path))
    rows.insert(0, "volume", str(path))
    return rows, notes


def output_format(path: Path) -> str:
    """``"csv"`` or ``"json"`` from the suffix; :class:`UsageError` otherwise."""
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"{path}: unsupported output suffix {path.suffix!r}; use .csv or .json")
    return fmt


def check_markups_names(paths: list[Path], directory) -> None:
    """Refuse two volumes whose markups files would be the same (same name, other folders)."""

    targets: dict[Path, Path] = {}
    for path in paths:
        target = markups_path_for(path, directory)
        if target in targets:
            raise UsageError(f"{targets[target]} and {path} would both write {target}; "
                             "predict them in separate runs or rename one")
        targets[target] = path


def prepare_markups_dir(directory) -> tuple[Path, bool]:
    """Create the markups folder if needed and check that it can be written.

    Returns:
        (the folder, whether this call created it: removed again if nothing is written).
    """
    directory = Path(directory)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"{directory}: cannot create the markups folder: {error.strerror or error}") from None
    try:
        check_writable(directory / "probe.mrk.json")
    except OSError:
        _remove_if_empty(directory, created)
        raise
    return directory, created


def selected_markups_text(path: Path, rows) -> str:
    """The selected landmarks of one volume's rows as a Slicer point list (LPS) for ``path``."""

    selected = selected_rows(rows)
    return markups_text(path, list(selected["landmark"]), selected[["x", "y", "z"]].to_numpy())


def selected_rows(rows):
    """The ``selected`` row of each landmark, in ``config.LANDMARKS`` order."""
    selected = rows[rows["selected"].astype(bool)]
    return selected.sort_values("class_id").reset_index(drop=True)


def write_predictions(results: list, path: Path) -> None:
    """Write ``[(volume, rows)]`` as CSV (every row) or JSON (per volume), atomically."""

    atomic_write_text(path, predictions_text(results, path))


def predictions_text(results: list, path: Path) -> str:
    """``[(volume, rows)]`` as CSV (every row) or JSON (per volume), by the suffix of ``path``.

    JSON: ``[{"volume": name, "landmarks": [selected rows], "candidates": [all rows]}, ...]``,
    always valid JSON (a non-finite number, which JSON cannot hold, would be ``null``).
    """
    import pandas as pd

    if output_format(path) == "csv":
        text = pd.concat([rows for _, rows in results], ignore_index=True).to_csv(index=False)
    else:
        document = [
            {"volume": name,
             "landmarks": _records(selected_rows(rows).drop(columns="volume")),
             "candidates": _records(rows.drop(columns="volume"))}
            for name, rows in results
        ]
        text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    return text


def _records(frame) -> list[dict]:
    """DataFrame rows as JSON-ready dicts of Python scalars (NaN and inf as None)."""
    return [{key: _json_scalar(value) for key, value in record.items()}
            for record in frame.to_dict(orient="records")]


def _json_scalar(value):
    """A Python scalar JSON can hold: numpy scalars unwrapped, non-finite floats as None."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and not np.isfinite(value) else value


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

    check_manifest_path(args.out, args.manifest)
    path = generate_dataset(args.out, n=args.n, seed=args.seed, n_test=args.n_test, grid=args.grid,
                            spacing_mm=args.spacing, manifest_path=args.manifest, progress=not args.quiet)
    print(path)
    return 0


# --------------------------------------------------------------------------------------------
# igrpn evaluate


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


# --------------------------------------------------------------------------------------------
# igrpn markups-to-manifest


def cmd_markups_to_manifest(args: argparse.Namespace) -> int:
    """Write a manifest from volumes and their ``.mrk.json`` landmarks; nothing unless every
    volume is a 3D NIfTI file with a unique name and all five landmarks."""
    import pandas as pd


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
            problems.append(_one_line(error))
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


if __name__ == "__main__":
    raise SystemExit(main())
