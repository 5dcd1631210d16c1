"""benchmarks.prior_gate: the gated graph prior and the confident-answer filter (analysis code)."""

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# benchmarks/ and the sibling test module are folders of the repository, not of the package.
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from benchmarks.prior_gate import GatedPrior, confident_kept  # noqa: E402
from igrpn.detect import select_answers  # noqa: E402
from igrpn.prior import GraphPrior  # noqa: E402
from test_detect import FACE, answers, candidate_rows  # noqa: E402


class _NoPairing:
    @staticmethod
    def pairing():
        return {}


def _faces(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return FACE * rng.uniform(0.8, 1.2, (n, 1, 1)) + rng.normal(0.0, 1.0, (n, 5, 3))


# candidate 0 of each landmark (score 0.9): the face with every landmark 1.5 mm off along its own
# axis; candidate 1 (score 0.4): the mean-like face itself, a better fit of the mean ratios
OFFSETS = np.array([[1.5, 0, 0], [0, -1.5, 0], [0, 0, 1.5], [-1.5, 0, 0], [0, 1.5, 0]])
ROWS = candidate_rows({c: [(FACE[c] + OFFSETS[c], 0.9), (FACE[c], 0.4)] for c in range(5)})


def test_paper_rule_swaps_a_confident_plausible_face_and_the_gate_keeps_it():
    prior = GraphPrior().fit(_faces())
    assert np.allclose(answers(select_answers(ROWS, prior)), FACE)  # the paper: the better fit wins
    largest = prior.log_penalty(_faces()).max()
    assert np.allclose(answers(select_answers(ROWS, GatedPrior(prior, largest))), FACE + OFFSETS)
    # a gate below every combination's penalty leaves the paper's choice
    assert np.allclose(answers(select_answers(ROWS, GatedPrior(prior, -1e9))), FACE)


def test_confident_kept_leaves_the_prior_only_the_unsure_landmarks():
    prior = GraphPrior().fit(_faces())
    unsure_chin = ROWS.copy()
    unsure_chin.loc[unsure_chin["landmark"] == "chin", "score"] = [0.3, 0.2]
    kept = confident_kept(unsure_chin, _NoPairing(), min_score=0.5)
    assert kept.groupby("landmark").size().to_dict() == {"chin": 2, "left_eye": 1, "middle_eyebrow": 1,
                                                         "nose_tip": 1, "right_eye": 1}
    assert sorted(kept.loc[kept["landmark"] == "chin", "rank"]) == [0, 1]
    chosen = answers(select_answers(kept, prior))
    assert np.allclose(chosen[:4], (FACE + OFFSETS)[:4])  # the sure four stay as the scores had them
    assert chosen[4] == pytest.approx(FACE[4])  # the unsure chin: the prior's better fit, though scored lower
