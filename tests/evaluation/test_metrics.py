"""Tests of the evaluation metrics (paper §3; docs/design.md §7) against hand-computed answers."""

import math

import numpy as np
import pandas as pd
import pytest

from igrpn.config import GT_BOX_MM, LANDMARKS
from igrpn.evaluation.metrics import (_contributions, _metrics, bootstrap_ci, box_iou_mm, centre_to_corner_mm, evaluate,
                                      paired_bootstrap, per_landmark)

METRIC_KEYS = ["d_mean", "ap", "ap35", "ap50", "ap75", "hit35", "hit50", "hit75", "miou"]


def _gt(n_cases=4, seed=0, edge=None):
    """GT rows for n_cases volumes × 5 landmarks; cubes of GT_BOX_MM (or all ``edge`` mm)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n_cases):
        for i, name in enumerate(LANDMARKS):
            size = GT_BOX_MM[i] if edge is None else edge
            x, y, z = rng.uniform(0, 200, 3)
            rows.append(dict(case_id=f"case{k:02d}", landmark=name, x=x, y=y, z=z,
                             w=size, h=size, d=size))
    return pd.DataFrame(rows)


def _perfect(gt, score=0.9):
    pred = gt.copy()
    pred["score"] = score
    return pred


def test_box_iou_mm_by_hand():
    a = centre_to_corner_mm([[0, 0, 0, 20, 20, 20]])
    np.testing.assert_allclose(a, [[-10, -10, -10, 10, 10, 10]])
    b = centre_to_corner_mm([
        [0, 0, 0, 20, 20, 20],  # same: 1
        [4, 0, 0, 20, 20, 20],  # shifted 4 along x: 16/24
        [0, 0, 0, 10, 10, 10],  # inside: 1000/8000
        [30, 0, 0, 20, 20, 20],  # disjoint: 0
        [10, 10, 10, 20, 20, 20],  # one octant: 1000 / (16000 − 1000)
    ])
    np.testing.assert_allclose(
        box_iou_mm(a, b), [[1.0, 16 / 24, 0.125, 0.0, 1000 / 15000]], rtol=1e-12
    )
    assert box_iou_mm(b, a).shape == (5, 1)


def test_perfect_prediction():
    gt = _gt()
    result = evaluate(_perfect(gt), gt)
    assert result["d_mean"] == 0.0
    for key in ["ap", "ap35", "ap50", "ap75", "hit35", "hit50", "hit75", "miou"]:
        assert result[key] == pytest.approx(1.0), key
    assert result["n_cases"] == 4 and result["n_missing"] == 0 and result["n_gt"] == 20


def test_shifted_prediction_by_hand():
    gt = _gt(edge=20.0)
    pred = _perfect(gt)
    pred["x"] += 4.0  # 20 mm cubes shifted 4 mm along x: IoU = 16 / 24 = 2/3
    result = evaluate(pred, gt)
    assert result["d_mean"] == pytest.approx(4.0)
    assert result["miou"] == pytest.approx(2 / 3)
    assert (result["hit35"], result["hit50"], result["hit75"]) == (1.0, 1.0, 0.0)
    assert (result["ap35"], result["ap50"], result["ap75"]) == (1.0, 1.0, 0.0)
    # every box is a TP at 0.50, 0.55, 0.60, 0.65 and a miss at 0.70 … 0.95: 4 of 10
    assert result["ap"] == pytest.approx(0.4)

    # the paper's eye cube (18.2 mm) shifted 4 mm: IoU = 14.2 / 22.2
    gt = _gt()
    pred = _perfect(gt)
    pred["y"] -= 4.0
    table = per_landmark(pred, gt).set_index("landmark")
    assert table.loc["left_eye", "miou"] == pytest.approx(14.2 / 22.2)
    assert table.loc["chin", "miou"] == pytest.approx(27.2 / 35.2)
    assert table.loc["left_eye", "hit75"] == 0.0 and table.loc["chin", "hit75"] == 1.0
    assert table.loc["chin", "d_median"] == pytest.approx(4.0)
    assert list(table["n"]) == [4] * 5


def test_missing_prediction():
    gt = _gt(n_cases=2)
    pred = _perfect(gt)
    pred = pred[~((pred.case_id == "case01") & (pred.landmark == "chin"))]
    result = evaluate(pred, gt)
    assert result["n_missing"] == 1
    assert result["d_mean"] == 0.0  # over the predicted ones
    assert result["hit50"] == pytest.approx(9 / 10)
    assert result["miou"] == pytest.approx((4 * 1.0 + 0.5) / 5)  # chin: (1 + 0) / 2
    # chin: recall reaches 0.5 at precision 1 → 51 of the 101 recall levels
    assert result["ap50"] == pytest.approx((4 + 51 / 101) / 5)
    table = per_landmark(pred, gt).set_index("landmark")
    assert table.loc["chin", "n_missing"] == 1 and table.loc["chin", "ap50"] == pytest.approx(51 / 101)


def test_second_detection_of_one_gt_is_false_positive():
    gt = _gt(n_cases=2)
    gt = gt[gt.landmark == "left_eye"]
    first, second = _perfect(gt.iloc[[0]], 0.9), _perfect(gt.iloc[[1]], 0.7)
    duplicate = _perfect(gt.iloc[[0]], 0.8)
    duplicate["x"] += 1.0  # also overlaps the GT of case00, but the GT is already matched
    pred = pd.concat([first, duplicate, second])
    result = evaluate(pred, gt)
    # ranked: TP (P 1, R .5), FP (P .5, R .5), TP (P 2/3, R 1); envelope 1 up to R .5, then 2/3
    expected = (51 * 1.0 + 50 * 2 / 3) / 101
    assert result["ap50"] == pytest.approx(expected, rel=1e-12)
    assert result["ap35"] == pytest.approx(expected, rel=1e-12)
    # the final answers are the top-scoring rows: both exact
    assert result["hit75"] == 1.0 and result["d_mean"] == 0.0 and result["n_pred_rows"] == 3
    # ranked last, the duplicate no longer lowers the precision before full recall
    duplicate["score"] = 0.1
    assert evaluate(pd.concat([first, duplicate, second]), gt)["ap50"] == pytest.approx(1.0)


def test_final_answer_is_highest_score():
    gt = _gt(n_cases=1, edge=20.0)
    good = _perfect(gt, 0.6)
    bad = _perfect(gt, 0.9)
    bad["z"] += 100.0
    result = evaluate(pd.concat([good, bad]), gt)
    assert result["d_mean"] == pytest.approx(100.0)
    assert result["hit35"] == 0.0 and result["miou"] == 0.0


def test_bootstrap_ci_contains_estimate():
    gt = _gt(n_cases=12, seed=3)
    rng = np.random.default_rng(4)
    pred = _perfect(gt)
    pred[["x", "y", "z"]] += rng.normal(0, 3, (len(pred), 3))
    pred["score"] = rng.uniform(size=len(pred))
    point = evaluate(pred, gt)
    ci = bootstrap_ci(pred, gt, n_boot=200, seed=1)
    assert set(METRIC_KEYS) <= set(ci)
    for key in METRIC_KEYS:
        lo, hi = ci[key]
        assert lo <= point[key] <= hi, key
    assert ci["d_mean"][0] < ci["d_mean"][1]  # errors vary between cases: a real interval
    assert bootstrap_ci(pred, gt, n_boot=200, seed=1) == ci  # seeded


def test_bootstrap_ci_degenerate_for_constant_error():
    gt = _gt(n_cases=6, edge=20.0)
    pred = _perfect(gt)
    pred["x"] += 4.0
    ci = bootstrap_ci(pred, gt, n_boot=100)
    assert ci["d_mean"] == pytest.approx((4.0, 4.0))
    assert ci["miou"] == pytest.approx((2 / 3, 2 / 3))
    assert ci["hit75"] == (0.0, 0.0) and ci["ap50"] == (1.0, 1.0)
    assert ci["ap"] == pytest.approx((0.4, 0.4))


def test_resample_weights_equal_duplicated_volumes():
    """A volume drawn w times must count like w copies of it (checked against evaluate)."""
    gt = _gt(n_cases=5, seed=7)
    rng = np.random.default_rng(8)
    pred = pd.concat([_perfect(gt), _perfect(gt)])
    pred[["x", "y", "z"]] += rng.normal(0, 4, (len(pred), 3))
    pred["score"] = rng.uniform(size=len(pred))
    contrib = _contributions(pred, gt, (0.35, 0.5, 0.75), None)
    weights = np.array([[2.0, 0.0, 3.0, 1.0, 0.0]])
    weighted = _metrics(contrib, weights)
    copies_pred, copies_gt = [], []
    for k, case in enumerate(contrib.case_ids):
        for copy in range(int(weights[0, k])):
            for table, out in ((pred, copies_pred), (gt, copies_gt)):
                part = table[table.case_id == case].copy()
                part["case_id"] = f"{case}_copy{copy}"
                out.append(part)
    duplicated = evaluate(pd.concat(copies_pred), pd.concat(copies_gt))
    for key in METRIC_KEYS:
        assert weighted[key][0] == pytest.approx(duplicated[key], rel=1e-12), key


def test_paired_bootstrap():
    gt = _gt(n_cases=8, edge=20.0, seed=2)
    rng = np.random.default_rng(5)
    pred_a = _perfect(gt)
    pred_a[["x", "y", "z"]] += rng.normal(0, 2, (len(pred_a), 3))
    same = paired_bootstrap(pred_a, pred_a.copy(), gt, metric="d_mean", n_boot=200)
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "p_value": 1.0}
    # b = a moved a further 3 mm along the error direction of each landmark
    pred_b = pred_a.copy()
    error = pred_a[["x", "y", "z"]].to_numpy() - gt[["x", "y", "z"]].to_numpy()
    unit = error / np.linalg.norm(error, axis=1, keepdims=True)
    pred_b[["x", "y", "z"]] += 3.0 * unit
    result = paired_bootstrap(pred_a, pred_b, gt, metric="d_mean", n_boot=200)
    assert result["diff"] == pytest.approx(3.0)
    assert result["lo"] == pytest.approx(3.0) and result["hi"] == pytest.approx(3.0)
    assert result["p_value"] == 0.0
    with pytest.raises(ValueError, match="unknown metric"):
        paired_bootstrap(pred_a, pred_b, gt, metric="accuracy")


def test_input_errors_name_the_problem():
    gt = _gt(n_cases=2)
    pred = _perfect(gt)
    with pytest.raises(ValueError, match=r"pred: missing columns \['score'\]"):
        evaluate(pred.drop(columns="score"), gt)
    with pytest.raises(ValueError, match="more than one row for case 'case00'"):
        evaluate(pred, pd.concat([gt, gt.iloc[[0]]]))
    stray = pred.copy()
    stray.loc[0, "case_id"] = "ghost"
    with pytest.raises(ValueError, match="ghost"):
        evaluate(stray, gt)
    unknown = pred.copy()
    unknown.loc[0, "landmark"] = "ear"
    with pytest.raises(ValueError, match="ear"):
        evaluate(unknown, gt)
    nan = pred.copy()
    nan.loc[3, "x"] = np.nan
    with pytest.raises(ValueError, match="NaN.*case00"):
        evaluate(nan, gt)


def test_confusion_counts_swapped_eyes_and_far_misses():
    from igrpn.evaluation.metrics import confusion

    gt = pd.DataFrame([
        {"case_id": "a", "landmark": "left_eye", "x": 0.0, "y": 0.0, "z": 0.0, "w": 18.2, "h": 18.2, "d": 18.2},
        {"case_id": "a", "landmark": "right_eye", "x": 30.0, "y": 0.0, "z": 0.0, "w": 18.2, "h": 18.2, "d": 18.2},
        {"case_id": "a", "landmark": "chin", "x": 15.0, "y": -40.0, "z": 0.0, "w": 31.2, "h": 31.2, "d": 31.2},
    ])
    pred = pd.DataFrame([
        {"case_id": "a", "landmark": "left_eye", "score": 0.9, "x": 29.0, "y": 1.0, "z": 0.0},   # on the right eye
        {"case_id": "a", "landmark": "right_eye", "score": 0.8, "x": 31.0, "y": 0.0, "z": 0.0},  # right
        {"case_id": "a", "landmark": "chin", "score": 0.7, "x": 15.0, "y": -100.0, "z": 0.0},    # far from all
    ]).assign(w=20.0, h=20.0, d=20.0)
    table = confusion(pred, gt)
    assert table.loc["left_eye", "right_eye"] == 1 and table.loc["left_eye", "left_eye"] == 0
    assert table.loc["right_eye", "right_eye"] == 1
    assert table.loc["chin", "none"] == 1 and int(table.to_numpy().sum()) == 3


def test_eye_pair_tells_a_swap_from_a_miss():
    from igrpn.evaluation.metrics import eye_pair

    def rows(case, left, right):
        return [{"case_id": case, "landmark": name, "score": 1.0, "x": p[0], "y": p[1], "z": p[2],
                 "w": 18.2, "h": 18.2, "d": 18.2} for name, p in (("left_eye", left), ("right_eye", right))]

    gt = pd.DataFrame(rows("a", (0, 0, 0), (30, 0, 0)) + rows("b", (0, 0, 0), (30, 0, 0))
                      + rows("c", (0, 0, 0), (30, 0, 0)))
    pred = pd.DataFrame(rows("a", (1, 0, 0), (30, 0, 0))      # found, named right (1 mm and 0 mm)
                        + rows("b", (30, 0, 0), (0, 2, 0))    # found, named the wrong way round
                        + rows("c", (0, 40, 0), (30, 0, 0)))  # one eye missed by 40 mm
    result = eye_pair(pred, gt, found_mm=5.0)
    assert result["n_cases"] == 3 and result["found"] == 2 and result["swapped"] == 1
    # as named: a 0.5, b (30 + sqrt(30² + 2²)) / 2, c 20; as a pair: a 0.5, b 1, c 20
    b_named = (30 + math.hypot(30, 2)) / 2
    assert result["named_mm"] == pytest.approx((0.5 + b_named + 20) / 3)
    assert result["pair_mm"] == pytest.approx((0.5 + 1 + 20) / 3)
