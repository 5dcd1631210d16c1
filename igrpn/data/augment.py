"""Training samples: rotations and mirrors of a case, the dataset and the batch collation.

Paper §3: rotation in [−25°, 25°] and flipping. A rotation resamples the volume and moves the
landmarks with the same matrix; any mirror swaps ``left_eye`` and ``right_eye``, since a mirrored
face has the other handedness (docs/design.md §4, §10).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from igrpn.config import LEFT_RIGHT_PAIRS
from igrpn.data.cases import Case
from igrpn.data.volume import inside_volume


#: Batches are padded to a multiple of this (three ×2 down-samplings in the backbone).
PAD_MULTIPLE = 8
#: Rotations drawn before giving up on one that keeps every landmark inside the volume.
MAX_ROTATION_DRAWS = 10


def rotation_matrix(angles_deg) -> np.ndarray:
    """(3, 3) rotation R = Rz · Ry · Rx for angles (about x, about y, about z) in degrees."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rotate_points(points_vox: np.ndarray, rotation: np.ndarray, shape) -> np.ndarray:
    """Where :func:`rotate_sample` moves voxel positions (K, 3): ``R (p − c) + c``, c the centre."""
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    return (np.asarray(points_vox, dtype=np.float64) - centre) @ np.asarray(rotation, dtype=np.float64).T + centre


def rotate_sample(volume: torch.Tensor, landmarks_vox: np.ndarray, rotation: np.ndarray,
                  origin: Sequence[int] = (0, 0, 0), out_shape: Sequence[int] | None = None):
    """Rotate a volume and its landmarks by the same matrix about the volume's centre.

    A landmark at ``p`` moves to ``R (p − c) + c`` with ``c = (shape − 1) / 2``; the volume is
    resampled trilinearly so its content moves the same way (isotropic voxels, so a rotation of
    voxel indices is a rotation in mm). Voxels whose source lies outside the volume take the
    volume's minimum. ``origin`` and ``out_shape`` resample only a window of the rotated volume
    (a training crop costs then only its own voxels); landmarks are returned in that window.

    Args:
        volume: (X, Y, Z) float32 tensor.
        landmarks_vox: (K, 3) voxel positions.
        rotation: (3, 3) rotation matrix.
        origin: first voxel of the window in the rotated volume.
        out_shape: window shape (default: the whole volume).

    Returns:
        (volume (X', Y', Z') float32 tensor, landmarks (K, 3) float64).
    """
    shape = volume.shape[-3:]
    out_shape = tuple(shape) if out_shape is None else tuple(int(n) for n in out_shape)
    centre = (np.asarray(shape, dtype=np.float64) - 1) / 2
    rotation = np.asarray(rotation, dtype=np.float64)
    offset = np.asarray(origin, dtype=np.float64)
    landmarks = rotate_points(landmarks_vox, rotation, shape) - offset

    # Each output voxel q samples the input at R⁻¹ (q − c) + c = Rᵀ (q − c) + c (row form: (q − c) R).
    axes = [torch.arange(n, dtype=torch.float32) + float(o) for n, o in zip(out_shape, offset)]
    index = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (X, Y, Z, 3)
    centre_t = torch.as_tensor(centre, dtype=torch.float32)
    source = (index - centre_t) @ torch.as_tensor(rotation, dtype=torch.float32) + centre_t
    # align_corners=True: −1 and +1 are the centres of the first and last voxels.
    extent = torch.as_tensor([max(n - 1, 1) for n in shape], dtype=torch.float32)
    grid = (2 * source / extent - 1).flip(-1)  # grid_sample wants (z, y, x) for (N, C, X, Y, Z)
    minimum = volume.min()
    # Sampling (volume − min) with zero padding fills outside voxels with the minimum.
    rotated = torch.nn.functional.grid_sample(
        (volume - minimum)[None, None], grid[None], mode="bilinear", padding_mode="zeros",
        align_corners=True)[0, 0] + minimum
    return rotated, landmarks


