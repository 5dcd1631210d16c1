"""Figures of the paper (Fig. 1, 3, 4) and an interactive slice viewer for 3D volumes.

Planes are named by the array axis they hold fixed, with the RAS+ convention of the data module
(i = x: towards the right, j = y: towards anterior, k = z: towards superior):

* ``sagittal`` — constant i; shows (j, k), j to the right, k up;
* ``coronal`` — constant j; shows (i, k), i to the right, k up;
* ``axial`` — constant k; shows (i, j), i to the right, j up.

These are the scanner's planes. The fetus lies in any pose, so they cut its face obliquely;
``face_plane_names`` says which anatomical plane of the face each one is closest to.

Boxes are centre form ``(x, y, z, w, h, d)`` in voxels of the displayed volume (voxel centres
at integer indices). A box is drawn in a plane only where the plane cuts it. Colours follow the
paper's Fig. 4: ground truth red, prediction blue; alternative candidates dashed (cyan).

All figures are ``matplotlib.figure.Figure`` objects made without pyplot (nothing is left in
pyplot's global state); Jupyter shows a returned figure inline once ``%matplotlib inline`` is
active, and ``fig.savefig`` works with any backend.

The interactive slice viewer (``SliceViewer``, ``browse_manifest``, the numpy renderer and the
browser screenshot) lives in ``igrpn.viewer``; its names are re-exported here on first use, so
``viz.SliceViewer`` keeps working.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from igrpn import config

__all__ = [
    "PLANES",
    "BOX_COLOURS",
    "intensity_window",
    "voxel_spacing",
    "plane_cuts",
    "face_view",
    "face_plane_names",
    "project_volume",
    "plot_planes",
    "plot_mip",
    "plot_case",
    "plot_prior_graph",
    "plot_ratio_histograms",
    "landmark_boxes_vox",
    "prediction_boxes_vox",
    "manifest_landmarks",
    "selected_distances",
    "pick_comparison_cases",
    "worst_cases",
    "best_configuration",
    "plot_prediction_comparison",
    "plot_worst_cases",
    "encode_png",
    "render_slices",
    "landmark_summary",
    "candidate_table",
    "SliceViewer",
    "ManifestBrowser",
    "browse_manifest",
    "save_viewer_screenshot",
    "dataset_summary",
    "load_demo_case",
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
_LINESTYLES = {"gt": "-", "pred": "-", "candidate": "--"}


# ---------------------------------------------------------------------------- checks and units


def _check_volume(volume, where: str) -> np.ndarray:
    """A finite 3D array, or ``ValueError`` naming ``where``."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"{where}: volume must be 3D (X, Y, Z), got shape {volume.shape}")
    if min(volume.shape) < 1:
        raise ValueError(f"{where}: volume is empty, shape {volume.shape}")
    if volume.dtype.kind == "f" and not np.all(np.isfinite(volume)):
        raise ValueError(f"{where}: volume contains NaN or inf")
    return volume


def _check_point(point_vox, shape, where: str) -> np.ndarray:
    """Round a voxel position (3,) to integer indices inside ``shape``; ``ValueError`` otherwise."""
    point = np.asarray(point_vox, dtype=np.float64).reshape(-1)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise ValueError(f"{where}: point_vox must be 3 finite voxel coordinates, got {point_vox!r}")
    index = np.rint(point).astype(int)
    if np.any(index < 0) or np.any(index >= np.asarray(shape)):
        raise ValueError(f"{where}: point_vox {point.tolist()} lies outside the volume {tuple(shape)}")
    return index


def _as_boxes(boxes, where: str) -> np.ndarray:
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


def _world_to_voxel(points_mm: np.ndarray, affine) -> np.ndarray:
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
    boxes = _as_boxes(boxes, "plane_cuts")
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


# ---------------------------------------------------------------------------- face orientation


def _face_axes(landmarks_vox) -> np.ndarray:
    """(3, 3) unit rows: the face's left-right, chin→brow and frontal directions, in voxels."""
    points = np.asarray(landmarks_vox, dtype=np.float64).reshape(-1, 3)
    index = {name: n for n, name in enumerate(config.LANDMARKS)}
    left_right = points[index["left_eye"]] - points[index["right_eye"]]
    up = points[index["middle_eyebrow"]] - points[index["chin"]]
    left_right /= np.linalg.norm(left_right)
    up = up - (up @ left_right) * left_right  # Gram–Schmidt
    up /= np.linalg.norm(up)
    # the nose tip points out of the face: orient the normal towards it
    normal = np.cross(left_right, up)
    if (points[index["nose_tip"]] - points.mean(axis=0)) @ normal < 0:
        normal = -normal
    return np.stack([left_right, up, normal])


def face_view(landmarks_vox) -> tuple[int, int]:
    """The array axis closest to the direction the face looks, and its sign.

    Args:
        landmarks_vox: (5, 3) voxel positions in ``config.LANDMARKS`` order.

    Returns:
        ``(axis, sign)``: looking along ``axis`` from its ``sign`` end (+1: from high indices
        towards low ones) sees the face from the front.
    """
    normal = _face_axes(landmarks_vox)[2]
    axis = int(np.argmax(np.abs(normal)))
    return axis, int(np.sign(normal[axis]) or 1)


def face_plane_names(landmarks_vox) -> dict[int, str]:
    """The anatomical face plane each array plane is closest to.

    The plane of constant axis a is closest to the face's *sagittal* plane when a is most aligned
    with the left-right direction, *transverse* with the chin→brow direction, *coronal* with the
    frontal direction; the three are assigned jointly (best of the 6 permutations).

    Returns:
        ``{array axis: "sagittal" | "transverse" | "coronal"}``.
    """
    alignment = np.abs(_face_axes(landmarks_vox))  # (face direction, array axis)
    names = ("sagittal", "transverse", "coronal")
    permutations = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    best = max(permutations, key=lambda p: sum(alignment[f, p[f]] for f in range(3)))
    return {best[f]: names[f] for f in range(3)}


# ---------------------------------------------------------------------------- projections


