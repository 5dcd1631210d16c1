"""Data layer: the manifest, NIfTI loading onto an isotropic grid, augmentation and batching.

Geometry (DESIGN §3). A volume is reoriented to the closest canonical (RAS+) orientation, then
resampled onto an isotropic grid of ``spacing_mm`` whose axes are the canonical image's axes
(any obliquity stays in the affine). Voxel centres sit at integer indices; arrays are (X, Y, Z).
``Case.affine`` maps a voxel index ``(i, j, k, 1)`` of the resampled grid to world millimetres.

Mapping between a user's volume and the resampled grid (what ``igrpn.detect`` does)::

    grid_volume, grid_affine = prepare_volume(volume, affine, spacing_mm)
    ...  # predict voxel positions ``p_vox`` (..., 3) on ``grid_volume``
    p_mm = voxel_to_world(p_vox, grid_affine)      # world mm, the answer
    p_user = world_to_voxel(p_mm, affine)          # voxel indices of the volume the user gave

World millimetres are the common currency: both grids see the same world through their affines.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from igrpn.config import LANDMARKS, LEFT_RIGHT_PAIRS, NUM_LANDMARKS

SPLITS: tuple[str, ...] = ("train", "test")
#: Coordinate columns of the manifest, landmark-major: left_eye_x, left_eye_y, left_eye_z, ...
LANDMARK_COLUMNS: tuple[str, ...] = tuple(f"{name}_{axis}" for name in LANDMARKS for axis in "xyz")
REQUIRED_COLUMNS: tuple[str, ...] = ("case_id", "image", "split") + LANDMARK_COLUMNS
OPTIONAL_COLUMNS: tuple[str, ...] = ("source", "seed", "notes")
_TEXT_COLUMNS = ("case_id", "image", "split", "source", "notes")
_NA_STRINGS = ["", "NA", "N/A", "NaN", "nan", "null", "None"]
#: Batches are padded to a multiple of this (three ×2 down-samplings in the backbone).
PAD_MULTIPLE = 8
#: Rotations drawn before giving up on one that keeps every landmark inside the volume.
MAX_ROTATION_DRAWS = 10
#: Largest voxel magnitude accepted: linear interpolation takes differences of two voxels in
#: float32 (largest 3.4e38), so larger values overflow to inf and NaN.
MAX_ABS_INTENSITY = 1e37


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file, the rows and the problems."""


class CaseError(ValueError):
    """A volume that cannot be loaded; the message names the case, the file and the problem."""


@dataclass(repr=False)
class Case:
    """One volume on the isotropic grid, with its landmarks.

    Attributes:
        case_id: the manifest's ``case_id``.
        volume: (X, Y, Z) float32, zero mean and unit standard deviation. Volumes returned by
            ``load_cases`` are shared with its cache: do not modify them in place.
        affine: (4, 4) float64, voxel index → world mm of the resampled grid.
        landmarks_mm: (5, 3) float64 world mm, rows in ``config.LANDMARKS`` order.
        landmarks_vox: (5, 3) float64 voxel indices on the resampled grid.
        split: ``"train"``, ``"test"`` or ``""`` when unknown.
        image: the file the volume was read from (``""`` when not from a file).
    """

    case_id: str
    volume: np.ndarray
    affine: np.ndarray
    landmarks_mm: np.ndarray
    landmarks_vox: np.ndarray
    split: str = ""
    image: str = ""

    @property
    def spacing_mm(self) -> float:
        """Isotropic voxel edge of the grid (mm)."""
        return float(np.linalg.norm(self.affine[:3, 0]))

    def __repr__(self) -> str:
        return (f"Case({self.case_id!r}, split={self.split!r}, shape={tuple(self.volume.shape)}, "
                f"spacing_mm={self.spacing_mm:.3g})")


# --------------------------------------------------------------------------------------------
# Coordinates


