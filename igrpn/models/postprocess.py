"""From K+1-way anchor logits to each class's best boxes (RPN and SSD inference; docs/design.md §6).

Ranks every anchor of every class without scoring most of them exactly (a per-cell bound on the
log-probabilities), decodes only a growing prefix of the best ones, and runs greedy NMS on it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from igrpn import boxes as box_ops
from igrpn import anchors as anchor_ops


#: Anchors per chunk in :func:`top_anchors_per_class`: small enough for the CPU caches.
_SCORE_CHUNK = 16384
#: Fewest groups scored exactly in pass 2 of :func:`_top_by_margin_bound`.
_MIN_SEED_GROUPS = 64
#: Slack (nats) on the first pass's bound in :func:`top_anchors_per_class`, far above float rounding.
_BOUND_SLACK = 1e-3


def class_major_log_probs(logits: Tensor, mirror_pairs=()) -> Tensor:
    """Log-softmax of anchors' class logits, returned class-major for the foreground classes.

    The logits are transposed first so that the reductions over the K+1 classes run along
    contiguous rows of anchors (vectorised); reducing over the last axis of size 6 of (M, 6), as
    ``torch.logsumexp(logits, -1)`` does, was 2× slower on CPU. Values equal
    ``(logits[:, 1:] - logsumexp(logits, -1, keepdim=True)).t()`` up to float rounding.

    Args:
        logits: (M, K+1) class logits of M anchors (class 0 = background).
        mirror_pairs: class-id pairs (a, b) scored as one class: row a holds log(p_a + p_b),
            row b −inf.

    Returns:
        (K, M) log-probabilities of classes 1..K.
    """
    columns = logits.t().contiguous()  # (K+1, M)
    top = columns.amax(dim=0)
    log_sum = (columns - top).exp_().sum(dim=0).log_().add_(top)
    log_probs = columns[1:] - log_sum
    for a, b in mirror_pairs:  # on contiguous rows: no copy of the (M, K+1) logits
        log_probs[a - 1] = torch.logaddexp(log_probs[a - 1], log_probs[b - 1])
        log_probs[b - 1] = float("-inf")
    return log_probs


def top_anchors_per_class(logits: Tensor, k: int, group_size: int = 1, chunk: int = _SCORE_CHUNK,
                          mirror_pairs=(), margins: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` anchors of highest softmax probability for each foreground class, as
    ``class_major_log_probs(logits).topk(k, dim=1)``, without computing the log-softmax of every
    anchor when the anchors come in groups (the A anchors of a cell).

    Two exact strategies. For class-major logits (``logits.t()`` contiguous, as the RPN's inference
    head writes them) a bound is tried first (:func:`_top_by_margin_bound`). Pass 1 needs no
    exponential: for every group and class it keeps the best margin over the background,
    ``max_a (l_c − l_0)``; the softmax's normaliser is at least ``logaddexp(l_0, l_c)``, so
    ``log p_c ≤ log σ(l_c − l_0)``, increasing in the margin (for a mirror pair scored as one
    class, ``log(p_a + p_b) ≤ log σ(max(l_a, l_b) − l_0 + log 2)``). With the background row all
    zero (``class_major_head(reference=0)``) pass 1 is one reduction of contiguous memory. Pass 2
    scores exactly the anchors of the few groups with the best margins: their k-th best
    log-probability T is a lower bound of the true k-th best, so only groups whose bound reaches T
    can hold a top-k anchor. Pass 3 scores those exactly and ranks the anchors at or above T. On
    trained ``cpu`` RPNs with k = 256 (the first NMS round) pass 3 sees 2–7 % of the groups.

    Otherwise, and where the bound prunes too little (near-uniform scores, as an untrained head
    gives), exact group maxima (:func:`_top_by_group_maxima`): the log-softmax of every anchor,
    chunk by chunk, keeping each group's best, then the anchors of each class's k best groups.

    Args:
        logits: (M, K+1) class logits of M anchors (class 0 = background), M = groups ·
            ``group_size``, each group contiguous along M.
        k: how many to keep per class, ``0 <= k <= M``.
        group_size: anchors per group (1: no grouping: score everything, plain top-k).
        chunk: anchors per chunk of pass 1 (keeps its working set in the CPU caches).
        mirror_pairs: class-id pairs scored as one class (see :func:`class_major_log_probs`).
        margins: :func:`group_margins` of these logits when already computed (calls for several
            k on one volume), else computed here when needed.

    Returns:
        log-probabilities (k, K), by decreasing value in each column, and their anchor indices
        (k, K) int64. Equal values may come in another order than ``topk``'s (unspecified there).
    """
    num_anchors, num_outputs = logits.shape
    if not 0 <= k <= num_anchors:
        raise ValueError(f"top_anchors_per_class: k must be in [0, {num_anchors}], got {k}")
    num_groups = num_anchors // max(group_size, 1)
    if group_size > 1 and num_groups * group_size == num_anchors and 0 < k < num_groups:
        result = None
        if margin_bound_applies(logits, group_size):
            result = _top_by_margin_bound(logits, k, group_size, chunk, mirror_pairs, margins)
        if result is None:
            result = _top_by_group_maxima(logits, k, group_size, chunk, mirror_pairs)
        if result is not None:
            return result
    top_values, top = class_major_log_probs(logits, mirror_pairs).topk(k, dim=1)
    return top_values.t(), top.t()