def project_volume(volume, axis: int, mode: str = "mip", slab=None, from_high: bool = False,
                   window=None, opacity: float = 0.35) -> np.ndarray:
    """Project a volume along an array axis.

    Args:
        volume: (X, Y, Z).
        axis: the axis projected away.
        mode: ``"mip"`` — maximum intensity; ``"render"`` — a simple emission–absorption
            rendering: each voxel emits its windowed intensity v ∈ [0, 1] and absorbs with
            opacity α = ``opacity``·v², composited front to back, C = Σ vₙ αₙ Πₘ₍ₙ (1 − αₘ).
        slab: optional (start, stop) voxel range along ``axis`` to project (clipped).
        from_high: the rendering's viewer sits at the high-index end of ``axis``.
        window: (lo, hi) for the rendering (default ``intensity_window``).

    Returns:
        (U, V) float32 image over the two remaining axes in increasing axis order.
    """
    volume = _check_volume(volume, "project_volume")
    if mode not in ("mip", "render"):
        raise ValueError(f"project_volume: mode must be 'mip' or 'render', got {mode!r}")
    stack = np.moveaxis(volume, axis, 0)
    if slab is not None:
        start = int(np.clip(np.floor(slab[0]), 0, stack.shape[0] - 1))
        stop = int(np.clip(np.ceil(slab[1]) + 1, start + 1, stack.shape[0]))
        stack = stack[start:stop]
    if mode == "mip":
        return stack.max(axis=0).astype(np.float32)
    lo, hi = window if window is not None else intensity_window(volume)
    emission = np.clip((stack.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
    if from_high:
        emission = emission[::-1]
    alpha = opacity * emission**2
    # transmittance in front of each layer: product of (1 − α) over the layers before it
    transmittance = np.cumprod(1.0 - alpha, axis=0) / (1.0 - alpha)
    return (emission * alpha * transmittance).sum(axis=0).astype(np.float32)


def _face_slab(landmarks_vox, axis: int, spacing_mm, margin_mm: float = 15.0):
    """Voxel range along ``axis`` that holds the landmarks plus a margin (for a clear rendering)."""
    points = np.asarray(landmarks_vox, dtype=np.float64)[:, axis]
    margin = margin_mm / float(np.mean(spacing_mm))
    return float(np.nanmin(points) - margin), float(np.nanmax(points) + margin)


# ---------------------------------------------------------------------------- matplotlib figures


def _mpl_colour(kind: str):
    return tuple(c / 255 for c in BOX_COLOURS[kind])


def _draw_rectangles(ax, rects, kind: str, labels=None) -> None:
    """Add one rectangle patch per (u0, v0, u1, v1) row, with an optional label above it."""
    for n, (u0, v0, u1, v1) in enumerate(rects):
        ax.add_patch(Rectangle((u0, v0), u1 - u0, v1 - v0, fill=False, edgecolor=_mpl_colour(kind),
                               linestyle=_LINESTYLES[kind], linewidth=1.4, gid=f"box-{kind}"))
        if labels is not None and labels[n]:
            ax.text(u0, v1, str(labels[n]), color=_mpl_colour(kind), fontsize=7, fontweight="bold",
                    va="bottom", ha="left", clip_on=True,
                    bbox={"facecolor": "black", "alpha": 0.5, "pad": 0.8, "edgecolor": "none"})


def _zoom(axes, fixed_axes, points_vox, margin_vox: float, shape) -> None:
    """Limit each Axes to the points' extent plus a margin (voxels), inside the volume.

    ``fixed_axes[n]`` is the array axis that ``axes[n]`` does not show (its plane's normal or its
    projection axis); the Axes shows the other two in increasing order.
    """
    points = np.asarray(points_vox, dtype=np.float64).reshape(-1, 3)
    points = points[np.all(np.isfinite(points), axis=1)]
    if len(points) == 0:
        return
    low = np.maximum(points.min(axis=0) - margin_vox, -0.5)
    high = np.minimum(points.max(axis=0) + margin_vox, np.asarray(shape) - 0.5)
    for ax, fixed in zip(axes, fixed_axes):
        u_axis, v_axis = [a for a in range(3) if a != fixed]
        ax.set_xlim(low[u_axis], high[u_axis])
        ax.set_ylim(low[v_axis], high[v_axis])


def _prefix_title(ax, text: str) -> None:
    """Put ``text`` above the Axes' current title (one centred title, no overlap)."""
    ax.set_title(f"{text}\n{ax.get_title()}", fontsize=9)


def _new_axes(nrows: int, ncols: int, size: float = 3.6):
    fig = Figure(figsize=(size * ncols, size * nrows + 0.4), layout="constrained")
    return fig, np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False))


def _label_list(labels, n: int, where: str):
    if labels is None:
        return None
    labels = list(labels)
    if len(labels) != n:
        raise ValueError(f"{where}: {len(labels)} labels for {n} boxes")
    return labels


