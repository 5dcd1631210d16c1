"""The manifest: one row per volume, its image, split and five landmarks in world mm (docs/design.md §3).

A user's own data set uses the same columns as ``data_manifest.csv``; :func:`read_manifest`
validates it and names the file, the row and the problem when something is wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from igrpn.config import LANDMARKS, NUM_LANDMARKS


SPLITS: tuple[str, ...] = ("train", "test")
#: Coordinate columns of the manifest, landmark-major: left_eye_x, left_eye_y, left_eye_z, ...
LANDMARK_COLUMNS: tuple[str, ...] = tuple(f"{name}_{axis}" for name in LANDMARKS for axis in "xyz")
REQUIRED_COLUMNS: tuple[str, ...] = ("case_id", "image", "split") + LANDMARK_COLUMNS
OPTIONAL_COLUMNS: tuple[str, ...] = ("source", "seed", "notes")
_TEXT_COLUMNS = ("case_id", "image", "split", "source", "notes")
_NA_STRINGS = ["", "NA", "N/A", "NaN", "nan", "null", "None"]


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, the rows and the problems."""


def _row_label(df: pd.DataFrame, position: int) -> str:
    """'case 'x'' when the row has a unique case_id, else with its row number and line in the file."""
    case_id = df["case_id"].iloc[position] if "case_id" in df.columns else ""
    if isinstance(case_id, str) and case_id:
        if (df["case_id"] == case_id).sum() == 1:
            return f"case {case_id!r}"
        return f"case {case_id!r} (line {position + 2})"
    return f"row {position} (line {position + 2})"


def read_manifest(path) -> pd.DataFrame:
    """Read and validate a manifest (docs/design.md §3); ``image`` becomes an absolute path.

    Checks the required columns, coordinates (numeric, finite), duplicate ``case_id``, the
    ``split`` (``train``/``test``) and that every image file exists. All problems found are
    reported together.

    Returns:
        DataFrame, one row per case: the required columns (coordinates float64), then the
        optional ``source``, ``seed``, ``notes`` and any other column of the file.
        ``df.attrs["manifest"]`` holds the manifest's absolute path.

    Raises:
        ManifestError (a ValueError): the message names the file, each row and its problem.
    """
    path = Path(path)
    label = str(path)
    if not path.is_file():
        raise ManifestError(f"{label}: manifest not found")
    try:
        header = [str(c).strip() for c in pd.read_csv(path, nrows=0).columns]
        text = [c for c in header if c in _TEXT_COLUMNS]
        # Text columns stay text ('001' is a case id, not 1); the rest parse as numbers.
        df = pd.read_csv(path, dtype={c: str for c in text}, keep_default_na=False,
                         na_values={c: _NA_STRINGS for c in header if c not in text})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ManifestError(f"{label}: not a readable CSV file: {error}") from None
    df.columns = [str(c).strip() for c in df.columns]

    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{label}: missing column(s) {missing}; a manifest needs {list(REQUIRED_COLUMNS)}")
    if len(df) == 0:
        raise ManifestError(f"{label}: no rows")
    for column in _TEXT_COLUMNS:
        if column in df.columns:
            df[column] = df[column].astype(str).str.strip()

    problems: list[str] = []
    # case_id: present and unique.
    for position in np.flatnonzero((df["case_id"] == "").to_numpy()):
        problems.append(f"row {position} (line {position + 2}): empty case_id")
    ids = df["case_id"][df["case_id"] != ""]
    for case_id in sorted(set(ids[ids.duplicated()])):
        lines = [int(p) + 2 for p in np.flatnonzero((df["case_id"] == case_id).to_numpy())]
        problems.append(f"case {case_id!r}: duplicate case_id (lines {lines})")
    # split.
    for position in np.flatnonzero(~df["split"].isin(SPLITS).to_numpy()):
        problems.append(f"{_row_label(df, position)}: unknown split {df['split'].iloc[position]!r} "
                        f"(expected one of {list(SPLITS)})")
    # Coordinates: numeric and finite.
    for column in LANDMARK_COLUMNS:
        raw = df[column]
        values = pd.to_numeric(raw, errors="coerce").astype(np.float64)
        for position in np.flatnonzero(~np.isfinite(values.to_numpy())):
            problems.append(f"{_row_label(df, position)}: {column} = {raw.iloc[position]!r} "
                            "is not a finite number")
        df[column] = values
    # Images: resolved against the manifest's folder, must exist.
    folder = path.absolute().parent
    resolved = [os.path.abspath(os.path.join(folder, image)) if image else "" for image in df["image"]]
    for position, (image, full) in enumerate(zip(df["image"], resolved)):
        if not image:
            problems.append(f"{_row_label(df, position)}: empty image path")
        elif not os.path.isfile(full):
            problems.append(f"{_row_label(df, position)}: image {image!r} not found (looked for {full})")
    if problems:
        raise ManifestError(f"{label}: {len(problems)} problem(s):\n  " + "\n  ".join(
            f"{label}: {p}" for p in problems))

    df["image"] = resolved
    if "seed" in df.columns:
        seeds = pd.to_numeric(df["seed"], errors="coerce")
        if seeds.notna().all() and (seeds == np.round(seeds)).all():
            df["seed"] = seeds.astype(np.int64)
    others = [c for c in df.columns if c not in REQUIRED_COLUMNS and c not in OPTIONAL_COLUMNS]
    columns = list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in df.columns] + others
    df = df[columns].reset_index(drop=True)
    df.attrs["manifest"] = str(path.absolute())
    return df


def landmarks_from_row(row) -> np.ndarray:
    """(5, 3) float64 world mm from a manifest row's ``<name>_x/_y/_z`` columns."""
    try:
        values = [float(row[column]) for column in LANDMARK_COLUMNS]
    except KeyError as error:
        raise ValueError(f"case {row.get('case_id', '?')!r}: missing landmark column {error}") from None
    return np.asarray(values, dtype=np.float64).reshape(NUM_LANDMARKS, 3)
