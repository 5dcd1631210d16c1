"""Matplotlib figures of volumes: three planes through a point, projections, Fig. 1.

``plot_planes`` shows the three scanner planes through a voxel with the boxes each cuts,
``plot_mip`` a projection (MIP or a simple rendering) with landmarks and box outlines,
``plot_case`` the paper's Fig. 1 analogue; ``face_view`` / ``face_plane_names`` /
``project_volume`` give the face's viewing direction and the projections these use. Plane and box
conventions: ``igrpn.viz.common``. The small Axes helpers (``new_axes``, ``draw_rectangles``,
``zoom_axes``, ``prefix_title``) are shared with the other figure modules.

All figures are ``matplotlib.figure.Figure`` objects made without pyplot (nothing is left in
pyplot's global state); Jupyter shows a returned figure inline once ``%matplotlib inline`` is
active, and ``fig.savefig`` works with any backend.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from igrpn import config
from igrpn.viz.common import (AXIS_NAMES, BOX_COLOURS, CROSSHAIR_COLOUR, PLANES, as_boxes, check_point,
                              check_volume, intensity_window, landmark_boxes_vox, plane_cuts, voxel_spacing)

__all__ = [
    "face_view",
    "face_plane_names",
    "project_volume",
    "plot_planes",
    "plot_mip",
    "plot_case",
    "new_axes",
    "draw_rectangles",
    "zoom_axes",
    "prefix_title",
]

#: Matplotlib line style of each kind of box.
_LINESTYLES = {"gt": "-", "pred": "-", "candidate": "--"}


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
    volume = check_volume(volume, "project_volume")
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


def draw_rectangles(ax, rects, kind: str, labels=None) -> None:
    """Add one rectangle patch per (u0, v0, u1, v1) row, with an optional label above it."""
    for n, (u0, v0, u1, v1) in enumerate(rects):
        ax.add_patch(Rectangle((u0, v0), u1 - u0, v1 - v0, fill=False, edgecolor=_mpl_colour(kind),
                               linestyle=_LINESTYLES[kind], linewidth=1.4, gid=f"box-{kind}"))
        if labels is not None and labels[n]:
            ax.text(u0, v1, str(labels[n]), color=_mpl_colour(kind), fontsize=7, fontweight="bold",
                    va="bottom", ha="left", clip_on=True,
                    bbox={"facecolor": "black", "alpha": 0.5, "pad": 0.8, "edgecolor": "none"})


def zoom_axes(axes, fixed_axes, points_vox, margin_vox: float, shape) -> None:
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


def prefix_title(ax, text: str) -> None:
    """Put ``text`` above the Axes' current title (one centred title, no overlap)."""
    ax.set_title(f"{text}\n{ax.get_title()}", fontsize=9)


def new_axes(nrows: int, ncols: int, size: float = 3.6):
    """A new constrained-layout Figure and its (nrows, ncols) grid of Axes, ``size`` inches each."""
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
    volume = check_volume(volume, "plot_planes")
    point = check_point(point_vox, volume.shape, "plot_planes")
    if axes is None:
        fig, grid = new_axes(1, 3)
        axes = list(grid[0])
    else:
        axes = list(np.ravel(axes))
        if len(axes) != 3:
            raise ValueError(f"plot_planes: need 3 axes, got {len(axes)}")
        fig = axes[0].figure
    lo, hi = window if window is not None else intensity_window(volume)
    box_sets = {"candidate": as_boxes(candidate_boxes, "plot_planes candidate_boxes"),
                "gt": as_boxes(gt_boxes, "plot_planes gt_boxes"),
                "pred": as_boxes(pred_boxes, "plot_planes pred_boxes")}
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
            draw_rectangles(ax, rect[cut], kind,
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
    volume = check_volume(volume, "plot_mip")
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
        fig, grid = new_axes(1, 1, size=4.5)
        ax = grid[0, 0]
    fig = ax.figure
    u_axis, v_axis = [a for a in range(3) if a != axis]
    if mode == "mip":  # window the projection itself: its values sit above the volume's
        lo, hi = intensity_window(image, 1.0, 99.8)
    else:
        lo, hi = 0.0, max(float(np.percentile(image, 99.5)), 1e-6)
    ax.imshow(image.T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect="equal",
              interpolation="nearest")
    box_array = as_boxes(boxes, "plot_mip boxes")
    if len(box_array):
        # a box's projection is its extent along the two remaining axes
        finite = np.all(np.isfinite(box_array), axis=1)
        _, rect = plane_cuts(box_array, axis, 0.0)
        draw_rectangles(ax, rect[finite], "gt")
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
    volume = check_volume(case.volume, f"plot_case({case.case_id})")
    spacing = voxel_spacing(case.affine)
    landmarks = np.asarray(case.landmarks_vox, dtype=np.float64)
    gt_boxes = landmark_boxes_vox(landmarks, spacing, box_mm)
    if point_vox is None:
        point_vox = np.clip(np.rint(landmarks.mean(axis=0)), 0, np.asarray(volume.shape) - 1)
    point = check_point(point_vox, volume.shape, f"plot_case({case.case_id})")
    face_names = face_plane_names(landmarks)
    plane_titles = [f"{name}: {AXIS_NAMES[axis]} = {point[axis]} (≈ face {face_names[axis]})"
                    for name, axis in PLANES]
    numbers = [str(n + 1) for n in range(len(landmarks))]
    fig, grid = new_axes(2, 3)
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
        zoom_axes(grid.ravel(), [fixed for _, fixed in PLANES] + [axis] * 3, landmarks,
              crop_mm / float(np.mean(spacing)), volume.shape)
    fig.suptitle(title or f"{case.case_id}", fontsize=10)
    return fig
