"""3D box utilities: conversions, IoU, the box coding of Eq. (1), anchors, matching, sampling, NMS.

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


def _check_boxes(boxes: Tensor, name: str, func: str, ndim: int | None = None) -> None:
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
    _check_boxes(boxes, "boxes", "centre_to_corner")
    centre, size = boxes[..., :3], boxes[..., 3:]
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def corner_to_centre(boxes: Tensor) -> Tensor:
    """Corner form (..., 6) ``(x0, y0, z0, x1, y1, z1)`` -> centre form (..., 6) ``(x, y, z, w, h, d)``."""
    _check_boxes(boxes, "boxes", "corner_to_centre")
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
    _check_boxes(boxes1, "boxes1", "box_iou", ndim=2)
    _check_boxes(boxes2, "boxes2", "box_iou", ndim=2)
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
    _check_boxes(boxes1, "boxes1", "paired_box_iou", ndim=2)
    _check_boxes(boxes2, "boxes2", "paired_box_iou", ndim=2)
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
    _check_boxes(boxes, "boxes", "encode")
    _check_boxes(anchors, "anchors", "encode")
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
    _check_boxes(deltas, "deltas", "decode")
    _check_boxes(anchors, "anchors", "decode")
    anchor_size = anchors[..., 3:]
    centre = anchors[..., :3] + deltas[..., :3] * anchor_size
    size = anchor_size * torch.exp(deltas[..., 3:].clamp(-clamp, clamp))
    return torch.cat([centre, size], dim=-1)


#: Modes of :func:`anchor_shapes`.
ANCHOR_MODES: tuple[str, ...] = ("combinations", "cubes")


def anchor_shapes(sizes_vox, mode: str = "combinations") -> Tensor:
    """The (w, h, d) edges of one cell's anchors, voxels.

    ``"combinations"`` (the paper's "4 base sizes in each spatial dimension"): every (w, h, d)
    combination of the base sizes, ``S³`` shapes with index ``(iw·S + ih)·S + id``; ``"cubes"``:
    one cube per base size, ``S`` shapes (every GT box is a cube, so the other ``S³ − S`` shapes
    can never match one better than the nearest cube).

    Args:
        sizes_vox: S base sizes, voxels.
        mode: one of :data:`ANCHOR_MODES`.

    Returns:
        (A, 3) float32, A = S³ or S.
    """
    if mode not in ANCHOR_MODES:
        raise ValueError(f"anchor_shapes: mode must be one of {list(ANCHOR_MODES)}, got {mode!r}")
    sizes = torch.as_tensor(sizes_vox, dtype=torch.float32).reshape(-1)
    if sizes.numel() == 0 or bool((sizes <= 0).any()):
        raise ValueError(f"anchor_shapes: sizes_vox must be non-empty and positive, got {sizes_vox}")
    if mode == "cubes":
        return sizes[:, None].expand(-1, 3).contiguous()
    return torch.stack(torch.meshgrid(sizes, sizes, sizes, indexing="ij"), dim=-1).reshape(-1, 3)


def anchors_per_cell(num_sizes: int, mode: str = "combinations") -> int:
    """Anchors of one cell for ``num_sizes`` base sizes (:func:`anchor_shapes`)."""
    if mode not in ANCHOR_MODES:
        raise ValueError(f"anchors_per_cell: mode must be one of {list(ANCHOR_MODES)}, got {mode!r}")
    return int(num_sizes) ** 3 if mode == "combinations" else int(num_sizes)


def make_anchors(grid_shape, stride: int, sizes_vox, mode: str = "combinations") -> Tensor:
    """Anchors of a feature grid, centre form, voxels.

    Every cell carries the ``A`` anchors of :func:`anchor_shapes` (``mode``): by default
    ``len(sizes_vox)**3``, every (w, h, d) combination of the base sizes. The cell ``(i, j, k)``
    covers voxels ``[stride·i, stride·i + stride − 1]`` (likewise j, k) of the input, so its centre
    is ``stride·index + (stride − 1) / 2``.

    Ordering is cell-major, anchor-minor: row ``cell·A + a`` with ``cell = (i·Y + j)·Z + k`` (C
    order over the grid) and ``a = (iw·S + ih)·S + id`` indexing (w, h, d) = (sizes[iw], sizes[ih],
    sizes[id]). A head output of shape (N, A·C, X, Y, Z), with channel ``a·C + c``, matches it after
    ``view(N, A, C, X, Y, Z).permute(0, 3, 4, 5, 1, 2).reshape(N, X·Y·Z·A, C)``.

    Args:
        grid_shape: (X, Y, Z) cells of the feature map.
        stride: input voxels per cell along each axis.
        sizes_vox: S base sizes, voxels.
        mode: ``"combinations"`` or ``"cubes"`` (:func:`anchor_shapes`).

    Returns:
        (X·Y·Z·A, 6) float32.
    """
    grid_shape = tuple(int(g) for g in grid_shape)
    if len(grid_shape) != 3 or min(grid_shape) < 1:
        raise ValueError(f"make_anchors: grid_shape must be 3 positive ints, got {grid_shape}")
    if stride < 1:
        raise ValueError(f"make_anchors: stride must be >= 1, got {stride}")
    shapes = anchor_shapes(sizes_vox, mode)[None]  # (1, A, 3)
    axes = [torch.arange(n, dtype=torch.float32) * stride + (stride - 1) / 2 for n in grid_shape]
    centres = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 1, 3)
    num_cells, num_shapes = centres.shape[0], shapes.shape[1]
    anchors = torch.cat(
        [centres.expand(num_cells, num_shapes, 3), shapes.expand(num_cells, num_shapes, 3)], dim=-1
    )
    return anchors.reshape(-1, 6)


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


def grid_anchors_near(boxes_corner: Tensor, grid_shape, stride: int, sizes_vox, min_iou: float = 0.0,
                      mode: str = "combinations") -> Tensor:
    """Rows of ``make_anchors(grid_shape, stride, sizes_vox, mode)`` that may reach an IoU of at least
    ``min_iou`` with one of the boxes (``min_iou = 0``: that overlap one at all).

    Along an axis an anchor of edge ``a`` and a box of edge ``g`` whose centres are ``δ`` apart
    overlap by at most ``(a + g)/2 − |δ|``. IoU ≥ τ needs the intersection ≥ τ(V_a + V_g)/(1 + τ),
    so along x an overlap of at least that over ``min(a_y, g_y)·min(a_z, g_z)``, hence
    ``|δ_x| <= (a_x + g_x)/2 − that``; the cells within the widest such reach over all anchor
    shapes, along each axis, are kept with all their anchors. Cells are found from the grid's
    geometry, so the cost does not grow with the number of anchors.

    Args:
        boxes_corner: (G, 6) corner form, voxels.
        grid_shape, stride, sizes_vox, mode: as for :func:`make_anchors`.
        min_iou: τ in [0, 1).

    Returns:
        (C,) int64 anchor indices, increasing (C = A · cells near a box).
    """
    _check_boxes(boxes_corner, "boxes_corner", "grid_anchors_near", ndim=2)
    if not 0.0 <= min_iou < 1.0:
        raise ValueError(f"grid_anchors_near: min_iou must be in [0, 1), got {min_iou}")
    grid_shape = tuple(int(g) for g in grid_shape)
    shapes = anchor_shapes(sizes_vox, mode).double()  # (A, 3)
    per_cell = shapes.shape[0]
    offset = (stride - 1) / 2  # centre of cell 0 (make_anchors)
    near = torch.zeros(grid_shape, dtype=torch.bool)
    for box in boxes_corner.detach().cpu().double():
        edges, centre = box[3:] - box[:3], (box[3:] + box[:3]) / 2
        smaller = torch.minimum(shapes, edges)  # (A, 3)
        needed = min_iou * (shapes.prod(1) + edges.prod()) / (1 + min_iou)  # (A,) intersection volume
        # Overlap needed along each axis when the other two overlap fully.
        other_two = torch.stack([smaller[:, 1] * smaller[:, 2], smaller[:, 0] * smaller[:, 2],
                                 smaller[:, 0] * smaller[:, 1]], dim=1)
        overlap = needed[:, None] / other_two
        reachable = (overlap <= smaller).all(dim=1)  # shapes that can reach min_iou at all
        if not bool(reachable.any()):
            continue
        reach = ((shapes + edges) / 2 - overlap)[reachable].amax(dim=0)  # (3,) largest |δ| per axis
        window = []
        for axis, cells in enumerate(grid_shape):
            # Cells whose centre stride·i + offset lies within reach (a hair wider against rounding).
            slack = 1e-6 * (1.0 + abs(float(centre[axis])))
            first = math.ceil((float(centre[axis] - reach[axis]) - slack - offset) / stride)
            last = math.floor((float(centre[axis] + reach[axis]) + slack - offset) / stride)
            window.append(slice(max(first, 0), max(min(last, cells - 1) + 1, 0)))
        near[tuple(window)] = True
    cells = torch.nonzero(near.reshape(-1)).reshape(-1)
    return group_members(cells, per_cell).to(boxes_corner.device)


def match_anchors(
    anchors_corner: Tensor,
    gt_corner: Tensor,
    gt_labels: Tensor,
    pos_iou: float = 0.5,
    neg_iou: float = 0.25,
    candidates: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Label anchors against ground-truth boxes (paper §3).

    * positive (the GT's class) if its IoU with a GT is above ``pos_iou``, or if it is one of the
      anchors (ties included) with the highest IoU for a GT (that IoU being > 0); such a
      best-anchor positive takes the GT it is best for (the one it overlaps most if it is best for
      several), so every GT keeps a positive unless its best anchor is another GT's best too;
    * negative (0) if its IoU with every GT is below ``neg_iou``;
    * ignored (−1) otherwise.

    Args:
        anchors_corner: (A, 6) corner form, voxels.
        gt_corner: (G, 6) corner form, voxels.
        gt_labels: (G,) class ids (> 0).
        pos_iou, neg_iou: thresholds, ``neg_iou <= pos_iou``.
        candidates: optional (C,) int64 indices of the anchors to compute IoUs for; every other
            anchor is taken as background. They must hold every anchor with an IoU of at least
            ``neg_iou`` with some GT (:func:`grid_anchors_near` with ``min_iou=neg_iou``); the
            result is then the same as without them (a GT whose best candidate stays below
            ``neg_iou`` may have its best anchor elsewhere: all anchors are matched then).

    Returns:
        labels: (A,) int64, −1 ignored, 0 background, c > 0 the matched GT's class.
        matched_gt: (A,) int64 index into the G boxes (the highest-IoU GT, or the GT a best anchor
        belongs to); meaningful only where ``labels > 0``.
    """
    _check_boxes(anchors_corner, "anchors_corner", "match_anchors", ndim=2)
    _check_boxes(gt_corner, "gt_corner", "match_anchors", ndim=2)
    if neg_iou > pos_iou:
        raise ValueError(f"match_anchors: neg_iou ({neg_iou}) must not exceed pos_iou ({pos_iou})")
    gt_labels = torch.as_tensor(gt_labels, dtype=torch.int64, device=anchors_corner.device).reshape(-1)
    if gt_labels.numel() != gt_corner.shape[0]:
        raise ValueError(
            f"match_anchors: {gt_corner.shape[0]} GT boxes but {gt_labels.numel()} labels"
        )
    num_anchors = anchors_corner.shape[0]
    device = anchors_corner.device
    if gt_corner.shape[0] == 0:
        zeros = torch.zeros(num_anchors, dtype=torch.int64, device=device)
        return zeros, zeros.clone()
    if candidates is not None:
        candidates = torch.as_tensor(candidates, dtype=torch.int64, device=device).reshape(-1)
        # Laid out (G, C): see below.
        iou = box_iou(gt_corner, anchors_corner[candidates])
        if neg_iou > 0 and iou.shape[1] and bool((iou.amax(dim=1) >= neg_iou).all()):
            # Every other anchor has IoU < neg_iou with every GT (background) and is no GT's best.
            sub_labels, sub_matched = _labels_from_iou(iou, gt_labels, pos_iou, neg_iou)
            labels = torch.zeros(num_anchors, dtype=torch.int64, device=device)
            matched_gt = torch.zeros_like(labels)
            labels[candidates], matched_gt[candidates] = sub_labels, sub_matched
            return labels, matched_gt
    # Laid out (G, A): the reductions over the few GT boxes then run along contiguous rows of
    # anchors (IoU is symmetric: the values of box_iou(anchors, gt), transposed).
    return _labels_from_iou(box_iou(gt_corner, anchors_corner), gt_labels, pos_iou, neg_iou)


def _labels_from_iou(iou: Tensor, gt_labels: Tensor, pos_iou: float, neg_iou: float) -> tuple[Tensor, Tensor]:
    """:func:`match_anchors`' labels from the (G, A) IoUs of G GT boxes with A anchors."""
    num_anchors = iou.shape[1]
    max_iou, matched_gt = iou.max(dim=0)
    labels = torch.full((num_anchors,), -1, dtype=torch.int64, device=iou.device)
    labels[max_iou < neg_iou] = 0
    above = max_iou > pos_iou
    labels[above] = gt_labels[matched_gt[above]]
    # Best-anchor rule: anchors whose IoU equals their GT's maximum (ties kept); a GT that overlaps
    # no anchor at all (maximum 0) forces nothing.
    best_per_gt = iou.amax(dim=1)  # (G,)
    reached = best_per_gt[best_per_gt > 0]
    if reached.numel():
        # An anchor that is a GT's best has max_iou >= that GT's best IoU: compare only the anchors
        # reaching the lowest such maximum (a handful) instead of every anchor.
        candidates = torch.nonzero(max_iou >= reached.min()).reshape(-1)
        is_best = (iou[:, candidates] == best_per_gt[:, None]) & (best_per_gt[:, None] > 0)  # (G, C)
        best_for_any = is_best.any(dim=0)
        forced = candidates[best_for_any]
        # Among the GTs an anchor is best for, take the one it overlaps most.
        forced_gt = torch.where(is_best[:, best_for_any], iou[:, forced], -1.0).argmax(dim=0)
        matched_gt[forced] = forced_gt
        labels[forced] = gt_labels[forced_gt]
    return labels, matched_gt


def atss_positives(anchors: Tensor, gt_centre: Tensor, group_size: int, num_cells: int) -> tuple[Tensor, Tensor]:
    """Adaptive training-sample selection (ATSS, Zhang et al., CVPR 2020) on one feature grid.

    For each GT box the candidates are the anchors of the ``num_cells`` cells whose centres lie
    nearest its centre; its IoU threshold is the mean plus the standard deviation of their IoUs,
    so a small box (an eye) gets as many positives as a large one. A candidate is positive when
    its IoU reaches the threshold or is the best among them (and is > 0) and its centre lies
    inside the GT box; an anchor positive for several GTs takes the one it overlaps most.

    Args:
        anchors: (A, 6) centre form, voxels, ``group_size`` consecutive rows per cell sharing a
            centre (:func:`make_anchors`' order).
        gt_centre: (G, 6) centre form, voxels.
        group_size: anchors per cell.
        num_cells: nearest cells per GT.

    Returns:
        ``anchor_index`` (P,) int64 and ``gt_index`` (P,) int64 of the positives, each anchor once.
    """
    _check_boxes(anchors, "anchors", "atss_positives", ndim=2)
    _check_boxes(gt_centre, "gt_centre", "atss_positives", ndim=2)
    if group_size < 1 or anchors.shape[0] % group_size:
        raise ValueError(f"atss_positives: {anchors.shape[0]} anchors are not whole cells of {group_size}")
    if num_cells < 1:
        raise ValueError(f"atss_positives: num_cells must be >= 1, got {num_cells}")
    cell_centres = anchors[::group_size, :3]
    num_cells = min(int(num_cells), cell_centres.shape[0])
    gt_corner = centre_to_corner(gt_centre)
    best_iou = torch.zeros(anchors.shape[0], device=anchors.device)
    best_gt = torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
    for g in range(gt_centre.shape[0]):
        nearest = (cell_centres - gt_centre[g, :3]).square().sum(dim=1).topk(num_cells, largest=False).indices
        candidates = group_members(nearest.sort().values, group_size)
        iou = box_iou(centre_to_corner(anchors[candidates]), gt_corner[g:g + 1])[:, 0]
        threshold = iou.mean() + iou.std(correction=0)
        centre = anchors[candidates, :3]
        inside = ((centre >= gt_corner[g, :3]) & (centre <= gt_corner[g, 3:])).all(dim=1)
        # The best candidate always qualifies (with two candidates mean + std is their maximum).
        chosen = ((iou >= threshold) | (iou == iou.max())) & (iou > 0) & inside
        # Conflicts: the GT with the larger IoU keeps the anchor.
        wins = chosen & (iou > best_iou[candidates])
        best_iou[candidates[wins]] = iou[wins]
        best_gt[candidates[wins]] = g
    anchor_index = torch.nonzero(best_gt >= 0).flatten()
    return anchor_index, best_gt[anchor_index]


def sample_balanced(
    labels: Tensor, num: int, positive_fraction: float, generator: torch.Generator | None = None
) -> Tensor:
    """Random subset of labelled anchors with a capped share of positives.

    At most ``int(num · positive_fraction)`` positives (``labels > 0``) are drawn, negatives
    (``labels == 0``) fill the rest up to ``num``; ignored anchors (−1) are never drawn. Draws are
    without replacement; fewer than ``num`` come back when there are not enough anchors.

    Args:
        labels: (A,) int64 from :func:`match_anchors`.
        num: anchors wanted.
        positive_fraction: the largest share of positives, in [0, 1].
        generator: torch.Generator (CPU) for reproducible draws.

    Returns:
        (n,) int64 indices into ``labels``, positives first, n <= num.
    """
    if labels.ndim != 1:
        raise ValueError(f"sample_balanced: labels must be 1-D, got shape {tuple(labels.shape)}")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"sample_balanced: positive_fraction must be in [0, 1], got {positive_fraction}")
    if num < 0:
        raise ValueError(f"sample_balanced: num must be >= 0, got {num}")
    is_positive, is_negative = labels > 0, labels == 0
    num_pos = min(int(num * positive_fraction), int(is_positive.sum()))
    num_neg = min(num - num_pos, int(is_negative.sum()))
    return torch.cat([_draw_distinct(is_positive, num_pos, generator),
                      _draw_distinct(is_negative, num_neg, generator)])


