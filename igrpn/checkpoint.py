"""The checkpoint format: what a training run writes and what inference and resuming read.

A checkpoint is a ``torch.save`` zip holding only tensors and plain data (format version
:data:`CHECKPOINT_FORMAT`): ``format_version``, ``method``, ``iou_balance``, ``config`` (the run's
settings with the profile as a dict), ``epoch``, ``global_step``, ``model`` and ``optimizer`` state,
the RNG state and the training split's face handedness (docs/design.md §6). It is loaded with
``weights_only=True`` only, so a file carrying pickled code is refused, never run.
"""

from __future__ import annotations

import math
import re
import zipfile
from pathlib import Path

import torch

from igrpn import config
from igrpn.config import Profile
from igrpn.models import build_model


#: Bumped whenever the checkpoint layout changes; older or newer files are refused.
CHECKPOINT_FORMAT = 1
#: The file a run folder holds.
CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, unsafe, or of another method or version."""


#: Entries of a checkpoint that inference and resuming read.
CHECKPOINT_KEYS = ("format_version", "method", "iou_balance", "config", "model")


def load_checkpoint(path: str | Path, method: str | None = None) -> dict:
    """Load a checkpoint safely (``weights_only=True``: pickled code is refused, never run).

    Raises:
        CheckpointError naming the file: missing, not a file of ``torch.save``, pickled objects,
        another format version, an entry of ``CHECKPOINT_KEYS`` missing, an unknown method,
        weights that are not finite tensors, or (when ``method`` is given) another method.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a checkpoint" if path.is_dir() else "checkpoint not found"
        raise CheckpointError(f"{path}: {what}")
    ckpt = _read_torch_file(path)
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError(f"{path}: not an igrpn checkpoint (no format_version)")
    if ckpt["format_version"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path}: checkpoint format {ckpt['format_version']} is not supported "
            f"(this igrpn reads format {CHECKPOINT_FORMAT})"
        )
    _check_entries(ckpt, path)
    if method is not None and ckpt.get("method") != method:
        raise CheckpointError(f"{path}: checkpoint is for method {ckpt.get('method')!r}, not {method!r}")
    return ckpt


def _read_torch_file(path: Path):
    """``torch.load(weights_only=True)`` with every failure a :class:`CheckpointError`.

    torch's own messages advise re-loading with ``weights_only=False``, which would run whatever
    code the file carries: they are never passed on.
    """
    # torch.save has written zip archives since torch 1.6; anything else is not an igrpn file.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not an igrpn checkpoint (not a file written by torch.save)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - reported with the file name
        refused = re.search(r"GLOBAL (\S+)", str(error))
        if refused:
            raise CheckpointError(
                f"{path}: refused: it holds pickled Python objects ({refused.group(1)}) that loading would "
                "import and run; an igrpn checkpoint holds only tensors and plain data") from None
        raise CheckpointError(f"{path}: not an igrpn checkpoint (torch cannot read it: "
                              f"{type(error).__name__})") from None


def _check_entries(ckpt: dict, path: Path) -> None:
    """The entries inference and resuming read are there, and the weights are finite tensors."""
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    if "config" in ckpt and not (isinstance(ckpt["config"], dict) and isinstance(ckpt["config"].get("profile"), dict)):
        missing.append("config['profile']")
    if missing:
        raise CheckpointError(f"{path}: incomplete igrpn checkpoint: no {', '.join(missing)}")
    if ckpt["method"] not in config.METHODS:
        raise CheckpointError(f"{path}: unknown method {ckpt['method']!r} (expected one of {list(config.METHODS)})")
    weights = ckpt["model"]
    if not (isinstance(weights, dict) and weights and all(torch.is_tensor(v) for v in weights.values())):
        raise CheckpointError(f"{path}: its 'model' entry is not a dict of weight tensors")
    bad = [name for name, tensor in weights.items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise CheckpointError(f"{path}: {len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]!r}); "
                              "the training diverged or the file is damaged")


def checkpoint_profile(ckpt: dict, path: str | Path) -> Profile:
    """The profile a checkpoint was trained with, refused when inference could not run with it.

    Raises:
        CheckpointError naming the file and the field: another igrpn version's profile, or a size
        that is not positive (a spacing of 0 mm would divide by zero, ``top_k = 0`` answer nothing).
    """
    try:
        profile = Profile.from_dict(ckpt["config"]["profile"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: {' '.join(str(error).split())}") from None
    problems = [f"{name} = {getattr(profile, name)!r} (must be a positive number)"
                for name in ("spacing_mm", "feature_stride_mm") if not _positive(getattr(profile, name))]
    problems += [f"{name} = {getattr(profile, name)!r} (must be a positive integer)"
                 for name in ("width", "top_k")
                 if not (_positive(getattr(profile, name)) and getattr(profile, name) == int(getattr(profile, name)))]
    problems += [f"{name} = {getattr(profile, name)!r} (every size must be a positive number of mm)"
                 for name in ("gt_box_mm", "anchor_sizes_mm")
                 if not (getattr(profile, name) and all(_positive(v) for v in getattr(profile, name)))]
    if problems:
        raise CheckpointError(f"{path}: unusable profile: {'; '.join(problems)}")
    return profile


def _positive(value) -> bool:
    """A finite number above zero (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def model_from_checkpoint(ckpt: dict, path: str | Path):
    """Build the model a checkpoint of :func:`load_checkpoint` describes and load its weights.

    Returns:
        (model, profile).

    Raises:
        CheckpointError naming the file: a profile that does not build the model, weights missing,
        unexpected or of another shape (e.g. a checkpoint whose width was edited).
    """
    profile = checkpoint_profile(ckpt, path)
    try:
        model = build_model(ckpt["method"], profile, iou_balance=bool(ckpt["iou_balance"]))
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError) as error:
        raise CheckpointError(f"{path}: its profile does not build a {ckpt['method']} model "
                              f"({type(error).__name__}: {' '.join(str(error).split())})") from None
    mismatch = _weights_mismatch(model.state_dict(), ckpt["model"])
    if mismatch:
        raise CheckpointError(f"{path}: its weights do not fit the {ckpt['method']} model its profile "
                              f"describes: {mismatch}")
    model.load_state_dict(ckpt["model"])
    return model, profile


def _weights_mismatch(expected: dict, stored: dict) -> str:
    """One line on how ``stored`` weights differ from a model's ``expected`` state dict ('' if not)."""
    missing = [name for name in expected if name not in stored]
    unexpected = [name for name in stored if name not in expected]
    reshaped = [name for name in expected if name in stored and stored[name].shape != expected[name].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (first: {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]!r})")
    if reshaped:
        name = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape (first: {name!r}, {tuple(stored[name].shape)} in the "
                     f"file, {tuple(expected[name].shape)} in the model)")
    return "; ".join(parts)
