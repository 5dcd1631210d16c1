"""Tests of the distance-ratio graph prior (paper §2.3, Eq. 4; docs/design.md §6)."""

import json
import math

import numpy as np
import pytest

from igrpn.config import LANDMARKS
from igrpn.prior import (
    GraphPrior,
    face_frame,
    landmarks_from_manifest,
    normal_quantiles,
    normality_summary,
)

# A hand-made face (mm), landmarks in config order: left_eye, middle_eyebrow, right_eye,
# nose_tip, chin. Left eye at +x (the fetus's left), chin at −y.
FACE = np.array(
    [
        [16.0, 0.0, 0.0],  # left_eye
        [0.0, 9.0, 0.0],  # middle_eyebrow
        [-16.0, 0.0, 0.0],  # right_eye
        [0.0, -24.0, 7.0],  # nose_tip
        [0.0, -52.0, 0.0],  # chin
    ]
)


def _fitted_prior(seed=0, n=60, jitter_mm=1.0):
    """A prior fitted on randomly posed, scaled and jittered copies of FACE."""
    rng = np.random.default_rng(seed)
    faces = FACE * rng.uniform(0.8, 1.2, (n, 1, 1)) + rng.normal(0.0, jitter_mm, (n, 5, 3))
    # random rotation per face (QR of a Gaussian matrix, determinant fixed to +1)
    q, r = np.linalg.qr(rng.normal(size=(n, 3, 3)))
    q *= np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
    q[np.linalg.det(q) < 0, :, 0] *= -1
    faces = faces @ q.transpose(0, 2, 1) + rng.normal(0, 50, (n, 1, 3))
    return GraphPrior().fit(faces), faces


def test_graph_has_nine_edges_without_eyebrow_chin():
    assert len(GraphPrior.EDGES) == 9
    assert ("middle_eyebrow", "chin") not in GraphPrior.EDGES
    assert len(set(GraphPrior.EDGES)) == 9
    # every edge is used by at least one ratio
    used = {name for pair in GraphPrior.RATIO_EDGES for name in pair}
    assert used == set(GraphPrior.EDGE_NAMES)
    assert len(GraphPrior.RATIO_NAMES) == 6


def test_ratios_of_hand_made_face():
    # edge lengths by hand
    eye_brow = math.hypot(16, 9)  # both sides
    eye_eye = 32.0
    brow_nose = math.hypot(33, 7)
    nose_chin = math.hypot(28, 7)
    expected = [0.0, 0.0, 0.0, eye_eye / brow_nose, brow_nose / nose_chin, eye_eye / nose_chin]
    np.testing.assert_allclose(GraphPrior.ratios(FACE), expected, rtol=1e-12, atol=1e-12)
    assert eye_brow > 0

    # move the left eye outwards: symmetric ratios by hand
    face = FACE.copy()
    face[0] = [20.0, 0.0, 0.0]
    left_brow, right_brow = math.hypot(20, 9), math.hypot(16, 9)
    left_nose, right_nose = math.sqrt(20**2 + 24**2 + 7**2), math.sqrt(16**2 + 24**2 + 7**2)
    left_chin, right_chin = math.hypot(20, 52), math.hypot(16, 52)
    r = GraphPrior.ratios(face)
    assert r[0] == pytest.approx((left_brow - right_brow) / (left_brow + right_brow), rel=1e-12)
    assert r[1] == pytest.approx((left_nose - right_nose) / (left_nose + right_nose), rel=1e-12)
    assert r[2] == pytest.approx((left_chin - right_chin) / (left_chin + right_chin), rel=1e-12)
    assert r[3] == pytest.approx(36.0 / brow_nose, rel=1e-12)


def test_ratios_are_pose_and_scale_invariant_and_broadcast():
    angle = 0.7
    rotation = np.array(
        [[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]]
    )
    moved = 1.7 * FACE @ rotation.T + np.array([100.0, -40.0, 3.0])
    batch = np.stack([FACE, moved])[None]  # (1, 2, 5, 3)
    r = GraphPrior.ratios(batch)
    assert r.shape == (1, 2, 6)
    np.testing.assert_allclose(r[0, 0], r[0, 1], atol=1e-12)