def voxel_to_world(points_vox, affine) -> np.ndarray:
    """Map voxel indices (..., 3) to world mm (..., 3) through a (4, 4) voxel → world affine."""
    points = np.asarray(points_vox, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    return points @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(points_mm, affine) -> np.ndarray:
    """Map world mm (..., 3) to voxel indices (..., 3) through the inverse of a (4, 4) affine."""
    points = np.asarray(points_mm, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    # Solve A·v = p − t rather than forming the inverse (more accurate for near-singular A).
    flat = points.reshape(-1, 3) - affine[:3, 3]
    return np.linalg.solve(affine[:3, :3], flat.T).T.reshape(points.shape)


def inside_volume(points_vox, shape) -> np.ndarray:
    """Whether voxel positions (..., 3) lie within the volume's extent.

    The extent of a grid of shape (X, Y, Z) is [-0.5, n - 0.5] per axis (voxel centres at integer
    indices, a voxel reaching half a voxel either side of its centre). Returns (...,) bool.
    """
    points = np.asarray(points_vox, dtype=np.float64)
    upper = np.asarray(shape[-3:], dtype=np.float64) - 0.5
    return np.all((points >= -0.5) & (points <= upper), axis=-1)


# --------------------------------------------------------------------------------------------
# Resampling and intensity


def resampled_grid(shape, affine, spacing_mm: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """The isotropic grid covering a volume's field of view, along the volume's own axes.

    Args:
        shape: (X, Y, Z) of the source volume.
        affine: (4, 4) voxel → world mm of the source volume (may be oblique).
        spacing_mm: isotropic voxel edge of the new grid.

    Returns:
        (new shape, new affine): shape = ceil(extent / spacing) per axis, where the extent is
        ``n · voxel size`` (mm, voxel edges to voxel edges); the new affine is
        ``affine @ T`` with ``T`` scaling each axis by ``spacing / voxel size`` and shifting the
        origin so the new grid is centred on the old field of view.
    """
    shape = np.asarray(shape[:3], dtype=np.int64)
    affine = np.asarray(affine, dtype=np.float64)
    voxel_mm = np.linalg.norm(affine[:3, :3], axis=0)
    # Round before ceil so that e.g. 64 · 2.6 / 2.6 does not become 65 through float error.
    new_shape = np.maximum(np.ceil(np.round(shape * voxel_mm / spacing_mm, 6)), 1).astype(np.int64)
    scale = spacing_mm / voxel_mm  # source voxels per new voxel
    # Centre new grid on the old one: (n_old − 1)/2 = origin + (n_new − 1)/2 · scale.
    origin = (shape - 1) / 2 - (new_shape - 1) / 2 * scale
    index_to_source = np.eye(4)
    index_to_source[:3, :3] = np.diag(scale)
    index_to_source[:3, 3] = origin
    return tuple(int(n) for n in new_shape), affine @ index_to_source


def _interpolate_axis(volume: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``volume`` along one axis at fractional source indices.

    Positions beyond the outermost voxel centres take the edge value (the rim of half a voxel
    that belongs to the field of view). Returns the volume with that axis of length
    ``len(positions)``.
    """
    size = volume.shape[axis]
    if size == 1:
        return np.repeat(volume, len(positions), axis=axis)
    positions = np.clip(positions, 0, size - 1)
    lower = np.minimum(np.floor(positions).astype(np.int64), size - 2)
    weight = (positions - lower).astype(volume.dtype)
    # Broadcast the weights along the interpolated axis only.
    shape = [1] * volume.ndim
    shape[axis] = -1
    weight = weight.reshape(shape)
    below = np.take(volume, lower, axis=axis)
    above = np.take(volume, lower + 1, axis=axis)
    return below + (above - below) * weight


def resample_volume(volume, affine, spacing_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear resampling onto the isotropic grid of :func:`resampled_grid`.

    The new grid's axes are parallel to the volume's, so trilinear interpolation factorises into
    three 1-D linear interpolations, one per axis.

    Args:
        volume: (X, Y, Z) intensities.
        affine: (4, 4) voxel → world mm.
        spacing_mm: isotropic voxel edge of the new grid (mm).

    Returns:
        (volume float32 (X', Y', Z'), new affine (4, 4) float64 voxel → world mm).
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"resample_volume: expected a 3D volume, got shape {volume.shape}")
    if not (np.isfinite(spacing_mm) and spacing_mm > 0):
        raise ValueError(f"resample_volume: spacing_mm must be a positive number, got {spacing_mm}")
    new_shape, new_affine = resampled_grid(volume.shape, affine, spacing_mm)
    # Source index sampled by each new index along each axis: origin + index · scale.
    index_to_source = np.linalg.solve(np.asarray(affine, dtype=np.float64), new_affine)
    for axis in range(3):
        positions = index_to_source[axis, 3] + np.arange(new_shape[axis]) * index_to_source[axis, axis]
        volume = _interpolate_axis(volume, positions, axis)
    return np.ascontiguousarray(volume, dtype=np.float32), new_affine


def normalise_intensity(volume: np.ndarray, name: str = "volume") -> np.ndarray:
    """Zero mean and unit standard deviation over the whole volume, float32.

    Raises:
        ValueError: the volume is constant (no standard deviation to divide by).
    """
    mean = float(volume.mean(dtype=np.float64))
    std = float(volume.std(dtype=np.float64))
    # Relative threshold: interpolating a constant in float32 leaves rounding noise only.
    if not np.isfinite(std) or std <= 1e-6 * max(abs(mean), float(np.abs(volume).max()), 1e-30):
        raise ValueError(f"{name}: constant volume (every voxel {mean:g}); cannot normalise intensity")
    return ((volume - mean) / std).astype(np.float32)


def prepare_volume(volume, affine, spacing_mm: float, name: str = "volume") -> tuple[np.ndarray, np.ndarray]:
    """Canonical reorientation, isotropic resampling and intensity normalisation of one volume.

    The path every volume takes before the network: ``load_case`` for manifests, and
    ``igrpn.detect`` for a user's volume.

    Args:
        volume: (X, Y, Z) or (X, Y, Z, 1) intensities, any dtype.
        affine: (4, 4) voxel → world mm.
        spacing_mm: isotropic voxel edge of the output grid.
        name: names the volume in error messages (e.g. "case 'phantom_003': x.nii.gz").

    Returns:
        (volume float32 (X', Y', Z') normalised, affine (4, 4) voxel → world mm of that grid).

    Raises:
        ValueError: not 3D, non-finite voxels, constant volume, singular affine, bad spacing.
    """
    data = np.asarray(volume)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]  # a 4D file holding a single volume
    if data.ndim != 3:
        raise ValueError(f"{name}: not 3D: shape {tuple(np.shape(volume))} (expected (X, Y, Z) or (X, Y, Z, 1))")
    if min(data.shape) < 1:
        raise ValueError(f"{name}: empty volume: shape {data.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"{name}: affine must be a finite 4x4 matrix, got {affine.tolist()}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"{name}: singular affine (zero voxel size?): {affine.tolist()}")
    if not (np.isfinite(spacing_mm) and spacing_mm > 0):
        raise ValueError(f"{name}: spacing_mm must be a positive number, got {spacing_mm}")
    data = data.astype(np.float32, copy=False)
    finite = np.isfinite(data)
    if not finite.all():
        raise ValueError(f"{name}: {int((~finite).sum())} NaN or infinite voxels")
    if data.min() == data.max():
        raise ValueError(f"{name}: constant volume (every voxel {float(data.flat[0]):g}); "
                         "cannot normalise intensity")
    peak = float(max(-data.min(), data.max()))
    if peak > MAX_ABS_INTENSITY:
        raise ValueError(f"{name}: voxel values reach {peak:.3g} in magnitude, beyond the {MAX_ABS_INTENSITY:g} "
                         "that float32 interpolation holds without overflow; the intensities (or the file's "
                         "scl_slope) are wrong")

    # Closest RAS+ orientation: flips and axis permutations of the array, affine updated to match.
    canonical = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    data = np.asarray(canonical.dataobj, dtype=np.float32)
    resampled, new_affine = resample_volume(data, canonical.affine, spacing_mm)
    try:
        return normalise_intensity(resampled, name), new_affine
    except ValueError:  # the volume varied, so resampling averaged its contrast away
        raise ValueError(f"{name}: no contrast left once resampled to {spacing_mm:g} mm: the "
                         f"{'x'.join(map(str, resampled.shape))} grid holds a single value; the volume is "
                         "too small for this spacing") from None


# --------------------------------------------------------------------------------------------
# Manifest


def _row_label(df: pd.DataFrame, position: int) -> str:
    """'case 'x'' when the row has a unique case_id, else with its row number and line in the file."""
    case_id = df["case_id"].iloc[position] if "case_id" in df.columns else ""
    if isinstance(case_id, str) and case_id:
        if (df["case_id"] == case_id).sum() == 1:
            return f"case {case_id!r}"
        return f"case {case_id!r} (line {position + 2})"
    return f"row {position} (line {position + 2})"


def read_manifest(path) -> pd.DataFrame:
    """Read and validate a manifest (DESIGN §3); ``image`` becomes an absolute path.

    Checks the required columns, coordinates (numeric, finite), duplicate ``case_id``, the
    ``split`` (``train``/``test``) and that every image file exists. All problems found are
    reported together.

    Returns:
        DataFrame, one row per case: the required columns (coordinates float64), then the
        optional ``source``, ``seed``, ``notes`` and any other column of the file.
        ``df.attrs["manifest"]`` holds the manifest's absolute path.

    Raises:
        ManifestError (a ValueError): the message names the file, each row and its problem.
    """
    path = Path(path)
    label = str(path)
    if not path.is_file():
        raise ManifestError(f"{label}: manifest not found")
    try:
        header = [str(c).strip() for c in pd.read_csv(path, nrows=0).columns]
        text = [c for c in header if c in _TEXT_COLUMNS]
        # Text columns stay text ('001' is a case id, not 1); the rest parse as numbers.
        df = pd.read_csv(path, dtype={c: str for c in text}, keep_default_na=False,
                         na_values={c: _NA_STRINGS for c in header if c not in text})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ManifestError(f"{label}: not a readable CSV file: {error}") from None
    df.columns = [str(c).strip() for c in df.columns]

    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{label}: missing column(s) {missing}; a manifest needs {list(REQUIRED_COLUMNS)}")
    if len(df) == 0:
        raise ManifestError(f"{label}: no rows")
    for column in _TEXT_COLUMNS:
        if column in df.columns:
            df[column] = df[column].astype(str).str.strip()

    problems: list[str] = []
    # case_id: present and unique.
    for position in np.flatnonzero((df["case_id"] == "").to_numpy()):
        problems.append(f"row {position} (line {position + 2}): empty case_id")
    ids = df["case_id"][df["case_id"] != ""]
    for case_id in sorted(set(ids[ids.duplicated()])):
        lines = [int(p) + 2 for p in np.flatnonzero((df["case_id"] == case_id).to_numpy())]
        problems.append(f"case {case_id!r}: duplicate case_id (lines {lines})")
    # split.
    for position in np.flatnonzero(~df["split"].isin(SPLITS).to_numpy()):
        problems.append(f"{_row_label(df, position)}: unknown split {df['split'].iloc[position]!r} "
                        f"(expected one of {list(SPLITS)})")
    # Coordinates: numeric and finite.
    for column in LANDMARK_COLUMNS:
        raw = df[column]
        values = pd.to_numeric(raw, errors="coerce").astype(np.float64)
        for position in np.flatnonzero(~np.isfinite(values.to_numpy())):
            problems.append(f"{_row_label(df, position)}: {column} = {raw.iloc[position]!r} "
                            "is not a finite number")
        df[column] = values
    # Images: resolved against the manifest's folder, must exist.
    folder = path.absolute().parent
    resolved = [os.path.abspath(os.path.join(folder, image)) if image else "" for image in df["image"]]
    for position, (image, full) in enumerate(zip(df["image"], resolved)):
        if not image:
            problems.append(f"{_row_label(df, position)}: empty image path")
        elif not os.path.isfile(full):
            problems.append(f"{_row_label(df, position)}: image {image!r} not found (looked for {full})")
    if problems:
        raise ManifestError(f"{label}: {len(problems)} problem(s):\n  " + "\n  ".join(
            f"{label}: {p}" for p in problems))

    df["image"] = resolved
    if "seed" in df.columns:
        seeds = pd.to_numeric(df["seed"], errors="coerce")
        if seeds.notna().all() and (seeds == np.round(seeds)).all():
            df["seed"] = seeds.astype(np.int64)
    others = [c for c in df.columns if c not in REQUIRED_COLUMNS and c not in OPTIONAL_COLUMNS]
    columns = list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS if c in df.columns] + others
    df = df[columns].reset_index(drop=True)
    df.attrs["manifest"] = str(path.absolute())
    return df


def landmarks_from_row(row) -> np.ndarray:
    """(5, 3) float64 world mm from a manifest row's ``<name>_x/_y/_z`` columns."""
    try:
        values = [float(row[column]) for column in LANDMARK_COLUMNS]
    except KeyError as error:
        raise ValueError(f"case {row.get('case_id', '?')!r}: missing landmark column {error}") from None
    return np.asarray(values, dtype=np.float64).reshape(NUM_LANDMARKS, 3)


# --------------------------------------------------------------------------------------------
# Loading


def open_nifti(path, name: str):
    """Open a NIfTI file's header (the voxels are not read yet) and check what it shows.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        name: names the file (or the case and the file) in messages.

    Returns:
        (nibabel image, notes of :func:`check_nifti_header`).

    Raises:
        CaseError naming the file: missing, a directory, empty, not NIfTI, complex or colour voxels.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise CaseError(f"{name}: {'is a directory, not a NIfTI file' if os.path.isdir(path) else 'file not found'}")
    if os.path.getsize(path) == 0:
        raise CaseError(f"{name}: empty file")
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises several types for non-NIfTI content
        raise CaseError(f"{name}: not a readable NIfTI file ({type(error).__name__}: "
                        f"{' '.join(str(error).split())})") from None
    if not isinstance(image, nib.Nifti1Pair):  # base of NIfTI-1/2 single files and pairs
        raise CaseError(f"{name}: not a NIfTI file (read as {type(image).__name__})")
    return image, check_nifti_header(image, name)


def _read_nifti(path: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(data, affine) of a NIfTI file; ``CaseError`` naming the case and file for any failure.
    A note of :func:`check_nifti_header` is a warning."""
    image, notes = open_nifti(path, name)
    # Refuse a bad dimensionality from the header alone, before reading the voxels.
    shape = tuple(image.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise CaseError(f"{name}: not 3D: shape {shape} (expected (X, Y, Z) or (X, Y, Z, 1))")
    for note in notes:
        warnings.warn(note, stacklevel=3)
    try:
        data = image.get_fdata(dtype=np.float32)
    except Exception as error:  # truncated or corrupt voxel data
        raise CaseError(f"{name}: cannot read the voxels, file truncated or corrupt "
                        f"({type(error).__name__}: {error})") from None
    return data, np.asarray(image.affine, dtype=np.float64)


def check_nifti_header(image, name: str) -> list[str]:
    """Refuse voxel types igrpn would misread; return notes on what it assumes for the geometry.

    Args:
        image: a loaded ``nibabel`` NIfTI image (only the header is looked at).
        name: names the file in messages.

    Returns:
        One-line notes to show the user: a file without qform and sform whose voxel size
        (pixdim) is 0 is read with 1 mm voxels (nibabel's fallback), so every distance is a guess.

    Raises:
        CaseError: complex voxels (the imaginary part would be dropped) or colour (RGB/RGBA)
        voxels (igrpn needs one grey level per voxel).
    """
    dtype = image.get_data_dtype()
    if dtype.kind == "c":
        raise CaseError(f"{name}: complex-valued voxels ({dtype}); igrpn needs real grey levels: save the "
                        "magnitude (abs) of the volume")
    if dtype.kind == "V" or dtype.names:
        raise CaseError(f"{name}: colour voxels ({'/'.join(dtype.names or ['structured'])}); igrpn needs one grey "
                        "level per voxel: convert the volume to greyscale")
    header = image.header
    if int(header["qform_code"]) == 0 and int(header["sform_code"]) == 0:
        zero = [axis + 1 for axis, size in enumerate(_stored_pixdim(image)[1:4]) if not size]
        if zero:
            return [f"{name}: no qform or sform and voxel size (pixdim) 0 along axis {zero}: read as 1 mm voxels, "
                    "so positions in mm are a guess"]
    return []


def _stored_pixdim(image) -> np.ndarray:
    """``pixdim`` as stored in the file (nibabel's loaded header already has its zeros set to 1)."""
    from nibabel.openers import ImageOpener

    try:
        holder = image.file_map.get("header") or image.file_map["image"]  # a pair, or a single file
        with ImageOpener(holder.filename) as stream:
            return np.asarray(type(image.header).from_fileobj(stream, check=False)["pixdim"], dtype=np.float64)
    except Exception:  # noqa: BLE001 - no file (an image in memory): the header is all there is
        return np.asarray(image.header["pixdim"], dtype=np.float64)


def _load_grid(path: str, spacing_mm: float, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file and prepare it (:func:`prepare_volume`); errors as ``CaseError``."""
    data, affine = _read_nifti(path, name)
    try:
        return prepare_volume(data, affine, spacing_mm, name=name)
    except CaseError:
        raise
    except ValueError as error:
        raise CaseError(str(error)) from None


def _make_case(row, volume: np.ndarray, affine: np.ndarray, name: str) -> Case:
    """Attach the row's landmarks to a prepared volume; refuse landmarks outside it."""
    landmarks_mm = landmarks_from_row(row)
    landmarks_vox = world_to_voxel(landmarks_mm, affine)
    outside = np.flatnonzero(~inside_volume(landmarks_vox, volume.shape))
    if len(outside):
        details = "; ".join(
            f"landmark {LANDMARKS[i]!r} at {np.round(landmarks_mm[i], 2).tolist()} mm = voxel "
            f"{np.round(landmarks_vox[i], 2).tolist()}" for i in outside)
        raise CaseError(f"{name}: outside the resampled volume of shape {tuple(volume.shape)}: {details}")
    return Case(case_id=str(row["case_id"]), volume=volume, affine=affine, landmarks_mm=landmarks_mm,
                landmarks_vox=landmarks_vox, split=str(row.get("split", "") or ""),
                image=str(row["image"]))


def _case_name(row) -> str:
    return f"case {str(row.get('case_id', '?'))!r}: {row.get('image', '?')}"


def load_case(row, spacing_mm: float) -> Case:
    """Load one manifest row onto the isotropic grid (no cache; see :func:`load_cases`).

    Args:
        row: a row of :func:`read_manifest` (Series or mapping with ``case_id``, ``image``,
            ``split`` and the 15 landmark columns in world mm).
        spacing_mm: isotropic voxel edge of the grid (mm).

    Returns:
        Case with ``affine @ [landmarks_vox, 1] == landmarks_mm`` up to float error.

    Raises:
        CaseError (a ValueError) naming the case, the file and the problem: missing, empty,
        truncated or non-NIfTI file, not 3D, NaN/inf voxels, constant volume, landmark outside.
    """
    name = _case_name(row)
    volume, affine = _load_grid(str(row["image"]), float(spacing_mm), name)
    return _make_case(row, volume, affine, name)


#: (absolute path, mtime ns, size bytes, spacing mm) → (volume, affine); see ``load_cases``.
_CACHE: dict[tuple[str, int, int, float], tuple[np.ndarray, np.ndarray]] = {}


def clear_cache() -> None:
    """Forget every volume kept by :func:`load_cases`."""
    _CACHE.clear()


def load_cases(manifest_df, spacing_mm: float, split: str | None = None, progress: bool = True) -> list[Case]:
    """Load the cases of a manifest, reusing volumes already loaded in this process.

    The prepared volumes are cached in memory by (absolute path, modification time, size,
    spacing), so a second call (another epoch, another notebook cell) reads no NIfTI file again;
    landmarks are always taken from the manifest given. The returned volumes are shared with the
    cache: do not modify them in place.

    Args:
        manifest_df: a DataFrame of :func:`read_manifest`, or a manifest path.
        spacing_mm: isotropic voxel edge of the grid (mm).
        split: ``"train"``, ``"test"`` or None for every row.
        progress: show a tqdm progress bar.
    """
    from tqdm.auto import tqdm

    if not isinstance(manifest_df, pd.DataFrame):
        manifest_df = read_manifest(manifest_df)
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)} or None")
        manifest_df = manifest_df[manifest_df["split"] == split]
    spacing_mm = float(spacing_mm)
    cases = []
    for _, row in tqdm(manifest_df.iterrows(), total=len(manifest_df), disable=not progress,
                       desc=f"loading volumes ({spacing_mm:g} mm)"):
        name = _case_name(row)
        path = os.path.abspath(str(row["image"]))
        try:
            stat = os.stat(path)
        except OSError:
            raise CaseError(f"{name}: file not found") from None
        key = (path, stat.st_mtime_ns, stat.st_size, spacing_mm)
        if key not in _CACHE:
            _CACHE[key] = _load_grid(path, spacing_mm, name)
        volume, affine = _CACHE[key]
        cases.append(_make_case(row, volume, affine.copy(), name))
    return cases


# --------------------------------------------------------------------------------------------
# Augmentation


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
