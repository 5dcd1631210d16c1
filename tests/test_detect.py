"""Answer selection: the eye pair named by the face's handedness (beyond the paper)."""

import numpy as np
import pandas as pd
import pytest

from igrpn.config import LANDMARKS
from igrpn.detect import PREDICTION_COLUMNS, select_answers
from igrpn.prior import face_handedness

# landmarks in config order: left_eye, middle_eyebrow, right_eye, nose_tip, chin (mm)
FACE = np.array([[16.0, 0.0, 0.0], [0.0, 9.0, 0.0], [-16.0, 0.0, 0.0], [0.0, -24.0, 7.0], [0.0, -52.0, 0.0]])
SIGN = int(np.sign(face_handedness(FACE)))


def candidate_rows(per_landmark):
    """Rows of one volume from ``{landmark index: [(centre (3,), score), ...]}`` (by rank)."""
    records = []
    for index, candidates in per_landmark.items():
        for rank, (centre, score) in enumerate(candidates):
            records.append({"landmark": LANDMARKS[index], "class_id": index + 1, "rank": rank, "selected": False,
                            "score": score, "x": centre[0], "y": centre[1], "z": centre[2],
                            "i": 0.0, "j": 0.0, "k": 0.0, "w": 18.2, "h": 18.2, "d": 18.2})
    return pd.DataFrame.from_records(records, columns=list(PREDICTION_COLUMNS))


def answers(rows):
    chosen = rows[rows["selected"]].set_index("landmark")
    return np.stack([chosen.loc[name, ["x", "y", "z"]].to_numpy(float) for name in LANDMARKS])


def midline(rows_by_index):
    return {1: [(FACE[1], 0.9)], 3: [(FACE[3], 0.9)], 4: [(FACE[4], 0.9)], **rows_by_index}


def test_merged_eye_list_gives_two_places_named_by_handedness():
    # Both eye classes carry the same pooled list (merged scoring): the right eye scores highest.
    pooled = [(FACE[2], 0.95), (FACE[2] + 1.0, 0.94), (FACE[0], 0.9)]
    rows = candidate_rows(midline({0: pooled, 2: pooled}))
    plain = select_answers(rows)  # the paper's rule: rank 0 of each list, both on one eye
    assert np.allclose(answers(plain)[0], answers(plain)[2])
    paired = select_answers(rows, handedness=SIGN, min_pair_distance_mm=9.1)
    assert np.allclose(answers(paired), FACE)  # two places 32 mm apart, named by the sign
    mirrored_sign = select_answers(rows, handedness=-SIGN, min_pair_distance_mm=9.1)
    assert np.allclose(answers(mirrored_sign)[[2, 1, 0, 3, 4]], FACE)  # the other name for each


def test_swapped_eye_answers_are_renamed_for_any_method():
    rows = candidate_rows(midline({0: [(FACE[2], 0.8), (FACE[0], 0.3)], 2: [(FACE[0], 0.7), (FACE[2], 0.6)]}))
    assert np.allclose(answers(select_answers(rows))[[2, 1, 0, 3, 4]], FACE)  # swapped without the step
    fixed = select_answers(rows, handedness=SIGN, min_pair_distance_mm=9.1)
    assert np.allclose(answers(fixed), FACE)
    assert set(fixed["landmark"]) == set(LANDMARKS) and (fixed.groupby("landmark")["selected"].sum() == 1).all()
    assert (fixed["class_id"] == [LANDMARKS.index(n) + 1 for n in fixed["landmark"]]).all()


def test_prior_never_puts_both_eyes_on_one_place():
    from igrpn.prior import GraphPrior

    rng = np.random.default_rng(0)
    faces = FACE * rng.uniform(0.9, 1.1, (40, 1, 1)) + rng.normal(0, 1.0, (40, 5, 3))
    prior = GraphPrior().fit(faces)
    pooled = [(FACE[0], 0.9), (FACE[0] + 0.5, 0.85), (FACE[2], 0.8)]
    rows = candidate_rows(midline({0: pooled, 2: pooled}))
    chosen = answers(select_answers(rows, prior, handedness=SIGN, min_pair_distance_mm=9.1))
    assert np.linalg.norm(chosen[0] - chosen[2]) > 9.1
    assert np.allclose(chosen, FACE, atol=0.6)


@pytest.mark.parametrize("missing", [0, 3])
def test_pairing_tolerates_a_landmark_without_candidates(missing):
    per = midline({0: [(FACE[0], 0.9)], 2: [(FACE[2], 0.9)]})
    per.pop(missing)
    rows = select_answers(candidate_rows(per), handedness=SIGN, min_pair_distance_mm=9.1)
    assert rows["selected"].sum() == 4


def test_pair_without_handedness_still_gives_two_places():
    pooled = [(FACE[2], 0.95), (FACE[2] + 1.0, 0.94), (FACE[0], 0.9)]
    rows = select_answers(candidate_rows(midline({0: pooled, 2: pooled})), min_pair_distance_mm=9.1, pair_eyes=True)
    chosen = answers(rows)
    assert np.allclose(chosen[0], FACE[2]) and np.allclose(chosen[2], FACE[0])  # named by score only
    assert len(rows) == 3 + 3  # each pooled place listed under one eye only


def test_prior_combines_a_merged_pair_as_one_class_of_top_k_places():
    from igrpn.prior import GraphPrior

    rng = np.random.default_rng(0)
    prior = GraphPrior().fit(FACE * rng.uniform(0.9, 1.1, (40, 1, 1)) + rng.normal(0, 0.3, (40, 5, 3)))
    # The pooled eye list: both eyes found (the right one 5 mm off the mean face), then a weak
    # third place where the right eye would fit the mean ratios exactly.
    skewed_right = FACE[2] + [5.0, 0.0, 0.0]
    pooled = [(FACE[0], 1.0), (skewed_right, 0.99), (FACE[2], 0.05)]
    rows = candidate_rows(midline({0: pooled, 2: pooled}))
    every_place = answers(select_answers(rows, prior, handedness=SIGN, min_pair_distance_mm=9.1))
    assert np.allclose(every_place, FACE)  # all three places: the weak one fits better and wins
    top_two = answers(select_answers(rows, prior, handedness=SIGN, min_pair_distance_mm=9.1, class_top_k=2))
    assert np.allclose(top_two[[0, 2]], [FACE[0], skewed_right])  # the class's top 2, as any class's


def test_a_merged_pair_keeps_its_best_pair_when_its_top_k_places_are_one():
    from igrpn.prior import GraphPrior

    rng = np.random.default_rng(1)
    prior = GraphPrior().fit(FACE * rng.uniform(0.9, 1.1, (40, 1, 1)) + rng.normal(0, 0.3, (40, 5, 3)))
    pooled = [(FACE[0], 0.9), (FACE[0] + 1.0, 0.85), (FACE[2], 0.8)]  # the top 2 are one place
    rows = candidate_rows(midline({0: pooled, 2: pooled}))
    chosen = answers(select_answers(rows, prior, handedness=SIGN, min_pair_distance_mm=9.1, class_top_k=2))
    assert np.allclose(chosen, FACE)
