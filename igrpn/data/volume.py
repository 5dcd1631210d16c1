"""Grid geometry, resampling and intensity normalisation of a volume (docs/design.md §3).

A volume is reoriented to the closest canonical (RAS+) orientation, then resampled onto an
isotropic grid of ``spacing_mm`` whose axes are the canonical image's axes (any obliquity stays in
the affine). Voxel centres sit at integer indices; arrays are (X, Y, Z). A grid's affine maps a
voxel index ``(i, j, k, 1)`` to world millimetres.

Mapping between a user's volume and the resampled grid (what ``igrpn.detect`` does)::

    grid_volume, grid_affine = prepare_volume(volume, affine, spacing_mm)
    ...  # predict voxel positions ``p_vox`` (..., 3) on ``grid_volume``
    p_mm = voxel_to_world(p_vox, grid_affine)      # world mm, the answer
    p_user = world_to_voxel(p_mm, affine)          # voxel indices of the volume the user gave

World millimetres are the common currency: both grids see the same world through their affines.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np


#: Largest voxel magnitude accepted: linear interpolation takes differences of two voxels in
#: float32 (largest 3.4e38), so larger values overflow to inf and NaN.
MAX_ABS_INTENSITY = 1e37


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