def margin_bound_applies(logits: Tensor, group_size: int) -> bool:
    """Whether :func:`top_anchors_per_class` tries the margin bound on these (M, K+1) logits:
    class-major storage and whole groups of more than one anchor."""
    return group_size > 1 and logits.shape[0] % group_size == 0 and logits.t().is_contiguous()


def _top_by_margin_bound(logits: Tensor, k: int, group_size: int, chunk: int, mirror_pairs=(),
                         margins: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """:func:`top_anchors_per_class` by the margin bound (passes 1–3 of its docstring); ``None``
    where the bound prunes too little to pay (near-uniform scores, e.g. an untrained head) or a
    logit is NaN."""
    num_classes = logits.shape[1] - 1
    bound = margins if margins is not None else group_margins(logits, group_size, chunk, mirror_pairs)  # (K, groups)
    seed_count = min(bound.shape[1], max(4 * math.ceil(k / group_size), _MIN_SEED_GROUPS))
    # A NaN logit makes its group's margin NaN (amax propagates it).
    if seed_count >= bound.shape[1] or bool(torch.isnan(bound).any()):
        return None
    _, live = _live_classes(num_classes, mirror_pairs)
    # Pass 2: exact scores of each class's best groups by margin give its threshold T. (4× the
    # fewest groups that can hold k anchors: on trained RPNs more barely raise T, fewer leave it
    # far below the true k-th value.)
    seed_groups = torch.unique(bound[live].topk(seed_count, dim=1).indices)
    seed_scores = _group_log_probs(logits, seed_groups, group_size, mirror_pairs)  # (K, seeds·A)
    thresholds = seed_scores[live].kthvalue(seed_scores.shape[1] - k + 1, dim=1).values
    # log σ(m) ≥ T  <=>  m ≥ T − log(1 − e^T): the margin a group needs to hold a top-k anchor
    # (less a little, so that float rounding of the exact scores cannot drop a tie at T).
    needed = thresholds - torch.log(-torch.expm1(thresholds)) - _BOUND_SLACK
    reach = (bound[live] >= needed[:, None]).any(dim=0)
    reach[seed_groups] = True
    groups = torch.nonzero(reach).reshape(-1)
    if groups.numel() > max(4 * k, bound.shape[1] // 8):
        return None
    # Pass 3: every anchor of every group that can reach the top k, scored exactly; only those
    # at or above T (at least k: the seeds' own; less the slack, in case a score's last bit
    # differs from pass 2's) are ranked.
    scores = _group_log_probs(logits, groups, group_size, mirror_pairs)  # (K, groups·A)
    anchors = anchor_ops.group_members(groups, group_size)
    top_values = scores.new_full((num_classes, k), float("-inf"))
    top_index = anchors.new_zeros(num_classes, k)
    for row, c in enumerate(live):
        above = torch.nonzero(scores[c] >= thresholds[row] - _BOUND_SLACK).reshape(-1)
        values, order = scores[c, above].topk(k)
        top_values[c], top_index[c] = values, anchors[above[order]]
    return top_values.t(), top_index.t()


def _top_by_group_maxima(logits: Tensor, k: int, group_size: int, chunk: int,
                         mirror_pairs=()) -> tuple[Tensor, Tensor] | None:
    """:func:`top_anchors_per_class` by exact group maxima, for any layout and any scores: the
    k-th highest group maximum of a class is a lower bound of its k-th highest log-probability (k
    groups reach it), and at most k groups hold an anchor above it, so the top k lie among the
    anchors of the k best groups. ``None`` when NaN logits leave fewer than k candidates."""
    num_anchors, num_outputs = logits.shape
    num_classes, num_groups = num_outputs - 1, num_anchors // group_size
    # Pass 1: each group's best log-probability per class, chunk by chunk (no (K, M) tensor).
    rows = max(1, chunk // group_size) * group_size
    group_max = logits.new_empty(num_classes, num_groups)
    for start in range(0, num_anchors, rows):
        scores = class_major_log_probs(logits[start:start + rows], mirror_pairs)
        first = start // group_size
        group_max[:, first:first + scores.shape[1] // group_size] = (
            scores.view(num_classes, -1, group_size).amax(dim=2))
    bound, best_groups = group_max.topk(k, dim=1)  # (K, k) each
    # Pass 2: exact log-probabilities of the anchors of every class's k best groups (a class
    # merged into its mirror partner has none worth scoring).
    dropped, live = _live_classes(num_classes, mirror_pairs)
    groups = torch.unique(best_groups[live])  # sorted
    anchors = anchor_ops.group_members(groups, group_size)
    scores = _group_log_probs(logits, groups, group_size, mirror_pairs).view(num_classes, groups.numel(), group_size)
    position = torch.searchsorted(groups, best_groups).clamp_max(groups.numel() - 1)  # (K, k): rows of `scores`
    values, indices = [], []
    for c in range(num_classes):
        if c in dropped:
            values.append(bound.new_full((k,), float("-inf")))
            indices.append(best_groups.new_zeros(k))
            continue
        block = scores[c, position[c]].reshape(-1)
        candidates = torch.nonzero(block >= bound[c, -1]).reshape(-1)
        if candidates.numel() < k:  # only with NaN logits
            return None
        top_values, top = block[candidates].topk(k)
        values.append(top_values)
        indices.append(anchors.view(-1, group_size)[position[c]].reshape(-1)[candidates[top]])
    return torch.stack(values, dim=1), torch.stack(indices, dim=1)


def group_margins(logits: Tensor, group_size: int, chunk: int = _SCORE_CHUNK, mirror_pairs=()) -> Tensor:
    """Per group and foreground class, the best ``l_c − l_0`` of its anchors (a mirror pair's
    first class holds ``max(l_a, l_b) − l_0 + log 2``, the second −inf).

    Args:
        logits: (M, K+1) class-major (``logits.t()`` contiguous), M = groups · group_size.

    Returns:
        (K, groups).
    """
    num_anchors, num_outputs = logits.shape
    num_classes = num_outputs - 1
    columns = logits.t()  # (K+1, M), contiguous rows
    if not any(torch.aminmax(columns[0])):
        # Logits already relative to the background (class_major_head(reference=0)): the margins
        # are the logits; one reduction over contiguous memory.
        margins = columns[1:].reshape(-1, group_size).amax(dim=1).view(num_classes, -1)
    else:
        rows = max(1, chunk // group_size) * group_size
        margins = logits.new_empty(num_classes, num_anchors // group_size)
        difference = logits.new_empty(num_classes, min(rows, num_anchors))
        for start in range(0, num_anchors, rows):
            block = columns[:, start:start + rows]
            part = difference[:, :block.shape[1]]
            for c in range(num_classes):  # row by row: 2× faster than one broadcast subtraction
                torch.sub(block[c + 1], block[0], out=part[c])
            first = start // group_size
            torch.amax(part.view(num_classes, -1, group_size), dim=2,
                       out=margins[:, first:first + block.shape[1] // group_size])
    for a, b in mirror_pairs:
        margins[a - 1] = torch.maximum(margins[a - 1], margins[b - 1]) + math.log(2.0)
        margins[b - 1] = float("-inf")
    return margins


def _live_classes(num_classes: int, mirror_pairs=()) -> tuple[set[int], list[int]]:
    """Class rows (0-based, foreground) merged into their mirror partner, and the others."""
    dropped = {b - 1 for _, b in mirror_pairs}
    return dropped, [c for c in range(num_classes) if c not in dropped]


def _group_log_probs(logits: Tensor, groups: Tensor, group_size: int, mirror_pairs=()) -> Tensor:
    """Exact class-major log-probabilities (K, len(groups)·group_size) of the anchors of
    ``groups`` (sorted group indices), anchors in group order."""
    anchors = anchor_ops.group_members(groups, group_size)
    return class_major_log_probs(logits.t().index_select(1, anchors).t(), mirror_pairs)


def anchor_candidates(logits: Tensor, deltas: Tensor, anchors: Tensor, first_prefix: int,
                      anchors_per_group: int, nms_iou: float, top_k: int,
                      mirror_pairs=()) -> list[tuple[Tensor, Tensor]]:
    """One volume's candidates per class from K+1-way anchor logits (RPN and SSD): softmax,
    decode, greedy NMS over all anchors of each class (docs/design.md §6), the first ``top_k`` kept.

    Greedy NMS decides on a box from the boxes scored above it alone, so NMS of the ``n`` best
    anchors keeps exactly the boxes of the full NMS that lie among them: once that gives ``top_k``
    boxes, they are the full NMS's first ``top_k``. Only the ``first_prefix`` best anchors of
    each class are decoded at first, 4× more while a class has fewer than it needs.

    Args:
        logits: (A, K+1) class logits; deltas: (A, 6); anchors: (A, 6) centre form, voxels.
        first_prefix: anchors per class decoded in the first round.
        anchors_per_group: anchors per cell (see :func:`top_anchors_per_class`).
        mirror_pairs: class-id pairs (a, b) scored as one class, p_a + p_b: both get the same
            list of up to ``2·top_k`` boxes (two places per rank: the left and the right one).

    Returns:
        K tuples ``(boxes (n, 6) centre form voxels, scores (n,))`` by decreasing score, n <= top_k
        (2·top_k for a mirror pair).
    """
    pair_of = {b - 1: a - 1 for a, b in mirror_pairs}
    paired = {a - 1 for a, _ in mirror_pairs}
    logits = logits.float()
    prefix = min(max(int(first_prefix), 1), logits.shape[0])
    margins = None  # pass 1 of top_anchors_per_class, computed once for every round
    if margin_bound_applies(logits, anchors_per_group):
        margins = group_margins(logits, anchors_per_group, mirror_pairs=mirror_pairs)
    while True:
        # Ranking on log p is the same as on p; only the prefix is decoded and exponentiated.
        top_log_probs, top_index = top_anchors_per_class(logits, prefix, anchors_per_group,
                                                         mirror_pairs=mirror_pairs, margins=margins)
        top_scores = top_log_probs.exp()  # (prefix, K)
        per_class, complete = [], True
        for c in range(top_scores.shape[1]):
            if c in pair_of:
                per_class.append(per_class[pair_of[c]])  # the merged class's list (a < b: built already)
                continue
            index = top_index[:, c]
            boxes = box_ops.decode(deltas[index].float(), anchors[index])
            wanted = 2 * top_k if c in paired else top_k
            keep = box_ops.nms(box_ops.centre_to_corner(boxes), top_scores[:, c], nms_iou, wanted)
            per_class.append((boxes[keep], top_scores[keep, c]))
            complete = complete and keep.numel() >= wanted
        if complete or prefix == logits.shape[0]:
            return per_class
        prefix = min(4 * prefix, logits.shape[0])
