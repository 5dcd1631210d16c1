"""Prediction tables and the figures made from them (paper Fig. 4), and the notebooks' data helpers.

From ``Detector.predict`` rows: their voxel boxes (``prediction_boxes_vox``), each answer's
distance to the ground truth (``selected_distances``), the cases worth showing
(``pick_comparison_cases``, ``worst_cases``), the best of several configurations
(``best_configuration``), and the figures ``plot_prediction_comparison`` (Fig. 4 analogue) and
``plot_worst_cases``. For the notebooks also a manifest's summary tables (``dataset_summary``,
``manifest_landmarks``) and one case to look at, from the manifest or a phantom
(``load_demo_case``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from igrpn import config
from igrpn.data import Case, load_case, prepare_volume, read_manifest
from igrpn.phantom import make_phantom
from igrpn.prior import GraphPrior, edge_lengths
from igrpn.viz.common import (AXIS_NAMES, PLANES, answer_rows, case_rows, check_columns, intensity_window,
                              landmark_boxes_vox, plane_cuts, voxel_spacing, world_to_voxel)
from igrpn.viz.figures import draw_rectangles, face_view, new_axes, plot_mip, plot_planes, prefix_title, zoom_axes

__all__ = [
    "prediction_boxes_vox",
    "manifest_landmarks",
    "selected_distances",
    "pick_comparison_cases",
    "worst_cases",
    "best_configuration",
    "plot_prediction_comparison",
    "plot_worst_cases",
    "dataset_summary",
    "load_demo_case",
]


# ---------------------------------------------------------------------------- prediction tables


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
    check_columns(predictions, ("landmark", "w", "h", "d"), "prediction_boxes_vox")
    if affine is not None and {"x", "y", "z"} <= set(predictions.columns):
        centres = world_to_voxel(predictions[["x", "y", "z"]].to_numpy(dtype=np.float64), affine)
    else:
        check_columns(predictions, ("i", "j", "k"), "prediction_boxes_vox")
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
    check_columns(manifest, ["case_id", *columns], "manifest_landmarks")
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
    check_columns(predictions, ("case_id", "landmark", "score", "x", "y", "z"), "selected_distances")
    check_columns(gt, ("case_id", "landmark", "x", "y", "z"), "selected_distances gt")
    answers = answer_rows(predictions.assign(case_id=predictions["case_id"].astype(str)))
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


# ---------------------------------------------------------------------------- Fig. 4 and the failure gallery


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
    fig, grid = new_axes(len(predictions), 4, size=3.2)
    window = intensity_window(case.volume)
    numbers = [str(n + 1) for n in range(config.NUM_LANDMARKS)]
    axis, _ = face_view(case.landmarks_vox)
    for row, (name, rows) in enumerate(predictions.items()):
        rows = case_rows(rows, case.case_id)
        selected, candidates, candidate_landmark = prediction_boxes_vox(rows, spacing, case.affine)
        alternatives = candidates[candidate_landmark == landmark_index]
        plot_planes(case.volume, point, gt_boxes=gt_boxes, pred_boxes=selected,
                    candidate_boxes=alternatives, labels=numbers, axes=grid[row, :3], window=window)
        plot_mip(case.volume, axis=axis, ax=grid[row, 3], window=window,
                 title=f"MIP along {AXIS_NAMES[axis]}: {config.LANDMARKS[landmark_index]}")
        for kind, boxes in (("candidate", alternatives), ("gt", gt_boxes[[landmark_index]]),
                            ("pred", selected[[landmark_index]])):
            boxes = boxes[np.all(np.isfinite(boxes), axis=1)]
            draw_rectangles(grid[row, 3], plane_cuts(boxes, axis, 0.0)[1], kind)
        distance = np.linalg.norm(selected[landmark_index, :3] - gt_boxes[landmark_index, :3]) * spacing.mean()
        iou = _paired_iou(selected[[landmark_index]], gt_boxes[[landmark_index]])[0]
        prefix_title(grid[row, 0], f"{name} — {config.LANDMARKS[landmark_index]}: "
                                    f"d = {distance:.1f} mm, IoU = {iou:.2f}")
        if crop_mm is not None:
            focus = np.concatenate([case.landmarks_vox, selected[:, :3], alternatives[:, :3]])
            zoom_axes(grid[row], [fixed for _, fixed in PLANES] + [axis], focus,
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
    fig, grid = new_axes(len(cases), 4, size=3.0)
    for row, case in enumerate(cases):
        spacing = voxel_spacing(case.affine)
        gt_box = landmark_boxes_vox(case.landmarks_vox, spacing, box_mm)[[index]]
        rows = case_rows(predictions, case.case_id)
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
            draw_rectangles(grid[row, 3], rect, kind)
        label = f"{case.case_id}"
        if distances is not None:
            match = distances[(distances["case_id"].astype(str) == str(case.case_id))
                              & (distances["landmark"] == landmark)]
            if len(match):
                d, s = match["distance_mm"].iloc[0], match["score"].iloc[0]
                label += f": d = {d:.1f} mm, score = {s:.2f}"
        prefix_title(grid[row, 0], label)
        if crop_mm is not None:
            focus = np.concatenate([case.landmarks_vox, answer[:, :3], candidates[:, :3]])
            zoom_axes(grid[row], [fixed for _, fixed in PLANES] + [axis], focus,
                  crop_mm / float(spacing.mean()), case.volume.shape)
    fig.suptitle(title or f"worst cases for {landmark}: GT red, answer blue, candidates dashed",
                 fontsize=10)
    return fig


# ---------------------------------------------------------------------------- data set summary


def dataset_summary(manifest: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Tables describing a manifest (notebook 00).

    Args:
        manifest: a manifest (docs/design.md §3): ``case_id``, ``split``, the 15 landmark
            columns (world mm) and optionally ``notes`` (``;``-separated tags).

    Returns:
        ``{"splits": volumes per split (and total), "edges_mm": length statistics (mean, std,
        min, max, mm) of the graph's 9 edges per split and over ``"all"``, "notes": count of each ``notes`` tag per
        split (empty without a notes column)}``.
    """
    check_columns(manifest, ["case_id", "split"], "dataset_summary")
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
    if manifest and Path(manifest).exists():
        table = read_manifest(manifest)
        rows = table[table["split"].astype(str) == split] if split else table
        if len(rows) == 0:
            raise ValueError(f"{manifest}: no case in split {split!r}")
        if not 0 <= case_index < len(rows):
            raise ValueError(f"{manifest}: case_index {case_index} out of range (split {split!r} "
                             f"has {len(rows)} cases)")
        row = rows.iloc[case_index]
        if Path(row["image"]).exists():
            return load_case(row, spacing_mm)
    volume, affine, landmarks_mm = make_phantom(phantom_seed, grid=phantom_grid, spacing_mm=phantom_spacing_mm)
    grid_volume, grid_affine = prepare_volume(volume, affine, spacing_mm, name=f"phantom seed {phantom_seed}")
    landmarks_mm = np.asarray(landmarks_mm, dtype=np.float64)
    return Case(case_id=f"phantom_seed{phantom_seed}", volume=grid_volume, affine=grid_affine,
                landmarks_mm=landmarks_mm, landmarks_vox=world_to_voxel(landmarks_mm, grid_affine), split="")