def plot_planes(volume, point_vox, gt_boxes=None, pred_boxes=None, candidate_boxes=None,
                labels=None, title=None, axes=None, *, candidate_labels=None, window=None,
                plane_titles=None, crosshair: bool = True) -> Figure:
    """The three orthogonal planes through a point, with the boxes each plane cuts.

    Args:
        volume: (X, Y, Z), isotropic voxels (shown with equal aspect).
        point_vox: (3,) voxel position the planes pass through (rounded to the nearest voxel).
        gt_boxes, pred_boxes, candidate_boxes: (n, 6) centre-form voxel boxes, drawn red, blue
            and dashed cyan, each only in the planes that cut it.
        labels: one text per row of ``gt_boxes`` and of ``pred_boxes`` (they share the landmark
            order), drawn beside the box.
        title: figure title.
        axes: three matplotlib Axes to draw into (default: a new 1 × 3 figure).
        candidate_labels: one text per candidate box.
        window: (lo, hi) display window (default ``intensity_window``).
        plane_titles: three titles replacing the default "sagittal: i (x) = 40".
        crosshair: draw the other two planes' positions as thin lines.

    Returns:
        The Figure holding the axes.
    """
    volume = _check_volume(volume, "plot_planes")
    point = _check_point(point_vox, volume.shape, "plot_planes")
    if axes is None:
        fig, grid = _new_axes(1, 3)
        axes = list(grid[0])
    else:
        axes = list(np.ravel(axes))
        if len(axes) != 3:
            raise ValueError(f"plot_planes: need 3 axes, got {len(axes)}")
        fig = axes[0].figure
    lo, hi = window if window is not None else intensity_window(volume)
    box_sets = {"candidate": _as_boxes(candidate_boxes, "plot_planes candidate_boxes"),
                "gt": _as_boxes(gt_boxes, "plot_planes gt_boxes"),
                "pred": _as_boxes(pred_boxes, "plot_planes pred_boxes")}
    label_sets = {"candidate": _label_list(candidate_labels, len(box_sets["candidate"]), "plot_planes"),
                  "gt": _label_list(labels, len(box_sets["gt"]), "plot_planes") if len(box_sets["gt"]) else None,
                  "pred": _label_list(labels, len(box_sets["pred"]), "plot_planes") if len(box_sets["pred"]) else None}
    for n, (ax, (name, axis)) in enumerate(zip(axes, PLANES)):
        u_axis, v_axis = [a for a in range(3) if a != axis]
        image = np.take(volume, point[axis], axis=axis)  # (U, V)
        ax.imshow(image.T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect="equal",
                  interpolation="nearest")
        for kind, boxes in box_sets.items():
            cut, rect = plane_cuts(boxes, axis, point[axis])
            kind_labels = label_sets[kind]
            _draw_rectangles(ax, rect[cut], kind,
                             None if kind_labels is None else [kind_labels[i] for i in np.flatnonzero(cut)])
        if crosshair:
            ax.axvline(point[u_axis], color=tuple(c / 255 for c in CROSSHAIR_COLOUR), lw=0.5, alpha=0.5)
            ax.axhline(point[v_axis], color=tuple(c / 255 for c in CROSSHAIR_COLOUR), lw=0.5, alpha=0.5)
        ax.set_xlim(-0.5, volume.shape[u_axis] - 0.5)
        ax.set_ylim(-0.5, volume.shape[v_axis] - 0.5)
        ax.set_title(plane_titles[n] if plane_titles else f"{name}: {AXIS_NAMES[axis]} = {point[axis]}",
                     fontsize=9)
        ax.set_xlabel(AXIS_NAMES[u_axis], fontsize=8)
        ax.set_ylabel(AXIS_NAMES[v_axis], fontsize=8)
        ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_mip(volume, landmarks_vox=None, axis=None, *, mode: str = "mip", boxes=None, slab=None,
             from_high=None, title=None, ax=None, window=None, show_landmarks: bool = True) -> Figure:
    """A projection of the whole volume (MIP or a simple rendering) with landmarks and boxes.

    Args:
        volume: (X, Y, Z), isotropic voxels.
        landmarks_vox: optional (5, 3) voxel positions, drawn as numbered points 1–5 (paper's
            node numbers) projected along ``axis``.
        axis: the array axis projected away. Default: the one the face looks along when the
            landmarks are given (``face_view``), else 1 (j).
        mode: ``"mip"`` or ``"render"`` (see ``project_volume``).
        boxes: optional (n, 6) centre-form voxel boxes, drawn (red) as their projections.
        slab: (start, stop) voxel range along ``axis`` to project.
        from_high: for ``"render"``, view from the high-index end (default: from the side the
            face looks towards, when the landmarks are given).
        title, ax: figure title, Axes to draw into.
        window: (lo, hi) intensity window of the rendering (the MIP is windowed on itself).

    Returns:
        The Figure.
    """
    volume = _check_volume(volume, "plot_mip")
    landmarks = None
    if landmarks_vox is not None:
        landmarks = np.asarray(landmarks_vox, dtype=np.float64).reshape(-1, 3)
    if axis is None:
        axis, sign = face_view(landmarks) if landmarks is not None and len(landmarks) == 5 else (1, 1)
        from_high = (sign > 0) if from_high is None else from_high
    if axis not in (0, 1, 2):
        raise ValueError(f"plot_mip: axis must be 0, 1 or 2, got {axis!r}")
    image = project_volume(volume, axis, mode=mode, slab=slab, from_high=bool(from_high),
                           window=window)
    if ax is None:
        fig, grid = _new_axes(1, 1, size=4.5)
        ax = grid[0, 0]
    fig = ax.figure
    u_axis, v_axis = [a for a in range(3) if a != axis]
    if mode == "mip":  # window the projection itself: its values sit above the volume's
        lo, hi = intensity_window(image, 1.0, 99.8)
    else:
        lo, hi = 0.0, max(float(np.percentile(image, 99.5)), 1e-6)
    ax.imshow(image.T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect="equal",
              interpolation="nearest")
    box_array = _as_boxes(boxes, "plot_mip boxes")
    if len(box_array):
        # a box's projection is its extent along the two remaining axes
        finite = np.all(np.isfinite(box_array), axis=1)
        _, rect = plane_cuts(box_array, axis, 0.0)
        _draw_rectangles(ax, rect[finite], "gt")
    if landmarks is not None and show_landmarks:
        ax.scatter(landmarks[:, u_axis], landmarks[:, v_axis], s=22, c=[_mpl_colour("gt")],
                   edgecolors="white", linewidths=0.6, zorder=3)
        for n, (u, v) in enumerate(landmarks[:, [u_axis, v_axis]]):
            ax.annotate(str(n + 1), (u, v), xytext=(4, 4), textcoords="offset points",
                        color="yellow", fontsize=8, fontweight="bold")
    ax.set_xlim(-0.5, volume.shape[u_axis] - 0.5)
    ax.set_ylim(-0.5, volume.shape[v_axis] - 0.5)
    ax.set_xlabel(AXIS_NAMES[u_axis], fontsize=8)
    ax.set_ylabel(AXIS_NAMES[v_axis], fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title or f"{'MIP' if mode == 'mip' else 'rendering'} along {AXIS_NAMES[axis]}",
                 fontsize=9)
    return fig


