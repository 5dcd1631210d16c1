"""3D box utilities: conversions, IoU, the box coding of Eq. (1), ground-truth boxes, NMS.

All functions work on torch tensors, are vectorised, and use voxel units of the resampled grid
(voxel centres at integer indices, axes (x, y, z)). Two box forms are used:

* **centre form** ``(x, y, z, w, h, d)``: centre and edge lengths, as in the paper's Eq. (1);
* **corner form** ``(x0, y0, z0, x1, y1, z1)``: low and high corners, used for IoU.

A box's volume is ``w·h·d`` (continuous coordinates, no "+1" pixel convention).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

#: Upper bound on the size deltas before ``exp`` (as in torchvision's detection code): a size
#: can grow at most 1000/16 ≈ 62× per decode, which keeps ``exp`` finite on untrained outputs.
DEFAULT_SIZE_CLAMP = math.log(1000.0 / 16)

#: Pair elements (rows × columns) processed at once by :func:`box_iou` when no chunk size is given.
_IOU_PAIRS_PER_CHUNK = 1 << 18

#: :func:`box_iou` against at most this many boxes (the GT cubes of a volume) takes the
#: column-by-column path of :func:`_iou_few_against_many`, on chunks of ``_FEW_CHUNK`` boxes.
_FEW_BOXES = 16
_FEW_CHUNK = 32768

#: :func:`nms` computes IoU rows lazily (instead of the full matrix) up to this many kept boxes.
_NMS_ROWWISE_MAX_OUTPUT = 32


def check_boxes(boxes: Tensor, name: str, func: str, ndim: int | None = None) -> None:
    """Raise ``ValueError`` unless ``boxes`` is a tensor of shape (..., 6) (or exactly ``ndim``-D)."""
    if not isinstance(boxes, Tensor):
        raise ValueError(f"{func}: {name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.ndim == 0 or boxes.shape[-1] != 6 or (ndim is not None and boxes.ndim != ndim):
        want = "(N, 6)" if ndim == 2 else "(..., 6)"
        raise ValueError(f"{func}: {name} must have shape {want}, got {tuple(boxes.shape)}")


def _check_corner_sizes(boxes: Tensor, name: str, func: str) -> None:
    """Raise ``ValueError`` if a corner-form box has a high corner below its low corner."""
    if not bool((boxes[..., 3:] < boxes[..., :3]).any()):  # one flat pass in the usual case
        return
    negative = (boxes[..., 3:] < boxes[..., :3]).any(-1)
    if bool(negative.any()):
        first = int(torch.nonzero(negative.reshape(-1))[0])
        raise ValueError(
            f"{func}: {name} has {int(negative.sum())} box(es) with negative size "
            f"(x1 < x0, y1 < y0 or z1 < z0); first at index {first}: "
            f"{boxes.reshape(-1, 6)[first].tolist()}"
        )


def centre_to_corner(boxes: Tensor) -> Tensor:
    """Centre form (..., 6) ``(x, y, z, w, h, d)`` -> corner form (..., 6) ``(x0, y0, z0, x1, y1, z1)``."""
    check_boxes(boxes, "boxes", "centre_to_corner")
    centre, size = boxes[..., :3], boxes[..., 3:]
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def corner_to_centre(boxes: Tensor) -> Tensor:
    """Corner form (..., 6) ``(x0, y0, z0, x1, y1, z1)`` -> centre form (..., 6) ``(x, y, z, w, h, d)``."""
    check_boxes(boxes, "boxes", "corner_to_centre")
    low, high = boxes[..., :3], boxes[..., 3:]
    return torch.cat([(low + high) / 2, high - low], dim=-1)


def box_volume(boxes: Tensor) -> Tensor:
    """Volume (voxels³) of corner-form boxes (..., 6) -> (...)."""
    return (boxes[..., 3:] - boxes[..., :3]).prod(-1)


def box_iou(boxes1: Tensor, boxes2: Tensor, chunk_size: int | None = None) -> Tensor:
    """Intersection over union of every pair of corner-form boxes.

    Args:
        boxes1: (N, 6) corner form, voxels.
        boxes2: (M, 6) corner form, voxels.
        chunk_size: rows of ``boxes1`` processed at once, so that millions of anchors against a few
            GT boxes (or a few thousand boxes against each other) stay in memory; ``None`` picks
            it so that one chunk holds about 260 k pairs (small chunks are also faster: cache).

    Returns:
        (N, M) IoU in [0, 1]; 0 where the union is empty.
    """
    check_boxes(boxes1, "boxes1", "box_iou", ndim=2)
    check_boxes(boxes2, "boxes2", "box_iou", ndim=2)
    _check_corner_sizes(boxes1, "boxes1", "box_iou")
    _check_corner_sizes(boxes2, "boxes2", "box_iou")
    n, m = boxes1.shape[0], boxes2.shape[0]
    if chunk_size is None and min(n, m) <= _FEW_BOXES and max(n, m) > _FEW_CHUNK:
        # Anchors against a volume's GT cubes: one box at a time against contiguous chunks.
        if n <= m:
            return _iou_few_against_many(boxes1, boxes2)
        return _iou_few_against_many(boxes2, boxes1).t()  # IoU is symmetric
    if chunk_size is None:
        chunk_size = max(1, _IOU_PAIRS_PER_CHUNK // max(m, 1))
    if chunk_size < 1:
        raise ValueError(f"box_iou: chunk_size must be >= 1, got {chunk_size}")
    dtype = torch.promote_types(torch.promote_types(boxes1.dtype, boxes2.dtype), torch.float32)
    boxes1, boxes2 = boxes1.to(dtype), boxes2.to(dtype)
    volume2 = box_volume(boxes2)
    iou = torch.empty((n, m), dtype=dtype, device=boxes1.device)
    for start in range(0, n, chunk_size):
        part = boxes1[start:start + chunk_size]
        # Overlap box of each pair: max of the low corners, min of the high corners.
        low = torch.maximum(part[:, None, :3], boxes2[None, :, :3])
        high = torch.minimum(part[:, None, 3:], boxes2[None, :, 3:])
        inter = (high - low).clamp_min(0).prod(-1)
        union = box_volume(part)[:, None] + volume2[None, :] - inter
        # An empty union only happens for two zero-volume boxes: call their IoU 0, not NaN.
        iou[start:start + chunk_size] = inter / union.clamp_min(torch.finfo(dtype).tiny)
    return iou


def _iou_few_against_many(few: Tensor, many: Tensor, chunk: int = _FEW_CHUNK) -> Tensor:
    """:func:`box_iou` of a few boxes (F, 6) against many (N, 6) -> (F, N), the same values.

    Each of the F boxes is compared with a cache-sized chunk of the N boxes axis by axis, on
    contiguous (chunk,) rows: the (N, F, 3) broadcast of the general path, with many passes over
    millions of anchors, was the largest cost of matching anchors to GT boxes (benchmarks/NOTES.md).
    The arithmetic is the general path's, in the same order, so the results are identical.
    """
    dtype = torch.promote_types(torch.promote_types(few.dtype, many.dtype), torch.float32)
    few, many = few.to(dtype), many.to(dtype)
    tiny = torch.finfo(dtype).tiny
    few_volume = box_volume(few)
    iou = torch.empty((few.shape[0], many.shape[0]), dtype=dtype, device=many.device)
    for start in range(0, many.shape[0], chunk):
        part = many[start:start + chunk]
        columns = part.t().contiguous()  # (6, c): x0, y0, z0, x1, y1, z1 of the chunk
        part_volume = box_volume(part)
        for j in range(few.shape[0]):
            inter = None
            for axis in range(3):  # overlap along each axis, clamped at 0
                side = torch.minimum(columns[axis + 3], few[j, axis + 3]) - torch.maximum(columns[axis], few[j, axis])
                side.clamp_min_(0)
                inter = side if inter is None else inter.mul_(side)
            union = (few_volume[j] + part_volume - inter).clamp_min_(tiny)
            torch.div(inter, union, out=iou[j, start:start + chunk])
    return iou


def paired_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of aligned pairs of corner-form boxes: (N, 6) and (N, 6) -> (N,) (``box_iou``'s diagonal)."""
    check_boxes(boxes1, "boxes1", "paired_box_iou", ndim=2)
    check_boxes(boxes2, "boxes2", "paired_box_iou", ndim=2)
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"paired_box_iou: boxes1 {tuple(boxes1.shape)} and boxes2 {tuple(boxes2.shape)} differ"
        )
    low = torch.maximum(boxes1[:, :3], boxes2[:, :3])
    high = torch.minimum(boxes1[:, 3:], boxes2[:, 3:])
    inter = (high - low).clamp_min(0).prod(-1)
    # Volumes from clamped sizes, so a degenerate decoded box counts as empty rather than negative.
    volume1 = (boxes1[:, 3:] - boxes1[:, :3]).clamp_min(0).prod(-1)
    volume2 = (boxes2[:, 3:] - boxes2[:, :3]).clamp_min(0).prod(-1)
    union = volume1 + volume2 - inter
    return inter / union.clamp_min(torch.finfo(inter.dtype).tiny)


