"""Box utilities: IoU, Eq. (1) coding, anchors, matching, sampling and NMS on hand-made cases."""

import math

import pytest
import torch

from igrpn import boxes as B
from igrpn import anchors as anchor_ops


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

def test_make_anchors_count_placement_and_order():
    sizes = (3.0, 5.0)
    grid = (2, 3, 4)
    anchors = anchor_ops.make_anchors(grid, stride=4, sizes_vox=sizes)
    num_shapes = len(sizes) ** 3
    assert anchors.shape == (2 * 3 * 4 * num_shapes, 6)
    assert anchors.dtype == torch.float32
    # First cell covers voxels 0..3 on each axis: centre 1.5.
    assert torch.equal(anchors[:num_shapes, :3], torch.full((num_shapes, 3), 1.5))
    # Its A anchors are every (w, h, d) combination, d varying fastest.
    assert anchors[:num_shapes, 3:].tolist() == [
        [w, h, d] for w in sizes for h in sizes for d in sizes
    ]
    # Row cell·A + a with cell = (i·Y + j)·Z + k in C order.
    i, j, k, a = 1, 2, 3, 5
    row = ((i * grid[1] + j) * grid[2] + k) * num_shapes + a
    assert anchors[row].tolist() == [4 * i + 1.5, 4 * j + 1.5, 4 * k + 1.5, 5.0, 3.0, 5.0]


def test_cube_anchors_are_one_cube_per_size_in_the_same_cell_order():
    sizes, grid = (3.0, 5.0, 8.0), (2, 1, 2)
    anchors = anchor_ops.make_anchors(grid, stride=2, sizes_vox=sizes, mode="cubes")
    assert anchors.shape == (4 * 3, 6) and anchor_ops.anchors_per_cell(3, "cubes") == 3
    assert anchors[:3, 3:].tolist() == [[3.0] * 3, [5.0] * 3, [8.0] * 3]
    # cell (1, 0, 1) = row-block 3, centre stride·index + 0.5
    assert anchors[9:12, :3].tolist() == [[2.5, 0.5, 2.5]] * 3
    # the cubes are the diagonal of the paper's 27 combinations
    combinations = anchor_ops.anchor_shapes(sizes)
    assert combinations.shape == (27, 3) and anchor_ops.anchors_per_cell(3) == 27
    assert torch.equal(combinations[[0, 13, 26]], anchor_ops.anchor_shapes(sizes, "cubes"))
    with pytest.raises(ValueError, match="mode must be one of"):
        anchor_ops.make_anchors(grid, 2, sizes, mode="spheres")


def test_atss_positives_by_hand():
    # cells of 4 voxels (centres 4i + 1.5), one cube of 4, 8 and 10 voxels per cell
    anchors = anchor_ops.make_anchors((6, 6, 6), 4, (4.0, 8.0, 10.0), mode="cubes")
    # a GT cube of 8 centred between the 8 cells (i, j, k in {2, 3}): each of them is 2 voxels off
    # per axis; IoUs 64/512 = 0.125 (4-cube, inside the GT), 216/808 = 0.267 (8), 512/1000 = 0.512
    # (10); mean + std = 0.301 + 0.160 = 0.461: the eight 10-cubes are positive
    gt = torch.tensor([[11.5, 11.5, 11.5, 8.0, 8.0, 8.0]])
    index, gt_index = anchor_ops.atss_positives(anchors, gt, group_size=3, num_cells=8)
    assert torch.equal(anchors[index, 3], torch.full((8,), 10.0)) and bool((gt_index == 0).all())
    assert set(map(tuple, anchors[index, :3].tolist())) == {(x, y, z) for x in (9.5, 13.5)
                                                            for y in (9.5, 13.5) for z in (9.5, 13.5)}
    # one cell: the best of its three anchors (the 8-cube, IoU 1) always qualifies
    centred = torch.tensor([[9.5, 9.5, 9.5, 8.0, 8.0, 8.0]])
    index, _ = anchor_ops.atss_positives(anchors, centred, group_size=3, num_cells=1)
    assert anchors[index].tolist() == [[9.5, 9.5, 9.5, 8.0, 8.0, 8.0]]
    # two GTs competing for an anchor: the one it overlaps most keeps it
    both = torch.cat([centred, torch.tensor([[10.5, 9.5, 9.5, 8.0, 8.0, 8.0]])])
    index, gt_index = anchor_ops.atss_positives(anchors, both, group_size=3, num_cells=1)
    assert index.tolist() == [index[0].item()] and gt_index.tolist() == [0]
    with pytest.raises(ValueError, match="whole cells"):
        anchor_ops.atss_positives(anchors[:-1], gt, group_size=3, num_cells=1)


