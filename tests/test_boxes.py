"""Box utilities: IoU, Eq. (1) coding, ground-truth boxes and NMS on hand-made cases."""

import math

import pytest
import torch

from igrpn import boxes as B


def corner(*values):
    return torch.tensor([values], dtype=torch.float32)


# --- IoU -----------------------------------------------------------------------------------------

def test_box_iou_known_values():
    cube = corner(0, 0, 0, 2, 2, 2)
    assert B.box_iou(cube, cube).item() == pytest.approx(1.0)
    assert B.box_iou(cube, corner(5, 5, 5, 7, 7, 7)).item() == 0.0
    # Touching faces share no volume.
    assert B.box_iou(cube, corner(2, 0, 0, 4, 2, 2)).item() == 0.0
    # Shifted by half an edge along x: intersection 1·2·2 = 4, union 8 + 8 − 4 = 12.
    assert B.box_iou(cube, corner(1, 0, 0, 3, 2, 2)).item() == pytest.approx(4 / 12)
    # A 2³ cube inside a 4³ cube: 8 / 64.
    assert B.box_iou(corner(0, 0, 0, 4, 4, 4), corner(1, 1, 1, 3, 3, 3)).item() == pytest.approx(8 / 64)


def test_box_iou_shape_and_chunking():
    generator = torch.Generator().manual_seed(0)
    low = torch.rand(37, 3, generator=generator) * 20
    boxes1 = torch.cat([low, low + 1 + torch.rand(37, 3, generator=generator) * 8], dim=1)
    low = torch.rand(5, 3, generator=generator) * 20
    boxes2 = torch.cat([low, low + 1 + torch.rand(5, 3, generator=generator) * 8], dim=1)
    full = B.box_iou(boxes1, boxes2)
    assert full.shape == (37, 5)
    assert torch.allclose(B.box_iou(boxes1, boxes2, chunk_size=4), full)
    assert torch.allclose(B.box_iou(boxes1, boxes2, chunk_size=1), full)
    assert torch.allclose(B.box_iou(boxes2, boxes1), full.t())
    assert bool(((full >= 0) & (full <= 1)).all())
    assert torch.allclose(B.paired_box_iou(boxes1[:5], boxes2), torch.diagonal(full[:5]))


def test_box_iou_rejects_bad_input():
    good = corner(0, 0, 0, 1, 1, 1)
    with pytest.raises(ValueError, match="shape"):
        B.box_iou(torch.zeros(3, 4), good)
    with pytest.raises(ValueError, match="negative size"):
        B.box_iou(good, corner(0, 0, 0, 1, -1, 1))


def test_centre_corner_round_trip():
    centre = torch.tensor([[10.0, 20.0, 30.0, 4.0, 6.0, 8.0]])
    assert torch.equal(B.centre_to_corner(centre), torch.tensor([[8.0, 17.0, 26.0, 12.0, 23.0, 34.0]]))
    assert torch.allclose(B.corner_to_centre(B.centre_to_corner(centre)), centre)
    with pytest.raises(ValueError, match="shape"):
        B.centre_to_corner(torch.zeros(2, 5))


# --- Eq. (1) -------------------------------------------------------------------------------------

def test_encode_known_values_and_round_trip():
    anchor = torch.tensor([[10.0, 10.0, 10.0, 4.0, 4.0, 8.0]])
    box = torch.tensor([[12.0, 10.0, 6.0, 8.0, 4.0, 2.0]])
    deltas = B.encode(box, anchor)
    expected = torch.tensor([[0.5, 0.0, -0.5, math.log(2.0), 0.0, math.log(0.25)]])
    assert torch.allclose(deltas, expected)
    assert torch.allclose(B.decode(deltas, anchor), box)

    generator = torch.Generator().manual_seed(1)
    anchors = torch.cat([torch.rand(50, 3, generator=generator) * 50,
                         2 + torch.rand(50, 3, generator=generator) * 20], dim=1)
    boxes = torch.cat([torch.rand(50, 3, generator=generator) * 50,
                       2 + torch.rand(50, 3, generator=generator) * 20], dim=1)
    assert torch.allclose(B.decode(B.encode(boxes, anchors), anchors), boxes, atol=1e-4)


def test_decode_zero_deltas_is_anchor_and_size_is_clamped():
    anchors = torch.tensor([[1.5, 2.5, 3.5, 5.0, 6.0, 7.0], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
    assert torch.equal(B.decode(torch.zeros(2, 6), anchors), anchors)
    huge = torch.tensor([[0.0, 0.0, 0.0, 100.0, -100.0, 0.0]])
    decoded = B.decode(huge, anchors[1:])
    assert decoded[0, 3].item() == pytest.approx(math.exp(B.DEFAULT_SIZE_CLAMP), rel=1e-5)
    assert decoded[0, 4].item() == pytest.approx(math.exp(-B.DEFAULT_SIZE_CLAMP), rel=1e-5)
    assert torch.isfinite(decoded).all()


# --- anchors -------------------------------------------------------------------------------------

def test_landmark_boxes():
    landmarks = torch.tensor([[[1.0, 2.0, 3.0]] * 5] * 2)
    boxes = B.landmark_boxes(landmarks, torch.tensor([3.0, 4.0, 3.0, 4.0, 4.0]))
    assert boxes.shape == (2, 5, 6)
    assert boxes[1, 1].tolist() == [1.0, 2.0, 3.0, 4.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="shape"):
        B.landmark_boxes(torch.zeros(4, 3), torch.ones(5))


# --- matching and sampling -----------------------------------------------------------------------

# --- NMS -----------------------------------------------------------------------------------------

def test_nms_suppresses_overlap_keeps_distant():
    boxes = torch.tensor([
        [0, 0, 0, 10, 10, 10],     # score 0.8, overlaps box 2 (IoU 0.90) -> suppressed
        [40, 40, 40, 50, 50, 50],  # score 0.7, far -> kept
        [0.5, 0, 0, 10.5, 10, 10],  # score 0.9 -> kept first
        [8, 0, 0, 18, 10, 10],     # score 0.6, IoU 0.14 with box 2 -> kept at threshold 0.25
    ], dtype=torch.float32)
    scores = torch.tensor([0.8, 0.7, 0.9, 0.6])
    assert B.nms(boxes, scores, 0.25).tolist() == [2, 1, 3]
    assert B.nms(boxes, scores, 0.25, max_output=2).tolist() == [2, 1]
    assert B.nms(boxes, scores, 0.1).tolist() == [2, 1]
    assert B.nms(boxes[:0], scores[:0], 0.5).numel() == 0


def test_nms_fast_path_matches_full_matrix():
    generator = torch.Generator().manual_seed(4)
    low = torch.rand(300, 3, generator=generator) * 30
    boxes = torch.cat([low, low + 3 + torch.rand(300, 3, generator=generator) * 6], dim=1)
    scores = torch.rand(300, generator=generator)
    full = B.nms(boxes, scores, 0.3)
    assert full.numel() > 5
    assert torch.equal(B.nms(boxes, scores, 0.3, max_output=5), full[:5])
    # Kept boxes overlap each other at most the threshold, and come by decreasing score.
    kept_iou = B.box_iou(boxes[full], boxes[full]).fill_diagonal_(0)
    assert float(kept_iou.max()) <= 0.3
    assert bool((scores[full][:-1] >= scores[full][1:]).all())


