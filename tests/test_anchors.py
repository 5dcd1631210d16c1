"""Tests of the anchor grid, the anchor labels (paper §3, ATSS) and the samplers against hand-worked cases."""

from __future__ import annotations

import pytest
import torch

from igrpn import anchors as anchor_ops


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