def test_penalty_matches_equation_4_by_hand():
    mu = np.array([0.0, 0.1, -0.1, 1.0, 1.2, 0.8])
    sigma = np.array([0.05, 0.1, 0.2, 0.3, 0.25, 0.15])
    prior = GraphPrior(mu=mu, sigma=sigma, n_fit=10)
    r = GraphPrior.ratios(FACE)
    by_hand = sum(s * math.exp((ri - m) ** 2 / (2 * s * s)) for ri, m, s in zip(r, mu, sigma))
    assert prior.penalty(FACE) == pytest.approx(by_hand, rel=1e-12)
    assert prior.log_penalty(FACE) == pytest.approx(math.log(by_hand), rel=1e-12)
    # at the mean every exponential is 1: the penalty is Σ σ_i
    at_mean = GraphPrior(mu=r, sigma=sigma, n_fit=10)
    assert at_mean.penalty(FACE) == pytest.approx(sigma.sum(), rel=1e-12)
    assert prior.penalty(FACE[None]).shape == (1,)


def test_log_penalty_finite_where_penalty_overflows():
    prior = GraphPrior(mu=np.zeros(6), sigma=np.full(6, 1e-3), n_fit=2)
    face = FACE.copy()
    face[0] = [30.0, 0.0, 0.0]  # symmetric ratios ~0.1 = 100 σ from µ
    with np.errstate(over="raise"):  # no overflow warning either
        log_value = prior.log_penalty(face)
        value = prior.penalty(face)
    assert np.isfinite(log_value) and log_value > 1000
    assert value == np.inf
    # the largest term dominates: log penalty ≈ max_i [log σ_i + (r_i − µ_i)² / (2σ_i²)]
    r = GraphPrior.ratios(face)
    terms = np.log(1e-3) + r**2 / (2e-6)
    assert log_value == pytest.approx(terms.max() + math.log(np.exp(terms - terms.max()).sum()))


def test_coincident_landmarks_give_infinite_penalty():
    prior, _ = _fitted_prior()
    face = FACE.copy()
    face[3] = face[4]  # nose on chin: zero nose–chin edge
    assert prior.log_penalty(face) == np.inf


def test_fit_statistics_and_errors():
    prior, faces = _fitted_prior()
    r = GraphPrior.ratios(faces)
    np.testing.assert_allclose(prior.mu, r.mean(0))
    np.testing.assert_allclose(prior.sigma, r.std(0, ddof=1))
    assert prior.n_fit == 60
    with pytest.raises(ValueError, match="at least 2"):
        GraphPrior().fit(FACE[None])
    bad = np.stack([FACE, FACE, FACE + 1])
    bad[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"\[1\].*NaN"):
        GraphPrior().fit(bad)
    with pytest.raises(ValueError, match="shape"):
        GraphPrior().fit(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="sigma must be positive"):
        GraphPrior().fit(np.stack([FACE, FACE]))  # identical sets: zero spread
    with pytest.raises(ValueError, match="not fitted"):
        GraphPrior().penalty(FACE)


def test_mean_face_is_in_face_frame():
    prior, _ = _fitted_prior()
    frontal = face_frame(FACE)
    # x points to the left eye, y from chin to eyebrow; pose removed
    assert frontal[0, 0] > 0 > frontal[2, 0]
    assert frontal[1, 1] > frontal[3, 1] > frontal[4, 1]
    np.testing.assert_allclose(prior.mean_face_mm, frontal, atol=3.0)


def _impossible_candidates():
    """Candidate 0 of left_eye lies on the chin side and candidate 0 of nose_tip near the
    eyebrow (anatomically impossible); candidate 1 of both is right."""
    return [
        np.array([[12.0, -45.0, 0.0], FACE[0] + [0.5, -0.3, 0.2]]),  # left_eye
        np.array([FACE[1] + [0.2, 0.3, 0.0], FACE[1] + [0.0, 25.0, 5.0]]),  # middle_eyebrow
        np.array([FACE[2] + [-0.4, 0.2, 0.1], [-14.0, -50.0, 3.0]]),  # right_eye
        np.array([[0.0, 5.0, 12.0], FACE[3] + [0.3, 0.0, -0.2]]),  # nose_tip
        np.array([FACE[4] + [0.0, -0.5, 0.4], [5.0, -75.0, 0.0]]),  # chin
    ]


