"""IoU-balanced cross-entropy (paper Eq. 2–3) and smooth-L1 against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from igrpn.losses import iou_balanced_cross_entropy, iou_balanced_focal_loss, merge_mirror_classes, smooth_l1

LOG2, LOG3 = math.log(2.0), math.log(3.0)


def hand_case():
    """3 positives and 2 negatives over 3 classes, with CE values log 3, log 2, log 4, log 2, log 3."""
    logits = torch.tensor([
        [0.0, 0.0, 0.0],    # label 1: p = 1/3 -> CE log 3
        [0.0, LOG2, 0.0],   # label 1: p = 2/4 -> CE log 2
        [0.0, 0.0, LOG2],   # label 1: p = 1/4 -> CE log 4
        [LOG2, 0.0, 0.0],   # label 0: p = 2/4 -> CE log 2
        [0.0, 0.0, 0.0],    # label 0: p = 1/3 -> CE log 3
    ], requires_grad=True)
    labels = torch.tensor([1, 1, 1, 0, 0])
    ious = torch.tensor([0.9, 0.5, 0.2, 0.7, 0.0], requires_grad=True)  # negatives' IoUs unused
    return logits, labels, ious


def test_iou_balanced_matches_hand_computation():
    logits, labels, ious = hand_case()
    loss = iou_balanced_cross_entropy(logits, labels, ious, eta=1.75)
    # w_i = IoU_i^1.75 · ΣCE_pos / Σ IoU^1.75·CE_pos; the weighted positives keep their total CE,
    # so the value is the plain mean: (log 3 + log 2 + log 4 + log 2 + log 3) / 5 = log(144) / 5.
    assert loss.item() == pytest.approx(math.log(144.0) / 5, rel=1e-6)

    ce_pos = [LOG3, LOG2, math.log(4.0)]
    iou_eta = [0.9 ** 1.75, 0.5 ** 1.75, 0.2 ** 1.75]  # 0.83162, 0.29730, 0.05981
    normaliser = sum(ce_pos) / sum(a * b for a, b in zip(iou_eta, ce_pos))  # 3.17805 / 1.20262
    weights = [e * normaliser for e in iou_eta]
    assert weights == pytest.approx([2.19764, 0.78565, 0.15806], abs=1e-4)

    # The gradient shows the weights: d loss / d logits_i = w_i (softmax_i − onehot_i) / 5.
    loss.backward()
    probs = torch.softmax(logits.detach(), dim=1)
    onehot = F.one_hot(labels, 3).float()
    expected = torch.tensor(weights + [1.0, 1.0])[:, None] * (probs - onehot) / 5
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_no_gradient_reaches_ious():
    logits, labels, ious = hand_case()
    iou_balanced_cross_entropy(logits, labels, ious).backward()
    assert ious.grad is None or bool((ious.grad == 0).all())
    assert logits.grad is not None


def test_disabled_is_plain_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 6, generator=generator)
    labels = torch.randint(0, 6, (20,), generator=generator)
    ious = torch.rand(20, generator=generator)
    plain = iou_balanced_cross_entropy(logits, labels, ious, enabled=False)
    assert plain.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_guards_no_positives_and_zero_ious():
    logits, labels, ious = hand_case()
    negatives = torch.zeros(5, dtype=torch.int64)
    loss = iou_balanced_cross_entropy(logits, negatives, ious)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, negatives).item(), rel=1e-6)
    # All positive IoUs 0: positives get weight 0, negatives keep plain CE: (log 2 + log 3) / 5.
    loss = iou_balanced_cross_entropy(logits, labels, torch.zeros(5))
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx((LOG2 + LOG3) / 5, rel=1e-6)


def test_rejects_ignored_labels_and_bad_shapes():
    logits, _, ious = hand_case()
    with pytest.raises(ValueError, match="labels"):
        iou_balanced_cross_entropy(logits, torch.tensor([1, -1, 0, 0, 0]), ious)
    with pytest.raises(ValueError, match="expected"):
        iou_balanced_cross_entropy(logits, torch.zeros(4, dtype=torch.int64), ious)


def test_smooth_l1_known_values():
    beta = 1.0 / 9.0
    pred = torch.tensor([[1.0, 0.05, 0.0, 0.0, 0.0, 0.0], [0.0] * 6], requires_grad=True)
    target = torch.zeros(2, 6)
    # Box 0: |1| >= β -> 1 − β/2; |0.05| < β -> 0.5·0.05²/β. Box 1: 0. Sum per box, mean over boxes.
    expected = ((1 - beta / 2) + 0.5 * 0.05 ** 2 / beta) / 2
    assert smooth_l1(pred, target).item() == pytest.approx(expected, rel=1e-6)
    assert smooth_l1(pred, target, beta=1.0).item() == pytest.approx((0.5 + 0.5 * 0.05 ** 2) / 2, rel=1e-6)
    empty = smooth_l1(pred[:0], target[:0])
    assert empty.item() == 0.0 and empty.requires_grad


def test_mirror_pair_merge_sums_probabilities_and_relabels():
    from igrpn.losses import merge_mirror_classes

    logits = torch.tensor([[0.0, 1.0, 0.5, 2.0], [1.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([3, 2])
    merged, new_labels = merge_mirror_classes(logits, labels, [(1, 3)])
    p = logits.softmax(-1)
    # classes (0, 1+3, 2) -> (0, 1, 2): p'_1 = p_1 + p_3, class 2 keeps its probability
    assert torch.allclose(merged.softmax(-1), torch.stack([p[:, 0], p[:, 1] + p[:, 3], p[:, 2]], 1))
    assert new_labels.tolist() == [1, 2]
    # an eye positive split 50/50 between left and right is a perfect "eye": no loss left
    split = torch.tensor([[-30.0, 5.0, -30.0, 5.0]])
    assert iou_balanced_cross_entropy(split, torch.tensor([1]), torch.ones(1), mirror_pairs=[(1, 3)]) < 1e-6
    assert iou_balanced_cross_entropy(split, torch.tensor([1]), torch.ones(1)) == pytest.approx(LOG2, abs=1e-6)
    with pytest.raises(ValueError, match="pair"):
        merge_mirror_classes(logits, labels, [(3, 1)])


def reference_focal(logits, labels, ious, gamma, eta=1.75, enabled=True, mirror_pairs=()):
    """The dense IoU-balanced focal loss written with autograd's own ops (slow, plain)."""
    merged, targets = merge_mirror_classes(logits, labels.clamp(min=0), mirror_pairs)
    log_p = F.log_softmax(merged, dim=1).gather(1, targets[:, None])[:, 0]
    focal = -(1 - log_p.exp()) ** gamma * log_p
    positive = labels > 0
    with torch.no_grad():
        weights = (labels >= 0).to(focal.dtype)
        if enabled:
            iou_eta = ious[positive].to(focal.dtype) ** eta
            weights[positive] = iou_eta * focal[positive].sum() / (iou_eta * focal[positive]).sum()
    return (weights * focal).sum() / positive.sum()


