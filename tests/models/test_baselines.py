"""The three baselines of Table 1/2 (SSD, Faster R-CNN, heatmap) on the shared backbone: their
building blocks against known answers, and each model end to end on tiny inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from igrpn.config import NUM_LANDMARKS, get_profile
from igrpn.models import build_model
from igrpn.models.faster_rcnn import clip_to_volume, FasterRCNNModel, generate_proposals, roi_align_3d
from igrpn.models.heatmap import balanced_mse, heatmap_targets, HeatmapModel, refine_argmax
from igrpn.models.ssd import hard_negative_mask, SSDModel

SMOKE = get_profile("smoke")
# Landmarks of a face-like layout in a 32³ volume (voxels): eyes, brow, nose, chin.
LANDMARKS_32 = torch.tensor([[10.0, 12.0, 16.0], [16.0, 11.0, 17.0], [22.0, 12.0, 16.0],
                             [16.0, 17.0, 13.0], [16.0, 23.0, 14.0]])


# --------------------------------------------------------------------------------------------
# 3D RoIAlign
# --------------------------------------------------------------------------------------------

RAMP = (0.5, -1.2, 2.0, 3.0)  # f = a·x + b·y + c·z + e on the feature grid


def _ramp(shape, coeffs=RAMP):
    a, b, c, e = coeffs
    x, y, z = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    return a * x + b * y + c * z + e


def _feature_coord(x_input, stride):
    """Input voxel -> feature cell coordinate (cell f centred at stride·f + (stride − 1)/2)."""
    return (x_input - (stride - 1) / 2) / stride


def _trilinear(volume, point):
    """Reference trilinear interpolation of a (X, Y, Z) tensor at one point (cell coordinates)."""
    lo = [int(torch.floor(torch.tensor(p)).clamp(0, n - 2)) for p, n in zip(point, volume.shape)]
    frac = [p - l for p, l in zip(point, lo)]
    value = 0.0
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                weight = ((frac[0] if dx else 1 - frac[0]) * (frac[1] if dy else 1 - frac[1])
                          * (frac[2] if dz else 1 - frac[2]))
                value += weight * float(volume[lo[0] + dx, lo[1] + dy, lo[2] + dz])
    return value


def test_roi_align_ramp_gives_ramp_at_bin_centres():
    stride, out = 4, (4, 3, 2)
    shape = (8, 7, 6)
    ramp = _ramp(shape)
    # Two volumes; the second holds twice the ramp, so a wrong batch index shows.
    features = torch.stack([ramp, 2 * ramp])[:, None].repeat(1, 3, 1, 1, 1)  # (2, 3, X, Y, Z)
    rois = torch.tensor([[0, 2.0, 3.0, 1.0, 20.0, 17.0, 14.0],
                         [1, 5.0, 6.0, 7.0, 9.0, 15.0, 18.0],
                         [0, 4.0, 4.0, 4.0, 12.0, 12.0, 12.0]])
    pooled = roi_align_3d(features, rois, spatial_scale=1 / stride, output_size=out, sampling_ratio=2)
    assert pooled.shape == (3, 3) + out

    a, b, c, e = RAMP
    for r, roi in enumerate(rois):
        start = _feature_coord(roi[1:4], stride)
        size = (_feature_coord(roi[4:7], stride) - start) / torch.tensor(out, dtype=torch.float32)
        bins = torch.stack(torch.meshgrid(*(torch.arange(o, dtype=torch.float32) for o in out),
                                          indexing="ij"), dim=-1)
        centre = start + (bins + 0.5) * size  # (Ox, Oy, Oz, 3) bin centres, feature cells
        expected = (a * centre[..., 0] + b * centre[..., 1] + c * centre[..., 2] + e)
        expected = expected * (1 + int(roi[0]))
        for channel in range(3):
            torch.testing.assert_close(pooled[r, channel], expected, atol=1e-4, rtol=0)


def test_roi_align_matches_trilinear_interpolation_at_sample_points():
    generator = torch.Generator().manual_seed(0)
    volume = torch.rand((6, 5, 7), generator=generator)
    stride = 2
    roi = torch.tensor([[0, 1.3, 2.2, 0.7, 9.1, 6.4, 11.9]])
    out = (3, 2, 4)
    # sampling_ratio=1: one sample at the centre of each bin, so the bin value is the
    # interpolation there.
    pooled = roi_align_3d(volume[None, None], roi, spatial_scale=1 / stride, output_size=out,
                          sampling_ratio=1)[0, 0]
    start = _feature_coord(roi[0, 1:4], stride)
    size = (_feature_coord(roi[0, 4:7], stride) - start) / torch.tensor(out, dtype=torch.float32)
    for i in range(out[0]):
        for j in range(out[1]):
            for k in range(out[2]):
                point = (start + (torch.tensor([i, j, k]) + 0.5) * size).tolist()
                assert float(pooled[i, j, k]) == pytest.approx(_trilinear(volume, point), abs=1e-5)

    # sampling_ratio=2: each bin is the mean of the interpolation at its 2³ sample points.
    pooled2 = roi_align_3d(volume[None, None], roi, spatial_scale=1 / stride, output_size=out,
                           sampling_ratio=2)[0, 0]
    i, j, k = 1, 0, 2
    samples = [
        _trilinear(volume, (start + (torch.tensor([i, j, k]) + (torch.tensor([p, q, s]) + 0.5) / 2) * size).tolist())
        for p in (0, 1) for q in (0, 1) for s in (0, 1)
    ]
    assert float(pooled2[i, j, k]) == pytest.approx(sum(samples) / 8, abs=1e-5)


def test_roi_align_gradient_reaches_features_and_rejects_bad_rois():
    features = torch.rand((1, 2, 4, 4, 4), requires_grad=True)
    rois = torch.tensor([[0, 0.0, 0.0, 0.0, 7.0, 7.0, 7.0]])
    roi_align_3d(features, rois, 0.5).sum().backward()
    assert features.grad is not None and float(features.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="batch"):
        roi_align_3d(features.detach(), torch.tensor([[1, 0.0, 0, 0, 4, 4, 4]]), 0.5)
    with pytest.raises(ValueError, match=r"\(R, 7\)"):
        roi_align_3d(features.detach(), torch.zeros((2, 6)), 0.5)


def test_clip_to_volume_and_proposals_keep_the_best_of_overlapping_boxes():
    corner = torch.tensor([[-3.0, 2.0, 1.0, 5.0, 40.0, 9.0]])
    assert clip_to_volume(corner, (16, 32, 8)).tolist() == [[-0.5, 2.0, 1.0, 5.0, 31.5, 7.5]]
    # Three anchors: 0 and 1 overlap (IoU 0.875 > 0.7), 2 is apart; 1 has the top objectness.
    anchors = torch.tensor([[8.0, 8.0, 8.0, 6.0, 6.0, 6.0], [8.0, 8.0, 8.4, 6.0, 6.0, 6.0],
                            [20.0, 20.0, 20.0, 4.0, 4.0, 4.0]])
    objectness = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 0.0]])
    deltas = torch.zeros((2, 3, 6))
    rois = generate_proposals(objectness, deltas, anchors, (32, 32, 32), pre_nms_top_n=10, post_nms_top_n=10)
    assert rois[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    # Volume 0: anchor 1 (best) then anchor 2; anchor 0 is suppressed. Volume 1: anchors 0, 2.
    expected = torch.cat([anchors[[1, 2, 0, 2], :3] - anchors[[1, 2, 0, 2], 3:] / 2,
                          anchors[[1, 2, 0, 2], :3] + anchors[[1, 2, 0, 2], 3:] / 2], dim=1)
    torch.testing.assert_close(rois[:, 1:], expected)
    # post_nms_top_n caps the proposals per volume.
    assert generate_proposals(objectness, deltas, anchors, (32, 32, 32), 10, 1).shape == (2, 7)


def test_roi_sampling_adds_the_gt_boxes_as_positives():
    model = FasterRCNNModel(SMOKE)
    gt = model.gt_boxes(LANDMARKS_32[None])  # (1, 5, 6) centre form
    gt_corner = torch.cat([gt[..., :3] - gt[..., 3:] / 2, gt[..., :3] + gt[..., 3:] / 2], dim=-1)
    far = torch.tensor([[0.0, 0.0, 0.0, 0.0, 3.0, 3.0, 3.0]])  # one background proposal
    rois, labels, matched = model._sample_rois(far, gt_corner, torch.Generator().manual_seed(0))
    assert sorted(labels.tolist()) == [0, 1, 2, 3, 4, 5]
    positive = labels > 0
    torch.testing.assert_close(rois[positive, 1:], matched[positive])
    torch.testing.assert_close(matched[positive], gt_corner[0, labels[positive] - 1])


# --------------------------------------------------------------------------------------------
# SSD hard negative mining
# --------------------------------------------------------------------------------------------

def test_hard_negative_mask_keeps_three_hardest_negatives_per_positive():
    # Volume 0: 2 positives, 8 negatives, 1 ignored (with the highest loss of all).
    # Volume 1: 1 positive, 2 negatives only (fewer than 3 available).
    labels = torch.tensor([[1, 0, 0, 3, 0, 0, 0, 0, 0, 0, -1],
                           [0, 0, 2, -1, -1, -1, -1, -1, -1, -1, -1]])
    loss = torch.tensor([[9.0, 0.1, 0.8, 7.0, 0.5, 0.9, 0.2, 0.7, 0.3, 0.6, 99.0],
                         [0.4, 0.2, 5.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0]])
    mask = hard_negative_mask(loss, labels)
    assert mask.sum(dim=1).tolist() == [6, 2]
    # The six hardest negatives of volume 0: losses 0.9, 0.8, 0.7, 0.6, 0.5, 0.3.
    assert torch.nonzero(mask[0]).flatten().tolist() == [2, 4, 5, 7, 8, 9]
    assert torch.nonzero(mask[1]).flatten().tolist() == [0, 1]
    assert not bool((mask & (labels != 0)).any())


def test_hard_negative_mask_exact_ratio_on_many_anchors():
    generator = torch.Generator().manual_seed(1)
    labels = torch.zeros((3, 500), dtype=torch.int64)
    labels[0, :7] = 1
    labels[1, 10:14] = 4
    labels[2, 100:101] = 2
    loss = torch.rand((3, 500), generator=generator)
    mask = hard_negative_mask(loss, labels)
    assert mask.sum(dim=1).tolist() == [21, 12, 3]
    for b in range(3):
        kept = loss[b][mask[b]]
        dropped = loss[b][(labels[b] == 0) & ~mask[b]]
        assert float(kept.min()) >= float(dropped.max())


# --------------------------------------------------------------------------------------------
# Heatmap targets and sub-voxel arg-max
# --------------------------------------------------------------------------------------------

def test_heatmap_targets_peak_at_landmark():
    landmarks = torch.tensor([[[3.0, 4.0, 5.0], [10.0, 2.0, 7.0], [0.0, 0.0, 0.0],
                               [15.0, 15.0, 15.0], [8.0, 9.0, 1.0]]])
    maps = heatmap_targets(landmarks, (16, 16, 16), sigma_vox=2.0)
    assert maps.shape == (1, 5, 16, 16, 16)
    for index, point in enumerate(landmarks[0].long().tolist()):
        assert float(maps[0, index][tuple(point)]) == pytest.approx(1.0)
        assert float(maps[0, index].max()) == pytest.approx(1.0)
    # One voxel away along x: exp(−1 / (2σ²)).
    assert float(maps[0, 0, 4, 4, 5]) == pytest.approx(float(torch.exp(torch.tensor(-1 / 8))))
    # Stride 2: cell f centred at 2f + 0.5; a landmark there gives value 1 on that cell.
    half = heatmap_targets(torch.tensor([[[4.5, 6.5, 2.5]]]), (16, 16, 16), sigma_vox=2.0, stride=2)
    assert half.shape == (1, 1, 8, 8, 8)
    assert float(half[0, 0, 2, 3, 1]) == pytest.approx(1.0)


def test_balanced_mse_known_values():
    target = torch.zeros((1, 1, 2, 2, 2))
    target[0, 0, 0, 0, 0] = 1.0
    assert float(balanced_mse(target.clone(), target)) == 0.0
    # λ = V / Σt = 8: the target voxel weighs 9; (9·1² + 7·0) / (2·8) for a zero prediction,
    # (9·0 + 7·0.5²) / 16 for 1 on the target voxel and 0.5 elsewhere.
    assert float(balanced_mse(torch.zeros_like(target), target)) == pytest.approx(9 / 16)
    pred = torch.full_like(target, 0.5)
    pred[0, 0, 0, 0, 0] = 1.0
    assert float(balanced_mse(pred, target)) == pytest.approx(7 * 0.25 / 16)


def test_refine_argmax_recovers_subvoxel_landmark():
    truth = torch.tensor([[[10.3, 12.7, 9.4], [4.0, 5.5, 20.2], [17.9, 3.1, 6.6],
                           [12.0, 12.0, 12.0], [21.45, 18.05, 2.8]]])
    maps = heatmap_targets(truth, (24, 24, 24), sigma_vox=1.5)
    found = refine_argmax(maps * 100.0)
    assert found.shape == (1, 5, 3)
    assert float((found - truth).abs().max()) < 0.1
    # Half-resolution heatmaps map back to input voxels.
    half = heatmap_targets(truth, (24, 24, 24), sigma_vox=3.0, stride=2)
    assert float((refine_argmax(half, stride=2) - truth).abs().max()) < 0.1
    # Plain arg-max is off by up to half a voxel; refinement must do better than rounding.
    assert float((found - truth).abs().max()) < float((truth.round() - truth).abs().max())


# --------------------------------------------------------------------------------------------
# The three models end to end (smoke profile, 32³ inputs)
# --------------------------------------------------------------------------------------------


def _synthetic_batch(n=2, size=32, seed=0):
    """Volumes with a distinct bright blob at each landmark (shifted per volume) and noise."""
    generator = torch.Generator().manual_seed(seed)
    landmarks = torch.stack([LANDMARKS_32 + torch.tensor([2.0 * b, -1.0 * b, 1.0 * b]) for b in range(n)])
    grid = torch.stack(torch.meshgrid(*(torch.arange(size, dtype=torch.float32),) * 3, indexing="ij"), -1)
    volumes = 0.1 * torch.randn((n, size, size, size), generator=generator)
    for b in range(n):
        for c in range(5):
            distance2 = ((grid - landmarks[b, c]) ** 2).sum(-1)
            volumes[b] += (0.5 + 0.25 * c) * torch.exp(-distance2 / (2 * 1.5**2))
    return volumes[:, None], landmarks


@pytest.mark.parametrize("method, cls", [("ssd", SSDModel), ("faster_rcnn", FasterRCNNModel),
                                         ("heatmap", HeatmapModel)])
def test_build_model_picks_the_baseline(method, cls):
    model = build_model(method, SMOKE, iou_balance=False)
    assert type(model) is cls and model.method == method and model.iou_balance is False


def test_ssd_forward_shapes_and_anchors():
    torch.manual_seed(0)
    model = SSDModel(SMOKE)
    volumes, _ = _synthetic_batch()
    out = model(volumes)
    # smoke: 32³ input -> 8³ cells at stride 4 and 4³ at stride 8, 2³ = 8 anchors per cell each.
    num_anchors = 8**3 * 8 + 4**3 * 8
    assert out["cls_logits"].shape == (2, num_anchors, NUM_LANDMARKS + 1)
    assert out["deltas"].shape == (2, num_anchors, 6)
    assert out["anchors"].shape == (num_anchors, 6)
    sizes = sorted(s / SMOKE.spacing_mm for s in SMOKE.anchor_sizes_mm)
    fine, coarse = out["anchors"][: 8**3 * 8], out["anchors"][8**3 * 8:]
    assert fine[:, 3:].unique().tolist() == pytest.approx(sizes[:2])
    assert coarse[:, 3:].unique().tolist() == pytest.approx(sizes[2:])
    # Cell centres: stride·i + (stride − 1)/2.
    assert fine[0, :3].tolist() == [1.5, 1.5, 1.5] and coarse[0, :3].tolist() == [3.5, 3.5, 3.5]


def test_faster_rcnn_forward_shapes():
    torch.manual_seed(0)
    model = FasterRCNNModel(SMOKE, iou_balance=True)  # accepted and ignored
    volumes, _ = _synthetic_batch()
    out = model(volumes)  # training mode: stage one and proposals only
    num_anchors = 8**3 * 4**3
    assert out["objectness"].shape == (2, num_anchors)
    assert out["rpn_deltas"].shape == (2, num_anchors, 6)
    assert out["anchors"].shape == (num_anchors, 6)
    assert out["features"].shape == (2, 4 * SMOKE.width, 8, 8, 8)
    rois = out["rois"]
    assert rois.shape[1] == 7 and "roi_logits" not in out
    for b in range(2):
        assert 0 < int((rois[:, 0] == b).sum()) <= model.post_nms_top_n["train"]
    # Candidates after a training-mode forward run stage two themselves.
    found = model.candidates(out, top_k=1)
    assert [len(v) for v in found] == [NUM_LANDMARKS] * 2
    # one box per class; the merged eye pair lists up to two places (2·top_k) under both names
    assert all(boxes.shape[1] == 6 and 1 <= boxes.shape[0] <= (2 if c in (0, 2) else 1)
               for v in found for c, (boxes, _) in enumerate(v))
    # Proposals lie inside the volume [−0.5, 31.5]³ and have positive size.
    assert float(rois[:, 1:].min()) >= -0.5 and float(rois[:, 1:].max()) <= 31.5
    assert bool((rois[:, 4:] > rois[:, 1:4]).all())
    model.eval()
    with torch.no_grad():
        out = model(volumes)
    r = out["rois"].shape[0]
    assert 0 < r <= 2 * model.post_nms_top_n["test"]
    assert out["roi_logits"].shape == (r, NUM_LANDMARKS + 1)
    assert out["roi_deltas"].shape == (r, NUM_LANDMARKS, 6)


def test_heatmap_forward_shapes_and_candidate_boxes():
    torch.manual_seed(0)
    model = HeatmapModel(dataclasses.replace(SMOKE, merge_mirror_pairs=False))
    volumes, _ = _synthetic_batch()
    out = model(volumes)
    assert out["heatmaps"].shape == (2, NUM_LANDMARKS, 16, 16, 16)  # half resolution
    # Candidates on hand-made heatmaps: the box sits at the refined peak with the GT box size.
    truth = torch.tensor([[[10.3, 12.7, 9.4], [4.0, 5.5, 20.2], [17.9, 3.1, 6.6],
                           [12.0, 12.0, 12.0], [21.4, 18.1, 2.8]]])
    maps = 0.8 * heatmap_targets(truth, (32, 32, 32), sigma_vox=3.0, stride=2)
    found = model.candidates({"heatmaps": maps}, top_k=2)
    assert len(found) == 1 and len(found[0]) == NUM_LANDMARKS
    box_vox = torch.tensor(SMOKE.gt_box_mm) / SMOKE.spacing_mm
    for c, (boxes, scores) in enumerate(found[0]):
        assert boxes.shape == (1, 6) and scores.shape == (1,)
        assert float((boxes[0, :3] - truth[0, c]).abs().max()) < 0.1
        assert boxes[0, 3:].tolist() == pytest.approx([float(box_vox[c])] * 3)
        assert float(scores[0]) <= 0.8 + 1e-6 and float(scores[0]) > 0.5


def test_heatmap_eye_pair_gives_both_eyes_two_distinct_places():
    # Both eye channels fire on both eyes (mirrored training), the left one's arg-max on the
    # right eye: the pooled pair still yields the two eyes, the stronger first, for both classes.
    model = HeatmapModel(SMOKE)
    eye_a, eye_b = torch.tensor([10.2, 12.6, 9.4]), torch.tensor([19.7, 12.1, 9.9])
    truth = torch.tensor([[eye_a.tolist(), [15.0, 18.0, 9.0], eye_b.tolist(), [15.0, 8.0, 14.0],
                           [15.0, 4.0, 22.0]]])
    maps = heatmap_targets(truth, (32, 32, 32), sigma_vox=3.0, stride=2)
    other = heatmap_targets(truth[:, [2, 1, 0, 3, 4]], (32, 32, 32), sigma_vox=3.0, stride=2)
    maps[:, 0] = torch.maximum(0.6 * maps[:, 0], 0.7 * other[:, 0])  # left channel: right eye stronger
    maps[:, 2] = 0.7 * maps[:, 2]  # right channel: right eye only
    found = model.candidates({"heatmaps": maps}, top_k=2)[0]
    for channel in (0, 2):
        boxes, scores = found[channel]
        assert boxes.shape == (2, 6) and 0.7 >= float(scores[0]) > float(scores[1]) > 0.5
        assert float((boxes[0, :3] - eye_b).abs().max()) < 0.15
        assert float((boxes[1, :3] - eye_a).abs().max()) < 0.15
    assert found[1][0].shape == (1, 6)  # the other landmarks keep their single arg-max


def _train(model, steps, lr):
    volumes, landmarks = _synthetic_batch()
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model.loss(model(volumes), landmarks)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    return losses, volumes


@pytest.mark.parametrize("method", ["ssd", "faster_rcnn", "heatmap"])
def test_a_few_steps_reduce_the_loss_and_candidates_cover_five_landmarks(method):
    torch.manual_seed(0)
    model = build_model(method, SMOKE, iou_balance=True)
    losses, volumes = _train(model, steps=6, lr=3e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    # Mean of the last two steps well under the first step (sampling makes single steps noisy).
    assert sum(losses[-2:]) / 2 < 0.8 * losses[0], losses

    model.eval()
    with torch.no_grad():
        found = model.candidates(model(volumes), top_k=2)
    assert len(found) == 2
    for per_volume in found:
        assert len(per_volume) == NUM_LANDMARKS
        for index, (boxes, scores) in enumerate(per_volume):
            # merged eye scoring (ssd, faster_rcnn): one list of up to 2·top_k places for both eyes
            most = 4 if method in ("ssd", "faster_rcnn") and index in (0, 2) else 2
            assert boxes.ndim == 2 and boxes.shape[1] == 6 and 1 <= boxes.shape[0] <= most
            assert scores.shape == (boxes.shape[0],)
        if method in ("ssd", "faster_rcnn"):
            assert torch.equal(per_volume[0][0], per_volume[2][0])
            assert bool((scores[:-1] >= scores[1:]).all())  # sorted by score
            assert bool((boxes[:, 3:] > 0).all())


@pytest.mark.parametrize("method", ["rpn", "ssd", "faster_rcnn", "heatmap"])
def test_loss_and_backward_run_under_bf16_autocast(method):
    # What training does on a GPU or a CPU with native bf16 (igrpn.training.distributed.autocast); forced
    # here, emulated where the CPU lacks it. Every loss must come out fp32 and finite, and every
    # trained weight must get a gradient.
    torch.manual_seed(0)
    model = build_model(method, SMOKE, iou_balance=True)
    model.train()
    volumes = torch.rand(2, 1, 32, 32, 32)
    landmarks = LANDMARKS_32.expand(2, -1, -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(volumes)
        losses = model.loss(outputs, landmarks)
    assert losses["loss"].dtype == torch.float32 and bool(torch.isfinite(losses["loss"]))
    losses["loss"].backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_max_filter_matches_max_pool_with_stride_one():
    from igrpn.models.heatmap import _max_filter_3

    maps = torch.rand(2, 9, 7, 5, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.max_pool3d(maps[:, None], 3, stride=1, padding=1)[:, 0]
    assert torch.equal(_max_filter_3(maps), expected)


@pytest.mark.parametrize("model_class", [SSDModel, FasterRCNNModel])
def test_ssd_and_faster_rcnn_build_the_profiles_backbone(model_class):
    lean = model_class(dataclasses.replace(SMOKE, fusion="sum", block1_convs=1))
    assert lean.backbone.fusion == "sum" and len(lean.backbone.block1) == 3  # one [conv, BN, ReLU]
    paper = model_class(SMOKE)
    assert paper.backbone.fusion == "concat" and len(paper.backbone.block1) == 6


@pytest.mark.parametrize("classification_anchors, easy_negative_counts", [("sampled", False), ("all", True)])
def test_ssd_focal_option_puts_every_anchor_in_the_loss(classification_anchors, easy_negative_counts):
    # SSD's miner keeps 3 negatives per positive: the easiest background anchor gets no gradient;
    # the focal loss over every anchor gives it a (small) one.
    torch.manual_seed(0)
    model = SSDModel(dataclasses.replace(SMOKE, classification_anchors=classification_anchors))
    volumes, landmarks = _synthetic_batch()
    outputs = model(volumes)
    logits = outputs["cls_logits"].detach().requires_grad_(True)
    model.loss(dict(outputs, cls_logits=logits), landmarks)["loss"].backward()
    easiest = torch.log_softmax(logits.detach(), -1)[0, :, 0].argmax()
    assert bool(logits.grad[0, easiest].abs().sum() > 0) is easy_negative_counts


def test_ssd_rejects_a_negative_sampler_it_does_not_have():
    with pytest.raises(ValueError, match="SSD's classification_anchors must be 'sampled'.*'hard_pool'"):
        SSDModel(dataclasses.replace(SMOKE, classification_anchors="hard_pool"))


def test_select_per_class_scores_a_mirror_pair_as_one_class():
    from igrpn.models.ssd import select_per_class

    # Three places far apart; class-specific boxes differ only in their class index (in the size).
    centres = torch.tensor([[10.0, 10, 10], [40, 40, 40], [70, 70, 70]])
    boxes = torch.cat([centres[:, None].expand(3, 5, 3), torch.arange(1.0, 6)[None, :, None].expand(3, 5, 3)], -1)
    scores = torch.zeros(3, 5)
    scores[0, [0, 2]] = 0.3  # place 0: an eye, unsure which — 0.6 as the pair
    scores[1, 0] = 0.5  # place 1: the left eye alone
    scores[2, 2] = 0.2
    separate = select_per_class(boxes, scores, nms_iou=0.25, top_k=2)
    assert separate[0][0][0, :3].tolist() == [40, 40, 40]  # without merging place 1 leads
    merged = select_per_class(boxes, scores, nms_iou=0.25, top_k=2, mirror_pairs=((1, 3),))
    left, right = merged[0], merged[2]
    assert torch.equal(left[0], right[0]) and torch.equal(left[1], right[1])
    assert left[0][:, :3].tolist() == [[10, 10, 10], [40, 40, 40], [70, 70, 70]]  # up to 2·top_k
    assert left[1].tolist() == pytest.approx([0.6, 0.5, 0.2])
    assert bool((left[0][:, 3:] == 1).all())  # the left eye's (class 1's) boxes for the pair


def test_faster_rcnn_regresses_a_mirror_pair_with_one_class():
    model = FasterRCNNModel(SMOKE)
    assert model.mirror_pairs == ((1, 3),)
    assert model._regression_class(torch.tensor([0, 1, 2, 3, 4, 5])).tolist() == [0, 1, 2, 1, 4, 5]


@pytest.mark.parametrize("matcher", ["iou", "atss"])
def test_faster_rcnn_stage_one_labels_anchors_by_the_profiles_matcher(matcher):
    from igrpn import boxes as box_ops
    from igrpn import anchors as anchor_ops

    model = FasterRCNNModel(dataclasses.replace(SMOKE, matcher=matcher))
    anchors = model.anchors((8, 8, 8), model.stride)
    anchors_corner = box_ops.centre_to_corner(anchors)
    gt_corner = box_ops.centre_to_corner(model.gt_boxes(LANDMARKS_32))
    object_labels = torch.ones(NUM_LANDMARKS, dtype=torch.int64)
    labels, matched = model.label_anchors(anchors, anchors_corner, box_ops.corner_to_centre(gt_corner), gt_corner,
                                          object_labels)
    assert set(labels.unique().tolist()) <= {-1, 0, 1}
    if matcher == "iou":  # the paper's rule, exactly
        expected, _ = anchor_ops.match_anchors(anchors_corner, gt_corner, object_labels, SMOKE.pos_iou, SMOKE.neg_iou)
        assert torch.equal(labels, expected)
    else:  # ATSS gives every landmark positives of its own, the small eye boxes included
        assert set(matched[labels > 0].tolist()) == set(range(NUM_LANDMARKS))
