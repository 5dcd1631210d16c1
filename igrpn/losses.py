"""Detection losses: the IoU-balanced classification loss (paper Eq. 2–3) and smooth-L1 regression."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: Guards the normaliser Σ IoU^η·CE of Eq. (3) against division by zero (all positive IoUs 0).
_EPS = 1e-12


def merge_mirror_classes(logits: Tensor, labels: Tensor, pairs) -> tuple[Tensor, Tensor]:
    """Fold each (a, b) class pair into class a: p'_a = p_a + p_b, class b dropped.

    A set-valued label: an anchor of either class is right when its probability mass lies on
    either of the two, so the net is not asked for a left/right it cannot see.

    Args:
        logits: (N, K+1) class logits, background first.
        labels: (N,) int64 class ids.
        pairs: ((a, b), ...) class ids, a < b.

    Returns:
        logits (N, K+1−len(pairs)) with column a = logsumexp(l_a, l_b) (so the softmax gives
        p_a + p_b) and column b removed; labels with b mapped to a and the ids above b shifted down.
    """
    pairs = sorted(tuple(int(c) for c in pair) for pair in pairs)
    if not pairs:
        return logits, labels
    keep = list(range(logits.shape[1]))
    merged = logits.clone()
    new_labels = labels.clone()
    for a, b in pairs:
        if not 0 < a < b < logits.shape[1]:
            raise ValueError(f"merge_mirror_classes: pair {(a, b)} must be class ids 0 < a < b < {logits.shape[1]}")
        merged[:, a] = torch.logsumexp(logits[:, [a, b]], dim=1)
        new_labels[labels == b] = a
        keep.remove(b)
    # Renumber the remaining classes to 0..len(keep)-1.
    lookup = torch.full((logits.shape[1],), -1, dtype=torch.int64, device=labels.device)
    lookup[torch.as_tensor(keep, device=labels.device)] = torch.arange(len(keep), device=labels.device)
    return merged[:, keep], lookup[new_labels]


def iou_balanced_cross_entropy(
    logits: Tensor, labels: Tensor, ious: Tensor, eta: float = 1.75, enabled: bool = True, mirror_pairs=()
) -> Tensor:
    """IoU-balanced cross-entropy over a batch of sampled anchors (paper Eq. 2–3).

    Positive ``i`` (``labels > 0``) is weighted by
    ``w_i = IoU_i^η · Σ_pos CE / Σ_pos (IoU^η · CE)``, so the positives keep their total loss but
    well-localised ones (high IoU after regression) count more; negatives keep plain CE. The whole
    weight is detached: no gradient reaches ``ious`` or the normaliser.
    The result is ``(Σ_pos w·CE + Σ_neg CE) / N``.

    Args:
        logits: (N, K+1) class logits, background first.
        labels: (N,) int64, 0 background, c > 0 a landmark class (no ignored entries).
        ious: (N,) IoU of each positive's regressed box with its GT, in [0, 1] (ignored for
            negatives).
        eta: the exponent η (paper: 1.75).
        enabled: ``False`` gives the plain mean cross-entropy.
        mirror_pairs: class-id pairs scored as one class (:func:`merge_mirror_classes`); empty:
            every class on its own (the paper).

    Returns:
        scalar loss.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or ious.shape != logits.shape[:1]:
        raise ValueError(
            "iou_balanced_cross_entropy: expected logits (N, K+1), labels (N,), ious (N,); got "
            f"{tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(ious.shape)}"
        )
    if logits.shape[0] == 0:
        return logits.sum() * 0.0  # nothing sampled: zero loss, still attached to the graph
    if bool(((labels < 0) | (labels >= logits.shape[1])).any()):
        raise ValueError(
            f"iou_balanced_cross_entropy: labels must be in [0, {logits.shape[1] - 1}] "
            "(drop ignored anchors before the loss)"
        )
    logits, labels = merge_mirror_classes(logits, labels, mirror_pairs)
    ce = F.cross_entropy(logits, labels, reduction="none")
    if not enabled:
        return ce.mean()
    positive = labels > 0
    with torch.no_grad():
        ce_pos = ce[positive]
        iou_eta = ious[positive].clamp(0.0, 1.0).to(ce.dtype) ** eta
        normaliser = ce_pos.sum() / (iou_eta * ce_pos).sum().clamp_min(_EPS)
        weights = torch.ones_like(ce)
        weights[positive] = iou_eta * normaliser
    return (weights * ce).sum() / ce.numel()


