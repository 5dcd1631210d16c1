"""Anchors: their grid, their labels from the ground-truth boxes, and which of them enter the loss.

Anchors are centre-form boxes ``(x, y, z, w, h, d)`` in voxels of the resampled grid, cell-major and
anchor-minor (index = cell·A + a). Labels follow paper §3 (positive above IoU 0.5 or the best anchor
of a box, negative below 0.25, ignored between) or ATSS (docs/design.md §5, §10.7); the samplers
choose the anchors of Eq. (2) (docs/design.md §10.8).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from igrpn.boxes import box_iou, centre_to_corner, check_boxes


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
    check_boxes(boxes_corner, "boxes_corner", "grid_anchors_near", ndim=2)
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
    check_boxes(anchors_corner, "anchors_corner", "match_anchors", ndim=2)
    check_boxes(gt_corner, "gt_corner", "match_anchors", ndim=2)
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
    check_boxes(anchors, "anchors", "atss_positives", ndim=2)
    check_boxes(gt_centre, "gt_centre", "atss_positives", ndim=2)
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
    candidate, which costs far more. Dense cases use the permutation."""
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
