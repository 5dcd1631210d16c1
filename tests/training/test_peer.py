"""The MONAI peer (igrpn.training.peer): coordinates, answer selection, and a short training on smoke data."""

import importlib.util
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from igrpn.training import peer
from igrpn.config import LANDMARKS, get_profile
from igrpn.prior import face_handedness

needs_monai = pytest.mark.skipif(importlib.util.find_spec("monai") is None,
                                 reason='monai missing: pip install -e ".[bench]" "torch==2.13.0"')


def test_boxes_convert_to_monai_and_back_by_half_a_voxel():
    # igrpn: centre (3, 4, 5) voxels, size (2, 4, 6); MONAI: voxel i spans [i, i + 1), so the
    # centre is at (3.5, 4.5, 5.5) and the corners half a size either side.
    centre_form = torch.tensor([[3.0, 4.0, 5.0, 2.0, 4.0, 6.0], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
    corners = peer.to_monai_boxes(centre_form)
    assert corners.tolist() == [[2.5, 2.5, 2.5, 4.5, 6.5, 8.5], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]]
    assert torch.equal(peer.from_monai_boxes(corners), centre_form)
    with pytest.raises(ValueError, match="centre form"):
        peer.to_monai_boxes(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="corner form"):
        peer.from_monai_boxes(torch.zeros(5))


def test_targets_are_gt_cubes_with_the_eyes_as_one_class():
    profile = get_profile("cpu")  # 2.6 mm: eye cubes 7 voxels, the others 12
    landmarks = torch.tensor([[[10.0, 20.0, 30.0]] * 5])
    (target,) = peer.targets_for(landmarks, profile)
    assert peer.PEER_CLASSES == ("eye", "middle_eyebrow", "nose_tip", "chin")
    assert target["labels"].tolist() == [0, 1, 0, 2, 3]
    assert target["boxes"][0].tolist() == pytest.approx([7.0, 17.0, 27.0, 14.0, 24.0, 34.0])
    assert target["boxes"][1].tolist() == pytest.approx([4.5, 14.5, 24.5, 16.5, 26.5, 36.5])
    with pytest.raises(ValueError, match=r"\(N, 5, 3\)"):
        peer.targets_for(torch.zeros(5, 3), profile)


def test_finest_feature_map_is_igrpns_cell_and_anchors_are_the_gt_cubes():
    import dataclasses

    # 5.2 mm cells at 2.6 mm: stride 2, below the tutorial stem's layer 1 (stride 4): no max-pool.
    assert peer.backbone_layout(get_profile("cpu")) == (False, [1, 2])
    # Stride 4 (20.8 mm at 5.2 mm; 5.2 mm at 1.3 mm): the tutorial's own layout.
    assert peer.backbone_layout(get_profile("smoke")) == (True, [1, 2])
    assert peer.backbone_layout(get_profile("paper")) == (True, [1, 2])
    coarse = dataclasses.replace(get_profile("cpu"), feature_stride_mm=4 * 2.6)
    assert peer.backbone_layout(coarse) == (True, [1, 2])
    assert peer.anchor_shapes(get_profile("cpu")) == [[7.0, 7.0, 7.0], [12.0, 12.0, 12.0]]
    odd = dataclasses.replace(get_profile("cpu"), feature_stride_mm=3 * 2.6)
    with pytest.raises(ValueError, match="stride of 2, 4, 8 or 16"):
        peer.backbone_layout(odd)


def test_layer_outputs_runs_children_in_order_and_returns_the_named_ones():
    backbone = torch.nn.Sequential()
    backbone.add_module("conv1", torch.nn.Conv3d(1, 2, 1))
    backbone.add_module("layer1", torch.nn.Conv3d(2, 2, 1))
    backbone.add_module("layer2", torch.nn.Conv3d(2, 2, 1))
    backbone.add_module("fc", torch.nn.Linear(2, 2))
    getter = peer.LayerOutputs(backbone, {"layer1": "0", "layer2": "1"})
    assert list(getter.keys()) == ["conv1", "layer1", "layer2"]  # the head after the last is dropped
    x = torch.randn(1, 1, 2, 2, 2)
    out = getter(x)
    assert torch.equal(out["0"], backbone.layer1(backbone.conv1(x)))
    assert torch.equal(out["1"], backbone.layer2(out["0"]))
    with pytest.raises(ValueError, match="no layers"):
        peer.LayerOutputs(backbone, {"layer9": "0"})


def _per_class_boxes():
    """Hand-made candidates (voxels, centre form) per peer class: eye, brow, nose, chin."""
    eye = torch.tensor([[10.0, 10.0, 10.0, 7, 7, 7],   # best
                        [10.5, 10.0, 10.0, 7, 7, 7],   # 1 mm from the best: not a second eye
                        [20.0, 10.0, 10.0, 7, 7, 7],   # the second eye
                        [30.0, 30.0, 30.0, 7, 7, 7]])
    eye_scores = torch.tensor([0.9, 0.85, 0.7, 0.1])
    brow = (torch.tensor([[15.0, 14.0, 10.0, 12, 12, 12], [40.0, 40, 40, 12, 12, 12]]), torch.tensor([0.8, 0.2]))
    nose = (torch.tensor([[15.0, 10.0, 4.0, 12, 12, 12], [0.0, 0, 0, 12, 12, 12]]), torch.tensor([0.6, 0.5]))
    chin = (torch.tensor([[15.0, 2.0, 0.0, 12, 12, 12]]), torch.tensor([0.4]))
    return [(eye, eye_scores), brow, nose, chin]


def test_answers_from_hand_made_candidates_pair_the_eyes_and_name_them_by_handedness():
    profile = get_profile("cpu")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [100.0, 0.0, -50.0]
    rows = peer.candidate_rows(_per_class_boxes(), affine, spacing_mm=2.0)
    assert list(rows.columns[:6]) == ["landmark", "class_id", "rank", "selected", "score", "x"]
    assert (rows["landmark"] == "left_eye").sum() == 4 and (rows["landmark"] == "right_eye").sum() == 4
    first = rows.iloc[0]
    assert (first["x"], first["y"], first["z"], first["w"]) == (120.0, 20.0, -30.0, 14.0)  # world mm

    a, c = np.array([120.0, 20.0, -30.0]), np.array([140.0, 20.0, -30.0])
    brow, nose, chin = np.array([130.0, 28.0, -30.0]), np.array([130.0, 20.0, -42.0]), np.array([130.0, 4, -50])
    sign_a_left = int(np.sign(face_handedness(np.stack([a, brow, c, nose, chin]))))
    for handedness, left in ((sign_a_left, a), (-sign_a_left, c)):
        chosen = peer.select_peer_answers(rows, profile, handedness)
        chosen = chosen[chosen["selected"]].set_index("landmark")
        assert sorted(chosen.index) == sorted(LANDMARKS)
        # The two best places at least half an eye box apart (not the 1-mm neighbour), named by the sign.
        assert chosen.loc["left_eye", ["x", "y", "z"]].tolist() == left.tolist()
        right = c if left is a else a
        assert chosen.loc["right_eye", ["x", "y", "z"]].tolist() == right.tolist()
        assert chosen.loc["chin", "score"] == pytest.approx(0.4)
        assert chosen.loc["nose_tip", ["x", "y", "z"]].tolist() == nose.tolist()


def test_candidate_rows_want_one_list_per_peer_class():
    with pytest.raises(ValueError, match="expected 4 classes"):
        peer.candidate_rows(_per_class_boxes()[:3], np.eye(4), 1.0)


def test_package_imports_without_monai_and_asks_for_the_extra(monkeypatch):
    code = "import sys, igrpn.training.peer; assert 'monai' not in sys.modules and 'torchvision' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    monkeypatch.setitem(sys.modules, "monai.apps.detection.networks.retinanet_detector", None)
    with pytest.raises(RuntimeError, match=r'pip install -e "\.\[bench\]" "torch==2\.13\.0"'):
        peer.build_detector(get_profile("smoke"))


@needs_monai
@pytest.mark.parametrize("stride_vox", [2, 4])
def test_feature_maps_and_anchors_sit_on_igrpn_cells(stride_vox):
    import dataclasses

    profile = dataclasses.replace(get_profile("cpu"), feature_stride_mm=stride_vox * 2.6)
    torch.manual_seed(0)
    detector = peer.build_detector(profile).eval()
    images = torch.zeros(1, 1, 32, 32, 32)
    with torch.no_grad():
        maps = detector.network(images)
    finest = 32 // stride_vox
    assert [tuple(m.shape[2:]) for m in maps["classification"]] == [(finest,) * 3, (finest // 2,) * 3,
                                                                    (finest // 4,) * 3]
    assert list(detector.size_divisible) == [4 * stride_vox] * 3
    detector.generate_anchors(images, maps)
    first = peer.from_monai_boxes(detector.anchors[0][0])
    # The first cell covers voxels 0 .. stride − 1: its centre, in igrpn's indices.
    assert first[:3].tolist() == [(stride_vox - 1) / 2] * 3


@needs_monai
def test_a_short_training_answers_five_landmarks_per_validation_case(smoke_manifest, tmp_path):
    from igrpn.data import load_cases, read_manifest

    profile = get_profile("smoke")
    result = peer.train_peer(profile, seed=0, out_dir=tmp_path / "peer", manifest=smoke_manifest, budget_s=3.0,
                             progress=False)
    assert result["steps"] >= 1 and result["train_seconds"] >= 3.0
    ckpt = torch.load(result["checkpoint"], map_location="cpu", weights_only=True)
    assert ckpt["steps"] == result["steps"] and ckpt["handedness"] in (-1, 1) and ckpt["seed"] == 0
    log = pd.read_csv(result["log"])
    assert len(log) == result["steps"] and np.isfinite(log["loss"]).all()
    assert log["seconds"].sum() == pytest.approx(result["train_seconds"])

    table = read_manifest(smoke_manifest)
    cases = load_cases(table[table["case_id"].isin(result["val_ids"])], profile.spacing_mm, progress=False)
    chosen = peer.validation_answers(result, cases)
    assert list(chosen.columns) == list(peer.ANSWER_COLUMNS)
    assert len(chosen) == 5 * len(cases) and chosen["selected"].all()
    assert chosen.groupby("case_id")["landmark"].apply(sorted).map(lambda names: names == sorted(LANDMARKS)).all()
    assert np.isfinite(chosen[["x", "y", "z", "w", "h", "d", "score"]].to_numpy(dtype=float)).all()