def plot_case(case, pred_boxes=None, candidate_boxes=None, box_mm=config.GT_BOX_MM,
              point_vox=None, title=None, crop_mm: float | None = 40.0) -> Figure:
    """Fig. 1 analogue: three planes through the face, a rendering, the landmarks and the boxes.

    Row 1: sagittal / coronal / axial array planes through ``point_vox`` (default: the voxel
    nearest the landmarks' centroid) with the five landmark-centred boxes the planes cut (red),
    titled with the face plane each is closest to. Row 2 (seen from the front of the face, over
    the slab holding the landmarks): a MIP, a rendering with the landmarks numbered 1–5, and the
    rendering with the five boxes projected.

    Args:
        case: an ``igrpn.data.Case`` (``volume``, ``affine``, ``landmarks_vox``, ``case_id``).
        pred_boxes, candidate_boxes: optional (n, 6) voxel boxes to add to the planes.
        box_mm: ground-truth cube edge per landmark (mm); the default is the paper's 14³ / 24³
            voxels at 1.3 mm, divided here by the case's spacing.
        point_vox: (3,) voxel the planes pass through.
        title: figure title (default: the case id).
        crop_mm: show only the landmarks' bounding box plus this margin (mm); ``None``: the
            whole volume.

    Returns:
        The Figure (2 × 3 axes).
    """
    volume = _check_volume(case.volume, f"plot_case({case.case_id})")
    spacing = voxel_spacing(case.affine)
    landmarks = np.asarray(case.landmarks_vox, dtype=np.float64)
    gt_boxes = landmark_boxes_vox(landmarks, spacing, box_mm)
    if point_vox is None:
        point_vox = np.clip(np.rint(landmarks.mean(axis=0)), 0, np.asarray(volume.shape) - 1)
    point = _check_point(point_vox, volume.shape, f"plot_case({case.case_id})")
    face_names = face_plane_names(landmarks)
    plane_titles = [f"{name}: {AXIS_NAMES[axis]} = {point[axis]} (≈ face {face_names[axis]})"
                    for name, axis in PLANES]
    numbers = [str(n + 1) for n in range(len(landmarks))]
    fig, grid = _new_axes(2, 3)
    window = intensity_window(volume)
    plot_planes(volume, point, gt_boxes=gt_boxes, pred_boxes=pred_boxes,
                candidate_boxes=candidate_boxes, labels=numbers if pred_boxes is None else None,
                axes=grid[0], window=window, plane_titles=plane_titles)
    axis, sign = face_view(landmarks)
    slab = _face_slab(landmarks, axis, spacing)
    plot_mip(volume, axis=axis, slab=slab, ax=grid[1, 0], window=window,
             title=f"MIP along {AXIS_NAMES[axis]} (face slab)")
    plot_mip(volume, landmarks, axis=axis, mode="render", slab=slab, from_high=sign > 0,
             ax=grid[1, 1], window=window, title="rendering + 5 landmarks")
    plot_mip(volume, landmarks, axis=axis, mode="render", slab=slab, from_high=sign > 0,
             boxes=gt_boxes, ax=grid[1, 2], window=window, show_landmarks=False,
             title="5 landmark-centred boxes")
    if crop_mm is not None:  # zoom every panel on the face
        _zoom(grid.ravel(), [fixed for _, fixed in PLANES] + [axis] * 3, landmarks,
              crop_mm / float(np.mean(spacing)), volume.shape)
    fig.suptitle(title or f"{case.case_id}", fontsize=10)
    return fig


# ---------------------------------------------------------------------------- Fig. 3: graph prior


#: Schematic frontal layout (x to the viewer's right, y up) used when no landmarks are known.
_SCHEMATIC_FACE = np.array([[1.0, 0.55], [0.0, 0.8], [-1.0, 0.55], [0.0, -0.3], [0.0, -1.2]])


def _mean_face_2d(landmarks_mm) -> np.ndarray:
    """(5, 2) frontal layout: the mean face (pose removed) on its two principal axes.

    Orientation: chin→brow up; the fetus's left eye on the viewer's right, as when facing it.
    """
    from igrpn.prior import face_frame

    points = np.asarray(landmarks_mm, dtype=np.float64)
    if points.shape[-2:] != (5, 3):
        raise ValueError(f"plot_prior_graph: landmarks_mm must be (N, 5, 3) or (5, 3), got {points.shape}")
    mean_face = face_frame(points.reshape(-1, 5, 3)).mean(axis=0)
    centred = mean_face - mean_face.mean(axis=0)
    # principal axes of the mean face (rows of vt), the plane of largest spread
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return _orient_frontal(centred @ vt[:2].T)


def _orient_frontal(xy: np.ndarray) -> np.ndarray:
    """Rotate/flip a (5, 2) layout so the brow is above the chin and the left eye on the right."""
    index = {name: n for n, name in enumerate(config.LANDMARKS)}
    up = xy[index["middle_eyebrow"]] - xy[index["chin"]]
    angle = np.arctan2(up[0], up[1])  # rotate ``up`` onto +y
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    xy = xy @ rotation.T
    if xy[index["left_eye"], 0] < xy[index["right_eye"], 0]:
        xy[:, 0] = -xy[:, 0]
    return xy


def plot_prior_graph(prior, landmarks_mm=None, ax=None) -> Figure:
    """Fig. 3(a): the landmark graph — 5 nodes numbered as the paper, the prior's 9 edges.

    Nodes sit at the mean face of ``landmarks_mm`` (pose removed by ``prior.face_frame``,
    projected on its two principal axes; seen from the front, so the fetus's left eye, node 1, is
    on the viewer's right); without landmarks at the prior's fitted ``mean_face_mm`` when it has
    one, else at a fixed schematic layout. Edges used by the symmetric (left–right) ratios are
    orange, the others green.

    Args:
        prior: a ``GraphPrior`` (class or instance; only ``EDGES``/``RATIO_*`` and
            ``mean_face_mm`` are read).
        landmarks_mm: optional (N, 5, 3) or (5, 3) landmark sets (mm).
        ax: Axes to draw into (default: a new figure).

    Returns:
        The Figure.
    """
    if landmarks_mm is not None:
        xy = _mean_face_2d(landmarks_mm)
    elif getattr(prior, "mean_face_mm", None) is not None and not isinstance(prior, type):
        xy = _mean_face_2d(np.asarray(prior.mean_face_mm)[None])
    else:
        xy = _SCHEMATIC_FACE.copy()
    if ax is None:
        fig, grid = _new_axes(1, 1, size=4.2)
        ax = grid[0, 0]
    fig = ax.figure
    index = {name: n for n, name in enumerate(config.LANDMARKS)}
    symmetric_edges = {edge for kind, pair in zip(prior.RATIO_KINDS, prior.RATIO_EDGES)
                       if kind == "symmetric" for edge in pair}
    for a, b in prior.EDGES:
        colour = "tab:orange" if f"{a}-{b}" in symmetric_edges else "tab:green"
        (ia, ib) = index[a], index[b]
        ax.plot(xy[[ia, ib], 0], xy[[ia, ib], 1], color=colour, lw=2, zorder=1)
    ax.scatter(xy[:, 0], xy[:, 1], s=420, c="white", edgecolors="black", linewidths=1.5, zorder=2)
    for n, (x, y) in enumerate(xy):
        ax.text(x, y, str(n + 1), ha="center", va="center", fontsize=11, fontweight="bold", zorder=3)
        ax.annotate(config.LANDMARKS[n].replace("_", " "), (x, y), xytext=(0, -19),
                    textcoords="offset points", ha="center", fontsize=7, color="0.3")
    ax.plot([], [], color="tab:orange", lw=2, label="symmetric ratios (left vs right)")
    ax.plot([], [], color="tab:green", lw=2, label="asymmetric ratios")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, -0.22), fontsize=7, frameon=False, ncol=2)
    ax.set_aspect("equal")
    ax.margins(0.2)
    ax.set_axis_off()
    ax.set_title(f"landmark graph: {len(xy)} nodes, {len(prior.EDGES)} edges", fontsize=9)
    return fig


