"""``igrpn predict``: the five landmarks of each volume, as CSV or JSON and optionally Slicer markups.

Every output is checked writable before any prediction and written atomically, all files or none
(:mod:`igrpn.io`); a volume that fails is reported and the others are still answered.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from igrpn.cli.args import EXIT_INTERRUPTED, UsageError
from igrpn.data import CaseError, open_nifti
from igrpn.data.markups import markups_path_for, markups_text
from igrpn.detect import check_grid_size, Detector
from igrpn.io import atomic_write_files, atomic_write_text, check_writable


#: Suffixes ``igrpn predict --out`` understands, and the format each selects.
OUTPUT_FORMATS = {".csv": "csv", ".json": "json"}
#: Largest volume (voxels, from the file's header) that ``igrpn predict`` reads: 512³ voxels are
#: 0.5 GiB as float32, and reorientation and resampling hold a few copies at once.
MAX_SOURCE_VOXELS = 512 ** 3
#: Characters that make a VOLUME argument a glob pattern expanded here (when the shell did not).
_GLOB_CHARS = set("*?[")


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
    results, markups = [], {}
    for path in tqdm(paths, desc="igrpn predict", unit="volume", disable=True if quiet else None):
        try:
            rows, notes = predict_file(detector, path)
            if markups_dir is not None:
                target = markups_path_for(path, markups_dir)
                markups[target] = selected_markups_text(target, rows)
        except (ValueError, OSError, RuntimeError, MemoryError) as error:
            message = one_line(error)
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
                        "voxels (igrpn.cli.predict.MAX_SOURCE_VOXELS); crop the volume around the face")
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
                        f"({type(error).__name__}: {one_line(error)})") from None
    return data, affine, notes


def one_line(error: BaseException) -> str:
    """An exception's message with its line breaks folded (one stderr line per failure)."""
    return " ".join(str(error).split())


def predict_file(detector, path) -> tuple[pd.DataFrame, list[str]]:
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
