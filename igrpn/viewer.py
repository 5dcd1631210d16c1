"""The interactive slice viewer: three planes of a volume with its boxes, as a medical viewer works.

What a user of 3D Slicer or ITK-SNAP reaches for, in JupyterLab and under Voilà alike:

* **click** a point of one plane: the two other planes (and the crosshair) move to that voxel;
* **mouse wheel** over a plane steps that plane's slice (wheel up: +1), and so do the **arrow
  keys** (↑/→ +1, ↓/← −1, PageUp/PageDown ±5) for the plane under the mouse;
* **window / level** sliders in the volume's intensity units, with a reset to the default window;
* **zoom**: an integer magnification, each voxel drawn as a block of pixels (nearest neighbour,
  never blurred);
* boxes **labelled** with the landmark's number (legend under the image); ground truth, answer
  and other candidates told apart by **line style** — solid, dashed, dotted — as well as colour;
* a **candidate table** whose rows jump the planes to the candidate's centre, with its distance to
  the ground truth when there is one;
* the crosshair's voxel, **world position (mm)** and intensity, and the same under the mouse.

Means: the three planes are composed into one PNG with numpy (a redraw takes milliseconds) and
shown in an ``ipywidgets.Image``; the mouse and keyboard reach Python through ``ipyevents``,
which ships its front end as a JupyterLab / Voilà extension in its wheel (no download at run
time). ``save_viewer_screenshot`` serves ``notebooks/viewer.ipynb`` with Voilà and photographs it
in the system Chromium through Playwright, as the browser tests do.

Plane names, axes and box conventions are those of ``igrpn.viz``.
"""

from __future__ import annotations

import contextlib
import html
import importlib.util
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from igrpn import config
from igrpn.viz import (AXIS_NAMES, BOX_COLOURS, CROSSHAIR_COLOUR, PLANES, _answers, _case_rows,
                       _check_columns, _check_volume, _world_to_voxel, intensity_window,
                       landmark_boxes_vox, plane_cuts, prediction_boxes_vox, voxel_spacing)

__all__ = [
    "LINE_STYLES",
    "Overlay",
    "PanelLayout",
    "window_level",
    "window_range",
    "apply_window",
    "nice_step",
    "snap",
    "wheel_step",
    "key_step",
    "step_point",
    "encode_png",
    "render_slices",
    "landmark_summary",
    "candidate_table",
    "SliceViewer",
    "ManifestBrowser",
    "browse_manifest",
    "browser_missing",
    "serve_voila",
    "chromium_page",
    "viewer_notebook",
    "open_viewer_page",
    "save_viewer_screenshot",
]

_PREDICTION_COLUMNS = ("landmark", "selected", "score", "i", "j", "k", "w", "h", "d")
#: Line style of each kind of box in the viewer, so that kinds differ by more than colour.
LINE_STYLES: dict[str, str] = {"gt": "solid", "pred": "dashed", "candidate": "dotted"}
#: (on, off) run lengths in pixels of each line style; (0, 0) draws a solid line.
_DASHES: dict[str, tuple[int, int]] = {"solid": (0, 0), "dashed": (8, 4), "dotted": (2, 3)}
#: Where each kind's number is written beside its box, so that the labels of a GT box and of the
#: answer on top of it do not overlap.
_LABEL_CORNERS = {"gt": "top-left", "pred": "bottom-right", "candidate": "bottom-left"}
#: Keys that step the plane under the mouse, and by how many slices.
_KEY_STEPS = {"ArrowUp": 1, "ArrowRight": 1, "ArrowDown": -1, "ArrowLeft": -1,
              "PageUp": 5, "PageDown": -5}
ZOOMS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)


# ---------------------------------------------------------------------------- pure logic


def window_level(lo: float, hi: float) -> tuple[float, float]:
    """(window width, level) of the display range ``[lo, hi]`` (intensity units)."""
    return float(hi - lo), float((hi + lo) / 2)


def window_range(window: float, level: float) -> tuple[float, float]:
    """The display range ``(lo, hi)`` of a window width and level (intensity units).

    A width below 1e-6 is widened to it, so the mapping stays defined.
    """
    half = max(float(window), 1e-6) / 2
    return float(level) - half, float(level) + half


def apply_window(values, lo: float, hi: float) -> np.ndarray:
    """Map intensities linearly to grey levels: ``lo`` → 0, ``hi`` → 255, clipped (uint8)."""
    values = np.asarray(values, dtype=np.float32)
    scale = 255.0 / max(float(hi) - float(lo), 1e-12)
    # + 0.5 rounds to the nearest grey level instead of truncating
    return np.clip((values - float(lo)) * scale + 0.5, 0, 255).astype(np.uint8)


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


@dataclass(frozen=True)
class PanelLayout:
    """Where the three planes lie in the composed image (``render_slices``), in pixels.

    Panels follow ``PLANES`` from left to right, ``gap`` pixels apart, top-aligned; in each the
    plane's first remaining axis runs to the right and the second up, every voxel a
    ``scale`` × ``scale`` block. Pixel (x, y) counts from the image's top-left corner.

    Args:
        shape: (X, Y, Z) of the volume (voxels).
        scale: pixels per voxel edge (integer zoom).
        gap: pixels between panels.
    """

    shape: tuple[int, int, int]
    scale: int
    gap: int = 4

    def _width(self, n: int) -> int:
        """Pixel width of panel ``n``: its first in-plane axis (the lowest one it does not fix)."""
        u_axis = min(a for a in range(3) if a != PLANES[n][1])
        return self.shape[u_axis] * self.scale

    def panel(self, n: int) -> tuple[int, int, int, int, int]:
        """``(axis, u_axis, v_axis, left, width)`` of panel ``n`` (pixels)."""
        axis = PLANES[n][1]
        u_axis, v_axis = [a for a in range(3) if a != axis]
        left = sum(self._width(m) + self.gap for m in range(n))
        return axis, u_axis, v_axis, left, self._width(n)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the composed image, pixels."""
        last = self.panel(len(PLANES) - 1)
        height = max(self.shape[self.panel(n)[2]] for n in range(len(PLANES))) * self.scale
        return height, last[3] + last[4]

    def pixel_to_voxel(self, x: float, y: float, point):
        """The plane and voxel under pixel (x, y), the other coordinate taken from ``point``.

        Args:
            x, y: pixel column and row in the composed image (fractions are floored).
            point: (3,) current voxel indices of the planes.

        Returns:
            ``(axis, (i, j, k))`` — the array axis the clicked plane holds fixed and the voxel —
            or ``None`` between panels, below a shorter panel or outside the image.
        """
        x, y = int(np.floor(x)), int(np.floor(y))
        for n in range(len(PLANES)):
            axis, u_axis, v_axis, left, width = self.panel(n)
            if left <= x < left + width and 0 <= y < self.shape[v_axis] * self.scale:
                voxel = [int(v) for v in point]
                voxel[u_axis] = (x - left) // self.scale
                voxel[v_axis] = self.shape[v_axis] - 1 - y // self.scale  # v points up
                return axis, tuple(voxel)
        return None

    def voxel_to_pixel(self, axis: int, voxel) -> tuple[int, int]:
        """The centre pixel (x, y) of ``voxel`` in the panel of the plane that holds ``axis`` fixed."""
        n = [fixed for _, fixed in PLANES].index(axis)
        _, u_axis, v_axis, left, _ = self.panel(n)
        x = left + int(voxel[u_axis]) * self.scale + self.scale // 2
        y = (self.shape[v_axis] - 1 - int(voxel[v_axis])) * self.scale + self.scale // 2
        return x, y


# ---------------------------------------------------------------------------- drawing


def encode_png(rgb: np.ndarray, compression: int = 1) -> bytes:
    """Encode an (H, W, 3) uint8 image as PNG bytes (no filter; zlib ``compression`` level)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_png: need an (H, W, 3) array, got shape {rgb.shape}")
    height, width, _ = rgb.shape
    # each scanline is prefixed by its filter type (0 = none)
    scanlines = np.zeros((height, 1 + 3 * width), np.uint8)
    scanlines[:, 1:] = rgb.reshape(height, -1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(scanlines.tobytes(), compression)) + chunk(b"IEND", b""))


