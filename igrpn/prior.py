"""Distance-ratio graph prior over the five facial landmarks (paper §2.3, Eq. 4; docs/design.md §6).

The five landmarks are the nodes of a graph with nine edges (every pair except
middle_eyebrow–chin, docs/design.md §10.16); an edge's length is the Euclidean distance (mm)
between its two landmarks. Six scale-free ratios of edge lengths are modelled, each by a
Gaussian (µ, σ) fitted on the training landmarks:

* symmetric pairs (c, d) — the fetus's left side against its right side —
  ``(Dist(c) − Dist(d)) / (Dist(c) + Dist(d))`` for eye–eyebrow, eye–nose and eye–chin;
* asymmetric pairs (a, b) — ``Dist(a) / Dist(b)`` for eye–eye / eyebrow–nose,
  eyebrow–nose / nose–chin and eye–eye / nose–chin (docs/design.md §10.17).

A landmark set is scored by the anti-normal penalty of Eq. (4),
``Σ_i σ_i · exp((r_i − µ_i)² / (2 σ_i²))``; among the candidate combinations the one with the
lowest penalty wins. The penalty overflows float64 for ratios a few dozen σ away from µ, so
comparisons use its logarithm, computed with a log-sum-exp.

Pure numpy (no torch); all array functions broadcast over leading axes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from igrpn.config import LANDMARKS, NUM_LANDMARKS
from igrpn.io import atomic_write_files

_EYE_LEFT, _BROW, _EYE_RIGHT, _NOSE = (LANDMARKS.index(n) for n in ("left_eye", "middle_eyebrow", "right_eye",
                                                                     "nose_tip"))


def face_handedness(landmarks_mm) -> np.ndarray:
    """Signed volume (mm³) telling a face from its mirror image, for landmark sets (..., 5, 3).

    ``(left_eye − right_eye) · ((brow − nose_tip) × (m − eye midpoint))`` with m the midpoint of
    brow and nose tip: the eye axis against the normal of the plane through the brow, the nose tip
    and the eyes' midpoint (the face's midline plane). Distances (the graph prior) are the same in
    a face and its mirror image; this sign is not, so it tells the left eye from the right one.
    The chin is left out: it is the landmark detectors miss most, and one wrong point here flips
    the answer. The sign is fixed by anatomy for a right-handed world frame; igrpn measures it on
    the training split (:func:`fit_handedness`) instead of assuming the data's conventions.
    """
    points = np.asarray(landmarks_mm, dtype=np.float64)
    if points.shape[-2:] != (NUM_LANDMARKS, 3):
        raise ValueError(f"face_handedness: expected landmarks (..., {NUM_LANDMARKS}, 3), got {points.shape}")
    left, right = points[..., _EYE_LEFT, :], points[..., _EYE_RIGHT, :]
    brow, nose = points[..., _BROW, :], points[..., _NOSE, :]
    forward = (brow + nose) / 2 - (left + right) / 2
    return np.einsum("...i,...i->...", left - right, np.cross(brow - nose, forward))


def fit_handedness(landmarks_mm) -> tuple[int, float]:
    """The handedness sign of a data set's true landmark sets (N, 5, 3) (world mm) and the
    fraction of sets that agree with it (1.0 for consistent annotations)."""
    signs = np.sign(face_handedness(landmarks_mm)).reshape(-1)
    signs = signs[signs != 0]
    if signs.size == 0:
        raise ValueError("fit_handedness: no landmark set with a defined handedness")
    sign = 1 if signs.sum() >= 0 else -1
    return sign, float(np.mean(signs == sign))

__all__ = [
    "GraphPrior",
    "edge_lengths",
    "landmarks_from_manifest",
    "normal_quantiles",
    "normality_summary",
    "face_frame",
]

_FORMAT = "igrpn.GraphPrior"
_VERSION = 1


def _index(name: str) -> int:
    return LANDMARKS.index(name)


def edge_lengths(landmarks_mm: np.ndarray, edges: Sequence[tuple[int, int]]) -> np.ndarray:
    """Euclidean length of each edge.

    Args:
        landmarks_mm: (..., 5, 3) landmark positions in mm.
        edges: E pairs of landmark indices.

    Returns:
        (..., E) distances in mm.
    """
    first = np.array([a for a, _ in edges])
    second = np.array([b for _, b in edges])
    return np.linalg.norm(landmarks_mm[..., first, :] - landmarks_mm[..., second, :], axis=-1)


class GraphPrior:
    """Gaussian model of six edge-length ratios of the landmark graph (paper Fig. 3, Eq. 4).

    Attributes:
        EDGES: the 9 edges as pairs of landmark names (all pairs but middle_eyebrow–chin).
        EDGE_INDEX: the same edges as pairs of indices into ``config.LANDMARKS``.
        EDGE_NAMES: ``"<a>-<b>"`` per edge.
        RATIO_NAMES: the 6 ratio names, in the order of ``ratios()``'s last axis.
        RATIO_KINDS: ``"symmetric"`` or ``"asymmetric"`` per ratio.
        RATIO_EDGES: per ratio, the names of its two edges (c, d) or (a, b).
        RATIO_LABELS: short human-readable labels (for plots and tables).
        mu, sigma: (6,) fitted mean and standard deviation (ddof=1) per ratio; ``None`` before
            ``fit``.
        n_fit: number of landmark sets the prior was fitted on.
        mean_face_mm: (5, 3) mean landmark positions in the face frame of ``face_frame`` (mm),
            for drawing the graph; ``None`` when unknown.
    """

    EDGES: tuple[tuple[str, str], ...] = tuple(
        (LANDMARKS[a], LANDMARKS[b])
        for a in range(NUM_LANDMARKS)
        for b in range(a + 1, NUM_LANDMARKS)
        if {LANDMARKS[a], LANDMARKS[b]} != {"middle_eyebrow", "chin"}
    )
    EDGE_INDEX: tuple[tuple[int, int], ...] = tuple((_index(a), _index(b)) for a, b in EDGES)
    EDGE_NAMES: tuple[str, ...] = tuple(f"{a}-{b}" for a, b in EDGES)

    RATIO_NAMES: tuple[str, ...] = (
        "sym_eye_eyebrow",
        "sym_eye_nose",
        "sym_eye_chin",
        "eyes_over_eyebrow_nose",
        "eyebrow_nose_over_nose_chin",
        "eyes_over_nose_chin",
    )
    RATIO_KINDS: tuple[str, ...] = ("symmetric",) * 3 + ("asymmetric",) * 3
    RATIO_EDGES: tuple[tuple[str, str], ...] = (
        ("left_eye-middle_eyebrow", "middle_eyebrow-right_eye"),
        ("left_eye-nose_tip", "right_eye-nose_tip"),
        ("left_eye-chin", "right_eye-chin"),
        ("left_eye-right_eye", "middle_eyebrow-nose_tip"),
        ("middle_eyebrow-nose_tip", "nose_tip-chin"),
        ("left_eye-right_eye", "nose_tip-chin"),
    )
    RATIO_LABELS: tuple[str, ...] = (
        "(L eye–brow − R eye–brow) / sum",
        "(L eye–nose − R eye–nose) / sum",
        "(L eye–chin − R eye–chin) / sum",
        "eye–eye / brow–nose",
        "brow–nose / nose–chin",
        "eye–eye / nose–chin",
    )

    def __init__(self, mu=None, sigma=None, n_fit: int = 0, mean_face_mm=None):
        self.mu = None if mu is None else np.asarray(mu, dtype=np.float64)
        self.sigma = None if sigma is None else np.asarray(sigma, dtype=np.float64)
        self.n_fit = int(n_fit)
        self.mean_face_mm = None if mean_face_mm is None else np.asarray(mean_face_mm, float)
        if self.mu is not None or self.sigma is not None:
            self._check_parameters(self.mu, self.sigma, "GraphPrior(mu, sigma)")

    # ------------------------------------------------------------------ features

    @classmethod
    def _ratio_edge_columns(cls) -> tuple[np.ndarray, np.ndarray]:
        """Column indices (into EDGE_NAMES) of the first and second edge of each ratio."""
        first = np.array([cls.EDGE_NAMES.index(a) for a, _ in cls.RATIO_EDGES])
        second = np.array([cls.EDGE_NAMES.index(b) for _, b in cls.RATIO_EDGES])
        return first, second

    @classmethod
    def ratios(cls, landmarks_mm) -> np.ndarray:
        """The six ratio features of landmark sets.

        Args:
            landmarks_mm: (..., 5, 3) landmark positions (mm, any rigid pose).

        Returns:
            (..., 6) ratios in the order of ``RATIO_NAMES``. A zero denominator (coincident
            landmarks) gives ``inf`` or ``nan``, which the penalty treats as impossible.
        """
        landmarks_mm = np.asarray(landmarks_mm, dtype=np.float64)
        if landmarks_mm.ndim < 2 or landmarks_mm.shape[-2:] != (NUM_LANDMARKS, 3):
            raise ValueError(
                f"GraphPrior.ratios: landmarks must have shape (..., {NUM_LANDMARKS}, 3), "
                f"got {landmarks_mm.shape}"
            )
        lengths = edge_lengths(landmarks_mm, cls.EDGE_INDEX)
        first, second = cls._ratio_edge_columns()
        a, b = lengths[..., first], lengths[..., second]
        symmetric = np.array([kind == "symmetric" for kind in cls.RATIO_KINDS])
        # symmetric: normalised left-right difference; asymmetric: plain quotient
        numerator = np.where(symmetric, a - b, a)
        denominator = np.where(symmetric, a + b, b)
        with np.errstate(divide="ignore", invalid="ignore"):
            return numerator / denominator

    # ------------------------------------------------------------------ fitting

    @staticmethod
    def _check_parameters(mu, sigma, where: str) -> None:
        n = len(GraphPrior.RATIO_NAMES)
        if mu is None or sigma is None:
            raise ValueError(f"{where}: mu and sigma must both be given")
        if mu.shape != (n,) or sigma.shape != (n,):
            raise ValueError(
                f"{where}: mu and sigma must have shape ({n},), got {mu.shape} and {sigma.shape}"
            )
        if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
            raise ValueError(f"{where}: mu and sigma must be finite")
        if np.any(sigma <= 0):
            bad = [GraphPrior.RATIO_NAMES[i] for i in np.flatnonzero(sigma <= 0)]
            raise ValueError(f"{where}: sigma must be positive; zero or negative for {bad}")

    def fit(self, landmarks_mm) -> "GraphPrior":
        """Fit µ and σ (standard deviation, ddof=1) of each ratio.

        Args:
            landmarks_mm: (N, 5, 3) landmark sets in mm, N ≥ 2 (the training split).

        Returns:
            ``self``.
        """
        landmarks_mm = np.asarray(landmarks_mm, dtype=np.float64)
        if landmarks_mm.ndim != 3 or landmarks_mm.shape[1:] != (NUM_LANDMARKS, 3):
            raise ValueError(
                f"GraphPrior.fit: landmarks must have shape (N, {NUM_LANDMARKS}, 3), "
                f"got {landmarks_mm.shape}"
            )
        if landmarks_mm.shape[0] < 2:
            raise ValueError(
                f"GraphPrior.fit: need at least 2 landmark sets to estimate a standard deviation, "
                f"got {landmarks_mm.shape[0]}"
            )
        bad_sets = np.flatnonzero(~np.isfinite(landmarks_mm).all(axis=(1, 2)))
        if bad_sets.size:
            raise ValueError(
                f"GraphPrior.fit: landmark sets {bad_sets[:10].tolist()} contain NaN or inf"
            )
        values = self.ratios(landmarks_mm)
        degenerate = np.flatnonzero(~np.isfinite(values).all(axis=1))
        if degenerate.size:
            raise ValueError(
                f"GraphPrior.fit: landmark sets {degenerate[:10].tolist()} have coincident "
                "landmarks (a zero-length edge), so their ratios are undefined"
            )
        mu, sigma = values.mean(axis=0), values.std(axis=0, ddof=1)
        self._check_parameters(mu, sigma, "GraphPrior.fit")
        self.mu, self.sigma, self.n_fit = mu, sigma, int(landmarks_mm.shape[0])
        self.mean_face_mm = face_frame(landmarks_mm).mean(axis=0)
        return self

    def _require_fitted(self) -> None:
        if self.mu is None or self.sigma is None:
            raise ValueError("GraphPrior: not fitted; call fit(landmarks) or GraphPrior.load(path)")

    # ------------------------------------------------------------------ penalty (Eq. 4)

    def _log_terms(self, landmarks_mm) -> np.ndarray:
        """log of each summand of Eq. (4): log σ_i + (r_i − µ_i)² / (2 σ_i²), shape (..., 6)."""
        self._require_fitted()
        values = self.ratios(landmarks_mm)
        terms = np.log(self.sigma) + (values - self.mu) ** 2 / (2.0 * self.sigma**2)
        # an undefined ratio (coincident landmarks) makes the set impossible
        return np.where(np.isnan(terms), np.inf, terms)

    def log_penalty(self, landmarks_mm) -> np.ndarray:
        """log of the Eq. (4) penalty, computed with a log-sum-exp so it never overflows.

        Args:
            landmarks_mm: (..., 5, 3) landmark sets in mm.

        Returns:
            (...) float64; finite for every finite set without coincident landmarks
            (``+inf`` for a set with an undefined ratio).
        """
        terms = self._log_terms(landmarks_mm)
        peak = terms.max(axis=-1, keepdims=True)
        # subtract the largest term before exponentiating; an infinite peak stays infinite (a set
        # with coincident landmarks, e.g. both eyes on one place of a pooled eye list)
        safe_peak = np.where(np.isfinite(peak), peak, 0.0)
        with np.errstate(invalid="ignore", under="ignore", over="ignore"):
            summed = np.exp(terms - safe_peak).sum(axis=-1)
        return np.where(np.isfinite(peak[..., 0]), safe_peak[..., 0] + np.log(summed), np.inf)

    def penalty(self, landmarks_mm) -> np.ndarray:
        """Eq. (4): Σ_i σ_i · exp((r_i − µ_i)² / (2 σ_i²)).

        Args:
            landmarks_mm: (..., 5, 3) landmark sets in mm.

        Returns:
            (...) float64; may be ``inf`` when a ratio is far (≳ 38 σ) from its mean — use
            ``log_penalty`` to compare such sets.
        """
        return self._exp(self.log_penalty(landmarks_mm))

    @staticmethod
    def _exp(log_values):
        """exp without overflow warnings (inf where the value exceeds float64)."""
        with np.errstate(over="ignore"):
            return np.exp(log_values)

    # ------------------------------------------------------------------ selection

    @staticmethod
    def _as_candidate_list(candidates) -> list[np.ndarray]:
        """Validate candidates (list of 5 arrays (n_c, 3) or an array (5, k, 3))."""
        if len(candidates) != NUM_LANDMARKS:
            raise ValueError(
                f"GraphPrior.select: expected candidates for {NUM_LANDMARKS} landmarks, "
                f"got {len(candidates)}"
            )
        result = []
        for name, centres in zip(LANDMARKS, candidates):
            centres = np.asarray(centres, dtype=np.float64)
            if centres.shape == (3,):  # a single candidate given as one point
                centres = centres[None]
            if centres.size == 0:
                centres = np.zeros((0, 3))
            if centres.ndim != 2 or centres.shape[1] != 3:
                raise ValueError(
                    f"GraphPrior.select: candidates of {name!r} must have shape (n, 3), "
                    f"got {centres.shape}"
                )
            if centres.shape[0] == 0:
                raise ValueError(
                    f"GraphPrior.select: no candidate for landmark {name!r}; "
                    "handle missing landmarks before calling the prior"
                )
            if not np.all(np.isfinite(centres)):
                raise ValueError(f"GraphPrior.select: candidates of {name!r} contain NaN or inf")
            result.append(centres)
        return result

    def select_all(self, candidates, scores=None, lam: float = 0.0) -> dict:
        """Score every combination of candidates and return the best one with all the costs.

        Args:
            candidates: a list of 5 arrays (n_c, 3) of candidate centres (mm), one per landmark
                in ``config.LANDMARKS`` order, or an array (5, k, 3). Every n_c ≥ 1.
            scores: optional list of 5 arrays (n_c,) of detection scores in (0, 1]; only used
                when ``lam > 0``.
            lam: weight of the detection scores. ``0`` (default) is the paper's method: the
                combination with the lowest Eq. (4) penalty wins. ``lam > 0`` (beyond the paper)
                minimises ``log_penalty − lam · Σ log(score)`` instead.

        Returns:
            dict with ``index`` (5,) int — the chosen candidate per landmark; ``log_penalty``
            and ``penalty`` (floats) and ``cost`` of that combination; ``combinations`` (M, 5)
            int, ``log_penalties`` (M,) and ``costs`` (M,) of all M = Π n_c combinations
            (combination 0 takes candidate 0 of every landmark; ties go to the earlier one, so
            when every combination is impossible — infinite cost — combination 0 is returned).
        """
        centres = self._as_candidate_list(candidates)
        counts = [len(c) for c in centres]
        # all index combinations, last landmark varying fastest: (M, 5)
        grids = np.meshgrid(*[np.arange(n) for n in counts], indexing="ij")
        combinations = np.stack([g.ravel() for g in grids], axis=1)
        landmark_sets = np.stack(
            [centres[c][combinations[:, c]] for c in range(NUM_LANDMARKS)], axis=1
        )  # (M, 5, 3)
        log_penalties = self.log_penalty(landmark_sets)
        costs = log_penalties
        if lam:
            if lam < 0:
                raise ValueError(f"GraphPrior.select: lam must be ≥ 0, got {lam}")
            if scores is None:
                raise ValueError("GraphPrior.select: lam > 0 needs the candidates' scores")
            if len(scores) != NUM_LANDMARKS:
                raise ValueError(
                    f"GraphPrior.select: expected scores for {NUM_LANDMARKS} landmarks, "
                    f"got {len(scores)}"
                )
            log_scores = []
            for name, s, n in zip(LANDMARKS, scores, counts):
                s = np.asarray(s, dtype=np.float64).reshape(-1)
                if s.shape != (n,):
                    raise ValueError(
                        f"GraphPrior.select: {name!r} has {n} candidates but {s.size} scores"
                    )
                if not np.all(np.isfinite(s) & (s >= 0)):
                    raise ValueError(
                        f"GraphPrior.select: scores of {name!r} must be finite and ≥ 0, got {s}"
                    )
                with np.errstate(divide="ignore"):
                    log_scores.append(np.log(s))
            total_log_score = sum(log_scores[c][combinations[:, c]] for c in range(NUM_LANDMARKS))
            costs = log_penalties - lam * total_log_score
        best = int(np.argmin(costs))
        return {
            "index": combinations[best].copy(),
            "log_penalty": float(log_penalties[best]),
            "penalty": float(self._exp(log_penalties[best])),
            "cost": float(costs[best]),
            "combinations": combinations,
            "log_penalties": log_penalties,
            "costs": costs,
        }

    def select(self, candidates, scores=None, lam: float = 0.0) -> np.ndarray:
        """Index of the chosen candidate per landmark (paper §2.3).

        Evaluates all Π n_c combinations of the candidates (2⁵ = 32 for two candidates per
        landmark) at once and returns the one with the lowest penalty (compared in log space).
        See ``select_all`` for the arguments, including the optional score term (``lam > 0``,
        beyond the paper; ``lam = 0`` is the paper's method).

        Returns:
            (5,) int array: for each landmark, the index of its chosen candidate.
        """
        return self.select_all(candidates, scores=scores, lam=lam)["index"]

    def corrupted_log_penalties(self, landmarks_mm) -> np.ndarray:
        """log penalty of each landmark set with one landmark moved onto another's place.

        Args:
            landmarks_mm: (N, 5, 3) true landmark sets (mm).

        Returns:
            (N, 5, 5): entry [n, i, j] is the log penalty of set n with landmark i moved to the
            position of landmark j; the diagonal [n, i, i] is the true set's log penalty. A move
            that makes an edge of a ratio's denominator zero gives ``inf``.
        """
        landmarks_mm = np.asarray(landmarks_mm, dtype=np.float64)
        n = NUM_LANDMARKS
        if landmarks_mm.ndim != 3 or landmarks_mm.shape[1:] != (n, 3):
            raise ValueError(
                f"GraphPrior.corrupted_log_penalties: landmarks must have shape (N, {n}, 3), "
                f"got {landmarks_mm.shape}"
            )
        # (N, 5 moved, 5 onto, 5, 3): one copy of every set per (moved, onto) pair
        moved = np.broadcast_to(landmarks_mm[:, None, None], (len(landmarks_mm), n, n, n, 3)).copy()
        rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        # set landmark i of copy [i, j] to the position of landmark j
        moved[:, rows, cols, rows] = landmarks_mm[:, cols]
        return self.log_penalty(moved)

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict:
        """Plain JSON-ready description of the fitted prior."""
        self._require_fitted()
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "landmarks": list(LANDMARKS),
            "edges": [list(e) for e in self.EDGES],
            "ratio_names": list(self.RATIO_NAMES),
            "mu": self.mu.tolist(),
            "sigma": self.sigma.tolist(),
            "n_fit": self.n_fit,
            "mean_face_mm": None if self.mean_face_mm is None else self.mean_face_mm.tolist(),
        }

    def save(self, path) -> Path:
        """Write the prior as JSON (edges, ratio names, µ, σ, n_fit, version); returns the path."""

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_files({path: json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"})
        return path

    @classmethod
    def load(cls, path) -> "GraphPrior":
        """Read a prior written by ``save``; ``ValueError`` naming the file and the problem."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: graph prior file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not a valid JSON file ({error})") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a GraphPrior file (missing format {_FORMAT!r})")
        if data.get("version") != _VERSION:
            raise ValueError(
                f"{path}: unsupported GraphPrior version {data.get('version')!r} "
                f"(this code reads version {_VERSION})"
            )
        missing = [k for k in ("landmarks", "edges", "ratio_names", "mu", "sigma", "n_fit")
                   if k not in data]
        if missing:
            raise ValueError(f"{path}: GraphPrior file lacks {missing}")
        for key, label, expected in (("landmarks", "landmarks", list(LANDMARKS)),
                                     ("edges", "graph edges", [list(e) for e in cls.EDGES]),
                                     ("ratio_names", "ratio names", list(cls.RATIO_NAMES))):
            # Compared as JSON values: a number or a string where a list belongs simply differs.
            if data[key] != expected:
                raise ValueError(f"{path}: {label} {json.dumps(data[key])[:120]} differ from this version's "
                                 f"{json.dumps(expected)[:120]}")
        try:
            mu = np.asarray(data["mu"], dtype=np.float64)
            sigma = np.asarray(data["sigma"], dtype=np.float64)
            face = data.get("mean_face_mm")
            face = None if face is None else np.asarray(face, dtype=np.float64)
            n_fit = int(data["n_fit"])
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"{path}: mu, sigma, n_fit or mean_face_mm is not numeric ({error})"
            ) from None
        cls._check_parameters(mu, sigma, str(path))
        if face is not None and face.shape != (NUM_LANDMARKS, 3):
            raise ValueError(f"{path}: mean_face_mm must have shape (5, 3), got {face.shape}")
        if face is not None and not np.all(np.isfinite(face)):
            raise ValueError(f"{path}: mean_face_mm holds NaN or inf")
        return cls(mu=mu, sigma=sigma, n_fit=n_fit, mean_face_mm=face)

    def __repr__(self) -> str:
        if self.mu is None:
            return "GraphPrior(unfitted)"
        pairs = ", ".join(f"{n}={m:.4g}±{s:.3g}" for n, m, s in zip(
            self.RATIO_NAMES, self.mu, self.sigma))
        return f"GraphPrior(n_fit={self.n_fit}, {pairs})"