def flip_sample(volume: torch.Tensor, landmarks_vox: np.ndarray, axes: Sequence[int]):
    """Mirror a volume and its landmarks along the given axes.

    A mirror changes the face's chirality whatever the axis, so after an odd number of flips the
    fetus's left eye is where a right eye is: the rows of ``config.LEFT_RIGHT_PAIRS`` are swapped.

    Args:
        volume: (X, Y, Z) tensor.
        landmarks_vox: (5, 3) voxel positions in ``config.LANDMARKS`` order.
        axes: axes (0, 1, 2) to flip.

    Returns:
        (volume (X, Y, Z) tensor, landmarks (5, 3) float64).
    """
    axes = tuple(int(a) for a in axes)
    landmarks = np.array(landmarks_vox, dtype=np.float64)
    if not axes:
        return volume, landmarks
    shape = volume.shape[-3:]
    flipped = torch.flip(volume, dims=[a - 3 for a in axes])
    for axis in axes:
        landmarks[:, axis] = (shape[axis] - 1) - landmarks[:, axis]
    if len(axes) % 2 == 1:
        for left, right in LEFT_RIGHT_PAIRS:
            landmarks[[left, right]] = landmarks[[right, left]]
    return flipped, landmarks


class LandmarkDataset(Dataset):
    """Cases as training items, with the paper's augmentation (random rotation and flips).

    Each item is reproducible: its random numbers come from
    ``numpy.random.default_rng((seed, epoch, index))``. Call :meth:`set_epoch` before each epoch
    (before creating the DataLoader iterator when workers are used, so they see it).

    Item: ``{"volume": (1, X, Y, Z) float32, "landmarks_vox": (5, 3) float32, "case_id": str}``.

    Args:
        cases: list of :class:`Case`.
        augment: apply rotation and flips.
        rotation_deg: angle about each of x, y, z drawn uniformly in [−rotation_deg, rotation_deg];
            a draw that would move a landmark out of the volume is redrawn (up to
            ``MAX_ROTATION_DRAWS`` times, then no rotation).
        flip_prob: probability of flipping each axis, independently.
        seed: non-negative integer.
        crop_size: edge (voxels) of a random cubic training crop that keeps every landmark at
            least ``crop_margin`` voxels inside (cuts the cost of a step by (crop / volume)³);
            ``None`` keeps the whole volume. Applied after rotation and flips, also without
            ``augment`` (then centred on the landmarks).
        crop_margin: voxels kept between a landmark and the crop's faces (half the largest box).
    """

    def __init__(self, cases: Sequence[Case], augment: bool = False, rotation_deg: float = 25.0,
                 flip_prob: float = 0.5, seed: int = 0, crop_size: int | None = None,
                 crop_margin: float = 0.0):
        if rotation_deg < 0 or not np.isfinite(rotation_deg):
            raise ValueError(f"rotation_deg must be a non-negative number, got {rotation_deg}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must lie in [0, 1], got {flip_prob}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        self.cases = list(cases)
        self.augment = augment
        self.rotation_deg = float(rotation_deg)
        self.flip_prob = float(flip_prob)
        self.seed = int(seed)
        self.epoch = 0
        if crop_size is not None and int(crop_size) < 8:
            raise ValueError(f"crop_size must be at least 8 voxels, got {crop_size}")
        self.crop_size = None if crop_size is None else int(crop_size)
        self.crop_margin = float(crop_margin)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of this epoch."""
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.cases)

    def _draw_rotation(self, rng: np.random.Generator, landmarks: np.ndarray, shape) -> np.ndarray | None:
        """A rotation keeping every landmark inside the volume, or None after too many misses."""
        for _ in range(MAX_ROTATION_DRAWS):
            rotation = rotation_matrix(rng.uniform(-self.rotation_deg, self.rotation_deg, size=3))
            if inside_volume(rotate_points(landmarks, rotation, shape), shape).all():
                return rotation
        return None

    def _crop_window(self, landmarks: np.ndarray, shape, rng: np.random.Generator | None):
        """Origin and shape of a cube of ``crop_size`` voxels holding every landmark
        ``crop_margin`` inside.

        The origin is drawn uniformly among the admissible ones per axis (centred on the
        landmarks when ``rng`` is None); where no origin keeps the margin, the crop is centred on
        the landmarks' extent, and an axis shorter than the crop is kept whole.
        """
        origin, window = [], []
        for axis, extent in enumerate(shape):
            size = min(self.crop_size, int(extent))
            low = np.ceil(landmarks[:, axis].max() + self.crop_margin - (size - 1))
            high = np.floor(landmarks[:, axis].min() - self.crop_margin)
            low, high = max(0.0, low), min(float(extent - size), high)
            if low > high:  # the margin cannot be kept: centre on the landmarks
                centre = (landmarks[:, axis].max() + landmarks[:, axis].min()) / 2
                low = high = float(np.clip(round(centre - (size - 1) / 2), 0, extent - size))
            start = int(rng.integers(int(low), int(high) + 1)) if rng is not None else int((low + high) // 2)
            origin.append(start)
            window.append(size)
        return tuple(origin), tuple(window)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        volume = torch.tensor(np.asarray(case.volume), dtype=torch.float32)  # a copy: never touch the cache
        landmarks = np.asarray(case.landmarks_vox, dtype=np.float64)
        rotation, flip_axes = None, []
        if self.augment:
            rng = np.random.default_rng((self.seed, self.epoch, int(index)))
            if self.rotation_deg > 0:
                rotation = self._draw_rotation(rng, landmarks, volume.shape)
            flip_axes = np.flatnonzero(rng.random(3) < self.flip_prob)
        # Where the landmarks go decides the crop window; only that window is then resampled.
        moved = landmarks if rotation is None else rotate_points(landmarks, rotation, volume.shape)
        origin, window = (0, 0, 0), tuple(volume.shape)
        if self.crop_size is not None:
            crop_rng = np.random.default_rng((self.seed, self.epoch, int(index), 1)) if self.augment else None
            origin, window = self._crop_window(moved, volume.shape, crop_rng)
        if rotation is not None:
            volume, landmarks = rotate_sample(volume, landmarks, rotation, origin, window)
        else:
            x, y, z = origin
            volume = volume[x : x + window[0], y : y + window[1], z : z + window[2]]
            landmarks = landmarks - np.asarray(origin, dtype=np.float64)
        volume, landmarks = flip_sample(volume, landmarks, flip_axes)
        return {
            "volume": volume.contiguous()[None],
            "landmarks_vox": torch.as_tensor(landmarks, dtype=torch.float32),
            "case_id": case.case_id,
        }


def collate(items: Sequence[Mapping]) -> dict:
    """Batch items of :class:`LandmarkDataset`.

    Volumes are zero-padded at the high end of each axis to the batch's largest extent rounded up
    to a multiple of ``PAD_MULTIPLE`` (zero is the mean of a normalised volume); voxel indices
    are unchanged by padding at the high end.

    Returns:
        ``{"volume": (N, 1, X, Y, Z) float32, "landmarks_vox": (N, 5, 3) float32,
        "case_id": list[str]}``.
    """
    if not items:
        raise ValueError("collate: empty batch")
    shapes = np.array([tuple(item["volume"].shape[-3:]) for item in items])
    target = [int(math.ceil(n / PAD_MULTIPLE) * PAD_MULTIPLE) for n in shapes.max(axis=0)]
    volumes = torch.zeros((len(items), 1, *target), dtype=torch.float32)
    for n, item in enumerate(items):
        x, y, z = item["volume"].shape[-3:]
        volumes[n, 0, :x, :y, :z] = item["volume"].reshape(x, y, z)
    landmarks = torch.stack([torch.as_tensor(item["landmarks_vox"], dtype=torch.float32) for item in items])
    return {"volume": volumes, "landmarks_vox": landmarks, "case_id": [str(item["case_id"]) for item in items]}