def _dash_mask(length: int, start: int, style: str) -> np.ndarray:
    """Which of ``length`` pixels along an edge are drawn; ``start`` is the edge's first index."""
    on, off = _DASHES[style]
    if on == 0:
        return np.ones(length, bool)
    return (np.arange(length) + start) % (on + off) < on


def _draw_outline(panel: np.ndarray, left: int, top: int, right: int, bottom: int,
                  colour, thickness: int, style: str = "solid") -> None:
    """Draw a rectangle outline into an (H, W, 3) view, clipped to it, in a line ``style``."""
    height, width = panel.shape[:2]
    cols = np.arange(max(left, 0), min(right, width - 1) + 1)
    rows = np.arange(max(top, 0), min(bottom, height - 1) + 1)
    # the dash pattern starts at the box's corner, wherever the panel clips it
    cols = cols[_dash_mask(len(cols), int(cols[0]) - left if len(cols) else 0, style)]
    rows = rows[_dash_mask(len(rows), int(rows[0]) - top if len(rows) else 0, style)]
    edge_rows = [r for r in (*range(top, top + thickness), *range(bottom - thickness + 1, bottom + 1))
                 if 0 <= r < height]
    edge_cols = [c for c in (*range(left, left + thickness), *range(right - thickness + 1, right + 1))
                 if 0 <= c < width]
    if len(cols) and edge_rows:
        panel[np.ix_(edge_rows, cols)] = colour
    if len(rows) and edge_cols:
        panel[np.ix_(rows, edge_cols)] = colour


#: 3 × 5 bitmap digits (rows top to bottom, "#" drawn) for the box labels.
_GLYPHS = {
    "0": ("###", "#.#", "#.#", "#.#", "###"), "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"), "3": ("###", "..#", "###", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"), "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"), "7": ("###", "..#", ".#.", ".#.", ".#."),
    "8": ("###", "#.#", "###", "#.#", "###"), "9": ("###", "#.#", "###", "..#", "###"),
}


def _text_size(text: str, pixel: int) -> tuple[int, int]:
    """(height, width) in pixels of ``text`` drawn by ``_draw_text`` (1-pixel dark margin)."""
    return 5 * pixel + 2, len(text) * 4 * pixel - pixel + 2


def _draw_text(panel: np.ndarray, text: str, left: int, top: int, colour, pixel: int = 2) -> None:
    """Write digits on a dark plate at (left, top) of an (H, W, 3) view, clipped to it.

    Each font pixel is ``pixel`` × ``pixel`` screen pixels; characters without a glyph are
    skipped. The plate keeps the label readable on bright speckle.
    """
    height, width = _text_size(text, pixel)
    bitmap = np.zeros((height, width), np.int8)  # 0 transparent, 1 plate, 2 ink
    bitmap[:] = 1
    for n, char in enumerate(text):
        for r, row in enumerate(_GLYPHS.get(char, ("...",) * 5)):
            for c, mark in enumerate(row):
                if mark == "#":
                    y, x = 1 + r * pixel, 1 + (4 * n + c) * pixel
                    bitmap[y: y + pixel, x: x + pixel] = 2
    rows = slice(max(top, 0), min(top + height, panel.shape[0]))
    cols = slice(max(left, 0), min(left + width, panel.shape[1]))
    if rows.start >= rows.stop or cols.start >= cols.stop:
        return
    clipped = bitmap[rows.start - top: rows.stop - top, cols.start - left: cols.stop - left]
    region = panel[rows, cols]
    region[clipped == 1] = (0, 0, 0)
    region[clipped == 2] = colour


def _label_origin(corner: str, rect_px, size) -> tuple[int, int]:
    """Top-left pixel of a label of ``size`` (h, w) beside a box outline (left, top, right, bottom)."""
    left, top, right, bottom = rect_px
    height, width = size
    if corner == "top-left":  # just above the top edge, flush with the left edge
        return left, top - height
    if corner == "bottom-right":  # just below the bottom edge, flush with the right edge
        return right - width + 1, bottom + 1
    return left, bottom + 1  # bottom-left


class Overlay(NamedTuple):
    """Boxes drawn by ``render_slices``.

    Attributes:
        boxes: (n, 6) centre-form voxel boxes (NaN rows are never drawn).
        colour: (r, g, b).
        style: ``"solid"``, ``"dashed"`` or ``"dotted"`` (``True``/``False``: dashed/solid).
        labels: optional text per box (digits), written beside the box where the plane cuts it.
        corner: where the label goes: ``"top-left"`` (above), ``"bottom-right"`` or
            ``"bottom-left"`` (below).
    """

    boxes: np.ndarray
    colour: tuple
    style: object = "solid"
    labels: tuple | list | None = None
    corner: str = "top-left"


