"""Landmarks to and from 3D Slicer markups files (``.mrk.json``, point lists of type "Fiducial").

The format (Slicer's markups schema v1.0.3)::

    {"@schema": ".../markups-schema-v1.0.3.json#",
     "markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "coordinateUnits": "mm",
                  "controlPoints": [{"label": "left_eye", "position": [x, y, z]}, ...]}]}

Our world millimetres are NIfTI's RAS (+x = Right, +y = Anterior, +z = Superior). Slicer writes
LPS by default; a point (x, y, z) in RAS is (−x, −y, z) in LPS and back. :func:`read_markups`
honours the file's ``coordinateSystem`` (``LPS`` when absent, the schema's default) and
``coordinateUnits`` (``mm`` or ``um``) and always returns RAS millimetres.

A user who annotates volumes in Slicer with point labels equal to our landmark names
(``left_eye``, ``middle_eyebrow``, ``right_eye``, ``nose_tip``, ``chin``) gets a manifest row with
:func:`manifest_row_from_markups`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from igrpn.config import LANDMARKS
from igrpn.io import atomic_write_text


SCHEMA_URL = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
              "Resources/Schema/markups-schema-v1.0.3.json#")
COORDINATE_SYSTEMS = ("LPS", "RAS")
#: Millimetres per unit of ``coordinateUnits``.
UNITS_TO_MM = {"mm": 1.0, "um": 1e-3}
#: RAS ↔ LPS: negate x and y (the map is its own inverse).
_RAS_LPS_SIGN = np.array([-1.0, -1.0, 1.0])
#: Suffix of Slicer markups files.
MARKUPS_SUFFIX = ".mrk.json"


class MarkupsError(ValueError):
    """A markups file that cannot be read or used; the message names the file and the problem."""


def ras_to_lps(points) -> np.ndarray:
    """(..., 3) RAS mm → (..., 3) LPS mm (also LPS → RAS: the map is its own inverse)."""
    return np.asarray(points, dtype=np.float64) * _RAS_LPS_SIGN


def write_markups(path, names, points_mm, coordinate_system: str = "LPS") -> Path:
    """Write points as a Slicer point list (``.mrk.json``), atomically (:func:`markups_text`)."""
    path = Path(path)
    atomic_write_text(path, markups_text(path, names, points_mm, coordinate_system))
    return path


def markups_text(path, names, points_mm, coordinate_system: str = "LPS") -> str:
    """A Slicer point list (``.mrk.json`` text) of points, to be written to ``path``.

    Args:
        path: the file to write (conventionally ending in ``.mrk.json``).
        names: one label per point (e.g. ``config.LANDMARKS``).
        points_mm: (N, 3) world mm in RAS (NIfTI world coordinates), finite.
        coordinate_system: ``"LPS"`` (Slicer's default) or ``"RAS"``: how the file stores them.

    Returns:
        The file's JSON text.

    Raises:
        ValueError naming ``path``: names and points disagree in number, points not (N, 3)
        finite, unknown coordinate system.
    """
    path = Path(path)
    names = [str(name) for name in names]
    points = np.asarray(points_mm, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"{path}: points_mm must have shape (N, 3), got {points.shape}")
    if len(names) != len(points):
        raise ValueError(f"{path}: {len(names)} names for {len(points)} points")
    if not np.all(np.isfinite(points)):
        raise ValueError(f"{path}: points_mm contain NaN or inf")
    if coordinate_system not in COORDINATE_SYSTEMS:
        raise ValueError(f"{path}: coordinate_system must be one of {COORDINATE_SYSTEMS}, "
                         f"got {coordinate_system!r}")
    stored = ras_to_lps(points) if coordinate_system == "LPS" else points
    control_points = [
        {"id": str(index + 1), "label": name, "description": "", "associatedNodeID": "",
         "position": [float(v) for v in position], "selected": True, "locked": False,
         "visibility": True, "positionStatus": "defined"}
        for index, (name, position) in enumerate(zip(names, stored))
    ]
    document = {
        "@schema": SCHEMA_URL,
        "markups": [{
            "type": "Fiducial", "coordinateSystem": coordinate_system, "coordinateUnits": "mm",
            "locked": False, "labelFormat": "%N-%d", "controlPoints": control_points,
        }],
    }
    return json.dumps(document, indent=2) + "\n"


def read_markups(path) -> tuple[list[str], np.ndarray]:
    """Read the control points of every point list ("Fiducial" markup) of a ``.mrk.json`` file.

    Args:
        path: a Slicer markups JSON file.

    Returns:
        (labels, points_mm): the labels in file order and (N, 3) float64 world mm in RAS. A control
        point whose ``positionStatus`` is ``"undefined"`` (placed in the list but never positioned)
        gets NaN coordinates.

    Raises:
        MarkupsError (a ValueError) naming the file: missing or not JSON, no ``markups`` list, no
        point list, a position that is not three numbers, an unknown coordinate system or unit.
    """
    path = Path(path)
    document = _load_json(path)
    markups = document.get("markups") if isinstance(document, dict) else None
    if not isinstance(markups, list):
        raise MarkupsError(f"{path}: not a Slicer markups file (no 'markups' list at the top level)")
    point_lists = [m for m in markups if isinstance(m, dict) and m.get("type") == "Fiducial"]
    if not point_lists:
        types = [m.get("type") if isinstance(m, dict) else type(m).__name__ for m in markups]
        raise MarkupsError(f"{path}: no point list (markup of type 'Fiducial') in the file; found {types}")
    labels, points = [], []
    for list_index, markup in enumerate(point_lists):
        where = f"{path}: point list {list_index}"
        system = markup.get("coordinateSystem", "LPS")  # the schema's default
        if system not in COORDINATE_SYSTEMS:
            raise MarkupsError(f"{where}: coordinateSystem must be one of {COORDINATE_SYSTEMS}, got {system!r}")
        scale = _units_to_mm(markup.get("coordinateUnits", "mm"), where)
        control_points = markup.get("controlPoints", [])
        if not isinstance(control_points, list):
            raise MarkupsError(f"{where}: 'controlPoints' must be a list")
        for point_index, point in enumerate(control_points):
            label, position = _control_point(point, f"{where}, control point {point_index}")
            position = position * scale
            labels.append(label)
            points.append(ras_to_lps(position) if system == "LPS" else position)
    return labels, np.asarray(points, dtype=np.float64).reshape(-1, 3)


def manifest_row_from_markups(case_id: str, image, split: str, markups_path) -> dict:
    """One manifest row (docs/design.md §3 columns) from a volume and its Slicer landmarks.

    The control points' labels name the landmarks: ``config.LANDMARKS``, compared without regard
    to case, and with spaces or hyphens read as underscores (``"Left eye"`` is ``left_eye``).
    Points with other labels are ignored.

    Args:
        case_id: the row's ``case_id``.
        image: the volume's path (as it should appear in the manifest: relative to the manifest,
            or absolute).
        split: ``"train"`` or ``"test"``.
        markups_path: the ``.mrk.json`` file with the five landmarks (any coordinate system).

    Returns:
        ``{"case_id", "image", "split", "<landmark>_x", "<landmark>_y", "<landmark>_z", ...}``
        with world mm in RAS (the NIfTI world the manifest uses).

    Raises:
        MarkupsError naming the file: a landmark missing, given twice, or without a position;
        ValueError: an unknown split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"case {case_id!r}: split must be 'train' or 'test', got {split!r}")
    labels, points = read_markups(markups_path)
    keys = [_normalise_label(label) for label in labels]
    row = {"case_id": str(case_id), "image": str(image), "split": split}
    missing, problems = [], []
    for name in LANDMARKS:
        found = [index for index, key in enumerate(keys) if key == name]
        if not found:
            missing.append(name)
        elif len(found) > 1:
            problems.append(f"landmark {name!r} given {len(found)} times")
        elif not np.all(np.isfinite(points[found[0]])):
            problems.append(f"landmark {name!r} has no defined position")
        else:
            for axis, value in zip("xyz", points[found[0]]):
                row[f"{name}_{axis}"] = float(value)
    if missing:
        others = sorted({label for label, key in zip(labels, keys) if key not in LANDMARKS})
        problems.append(f"missing landmark(s) {missing} (labels must be {list(LANDMARKS)}; "
                        f"other labels in the file: {others})")
    if problems:
        raise MarkupsError(f"{markups_path}: case {case_id!r}: " + "; ".join(problems))
    return row