# ---------------------------------------------------------------------- helpers


def face_frame(landmarks_mm) -> np.ndarray:
    """Landmarks expressed in a face-centred frame, removing the pose.

    Axes: x from the right eye to the left eye (the fetus's left), y from the chin towards the
    eyebrow (made orthogonal to x), z = x × y; origin at the centroid of the five landmarks.

    Args:
        landmarks_mm: (..., 5, 3) in mm.

    Returns:
        (..., 5, 3) in mm, in the face frame (x left, y up); project to (x, y) for a frontal view.
    """
    landmarks_mm = np.asarray(landmarks_mm, dtype=np.float64)
    left, right = _index("left_eye"), _index("right_eye")
    up_from, up_to = _index("chin"), _index("middle_eyebrow")
    x_axis = landmarks_mm[..., left, :] - landmarks_mm[..., right, :]
    x_axis /= np.linalg.norm(x_axis, axis=-1, keepdims=True)
    up = landmarks_mm[..., up_to, :] - landmarks_mm[..., up_from, :]
    # Gram–Schmidt: remove the left-right component from the vertical direction
    y_axis = up - (up * x_axis).sum(-1, keepdims=True) * x_axis
    y_axis /= np.linalg.norm(y_axis, axis=-1, keepdims=True)
    z_axis = np.cross(x_axis, y_axis)
    rotation = np.stack([x_axis, y_axis, z_axis], axis=-2)  # (..., 3 axes, 3 world)
    centred = landmarks_mm - landmarks_mm.mean(axis=-2, keepdims=True)
    return np.einsum("...ij,...lj->...li", rotation, centred)