def _box_pixels(u0, v0, u1, v1, n_v: int, scale: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixels of a box's in-plane extent (voxels, v up)."""
    # continuous voxel coordinate c ↦ pixel (c + 0.5) · scale; v is flipped
    left, right = int(np.floor((u0 + 0.5) * scale)), int(np.ceil((u1 + 0.5) * scale)) - 1
    top, bottom = int(np.floor((n_v - 0.5 - v1) * scale)), int(np.ceil((n_v - 0.5 - v0) * scale)) - 1
    return left, top, right, bottom


def _draw_overlay(panel: np.ndarray, overlay: Overlay, axis: int, index: int, n_v: int, scale: int,
                  thickness: int, label_pixel: int) -> None:
    """Draw the boxes of one overlay that the plane (``axis`` = ``index``) cuts, with their labels."""
    style = overlay.style
    if isinstance(style, (bool, np.bool_)):  # the older (boxes, colour, dashed) form
        style = "dashed" if style else "solid"
    cut, rect = plane_cuts(overlay.boxes, axis, index)
    for n in np.flatnonzero(cut):
        rect_px = _box_pixels(*rect[n], n_v, scale)
        _draw_outline(panel, *rect_px, overlay.colour, thickness, style)
        if overlay.labels is not None and overlay.labels[n]:
            text = str(overlay.labels[n])
            size = _text_size(text, label_pixel)
            _draw_text(panel, text, *_label_origin(overlay.corner, rect_px, size),
                       overlay.colour, label_pixel)


def render_slices(volume, point, overlays=(), scale: int = 2, gap: int = 4, crosshair: bool = True,
                  thickness: int = 2, window=None, label_pixel: int = 2) -> np.ndarray:
    """The three planes through ``point``, side by side, as one RGB image (numpy only).

    Layout as ``PanelLayout`` (panel order and orientation as ``PLANES`` / ``plot_planes``);
    each voxel becomes a ``scale`` × ``scale`` block (nearest neighbour); box outlines and labels
    are drawn at display resolution where a plane cuts a box.

    Args:
        volume: (X, Y, Z) uint8 already windowed, or any intensities when ``window`` is given.
        point: (3,) integer voxel indices of the planes.
        overlays: sequence of ``Overlay`` (or ``(boxes, colour, dashed)`` tuples), drawn in order
            (later on top).
        scale: integer upscaling factor (pixels per voxel).
        gap: pixels between panels.
        crosshair: draw the other planes' positions in each panel.
        thickness: outline width in pixels.
        window: optional (lo, hi): each plane is mapped by ``apply_window`` as it is cut, so a
            new window costs three small planes, not the volume.
        label_pixel: screen pixels per font pixel of the labels.

    Returns:
        (H, W, 3) uint8 with H = scale · max plane height, W = Σ scale · plane widths + 2 gaps.
    """
    layout = PanelLayout(tuple(volume.shape), int(scale), int(gap))
    canvas = np.zeros((*layout.size, 3), np.uint8)
    overlays = [Overlay(*o) for o in overlays]
    for n in range(len(PLANES)):
        axis, u_axis, v_axis, left, width = layout.panel(n)
        plane = np.take(volume, int(point[axis]), axis=axis)  # (U, V)
        if window is not None:
            plane = apply_window(plane, *window)
        # rows from high v to low v so that v points up; each voxel → scale × scale pixels
        image = plane.T[::-1].repeat(scale, axis=0).repeat(scale, axis=1)
        panel = canvas[: image.shape[0], left: left + width]
        panel[...] = image[..., None]
        n_v = volume.shape[v_axis]
        if crosshair:
            panel[:, int(point[u_axis]) * scale + scale // 2] = CROSSHAIR_COLOUR
            panel[(n_v - 1 - int(point[v_axis])) * scale + scale // 2, :] = CROSSHAIR_COLOUR
        for overlay in overlays:
            _draw_overlay(panel, overlay, axis, int(point[axis]), n_v, scale, thickness, label_pixel)
    return canvas


# ---------------------------------------------------------------------------- tables


def landmark_summary(gt_landmarks_vox=None, predictions: pd.DataFrame | None = None,
                     spacing_mm: float = 1.0) -> pd.DataFrame:
    """Per landmark: the answer's distance to the ground truth (mm), its score and rank.

    Args:
        gt_landmarks_vox: optional (5, 3) voxel positions.
        predictions: optional rows of one volume (``landmark, score, i, j, k``, ``selected``
            and ``rank`` when present).
        spacing_mm: isotropic voxel size.

    Returns:
        Five rows: ``#``, ``landmark``, ``distance_mm`` (NaN unless both are known), ``score``,
        ``rank`` (of the answer among its landmark's candidates), ``candidates`` (count).
    """
    table = pd.DataFrame({"#": np.arange(1, config.NUM_LANDMARKS + 1), "landmark": config.LANDMARKS})
    table["distance_mm"] = np.nan
    table["score"] = np.nan
    table["rank"] = pd.array([pd.NA] * config.NUM_LANDMARKS, dtype="Int64")
    table["candidates"] = 0
    if predictions is None or predictions.empty:
        return table
    answers = _answers(predictions).set_index("landmark")
    counts = predictions.groupby("landmark").size()
    for n, name in enumerate(config.LANDMARKS):
        table.loc[n, "candidates"] = int(counts.get(name, 0))
        if name not in answers.index:
            continue
        answer = answers.loc[name]
        table.loc[n, "score"] = float(answer["score"])
        if "rank" in answers.columns:
            table.loc[n, "rank"] = int(answer["rank"])
        if gt_landmarks_vox is not None:
            delta = answer[["i", "j", "k"]].to_numpy(float) - np.asarray(gt_landmarks_vox, float)[n]
            table.loc[n, "distance_mm"] = float(np.linalg.norm(delta) * spacing_mm)
    return table


def candidate_table(gt_landmarks_vox=None, predictions: pd.DataFrame | None = None,
                    spacing_mm: float = 1.0) -> pd.DataFrame:
    """Every box the viewer can jump to: the ground truth and each candidate, per landmark.

    Args:
        gt_landmarks_vox: optional (5, 3) voxel positions (NaN rows: no ground truth).
        predictions: optional rows of one volume (``landmark, score, i, j, k`` voxels of the
            displayed grid; ``selected`` and ``rank`` when present).
        spacing_mm: isotropic voxel size (mm).

    Returns:
        One row per box, by landmark then ground truth, answer, other candidates by score:
        ``#`` (landmark number 1–5), ``landmark``, ``kind`` (``"ground truth"``, ``"answer"`` or
        ``"candidate"``), ``rank`` and ``score`` (NaN for the ground truth), ``distance_mm`` (a
        candidate's distance to its landmark's ground truth; NaN without one and on the ground
        truth's own row), ``i, j, k`` (centre, voxels).
    """
    rows = []
    gt = None if gt_landmarks_vox is None else np.asarray(gt_landmarks_vox, dtype=np.float64).reshape(-1, 3)
    if gt is not None:
        for n, name in enumerate(config.LANDMARKS):
            if np.all(np.isfinite(gt[n])):
                rows.append({"#": n + 1, "landmark": name, "kind": "ground truth", "rank": np.nan,
                             "score": np.nan, "distance_mm": np.nan, "_order": 0,
                             "i": gt[n, 0], "j": gt[n, 1], "k": gt[n, 2]})
    if predictions is not None and not predictions.empty:
        answer_index = set(_answers(predictions.assign(_row=np.arange(len(predictions))))["_row"])
        for row_number, (_, row) in enumerate(predictions.iterrows()):
            n = config.LANDMARKS.index(row["landmark"])
            centre = row[["i", "j", "k"]].to_numpy(dtype=np.float64)
            distance = np.nan
            if gt is not None and np.all(np.isfinite(gt[n])):
                distance = float(np.linalg.norm(centre - gt[n]) * spacing_mm)
            is_answer = row_number in answer_index
            rows.append({"#": n + 1, "landmark": row["landmark"],
                         "kind": "answer" if is_answer else "candidate",
                         "rank": float(row["rank"]) if "rank" in row.index else np.nan,
                         "score": float(row["score"]), "distance_mm": distance,
                         "_order": 1 if is_answer else 2,
                         "i": centre[0], "j": centre[1], "k": centre[2]})
    columns = ["#", "landmark", "kind", "rank", "score", "distance_mm", "i", "j", "k"]
    if not rows:
        return pd.DataFrame(columns=columns)
    table = pd.DataFrame(rows)
    table["_score"] = -table["score"].fillna(np.inf)
    table = table.sort_values(["#", "_order", "_score"], kind="stable")
    return table[columns].reset_index(drop=True)


# ---------------------------------------------------------------------------- the widget


_STYLE = """<style>
.igrpn-slices, .igrpn-slices img { image-rendering: pixelated; cursor: crosshair; }
.igrpn-candidate-row { cursor: pointer; border-bottom: 1px solid #eee; }
.igrpn-candidate-row:hover { background: #e8f0ff; }
.igrpn-row-here { background: #fff3c4; }
.igrpn-cell { font-size: 12px; font-family: monospace; white-space: nowrap; }
.igrpn-table .widget-html, .igrpn-table .widget-html-content { height: 20px; line-height: 20px; }
</style>"""
_TABLE_COLUMNS = (("#", "30px"), ("landmark", "130px"), ("kind", "100px"), ("rank", "45px"),
                  ("score", "60px"), ("to GT (mm)", "85px"), ("centre i, j, k", "170px"))


def _svg_line(kind: str) -> str:
    """An inline SVG sample of a box kind's line (colour and dash pattern) for the legend."""
    red, green, blue = BOX_COLOURS[kind]
    on, off = _DASHES[LINE_STYLES[kind]]
    dash = f' stroke-dasharray="{on} {off}"' if on else ""
    return (f'<svg width="36" height="10"><line x1="0" y1="5" x2="36" y2="5" '
            f'stroke="rgb({red},{green},{blue})" stroke-width="3"{dash}/></svg>')


def _legend_html() -> str:
    """The legend under the image: line style and colour of each kind, and the landmark numbers."""
    kinds = (("gt", "ground truth"), ("pred", "answer (prediction)"), ("candidate", "other candidates"))
    lines = " &nbsp; ".join(f"{_svg_line(kind)} {text} ({LINE_STYLES[kind]})" for kind, text in kinds)
    numbers = " · ".join(f"<b>{n + 1}</b> {name}" for n, name in enumerate(config.LANDMARKS))
    return (f"<div style='font-size:12px'>{lines}<br>labels: {numbers} "
            "(ground truth above its box's top-left corner, answer below its bottom-right)</div>")


def _format_triple(values, fmt: str) -> str:
    return "(" + ", ".join(format(float(v), fmt) for v in values) + ")"


class SliceViewer:
    """Interactive three-plane viewer (ipywidgets + ipyevents) of a volume with its boxes.

    The three planes are composed into one RGB PNG with numpy (no matplotlib per redraw), so a
    click, wheel step or slider move redraws in a few milliseconds. Mouse and keys on the image
    (module docstring): click to move the other planes, wheel or arrows to step a slice.
    Controls: a slider per axis, window and level sliders with a reset, a zoom menu, check boxes
    for the ground truth (red, solid), the answers (blue, dashed), the other candidates (cyan,
    dotted), the labels and the crosshair, a "jump to landmark" menu, a status line (crosshair
    voxel, world mm and intensity; the same under the mouse) and the candidate table, whose rows
    jump to a box's centre.

    Args:
        volume: (X, Y, Z) array, isotropic voxels.
        spacing_mm: voxel size (mm).
        gt_landmarks_vox: optional (5, 3) ground-truth voxel positions.
        predictions: optional rows of ``Detector.predict`` for this volume (``landmark``,
            ``selected``, ``rank``, ``score``, ``i, j, k`` voxels of this volume, ``w, h, d`` mm).
        box_mm: ground-truth cube edge per landmark (mm).
        title: text shown above the planes.
        display_size: target pixel size of the largest plane edge; sets the initial zoom
            (integer, at least 1) — 320 draws a 64³ volume at 5 pixels per voxel.
        window: (lo, hi) initial display window (default ``intensity_window``), rounded to the
            window / level sliders' step; "reset window" returns to it.
        affine: (4, 4) voxel → world (mm) matrix of this grid, for the world coordinates shown
            (default: ``spacing_mm`` on the diagonal, origin at voxel 0).

    Attributes:
        widget: the ipywidgets container (a notebook cell evaluating to the viewer shows it).
        sliders: the three ``IntSlider`` (CSS classes ``igrpn-slider`` and ``igrpn-slider-i/j/k``).
        image: the ``Image`` widget (CSS class ``igrpn-slices``); ``events`` its ipyevents.
        window_slider, level_slider, reset_button, zoom: the display controls (CSS classes
            ``igrpn-window``, ``igrpn-level``, ``igrpn-wl-reset``, ``igrpn-zoom``).
        status: the crosshair / cursor readout (``igrpn-status``).
        candidates: ``candidate_table`` of this volume; ``candidate_rows`` its row widgets
            (``igrpn-candidate-row``); ``table`` their container (``igrpn-table``).
        active_axis: the plane the keys step (the one under the mouse last).
        last_render_ms: time of the latest redraw (render + PNG encode), ms.
    """

    def __init__(self, volume, spacing_mm: float = 1.0, gt_landmarks_vox=None, predictions=None,
                 box_mm=config.GT_BOX_MM, title=None, display_size: int = 320, window=None,
                 affine=None):
        where = f"SliceViewer({title or 'volume'})"
        volume = _check_volume(volume, where)
        self.spacing_mm = float(spacing_mm)
        if not self.spacing_mm > 0:
            raise ValueError(f"{where}: spacing_mm must be positive, got {spacing_mm!r}")
        self.shape = volume.shape
        # float32 kept: each redraw windows only the three planes it cuts (render_slices)
        self.volume = volume.astype(np.float32, copy=False)
        self.default_window = tuple(float(v) for v in (window if window is not None else intensity_window(volume)))
        self.affine = self._check_affine(affine, where)
        self.title = title
        self._set_boxes(gt_landmarks_vox, predictions, box_mm, where)
        self.scale = max(1, int(display_size // max(self.shape)))
        self.active_axis = PLANES[0][1]
        self.cursor = None  # (axis, voxel) under the mouse, when known
        self._hold = False
        self.last_render_ms = float("nan")
        self._build_widgets()
        self.refresh()

    # -------------------------------------------------------------- set-up

    def _check_affine(self, affine, where: str) -> np.ndarray:
        if affine is None:
            return np.diag([self.spacing_mm] * 3 + [1.0])
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError(f"{where}: affine must be a finite (4, 4) matrix, got shape {affine.shape}")
        return affine

    def _set_boxes(self, gt_landmarks_vox, predictions, box_mm, where: str) -> None:
        """Ground-truth boxes, answers, other candidates and the candidate table."""
        self.gt_landmarks_vox = None
        self.gt_boxes = np.zeros((0, 6))
        if gt_landmarks_vox is not None:
            self.gt_landmarks_vox = np.asarray(gt_landmarks_vox, dtype=np.float64)
            if self.gt_landmarks_vox.shape != (config.NUM_LANDMARKS, 3):
                raise ValueError(f"{where}: gt_landmarks_vox must be (5, 3), got {self.gt_landmarks_vox.shape}")
            self.gt_boxes = landmark_boxes_vox(self.gt_landmarks_vox, self.spacing_mm, box_mm)
        self.predictions = None
        self.pred_boxes = np.zeros((0, 6))
        self.candidate_boxes = np.zeros((0, 6))
        self.candidate_landmarks = np.zeros(0, int)
        if predictions is not None:
            if not isinstance(predictions, pd.DataFrame):
                raise ValueError(f"{where}: predictions must be a DataFrame, got {type(predictions).__name__}")
            _check_columns(predictions, _PREDICTION_COLUMNS, where)
            self.predictions = predictions.reset_index(drop=True)
            self.pred_boxes, self.candidate_boxes, self.candidate_landmarks = prediction_boxes_vox(
                self.predictions, self.spacing_mm)
        self.candidates = candidate_table(self.gt_landmarks_vox, self.predictions, self.spacing_mm)

    def _build_widgets(self) -> None:
        import ipywidgets as widgets

        start = self._initial_point()
        self.sliders = [self._axis_slider(axis, letter, int(start[axis])) for axis, letter in enumerate("ijk")]
        self._build_display_controls()
        self._build_checkboxes()
        self.jump = widgets.Dropdown(options=self._jump_options(), value=None,
                                     description="jump to", layout=widgets.Layout(width="320px"))
        self.jump.add_class("igrpn-jump")
        self.jump.observe(self._on_jump, names="value")
        self._build_image()
        self.status = widgets.HTML()
        self.status.add_class("igrpn-status")
        self.legend = widgets.HTML(_legend_html())
        self._build_table()
        caption = " | ".join(f"{name} ({AXIS_NAMES[axis]} fixed)" for name, axis in PLANES)
        self.caption = widgets.HTML(
            f"<small>{caption}; first remaining axis to the right, second up. Voxel {self.spacing_mm:g} mm. "
            "Click: move the other planes there · wheel or ↑/↓ (PageUp/PageDown: 5): step the plane "
            "under the mouse · click a table row: go to that box.</small>")
        header = [widgets.HTML(f"<b>{html.escape(str(self.title))}</b>")] if self.title else []
        self.widget = widgets.VBox([
            widgets.HTML(_STYLE), *header,
            widgets.HBox(self.sliders),
            widgets.HBox([self.window_slider, self.level_slider, self.reset_button, self.zoom]),
            widgets.HBox([*self.checkboxes.values(), self.jump]),
            self.image, self.status, self.legend, self.caption, self.table,
        ])
        self.widget.add_class("igrpn-viewer")

    def _axis_slider(self, axis: int, letter: str, value: int):
        import ipywidgets as widgets

        slider = widgets.IntSlider(value=value, min=0, max=self.shape[axis] - 1, description=AXIS_NAMES[axis],
                                   continuous_update=True, layout=widgets.Layout(width="260px"))
        slider.add_class("igrpn-slider")
        slider.add_class(f"igrpn-slider-{letter}")
        slider.observe(self._on_change, names="value")
        return slider

    def _build_display_controls(self) -> None:
        """Window / level sliders (intensity units) with their reset, and the zoom menu."""
        import ipywidgets as widgets

        low, high = float(self.volume.min()), float(self.volume.max())
        step = nice_step(max(high - low, 1e-6) / 500)
        # the browser's slider snaps a value to min + n·step and sends the snapped value back:
        # the ends and the default window sit on that grid, so what is drawn is what is shown
        low, high = np.floor(low / step) * step, np.ceil(high / step) * step
        width, level = (snap(v, step) for v in window_level(*self.default_window))
        width = max(width, step)
        self.default_window = window_range(width, level)
        self.window_slider = widgets.FloatSlider(
            value=width, min=step, max=max(2 * (high - low), width), step=step, description="window",
            readout_format=".3g", continuous_update=True, layout=widgets.Layout(width="260px"))
        self.level_slider = widgets.FloatSlider(
            value=level, min=min(low, level), max=max(high, level), step=step, description="level",
            readout_format=".3g", continuous_update=True, layout=widgets.Layout(width="260px"))
        self.reset_button = widgets.Button(description="reset window", layout=widgets.Layout(width="auto"))
        self.zoom = widgets.Dropdown(options=[(f"{z}×", z) for z in sorted({*ZOOMS, self.scale})],
                                     value=self.scale, description="zoom", layout=widgets.Layout(width="140px"))
        for control, name in ((self.window_slider, "window"), (self.level_slider, "level"),
                              (self.reset_button, "wl-reset"), (self.zoom, "zoom")):
            control.add_class(f"igrpn-{name}")
        self.window_slider.observe(self._on_change, names="value")
        self.level_slider.observe(self._on_change, names="value")
        self.reset_button.on_click(lambda _button: self.reset_window())
        self.zoom.observe(self._on_zoom, names="value")

    def _build_checkboxes(self) -> None:
        import ipywidgets as widgets

        def drawable(boxes):
            return bool(np.isfinite(boxes).all(axis=1).any())

        self.checkboxes = {}
        for key, text, available in (("gt", "ground truth (red, solid)", drawable(self.gt_boxes)),
                                     ("pred", "answer (blue, dashed)", drawable(self.pred_boxes)),
                                     ("candidate", "candidates (cyan, dotted)", drawable(self.candidate_boxes)),
                                     ("labels", "labels", True),
                                     ("crosshair", "crosshair", True)):
            box = widgets.Checkbox(value=available, description=text, disabled=not available,
                                   indent=False, layout=widgets.Layout(width="auto"))
            box.add_class(f"igrpn-show-{key}")
            box.observe(self._on_change, names="value")
            self.checkboxes[key] = box

    def _build_image(self) -> None:
        """The image widget, pinned to the rendered size, and its mouse and key events."""
        import ipywidgets as widgets
        from ipyevents import Event

        self.image = widgets.Image(format="png", layout=widgets.Layout(max_width="none", object_fit="fill"))
        self.image.add_class("igrpn-slices")
        self._pin_image_size()
        # wheel and arrows must not scroll the page while over the image: prevent_default_action
        self.events = Event(source=self.image, watched_events=["click", "wheel", "keydown"],
                            prevent_default_action=True)
        self.events.on_dom_event(self.handle_event)
        # the mouse position only updates a readout and the keys' plane: throttled (ms)
        self.hover_events = Event(source=self.image, watched_events=["mousemove"],
                                  throttle_or_debounce="throttle", wait=100)
        self.hover_events.on_dom_event(self.handle_event)

    def _build_table(self) -> None:
        """The candidate table: a header and one clickable row (ipyevents click) per box."""
        import ipywidgets as widgets
        from ipyevents import Event

        def cells(texts, bold=False):
            tag = "b" if bold else "span"
            return [widgets.HTML(f"<{tag} class='igrpn-cell'>{html.escape(text)}</{tag}>",
                                 layout=widgets.Layout(width=width, margin="0 4px"))
                    for text, (_, width) in zip(texts, _TABLE_COLUMNS)]

        header = widgets.HBox(cells([name for name, _ in _TABLE_COLUMNS], bold=True))
        self.candidate_rows, self._row_events = [], []
        for n, row in self.candidates.iterrows():
            box = widgets.HBox(cells(self._row_texts(row)))
            box.add_class("igrpn-candidate-row")
            box.add_class(f"igrpn-candidate-{n}")
            event = Event(source=box, watched_events=["click"])
            event.on_dom_event(lambda _event, n=n: self.go_to_candidate(n))
            self.candidate_rows.append(box)
            self._row_events.append(event)
        if self.candidate_rows:
            note = widgets.HTML("<small>click a row to move the planes to that box's centre</small>")
            self.table = widgets.VBox([note, header, *self.candidate_rows])
        else:
            self.table = widgets.VBox([widgets.HTML(
                "<small>no ground truth and no predictions: nothing to list</small>")])
        self.table.add_class("igrpn-table")

    @staticmethod
    def _row_texts(row) -> list[str]:
        def number(value, fmt):
            return "–" if pd.isna(value) else format(float(value), fmt)

        return [str(row["#"]), str(row["landmark"]), str(row["kind"]), number(row["rank"], ".0f"),
                number(row["score"], ".3f"), number(row["distance_mm"], ".1f"),
                _format_triple(row[["i", "j", "k"]], ".1f")]

    # -------------------------------------------------------------- constructors

    @classmethod
    def from_case(cls, case, predictions=None, **kwargs) -> "SliceViewer":
        """Viewer of an ``igrpn.data.Case``; ``predictions`` may hold several cases (``case_id``)."""
        spacing = voxel_spacing(case.affine)
        if predictions is not None:
            predictions = _case_rows(predictions, case.case_id)
            if predictions.empty:  # no prediction for this case
                predictions = None
            elif {"x", "y", "z"} <= set(predictions.columns):
                # re-express the centres in this case's grid, whichever volume they were made on
                voxels = _world_to_voxel(predictions[["x", "y", "z"]].to_numpy(dtype=np.float64), case.affine)
                predictions = predictions.assign(i=voxels[:, 0], j=voxels[:, 1], k=voxels[:, 2])
        kwargs.setdefault("title", str(case.case_id))
        kwargs.setdefault("affine", case.affine)
        return cls(case.volume, spacing_mm=float(spacing.mean()), gt_landmarks_vox=case.landmarks_vox,
                   predictions=predictions, **kwargs)

    @classmethod
    def from_nifti(cls, path, spacing_mm: float | None = None, landmarks_mm=None, predictions=None,
                   **kwargs) -> "SliceViewer":
        """Viewer of any NIfTI file, no manifest needed, loaded as the data module loads volumes.

        The volume is reoriented to the closest canonical orientation and resampled to isotropic
        voxels; the crosshair's world coordinates shown are those of the file's affine (mm).

        Args:
            path: ``.nii`` / ``.nii.gz`` file.
            spacing_mm: resample to this isotropic spacing (default: the file's smallest voxel edge).
            landmarks_mm: optional (5, 3) world positions (mm) of the ground truth.
            predictions: optional ``Detector.predict`` rows for this file (their world ``x, y, z``
                are mapped onto the resampled grid).
        """
        import nibabel as nib

        from igrpn.data import prepare_volume

        path = Path(path)
        if not path.exists():
            raise ValueError(f"SliceViewer.from_nifti: {path}: file not found")
        try:
            image = nib.load(str(path))
            data = np.asarray(image.dataobj)
        except Exception as error:  # nibabel raises several types for unreadable files
            raise ValueError(f"SliceViewer.from_nifti: {path}: cannot read NIfTI ({error})") from None
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        affine = np.asarray(image.affine, dtype=np.float64)
        if spacing_mm is None:
            spacing_mm = float(voxel_spacing(affine).min())
        volume, grid_affine = prepare_volume(data, affine, spacing_mm)
        landmarks_vox = None
        if landmarks_mm is not None:
            landmarks_vox = _world_to_voxel(np.asarray(landmarks_mm, dtype=np.float64).reshape(-1, 3),
                                            grid_affine)
        if predictions is not None:
            voxels = _world_to_voxel(predictions[["x", "y", "z"]].to_numpy(dtype=np.float64), grid_affine)
            predictions = predictions.assign(i=voxels[:, 0], j=voxels[:, 1], k=voxels[:, 2])
        kwargs.setdefault("title", path.name)
        return cls(volume, spacing_mm=spacing_mm, gt_landmarks_vox=landmarks_vox,
                   predictions=predictions, affine=grid_affine, **kwargs)

    # -------------------------------------------------------------- state

    def _initial_point(self) -> np.ndarray:
        if self.gt_landmarks_vox is not None:
            centre = np.nanmean(self.gt_landmarks_vox, axis=0)
        elif len(self.pred_boxes) and np.isfinite(self.pred_boxes).any():
            centre = np.nanmean(self.pred_boxes[:, :3], axis=0)
        else:
            centre = (np.asarray(self.shape) - 1) / 2
        return np.clip(np.rint(centre), 0, np.asarray(self.shape) - 1).astype(int)

    @property
    def layout(self) -> PanelLayout:
        """Where the planes lie in the image at the current zoom."""
        return PanelLayout(tuple(self.shape), self.scale)

    def _rendered_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the composed planes (see ``render_slices``)."""
        return self.layout.size

    def _pin_image_size(self) -> None:
        # one image pixel per screen pixel: the browser never resamples (blurs) the voxels
        height, width = self._rendered_size()
        self.image.layout.width, self.image.layout.height = f"{width}px", f"{height}px"

    @property
    def point(self) -> tuple[int, int, int]:
        """The current (i, j, k) of the three planes."""
        return tuple(int(s.value) for s in self.sliders)

    @property
    def window(self) -> tuple[float, float]:
        """The current display range (lo, hi), intensity units."""
        return window_range(self.window_slider.value, self.level_slider.value)

    def world_mm(self, voxel) -> np.ndarray:
        """World position (3,) in mm of a voxel (i, j, k) through the grid's affine."""
        return self.affine[:3, :3] @ np.asarray(voxel, dtype=np.float64) + self.affine[:3, 3]

    @contextlib.contextmanager
    def _one_redraw(self):
        """Change several controls inside the block with a single redraw at its end."""
        self._hold = True
        try:
            yield
        finally:
            self._hold = False
        self.refresh()

    def set_point(self, point_vox) -> None:
        """Move the three planes to a voxel (rounded and clipped), with a single redraw."""
        target = np.clip(np.rint(np.asarray(point_vox, float)), 0, np.asarray(self.shape) - 1).astype(int)
        with self._one_redraw():
            for slider, value in zip(self.sliders, target):
                slider.value = int(value)

    def step(self, axis: int, steps: int) -> None:
        """Move the plane that holds ``axis`` fixed by ``steps`` slices (clipped to the volume)."""
        if steps:
            self.set_point(step_point(self.point, axis, steps, self.shape))

    def set_window(self, lo: float, hi: float) -> None:
        """Show intensities ``lo`` → black and ``hi`` → white (the sliders follow; one redraw)."""
        width, level = window_level(lo, hi)
        with self._one_redraw():
            self.window_slider.value, self.level_slider.value = width, level

    def reset_window(self) -> None:
        """Back to the default window (``window`` argument or ``intensity_window``)."""
        self.set_window(*self.default_window)

    def go_to_candidate(self, n: int) -> None:
        """Move the planes to the centre of row ``n`` of ``candidates``."""
        row = self.candidates.iloc[int(n)]
        self.set_point(row[["i", "j", "k"]].to_numpy(dtype=np.float64))

    def _jump_options(self):
        options = [("choose a landmark…", None)]
        for n, name in enumerate(config.LANDMARKS):
            if self.gt_landmarks_vox is not None:
                options.append((f"{n + 1} {name} (ground truth)", ("gt", n)))
            if len(self.pred_boxes) and np.all(np.isfinite(self.pred_boxes[n])):
                options.append((f"{n + 1} {name} (prediction)", ("pred", n)))
        return options

    # -------------------------------------------------------------- events

    def _on_jump(self, change) -> None:
        if change["new"] is None:
            return
        kind, n = change["new"]
        self.set_point(self.gt_landmarks_vox[n] if kind == "gt" else self.pred_boxes[n, :3])
        self.jump.value = None  # so that picking the same landmark again jumps again

    def _on_change(self, _change=None) -> None:
        if not self._hold:
            self.refresh()

    def _on_zoom(self, change) -> None:
        self.scale = int(change["new"])
        self._pin_image_size()
        self.refresh()

    def handle_event(self, event: dict) -> None:
        """Act on a browser event of the image (an ipyevents message; also callable from tests).

        ``click``: move to the voxel under the mouse; ``wheel``: step the plane under the mouse;
        ``keydown``: step the plane the mouse was over last (``key_step``); ``mousemove``: update
        the cursor readout and that plane. Positions are ``dataX``, ``dataY``: image pixels.
        """
        kind = event.get("event") or event.get("type")
        if kind == "keydown":
            self.step(self.active_axis, key_step(event.get("key")))
            return
        if event.get("dataX") is None or event.get("dataY") is None:
            return
        hit = self.layout.pixel_to_voxel(event["dataX"], event["dataY"], self.point)
        if hit is None:
            return
        axis, voxel = hit
        self.active_axis, self.cursor = axis, (axis, voxel)
        if kind == "click":
            self.set_point(voxel)
        elif kind == "wheel":
            self.step(axis, wheel_step(event.get("deltaY", 0)))
        else:
            self._update_status()

    # -------------------------------------------------------------- drawing

    def _overlays(self) -> list[Overlay]:
        labels = self.checkboxes["labels"].value
        numbers = [str(n + 1) for n in range(config.NUM_LANDMARKS)]
        sets = (("candidate", self.candidate_boxes, [str(n + 1) for n in self.candidate_landmarks]),
                ("gt", self.gt_boxes, numbers), ("pred", self.pred_boxes, numbers))
        return [Overlay(boxes, BOX_COLOURS[kind], LINE_STYLES[kind], names if labels else None,
                        _LABEL_CORNERS[kind])
                for kind, boxes, names in sets if self.checkboxes[kind].value]

    def render(self) -> np.ndarray:
        """The current view as an (H, W, 3) uint8 array (what the image widget shows)."""
        return render_slices(self.volume, self.point, self._overlays(), scale=self.scale,
                             crosshair=self.checkboxes["crosshair"].value, window=self.window)

    def refresh(self) -> None:
        """Redraw the image, the status line and the table's highlight; records ``last_render_ms``."""
        start = time.perf_counter()
        self.image.value = encode_png(self.render())
        self.last_render_ms = (time.perf_counter() - start) * 1e3
        self._update_status()
        self._highlight_rows()

    def _voxel_text(self, voxel) -> str:
        value = self.volume[tuple(int(v) for v in voxel)]
        return (f"voxel (i, j, k) = {tuple(int(v) for v in voxel)} · "
                f"world (x, y, z) = {_format_triple(self.world_mm(voxel), '.1f')} mm · value {value:.3g}")

    def _update_status(self) -> None:
        lo, hi = self.window
        text = f"<b>crosshair</b> {self._voxel_text(self.point)}"
        if self.cursor is not None:
            axis, voxel = self.cursor
            name = next(name for name, fixed in PLANES if fixed == axis)
            text += f"<br><b>mouse</b> ({name}) {self._voxel_text(voxel)}"
        text += f"<br>window [{lo:.3g}, {hi:.3g}] · zoom {self.scale}× · keys step the {self._active_name()} plane"
        self.status.value = f"<span style='font-size:12px;font-family:monospace'>{text}</span>"

    def _active_name(self) -> str:
        return next(name for name, fixed in PLANES if fixed == self.active_axis)

    def _highlight_rows(self) -> None:
        """Mark the table rows whose centre is the crosshair's voxel."""
        if not len(self.candidates):
            return
        centres = np.rint(self.candidates[["i", "j", "k"]].to_numpy(dtype=np.float64))
        here = np.all(centres == np.asarray(self.point), axis=1)
        for row, is_here in zip(self.candidate_rows, here):
            (row.add_class if is_here else row.remove_class)("igrpn-row-here")

    def summary(self) -> pd.DataFrame:
        """Per landmark: the answer's distance and score (``landmark_summary``)."""
        return landmark_summary(self.gt_landmarks_vox, self.predictions, self.spacing_mm)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def display(self) -> None:
        """Show the viewer in the current notebook output."""
        from IPython.display import display

        display(self.widget)


class ManifestBrowser:
    """A split and case picker over a manifest, showing a ``SliceViewer`` of the chosen case.

    Args:
        manifest_path: CSV manifest (DESIGN §3), read with ``igrpn.data.read_manifest``.
        spacing_mm: isotropic spacing cases are loaded at.
        predictions: optional prediction rows (``case_id`` column) or a path to such a CSV.

    Attributes:
        widget: the container; ``viewer``: the current ``SliceViewer``.
    """

    def __init__(self, manifest_path, spacing_mm: float, predictions=None):
        import ipywidgets as widgets

        from igrpn.data import read_manifest

        self.manifest = read_manifest(manifest_path)
        self.spacing_mm = float(spacing_mm)
        if predictions is not None and not isinstance(predictions, pd.DataFrame):
            predictions = pd.read_csv(predictions)
        self.predictions = predictions
        splits = sorted(self.manifest["split"].astype(str).unique())
        self.split = widgets.Dropdown(options=splits, value="test" if "test" in splits else splits[0],
                                      description="split")
        self.case = widgets.Dropdown(options=[], description="case")
        self.split.add_class("igrpn-split")
        self.case.add_class("igrpn-case")
        self.viewer = None
        self.widget = widgets.VBox([widgets.HBox([self.split, self.case]), widgets.HTML("")])
        self.split.observe(self._on_split, names="value")
        self.case.observe(self._on_case, names="value")
        self._on_split()

    def _on_split(self, _change=None) -> None:
        ids = [str(c) for c in self.manifest.loc[self.manifest["split"].astype(str) == self.split.value, "case_id"]]
        self.case.options = ids
        self.case.value = ids[0] if ids else None  # shows the first case (through ``_on_case``)

    def _on_case(self, _change=None) -> None:
        from igrpn.data import load_case

        if self.case.value is None:
            return
        row = self.manifest[self.manifest["case_id"].astype(str) == self.case.value].iloc[0]
        case = load_case(row, self.spacing_mm)
        self.viewer = SliceViewer.from_case(case, predictions=self.predictions)
        self.widget.children = (self.widget.children[0], self.viewer.widget)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def browse_manifest(manifest_path, spacing_mm: float, predictions=None) -> ManifestBrowser:
    """Case picker (split, then case) over a manifest with a ``SliceViewer`` of the chosen case."""
    return ManifestBrowser(manifest_path, spacing_mm, predictions)



# ---------------------------------------------------------------------------- the page in a browser

REPO_ROOT = Path(__file__).resolve().parents[1]
VIEWER_NOTEBOOK = REPO_ROOT / "notebooks" / "viewer.ipynb"
#: Debian's Chromium; Playwright drives it (its own browser download is not used).
CHROMIUM = Path("/usr/lib/chromium/chromium")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--no-first-run")


def _voila_command() -> str | None:
    beside = Path(sys.executable).with_name("voila")
    return str(beside) if beside.exists() else shutil.which("voila")


def browser_missing() -> str | None:
    """Why the viewer page cannot be opened in a browser here (with the fix), or ``None``."""
    if not CHROMIUM.exists():
        return f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright; no browser download needed)"
    if _voila_command() is None:
        return "voila is not installed (pip install voila)"
    if importlib.util.find_spec("ipyevents") is None:
        return "ipyevents is not installed (pip install ipyevents)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    """Return once ``url`` answers over HTTP; ``RuntimeError`` if the server exits or is late."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"voila exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            # in single-notebook mode /api answers 403 and / starts a kernel: ask a static URL,
            # and take any HTTP answer, 404 included, as "up"
            urllib.request.urlopen(f"{url}/voila/static/x", timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"voila did not answer within {timeout_s:.0f} s:\n{log_path.read_text()}")
            time.sleep(0.3)


@contextlib.contextmanager
def serve_voila(notebook, timeout_s: float = 60.0):
    """Serve one notebook with Voilà on a free local port; stop the server and its kernels after.

    Args:
        notebook: the ``.ipynb`` to serve; Voilà's log goes to ``voila.log`` beside it.
        timeout_s: how long to wait for the server to answer (s).

    Yields:
        The base URL (``http://127.0.0.1:PORT``).
    """
    notebook = Path(notebook)
    port = _free_port()
    log_path = notebook.with_name("voila.log")
    with open(log_path, "wb") as log:
        # its own process group, so that stopping the group stops the kernels it started too
        process = subprocess.Popen(
            [_voila_command(), str(notebook), f"--port={port}", "--no-browser", "--Voila.ip=127.0.0.1",
             "--VoilaConfiguration.extension_denylist=['@jupyter-notebook/lab-extension']"],
            cwd=notebook.parent, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "JUPYTER_PLATFORM_DIRS": "1"})
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_for_server(url, process, log_path, timeout_s)
            yield url
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@contextlib.contextmanager
def chromium_page(base_url: str, width: int = 1400, height: int = 1100):
    """A headless Chromium page (Playwright) that may load only from ``base_url``.

    Voilà's page asks a CDN for a font; every other URL is refused so that nothing waits on a
    network this machine may not have.

    Yields:
        A ``playwright.sync_api.Page`` of ``width`` × ``height`` CSS pixels.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_FLAGS))
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base_url)
                       else route.abort())
            yield page
        finally:
            browser.close()


def viewer_notebook(folder, **parameters) -> Path:
    """Write ``notebooks/viewer.ipynb`` with its ``parameters`` cell set (papermill) into ``folder``.

    Paths among the parameters should be absolute: the copy is served from ``folder``.

    Returns:
        The written notebook's path.
    """
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    notebook = parameterize_notebook(load_notebook_node(str(VIEWER_NOTEBOOK)), parameters)
    path = Path(folder) / "viewer.ipynb"
    nbformat.write(notebook, path)
    return path


def open_viewer_page(page, base_url: str, timeout_ms: int = 60_000):
    """Load the served viewer and wait until its image is drawn; returns the image's locator."""
    page.goto(f"{base_url}/", timeout=timeout_ms)
    image = page.locator(".igrpn-slices img, img.igrpn-slices").first
    image.wait_for(state="visible", timeout=timeout_ms)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                           timeout=timeout_ms)
    return image


def save_viewer_screenshot(path, profile: str = "cpu", manifest=None, report_dir="report",
                           method: str = "rpn_ib", split: str = "test", case_index: int = 0,
                           timeout_s: float = 120.0) -> Path | None:
    """Photograph the viewer page (Voilà, headless Chromium) on a volume with its predictions.

    Serves ``notebooks/viewer.ipynb`` with these parameters (the volume: row ``case_index`` of
    ``split`` in ``manifest``, a phantom when it is missing; the predictions:
    ``{report_dir}/predictions/{method}_prior.csv`` when it exists) and saves the viewer widget
    as PNG — what a reader would see, without running it.

    Args:
        path: the PNG to write (its folder is created).
        profile, manifest, report_dir, method, split, case_index: the notebook's parameters
            (``manifest`` default: the committed ``data_manifest.csv``).
        timeout_s: for the server and the page to come up (s).

    Returns:
        ``path``, or ``None`` (with the reason printed) where Chromium, Playwright, Voilà or
        ipyevents is missing or the page did not come up.
    """
    reason = browser_missing()
    if reason:
        print(f"save_viewer_screenshot: skipped: {reason}")
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = Path(manifest) if manifest is not None else REPO_ROOT / "data_manifest.csv"
    with tempfile.TemporaryDirectory(prefix="igrpn-viewer-") as folder:
        notebook = viewer_notebook(folder, profile=profile, manifest=str(manifest.resolve()),
                                   report_dir=str(Path(report_dir).resolve()), method=method,
                                   split=split, case_index=int(case_index))
        try:
            with serve_voila(notebook, timeout_s) as url, chromium_page(url) as page:
                open_viewer_page(page, url, int(timeout_s * 1000))
                widget = page.locator(".igrpn-viewer").first
                # Chromium paints only what the viewport holds: make it as tall as the page
                box = widget.bounding_box()
                page.set_viewport_size({"width": 1400, "height": int(box["y"] + box["height"]) + 40})
                widget.screenshot(path=str(path))
        except Exception as error:  # a page that never came up is reported, not raised: a figure
            print(f"save_viewer_screenshot: failed: {type(error).__name__}: {error}")
            return None
    return path
