"""The slice viewer's renderer: three planes and their boxes composed into one RGB image with numpy.

``render_slices`` cuts the three planes through a voxel, maps intensities to grey with a window
(``apply_window``; ``window_level`` / ``window_range`` convert to and from width and level),
enlarges every voxel to a block of pixels (``PanelLayout`` says where each lands) and draws the
boxes a plane cuts (``Overlay``: colour, line style, digit labels) at display resolution;
``encode_png`` makes PNG bytes of the result without an imaging library. A redraw costs three
small planes, so the viewer can redraw on every mouse event. Plane and box conventions:
``igrpn.viz.common``.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from igrpn import config
from igrpn.viz.common import BOX_COLOURS, CROSSHAIR_COLOUR, PLANES, plane_cuts

__all__ = [
    "LINE_STYLES",
    "DASHES",
    "window_level",
    "window_range",
    "apply_window",
    "PanelLayout",
    "encode_png",
    "Overlay",
    "render_slices",
    "box_overlays",
]

#: Line style of each kind of box in the viewer, so that kinds differ by more than colour.
LINE_STYLES: dict[str, str] = {"gt": "solid", "pred": "dashed", "candidate": "dotted"}
#: (on, off) run lengths in pixels of each line style; (0, 0) draws a solid line.
DASHES: dict[str, tuple[int, int]] = {"solid": (0, 0), "dashed": (8, 4), "dotted": (2, 3)}
#: Where each kind's number is written beside its box, so that the labels of a GT box and of the
#: answer on top of it do not overlap.
_LABEL_CORNERS = {"gt": "top-left", "pred": "bottom-right", "candidate": "bottom-left"}


# ---------------------------------------------------------------------------- window / level and layout


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
    on, off = DASHES[style]
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
    if isinstance(style, (bool, np.bool_)):  # a (boxes, colour, dashed) tuple: True draws dashes
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


def box_overlays(gt_boxes, pred_boxes, candidate_boxes, candidate_landmarks, shown, labels: bool) -> list[Overlay]:
    """The viewer's overlays in drawing order: other candidates, ground truth, answers on top.

    Each kind has its colour (``BOX_COLOURS``), line style (``LINE_STYLES``) and label corner.

    Args:
        gt_boxes, pred_boxes: (5, 6) centre-form voxel boxes in landmark order (or (0, 6)).
        candidate_boxes: (m, 6) other candidates; ``candidate_landmarks`` (m,) their landmark index.
        shown: ``{"gt" | "pred" | "candidate": bool}``, the kinds to draw.
        labels: write each box's landmark number (1–5) beside it.
    """
    numbers = [str(n + 1) for n in range(config.NUM_LANDMARKS)]
    sets = (("candidate", candidate_boxes, [str(n + 1) for n in candidate_landmarks]),
            ("gt", gt_boxes, numbers), ("pred", pred_boxes, numbers))
    return [Overlay(boxes, BOX_COLOURS[kind], LINE_STYLES[kind], names if labels else None,
                    _LABEL_CORNERS[kind])
            for kind, boxes, names in sets if shown[kind]]
