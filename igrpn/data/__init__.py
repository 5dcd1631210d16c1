"""Data layer: the manifest, NIfTI loading onto an isotropic grid, augmentation and batching.

``manifest`` reads and validates a manifest (docs/design.md §3), ``volume`` holds the grid geometry
and resampling, ``cases`` loads a manifest's volumes into :class:`Case` objects, ``augment`` makes
training samples and batches, ``markups`` reads and writes 3D Slicer landmark files. The public
names of the first four are importable from ``igrpn.data`` itself.
"""

from __future__ import annotations

from igrpn.data.augment import (PAD_MULTIPLE, MAX_ROTATION_DRAWS, rotation_matrix, rotate_points, rotate_sample,
                                flip_sample, LandmarkDataset, collate)
from igrpn.data.cases import CaseError, Case, open_nifti, check_nifti_header, load_case, clear_cache, load_cases
from igrpn.data.manifest import (SPLITS, LANDMARK_COLUMNS, REQUIRED_COLUMNS, OPTIONAL_COLUMNS, ManifestError,
                                 read_manifest, landmarks_from_row)
from igrpn.data.volume import (MAX_ABS_INTENSITY, voxel_to_world, world_to_voxel, inside_volume, resampled_grid,
                               resample_volume, normalise_intensity, prepare_volume)

__all__ = [
    "SPLITS",
    "LANDMARK_COLUMNS",
    "REQUIRED_COLUMNS",
    "OPTIONAL_COLUMNS",
    "ManifestError",
    "read_manifest",
    "landmarks_from_row",
    "MAX_ABS_INTENSITY",
    "voxel_to_world",
    "world_to_voxel",
    "inside_volume",
    "resampled_grid",
    "resample_volume",
    "normalise_intensity",
    "prepare_volume",
    "CaseError",
    "Case",
    "open_nifti",
    "check_nifti_header",
    "load_case",
    "clear_cache",
    "load_cases",
    "PAD_MULTIPLE",
    "MAX_ROTATION_DRAWS",
    "rotation_matrix",
    "rotate_points",
    "rotate_sample",
    "flip_sample",
    "LandmarkDataset",
    "collate",
]
