"""The rows that get scored: ground truth, the selected answers, the image-blind reference.

Every table is a frame of rows ``case_id, landmark, x, y, z, w, h, d`` (world mm, centre form):
the ground truth's boxes are cubes of ``GT_BOX_MM``; a detector's answers are its ``selected``
rows (docs/design.md §7).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from igrpn.config import GT_BOX_MM, LANDMARKS


def ground_truth(cases) -> pd.DataFrame:
    """GT rows ``case_id, landmark, x, y, z, w, h, d`` (world mm; cubes of ``GT_BOX_MM``)."""
    records = []
    for case in cases:
        for index, name in enumerate(LANDMARKS):
            x, y, z = (float(v) for v in case.landmarks_mm[index])
            size = GT_BOX_MM[index]
            records.append({"case_id": case.case_id, "landmark": name, "x": x, "y": y, "z": z,
                            "w": size, "h": size, "d": size})
    return pd.DataFrame.from_records(records)


def configuration_label(run: str, prior: bool) -> str:
    """How the tables name a configuration: ``rpn_ib`` or ``rpn_ib + prior``."""
    return f"{run}{' + prior' if prior else ''}"


def answers(rows: pd.DataFrame) -> pd.DataFrame:
    """The selected row of each (case, landmark): the detections that the tables score."""
    return rows[rows["selected"].astype(bool)].reset_index(drop=True)


def mean_position_answers(train_landmarks_mm, case_ids) -> pd.DataFrame:
    """The image-blind reference answers: each landmark at its mean training position.

    Args:
        train_landmarks_mm: (N, 5, 3) world mm of the training annotations, ``LANDMARKS`` order.
        case_ids: the cases to answer.

    Returns:
        One selected row per case and landmark (``case_id, landmark, class_id, rank, selected,
        score, x, y, z, w, h, d``; boxes of ``GT_BOX_MM``, score 1).
    """
    landmarks = np.asarray(train_landmarks_mm, dtype=np.float64)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (len(LANDMARKS), 3) or len(landmarks) == 0:
        raise ValueError(f"mean_position_answers: expected training landmarks (N, {len(LANDMARKS)}, 3) "
                         f"with N >= 1, got shape {landmarks.shape}")
    mean = landmarks.mean(axis=0)
    records = [{"case_id": case_id, "landmark": name, "class_id": index + 1, "rank": 0, "selected": True,
                "score": 1.0, "x": mean[index, 0], "y": mean[index, 1], "z": mean[index, 2],
                "w": GT_BOX_MM[index], "h": GT_BOX_MM[index], "d": GT_BOX_MM[index]}
               for case_id in case_ids for index, name in enumerate(LANDMARKS)]
    return pd.DataFrame.from_records(records)
