"""Heatmap-regression baseline of Table 1 (DESIGN §5): an encoder-decoder on the shared backbone
regresses one Gaussian heatmap per landmark (as Payer et al.); a landmark is the heatmap's arg-max
refined to sub-voxel precision.

Decoder (decision): U-Net-like skip connections from block 4 up to block 2, i.e. the heatmaps are
predicted at half the input resolution (``output_stride = 2``): a full-resolution stage on block 1
would add a 3×3×3 convolution over every input voxel, several times the cost of the rest of the
decoder, for a landmark that the sub-voxel refinement places to well under a voxel anyway.
``profile.extra["heatmap_stride"] = 1`` gives the full-resolution decoder.

Targets (decision): a Gaussian of σ = ``profile.heatmap_sigma_mm / spacing_mm`` input voxels with
peak 1 at each landmark, multiplied by ``TARGET_SCALE = 100`` (as Payer et al. 2019) so that the
mean-squared error over a volume that is almost all background does not make "predict zero
everywhere" a near-optimal answer. Scores and refinement divide the scale out again.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .config import NUM_LANDMARKS, Profile

#: Multiplier of the unit-peak Gaussian targets (the network regresses 100 × Gaussian).
TARGET_SCALE = 100.0


def cell_centres_vox(size: int, stride: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Input-voxel coordinates of the centres of the cells along one axis of a strided grid.

    A cell ``f`` of a map at ``stride`` s covers input voxels ``s·f … s·f + s − 1`` (max-pooling
    by 2 per level), so its centre is at ``s·f + (s − 1) / 2``; at stride 1 it is ``f``.

    Returns: (size,) float tensor, in input voxels.
    """
    return torch.arange(size, device=device, dtype=dtype) * stride + (stride - 1) / 2.0


def heatmap_targets(
    landmarks_vox: torch.Tensor, shape, sigma_vox: float, stride: int = 1
) -> torch.Tensor:
    """Unit-peak Gaussian heatmap of each landmark.

    Args:
        landmarks_vox: (N, L, 3) landmark positions in input voxels (x, y, z).
        shape: (X, Y, Z) of the input volume, in voxels.
        sigma_vox: Gaussian standard deviation in input voxels.
        stride: the heatmap's down-sampling factor; the grid has ceil(X / stride) cells per edge,
            cell centres at ``stride·f + (stride − 1) / 2`` input voxels.

    Returns:
        (N, L, X', Y', Z') float tensor, ``exp(−|p − landmark|² / (2σ²))`` at each cell centre p
        (value 1 where a cell centre coincides with the landmark).
    """
    if landmarks_vox.ndim != 3 or landmarks_vox.shape[-1] != 3:
        raise ValueError(f"heatmap_targets: landmarks_vox must be (N, L, 3), got {tuple(landmarks_vox.shape)}")
    if sigma_vox <= 0:
        raise ValueError(f"heatmap_targets: sigma_vox must be positive, got {sigma_vox}")
    if len(shape) != 3:
        raise ValueError(f"heatmap_targets: shape must be (X, Y, Z), got {tuple(shape)}")
    landmarks_vox = landmarks_vox.float()
    # The Gaussian is separable: one 1D profile per axis, combined by an outer product.
    profiles = []
    for axis, size in enumerate(shape):
        centres = cell_centres_vox(-(-int(size) // stride), stride, device=landmarks_vox.device)
        offset = centres - landmarks_vox[..., axis, None]  # (N, L, size')
        profiles.append(torch.exp(-(offset**2) / (2.0 * sigma_vox**2)))
    px, py, pz = profiles
    return px[..., :, None, None] * py[..., None, :, None] * pz[..., None, None, :]


def refine_argmax(heatmaps: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Sub-voxel arg-max of each heatmap.

    The arg-max cell is refined along each axis by the vertex of the parabola through the log of
    the heatmap at the cell and its two neighbours; the log of a Gaussian is a parabola, so a
    sampled isotropic (or axis-aligned) Gaussian is located exactly. Values are floored at 10⁻³ of
    the peak before the log, and an arg-max on the border of the grid is not refined along that
    axis (one neighbour is missing).

    Args:
        heatmaps: (N, L, X, Y, Z) heatmaps (any positive scale).
        stride: the heatmaps' down-sampling factor w.r.t. the input (see ``heatmap_targets``).

    Returns:
        (N, L, 3) refined maxima in input voxels (x, y, z).
    """
    if heatmaps.ndim != 5:
        raise ValueError(f"refine_argmax: heatmaps must be (N, L, X, Y, Z), got {tuple(heatmaps.shape)}")
    n, l, *size = heatmaps.shape
    flat = heatmaps.detach().reshape(n, l, -1).float()
    peaks, index = flat.max(dim=-1)  # (N, L)
    # Unravel the flat index into (i, j, k) cell indices.
    strides = (size[1] * size[2], size[2], 1)
    cell = torch.stack([(index // s) % d for s, d in zip(strides, size)], dim=-1)  # (N, L, 3)

    floor = (peaks.abs() * 1e-3).clamp_min(1e-12)[..., None]  # (N, L, 1)
    offsets = []
    for axis in range(3):
        lower_ok = cell[..., axis] > 0
        upper_ok = cell[..., axis] < size[axis] - 1
        step = strides[axis]
        # Neighbours along this axis (index clamped where missing; masked out below).
        lower = flat.gather(-1, (index - step * lower_ok)[..., None])[..., 0]
        upper = flat.gather(-1, (index + step * upper_ok)[..., None])[..., 0]
        log_m, log_0, log_p = (torch.log(torch.maximum(v[..., None], floor))[..., 0] for v in (lower, peaks, upper))
        curvature = log_m - 2.0 * log_0 + log_p  # ≤ 0 at a maximum
        valid = lower_ok & upper_ok & (curvature < 0)
        vertex = 0.5 * (log_m - log_p) / torch.where(valid, curvature, torch.ones_like(curvature))
        offsets.append(torch.where(valid, vertex.clamp(-0.5, 0.5), torch.zeros_like(vertex)))
    refined_cell = cell.float() + torch.stack(offsets, dim=-1)
    return refined_cell * stride + (stride - 1) / 2.0
