"""Shared helpers for the CLI, robustness and markups tests: a tiny untrained checkpoint in the
format ``igrpn.training.loop`` writes, NIfTI writers, and a fitted graph prior.

Import the fixtures into a test module (``from fixtures_ckpt import smoke_checkpoint``); untrained
weights are enough for tests that check shapes, files and messages.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

#: A face (world mm, RAS) in config.LANDMARKS order: eyes 30 mm apart, brow above, nose, chin.
FACE_MM = np.array([
    [-15.0, 0.0, 0.0],    # left_eye
    [0.0, 5.0, 10.0],     # middle_eyebrow
    [15.0, 0.0, 0.0],     # right_eye
    [0.0, 15.0, -15.0],   # nose_tip
    [0.0, 8.0, -38.0],    # chin
])


def make_checkpoint(path, method: str = "rpn", profile_name: str = "smoke", seed: int = 0) -> Path:
    """Save an untrained model of ``method`` as the training loop's checkpoint dict (format 1)."""
    import igrpn
    from igrpn.config import get_profile
    from igrpn.models import build_model
    from igrpn.checkpoint import CHECKPOINT_FORMAT
    from igrpn.io import atomic_torch_save

    torch.manual_seed(seed)
    profile = get_profile(profile_name)
    model = build_model(method, profile, iou_balance=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=profile.lr)
    path = Path(path)
    atomic_torch_save({
        "format_version": CHECKPOINT_FORMAT,
        "igrpn_version": igrpn.__version__,
        "method": method,
        "iou_balance": True,
        "config": {"profile": profile.to_dict(), "method": method, "iou_balance": True,
                   "seed": seed, "manifest": "none"},
        "epoch": 0,
        "global_step": 0,
        "val_ids": [],
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "handedness": 1,
    }, path)
    return path


@pytest.fixture(scope="session")
def smoke_checkpoint(tmp_path_factory) -> Path:
    """An untrained IG-RPN checkpoint of the smoke profile."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt")


@pytest.fixture(scope="session")
def prior_file(tmp_path_factory) -> Path:
    """A graph prior fitted on 40 jittered copies of ``FACE_MM``."""
    from igrpn.prior import GraphPrior

    rng = np.random.default_rng(0)
    faces = FACE_MM[None] * rng.uniform(0.9, 1.1, size=(40, 1, 1)) + rng.normal(0, 1.0, size=(40, 5, 3))
    return GraphPrior().fit(faces).save(tmp_path_factory.mktemp("prior") / "graph_prior.json")


def write_nifti(path, data, affine=None) -> Path:
    """Save ``data`` with ``affine`` (default 4 mm isotropic) as NIfTI; returns the path."""
    affine = np.diag([4.0, 4.0, 4.0, 1.0]) if affine is None else np.asarray(affine, dtype=np.float64)
    path = Path(path)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def random_volume(shape=(24, 20, 16), seed: int = 0) -> np.ndarray:
    """Speckle-like positive noise, float32."""
    return np.random.default_rng(seed).rayleigh(1.0, size=shape).astype(np.float32)