def markups_path_for(volume_path, directory) -> Path:
    """``directory/<volume name without .nii/.nii.gz>.mrk.json``: where a volume's landmarks go."""
    return Path(directory) / (volume_stem(volume_path) + MARKUPS_SUFFIX)


def volume_stem(path) -> str:
    """A volume's file name without ``.nii.gz`` or ``.nii`` (or its last suffix otherwise)."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


# --------------------------------------------------------------------------------------------
# Helpers


def _load_json(path: Path):
    if not path.is_file():
        raise MarkupsError(f"{path}: markups file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise MarkupsError(f"{path}: not a markups JSON file (not UTF-8 text)") from None
    except json.JSONDecodeError as error:
        raise MarkupsError(f"{path}: not a markups JSON file ({error})") from None


def _units_to_mm(units, where: str) -> float:
    """Millimetres per unit; ``units`` is a UCUM string or a [code, scheme, meaning] triple."""
    code = units[0] if isinstance(units, list) and units else units
    if code not in UNITS_TO_MM:
        raise MarkupsError(f"{where}: coordinateUnits must be one of {list(UNITS_TO_MM)}, got {units!r}")
    return UNITS_TO_MM[code]


def _control_point(point, where: str) -> tuple[str, np.ndarray]:
    """(label, position (3,) in the file's system; NaN when the position is undefined)."""
    if not isinstance(point, dict):
        raise MarkupsError(f"{where}: expected an object, got {type(point).__name__}")
    label = str(point.get("label", ""))
    if point.get("positionStatus", "defined") == "undefined":
        return label, np.full(3, np.nan)
    position = point.get("position")
    valid = (isinstance(position, list) and len(position) == 3
             and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                     for v in position))
    if not valid:
        raise MarkupsError(f"{where} ({label!r}): position must be three finite numbers, got {position!r}")
    return label, np.asarray(position, dtype=np.float64)


def _normalise_label(label: str) -> str:
    return label.strip().lower().replace("-", "_").replace(" ", "_")