def plot_ratio_histograms(prior, ratios, bins: int = 20) -> Figure:
    """Fig. 3(b–d): histogram of each distance ratio with its fitted normal curve (red).

    Args:
        prior: a fitted ``GraphPrior`` (``mu``, ``sigma``, ``RATIO_LABELS``).
        ratios: (N, 6) ratio values (``prior.ratios(landmarks)``), e.g. of the training split.
        bins: histogram bins.

    Returns:
        The Figure (2 × 3 axes, one per ratio).
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    n_ratios = len(prior.RATIO_NAMES)
    if ratios.ndim != 2 or ratios.shape[1] != n_ratios:
        raise ValueError(f"plot_ratio_histograms: ratios must be (N, {n_ratios}), got {ratios.shape}")
    if getattr(prior, "mu", None) is None or getattr(prior, "sigma", None) is None:
        raise ValueError("plot_ratio_histograms: the prior is not fitted (no mu/sigma)")
    fig, grid = _new_axes(2, (n_ratios + 1) // 2, size=3.2)
    for n, ax in enumerate(grid.ravel()):
        if n >= n_ratios:
            ax.set_axis_off()
            continue
        values = ratios[:, n][np.isfinite(ratios[:, n])]
        mu, sigma = float(prior.mu[n]), float(prior.sigma[n])
        # one range for the bins and the curve: the data and µ ± 4σ
        x = np.linspace(min(values.min(), mu - 4 * sigma), max(values.max(), mu + 4 * sigma), 200)
        ax.hist(values, bins=bins, range=(x[0], x[-1]), density=True, color="0.7", edgecolor="white")
        ax.plot(x, np.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi)),
                color="red", lw=1.8)
        ax.set_title(prior.RATIO_LABELS[n], fontsize=8)
        ax.text(0.02, 0.97, f"µ = {mu:.3f}\nσ = {sigma:.3f}\nn = {len(values)}",
                transform=ax.transAxes, va="top", fontsize=7)
        ax.tick_params(labelsize=7)
    fig.suptitle("distance ratios on the training landmarks, with the fitted normal (red)", fontsize=9)
    return fig


# ---------------------------------------------------------------------------- predictions tables


def _check_columns(frame: pd.DataFrame, columns, where: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{where}: missing columns {missing} (have {list(frame.columns)})")


def _answers(predictions: pd.DataFrame) -> pd.DataFrame:
    """The answer row per (case, landmark): the ``selected`` row, else the highest score."""
    keys = [c for c in ("case_id", "landmark") if c in predictions.columns]
    if "selected" in predictions.columns:
        chosen = predictions[predictions["selected"].astype(bool)]
    else:
        chosen = predictions.sort_values("score", ascending=False)
    return chosen.drop_duplicates(keys).reset_index(drop=True)


def prediction_boxes_vox(predictions: pd.DataFrame, spacing_mm, affine=None):
    """Centre-form voxel boxes of one volume's prediction rows.

    Args:
        predictions: rows of ``Detector.predict`` for one volume (``landmark``, ``score``,
            ``selected``, ``i, j, k`` voxels or ``x, y, z`` world mm, ``w, h, d`` mm).
        spacing_mm: voxel size (mm), scalar or (3,).
        affine: when given (and ``x, y, z`` exist), centres come from world mm through its
            inverse — the voxel grid of the displayed volume; otherwise from ``i, j, k``.

    Returns:
        ``(selected (5, 6), candidates (m, 6), candidate_landmarks (m,) int)`` — selected boxes
        in ``config.LANDMARKS`` order (NaN rows where a landmark has no answer) and the other
        candidates with their landmark index.
    """
    _check_columns(predictions, ("landmark", "w", "h", "d"), "prediction_boxes_vox")
    if affine is not None and {"x", "y", "z"} <= set(predictions.columns):
        centres = _world_to_voxel(predictions[["x", "y", "z"]].to_numpy(dtype=np.float64), affine)
    else:
        _check_columns(predictions, ("i", "j", "k"), "prediction_boxes_vox")
        centres = predictions[["i", "j", "k"]].to_numpy(dtype=np.float64)
    sizes = predictions[["w", "h", "d"]].to_numpy(dtype=np.float64) / np.asarray(spacing_mm, dtype=np.float64)
    boxes = np.concatenate([centres, sizes], axis=1)
    landmark_index = predictions["landmark"].map({n: i for i, n in enumerate(config.LANDMARKS)})
    if landmark_index.isna().any():
        unknown = sorted(set(predictions["landmark"][landmark_index.isna()]))
        raise ValueError(f"prediction_boxes_vox: unknown landmark names {unknown}")
    landmark_index = landmark_index.to_numpy(dtype=int)
    if "selected" in predictions.columns:
        is_selected = predictions["selected"].astype(bool).to_numpy()
    else:  # the highest-scoring row of each landmark is the answer
        order = np.lexsort((-predictions["score"].to_numpy(), landmark_index))
        first = np.r_[True, landmark_index[order][1:] != landmark_index[order][:-1]]
        is_selected = np.zeros(len(predictions), bool)
        is_selected[order[first]] = True
    selected = np.full((config.NUM_LANDMARKS, 6), np.nan)
    selected[landmark_index[is_selected]] = boxes[is_selected]
    return selected, boxes[~is_selected], landmark_index[~is_selected]


def manifest_landmarks(manifest: pd.DataFrame) -> pd.DataFrame:
    """Long table of the manifest's landmarks: ``case_id, landmark, x, y, z`` (world mm)."""
    columns = [f"{name}_{axis}" for name in config.LANDMARKS for axis in "xyz"]
    _check_columns(manifest, ["case_id", *columns], "manifest_landmarks")
    values = manifest[columns].to_numpy(dtype=np.float64).reshape(len(manifest), -1, 3)
    return pd.DataFrame({
        "case_id": np.repeat(manifest["case_id"].astype(str).to_numpy(), config.NUM_LANDMARKS),
        "landmark": np.tile(config.LANDMARKS, len(manifest)),
        "x": values[..., 0].ravel(), "y": values[..., 1].ravel(), "z": values[..., 2].ravel(),
    })


