"""Every trained configuration of a report folder predicted on the test split, once.

The answers with and without the graph prior come from the same candidates; the test split is
scored here and by nothing else (docs/design.md §8).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from igrpn.config import RUN_CONFIGS, Profile
from igrpn.data import landmarks_from_row, load_cases, read_manifest
from igrpn.detect import Detector, predict_cases
from igrpn.evaluation.answers import answers, ground_truth, mean_position_answers
from igrpn.evaluation.tables import REFERENCE_RUN, scores_record, write_csv
from igrpn.prior import GraphPrior


def evaluate_runs(
    profile: Profile,
    manifest: str | Path,
    report_dir: str | Path,
    prior_path: str | Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Predict the test split with every trained configuration, with and without the prior.

    Reads ``report_dir/runs/<run>/checkpoint.pt`` for each run of ``RUN_CONFIGS`` that exists and
    writes ``report_dir/predictions/<run>_{noprior,prior}.csv`` (every candidate, world mm and
    voxels) and ``report_dir/predictions/<run>_timing.csv``. The image-blind reference
    (:func:`mean_position_answers`, run ``REFERENCE_RUN``, from the manifest's training split) is
    scored beside them and written to ``report_dir/predictions/reference_mean_position.csv``.

    Returns:
        ``{"results": DataFrame (one row per run and prior setting, metrics as fractions, CIs),
        "predictions": {(run, prior): selected rows}, "gt": DataFrame, "missing": [runs]}``.
    """

    report_dir = Path(report_dir)
    table = read_manifest(manifest)
    cases = load_cases(table[table["split"] == "test"], profile.spacing_mm, progress=progress)
    gt = ground_truth(cases)
    prior = GraphPrior.load(prior_path) if prior_path is not None and Path(prior_path).exists() else None
    out = report_dir / "predictions"
    out.mkdir(parents=True, exist_ok=True)

    records, predictions, missing = [], {}, []
    for run, (method, iou_balance) in RUN_CONFIGS.items():
        checkpoint = report_dir / "runs" / run / "checkpoint.pt"
        if not checkpoint.exists():
            missing.append(run)
            continue
        detector = Detector.from_checkpoint(checkpoint)
        detector.predict_grid(cases[0].volume, cases[0].affine)  # warm-up: first call allocates
        plain, with_prior, timing = predict_cases(detector, cases, prior=prior, progress=progress)
        write_csv(plain, out / f"{run}_noprior.csv")
        write_csv(timing, out / f"{run}_timing.csv")
        settings = [(False, plain)]
        if with_prior is not None:
            write_csv(with_prior, out / f"{run}_prior.csv")
            settings.append((True, with_prior))
        for use_prior, rows in settings:
            chosen = answers(rows)
            predictions[(run, use_prior)] = chosen
            time_ms = timing["model_ms"] + timing["postprocess_ms"]
            if use_prior:
                time_ms = time_ms + timing["prior_ms"]
            records.append({"run": run, "method": method, "iou_balance": iou_balance, "prior": use_prior,
                            **scores_record(chosen, gt, n_boot, seed),
                            "time_ms": float(np.median(time_ms)),
                            "model_ms": float(np.median(timing["model_ms"])),
                            "postprocess_ms": float(np.median(timing["postprocess_ms"]
                                                              + (timing["prior_ms"] if use_prior else 0.0))),
                            "n_cases": len(cases)})

    train_rows = table[table["split"] == "train"]
    if len(train_rows):
        reference = mean_position_answers(np.stack([landmarks_from_row(row) for _, row in train_rows.iterrows()]),
                                          [case.case_id for case in cases])
        write_csv(reference, out / "reference_mean_position.csv")
        predictions[(REFERENCE_RUN, False)] = reference
        records.append({"run": REFERENCE_RUN, "method": "reference", "iou_balance": False, "prior": False,
                        **scores_record(reference, gt, n_boot, seed), "time_ms": np.nan, "model_ms": np.nan,
                        "postprocess_ms": np.nan, "n_cases": len(cases)})
    return {"results": pd.DataFrame.from_records(records), "predictions": predictions, "gt": gt,
            "missing": missing}
