"""The slice viewer's logic without widgets: what it shows and how input moves it.

``igrpn.viz.viewer.SliceViewer`` holds the ipywidgets; everything here works on numbers, tables
and strings, so it runs without a notebook front end: mouse wheel and keys → slice steps, the
window / level sliders' grid, the starting point and the "jump to" menu, the boxes to draw from
landmarks and prediction rows, a NIfTI file loaded onto a viewer grid, and the HTML the viewer
shows (style, legend, caption, status line, table cells).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
import pandas as pd

from igrpn import config
from igrpn.data import prepare_volume
from igrpn.viz.common import (AXIS_NAMES, BOX_COLOURS, PLANES, check_columns, landmark_boxes_vox,
                              voxel_spacing, world_to_voxel)
from igrpn.viz.predictions import prediction_boxes_vox
from igrpn.viz.render import DASHES, LINE_STYLES, window_level

__all__ = [
    "ZOOMS",
    "nice_step",
    "snap",
    "wheel_step",
    "key_step",
    "step_point",
    "ViewerBoxes",
    "viewer_boxes",
    "predictions_on_grid",
    "read_nifti_volume",
    "check_affine",
    "initial_point",
    "slider_grid",
    "jump_options",
    "plane_name",
    "world_mm",
    "STYLE_HTML",
    "TABLE_COLUMNS",
    "legend_html",
    "caption_html",
    "status_html",
    "row_texts",
]

_PREDICTION_COLUMNS = ("landmark", "selected", "score", "i", "j", "k", "w", "h", "d")
#: Keys that step the plane under the mouse, and by how many slices.
_KEY_STEPS = {"ArrowUp": 1, "ArrowRight": 1, "ArrowDown": -1, "ArrowLeft": -1,
              "PageUp": 5, "PageDown": -5}
ZOOMS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)


# ---------------------------------------------------------------------------- input


def nice_step(size: float) -> float:
    """The smallest of 1, 2 or 5 × 10ⁿ at least ``size`` (> 0): a slider step with a short readout."""
    exponent = np.floor(np.log10(size))
    for mantissa in (1, 2, 5, 10):
        if mantissa * 10**exponent >= size * (1 - 1e-9):
            return float(mantissa * 10**exponent)
    raise AssertionError("unreachable")  # 10 × 10ⁿ ≥ size always


def snap(value: float, step: float) -> float:
    """``value`` rounded to a multiple of ``step`` (as a slider with that step shows it)."""
    return float(np.round(value / step) * step)


def wheel_step(delta_y: float) -> int:
    """Slices to move for a wheel event: wheel up (``deltaY`` < 0) +1, down −1, none 0."""
    return int(-np.sign(float(delta_y)))


def key_step(key: str | None) -> int:
    """Slices to move for a key (``KeyboardEvent.key``): arrows ±1, PageUp/PageDown ±5, else 0."""
    return _KEY_STEPS.get(key or "", 0)


def step_point(point, axis: int, step: int, shape) -> tuple[int, int, int]:
    """``point`` (voxel indices) moved by ``step`` slices along ``axis``, kept inside ``shape``."""
    moved = [int(v) for v in point]
    moved[axis] = int(np.clip(moved[axis] + int(step), 0, shape[axis] - 1))
    return tuple(moved)


def slider_grid(low: float, high: float, default_window) -> tuple[float, float, float, float, float]:
    """The window / level sliders' step, ends and starting values for intensities in [low, high].

    Returns:
        ``(step, low, high, width, level)``: ``low`` and ``high`` rounded out to the step, and the
        default window's width and level rounded to it (the width at least one step).
    """
    step = nice_step(max(high - low, 1e-6) / 500)
    # the browser's slider snaps a value to min + n·step and sends the snapped value back:
    # the ends and the default window sit on that grid, so what is drawn is what is shown
    low, high = np.floor(low / step) * step, np.ceil(high / step) * step
    width, level = (snap(v, step) for v in window_level(*default_window))
    width = max(width, step)
    return step, low, high, width, level


# ---------------------------------------------------------------------------- what is shown


class ViewerBoxes(NamedTuple):
    """The boxes a viewer draws (centre-form voxel boxes, (0, 6) where there are none)."""

    gt_landmarks_vox: np.ndarray | None
    gt_boxes: np.ndarray
    predictions: pd.DataFrame | None
    pred_boxes: np.ndarray
    candidate_boxes: np.ndarray
    candidate_landmarks: np.ndarray


def viewer_boxes(gt_landmarks_vox, predictions, spacing_mm: float, box_mm, where: str) -> ViewerBoxes:
    """Ground-truth boxes, answers and other candidates, checked (``ValueError`` naming ``where``).

    Args:
        gt_landmarks_vox: optional (5, 3) voxel positions.
        predictions: optional DataFrame of one volume's prediction rows (voxel ``i, j, k``).
        spacing_mm: isotropic voxel size; ``box_mm``: ground-truth cube edge per landmark (mm).
    """
    gt_boxes = np.zeros((0, 6))
    if gt_landmarks_vox is not None:
        gt_landmarks_vox = np.asarray(gt_landmarks_vox, dtype=np.float64)
        if gt_landmarks_vox.shape != (config.NUM_LANDMARKS, 3):
            raise ValueError(f"{where}: gt_landmarks_vox must be (5, 3), got {gt_landmarks_vox.shape}")
        gt_boxes = landmark_boxes_vox(gt_landmarks_vox, spacing_mm, box_mm)
    pred_boxes = np.zeros((0, 6))
    candidate_boxes = np.zeros((0, 6))
    candidate_landmarks = np.zeros(0, int)
    if predictions is not None:
        if not isinstance(predictions, pd.DataFrame):
            raise ValueError(f"{where}: predictions must be a DataFrame, got {type(predictions).__name__}")
        check_columns(predictions, _PREDICTION_COLUMNS, where)
        predictions = predictions.reset_index(drop=True)
        pred_boxes, candidate_boxes, candidate_landmarks = prediction_boxes_vox(predictions, spacing_mm)
    return ViewerBoxes(gt_landmarks_vox, gt_boxes, predictions, pred_boxes, candidate_boxes, candidate_landmarks)


def predictions_on_grid(predictions: pd.DataFrame, affine) -> pd.DataFrame:
    """``predictions`` with ``i, j, k`` recomputed from their world ``x, y, z`` on a grid's affine."""
    voxels = world_to_voxel(predictions[["x", "y", "z"]].to_numpy(dtype=np.float64), affine)
    return predictions.assign(i=voxels[:, 0], j=voxels[:, 1], k=voxels[:, 2])