def selected_distances(predictions: pd.DataFrame, gt: pd.DataFrame) -> pd.DataFrame:
    """Distance (mm) between each answer and its ground truth.

    Args:
        predictions: rows with ``case_id, landmark, score, x, y, z`` (world mm); the
            ``selected`` row (else the highest score) of each case and landmark is the answer.
        gt: rows ``case_id, landmark, x, y, z`` (world mm), e.g. ``manifest_landmarks``.

    Returns:
        One row per GT landmark: ``case_id, landmark, distance_mm`` (NaN when there is no answer),
        ``score``, ``x, y, z`` of the answer.
    """
    _check_columns(predictions, ("case_id", "landmark", "score", "x", "y", "z"), "selected_distances")
    _check_columns(gt, ("case_id", "landmark", "x", "y", "z"), "selected_distances gt")
    answers = _answers(predictions.assign(case_id=predictions["case_id"].astype(str)))
    truth = gt[["case_id", "landmark", "x", "y", "z"]].assign(case_id=gt["case_id"].astype(str))
    merged = truth.merge(answers[["case_id", "landmark", "score", "x", "y", "z"]],
                         on=["case_id", "landmark"], how="left", suffixes=("_gt", ""))
    delta = merged[["x", "y", "z"]].to_numpy(float) - merged[["x_gt", "y_gt", "z_gt"]].to_numpy(float)
    merged["distance_mm"] = np.linalg.norm(delta, axis=1)
    return merged[["case_id", "landmark", "distance_mm", "score", "x", "y", "z"]]


def pick_comparison_cases(distances_a: pd.DataFrame, distances_b: pd.DataFrame, n_cases: int,
                          tolerance_mm: float = 1e-6) -> pd.DataFrame:
    """Cases for a before/after figure (Fig. 4): where method b changed an answer of method a.

    For each case, the landmark whose distance changed most is kept; cases where an answer
    changed come first, by largest improvement (distance a − distance b) first; unchanged cases
    fill up the list (so a figure can always be drawn).

    Args:
        distances_a, distances_b: ``selected_distances`` outputs (e.g. without / with the prior).
        n_cases: how many cases to return.

    Returns:
        ``n_cases`` rows (fewer if fewer cases): ``case_id, landmark, distance_a, distance_b,
        improvement_mm, changed``.
    """
    keys = ["case_id", "landmark"]
    both = distances_a[keys + ["distance_mm"]].merge(
        distances_b[keys + ["distance_mm"]], on=keys, suffixes=("_a", "_b"))
    both = both.rename(columns={"distance_mm_a": "distance_a", "distance_mm_b": "distance_b"})
    both["improvement_mm"] = both["distance_a"] - both["distance_b"]
    both["changed"] = both["improvement_mm"].abs().fillna(0.0) > tolerance_mm
    # the landmark with the largest change in each case represents it
    both["abs_change"] = both["improvement_mm"].abs().fillna(0.0)
    per_case = both.sort_values(["abs_change", "landmark"], ascending=[False, True]).drop_duplicates("case_id")
    per_case = per_case.sort_values(["changed", "improvement_mm", "case_id"],
                                    ascending=[False, False, True], na_position="last")
    return per_case.drop(columns="abs_change").head(n_cases).reset_index(drop=True)


def worst_cases(distances: pd.DataFrame, n_worst: int) -> pd.DataFrame:
    """The ``n_worst`` largest distances per landmark (missing answers count as worst).

    Returns:
        Rows of ``distances`` sorted by landmark (``config.LANDMARKS`` order), then distance
        descending, with a ``rank`` column (0 = worst).
    """
    order = {name: n for n, name in enumerate(config.LANDMARKS)}
    frame = distances.assign(_order=distances["landmark"].map(order),
                             _key=distances["distance_mm"].fillna(np.inf))
    frame = frame.sort_values(["_order", "_key", "case_id"], ascending=[True, False, True])
    frame = frame.groupby("landmark", sort=False).head(n_worst)
    frame["rank"] = frame.groupby("landmark", sort=False).cumcount()
    return frame.drop(columns=["_order", "_key"]).reset_index(drop=True)


def best_configuration(prediction_files, gt: pd.DataFrame):
    """The prediction file with the lowest mean distance (d-mean, mm).

    Args:
        prediction_files: ``{name: path or DataFrame}`` (e.g. ``{"rpn_ib_prior": ...}``).
        gt: rows ``case_id, landmark, x, y, z`` (world mm).

    Returns:
        ``(best name, DataFrame name / d_mean_mm / n_missing sorted by d_mean_mm)``. A missing
        answer is left out of the mean and counted in ``n_missing``.
    """
    if not prediction_files:
        raise ValueError("best_configuration: no prediction files given")
    records = []
    for name, source in prediction_files.items():
        frame = source if isinstance(source, pd.DataFrame) else pd.read_csv(source)
        distances = selected_distances(frame, gt)
        records.append({"name": name, "d_mean_mm": float(distances["distance_mm"].mean()),
                        "n_missing": int(distances["distance_mm"].isna().sum())})
    table = pd.DataFrame.from_records(records).sort_values(["d_mean_mm", "name"]).reset_index(drop=True)
    return str(table.loc[0, "name"]), table