def landmarks_from_manifest(manifest, landmarks: Sequence[str] = LANDMARKS) -> np.ndarray:
    """Landmark positions from a manifest's ``<name>_x/_y/_z`` columns (world mm).

    Args:
        manifest: a DataFrame with one row per volume (docs/design.md §3).

    Returns:
        (N, 5, 3) float64 array in ``landmarks`` order.
    """
    columns = [f"{name}_{axis}" for name in landmarks for axis in "xyz"]
    missing = [c for c in columns if c not in manifest.columns]
    if missing:
        raise ValueError(f"manifest lacks landmark columns {missing}")
    values = manifest[columns].to_numpy(dtype=np.float64)
    return values.reshape(len(manifest), len(landmarks), 3)


def _inverse_normal_cdf(p: np.ndarray) -> np.ndarray:
    """Standard-normal quantile of probabilities p in (0, 1), by bisection on Φ (|error| < 1e-12)."""
    p = np.asarray(p, dtype=np.float64)
    erf = np.frompyfunc(math.erf, 1, 1)
    low, high = np.full(p.shape, -40.0), np.full(p.shape, 40.0)
    for _ in range(80):  # each step halves the bracket: 80 / 2⁸⁰ ≪ 1e-12
        mid = 0.5 * (low + high)
        below = 0.5 * (1.0 + erf(mid / math.sqrt(2.0)).astype(np.float64)) < p
        low, high = np.where(below, mid, low), np.where(below, high, mid)
    return 0.5 * (low + high)


