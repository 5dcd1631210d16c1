"""Evaluation metrics of paper §3 (docs/design.md §7): d-mean, hit rates, COCO-style AP and mIoU,
per-landmark tables, and bootstrap confidence intervals over test volumes.

Inputs are pandas tables in world millimetres:

* ``pred`` — rows ``case_id, landmark, score, x, y, z, w, h, d`` (centre form); several rows per
  (case, landmark) are allowed and the highest-scoring one is the *final* answer;
* ``gt`` — rows ``case_id, landmark, x, y, z, w, h, d``, one per (case, landmark).

Definitions (fractions in [0, 1]; the report multiplies by 100):

* ``d_mean`` — mean distance (mm) between the final box centre and the GT landmark, over the
  (case, landmark) pairs that have a prediction (the others are counted in ``n_missing``);
* ``hit<t>`` — fraction of GT (case, landmark) pairs whose final box has IoU ≥ t with the GT box
  (a missing prediction is a miss);
* ``miou`` — mean IoU of the final boxes per landmark (missing = 0), then mean over landmarks;
* ``ap<t>`` — COCO-style AP: per landmark, *all* prediction rows ranked by score across volumes,
  each GT matched at most once (greedy in score order, same case, IoU ≥ t), 101-point
  interpolated precision (monotone envelope), mean over landmarks; ``ap`` = mean over
  t = 0.50:0.05:0.95.

To evaluate a selection that is not the top score (e.g. the graph prior's choice), pass only the
selected rows. Pure numpy + pandas (no torch).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from igrpn.config import LANDMARKS

__all__ = [
    "box_iou_mm",
    "centre_to_corner_mm",
    "evaluate",
    "eye_pair",
    "per_landmark",
    "bootstrap_ci",
    "paired_bootstrap",
    "COCO_THRESHOLDS",
]

#: IoU thresholds 0.50:0.05:0.95 of the COCO-style averaged AP.
COCO_THRESHOLDS: tuple[float, ...] = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2).tolist())
#: 101 recall levels 0:0.01:1 of the interpolated precision.
_RECALL_LEVELS = np.linspace(0.0, 1.0, 101)
#: IoU ≥ t is tested as IoU ≥ t − _IOU_TOL so that rounding does not flip an exact tie.
_IOU_TOL = 1e-9
_BOX_COLUMNS = ["x", "y", "z", "w", "h", "d"]


# ---------------------------------------------------------------------- boxes


def centre_to_corner_mm(boxes) -> np.ndarray:
    """Centre form (x, y, z, w, h, d) to corner form (x0, y0, z0, x1, y1, z1).

    Args:
        boxes: (..., 6) in mm.

    Returns:
        (..., 6) float64 in mm.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    centre, size = boxes[..., :3], boxes[..., 3:]
    return np.concatenate([centre - size / 2, centre + size / 2], axis=-1)


