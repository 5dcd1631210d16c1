"""Backbone shapes, RPN output / anchor alignment, the RPN loss and candidates (smoke profile)."""

import copy
import dataclasses

import pytest
import torch

from igrpn import boxes as B
from igrpn import anchors as anchor_ops
from igrpn.config import get_profile
from igrpn.models import build_model
from igrpn.models.backbone import Backbone, pad_to_multiple
from igrpn.models.base import LandmarkModel
from igrpn.models.fast_cpu import fast_inference
from igrpn.models.rpn import RPNModel

PROFILE = get_profile("smoke")  # 5.2 mm: GT cubes 3.5 / 6 voxels, anchors 3.25–7 voxels
LANDMARKS_VOX = torch.tensor([[9.0, 12.0, 16.0], [16.0, 9.0, 16.0], [23.0, 12.0, 16.0],
                              [16.0, 18.0, 12.0], [16.0, 25.0, 14.0]])


def synthetic_volume(landmarks_vox, shape=(32, 32, 32)):
    """Dark noisy volume with a bright cube (edge 3) at each landmark: (1, 1, X, Y, Z)."""
    generator = torch.Generator().manual_seed(0)
    volume = 0.1 * torch.randn(shape, generator=generator)
    for x, y, z in landmarks_vox.round().long().tolist():  # five cubes: builds the input only
        volume[x - 1:x + 2, y - 1:y + 2, z - 1:z + 2] += 1.0
    return volume[None, None]


def test_pad_to_multiple():
    x = torch.ones(1, 2, 30, 32, 33)
    padded = pad_to_multiple(x)
    assert padded.shape == (1, 2, 32, 32, 40)
    assert torch.equal(padded[:, :, :30, :32, :33], x)
    assert padded.sum() == x.sum()  # only zeros added
    assert pad_to_multiple(padded) is padded


def test_backbone_shapes():
    torch.manual_seed(0)
    backbone = Backbone(width=4)
    out = backbone(torch.randn(1, 1, 32, 32, 32))
    assert out["block1"].shape == (1, 4, 32, 32, 32)
    assert out["block2"].shape == (1, 8, 16, 16, 16)
    assert out["block3"].shape == (1, 16, 8, 8, 8)
    assert out["block4"].shape == (1, 32, 4, 4, 4)
    assert out["fused"].shape == (1, 16, 8, 8, 8)
    assert backbone.out_channels == 16 and backbone.stride == 4
    with pytest.raises(ValueError, match="multiples of 8"):
        backbone(torch.randn(1, 1, 30, 32, 32))


def test_rpn_outputs_aligned_with_anchors():
    torch.manual_seed(0)
    model = build_model("rpn", PROFILE)
    assert isinstance(model, LandmarkModel) and model.method == "rpn"
    out = model(torch.randn(2, 1, 32, 24, 16))
    sizes = [s / PROFILE.spacing_mm for s in PROFILE.anchor_sizes_mm]
    expected = anchor_ops.make_anchors((8, 6, 4), 4, sizes)
    assert torch.equal(out["anchors"], expected)
    assert out["cls_logits"].shape == (2, expected.shape[0], 6)
    assert out["deltas"].shape == (2, expected.shape[0], 6)
    # The focal-style prior: every anchor starts near p(background) = 0.99.
    p_background = torch.softmax(out["cls_logits"].detach(), dim=-1)[..., 0]
    assert float(p_background.mean()) == pytest.approx(0.99, abs=0.005)


def test_rpn_with_cube_anchors_and_a_deeper_head():
    import dataclasses

    profile = dataclasses.replace(PROFILE, anchor_shapes="cubes", head_convs=3)
    torch.manual_seed(0)
    model = RPNModel(profile)
    assert model.num_anchors_per_cell == len(PROFILE.anchor_sizes_mm)
    # two [conv, GroupNorm, ReLU] layers before the paper's head conv
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.head_tower) == 2
    out = model(torch.randn(2, 1, 32, 24, 16))
    sizes = [s / PROFILE.spacing_mm for s in PROFILE.anchor_sizes_mm]
    assert torch.equal(out["anchors"], anchor_ops.make_anchors((8, 6, 4), 4, sizes, "cubes"))
    assert out["cls_logits"].shape == (2, 8 * 6 * 4 * 4, 6)
    landmarks = torch.tensor([[[8.0, 8, 8], [12, 8, 8], [16, 8, 8], [12, 14, 6], [12, 18, 7]]] * 2)
    loss = model.loss(out, landmarks)
    assert float(loss["num_pos"]) > 0 and torch.isfinite(loss["loss"])
    loss["loss"].backward()
    assert model.head_tower[0].weight.grad.abs().sum() > 0
    # the paper's head (one conv) has no tower and the checkpoint keys of before
    assert len(RPNModel(PROFILE).head_tower) == 0
    assert not any(k.startswith("head_tower") for k in RPNModel(PROFILE).state_dict())


