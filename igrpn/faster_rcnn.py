"""Faster R-CNN baseline of Table 1 (DESIGN §5), on the shared backbone.

ROI_ALIGN_PLACEHOLDER
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def _normalised(coord: torch.Tensor, size: int) -> torch.Tensor:
    """Map feature-cell coordinates (cell centres at integers) to ``grid_sample``'s [−1, 1]
    with ``align_corners=True`` (−1 = centre of cell 0, +1 = centre of cell size − 1)."""
    return coord * (2.0 / max(size - 1, 1)) - 1.0


def roi_align_3d(
    features: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    output_size=(4, 4, 4),
    sampling_ratio: int = 2,
) -> torch.Tensor:
    """3D RoIAlign: average of trilinearly interpolated features over a regular grid of sampling
    points in each output bin (He et al., Mask R-CNN), via ``grid_sample``.

    Coordinates: voxel centres of the input volume and cell centres of the feature map both sit at
    integer indices. A feature map at stride s = 1 / spatial_scale made by max-pooling covers input
    voxels ``s·f … s·f + s − 1`` with cell f, so input coordinate x maps to feature coordinate
    ``(x − (s − 1) / 2) / s``. Sampling points outside the feature grid take the border value.

    Args:
        features: (N, C, X, Y, Z) feature map.
        rois: (R, 7) rows ``[batch_index, x0, y0, z0, x1, y1, z1]``, corners in input voxels.
        spatial_scale: 1 / stride of ``features`` w.r.t. the input.
        output_size: bins per axis (Ox, Oy, Oz), or one int for all three.
        sampling_ratio: sampling points per bin along each axis (sampling_ratio³ per bin).

    Returns:
        (R, C, Ox, Oy, Oz) pooled features.
    """
    if features.ndim != 5:
        raise ValueError(f"roi_align_3d: features must be (N, C, X, Y, Z), got {tuple(features.shape)}")
    if rois.ndim != 2 or rois.shape[1] != 7:
        raise ValueError(f"roi_align_3d: rois must be (R, 7) [batch, x0, y0, z0, x1, y1, z1], got {tuple(rois.shape)}")
    if sampling_ratio < 1:
        raise ValueError(f"roi_align_3d: sampling_ratio must be ≥ 1, got {sampling_ratio}")
    out = (output_size,) * 3 if isinstance(output_size, int) else tuple(output_size)
    n, c, *size = features.shape
    r = rois.shape[0]
    result = features.new_zeros((r, c) + out)
    if r == 0:
        return result
    batch_index = rois[:, 0].long()
    if batch_index.min() < 0 or batch_index.max() >= n:
        raise ValueError(f"roi_align_3d: batch indices must lie in [0, {n - 1}]")

    stride = 1.0 / spatial_scale
    # RoI corners in feature-cell coordinates.
    start = (rois[:, 1:4] - (stride - 1) / 2.0) * spatial_scale  # (R, 3)
    end = (rois[:, 4:7] - (stride - 1) / 2.0) * spatial_scale
    bin_size = (end - start) / rois.new_tensor(out)  # (R, 3)

    # Normalised sampling coordinates per axis: bin b, point p → start + (b + (p + ½)/ratio)·bin.
    axis_coords = []
    for axis in range(3):
        steps = (torch.arange(out[axis] * sampling_ratio, device=rois.device, dtype=rois.dtype) + 0.5) / sampling_ratio
        coords = start[:, axis, None] + steps[None, :] * bin_size[:, axis, None]  # (R, O·ratio)
        axis_coords.append(_normalised(coords, size[axis]))
    gx, gy, gz = axis_coords
    sx, sy, sz = (o * sampling_ratio for o in out)
    # grid_sample's last grid dimension is ordered (W, H, D) = (z, y, x) for (N, C, D, H, W) input.
    grid = torch.stack(
        torch.broadcast_tensors(
            gz[:, None, None, :], gy[:, None, :, None], gx[:, :, None, None]
        ),
        dim=-1,
    ).to(features.dtype)  # (R, Sx, Sy, Sz, 3)

    # One grid_sample per volume: its RoIs are stacked along the output's first spatial axis, so
    # the feature map is never copied per RoI.
    for b in batch_index.unique().tolist():
        sel = (batch_index == b).nonzero(as_tuple=True)[0]
        g = grid[sel].reshape(1, sel.numel() * sx, sy, sz, 3)
        sampled = F.grid_sample(
            features[b : b + 1], g, mode="bilinear", padding_mode="border", align_corners=True
        )  # (1, C, R_b·Sx, Sy, Sz); "bilinear" is trilinear for 5D input
        sampled = sampled.reshape(c, sel.numel(), out[0], sampling_ratio, out[1], sampling_ratio, out[2], sampling_ratio)
        # Average the sampling points of each bin.
        result[sel] = sampled.mean(dim=(3, 5, 7)).transpose(0, 1)
    return result