def normal_quantiles(n: int) -> np.ndarray:
    """Expected standard-normal order statistics for a Q–Q plot (Blom positions (i − 3/8)/(n + 1/4)).

    Returns:
        (n,) increasing quantiles.
    """
    if n < 1:
        raise ValueError(f"normal_quantiles: need n ≥ 1, got {n}")
    positions = (np.arange(1, n + 1) - 0.375) / (n + 0.25)
    return _inverse_normal_cdf(positions)


def normality_summary(values, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Moment-based check of how Gaussian each column is.

    Args:
        values: (N, k) samples, N ≥ 3 (e.g. ``GraphPrior.ratios`` of the training sets).
        names: k column names (default ``GraphPrior.RATIO_NAMES`` when k = 6).

    Returns:
        dict of (k,) arrays: ``name``, ``n``, ``mean``, ``std`` (ddof=1), ``skewness`` and
        ``excess_kurtosis`` (population moments, 0 for a normal), ``jarque_bera``
        = n/6 · (S² + K²/4) and ``jb_p_value`` = exp(−JB/2) (the χ²₂ tail, exact for 2 dof).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] < 3:
        raise ValueError(f"normality_summary: need an (N ≥ 3, k) array, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError("normality_summary: values contain NaN or inf")
    n, k = values.shape
    if names is None:
        names = GraphPrior.RATIO_NAMES if k == len(GraphPrior.RATIO_NAMES) else [
            f"col{i}" for i in range(k)]
    centred = values - values.mean(axis=0)
    m2 = (centred**2).mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        skewness = (centred**3).mean(axis=0) / m2**1.5
        kurtosis = (centred**4).mean(axis=0) / m2**2 - 3.0
    jarque_bera = n / 6.0 * (skewness**2 + kurtosis**2 / 4.0)
    return {
        "name": np.array(list(names)),
        "n": np.full(k, n),
        "mean": values.mean(axis=0),
        "std": values.std(axis=0, ddof=1),
        "skewness": skewness,
        "excess_kurtosis": kurtosis,
        "jarque_bera": jarque_bera,
        "jb_p_value": np.exp(-jarque_bera / 2.0),
    }