def encode(boxes: Tensor, anchors: Tensor) -> Tensor:
    """Deltas that turn ``anchors`` into ``boxes``, the inverse of Eq. (1) (no weights).

    ``tx = (x - xa) / wa``, ``tw = log(w / wa)`` and likewise for (y, h) and (z, d).

    Args:
        boxes: (N, 6) centre form, voxels, positive sizes.
        anchors: (N, 6) centre form, voxels, positive sizes.

    Returns:
        (N, 6) deltas ``(tx, ty, tz, tw, th, td)``, dimensionless.
    """
    check_boxes(boxes, "boxes", "encode")
    check_boxes(anchors, "anchors", "encode")
    if boxes.shape != anchors.shape:
        raise ValueError(f"encode: boxes {tuple(boxes.shape)} and anchors {tuple(anchors.shape)} differ")
    anchor_size = anchors[..., 3:]
    offset = (boxes[..., :3] - anchors[..., :3]) / anchor_size
    log_scale = torch.log(boxes[..., 3:] / anchor_size)
    return torch.cat([offset, log_scale], dim=-1)


def decode(deltas: Tensor, anchors: Tensor, clamp: float = DEFAULT_SIZE_CLAMP) -> Tensor:
    """Apply deltas to anchors, Eq. (1): ``x = xa + tx·wa``, ``w = wa·exp(tw)`` (likewise y/h, z/d).

    Args:
        deltas: (..., 6) ``(tx, ty, tz, tw, th, td)``.
        anchors: (..., 6) centre form, voxels (broadcast against ``deltas``).
        clamp: the size deltas are clamped to [-clamp, clamp] before ``exp`` so that untrained
            outputs cannot overflow.

    Returns:
        (..., 6) centre-form boxes, voxels.
    """
    check_boxes(deltas, "deltas", "decode")
    check_boxes(anchors, "anchors", "decode")
    anchor_size = anchors[..., 3:]
    centre = anchors[..., :3] + deltas[..., :3] * anchor_size
    size = anchor_size * torch.exp(deltas[..., 3:].clamp(-clamp, clamp))
    return torch.cat([centre, size], dim=-1)


