"""Conventions and helpers shared by the figures and the slice viewer.

Planes are named by the array axis they hold fixed, with the RAS+ convention of the data module
(i = x: towards the right, j = y: towards anterior, k = z: towards superior):

* ``sagittal`` — constant i; shows (j, k), j to the right, k up;
* ``coronal`` — constant j; shows (i, k), i to the right, k up;
* ``axial`` — constant k; shows (i, j), i to the right, j up.

These are the scanner's planes. The fetus lies in any pose, so they cut its face obliquely;
``igrpn.viz.face_plane_names`` says which anatomical plane of the face each one is closest to.

Boxes are centre form ``(x, y, z, w, h, d)`` in voxels of the displayed volume (voxel centres
at integer indices). A box is drawn in a plane only where the plane cuts it (``plane_cuts``).
Colours follow the paper's Fig. 4: ground truth red, prediction blue, other candidates cyan.

Also here: input checks, the default intensity window, voxel ↔ world conversion, landmark boxes,
and the prediction-table helpers (``answer_rows``, ``case_rows``) both sides read tables with.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from igrpn import config

__all__ = [
    "PLANES",
    "AXIS_NAMES",
    "BOX_COLOURS",
    "CROSSHAIR_COLOUR",
    "check_volume",
    "check_point",
    "as_boxes",
    "check_columns",
    "intensity_window",
    "voxel_spacing",
    "world_to_voxel",
    "plane_cuts",
    "landmark_boxes_vox",
    "answer_rows",
    "case_rows",
]

#: (name, fixed array axis) of the three orthogonal planes, in display order.
PLANES: tuple[tuple[str, int], ...] = (("sagittal", 0), ("coronal", 1), ("axial", 2))
AXIS_NAMES = ("i (x)", "j (y)", "k (z)")
#: RGB of each kind of box, shared by the matplotlib figures and the numpy viewer.
BOX_COLOURS: dict[str, tuple[int, int, int]] = {
    "gt": (235, 30, 30),
    "pred": (30, 100, 255),
    "candidate": (0, 200, 255),
}
CROSSHAIR_COLOUR = (255, 210, 0)


# ---------------------------------------------------------------------------- checks and units


def check_volume(volume, where: str) -> np.ndarray:
    """A finite 3D array, or ``ValueError`` naming ``where``."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"{where}: volume must be 3D (X, Y, Z), got shape {volume.shape}")
    if min(volume.shape) < 1:
        raise ValueError(f"{where}: volume is empty, shape {volume.shape}")
    if volume.dtype.kind == "f" and not np.all(np.isfinite(volume)):
        raise ValueError(f"{where}: volume contains NaN or inf")
    return volume


def check_point(point_vox, shape, where: str) -> np.ndarray:
    """Round a voxel position (3,) to integer indices inside ``shape``; ``ValueError`` otherwise."""
    point = np.asarray(point_vox, dtype=np.float64).reshape(-1)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise ValueError(f"{where}: point_vox must be 3 finite voxel coordinates, got {point_vox!r}")
    index = np.rint(point).astype(int)
    if np.any(index < 0) or np.any(index >= np.asarray(shape)):
        raise ValueError(f"{where}: point_vox {point.tolist()} lies outside the volume {tuple(shape)}")
    return index


def as_boxes(boxes, where: str) -> np.ndarray:
    """Boxes as an (n, 6) float array (n may be 0); rows with NaN are kept and never drawn."""
    if boxes is None:
        return np.zeros((0, 6))
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        return np.zeros((0, 6))
    boxes = boxes.reshape(-1, boxes.shape[-1]) if boxes.ndim > 1 else boxes.reshape(1, -1)
    if boxes.shape[-1] != 6:
        raise ValueError(f"{where}: boxes must be centre form (n, 6), got shape {boxes.shape}")
    return boxes