def _draw_distinct(mask: Tensor, count: int, generator: torch.Generator | None) -> Tensor:
    """``count`` distinct indices drawn uniformly among the True entries of ``mask`` (1-D), in
    random order; ``count`` must not exceed the number of True entries.

    A few hundred draws among two million background anchors: uniform draws over all positions,
    rejected where ``mask`` is False or already drawn, instead of listing and permuting every
    candidate (that cost ~30 ms per volume). Dense cases use the permutation."""
    total, size = int(mask.sum()), mask.numel()
    if count <= 0:
        return torch.zeros(0, dtype=torch.int64, device=mask.device)
    if 16 * count > total or 2 * total < size:
        candidates = torch.nonzero(mask).reshape(-1)
        # randperm on the generator's device (CPU), then index on the mask's device.
        order = torch.randperm(candidates.numel(), generator=generator)[:count]
        return candidates[order.to(candidates.device)]
    chosen: dict[int, None] = {}  # insertion-ordered set
    while len(chosen) < count:
        # At least half the positions are candidates: each round keeps over half of its draws.
        draws = torch.randint(size, (2 * (count - len(chosen)) + 16,), generator=generator)
        accepted = mask[draws.to(mask.device)].cpu()
        for index in draws[accepted].tolist():
            chosen.setdefault(index)
            if len(chosen) == count:
                break
    return torch.tensor(list(chosen), dtype=torch.int64, device=mask.device)