def test_make_anchors_matches_head_output_flattening():
    grid, sizes, channels = (2, 3, 2), (2.0, 4.0), 3
    num_shapes = len(sizes) ** 3
    anchors = anchor_ops.make_anchors(grid, stride=2, sizes_vox=sizes)
    # A head output whose channel a·C + c holds, at cell (i, j, k), the anchor's centre x, w and d.
    cx = torch.arange(grid[0]).float()[:, None, None].expand(grid) * 2 + 0.5
    head = torch.zeros(1, num_shapes * channels, *grid)
    shapes = anchors[:num_shapes, 3:]
    for a in range(num_shapes):  # builds the test input only
        head[0, a * channels + 0] = cx
        head[0, a * channels + 1] = shapes[a, 0]
        head[0, a * channels + 2] = shapes[a, 2]
    flat = head.view(1, num_shapes, channels, *grid).permute(0, 3, 4, 5, 1, 2).reshape(1, -1, channels)
    assert torch.equal(flat[0], anchors[:, [0, 3, 5]])


def test_landmark_boxes():
    landmarks = torch.tensor([[[1.0, 2.0, 3.0]] * 5] * 2)
    boxes = B.landmark_boxes(landmarks, torch.tensor([3.0, 4.0, 3.0, 4.0, 4.0]))
    assert boxes.shape == (2, 5, 6)
    assert boxes[1, 1].tolist() == [1.0, 2.0, 3.0, 4.0, 4.0, 4.0]
    with pytest.raises(ValueError, match="shape"):
        B.landmark_boxes(torch.zeros(4, 3), torch.ones(5))


# --- matching and sampling -----------------------------------------------------------------------

def test_match_anchors_hand_made():
    gt = torch.tensor([
        [0, 0, 0, 4, 4, 4],          # class 1
        [20, 20, 20, 24, 24, 24],    # class 2
        [100, 100, 100, 104, 104, 104],  # class 3, overlaps no anchor
    ], dtype=torch.float32)
    anchors = torch.tensor([
        [0, 0, 0, 4, 4, 4],          # IoU 1 with GT 0 -> positive 1
        [0.5, 0, 0, 4.5, 4, 4],      # IoU 56/72 = 0.78 -> positive 1
        [2, 0, 0, 6, 4, 4],          # IoU 32/96 = 1/3 -> ignored
        [50, 50, 50, 54, 54, 54],    # no overlap -> negative
        [22, 20, 20, 26, 24, 24],    # IoU 1/3, GT 1's best (tied) -> positive 2
        [18, 20, 20, 22, 24, 24],    # IoU 1/3, the tie -> positive 2
        [3, 0, 0, 7, 4, 4],          # IoU 16/112 = 0.14 -> negative
    ], dtype=torch.float32)
    labels, matched = anchor_ops.match_anchors(anchors, gt, torch.tensor([1, 2, 3]), pos_iou=0.5, neg_iou=0.25)
    assert labels.dtype == torch.int64 and matched.dtype == torch.int64
    assert labels.tolist() == [1, 1, -1, 0, 2, 2, 0]
    assert matched[labels > 0].tolist() == [0, 0, 1, 1]