def intensity_window(volume, low_percentile: float = 1.0, high_percentile: float = 99.5):
    """Display window (lo, hi) from percentiles of the volume's non-background voxels.

    Voxels equal to the minimum (the empty region outside an ultrasound cone) are left out when
    they are not the majority, so the window follows the tissue. Always ``hi > lo``.

    Args:
        volume: (X, Y, Z) array.

    Returns:
        (lo, hi) floats in the volume's intensity units.
    """
    values = np.asarray(volume, dtype=np.float32).ravel()
    # a strided sample keeps the percentiles fast on large volumes
    values = values[:: max(1, values.size // 500_000)]
    foreground = values[values > values.min()]
    if foreground.size > 0.05 * values.size:
        values = foreground
    lo, hi = np.percentile(values, [low_percentile, high_percentile])
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def voxel_spacing(affine) -> np.ndarray:
    """Voxel edge lengths (3,) in mm from a (4, 4) voxel → world affine (column norms)."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"voxel_spacing: affine must be (4, 4), got {affine.shape}")
    return np.linalg.norm(affine[:3, :3], axis=0)


def world_to_voxel(points_mm: np.ndarray, affine) -> np.ndarray:
    """World mm (n, 3) → voxel indices (n, 3) through the inverse of a (4, 4) affine."""
    affine = np.asarray(affine, dtype=np.float64)
    return np.linalg.solve(affine[:3, :3], (np.asarray(points_mm, float) - affine[:3, 3]).T).T


def plane_cuts(boxes, axis: int, index: float):
    """Which boxes a plane cuts, and their rectangles in that plane.

    Args:
        boxes: (n, 6) centre-form boxes (voxels).
        axis: the array axis the plane holds fixed (0, 1 or 2).
        index: the plane's position along ``axis`` (voxels).

    Returns:
        ``cut`` (n,) bool — the plane passes through the box (boundary included; NaN rows never
        cut) — and ``rect`` (n, 4) ``(u0, v0, u1, v1)``, the box's extent along the plane's two
        remaining axes in increasing axis order (voxels).
    """
    boxes = as_boxes(boxes, "plane_cuts")
    lower = boxes[:, :3] - boxes[:, 3:] / 2
    upper = boxes[:, :3] + boxes[:, 3:] / 2
    with np.errstate(invalid="ignore"):
        cut = (lower[:, axis] <= index) & (index <= upper[:, axis])
    in_plane = [a for a in range(3) if a != axis]
    rect = np.concatenate([lower[:, in_plane], upper[:, in_plane]], axis=1)
    return cut, rect


def landmark_boxes_vox(landmarks_vox, spacing_mm, box_mm=config.GT_BOX_MM) -> np.ndarray:
    """Landmark-centred cubes (paper §3) in voxels.

    Args:
        landmarks_vox: (5, 3) voxel positions (NaN rows allowed: no box).
        spacing_mm: isotropic voxel size (mm), or (3,) per axis.
        box_mm: edge (mm) per landmark (5,), or one edge for all.

    Returns:
        (5, 6) centre-form boxes in voxels.
    """
    landmarks_vox = np.asarray(landmarks_vox, dtype=np.float64).reshape(-1, 3)
    edges_mm = np.broadcast_to(np.asarray(box_mm, dtype=np.float64).reshape(-1, 1),
                               (len(landmarks_vox), 1))
    sizes = edges_mm / np.asarray(spacing_mm, dtype=np.float64).reshape(1, -1)
    return np.concatenate([landmarks_vox, np.broadcast_to(sizes, landmarks_vox.shape)], axis=1)


# ---------------------------------------------------------------------------- prediction tables


def check_columns(frame: pd.DataFrame, columns, where: str) -> None:
    """``ValueError`` naming ``where`` and the missing ones unless ``frame`` has all ``columns``."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: missing columns {missing} (have {list(frame.columns)})")


def answer_rows(predictions: pd.DataFrame) -> pd.DataFrame:
    """The answer row per (case, landmark): the ``selected`` row, else the highest score."""
    keys = [c for c in ("case_id", "landmark") if c in predictions.columns]
    if "selected" in predictions.columns:
        chosen = predictions[predictions["selected"].astype(bool)]
    else:
        chosen = predictions.sort_values("score", ascending=False)
    return chosen.drop_duplicates(keys).reset_index(drop=True)


def case_rows(predictions: pd.DataFrame, case_id: str) -> pd.DataFrame:
    """The rows of one case (``case_id`` compared as text); all rows when there is no such column."""
    if "case_id" not in predictions.columns:
        return predictions
    return predictions[predictions["case_id"].astype(str) == str(case_id)]