def test_rpn_flatten_is_cell_major_anchor_minor():
    model = RPNModel(PROFILE)
    num_shapes, grid = model.num_anchors_per_cell, (2, 3, 4)
    # Channel a·C + c of cell (i, j, k) holds 1000·cell + 10·a + c.
    cell = torch.arange(24).reshape(grid).float()
    a = torch.arange(num_shapes).float()[:, None, None, None, None]
    c = torch.arange(6).float()[None, :, None, None, None]
    head = (1000 * cell + 10 * a + c).reshape(1, num_shapes * 6, *grid)
    flat = model._flatten(head, 6)[0]  # (cells·A, 6)
    rows = torch.arange(flat.shape[0]).float()
    assert torch.equal(flat[:, 0], 1000 * (rows // num_shapes) + 10 * (rows % num_shapes))
    assert torch.equal(flat[:, 5] - flat[:, 0], torch.full_like(rows, 5))


def test_the_regression_weight_scales_the_regression_term_only():
    torch.manual_seed(0)
    model = RPNModel(PROFILE)
    heavy = copy.deepcopy(model)
    heavy.profile = dataclasses.replace(PROFILE, regression_weight=3.0)
    volumes = synthetic_volume(LANDMARKS_VOX).repeat(2, 1, 1, 1, 1)
    landmarks = LANDMARKS_VOX.expand(2, 5, 3)
    plain, weighted = model.loss(model(volumes), landmarks), heavy.loss(heavy(volumes), landmarks)
    assert torch.equal(plain["loss_cls"], weighted["loss_cls"]) and torch.equal(plain["loss_reg"], weighted["loss_reg"])
    assert plain["loss_reg"].item() > 0
    assert weighted["loss"].item() == pytest.approx(plain["loss_cls"].item() + 3.0 * plain["loss_reg"].item(), rel=1e-5)


def test_rpn_loss_outputs_and_reproducibility():
    torch.manual_seed(0)
    model = RPNModel(PROFILE)
    twin = copy.deepcopy(model)
    volumes = synthetic_volume(LANDMARKS_VOX).repeat(2, 1, 1, 1, 1)
    landmarks = LANDMARKS_VOX.expand(2, 5, 3)
    losses = model.loss(model(volumes), landmarks)
    assert set(losses) == {"loss", "loss_cls", "loss_reg", "num_pos", "mean_pos_iou"}
    assert losses["loss"].requires_grad
    assert all(not v.requires_grad for k, v in losses.items() if k != "loss")
    # At most half of 64 sampled anchors per volume are positive; every landmark has one.
    assert 10 <= losses["num_pos"].item() <= 64
    assert 0.0 < losses["mean_pos_iou"].item() <= 1.0
    again = twin.loss(twin(volumes), landmarks)
    assert all(torch.equal(losses[k], again[k]) for k in losses)
    with pytest.raises(ValueError, match="landmarks_vox"):
        model.loss(model(volumes), LANDMARKS_VOX)


def test_iou_balance_switch_changes_gradient_not_value():
    torch.manual_seed(0)
    anchors = anchor_ops.make_anchors((8, 8, 8), 4, [3.25, 4.0, 5.0, 7.0])
    logits = torch.randn(1, anchors.shape[0], 6)
    deltas = 0.2 * torch.randn(1, anchors.shape[0], 6)
    grads, values = [], []
    for balance in (True, False):
        model = RPNModel(PROFILE, iou_balance=balance)
        leaf = logits.clone().requires_grad_()
        loss = model.loss({"cls_logits": leaf, "deltas": deltas, "anchors": anchors}, LANDMARKS_VOX[None])
        loss["loss"].backward()
        grads.append(leaf.grad)
        values.append(loss["loss_cls"].item())
    # Eq. (3) keeps the positives' total CE, so the value matches; the gradient is reweighted.
    assert values[0] == pytest.approx(values[1], rel=1e-5)
    assert not torch.allclose(grads[0], grads[1])


def test_training_steps_reduce_loss_and_candidates():
    torch.manual_seed(0)
    profile = dataclasses.replace(PROFILE, samples_per_volume=32)
    model = RPNModel(profile)
    volume = synthetic_volume(LANDMARKS_VOX)
    landmarks = LANDMARKS_VOX[None]

    def loss_with_fixed_sample():
        model._sampling_calls = 0  # the same anchors are sampled for both measurements
        with torch.no_grad():
            return model.loss(model(volume), landmarks)["loss"].item()

    before = loss_with_fixed_sample()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(8):
        optimiser.zero_grad()
        model.loss(model(volume), landmarks)["loss"].backward()
        optimiser.step()
    after = loss_with_fixed_sample()
    assert after < 0.7 * before

    model.eval()
    with torch.no_grad():
        found = model.candidates(model(volume), top_k=2)
    assert len(found) == 1 and len(found[0]) == 5
    for index, (boxes, scores) in enumerate(found[0]):
        most = 4 if index in (0, 2) else 2  # the eyes: one merged list of two places per rank
        assert boxes.shape[1] == 6 and 1 <= boxes.shape[0] <= most and scores.shape == boxes.shape[:1]
        assert bool((scores[:-1] >= scores[1:]).all()) and bool(((scores >= 0) & (scores <= 1)).all())
        assert bool((boxes[:, 3:] > 0).all())


def test_build_model_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        build_model("yolo", PROFILE)
    assert build_model("rpn", "smoke", iou_balance=False).iou_balance is False


def test_half_resolution_profiles_keep_the_papers_feature_cell():
    from igrpn.models.backbone import detection_stride

    # 5.2 mm cells: stride 4 at 1.3 mm (the paper), stride 2 at 2.6 mm (the cpu profile).
    assert detection_stride(get_profile("paper")) == 4
    assert detection_stride(get_profile("cpu")) == 2
    backbone = Backbone(width=4, stride=2)
    out = backbone(torch.randn(1, 1, 32, 24, 16))
    assert out["fused"].shape == (1, 16, 8, 6, 4)
    assert out["features"].shape == (1, 8, 16, 12, 8) and backbone.out_channels == 8
    profile = dataclasses.replace(PROFILE, feature_stride_mm=2 * PROFILE.spacing_mm)
    model = build_model("rpn", profile)
    result = model(torch.randn(1, 1, 32, 24, 16))
    sizes = [s / profile.spacing_mm for s in profile.anchor_sizes_mm]
    expected = anchor_ops.make_anchors((16, 12, 8), 2, sizes)
    assert torch.equal(result["anchors"], expected)
    assert result["cls_logits"].shape == (1, expected.shape[0], 6)
    with pytest.raises(ValueError, match="stride must be 2 or 4"):
        Backbone(width=4, stride=8)


@pytest.mark.parametrize("mode", ["all", "hard_pool", "near_face", "atss"])
def test_the_other_classification_anchor_rules_train(mode):
    torch.manual_seed(0)
    setting = {"matcher": "atss"} if mode == "atss" else {"classification_anchors": mode}
    profile = dataclasses.replace(PROFILE, samples_per_volume=32, **setting)
    model = RPNModel(profile)
    volume, landmarks = synthetic_volume(LANDMARKS_VOX), LANDMARKS_VOX[None]
    losses = []
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30 if mode == "atss" else 12):
        optimiser.zero_grad()
        loss = model.loss(model(volume), landmarks)
        loss["loss"].backward()
        optimiser.step()
        losses.append(loss["loss"].item())
    # ATSS makes ~45 positives of IoU ~0.25 per GT on this coarse grid (4 cells x 64 shapes): slower
    assert losses[-1] < (0.8 if mode == "atss" else 0.7) * losses[0]
    anchors = model(volume)["anchors"]
    labels, _ = anchor_ops.match_anchors(B.centre_to_corner(anchors), B.centre_to_corner(model.gt_boxes(landmarks)[0]),
                                torch.arange(1, 6), profile.pos_iou, profile.neg_iou)
    if mode == "all":
        assert loss["num_pos"].item() == (labels > 0).sum().item()  # every positive regressed
    else:
        assert loss["num_pos"].item() <= 16


def test_hard_pool_draws_negatives_only_from_the_hardest():
    profile = dataclasses.replace(PROFILE, samples_per_volume=8, positive_fraction=0.5,
                                  classification_anchors="hard_pool", hard_negative_pool=2)
    model = RPNModel(profile)
    num_anchors, per_cell = 64 * 20, model.num_anchors_per_cell
    labels = torch.zeros(num_anchors, dtype=torch.int64)
    labels[:10] = 3
    logits = torch.zeros(num_anchors, 6)
    hard = torch.arange(100, 108)  # the 8 hardest negatives (pool = 2 × 4 negatives)
    logits[hard, 2] = 5.0
    chosen = model._hard_pool_sample(logits, labels, torch.Generator().manual_seed(0))
    assert chosen.numel() == 8 and bool((labels[chosen[:4]] == 3).all())
    assert set(chosen[4:].tolist()) <= set(hard.tolist()) and len(set(chosen.tolist())) == 8
    assert per_cell == 64


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_near_face_negatives_come_from_around_the_gt_boxes(fraction):
    profile = dataclasses.replace(PROFILE, samples_per_volume=64, positive_fraction=0.25,
                                  classification_anchors="near_face", near_face_fraction=fraction, near_face_mm=10.4)
    model = RPNModel(profile)
    anchors = model.anchors((12, 12, 12), 4)  # cells of 4 voxels, 48³ voxels
    gt = B.centre_to_corner(torch.tensor([[10.0, 10, 10, 3, 3, 3], [14, 10, 10, 4, 4, 4]]))
    labels, _ = anchor_ops.match_anchors(B.centre_to_corner(anchors), gt, torch.tensor([1, 2]), 0.5, 0.25)
    chosen = model._near_face_sample(anchors, labels, gt, torch.Generator().manual_seed(0))
    assert chosen.numel() == 64 and len(set(chosen.tolist())) == 64
    positives, negatives = chosen[labels[chosen] > 0], chosen[labels[chosen] <= 0]
    assert positives.numel() == min(16, int((labels > 0).sum())) and bool((labels[negatives] == 0).all())
    # near: centred inside a GT box grown by 10.4 mm = 2 voxels on every side, i.e. [6.5, 17] x [6.5, 13.5]²
    grown = torch.cat([gt[:, :3] - 2, gt[:, 3:] + 2], 1)
    centres = anchors[negatives, None, :3]
    inside = ((centres >= grown[None, :, :3]) & (centres <= grown[None, :, 3:])).all(dim=2).any(dim=1)
    expected = round(negatives.numel() * fraction)
    if fraction == 1.0:
        assert bool(inside.all())
    else:
        # the rest is drawn from all negatives, most of which lie far from the two boxes
        assert expected <= int(inside.sum()) < negatives.numel()


@pytest.mark.parametrize("norm, layer", [("group", torch.nn.GroupNorm), ("instance", torch.nn.InstanceNorm3d)])
def test_backbone_norm_replaces_every_batchnorm_and_inference_matches_the_plain_path(norm, layer):
    profile = dataclasses.replace(PROFILE, backbone_norm=norm)
    torch.manual_seed(0)
    model = RPNModel(profile).eval()
    norms = [m for m in model.backbone.modules() if isinstance(m, (torch.nn.BatchNorm3d, layer))]
    assert norms and all(isinstance(m, layer) for m in norms)
    volume = torch.randn(1, 1, 32, 24, 16)
    with torch.no_grad():
        fast = model(volume)["deltas"]  # (the class logits' layout differs on the fast path)
        with fast_inference(False):
            plain = model(volume)["deltas"]
    assert torch.allclose(fast, plain, atol=1e-5)
    with pytest.raises(ValueError, match="backbone_norm must be one of"):
        dataclasses.replace(PROFILE, backbone_norm="layer")


def test_sum_fusion_adds_a_projected_coarse_map_and_block1_can_drop_its_second_conv():
    torch.manual_seed(0)
    backbone = Backbone(width=4, stride=2, fusion="sum", block1_convs=1).eval()
    assert len(backbone.block1) == 3 and len(backbone.block2) == 6  # one [conv, BN, ReLU] triple against two
    # the fusion convolutions see the finer map's channels only (4w and 2w), not the concatenation
    assert backbone.fuse[0].in_channels == 16 and backbone.fuse_fine[0].in_channels == 8
    volume = torch.randn(1, 1, 32, 24, 16)
    with torch.no_grad():
        out = backbone(volume)
        # by hand: 1×1×1 projection of block 4, upsampled to block 3's grid, added, then the conv
        upsampled = torch.nn.functional.interpolate(backbone.lateral(out["block4"]), size=(8, 6, 4),
                                                    mode="trilinear", align_corners=False)
        with fast_inference(False):
            expected = backbone.fuse(out["block3"] + upsampled)
    assert out["features"].shape == (1, 8, 16, 12, 8)
    assert torch.allclose(out["fused"], expected, atol=1e-5)


def test_backbone_variants_are_profile_fields_of_the_rpn_and_bad_values_are_refused():
    profile = dataclasses.replace(PROFILE, fusion="sum", block1_convs=1)
    model = RPNModel(profile)
    assert model.backbone.fusion == "sum" and len(model.backbone.block1) == 3
    paper = RPNModel(PROFILE)
    assert paper.backbone.fusion == "concat" and paper.backbone.lateral is None
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in paper.parameters())
    with pytest.raises(ValueError, match="fusion must be one of"):
        dataclasses.replace(PROFILE, fusion="add")
    with pytest.raises(ValueError, match="block1_convs must be 1 or 2"):
        dataclasses.replace(PROFILE, block1_convs=3)
    with pytest.raises(ValueError, match="fusion must be one of"):
        Backbone(width=4, fusion="max")