def _case_rows(predictions: pd.DataFrame, case_id: str) -> pd.DataFrame:
    if "case_id" not in predictions.columns:
        return predictions
    return predictions[predictions["case_id"].astype(str) == str(case_id)]


def _paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of centre-form boxes a[n] and b[n] (NaN where either is missing)."""
    lo = np.maximum(a[:, :3] - a[:, 3:] / 2, b[:, :3] - b[:, 3:] / 2)
    hi = np.minimum(a[:, :3] + a[:, 3:] / 2, b[:, :3] + b[:, 3:] / 2)
    intersection = np.clip(hi - lo, 0, None).prod(axis=1)
    union = a[:, 3:].prod(axis=1) + b[:, 3:].prod(axis=1) - intersection
    return intersection / union


def plot_prediction_comparison(case, predictions: dict, landmark=None, box_mm=config.GT_BOX_MM,
                               title=None, crop_mm: float | None = 30.0) -> Figure:
    """Fig. 4 analogue: one volume under several methods, one row of panels per method.

    The three planes pass through the ground truth of ``landmark`` (default: the first
    landmark). Each row draws the five GT boxes (red) and that method's five answers (blue),
    numbered 1–5, and ``landmark``'s other candidates (dashed) — the alternatives the prior
    chooses among — where the planes cut them; a fourth panel, a MIP along the axis the face
    looks, shows ``landmark``'s boxes projected, so an answer far from the planes is seen too.
    The row title gives ``landmark``'s distance and IoU.

    Args:
        case: an ``igrpn.data.Case``.
        predictions: ``{row title: prediction rows}`` (rows of several cases allowed: filtered by
            ``case_id``).
        landmark: the landmark name (or index) to centre on.
        box_mm: GT cube edge per landmark (mm).
        title: figure title.
        crop_mm: zoom on the landmarks and ``landmark``'s boxes plus this margin (mm); ``None``:
            the whole volume.

    Returns:
        The Figure (len(predictions) × 4 axes).
    """
    if not predictions:
        raise ValueError("plot_prediction_comparison: no predictions given")
    landmark_index = (config.LANDMARKS.index(landmark) if isinstance(landmark, str)
                      else int(landmark or 0))
    spacing = voxel_spacing(case.affine)
    gt_boxes = landmark_boxes_vox(case.landmarks_vox, spacing, box_mm)
    point = case.landmarks_vox[landmark_index]
    fig, grid = _new_axes(len(predictions), 4, size=3.2)
    window = intensity_window(case.volume)
    numbers = [str(n + 1) for n in range(config.NUM_LANDMARKS)]
    axis, _ = face_view(case.landmarks_vox)
    for row, (name, rows) in enumerate(predictions.items()):
        rows = _case_rows(rows, case.case_id)
        selected, candidates, candidate_landmark = prediction_boxes_vox(rows, spacing, case.affine)
        alternatives = candidates[candidate_landmark == landmark_index]
        plot_planes(case.volume, point, gt_boxes=gt_boxes, pred_boxes=selected,
                    candidate_boxes=alternatives, labels=numbers, axes=grid[row, :3], window=window)
        plot_mip(case.volume, axis=axis, ax=grid[row, 3], window=window,
                 title=f"MIP along {AXIS_NAMES[axis]}: {config.LANDMARKS[landmark_index]}")
        for kind, boxes in (("candidate", alternatives), ("gt", gt_boxes[[landmark_index]]),
                            ("pred", selected[[landmark_index]])):
            boxes = boxes[np.all(np.isfinite(boxes), axis=1)]
            _draw_rectangles(grid[row, 3], plane_cuts(boxes, axis, 0.0)[1], kind)
        distance = np.linalg.norm(selected[landmark_index, :3] - gt_boxes[landmark_index, :3]) * spacing.mean()
        iou = _paired_iou(selected[[landmark_index]], gt_boxes[[landmark_index]])[0]
        _prefix_title(grid[row, 0], f"{name} — {config.LANDMARKS[landmark_index]}: "
                                    f"d = {distance:.1f} mm, IoU = {iou:.2f}")
        if crop_mm is not None:
            focus = np.concatenate([case.landmarks_vox, selected[:, :3], alternatives[:, :3]])
            _zoom(grid[row], [fixed for _, fixed in PLANES] + [axis], focus,
                  crop_mm / float(spacing.mean()), case.volume.shape)
    fig.suptitle(title or f"{case.case_id}: GT red, prediction blue, candidates dashed", fontsize=10)
    return fig


def plot_worst_cases(cases, predictions: pd.DataFrame, landmark, distances: pd.DataFrame | None = None,
                     box_mm=config.GT_BOX_MM, title=None, crop_mm: float | None = 30.0) -> Figure:
    """Failure gallery: one row per case, planes through the GT of ``landmark`` plus a MIP.

    Columns 1–3: the three planes through the landmark's ground truth with its GT box (red), the
    answer (blue) and the other candidates (dashed) of that landmark. Column 4: a MIP along the
    axis the face looks with the projections of those boxes, so a far-away answer is still seen.

    Args:
        cases: the ``Case`` objects, in row order.
        predictions: prediction rows of these cases (``case_id`` column).
        landmark: landmark name.
        distances: optional ``selected_distances`` rows, for the row titles.
        box_mm, title: GT cube edges (mm), figure title.
        crop_mm: zoom on the face and the boxes plus this margin (mm); ``None``: whole volume.

    Returns:
        The Figure (len(cases) × 4 axes).
    """
    if not cases:
        raise ValueError("plot_worst_cases: no cases given")
    index = config.LANDMARKS.index(landmark)
    fig, grid = _new_axes(len(cases), 4, size=3.0)
    for row, case in enumerate(cases):
        spacing = voxel_spacing(case.affine)
        gt_box = landmark_boxes_vox(case.landmarks_vox, spacing, box_mm)[[index]]
        rows = _case_rows(predictions, case.case_id)
        rows = rows[rows["landmark"] == landmark]
        selected, candidates, _ = prediction_boxes_vox(rows, spacing, case.affine)
        answer = selected[[index]]
        window = intensity_window(case.volume)
        plot_planes(case.volume, case.landmarks_vox[index], gt_boxes=gt_box, pred_boxes=answer,
                    candidate_boxes=candidates, axes=grid[row, :3], window=window)
        axis, _ = face_view(case.landmarks_vox)
        plot_mip(case.volume, axis=axis, ax=grid[row, 3], window=window,
                 title=f"MIP along {AXIS_NAMES[axis]}")
        for kind, boxes in (("candidate", candidates), ("gt", gt_box), ("pred", answer)):
            boxes = boxes[np.all(np.isfinite(boxes), axis=1)]
            _, rect = plane_cuts(boxes, axis, 0.0)
            _draw_rectangles(grid[row, 3], rect, kind)
        label = f"{case.case_id}"
        if distances is not None:
            match = distances[(distances["case_id"].astype(str) == str(case.case_id))
                              & (distances["landmark"] == landmark)]
            if len(match):
                d, s = match["distance_mm"].iloc[0], match["score"].iloc[0]
                label += f": d = {d:.1f} mm, score = {s:.2f}"
        _prefix_title(grid[row, 0], label)
        if crop_mm is not None:
            focus = np.concatenate([case.landmarks_vox, answer[:, :3], candidates[:, :3]])
            _zoom(grid[row], [fixed for _, fixed in PLANES] + [axis], focus,
                  crop_mm / float(spacing.mean()), case.volume.shape)
    fig.suptitle(title or f"worst cases for {landmark}: GT red, answer blue, candidates dashed",
                 fontsize=10)
    return fig


# ---------------------------------------------------------------------------- data set summary


def dataset_summary(manifest: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Tables describing a manifest (notebook 00).

    Args:
        manifest: a manifest (DESIGN §3): ``case_id``, ``split``, the 15 landmark columns (world
            mm) and optionally ``notes`` (``;``-separated tags).

    Returns:
        ``{"splits": volumes per split (and total), "edges_mm": length statistics (mean, std,
        min, max, mm) of the graph's 9 edges per split and over ``"all"``, "notes": count of each ``notes`` tag per
        split (empty without a notes column)}``.
    """
    from igrpn.prior import GraphPrior, edge_lengths

    _check_columns(manifest, ["case_id", "split"], "dataset_summary")
    splits = manifest["split"].astype(str)
    counts = splits.value_counts().rename_axis("split").rename("volumes").to_frame()
    counts.loc["total"] = len(manifest)
    long = manifest_landmarks(manifest)
    points = long[["x", "y", "z"]].to_numpy(dtype=np.float64).reshape(len(manifest), -1, 3)
    lengths = pd.DataFrame(edge_lengths(points, GraphPrior.EDGE_INDEX), columns=GraphPrior.EDGE_NAMES)
    lengths["split"] = splits.to_numpy()
    # every volume once more under split "all", for the overall statistics
    lengths = pd.concat([lengths, lengths.assign(split="all")], ignore_index=True)
    edges = (lengths.melt(id_vars="split", var_name="edge", value_name="mm")
             .groupby(["edge", "split"], sort=False)["mm"].agg(["mean", "std", "min", "max"]))
    notes = pd.DataFrame(columns=["split", "tag", "volumes"])
    if "notes" in manifest.columns:
        tags = (manifest.assign(split=splits, tag=manifest["notes"].fillna("").astype(str).str.split(";"))
                .explode("tag"))
        tags["tag"] = tags["tag"].str.strip()
        tags = tags[tags["tag"] != ""]
        notes = tags.groupby(["tag", "split"]).size().rename("volumes").reset_index()
    return {"splits": counts, "edges_mm": edges, "notes": notes}