def test_match_anchors_best_anchor_goes_to_its_gt():
    # Along x: GT 0 = [0, 10], GT 1 = [12, 22]; anchor 0 equals GT 0; anchor 1 = [3, 13] has IoU
    # 7/13 = 0.54 with GT 0 but is the only anchor touching GT 1 (IoU 1/19).
    gt = torch.tensor([[0, 0, 0, 10, 10, 10], [12, 0, 0, 22, 10, 10]], dtype=torch.float32)
    anchors = torch.tensor([[0, 0, 0, 10, 10, 10], [3, 0, 0, 13, 10, 10]], dtype=torch.float32)
    labels, matched = anchor_ops.match_anchors(anchors, gt, torch.tensor([4, 5]))
    # The best-anchor rule hands anchor 1 to GT 1, so that GT keeps a positive.
    assert labels.tolist() == [4, 5]
    assert matched.tolist() == [0, 1]


def test_match_anchors_without_gt_is_all_background():
    anchors = torch.tensor([[0, 0, 0, 1, 1, 1]], dtype=torch.float32)
    labels, _ = anchor_ops.match_anchors(anchors, torch.zeros(0, 6), torch.zeros(0, dtype=torch.int64))
    assert labels.tolist() == [0]


def test_sample_balanced_caps_positives():
    labels = torch.cat([torch.full((100,), 2), torch.zeros(1000, dtype=torch.int64), torch.full((50,), -1)])
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]
    picked = anchor_ops.sample_balanced(labels, 64, 0.25, torch.Generator().manual_seed(3))
    assert picked.numel() == 64 and picked.unique().numel() == 64
    assert int((labels[picked] > 0).sum()) == 16
    assert int((labels[picked] == 0).sum()) == 48
    again = anchor_ops.sample_balanced(labels, 64, 0.25, torch.Generator().manual_seed(3))
    assert torch.equal(picked, again)


def test_sample_balanced_few_positives_and_too_few_anchors():
    labels = torch.tensor([1] * 3 + [0] * 100 + [-1] * 10)
    picked = anchor_ops.sample_balanced(labels, 32, 0.5, torch.Generator().manual_seed(0))
    assert picked.numel() == 32
    assert int((labels[picked] > 0).sum()) == 3 and int((labels[picked] == 0).sum()) == 29
    small = torch.tensor([1, 0, 0, -1])
    assert sorted(anchor_ops.sample_balanced(small, 10, 0.5).tolist()) == [0, 1, 2]


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


def test_hardest_negatives_pick_the_highest_scored_background_only():
    labels = torch.tensor([0, 0, 2, -1, 0, 0])
    scores = torch.tensor([0.1, 0.9, 5.0, 7.0, 0.5, 0.8])
    assert anchor_ops.hardest_negatives(labels, scores, 2).tolist() == [1, 5]
    assert anchor_ops.hardest_negatives(labels, scores, 2, exclude=torch.tensor([1])).tolist() == [5, 4]
    assert anchor_ops.hardest_negatives(labels, scores, 10).tolist() == [1, 5, 4, 0]


def test_hardest_negatives_by_groups_equals_ranking_every_anchor():
    generator = torch.Generator().manual_seed(2)
    labels = torch.randint(-1, 3, (64 * 500,), generator=generator)  # a third background
    scores = torch.randn(labels.shape, generator=generator)
    exclude = torch.randperm(labels.numel(), generator=generator)[:300]
    for num in (1, 40, 499):
        grouped = anchor_ops.hardest_negatives(labels, scores, num, exclude=exclude, group_size=64)
        plain = anchor_ops.hardest_negatives(labels, scores, num, exclude=exclude)
        assert torch.equal(grouped, plain)
    # Fewer background anchors than wanted: every one of them, hardest first.
    few = torch.full((64 * 4,), -1)
    few[[3, 70, 200]] = 0
    assert anchor_ops.hardest_negatives(few, scores[:256], 3, group_size=64).tolist() == \
        anchor_ops.hardest_negatives(few, scores[:256], 3).tolist()
    assert anchor_ops.hardest_negatives(few, scores[:256], 2, group_size=64).numel() == 2