def group_members(groups: Tensor, group_size: int) -> Tensor:
    """Indices (len(groups)·group_size,) of the members of ``groups`` when groups of
    ``group_size`` are contiguous (the A anchors of a cell), in group order."""
    return (groups[:, None] * group_size + torch.arange(group_size, device=groups.device)).reshape(-1)


def hardest_negatives(labels: Tensor, negative_scores: Tensor, num: int, exclude: Tensor | None = None,
                      group_size: int = 1) -> Tensor:
    """The ``num`` background anchors (``labels == 0``) with the highest ``negative_scores``.

    Args:
        labels: (A,) int64 from :func:`match_anchors`.
        negative_scores: (A,) how strongly each anchor is taken for a landmark (e.g. the largest
            foreground log-odds); higher is harder.
        num: anchors wanted (fewer come back when there are not enough negatives).
        exclude: (n,) indices never returned (e.g. those already sampled).
        group_size: anchors per group (the A anchors of a cell, groups contiguous): the hardest
            lie among the ``num`` groups of highest maximum, so only those are ranked (the same
            result as ranking all, without a top-k over millions).

    Returns:
        (m,) int64 indices into ``labels``, hardest first, m <= num.
    """
    if labels.shape != negative_scores.shape or labels.ndim != 1:
        raise ValueError(f"hardest_negatives: labels {tuple(labels.shape)} and scores "
                         f"{tuple(negative_scores.shape)} must be the same 1-D shape")
    scores = negative_scores.detach().float().clone()
    scores[labels != 0] = float("-inf")
    if exclude is not None and exclude.numel():
        scores[exclude] = float("-inf")
    num = int(num)
    num_groups = scores.numel() // max(int(group_size), 1)
    if group_size > 1 and num_groups * group_size == scores.numel() and 0 < num < num_groups:
        # The num hardest anchors lie in the num groups of highest maximum (each of those holds
        # one anchor at least as hard as any anchor outside them).
        groups = scores.view(num_groups, group_size).amax(dim=1).topk(num).indices
        members = group_members(groups, group_size)
        count = min(num, int(torch.isfinite(scores[members]).sum()))
        return members[torch.topk(scores[members], count).indices] if count > 0 else labels.new_zeros(0)
    count = min(num, int(torch.isfinite(scores).sum()))
    return torch.topk(scores, count).indices if count > 0 else labels.new_zeros(0)


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
    _check_boxes(boxes_corner, "boxes_corner", "nms", ndim=2)
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
