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

Means: the three planes are composed into one PNG with numpy (``igrpn.viz.render``; a redraw
takes milliseconds) and shown in an ``ipywidgets.Image``; the mouse and keyboard reach Python
through ``ipyevents``, which ships its front end as a JupyterLab / Voilà extension in its wheel
(no download at run time). This module holds the widgets; what they show and how input moves
them is in ``igrpn.viz.viewer_logic``. ``igrpn.viz.browser`` serves the viewer notebook and
photographs it. Also here: the tables the viewer lists (``landmark_summary``,
``candidate_table``) and a case picker over a manifest (``browse_manifest``).

Plane names, axes and box conventions: ``igrpn.viz.common``.
"""

from __future__ import annotations

import contextlib
import html
import time
from pathlib import Path

import numpy as np
import pandas as pd

from igrpn import config
from igrpn.data import load_case, read_manifest
from igrpn.viz.common import (AXIS_NAMES, PLANES, answer_rows, case_rows, check_volume, intensity_window,
                              voxel_spacing, world_to_voxel)
from igrpn.viz.render import PanelLayout, box_overlays, encode_png, render_slices, window_level, window_range
from igrpn.viz.viewer_logic import (STYLE_HTML, TABLE_COLUMNS, ZOOMS, caption_html, check_affine, initial_point,
                                    jump_options, key_step, legend_html, predictions_on_grid, read_nifti_volume,
                                    row_texts, slider_grid, status_html, step_point, viewer_boxes, wheel_step,
                                    world_mm)

# ipywidgets, ipyevents and IPython are imported where a widget is made, so that ``import igrpn.viz``
# (figures, renderer) works without a notebook front end installed.

__all__ = ["landmark_summary", "candidate_table", "SliceViewer", "ManifestBrowser", "browse_manifest"]


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
    answers = answer_rows(predictions).set_index("landmark")
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
        answer_index = set(answer_rows(predictions.assign(_row=np.arange(len(predictions))))["_row"])
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
        volume = check_volume(volume, where)
        self.spacing_mm = float(spacing_mm)
        if not self.spacing_mm > 0:
            raise ValueError(f"{where}: spacing_mm must be positive, got {spacing_mm!r}")
        self.shape = volume.shape
        # float32 kept: each redraw windows only the three planes it cuts (render_slices)
        self.volume = volume.astype(np.float32, copy=False)
        self.default_window = tuple(float(v) for v in (window if window is not None else intensity_window(volume)))
        self.affine = check_affine(affine, self.spacing_mm, where)
        self.title = title
        (self.gt_landmarks_vox, self.gt_boxes, self.predictions, self.pred_boxes, self.candidate_boxes,
         self.candidate_landmarks) = viewer_boxes(gt_landmarks_vox, predictions, self.spacing_mm, box_mm, where)
        self.candidates = candidate_table(self.gt_landmarks_vox, self.predictions, self.spacing_mm)
        self.scale = max(1, int(display_size // max(self.shape)))
        self.active_axis = PLANES[0][1]
        self.cursor = None  # (axis, voxel) under the mouse, when known
        self._hold = False
        self.last_render_ms = float("nan")
        self._build_widgets()
        self.refresh()

    # -------------------------------------------------------------- set-up

    def _build_widgets(self) -> None:
        import ipywidgets as widgets

        start = initial_point(self.gt_landmarks_vox, self.pred_boxes, self.shape)
        self.sliders = [self._axis_slider(axis, letter, int(start[axis])) for axis, letter in enumerate("ijk")]
        self._build_display_controls()
        self._build_checkboxes()
        self.jump = widgets.Dropdown(options=jump_options(self.gt_landmarks_vox, self.pred_boxes), value=None,
                                     description="jump to", layout=widgets.Layout(width="320px"))
        self.jump.add_class("igrpn-jump")
        self.jump.observe(self._on_jump, names="value")
        self._build_image()
        self.status = widgets.HTML()
        self.status.add_class("igrpn-status")
        self.legend = widgets.HTML(legend_html())
        self._build_table()
        self.caption = widgets.HTML(caption_html(self.spacing_mm))
        header = [widgets.HTML(f"<b>{html.escape(str(self.title))}</b>")] if self.title else []
        self.widget = widgets.VBox([
            widgets.HTML(STYLE_HTML), *header,
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

        step, low, high, width, level = slider_grid(float(self.volume.min()), float(self.volume.max()),
                                                    self.default_window)
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
                    for text, (_, width) in zip(texts, TABLE_COLUMNS)]

        header = widgets.HBox(cells([name for name, _ in TABLE_COLUMNS], bold=True))
        self.candidate_rows, self._row_events = [], []
        for n, row in self.candidates.iterrows():
            box = widgets.HBox(cells(row_texts(row)))
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

    # -------------------------------------------------------------- constructors

    @classmethod
    def from_case(cls, case, predictions=None, **kwargs) -> "SliceViewer":
        """Viewer of an ``igrpn.data.Case``; ``predictions`` may hold several cases (``case_id``)."""
        spacing = voxel_spacing(case.affine)
        if predictions is not None:
            predictions = case_rows(predictions, case.case_id)
            if predictions.empty:  # no prediction for this case
                predictions = None
            elif {"x", "y", "z"} <= set(predictions.columns):
                # re-express the centres in this case's grid, whichever volume they were made on
                predictions = predictions_on_grid(predictions, case.affine)
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
        path = Path(path)
        volume, grid_affine, spacing_mm = read_nifti_volume(path, spacing_mm, "SliceViewer.from_nifti")
        landmarks_vox = None
        if landmarks_mm is not None:
            landmarks_vox = world_to_voxel(np.asarray(landmarks_mm, dtype=np.float64).reshape(-1, 3),
                                           grid_affine)
        if predictions is not None:
            predictions = predictions_on_grid(predictions, grid_affine)
        kwargs.setdefault("title", path.name)
        return cls(volume, spacing_mm=spacing_mm, gt_landmarks_vox=landmarks_vox,
                   predictions=predictions, affine=grid_affine, **kwargs)

    # -------------------------------------------------------------- state

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
        return world_mm(self.affine, voxel)

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

    def render(self) -> np.ndarray:
        """The current view as an (H, W, 3) uint8 array (what the image widget shows)."""
        shown = {kind: self.checkboxes[kind].value for kind in ("gt", "pred", "candidate")}
        overlays = box_overlays(self.gt_boxes, self.pred_boxes, self.candidate_boxes, self.candidate_landmarks,
                                shown, self.checkboxes["labels"].value)
        return render_slices(self.volume, self.point, overlays, scale=self.scale,
                             crosshair=self.checkboxes["crosshair"].value, window=self.window)

    def refresh(self) -> None:
        """Redraw the image, the status line and the table's highlight; records ``last_render_ms``."""
        start = time.perf_counter()
        self.image.value = encode_png(self.render())
        self.last_render_ms = (time.perf_counter() - start) * 1e3
        self._update_status()
        self._highlight_rows()

    def _update_status(self) -> None:
        self.status.value = status_html(self.volume, self.affine, self.point, self.cursor, self.window,
                                        self.scale, self.active_axis)

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
        manifest_path: CSV manifest (docs/design.md §3), read with ``igrpn.data.read_manifest``.
        spacing_mm: isotropic spacing cases are loaded at.
        predictions: optional prediction rows (``case_id`` column) or a path to such a CSV.

    Attributes:
        widget: the container; ``viewer``: the current ``SliceViewer``.
    """

    def __init__(self, manifest_path, spacing_mm: float, predictions=None):
        import ipywidgets as widgets

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
