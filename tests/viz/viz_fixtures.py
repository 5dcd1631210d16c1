"""Tiny synthetic inputs shared by the figure and viewer tests (``from viz_fixtures import ...``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd

from igrpn import config, viz

RED, BLUE = viz.BOX_COLOURS["gt"], viz.BOX_COLOURS["pred"]

# A face looking towards +j (anterior): left eye at +i, brow above the eyes, nose in front.
FACE_VOX = np.array([
    [20.0, 16.0, 18.0],  # left_eye
    [16.0, 17.0, 20.0],  # middle_eyebrow
    [12.0, 16.0, 18.0],  # right_eye
    [16.0, 21.0, 13.0],  # nose_tip
    [16.0, 17.0, 7.0],   # chin
])


def random_volume(shape=(32, 32, 32), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def face_case(spacing=2.0) -> SimpleNamespace:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-30.0, 5.0, 10.0]
    landmarks_mm = FACE_VOX * spacing + affine[:3, 3]
    return SimpleNamespace(volume=random_volume(), affine=affine, landmarks_vox=FACE_VOX.copy(),
                           landmarks_mm=landmarks_mm, case_id="case_a")


def face_predictions(offset_vox=(2.0, 0.0, 0.0), spacing=2.0, case: SimpleNamespace | None = None) -> pd.DataFrame:
    """Two candidates per landmark: rank 0 (selected) at GT + offset, rank 1 six voxels away in j."""
    centres = np.concatenate([FACE_VOX + offset_vox, FACE_VOX + [0.0, 6.0, 0.0]])
    frame = pd.DataFrame({
        "landmark": list(config.LANDMARKS) * 2,
        "class_id": list(range(1, 6)) * 2,
        "rank": [0] * 5 + [1] * 5,
        "selected": [True] * 5 + [False] * 5,
        "score": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05],
        "i": centres[:, 0], "j": centres[:, 1], "k": centres[:, 2],
    })
    frame["w"] = frame["h"] = frame["d"] = np.tile(config.GT_BOX_MM, 2)
    if case is not None:
        world = centres * spacing + case.affine[:3, 3]
        frame["x"], frame["y"], frame["z"] = world.T
        frame.insert(0, "case_id", case.case_id)
    return frame


def colour_mask(rgb: np.ndarray, colour) -> np.ndarray:
    return np.all(rgb == np.asarray(colour, np.uint8), axis=-1)


def tiny_manifest(folder, n_cases=2) -> Path:
    """NIfTI volumes (noise, identity-like affine at 2 mm) and a manifest listing them."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    rows = []
    for n in range(n_cases):
        nib.save(nib.Nifti1Image(random_volume(seed=n), affine), folder / f"case{n}.nii.gz")
        world = (FACE_VOX + n) * 2.0
        rows.append({"case_id": f"case{n}", "image": f"case{n}.nii.gz", "split": "test",
                     **{f"{name}_{axis}": world[i, a] for i, name in enumerate(config.LANDMARKS)
                        for a, axis in enumerate("xyz")}})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"
