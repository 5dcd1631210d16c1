"""Loading the cases of a manifest: NIfTI files read, checked and resampled into :class:`Case` objects.

Bad input (a missing or unreadable file, NaN, the wrong dimensionality, a landmark outside the
volume) fails with a :class:`CaseError` naming the case and the problem (docs/design.md §4).
Volumes already loaded in this process are reused (keyed by file, modification time and spacing).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.openers import ImageOpener
from tqdm.auto import tqdm

from igrpn.config import LANDMARKS
from igrpn.data.manifest import SPLITS, landmarks_from_row, read_manifest
from igrpn.data.volume import inside_volume, prepare_volume, world_to_voxel


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
