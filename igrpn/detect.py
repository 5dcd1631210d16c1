"""Inference: a trained model (and optionally the graph prior) applied to a volume.

``Detector.from_checkpoint(path).predict(volume, affine)`` returns one row per candidate box:
the model's top-k boxes per landmark after per-class NMS (paper §2.3: k = 2), with the answer for
each landmark marked ``selected`` — the highest-scoring candidate without the prior, the
candidate of the lowest-penalty combination with it. Beyond the paper, the two eyes are answered
as a pair of distinct places named left and right by the face's handedness (:func:`select_answers`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from igrpn.checkpoint import load_checkpoint, model_from_checkpoint
from igrpn.config import LANDMARKS, LEFT_RIGHT_PAIRS, Profile
from igrpn.data import inside_volume, prepare_volume, resampled_grid, world_to_voxel
from igrpn.models.backbone import pad_to_multiple
from igrpn.prior import face_handedness, GraphPrior

PREDICTION_COLUMNS = ("landmark", "class_id", "rank", "selected", "score", "x", "y", "z",
                      "i", "j", "k", "w", "h", "d")
#: Largest resampled grid (voxels) that :meth:`Detector.predict` accepts: 256³. Above it the
#: backbone's first block alone needs gigabytes of CPU memory; crop the volume or use a coarser
#: profile.
MAX_GRID_VOXELS = 256 ** 3
#: Candidates asked of the model, in multiples of the profile's top-k, when some of the top-k lie
#: outside the volume (in the zero padding) and are replaced by the next ones inside it.
CANDIDATE_RESERVE = 4


def check_grid_size(shape, affine, spacing_mm: float, name: str = "volume") -> tuple[int, int, int]:
    """Refuse a volume whose isotropic grid at ``spacing_mm`` would exceed ``MAX_GRID_VOXELS``.

    Args:
        shape: (X, Y, Z[, ...]) of the volume as given (a NIfTI header's shape is enough).
        affine: (4, 4) voxel → world mm.
        spacing_mm: the profile's isotropic spacing.
        name: names the volume in the message.

    Returns:
        The resampled grid's shape (X', Y', Z').

    Raises:
        ValueError: naming the volume, the grid's size and the limit.
    """

    grid = resampled_grid(tuple(shape)[:3], affine, spacing_mm)[0]
    voxels = int(np.prod(grid, dtype=np.int64))
    if voxels > MAX_GRID_VOXELS:
        raise ValueError(
            f"{name}: too large: the {'x'.join(map(str, shape[:3]))} volume resampled to "
            f"{spacing_mm:g} mm is a {'x'.join(map(str, grid))} grid ({voxels / 1e6:.1f} M voxels), "
            f"above the limit of {round(MAX_GRID_VOXELS ** (1 / 3))}^3 = {MAX_GRID_VOXELS / 1e6:.1f} M "
            f"voxels (igrpn.detect.MAX_GRID_VOXELS); crop the volume around the face"
        )
    return grid


def min_extent_mm(profile: Profile) -> float:
    """The shortest field of view (mm, along every axis) a volume needs: the model answers each
    landmark with a box of ``profile.gt_box_mm``, and the largest must fit inside the volume."""
    return float(max(profile.gt_box_mm))


def check_extent(shape, affine, profile: Profile, name: str = "volume") -> None:
    """Refuse a volume with an axis shorter than :func:`min_extent_mm` (e.g. a slice, or slices
    0.01 mm thick): its landmarks would be placed outside it.

    Args:
        shape: (X, Y, Z[, ...]) of the volume as given (a NIfTI header's shape is enough).
        affine: (4, 4) voxel → world mm.
        profile: the checkpoint's profile.
        name: names the volume in the message.

    Raises:
        ValueError: naming the volume, the short axis (mm and voxels) and the least extent (mm,
        and voxels at the profile's spacing).
    """
    voxel_mm = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    extent_mm = np.asarray(shape[:3], dtype=np.float64) * voxel_mm  # voxel edges to voxel edges
    least = min_extent_mm(profile)
    short = np.flatnonzero(extent_mm < least - 1e-6)
    if len(short):
        axis = int(short[0])
        raise ValueError(
            f"{name}: too small: axis {axis + 1} spans {extent_mm[axis]:.3g} mm ({shape[axis]} voxel(s) of "
            f"{voxel_mm[axis]:.3g} mm; field of view {' x '.join(f'{e:.3g}' for e in extent_mm)} mm); the model needs "
            f"at least {least:g} mm ({math.ceil(least / profile.spacing_mm - 1e-6)} voxels at its "
            f"{profile.spacing_mm:g} mm) along every axis, the size of its largest landmark box")


class Detector:
    """A trained landmark model with its profile, and optionally a fitted :class:`GraphPrior`.

    Args:
        model: a ``LandmarkModel`` (put in eval mode here).
        profile: the profile it was trained with (spacing, box sizes, NMS, top-k).
        prior: a fitted ``GraphPrior``, a path to its JSON, or ``None`` (top-1 per landmark).
        prior_lambda: weight of the candidates' log-scores beside the prior's penalty (beyond the
            paper; 0 is the paper's method).
    """

    def __init__(self, model, profile: Profile, prior=None, prior_lambda: float = 0.0,
                 handedness: int | None = None):
        self.model = model.eval()
        self.profile = profile
        self.prior = GraphPrior.load(prior) if isinstance(prior, (str, Path)) else prior
        if not (np.isfinite(prior_lambda) and prior_lambda >= 0):
            raise ValueError(f"prior_lambda must be a finite number >= 0, got {prior_lambda}")
        self.prior_lambda = prior_lambda
        #: the checkpoint the weights came from (set by from_checkpoint; named in errors)
        self.checkpoint: str | None = None
        #: +1/−1: answer the eyes as a pair named by the face's handedness (see select_answers)
        self.handedness = handedness
        self.last_timing: dict[str, float] = {}

    @classmethod
    def from_checkpoint(cls, path: str | Path, prior=None, prior_lambda: float = 0.0) -> "Detector":
        """Build the model a checkpoint describes and load its weights (``weights_only=True``).

        Raises:
            igrpn.checkpoint.CheckpointError naming the file and what is wrong with it.
        """

        ckpt = load_checkpoint(path)
        model, profile = model_from_checkpoint(ckpt, path)
        detector = cls(model, profile, prior=prior, prior_lambda=prior_lambda, handedness=ckpt.get("handedness"))
        detector.method = ckpt["method"]
        detector.iou_balance = ckpt["iou_balance"]
        detector.checkpoint = str(path)
        return detector

    def pairing(self) -> dict:
        """``select_answers``' eye-pair arguments: the handedness, half the eye box as the least
        distance between the two eyes' answers, and the candidates per class the prior combines."""
        eye_box_mm = min(self.profile.gt_box_mm[a] for pair in LEFT_RIGHT_PAIRS for a in pair)
        return {"handedness": self.handedness, "min_pair_distance_mm": eye_box_mm / 2,
                "pair_eyes": self.handedness is not None or self.profile.merge_mirror_pairs,
                "class_top_k": self.profile.top_k}

    @torch.no_grad()
    def predict_grid(self, volume: np.ndarray, affine: np.ndarray, keep=None, name: str = "volume") -> pd.DataFrame:
        """Predict on a volume already on the profile's isotropic grid and normalised (a ``Case``).

        Args:
            volume: (X, Y, Z) float32, normalised as ``igrpn.data.load_case`` does.
            affine: (4, 4) voxel → world mm of that grid.
            keep: optional ``f(world mm (n, 3)) -> bool (n,)``: candidates it refuses are replaced
                by the next ones of their landmark that it accepts (:meth:`predict` keeps those
                inside the volume given); then a non-finite output is a ``ValueError``.
            name: names the volume in error messages.

        Returns:
            One row per candidate (columns ``PREDICTION_COLUMNS``; ``i, j, k`` on this grid).
        """

        start = time.perf_counter()
        tensor = pad_to_multiple(torch.as_tensor(volume, dtype=torch.float32)[None, None], 8)
        outputs = self.model(tensor)
        model_ms = (time.perf_counter() - start) * 1e3

        start = time.perf_counter()
        affine = np.asarray(affine, dtype=np.float64)
        per_landmark = self.model.candidates(outputs, top_k=self.profile.top_k)[0]
        rows = self._candidate_rows(per_landmark, affine)
        if keep is not None:
            self._check_finite(rows, name)
            if not keep(rows[["x", "y", "z"]].to_numpy(dtype=np.float64)).all():
                rows = self._candidates_kept(outputs, rows, affine, keep, name)
        #: the candidates before any selection (predict_cases selects them again with a prior)
        self.last_candidates = rows
        rows = select_answers(rows, self.prior, self.prior_lambda, **self.pairing())
        post_ms = (time.perf_counter() - start) * 1e3
        self.last_timing = {"model_ms": model_ms, "postprocess_ms": post_ms, "total_ms": model_ms + post_ms}
        return rows

    def _check_finite(self, rows: pd.DataFrame, name: str) -> None:
        """Refuse NaN or infinite scores or boxes, naming the volume and the checkpoint."""
        values = rows[["score", "x", "y", "z", "w", "h", "d"]].to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            source = f"checkpoint {self.checkpoint}" if self.checkpoint else "the model given"
            raise ValueError(f"{name}: the model's output is not finite ({int((~np.isfinite(values)).sum())} NaN "
                             f"or inf values in scores and boxes) with {source}")

    def _candidates_kept(self, outputs, rows: pd.DataFrame, affine: np.ndarray, keep, name: str) -> pd.DataFrame:
        """Each landmark's best candidates that ``keep`` accepts, as many as it had in ``rows``.

        Asks the model for ``CANDIDATE_RESERVE`` times the profile's top-k, drops the refused
        ones and renumbers the ranks (greedy NMS keeps the same first boxes whatever k is, so the
        accepted boxes of ``rows`` stay and the refused ones are replaced by the next ones).
        """
        wanted = rows.groupby("landmark").size()
        wide = self._candidate_rows(self.model.candidates(outputs, top_k=self.profile.top_k * CANDIDATE_RESERVE)[0],
                                    affine)
        self._check_finite(wide, name)
        wide = wide[keep(wide[["x", "y", "z"]].to_numpy(dtype=np.float64))]
        wide = wide.sort_values(["class_id", "rank"], kind="stable")
        wide = wide[wide.groupby("landmark").cumcount() < wide["landmark"].map(wanted).fillna(0)]
        return wide.assign(rank=wide.groupby("landmark").cumcount()).reset_index(drop=True)

    def predict(self, volume: np.ndarray, affine: np.ndarray, name: str = "volume") -> pd.DataFrame:
        """Predict the five landmarks of a volume of any size, spacing and orientation.

        A volume is refused when its resampled grid exceeds ``MAX_GRID_VOXELS`` or when an axis
        is shorter than :func:`min_extent_mm` (it cannot hold a landmark's box); a smaller grid
        than the network's input multiple is zero-padded (by the model). Only candidates inside
        the volume are returned: one in the padding is replaced by its landmark's next one.

        Args:
            volume: (X, Y, Z) or (X, Y, Z, 1) intensities (any dtype).
            affine: (4, 4) voxel → world mm (the NIfTI affine).
            name: names the volume in error messages (e.g. its file name).

        Returns:
            One row per candidate: world mm ``x, y, z``, voxel ``i, j, k`` of the GIVEN volume,
            box size ``w, h, d`` in mm, ``score``, ``rank`` and ``selected``.

        Raises:
            ValueError naming the volume: not 3D, NaN/inf voxels, constant, bad affine, too large,
            too small, a non-finite model output (naming the checkpoint too), or a landmark
            without any candidate inside the volume.
        """

        volume, affine = np.asarray(volume), np.asarray(affine, dtype=np.float64)
        # A bad shape or affine is left to prepare_volume, which names the problem.
        one_volume = volume.ndim == 3 or (volume.ndim == 4 and volume.shape[3] == 1)
        if (one_volume and affine.shape == (4, 4) and np.all(np.isfinite(affine))
                and abs(np.linalg.det(affine[:3, :3])) > 1e-12):
            check_grid_size(volume.shape, affine, self.profile.spacing_mm, name)
            check_extent(volume.shape, affine, self.profile, name)
        grid_volume, grid_affine = prepare_volume(volume, affine, self.profile.spacing_mm, name=name)
        shape = volume.shape[:3]
        rows = self.predict_grid(grid_volume, grid_affine, name=name,
                                 keep=lambda world: inside_volume(world_to_voxel(world, affine), shape))
        missing = [landmark for landmark in LANDMARKS if not rows["selected"][rows["landmark"] == landmark].any()]
        if missing:
            raise ValueError(f"{name}: the model placed no candidate for {', '.join(missing)} inside the volume "
                             f"({len(rows)} candidates inside in all)")
        # Re-express the centres in the voxel grid of the volume the caller gave.
        rows[["i", "j", "k"]] = world_to_voxel(rows[["x", "y", "z"]].to_numpy(dtype=np.float64), affine)
        return rows

    def _candidate_rows(self, per_landmark, affine: np.ndarray) -> pd.DataFrame:
        records = []
        for class_index, (boxes, scores) in enumerate(per_landmark):
            boxes, scores = boxes.double().numpy(), scores.double().numpy()
            centres_mm = (affine @ np.c_[boxes[:, :3], np.ones(len(boxes))].T).T[:, :3]
            for rank in range(len(boxes)):
                records.append({
                    "landmark": LANDMARKS[class_index], "class_id": class_index + 1, "rank": rank,
                    "selected": False, "score": float(scores[rank]),
                    "x": centres_mm[rank, 0], "y": centres_mm[rank, 1], "z": centres_mm[rank, 2],
                    "i": boxes[rank, 0], "j": boxes[rank, 1], "k": boxes[rank, 2],
                    # isotropic grid: a size in voxels times the spacing is a size in mm
                    "w": boxes[rank, 3] * self.profile.spacing_mm,
                    "h": boxes[rank, 4] * self.profile.spacing_mm,
                    "d": boxes[rank, 5] * self.profile.spacing_mm,
                })
        return pd.DataFrame.from_records(records, columns=list(PREDICTION_COLUMNS))


def select_answers(rows: pd.DataFrame, prior=None, prior_lambda: float = 0.0, handedness: int | None = None,
                   min_pair_distance_mm: float = 0.0, pair_eyes: bool | None = None,
                   class_top_k: int | None = None) -> pd.DataFrame:
    """Return a copy of one volume's candidate rows with one ``selected`` row per landmark.

    Without a prior the highest-scoring candidate (rank 0) of each landmark is the answer; with a
    fitted ``GraphPrior`` it is the candidate of the combination with the lowest penalty (Eq. 4)
    over the k⁵ combinations. A landmark without candidates keeps none.

    With ``handedness`` (+1 or −1, :func:`igrpn.prior.fit_handedness`; beyond the paper, see
    ``Profile.merge_mirror_pairs``) the two eyes are answered as a pair: two places at least
    ``min_pair_distance_mm`` apart (the best pair by the product of scores, or the prior's best
    such combination), then named left and right by the sign of
    :func:`igrpn.prior.face_handedness` of the five answers: if it is the wrong one, the two eyes'
    candidate rows exchange their names. ``pair_eyes`` (default: when ``handedness`` is given)
    asks for the pair alone, e.g. for a checkpoint without a measured handedness: the two places
    are then named by score.

    ``class_top_k`` (``Profile.top_k``; ``None``: every listed candidate) is how many candidates of
    each class the prior combines. A mirror pair trained as one class (``merge_mirror_pairs``)
    lists that class's places under both names, ``2 · top_k`` of them; it is one class here too:
    the prior combines its first ``class_top_k`` places (and always its best pair), as the paper
    takes the top 2 of every class (docs/design.md §10.19).
    """
    # Plain arrays throughout and one DataFrame written at the end: per-row pandas indexing cost
    # more than everything else in the post-processing (benchmarks/NOTES.md §3b).
    rows = rows.copy()
    rows["selected"] = False
    if rows.empty:
        return rows
    names = rows["landmark"].to_numpy()
    ranks = rows["rank"].to_numpy()
    all_centres = rows[["x", "y", "z"]].to_numpy(dtype=np.float64)
    all_scores = rows["score"].to_numpy(dtype=np.float64)
    groups = [np.flatnonzero(names == name) for name in LANDMARKS]  # positions, by rank below
    groups = [g[np.argsort(ranks[g], kind="stable")] for g in groups]
    centres = [all_centres[g] for g in groups]
    scores = [all_scores[g] for g in groups]
    pairs = LEFT_RIGHT_PAIRS if (handedness is not None if pair_eyes is None else pair_eyes) else ()
    choice = [0] * len(LANDMARKS)
    if prior is not None and all(len(g) > 0 for g in groups):
        # Which of each list's candidates the prior combines (positions in the list).
        usable = [np.arange(len(g)) for g in groups]
        for a, b in pairs:
            if class_top_k is not None and _pooled(centres[a], centres[b]):
                best = _best_pair(centres[a], scores[a], centres[b], scores[b], min_pair_distance_mm)
                usable[a] = usable[b] = np.union1d(np.arange(min(class_top_k, len(groups[a]))), best)
        result = prior.select_all([c[u] for c, u in zip(centres, usable)],
                                  scores=[s[u] for s, u in zip(scores, usable)], lam=prior_lambda)
        combinations = np.stack([u[result["combinations"][:, c]] for c, u in enumerate(usable)], axis=1)
        costs = np.asarray(result["costs"], dtype=np.float64).copy()
        for a, b in pairs:
            # A pair's two answers must be two places: combinations putting both on one are out.
            gap = np.linalg.norm(centres[a][combinations[:, a]] - centres[b][combinations[:, b]], axis=1)
            costs[gap < min_pair_distance_mm] = np.inf
        choice = [int(c) for c in combinations[int(np.argmin(costs))]]
    elif pairs:
        for a, b in pairs:
            if len(groups[a]) and len(groups[b]):
                choice[a], choice[b] = _best_pair(centres[a], scores[a], centres[b], scores[b], min_pair_distance_mm)
    selected = np.zeros(len(rows), dtype=bool)
    for group, index in zip(groups, choice):
        if len(group):
            selected[group[index]] = True
    rows["selected"] = selected
    if pairs and handedness is not None and all(len(g) for g in groups):
        answers = np.stack([c[i] for c, i in zip(centres, choice)])
        if np.sign(face_handedness(answers)) == -np.sign(handedness):
            names, class_ids = names.copy(), rows["class_id"].to_numpy().copy()
            for a, b in pairs:  # the mirror image: exchange the two lists' names
                names[groups[a]], class_ids[groups[a]] = LANDMARKS[b], b + 1
                names[groups[b]], class_ids[groups[b]] = LANDMARKS[a], a + 1
            rows["landmark"], rows["class_id"] = names, class_ids
    for a, b in pairs:
        if len(groups[a]) and choice[a] != choice[b] and _pooled(centres[a], centres[b]):
            rows = _split_pooled_pair(rows, groups[a], groups[b], choice[a], choice[b])
    return rows


def _pooled(centres_a: np.ndarray, centres_b: np.ndarray) -> bool:
    """True when two landmarks list the same places in the same order (a merged mirror pair)."""
    return len(centres_a) == len(centres_b) and np.array_equal(centres_a, centres_b)


def _split_pooled_pair(rows: pd.DataFrame, group_a, group_b, answer_a: int, answer_b: int) -> pd.DataFrame:
    """Give each place of a pooled (merged-score) eye list to one eye only: the one whose answer
    is nearer (ties to the first), so that no place is listed, and counted by AP, under both names.
    ``group_a``/``group_b`` are row positions holding the same places in the same order; ranks are
    renumbered."""
    centres = rows[["x", "y", "z"]].to_numpy(dtype=np.float64)[group_a]
    to_a = np.linalg.norm(centres - centres[answer_a], axis=1)
    to_b = np.linalg.norm(centres - centres[answer_b], axis=1)
    keep_in_a = to_a <= to_b
    keep_in_a[answer_a], keep_in_a[answer_b] = True, False
    keep = np.ones(len(rows), dtype=bool)
    keep[np.asarray(group_a)[~keep_in_a]] = False
    keep[np.asarray(group_b)[keep_in_a]] = False
    rows = rows.iloc[np.flatnonzero(keep)]
    # New ranks: order within each landmark by the old rank (ties by position), numbered from 0.
    names, old_ranks = rows["landmark"].to_numpy(), rows["rank"].to_numpy()
    new_ranks = np.empty(len(rows), dtype=np.int64)
    for name in np.unique(names):
        members = np.flatnonzero(names == name)
        new_ranks[members[np.argsort(old_ranks[members], kind="stable")]] = np.arange(len(members))
    rows = rows.assign(rank=new_ranks)
    return rows.sort_values(["class_id", "rank"]).reset_index(drop=True)


def _best_pair(centres_a, scores_a, centres_b, scores_b, min_distance: float) -> tuple[int, int]:
    """Indices (i, j) of the highest score product s_a[i]·s_b[j] with the two centres at least
    ``min_distance`` apart ((0, 0) when no pair is)."""
    product = np.outer(scores_a, scores_b)
    product[np.linalg.norm(centres_a[:, None] - centres_b[None], axis=-1) < min_distance] = -np.inf
    if not np.isfinite(product).any():
        return 0, 0
    i, j = np.unravel_index(int(np.argmax(product)), product.shape)
    return int(i), int(j)


def predict_cases(detector: Detector, cases, prior=None, progress: bool = True):
    """Run ``detector`` (without its own prior) over ``cases`` once, answering with and without
    ``prior``.

    Returns:
        (rows without prior, rows with prior or ``None``, timing DataFrame): the rows carry a
        ``case_id`` column and every candidate; timing has per-case ``model_ms``,
        ``postprocess_ms`` (decode, softmax, NMS, top-k) and ``prior_ms``.
    """
    saved_prior, detector.prior = detector.prior, None
    plain, with_prior, timing = [], [], []
    try:
        for case in tqdm(cases, desc="predict", disable=not progress, leave=False):
            rows = detector.predict_grid(case.volume, case.affine)
            rows.insert(0, "case_id", case.case_id)
            plain.append(rows)
            times = dict(detector.last_timing, case_id=case.case_id, prior_ms=float("nan"))
            if prior is not None:
                start = time.perf_counter()
                chosen = select_answers(detector.last_candidates, prior, detector.prior_lambda, **detector.pairing())
                chosen.insert(0, "case_id", case.case_id)
                with_prior.append(chosen)
                times["prior_ms"] = (time.perf_counter() - start) * 1e3
            timing.append(times)
    finally:
        detector.prior = saved_prior
    plain_rows = pd.concat(plain, ignore_index=True)
    prior_rows = pd.concat(with_prior, ignore_index=True) if prior is not None else None
    return plain_rows, prior_rows, pd.DataFrame(timing)