def load_demo_case(manifest=None, spacing_mm: float = 2.6, case_index: int = 0, split: str = "test",
                   phantom_seed: int = 0, phantom_grid: int = 64, phantom_spacing_mm: float = 2.6):
    """One case to look at: row ``case_index`` of ``split`` in the manifest, or a phantom.

    When ``manifest`` is ``None``/empty, does not exist, or its image file is missing, a synthetic
    volume is made on the fly with ``igrpn.phantom.make_phantom(phantom_seed, phantom_grid,
    phantom_spacing_mm)`` (the default 64³ at 2.6 mm takes a fraction of a second) and prepared
    like any other volume (``igrpn.data.prepare_volume``).

    Returns:
        An ``igrpn.data.Case`` on the ``spacing_mm`` grid.
    """
    from igrpn import data

    if manifest and Path(manifest).exists():
        table = data.read_manifest(manifest)
        rows = table[table["split"].astype(str) == split] if split else table
        if len(rows) == 0:
            raise ValueError(f"{manifest}: no case in split {split!r}")
        if not 0 <= case_index < len(rows):
            raise ValueError(f"{manifest}: case_index {case_index} out of range (split {split!r} "
                             f"has {len(rows)} cases)")
        row = rows.iloc[case_index]
        if Path(row["image"]).exists():
            return data.load_case(row, spacing_mm)
    from igrpn.phantom import make_phantom

    volume, affine, landmarks_mm = make_phantom(phantom_seed, grid=phantom_grid, spacing_mm=phantom_spacing_mm)
    grid_volume, grid_affine = data.prepare_volume(volume, affine, spacing_mm,
                                                   name=f"phantom seed {phantom_seed}")
    landmarks_mm = np.asarray(landmarks_mm, dtype=np.float64)
    return data.Case(case_id=f"phantom_seed{phantom_seed}", volume=grid_volume, affine=grid_affine,
                     landmarks_mm=landmarks_mm, landmarks_vox=data.world_to_voxel(landmarks_mm, grid_affine),
                     split="")


# ---------------------------------------------------------------------------- the viewer, re-exported

#: Names of ``igrpn.viewer`` that this module has always offered (or offers for convenience).
_VIEWER_NAMES = frozenset({"encode_png", "render_slices", "landmark_summary", "candidate_table",
                           "SliceViewer", "ManifestBrowser", "browse_manifest", "save_viewer_screenshot"})


def __getattr__(name: str):
    # imported on first use: igrpn.viewer imports this module's helpers, so importing it at the
    # top would be circular
    if name in _VIEWER_NAMES:
        from igrpn import viewer

        return getattr(viewer, name)
    raise AttributeError(f"module 'igrpn.viz' has no attribute {name!r}")