def test_select_rejects_anatomically_impossible_top_candidates():
    prior, _ = _fitted_prior()
    candidates = _impossible_candidates()
    choice = prior.select(candidates)
    np.testing.assert_array_equal(choice, [1, 0, 0, 1, 0])
    result = prior.select_all(candidates)
    assert result["combinations"].shape == (32, 5)
    assert result["log_penalties"].shape == (32,)
    chosen = np.stack([c[i] for c, i in zip(candidates, choice)])
    assert result["log_penalty"] == pytest.approx(prior.log_penalty(chosen))
    assert result["penalty"] == pytest.approx(prior.penalty(chosen))
    assert result["log_penalty"] == result["log_penalties"].min()
    # the same candidates as one (5, 2, 3) array
    np.testing.assert_array_equal(prior.select(np.stack(candidates)), choice)


def test_select_with_fewer_candidates_and_missing_ones():
    prior, _ = _fitted_prior()
    candidates = _impossible_candidates()
    candidates[1] = candidates[1][:1]  # one eyebrow candidate
    candidates[4] = candidates[4][0]  # one chin candidate given as a single point (3,)
    result = prior.select_all(candidates)
    assert result["combinations"].shape == (8, 5)
    np.testing.assert_array_equal(result["index"], [1, 0, 0, 1, 0])
    candidates[3] = np.zeros((0, 3))
    with pytest.raises(ValueError, match="nose_tip"):
        prior.select(candidates)


def test_select_score_term_beyond_paper():
    prior, _ = _fitted_prior()
    candidates = _impossible_candidates()
    scores = [np.array([0.9, 0.1])] * 5
    np.testing.assert_array_equal(prior.select(candidates, scores, lam=0.0), [1, 0, 0, 1, 0])
    # a huge weight on scores makes the top-scoring candidates win
    np.testing.assert_array_equal(prior.select(candidates, scores, lam=1e9), [0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="scores"):
        prior.select(candidates, None, lam=1.0)


def test_corrupted_sets_have_higher_penalty():
    prior, faces = _fitted_prior()
    table = prior.corrupted_log_penalties(faces[:5])
    assert table.shape == (5, 5, 5)
    np.testing.assert_allclose(np.diagonal(table, axis1=1, axis2=2),
                               prior.log_penalty(faces[:5])[:, None].repeat(5, 1))
    # nose_tip moved onto the chin: by hand
    moved = faces[:5].copy()
    moved[:, 3] = moved[:, 4]
    np.testing.assert_array_equal(table[:, 3, 4], prior.log_penalty(moved))
    # left eye moved onto the chin is always worse than the true set
    assert np.all(table[:, 0, 4] > table[:, 0, 0])


def test_save_load_round_trip(tmp_path):
    prior, faces = _fitted_prior()
    path = prior.save(tmp_path / "runs" / "graph_prior.json")
    data = json.loads(path.read_text())
    assert data["edges"][0] == ["left_eye", "middle_eyebrow"]
    assert data["ratio_names"] == list(GraphPrior.RATIO_NAMES)
    assert data["n_fit"] == 60 and data["version"] == 1
    loaded = GraphPrior.load(path)
    np.testing.assert_array_equal(loaded.mu, prior.mu)
    np.testing.assert_array_equal(loaded.sigma, prior.sigma)
    np.testing.assert_allclose(loaded.log_penalty(faces), prior.log_penalty(faces))


def test_load_bad_files(tmp_path):
    prior, _ = _fitted_prior()
    good = prior.to_dict()
    not_json = tmp_path / "a.json"
    not_json.write_text("{not json")
    with pytest.raises(ValueError, match="a.json.*not a valid JSON"):
        GraphPrior.load(not_json)
    with pytest.raises(ValueError, match="not found"):
        GraphPrior.load(tmp_path / "missing.json")
    for change, message in [
        ({"format": "other"}, "not a GraphPrior file"),
        ({"version": 99}, "version"),
        ({"sigma": [1.0] * 5}, "shape"),
        ({"sigma": [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]}, "sigma must be positive"),
        ({"ratio_names": ["x"] * 6}, "ratio names"),
        ({"edges": [["left_eye", "chin"]]}, "edges"),
        ({"mu": ["a"] * 6}, "not numeric"),
    ]:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=message):
            GraphPrior.load(path)
    del good["mu"]
    (tmp_path / "bad.json").write_text(json.dumps(good))
    with pytest.raises(ValueError, match="lacks"):
        GraphPrior.load(tmp_path / "bad.json")