def smooth_l1(pred: Tensor, target: Tensor, beta: float = 1.0 / 9.0) -> Tensor:
    """Smooth-L1 regression loss, summed over the 6 deltas and averaged over the boxes.

    ``0.5·x²/β`` for ``|x| < β``, ``|x| − 0.5·β`` otherwise. β = 1/9 (Fast R-CNN / Detectron):
    our deltas are unweighted (Eq. 1 uses no 10/5 scaling), so typical residuals are ~0.05–0.5 of
    an anchor edge; with β = 1 they would all sit in the quadratic zone, whose gradient (x) is
    tiny, while β = 1/9 gives residuals above ~0.11 anchor edge (~1.5 voxels for a 14-voxel
    anchor) a constant unit gradient and keeps the quadratic zone for the fine range.

    Args:
        pred, target: (P, 6) deltas.
        beta: transition point between the quadratic and linear parts.

    Returns:
        scalar; 0 (attached to ``pred``'s graph) when P = 0.
    """
    if pred.shape != target.shape:
        raise ValueError(f"smooth_l1: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if pred.shape[0] == 0:
        return pred.sum() * 0.0
    per_box = F.smooth_l1_loss(pred, target, beta=beta, reduction="none").reshape(pred.shape[0], -1).sum(-1)
    return per_box.mean()



#: Anchors per chunk of the dense loss: a chunk's (K+1, chunk) fp32 temporaries stay in cache.
_DENSE_CHUNK = 1 << 17


def _partner_table(num_classes: int, mirror_pairs, device) -> Tensor:
    """(C,) int64: each class id's mirror partner (itself where it has none)."""
    partner = torch.arange(num_classes, device=device)
    for a, b in mirror_pairs:
        a, b = int(a), int(b)
        if not 0 < a < b < num_classes:
            raise ValueError(f"mirror pair {(a, b)} must be class ids 0 < a < b < {num_classes}")
        partner[a], partner[b] = b, a
    return partner


def _chunk_probabilities(logits: Tensor, targets: Tensor, partner: Tensor):
    """Softmax of a chunk, class-major, and the probability of each anchor's target set.

    Args:
        logits: (M, C) any float dtype; targets: (M,) class ids; partner: see _partner_table.

    Returns:
        p (C, M) fp32, in_set (C, M) bool (the target and its mirror partner), log_q (M,) and
        q (M,): log-probability and probability of the target set.
    """
    # Class-major fp32 copy: the reductions over the C classes then run over long contiguous
    # rows instead of C-element rows (log_softmax over a last dimension of 6 is ~10x slower).
    z = torch.empty((logits.shape[1], logits.shape[0]), dtype=torch.float32, device=logits.device)
    z.copy_(logits.t())
    z -= z.amax(dim=0, keepdim=True)
    z.exp_()
    total = z.sum(dim=0)
    classes = torch.arange(logits.shape[1], device=logits.device)[:, None]
    in_set = (classes == targets[None]) | (classes == partner[targets][None])
    log_q = torch.log((z * in_set).sum(dim=0)) - torch.log(total)
    z /= total
    return z, in_set, log_q, log_q.exp()


def _focal_terms(log_q: Tensor, q: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """Per anchor: the focal loss ``−(1 − q)^γ log q`` and ``g = q · dL/dq``."""
    one_minus = (-torch.expm1(log_q)).clamp_min(0.0)
    if gamma == 0:
        return -log_q, -torch.ones_like(q)
    modulation = one_minus.pow(gamma)
    g = gamma * q * one_minus.pow(gamma - 1) * log_q - modulation
    return -modulation * log_q, g


class _DenseFocalSetLoss(torch.autograd.Function):
    """Per-anchor focal cross-entropy of a set-valued target, with a hand-written gradient.

    For the target set S (a class and its mirror partner), q = Σ_{k∈S} p_k and
    L = −(1 − q)^γ log q; dL/dz_k = g · (p_k [k∈S] / q − p_k) with g = q·dL/dq. Chunked and
    class-major: autograd's log_softmax over (10⁶, 6) rows cost ~0.5 s per step here.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, partner: Tensor, gamma: float) -> Tensor:
        loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], _DENSE_CHUNK):
            rows = slice(start, start + _DENSE_CHUNK)
            _, _, log_q, q = _chunk_probabilities(logits[rows], targets[rows], partner)
            loss[rows] = _focal_terms(log_q, q, gamma)[0]
        ctx.save_for_backward(logits, targets, partner)
        ctx.gamma = gamma
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, targets, partner = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], _DENSE_CHUNK):
            rows = slice(start, start + _DENSE_CHUNK)
            p, in_set, log_q, q = _chunk_probabilities(logits[rows], targets[rows], partner)
            g = _focal_terms(log_q, q, ctx.gamma)[1] * grad_loss[rows]
            # (p_k [k∈S] / q − p_k) · g, computed in place on p.
            share = torch.where(in_set, p / q, 0.0)
            share -= p
            share *= g
            grad[rows] = share.t()
        return grad, None, None, None


def iou_balanced_focal_loss(
    logits: Tensor, labels: Tensor, ious: Tensor, gamma: float = 2.0, eta: float = 1.75,
    enabled: bool = True, mirror_pairs=(),
) -> Tensor:
    """IoU-balanced classification loss over *every* anchor (Eq. 2–3 with a focal modulation).

    The form of the IoU-balanced loss's own paper (Wu et al. 2019, the paper's ref. [10]), built
    on RetinaNet: each anchor's cross-entropy is scaled by ``(1 − p_t)^γ`` so that the millions of
    easy background anchors add little, and every positive ``i`` is further weighted by
    ``IoU_i^η · Σ_pos FL / Σ_pos (IoU^η · FL)`` (detached), as in
    :func:`iou_balanced_cross_entropy`. Ignored anchors (label −1) contribute nothing. The sum is
    divided by the number of positives (at least 1), not by the number of anchors: the loss then
    does not shrink as the easy background grows.

    Args:
        logits: (N, K+1) class logits of all anchors, background first (any float dtype; the loss
            is computed in fp32, the gradient returned in the logits' dtype).
        labels: (N,) int64: −1 ignored, 0 background, c > 0 a landmark class.
        ious: (N,) IoU of each positive's regressed box with its GT (read only where labels > 0).
        gamma: focusing exponent γ (RetinaNet: 2); 0 gives plain cross-entropy over all anchors.
        eta: the IoU-balance exponent η (paper: 1.75).
        enabled: ``False`` leaves the positives unweighted (the ablation without IoU balance).
        mirror_pairs: class-id pairs scored as one class (as :func:`merge_mirror_classes`: the
            target of either class is the pair, p_a + p_b).

    Returns:
        scalar loss.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or ious.shape != logits.shape[:1]:
        raise ValueError(
            "iou_balanced_focal_loss: expected logits (N, K+1), labels (N,), ious (N,); got "
            f"{tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(ious.shape)}"
        )
    if gamma < 0:
        raise ValueError(f"iou_balanced_focal_loss: gamma must be >= 0, got {gamma}")
    if bool(((labels < -1) | (labels >= logits.shape[1])).any()):
        raise ValueError(f"iou_balanced_focal_loss: labels must be -1 (ignored) or in [0, {logits.shape[1] - 1}]")
    partner = _partner_table(logits.shape[1], mirror_pairs, logits.device)
    # Ignored anchors take class 0 here and weight 0 below: no boolean gather of ~10⁶ rows.
    loss = _DenseFocalSetLoss.apply(logits.contiguous(), labels.clamp(min=0), partner, float(gamma))
    positive = labels > 0
    with torch.no_grad():
        weights = (labels >= 0).to(loss.dtype)
        if enabled and bool(positive.any()):
            loss_pos = loss[positive]
            iou_eta = ious[positive].clamp(0.0, 1.0).to(loss.dtype) ** eta
            weights[positive] = iou_eta * (loss_pos.sum() / (iou_eta * loss_pos).sum().clamp_min(_EPS))
    return (weights * loss).sum() / positive.sum().clamp_min(1)