def _iou_broadcast(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of corner-form boxes that broadcast against each other: (..., 6) × (..., 6) → (...)."""
    overlap = np.clip(np.minimum(a[..., 3:], b[..., 3:]) - np.maximum(a[..., :3], b[..., :3]), 0, None)
    intersection = overlap.prod(axis=-1)
    volume_a = (a[..., 3:] - a[..., :3]).prod(axis=-1)
    volume_b = (b[..., 3:] - b[..., :3]).prod(axis=-1)
    union = volume_a + volume_b - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, intersection / union, 0.0)


def box_iou_mm(boxes_a, boxes_b) -> np.ndarray:
    """Pairwise IoU of axis-aligned boxes in world mm (numpy twin of ``boxes.box_iou``).

    Args:
        boxes_a: (N, 6) corner form (x0, y0, z0, x1, y1, z1), mm.
        boxes_b: (M, 6) corner form, mm.

    Returns:
        (N, M) IoU in [0, 1].
    """
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 6)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 6)
    return _iou_broadcast(a[:, None, :], b[None, :, :])


# ---------------------------------------------------------------------- input checks


def _check_table(table: pd.DataFrame, columns: list[str], what: str) -> pd.DataFrame:
    """Validate one input table; returns a copy with a string ``case_id``."""
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"{what}: expected a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{what}: missing columns {missing}")
    table = table[columns].copy()
    table["case_id"] = table["case_id"].astype(str)
    unknown = sorted(set(table["landmark"]) - set(LANDMARKS))
    if unknown:
        raise ValueError(f"{what}: unknown landmark names {unknown}; expected {list(LANDMARKS)}")
    numeric = [c for c in columns if c not in ("case_id", "landmark")]
    values = table[numeric].to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        row = table[bad].iloc[0]
        raise ValueError(
            f"{what}: NaN or inf in case {row['case_id']!r}, landmark {row['landmark']!r}"
        )
    sizes = table[["w", "h", "d"]].to_numpy(dtype=np.float64)
    if (sizes <= 0).any():
        row = table[(sizes <= 0).any(axis=1)].iloc[0]
        raise ValueError(
            f"{what}: box size w, h, d must be positive (case {row['case_id']!r}, "
            f"landmark {row['landmark']!r})"
        )
    return table


def _check_inputs(pred: pd.DataFrame, gt: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    pred = _check_table(pred, ["case_id", "landmark", "score"] + _BOX_COLUMNS, "pred")
    gt = _check_table(gt, ["case_id", "landmark"] + _BOX_COLUMNS, "gt")
    if gt.empty:
        raise ValueError("gt: no ground-truth rows")
    duplicated = gt.duplicated(["case_id", "landmark"])
    if duplicated.any():
        row = gt[duplicated].iloc[0]
        raise ValueError(
            f"gt: more than one row for case {row['case_id']!r}, landmark {row['landmark']!r}"
        )
    extra_cases = sorted(set(pred["case_id"]) - set(gt["case_id"]))
    if extra_cases:
        raise ValueError(f"pred: cases {extra_cases[:5]} have no ground truth")
    return pred, gt


# ---------------------------------------------------------------------- per-case contributions


@dataclass
class _Contributions:
    """Everything the metrics need, as per-case arrays, so that a bootstrap only reweights cases.

    K cases, C landmark classes, T thresholds; R_c ranked prediction rows of class c.
    """

    case_ids: np.ndarray  # (K,) str
    classes: list[str]  # (C,)
    has_gt: np.ndarray  # (K, C) bool
    has_pred: np.ndarray  # (K, C) bool, a final prediction exists (and a GT)
    final_iou: np.ndarray  # (K, C) IoU of the final box with the GT (0 when missing / no GT)
    final_dist: np.ndarray  # (K, C) centre distance in mm (0 when missing / no GT)
    thresholds: np.ndarray  # (T,)
    ranked_case: list[np.ndarray]  # per class: (R_c,) case index of each row, score order
    ranked_tp: list[np.ndarray]  # per class: (T, R_c) bool, row is a true positive at t
    hit_thresholds: tuple[float, ...]
    ap_thresholds: tuple[float, ...]


def _threshold_key(t: float) -> str:
    return f"{int(round(t * 100))}"


def _contributions(pred, gt, iou_thresholds, landmarks) -> _Contributions:
    pred, gt = _check_inputs(pred, gt)
    wanted = list(LANDMARKS if landmarks is None else landmarks)
    unknown = sorted(set(wanted) - set(LANDMARKS))
    if unknown:
        raise ValueError(f"unknown landmark names {unknown}; expected {list(LANDMARKS)}")
    classes = [c for c in wanted if c in set(gt["landmark"])]
    if not classes:
        raise ValueError(f"gt: none of the landmarks {wanted} has a ground truth")
    case_ids = np.array(sorted(set(gt["case_id"])))
    case_index = {c: i for i, c in enumerate(case_ids)}
    class_index = {c: i for i, c in enumerate(classes)}
    n_cases, n_classes = len(case_ids), len(classes)

    gt = gt[gt["landmark"].isin(classes)]
    pred = pred[pred["landmark"].isin(classes)]
    # GT boxes on a (K, C) grid
    gt_k = gt["case_id"].map(case_index).to_numpy()
    gt_c = gt["landmark"].map(class_index).to_numpy()
    has_gt = np.zeros((n_cases, n_classes), bool)
    has_gt[gt_k, gt_c] = True
    gt_boxes = np.zeros((n_cases, n_classes, 6))
    gt_boxes[gt_k, gt_c] = gt[_BOX_COLUMNS].to_numpy(np.float64)
    gt_corners = centre_to_corner_mm(gt_boxes)

    # every prediction row against the GT of its own case and class
    p_k = pred["case_id"].map(case_index).to_numpy()
    p_c = pred["landmark"].map(class_index).to_numpy()
    p_boxes = pred[_BOX_COLUMNS].to_numpy(np.float64)
    p_scores = pred["score"].to_numpy(np.float64)
    row_has_gt = has_gt[p_k, p_c]
    row_iou = np.where(row_has_gt, _iou_broadcast(centre_to_corner_mm(p_boxes), gt_corners[p_k, p_c]), 0.0)
    row_dist = np.linalg.norm(p_boxes[:, :3] - gt_boxes[p_k, p_c, :3], axis=1)

    # final answer per (case, class): the highest-scoring row (first in input order on ties)
    order = np.lexsort((np.arange(len(pred)), -p_scores))
    first = np.unique(p_k[order] * n_classes + p_c[order], return_index=True)[1]
    final_rows = order[first]
    has_pred = np.zeros((n_cases, n_classes), bool)
    final_iou = np.zeros((n_cases, n_classes))
    final_dist = np.zeros((n_cases, n_classes))
    fk, fc = p_k[final_rows], p_c[final_rows]
    keep = row_has_gt[final_rows]
    has_pred[fk[keep], fc[keep]] = True
    final_iou[fk[keep], fc[keep]] = row_iou[final_rows][keep]
    final_dist[fk[keep], fc[keep]] = row_dist[final_rows][keep]

    # AP: per class, rows ranked by score; a row is a TP at t if it is the first row (in score
    # order) of its case with IoU ≥ t — each case holds one GT per class, matched at most once
    thresholds = np.unique(np.round(np.concatenate([COCO_THRESHOLDS, iou_thresholds]), 6))
    ranked_case, ranked_tp = [], []
    for c in range(n_classes):
        rows = order[p_c[order] == c]  # score order (stable)
        cases, ious = p_k[rows], row_iou[rows]
        tp = np.zeros((len(thresholds), len(rows)), bool)
        for t_index, t in enumerate(thresholds):
            above = np.flatnonzero(ious >= t - _IOU_TOL)
            first_above = above[np.unique(cases[above], return_index=True)[1]]
            tp[t_index, first_above] = True
        ranked_case.append(cases)
        ranked_tp.append(tp)
    return _Contributions(
        case_ids=case_ids, classes=classes, has_gt=has_gt, has_pred=has_pred,
        final_iou=final_iou, final_dist=final_dist, thresholds=thresholds,
        ranked_case=ranked_case, ranked_tp=ranked_tp,
        hit_thresholds=tuple(iou_thresholds), ap_thresholds=tuple(iou_thresholds),
    )


# ---------------------------------------------------------------------- metrics from case weights


def _interpolated_ap(tp: np.ndarray, row_weight: np.ndarray, n_gt: np.ndarray) -> np.ndarray:
    """101-point interpolated AP for B weightings of the same ranked rows.

    A case drawn w times by a bootstrap contributes its rows and its GT w times; its copies are
    tied in score and adjacent in the ranking, so weighted cumulative sums give the same
    precision envelope as duplicating them.

    Args:
        tp: (R,) bool, ranked rows that are true positives.
        row_weight: (B, R) weight (case multiplicity) of each row.
        n_gt: (B,) weighted number of GTs of the class.

    Returns:
        (B,) AP; NaN where n_gt = 0.
    """
    n_boot, n_rows = row_weight.shape
    if n_rows == 0:
        return np.where(n_gt > 0, 0.0, np.nan)
    tp_cum = np.cumsum(row_weight * tp, axis=1)
    fp_cum = np.cumsum(row_weight * ~tp, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = tp_cum / n_gt[:, None]
        precision = np.where(tp_cum + fp_cum > 0, tp_cum / (tp_cum + fp_cum), 0.0)
    # monotone envelope: best precision at this or any higher recall
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    # first ranked position reaching each recall level, for all B rows in one searchsorted:
    # offset each row by 2·b so that rows do not interleave (recall ∈ [0, 1])
    offset = 2.0 * np.arange(n_boot)[:, None]
    recall = np.nan_to_num(recall, nan=0.0)
    position = np.searchsorted(
        (recall + offset).ravel(), (_RECALL_LEVELS[None] + offset).ravel() - _IOU_TOL
    ).reshape(n_boot, -1) - np.arange(n_boot)[:, None] * n_rows
    reached = position < n_rows
    values = np.where(reached, np.take_along_axis(envelope, np.minimum(position, n_rows - 1), 1), 0.0)
    return np.where(n_gt > 0, values.mean(axis=1), np.nan)


def _metrics(contrib: _Contributions, weights: np.ndarray) -> dict[str, np.ndarray]:
    """All summary metrics for B weightings of the cases.

    Args:
        weights: (B, K) non-negative case multiplicities (ones for the point estimate).

    Returns:
        dict of (B,) arrays.
    """
    has_gt, has_pred = contrib.has_gt, contrib.has_pred
    out = {}
    n_pred = weights @ has_pred.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["d_mean"] = (weights @ contrib.final_dist.sum(1)) / n_pred
        n_gt_total = weights @ has_gt.sum(1)
        for t in contrib.hit_thresholds:
            hits = (contrib.final_iou >= t - _IOU_TOL) & has_gt
            out[f"hit{_threshold_key(t)}"] = (weights @ hits.sum(1)) / n_gt_total
        per_class_iou = (weights @ contrib.final_iou) / (weights @ has_gt)  # (B, C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from a resample
        out["miou"] = np.nanmean(per_class_iou, axis=1)

    n_gt_class = weights @ has_gt  # (B, C)
    ap = np.full((weights.shape[0], len(contrib.classes), len(contrib.thresholds)), np.nan)
    for c in range(len(contrib.classes)):
        row_weight = weights[:, contrib.ranked_case[c]]
        for t_index in range(len(contrib.thresholds)):
            ap[:, c, t_index] = _interpolated_ap(
                contrib.ranked_tp[c][t_index], row_weight, n_gt_class[:, c]
            )
    with warnings.catch_warnings():
        # a resample may hold no GT of a class at all: its AP is NaN and left out of the mean
        warnings.simplefilter("ignore", RuntimeWarning)
        ap_per_t = np.nanmean(ap, axis=1)  # (B, T)
    coco = np.isin(np.round(contrib.thresholds, 6), np.round(COCO_THRESHOLDS, 6))
    out["ap"] = ap_per_t[:, coco].mean(axis=1)
    for t in contrib.ap_thresholds:
        index = int(np.argmin(np.abs(contrib.thresholds - t)))
        out[f"ap{_threshold_key(t)}"] = ap_per_t[:, index]
    return out


# ---------------------------------------------------------------------- public API


def evaluate(
    pred: pd.DataFrame,
    gt: pd.DataFrame,
    iou_thresholds_ap: Sequence[float] = (0.35, 0.5, 0.75),
    landmarks: Sequence[str] | None = None,
) -> dict:
    """Summary metrics of a method on a test set (paper §3, Table 1).

    Args:
        pred: rows ``case_id, landmark, score, x, y, z, w, h, d`` (mm, centre form).
        gt: rows ``case_id, landmark, x, y, z, w, h, d`` (mm, centre form).
        iou_thresholds_ap: thresholds t of the ``ap<t>`` and ``hit<t>`` keys (t·100 rounded).
        landmarks: classes to evaluate (default: those of ``config.LANDMARKS`` present in gt).

    Returns:
        dict with ``d_mean`` (mm), ``ap`` (mean over 0.50:0.05:0.95), ``ap35``, ``ap50``,
        ``ap75``, ``hit35``, ``hit50``, ``hit75``, ``miou`` (fractions), ``d_median`` (mm),
        ``n_cases``, ``n_gt`` ((case, landmark) pairs), ``n_missing`` (GT pairs without a
        prediction) and ``n_pred_rows``.
    """
    contrib = _contributions(pred, gt, tuple(iou_thresholds_ap), landmarks)
    values = _metrics(contrib, np.ones((1, len(contrib.case_ids))))
    result = {key: float(v[0]) for key, v in values.items()}
    distances = contrib.final_dist[contrib.has_pred]
    result["d_median"] = float(np.median(distances)) if distances.size else float("nan")
    result["n_cases"] = int(len(contrib.case_ids))
    result["n_gt"] = int(contrib.has_gt.sum())
    result["n_missing"] = int((contrib.has_gt & ~contrib.has_pred).sum())
    result["n_pred_rows"] = int(sum(len(c) for c in contrib.ranked_case))
    return result


def per_landmark(
    pred: pd.DataFrame, gt: pd.DataFrame, iou_thresholds: Sequence[float] = (0.35, 0.5, 0.75)
) -> pd.DataFrame:
    """One row per landmark: ``landmark, n, n_missing, d_mean, d_median, hit<t>…, miou, ap50``.

    ``n`` is the number of GT volumes of the landmark; distances in mm, the rest fractions.
    """
    rows = []
    gt_classes = set(_check_table(gt, ["case_id", "landmark"] + _BOX_COLUMNS, "gt")["landmark"])
    for name in [c for c in LANDMARKS if c in gt_classes]:
        thresholds = tuple(iou_thresholds) + ((0.5,) if 0.5 not in iou_thresholds else ())
        result = evaluate(pred, gt, thresholds, landmarks=[name])
        row = {"landmark": name, "n": result["n_gt"], "n_missing": result["n_missing"],
               "d_mean": result["d_mean"], "d_median": result["d_median"]}
        row.update({f"hit{_threshold_key(t)}": result[f"hit{_threshold_key(t)}"]
                    for t in iou_thresholds})
        row["miou"] = result["miou"]
        row["ap50"] = result["ap50"]
        rows.append(row)
    return pd.DataFrame(rows)


def _case_weights(n_cases: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_cases) multiplicities of the cases in n_boot resamples with replacement."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be ≥ 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_cases, size=(n_boot, n_cases))
    # count draws per case in each resample with one bincount (offset row b by b·K)
    flat = (draws + n_cases * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n_cases).reshape(n_boot, n_cases).astype(float)


def _bootstrap_keys(contrib: _Contributions) -> list[str]:
    keys = ["d_mean", "ap"] + [f"ap{_threshold_key(t)}" for t in contrib.ap_thresholds]
    keys += [f"hit{_threshold_key(t)}" for t in contrib.hit_thresholds] + ["miou"]
    return keys


def bootstrap_ci(
    pred: pd.DataFrame,
    gt: pd.DataFrame,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    iou_thresholds_ap: Sequence[float] = (0.35, 0.5, 0.75),
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap (1 − alpha) intervals, resampling test volumes with replacement.

    Each resample draws as many volumes as the test set has; a volume drawn w times counts w
    times in every metric (all its prediction rows and GTs). Keys: ``d_mean, ap, ap35, ap50,
    ap75, hit35, hit50, hit75, miou``; value ``(lo, hi)``.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    contrib = _contributions(pred, gt, tuple(iou_thresholds_ap), None)
    values = _metrics(contrib, _case_weights(len(contrib.case_ids), n_boot, seed))
    result = {}
    for key in _bootstrap_keys(contrib):
        sample = values[key][np.isfinite(values[key])]
        if sample.size == 0:
            result[key] = (float("nan"), float("nan"))
            continue
        lo, hi = np.quantile(sample, [alpha / 2, 1 - alpha / 2])
        result[key] = (float(lo), float(hi))
    return result


def paired_bootstrap(
    pred_a: pd.DataFrame,
    pred_b: pd.DataFrame,
    gt: pd.DataFrame,
    metric: str = "d_mean",
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, float]:
    """Paired bootstrap of the difference ``metric(b) − metric(a)`` on the same resampled volumes.

    Returns:
        dict with ``diff`` (on the full test set), ``lo``/``hi`` (percentile interval of the
        resampled differences) and ``p_value`` — two-sided, 2·min(P(Δ* ≤ 0), P(Δ* ≥ 0)) over the
        resamples, capped at 1 (1 when the methods never differ).
    """
    contrib_a = _contributions(pred_a, gt, (0.35, 0.5, 0.75), None)
    contrib_b = _contributions(pred_b, gt, (0.35, 0.5, 0.75), None)
    keys = _bootstrap_keys(contrib_a)
    if metric not in keys:
        raise ValueError(f"paired_bootstrap: unknown metric {metric!r}; expected one of {keys}")
    full = np.ones((1, len(contrib_a.case_ids)))
    weights = np.concatenate([full, _case_weights(len(contrib_a.case_ids), n_boot, seed)])
    values_a = _metrics(contrib_a, weights)[metric]
    values_b = _metrics(contrib_b, weights)[metric]
    diffs = values_b - values_a
    sample = diffs[1:][np.isfinite(diffs[1:])]
    if sample.size == 0:
        return {"diff": float(diffs[0]), "lo": float("nan"), "hi": float("nan"),
                "p_value": float("nan")}
    lo, hi = np.quantile(sample, [alpha / 2, 1 - alpha / 2])
    p_value = min(1.0, 2.0 * min(np.mean(sample <= 0), np.mean(sample >= 0)))
    return {"diff": float(diffs[0]), "lo": float(lo), "hi": float(hi), "p_value": float(p_value)}


def confusion(pred: pd.DataFrame, gt: pd.DataFrame) -> pd.DataFrame:
    """Which ground-truth landmark each final prediction lands nearest to (failure analysis).

    A left eye predicted on the right eye, or a chin on a hand far from every landmark, shows
    here: rows are the predicted landmark, columns the nearest GT landmark of the same case, plus
    ``none`` when the nearest one is farther than half its GT box edge. Counts.

    Args:
        pred: rows ``case_id, landmark, score, x, y, z`` (the highest-scoring row per case and
            landmark is the answer).
        gt: rows ``case_id, landmark, x, y, z, w`` (mm).

    Returns:
        DataFrame (predicted landmark × nearest GT landmark or ``none``) of counts.
    """
    pred, gt = _check_inputs(pred, gt)
    final = pred.sort_values("score", ascending=False).drop_duplicates(["case_id", "landmark"])
    names = list(dict.fromkeys(gt["landmark"]))
    counts = pd.DataFrame(0, index=pd.Index(names, name="predicted"),
                          columns=pd.Index([*names, "none"], name="nearest ground truth"))
    for case_id, rows in final.groupby("case_id"):
        truth = gt[gt["case_id"] == case_id]
        centres = truth[["x", "y", "z"]].to_numpy(dtype=float)
        points = rows[["x", "y", "z"]].to_numpy(dtype=float)
        distance = np.linalg.norm(points[:, None, :] - centres[None, :, :], axis=-1)  # (P, G)
        nearest = distance.argmin(axis=1)
        for landmark, index, dist in zip(rows["landmark"], nearest, distance[np.arange(len(rows)), nearest]):
            close = dist <= truth["w"].to_numpy(dtype=float)[index] / 2
            counts.loc[landmark, truth["landmark"].iloc[index] if close else "none"] += 1
    return counts


def eye_pair(pred: pd.DataFrame, gt: pd.DataFrame, found_mm: float = 5.0) -> dict:
    """Did a method find the two eyes, and did it name them right? (failure analysis)

    The eye distances of the tables mix two failures: not finding an eye, and finding both but
    calling the left one right. Per case, the mean distance of the two eye answers to their own
    eyes (as named) and to the nearer naming of the two (as a pair) tell them apart.

    Args:
        pred: rows ``case_id, landmark, score, x, y, z, w, h, d`` (the highest-scoring row per
            case and landmark is the answer).
        gt: rows ``case_id, landmark, x, y, z, w, h, d`` (mm).
        found_mm: both eyes count as found when, under the nearer naming, each answer lies
            within this distance of its eye.

    Returns:
        ``{"n_cases", "named_mm" (mean eye distance as named), "pair_mm" (as a pair, the nearer
        naming), "found" (cases with both eyes found), "swapped" (of those, named the wrong way
        round), "found_mm"}``; cases without both eye answers and both eye GTs are left out.
    """
    pred, gt = _check_inputs(pred, gt)
    final = pred.sort_values("score", ascending=False).drop_duplicates(["case_id", "landmark"])
    eyes = ["left_eye", "right_eye"]

    def eye_points(table: pd.DataFrame) -> dict:
        """case -> (2, 3) left and right eye, for the cases that have both."""
        rows = table[table["landmark"].isin(eyes)].set_index(["case_id", "landmark"])[["x", "y", "z"]]
        cases = rows.index.get_level_values(0).unique()
        return {case: rows.loc[[(case, eye) for eye in eyes]].to_numpy(dtype=float)
                for case in cases if all((case, eye) in rows.index for eye in eyes)}

    answers, truths = eye_points(final), eye_points(gt)
    common = sorted(set(answers) & set(truths))
    answer = np.stack([answers[c] for c in common]) if common else np.zeros((0, 2, 3))
    truth = np.stack([truths[c] for c in common]) if common else np.zeros((0, 2, 3))
    as_named = np.linalg.norm(answer - truth, axis=-1)  # (n, 2)
    swapped_names = np.linalg.norm(answer[:, ::-1] - truth, axis=-1)
    swap_nearer = swapped_names.mean(axis=1) < as_named.mean(axis=1)
    as_pair = np.where(swap_nearer[:, None], swapped_names, as_named)
    found = (as_pair <= found_mm).all(axis=1)
    return {"n_cases": len(common), "named_mm": float(as_named.mean()) if len(common) else float("nan"),
            "pair_mm": float(as_pair.mean()) if len(common) else float("nan"),
            "found": int(found.sum()), "swapped": int((found & swap_nearer).sum()), "found_mm": float(found_mm)}