def read_nifti_volume(path: Path, spacing_mm: float | None, where: str):
    """A NIfTI file on an isotropic grid, prepared as the data module prepares volumes.

    Returns:
        ``(volume, grid affine, spacing_mm)`` — the spacing defaults to the file's smallest voxel
        edge. ``ValueError`` naming ``where`` for a missing or unreadable file.
    """
    if not path.exists():
        raise ValueError(f"{where}: {path}: file not found")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj)
    except Exception as error:  # nibabel raises several types for unreadable files
        raise ValueError(f"{where}: {path}: cannot read NIfTI ({error})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    affine = np.asarray(image.affine, dtype=np.float64)
    if spacing_mm is None:
        spacing_mm = float(voxel_spacing(affine).min())
    volume, grid_affine = prepare_volume(data, affine, spacing_mm)
    return volume, grid_affine, spacing_mm


def check_affine(affine, spacing_mm: float, where: str) -> np.ndarray:
    """A finite (4, 4) voxel → world matrix; without one, ``spacing_mm`` on the diagonal."""
    if affine is None:
        return np.diag([spacing_mm] * 3 + [1.0])
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"{where}: affine must be a finite (4, 4) matrix, got shape {affine.shape}")
    return affine


def initial_point(gt_landmarks_vox, pred_boxes: np.ndarray, shape) -> np.ndarray:
    """Where the planes start: the landmarks' centre, else the answers', else the volume's."""
    if gt_landmarks_vox is not None:
        centre = np.nanmean(gt_landmarks_vox, axis=0)
    elif len(pred_boxes) and np.isfinite(pred_boxes).any():
        centre = np.nanmean(pred_boxes[:, :3], axis=0)
    else:
        centre = (np.asarray(shape) - 1) / 2
    return np.clip(np.rint(centre), 0, np.asarray(shape) - 1).astype(int)


def jump_options(gt_landmarks_vox, pred_boxes: np.ndarray) -> list:
    """Entries of the "jump to" menu: ``(text, None | ("gt" | "pred", landmark index))``."""
    options = [("choose a landmark…", None)]
    for n, name in enumerate(config.LANDMARKS):
        if gt_landmarks_vox is not None:
            options.append((f"{n + 1} {name} (ground truth)", ("gt", n)))
        if len(pred_boxes) and np.all(np.isfinite(pred_boxes[n])):
            options.append((f"{n + 1} {name} (prediction)", ("pred", n)))
    return options


def plane_name(axis: int) -> str:
    """The name (``PLANES``) of the plane that holds ``axis`` fixed."""
    return next(name for name, fixed in PLANES if fixed == axis)