def landmark_boxes(landmarks_vox: Tensor, box_vox) -> Tensor:
    """Ground-truth cubes centred on the landmarks.

    Args:
        landmarks_vox: (..., L, 3) landmark positions, voxels (L = 5).
        box_vox: (L,) edge length of each landmark's cube, voxels.

    Returns:
        (..., L, 6) centre-form boxes, voxels, in ``landmarks_vox``'s dtype and device.
    """
    landmarks_vox = torch.as_tensor(landmarks_vox)
    if not landmarks_vox.is_floating_point():
        landmarks_vox = landmarks_vox.float()
    box = torch.as_tensor(box_vox, dtype=landmarks_vox.dtype, device=landmarks_vox.device).reshape(-1)
    if landmarks_vox.ndim < 2 or landmarks_vox.shape[-1] != 3 or landmarks_vox.shape[-2] != box.numel():
        raise ValueError(
            f"landmark_boxes: landmarks_vox must have shape (..., {box.numel()}, 3) to match "
            f"box_vox of length {box.numel()}, got {tuple(landmarks_vox.shape)}"
        )
    sizes = box[:, None].expand(*landmarks_vox.shape)
    return torch.cat([landmarks_vox, sizes], dim=-1)


def nms(
    boxes_corner: Tensor, scores: Tensor, iou_threshold: float, max_output: int | None = None
) -> Tensor:
    """Greedy non-maximum suppression in 3D.

    A box is dropped when its IoU with a higher-scored kept box exceeds ``iou_threshold``. The IoU
    matrix of all N boxes is computed once, so N should be at most a few thousand (pre-filter by
    score first).

    Args:
        boxes_corner: (N, 6) corner form, voxels.
        scores: (N,).
        iou_threshold: suppression threshold.
        max_output: stop once this many boxes are kept (``None``: no limit).

    Returns:
        (n,) int64 indices of the kept boxes, by decreasing score.
    """
    check_boxes(boxes_corner, "boxes_corner", "nms", ndim=2)
    if scores.ndim != 1 or scores.shape[0] != boxes_corner.shape[0]:
        raise ValueError(
            f"nms: scores must have shape ({boxes_corner.shape[0]},), got {tuple(scores.shape)}"
        )
    n = boxes_corner.shape[0]
    if n == 0 or max_output == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes_corner.device)
    order = torch.argsort(scores, descending=True, stable=True)
    ordered = boxes_corner[order]
    if max_output is not None and max_output <= _NMS_ROWWISE_MAX_OUTPUT:
        return order[_greedy_rowwise(ordered, iou_threshold, max_output)]
    iou = box_iou(ordered, ordered)
    # suppresses[i, j]: box i (higher score) would remove box j (lower score).
    suppresses = torch.triu(iou > iou_threshold, diagonal=1).cpu().numpy()
    removed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    # Greedy pass: the loop visits boxes, but only kept boxes do (vectorised) work.
    for i in range(n):
        if removed[i]:
            continue
        keep.append(i)
        if max_output is not None and len(keep) >= max_output:
            break
        removed |= suppresses[i]
    return order[torch.as_tensor(keep, dtype=torch.int64, device=order.device)]


def _greedy_rowwise(ordered_corner: Tensor, iou_threshold: float, max_output: int) -> Tensor:
    """Greedy NMS over boxes sorted by decreasing score, computing only the IoU rows of the kept
    boxes (max_output × N work instead of N²): the fast path when only a few boxes are wanted."""
    alive = torch.ones(ordered_corner.shape[0], dtype=torch.bool, device=ordered_corner.device)
    keep: list[int] = []
    while len(keep) < max_output:
        remaining = torch.nonzero(alive)
        if remaining.numel() == 0:
            break
        best = int(remaining[0])  # highest-scored box not yet kept or suppressed
        keep.append(best)
        iou = box_iou(ordered_corner[best:best + 1], ordered_corner)[0]
        alive &= iou <= iou_threshold
        alive[best] = False
    return torch.as_tensor(keep, dtype=torch.int64, device=ordered_corner.device)
