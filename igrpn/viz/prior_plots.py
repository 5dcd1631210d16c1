"""Figures of the graph prior (paper Fig. 3): the landmark graph and the distance-ratio histograms."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from igrpn import config
from igrpn.prior import face_frame
from igrpn.viz.figures import new_axes

__all__ = ["plot_prior_graph", "plot_ratio_histograms"]


#: Schematic frontal layout (x to the viewer's right, y up) used when no landmarks are known.
_SCHEMATIC_FACE = np.array([[1.0, 0.55], [0.0, 0.8], [-1.0, 0.55], [0.0, -0.3], [0.0, -1.2]])


def _mean_face_2d(landmarks_mm) -> np.ndarray:
    """(5, 2) frontal layout: the mean face (pose removed) on its two principal axes.

    Orientation: chin→brow up; the fetus's left eye on the viewer's right, as when facing it.
    """
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
        fig, grid = new_axes(1, 1, size=4.2)
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
    fig, grid = new_axes(2, (n_ratios + 1) // 2, size=3.2)
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