def test_landmarks_from_manifest():
    import pandas as pd

    row = {f"{n}_{a}": FACE[i, j] for i, n in enumerate(LANDMARKS) for j, a in enumerate("xyz")}
    table = pd.DataFrame([row, row])
    np.testing.assert_array_equal(landmarks_from_manifest(table), np.stack([FACE, FACE]))
    with pytest.raises(ValueError, match="chin_z"):
        landmarks_from_manifest(table.drop(columns="chin_z"))


def test_normal_quantiles_and_normality_summary():
    q = normal_quantiles(3)
    # middle of three: 0; Blom positions (1 − 3/8)/3.25 → Φ⁻¹(0.19231) ≈ −0.8694
    assert q[1] == pytest.approx(0.0, abs=1e-12)
    assert q[0] == pytest.approx(-q[2]) and q[0] == pytest.approx(-0.86942, abs=1e-4)
    # Φ⁻¹(0.975) = 1.959964 through the private inverse
    from igrpn.prior import _inverse_normal_cdf

    assert _inverse_normal_cdf(np.array([0.975]))[0] == pytest.approx(1.959964, abs=1e-6)

    # a symmetric two-point sample: skewness 0, excess kurtosis 1 − 3 = −2 by hand
    values = np.array([[-1.0], [1.0], [-1.0], [1.0]])
    summary = normality_summary(values, names=["x"])
    assert summary["skewness"][0] == pytest.approx(0.0)
    assert summary["excess_kurtosis"][0] == pytest.approx(-2.0)
    assert summary["jarque_bera"][0] == pytest.approx(4 / 6 * (0 + 4 / 4))
    assert summary["jb_p_value"][0] == pytest.approx(math.exp(-(4 / 6) / 2))
    # skewed sample [0, 0, 3]: m2 = 2, m3 = 2, skewness = 2 / 2^1.5
    skew = normality_summary(np.array([[0.0], [0.0], [3.0]]))["skewness"][0]
    assert skew == pytest.approx(2 / 2**1.5)
    with pytest.raises(ValueError, match="N ≥ 3"):
        normality_summary(np.zeros((2, 6)))


def test_handedness_tells_a_face_from_its_mirror_image():
    from igrpn.prior import face_handedness, fit_handedness

    _prior, faces = _fitted_prior(jitter_mm=0.3)  # FACE's brow is in the eyes' plane: keep jitter small
    signs = np.sign(face_handedness(faces))
    assert (signs == np.sign(face_handedness(FACE))).all()  # rotations, shifts, scale keep it
    mirrored = faces * np.array([1.0, 1.0, -1.0])  # any mirror flips it
    assert (np.sign(face_handedness(mirrored)) == -signs).all()
    swapped = faces[:, [2, 1, 0, 3, 4]]  # so does exchanging the eyes' names
    assert (np.sign(face_handedness(swapped)) == -signs).all()
    sign, agreement = fit_handedness(np.concatenate([faces, swapped[:3]]))
    assert sign == signs[0] and agreement == pytest.approx(len(faces) / (len(faces) + 3))
    with pytest.raises(ValueError, match="expected landmarks"):
        face_handedness(np.zeros((4, 3)))
