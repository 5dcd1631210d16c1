"""Does a gated graph prior keep the RPN's confident answers? An analysis on validation data.

``python -m benchmarks.prior_gate CHECKPOINT SEED [--margins 0 2 8 ...]``

The paper's rule (Eq. 4) takes the lowest-penalty combination of the top-k candidates and ignores
the scores. The gated rule, beyond the paper, lets the prior overrule the scores only for faces
that are implausible: among the combinations whose log-penalty is at most the largest log-penalty
of the training faces themselves plus ``margin``, the highest-scoring one wins; the paper's choice
is kept where no combination is that plausible. ``margin`` → ∞ is the RPN without the prior.

The prior is fitted on the run's training volumes and scored on its validation hold-out, exactly
as ``igrpn.experiment`` scores a run (the same ``split_train_val`` split of the seed); the
checkpoint is one the runner wrote (``--out``/NAME/seedS/checkpoint.pt). The test split is not read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from igrpn.config import LANDMARKS
from igrpn.data import load_cases, read_manifest
from igrpn.detect import Detector, select_answers
from igrpn.training.experiment import score_answers, validation_prior
from igrpn.prior import GraphPrior, landmarks_from_manifest
from igrpn.evaluation.answers import answers, ground_truth
from igrpn.training.loop import split_train_val


class GatedPrior(GraphPrior):
    """A fitted :class:`GraphPrior` whose selection is gated at ``gate_log_penalty`` (see above)."""

    def __init__(self, prior: GraphPrior, gate_log_penalty: float):
        super().__init__(prior.mu, prior.sigma, prior.n_fit, prior.mean_face_mm)
        self.gate_log_penalty = float(gate_log_penalty)

    def select_all(self, candidates, scores=None, lam: float = 0.0) -> dict:
        result = super().select_all(candidates, scores=scores, lam=lam)
        plausible = result["log_penalties"] <= self.gate_log_penalty
        if scores is None or not plausible.any():
            return result
        combinations = result["combinations"]  # (M, 5) candidate index per landmark
        with np.errstate(divide="ignore"):
            log_score = sum(np.log(np.asarray(s, dtype=np.float64))[combinations[:, c]]
                            for c, s in enumerate(scores))
        # select_answers takes the argmin of "costs" after its eye-pair constraint
        return dict(result, costs=np.where(plausible, -log_score, np.inf))


def validation_candidates(checkpoint: Path, seed: int, manifest: Path):
    """The run's validation cases' candidate rows, their ground truth, the detector and the
    training faces (mm) of the seed's split."""
    detector = Detector.from_checkpoint(checkpoint)
    table = read_manifest(manifest)
    train = table[table["split"] == "train"]
    train_ids, val_ids = split_train_val(list(train["case_id"]), detector.profile.val_fraction, seed)
    cases = load_cases(train[train["case_id"].isin(val_ids)], detector.profile.spacing_mm, progress=False)
    candidates = []
    for case in cases:
        detector.predict_grid(case.volume, case.affine)
        candidates.append((case.case_id, detector.last_candidates))
    return candidates, ground_truth(cases), detector, train[train["case_id"].isin(train_ids)]


def confident_kept(rows: pd.DataFrame, detector, min_score: float) -> pd.DataFrame:
    """One volume's candidate rows where every landmark whose answer without the prior scores at
    least ``min_score`` keeps that answer alone: the prior then chooses only the unsure ones."""
    plain = select_answers(rows, None, 0.0, **detector.pairing())
    sure = set(plain.loc[plain["selected"] & (plain["score"] >= min_score), "landmark"])
    keep = plain["selected"] | ~plain["landmark"].isin(sure)
    kept = plain[keep].drop(columns="selected")
    return kept.assign(rank=kept.groupby("landmark")["score"].rank(ascending=False, method="first") - 1)


def score_rule(candidates, gt, detector, prior, min_score: float | None = None) -> dict:
    """Validation scores of the answers ``prior`` selects (``None``: the RPN's top answers),
    after :func:`confident_kept` when ``min_score`` is given."""
    rows = [select_answers(rows if min_score is None else confident_kept(rows, detector, min_score), prior, 0.0,
                           **detector.pairing()).assign(case_id=case_id)
            for case_id, rows in candidates]
    return score_answers(answers(pd.concat(rows, ignore_index=True)), gt)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("seed", type=int, help="the run's seed (it fixes the validation hold-out)")
    parser.add_argument("--manifest", type=Path, default=Path("data_manifest.csv"))
    parser.add_argument("--margins", type=float, nargs="+", default=[0, 1, 2, 4, 8, 16])
    parser.add_argument("--min-scores", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    args = parser.parse_args(argv)
    candidates, gt, detector, fit_table = validation_candidates(args.checkpoint, args.seed, args.manifest.resolve())
    prior = validation_prior(fit_table)
    largest = float(prior.log_penalty(landmarks_from_manifest(fit_table)).max())
    rules = [("no prior", None, None), ("paper (Eq. 4)", prior, None)]
    rules += [(f"gated, margin {m:g}", GatedPrior(prior, largest + m), None) for m in args.margins]
    rules += [(f"prior if score < {t:g}", prior, t) for t in args.min_scores]
    print(f"{args.checkpoint} (seed {args.seed}, {len(candidates)} validation volumes; "
          f"largest training log-penalty {largest:.2f})")
    print(f"{'rule':<22} d-mean  hit50  eyes   " + " ".join(f"{n[:8]:>8}" for n in LANDMARKS))
    for label, rule, min_score in rules:
        s = score_rule(candidates, gt, detector, rule, min_score)
        print(f"{label:<22} {s['val_d_mean']:6.2f}  {s['val_hit50']:5.2f}  {s['val_eyes_found']:>5}  "
              + " ".join(f"{s['val_' + n]:8.1f}" for n in LANDMARKS))


if __name__ == "__main__":
    main()