def world_mm(affine: np.ndarray, voxel) -> np.ndarray:
    """World position (3,) in mm of a voxel (i, j, k) through a (4, 4) affine."""
    return affine[:3, :3] @ np.asarray(voxel, dtype=np.float64) + affine[:3, 3]


# ---------------------------------------------------------------------------- HTML


STYLE_HTML = """<style>
.igrpn-slices, .igrpn-slices img { image-rendering: pixelated; cursor: crosshair; }
.igrpn-candidate-row { cursor: pointer; border-bottom: 1px solid #eee; }
.igrpn-candidate-row:hover { background: #e8f0ff; }
.igrpn-row-here { background: #fff3c4; }
.igrpn-cell { font-size: 12px; font-family: monospace; white-space: nowrap; }
.igrpn-table .widget-html, .igrpn-table .widget-html-content { height: 20px; line-height: 20px; }
</style>"""
#: (header, CSS width) of each column of the candidate table.
TABLE_COLUMNS = (("#", "30px"), ("landmark", "130px"), ("kind", "100px"), ("rank", "45px"),
                 ("score", "60px"), ("to GT (mm)", "85px"), ("centre i, j, k", "170px"))


def _svg_line(kind: str) -> str:
    """An inline SVG sample of a box kind's line (colour and dash pattern) for the legend."""
    red, green, blue = BOX_COLOURS[kind]
    on, off = DASHES[LINE_STYLES[kind]]
    dash = f' stroke-dasharray="{on} {off}"' if on else ""
    return (f'<svg width="36" height="10"><line x1="0" y1="5" x2="36" y2="5" '
            f'stroke="rgb({red},{green},{blue})" stroke-width="3"{dash}/></svg>')


def legend_html() -> str:
    """The legend under the image: line style and colour of each kind, and the landmark numbers."""
    kinds = (("gt", "ground truth"), ("pred", "answer (prediction)"), ("candidate", "other candidates"))
    lines = " &nbsp; ".join(f"{_svg_line(kind)} {text} ({LINE_STYLES[kind]})" for kind, text in kinds)
    numbers = " · ".join(f"<b>{n + 1}</b> {name}" for n, name in enumerate(config.LANDMARKS))
    return (f"<div style='font-size:12px'>{lines}<br>labels: {numbers} "
            "(ground truth above its box's top-left corner, answer below its bottom-right)</div>")


def caption_html(spacing_mm: float) -> str:
    """The caption under the legend: the planes' axes, the voxel size and how to move the planes."""
    caption = " | ".join(f"{name} ({AXIS_NAMES[axis]} fixed)" for name, axis in PLANES)
    return (f"<small>{caption}; first remaining axis to the right, second up. Voxel {spacing_mm:g} mm. "
            "Click: move the other planes there · wheel or ↑/↓ (PageUp/PageDown: 5): step the plane "
            "under the mouse · click a table row: go to that box.</small>")


def _format_triple(values, fmt: str) -> str:
    return "(" + ", ".join(format(float(v), fmt) for v in values) + ")"


def _voxel_text(volume: np.ndarray, affine: np.ndarray, voxel) -> str:
    value = volume[tuple(int(v) for v in voxel)]
    return (f"voxel (i, j, k) = {tuple(int(v) for v in voxel)} · "
            f"world (x, y, z) = {_format_triple(world_mm(affine, voxel), '.1f')} mm · value {value:.3g}")


def status_html(volume: np.ndarray, affine: np.ndarray, point, cursor, window, scale: int,
                active_axis: int) -> str:
    """The status line: the crosshair's voxel, world mm and value; the same under the mouse.

    Args:
        cursor: ``(axis, voxel)`` under the mouse, or ``None``.
        window: (lo, hi) display range; ``scale``: zoom; ``active_axis``: the plane the keys step.
    """
    lo, hi = window
    text = f"<b>crosshair</b> {_voxel_text(volume, affine, point)}"
    if cursor is not None:
        axis, voxel = cursor
        text += f"<br><b>mouse</b> ({plane_name(axis)}) {_voxel_text(volume, affine, voxel)}"
    text += f"<br>window [{lo:.3g}, {hi:.3g}] · zoom {scale}× · keys step the {plane_name(active_axis)} plane"
    return f"<span style='font-size:12px;font-family:monospace'>{text}</span>"


def row_texts(row) -> list[str]:
    """The cells of one ``candidate_table`` row as the table shows them (``–`` for NaN)."""
    def number(value, fmt):
        return "–" if pd.isna(value) else format(float(value), fmt)

    return [str(row["#"]), str(row["landmark"]), str(row["kind"]), number(row["rank"], ".0f"),
            number(row["score"], ".3f"), number(row["distance_mm"], ".1f"),
            _format_triple(row[["i", "j", "k"]], ".1f")]