@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("pairs", [(), ((1, 3),)])
@pytest.mark.parametrize("enabled", [True, False])
def test_dense_focal_loss_and_its_hand_written_gradient_match_autograd(gamma, pairs, enabled):
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(300, 6, generator=generator)).double().requires_grad_()
    labels = torch.randint(-1, 6, (300,), generator=generator)
    ious = torch.rand(300, generator=generator)
    loss = iou_balanced_focal_loss(logits, labels, ious, gamma=gamma, enabled=enabled, mirror_pairs=pairs)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = reference_focal(logits, labels, ious, gamma, enabled=enabled, mirror_pairs=pairs)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)  # fp32 inside
    assert torch.allclose(grad, expected_grad, atol=1e-6)


def test_dense_focal_loss_by_hand_ignores_anchors_and_divides_by_the_positives():
    logits = torch.tensor([
        [0.0, 0.0, 0.0],    # label 1: p = 1/3
        [LOG2, 0.0, 0.0],   # label 0: p = 1/2
        [0.0, 9.0, 0.0],    # ignored: contributes nothing, gets no gradient
    ], requires_grad=True)
    labels, ious = torch.tensor([1, 0, -1]), torch.tensor([0.5, 0.0, 0.0])
    loss = iou_balanced_focal_loss(logits, labels, ious, gamma=2.0)
    # One positive: its IoU weight normalises to 1. (2/3)² log 3 + (1/2)² log 2, over 1 positive.
    assert loss.item() == pytest.approx((2 / 3) ** 2 * LOG3 + 0.25 * LOG2, rel=1e-6)
    loss.backward()
    assert torch.equal(logits.grad[2], torch.zeros(3))
    # Plain cross-entropy (γ = 0) over both anchors, still divided by the one positive.
    plain = iou_balanced_focal_loss(logits.detach(), labels, ious, gamma=0.0)
    assert plain.item() == pytest.approx(LOG3 + LOG2, rel=1e-6)


def test_dense_focal_loss_refuses_bad_input():
    logits = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="labels must be -1"):
        iou_balanced_focal_loss(logits, torch.tensor([0, 1, 3, 0]), torch.zeros(4))
    with pytest.raises(ValueError, match="gamma"):
        iou_balanced_focal_loss(logits, torch.zeros(4, dtype=torch.int64), torch.zeros(4), gamma=-1.0)
    with pytest.raises(ValueError, match="expected logits"):
        iou_balanced_focal_loss(logits, torch.zeros(3, dtype=torch.int64), torch.zeros(4))
