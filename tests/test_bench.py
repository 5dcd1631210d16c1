"""The benchmark script (benchmarks/bench.py) and the CPU inference fast path it measures.

No timing is asserted: the benchmark runs with --quick at the smoke size and its outputs are
checked for columns and rows; the fast path is checked against the plain path's outputs.
"""

import copy
import csv
import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
# benchmarks/ is a folder of the repository, not of the installed package.
sys.path.insert(0, str(REPO))
from benchmarks import bench  # noqa: E402
from igrpn.config import get_profile  # noqa: E402
from igrpn.models.backbone import conv_bn_relu, ConvBNReLU
from igrpn.models import build_model
from igrpn.models.postprocess import class_major_log_probs, top_anchors_per_class
from igrpn.models.fast_cpu import fast_inference

SMOKE = get_profile("smoke")


def _randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that folding them is tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm3d):
                n = layer.num_features
                layer.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                layer.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator))
                layer.weight.copy_(0.5 + torch.rand(n, generator=generator))
                layer.bias.copy_(0.4 * torch.rand(n, generator=generator) - 0.2)
    return model


def test_bench_quick_smoke_writes_csv_and_markdown(tmp_path):
    # As a program (python -m benchmarks.bench), as documented: it then also chooses its OpenMP
    # wait policy before torch loads, which keeps this run short on a busy machine.
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--quick", "--sizes", "smoke", "--out-dir", str(tmp_path),
         "--repeats", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    with (tmp_path / "benchmarks.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == bench.COLUMNS
        rows = list(reader)
    by_what = {(r["what"], r["input"]): r for r in rows}
    expected = [("conv3d_peak", None)]
    for prefix in bench.ROW_PREFIX.values():
        expected += [(f"{prefix}_inference", "32^3"), (f"{prefix}_postprocess", "32^3"),
                     (f"{prefix}_train_step", "2x32^3")]
    expected += [("ig_rpn_decode_nms", "32^3"), ("ig_rpn_prior", "32^3")]
    for what, input_label in expected:
        matches = [r for (w, i), r in by_what.items() if w == what and (input_label is None or i == input_label)]
        assert matches, f"no row {what} {input_label}"
        row = matches[0]
        assert float(row["median_ms"]) > 0 and float(row["min_ms"]) <= float(row["max_ms"])
        assert row["device"].startswith("cpu")
    # The forward's GFLOP is counted (positive) and the rate follows from it and the median.
    rpn = by_what[("ig_rpn_inference", "32^3")]
    assert float(rpn["gflops_per_s"]) == pytest.approx(
        float(rpn["gflop"]) / (float(rpn["median_ms"]) / 1e3), rel=1e-2)
    # MONAI is an optional extra: its rows, or the printed reason they are missing.
    assert ("monai_retinanet_inference", "32^3") in by_what or "skipping MONAI" in run.stdout
    assert "OMP_WAIT_POLICY" in rpn["device"]
    markdown = (tmp_path / "benchmarks.md").read_text()
    assert markdown.startswith("## Benchmarks\n")
    assert "post-processing" in markdown and "| ig_rpn_inference | 32^3 |" in markdown


def test_bench_runs_as_a_script():
    run = subprocess.run([sys.executable, "benchmarks/bench.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "--out-dir" in run.stdout


def test_bench_rejects_bad_arguments(capsys):
    assert bench.main(["--sizes", "huge"]) == 2
    assert bench.main(["--sizes", "cpu:50"]) == 2
    assert bench.main(["--methods", "rpn,yolo"]) == 2
    assert "unknown" in capsys.readouterr().err


def test_parse_sizes_and_training_edges():
    cpu, paper, small = bench.parse_sizes("cpu, paper, smoke:16")
    assert (cpu.edge, cpu.profile.width, cpu.label) == (64, 16, "64^3")
    assert cpu.train_edges() == [64]  # the cpu and paper profiles train on whole volumes
    assert (paper.edge, paper.profile.width, paper.train_edges()) == (128, 32, [128])
    assert small.train_edges() == [16]
    cropped = bench.Size(dataclasses.replace(cpu.profile, crop_mm=124.8), 64)
    assert cropped.train_edges() == [48, 64]  # a 124.8 mm crop at 2.6 mm, and the whole volume


def test_flop_count_of_known_layers():
    net = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.Conv3d(4, 6, 1), nn.Flatten(), nn.Linear(6 * 27, 5))
    gflop = bench.count_forward_gflop(net, lambda: net(torch.zeros(1, 2, 3, 3, 3)))
    expected = 2 * 27 * 2 * 4 * 27 + 2 * 1 * 4 * 6 * 27 + 2 * (6 * 27) * 5
    assert gflop * 1e9 == pytest.approx(expected)


def test_flop_count_of_the_rpn_matches_the_layer_arithmetic():
    model = build_model("rpn", SMOKE).eval()  # width 4, 32³ input: stride-4 map of 8³ cells
    gflop = bench.count_forward_gflop(model, lambda: model(torch.zeros(1, 1, 32, 32, 32)))
    w, v = 4, 32**3

    def conv(cin, cout, voxels, k=27):
        return 2 * k * cin * cout * voxels

    backbone = (conv(1, w, v) + conv(w, w, v) + conv(w, 2 * w, v / 8) + conv(2 * w, 2 * w, v / 8)
                + conv(2 * w, 4 * w, v / 64) + conv(4 * w, 4 * w, v / 64) + conv(4 * w, 8 * w, v / 512)
                + conv(8 * w, 8 * w, v / 512) + conv(12 * w, 4 * w, v / 64))
    head = conv(4 * w, 4 * w, v / 64) + conv(4 * w, 64 * 6, v / 64, k=1) + conv(4 * w, 64 * 6, v / 64, k=1)
    assert gflop * 1e9 == pytest.approx(backbone + head)


def test_peak_memory_sees_a_large_allocation():
    mb, note = bench.peak_memory_mb(lambda: torch.ones(64, 2**20).sum(), torch.device("cpu"))  # 256 MB
    if note:
        pytest.skip(note)
    assert 200 < mb < 400


@pytest.mark.parametrize("method", ["rpn", "ssd", "faster_rcnn", "heatmap"])
def test_fast_inference_matches_the_plain_path(method):
    torch.manual_seed(0)
    model = _randomise_batchnorm(build_model(method, SMOKE)).eval()
    volume = torch.randn(1, 1, 32, 24, 40)
    with torch.no_grad():
        with fast_inference(False):
            plain = model(volume)
        with fast_inference(True):
            fast = model(volume)
    assert plain.keys() == fast.keys()
    # Faster R-CNN's proposals are a top-k of near-equal untrained objectness scores, whose order
    # a rounding difference may change: its second stage is compared on the same RoIs below.
    second_stage = {"rois", "roi_logits", "roi_deltas"} if method == "faster_rcnn" else set()
    for key, value in plain.items():
        if key in second_stage:
            continue
        if key == "cls_logits" and method == "rpn":
            # The fast path stores them relative to the background: compare what they mean.
            assert float(fast[key][..., 0].abs().max()) == 0.0
            value, fast[key] = value.log_softmax(dim=-1), fast[key].log_softmax(dim=-1)
        if value.is_floating_point():
            scale = value.abs().max().clamp_min(1e-6)
            assert torch.allclose(fast[key], value, atol=1e-4 * float(scale), rtol=1e-4), key
        else:
            assert torch.equal(fast[key], value), key
    if second_stage:
        with torch.no_grad():
            logits, deltas = model.box_head(fast["features"], plain["rois"])
        torch.testing.assert_close(logits, plain["roi_logits"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(deltas, plain["roi_deltas"], atol=1e-4, rtol=1e-4)


def test_top_anchors_per_class_equals_a_full_top_k():
    generator = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(50 * 8, 4, generator=generator)  # 50 groups of 8 anchors, K = 3
    expected_scores = class_major_log_probs(logits)
    for k in (1, 7, 49, 50, 400):  # below, at and above the number of groups
        for chunk in (8, 24, 1000):  # one group, three groups, everything per chunk
            values, index = top_anchors_per_class(logits, k, group_size=8, chunk=chunk)
            expected_values, expected_index = expected_scores.topk(k, dim=1)
            assert torch.equal(values, expected_values.t())
            assert torch.equal(index, expected_index.t())  # no ties in continuous random logits
    # Ties: the values are the top k's, each index points at its value.
    tied = torch.zeros(40, 3)
    tied[5, 1:] = 1.0
    values, index = top_anchors_per_class(tied, 3, group_size=4)
    expected = class_major_log_probs(tied).topk(3, dim=1).values.t()
    assert torch.equal(values, expected)
    assert torch.equal(torch.gather(class_major_log_probs(tied).t(), 0, index), values)
    # NaN logits: falls back to a full top-k rather than returning fewer than k.
    nan_logits = logits.clone()
    nan_logits[:20, 2] = float("nan")
    values, index = top_anchors_per_class(nan_logits, 10, group_size=8)
    assert values.shape == (10, 3)
    with pytest.raises(ValueError, match="k must be"):
        top_anchors_per_class(logits, 401, group_size=8)


def test_class_major_head_is_the_pointwise_head_stored_class_major():
    from igrpn.models.rpn import class_major_head, pointwise_head

    torch.manual_seed(0)
    conv = nn.Conv3d(5, 8 * 6, kernel_size=1)  # 8 anchors, K + 1 = 6
    features = torch.randn(2, 5, 3, 4, 2).contiguous(memory_format=torch.channels_last_3d)
    with torch.no_grad():
        expected = pointwise_head(features, conv, 6)  # (2, 24·8, 6)
        stored = class_major_head(features, conv, 6)
        relative = class_major_head(features, conv, 6, reference=0)
    assert stored.shape == expected.shape and stored.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(stored, expected)
    torch.testing.assert_close(relative, expected - expected[..., :1])  # background row exactly 0
    assert float(relative[..., 0].abs().max()) == 0.0
    with pytest.raises(ValueError, match="1×1×1"):
        class_major_head(features, nn.Conv3d(5, 12, kernel_size=3), 6)


@pytest.mark.parametrize("layout", ["cell_major", "class_major", "relative"])
def test_top_anchors_per_class_exact_on_a_detector_like_score_map(layout):
    """Background nearly everywhere, a few bright places per class: the bounded passes must give
    exactly the full top-k, whatever the layout, with the eyes merged."""
    generator = torch.Generator().manual_seed(3)
    groups, group_size = 400, 16
    logits = torch.randn(groups * group_size, 6, generator=generator)
    logits[:, 0] += 6.0  # p(background) ≈ 0.99 almost everywhere
    for c in range(1, 6):
        hot = torch.randint(0, groups, (3,), generator=generator)
        for g in hot.tolist():
            logits[g * group_size:(g + 1) * group_size, c] += 4.0 + 4.0 * torch.rand(group_size, generator=generator)
    if layout != "cell_major":
        logits = logits.t().contiguous().t()
    if layout == "relative":
        logits = (logits - logits[:, :1]).t().contiguous().t()
    pairs = ((1, 3),)
    full = class_major_log_probs(logits, pairs)
    for k in (1, 10, 100):
        values, index = top_anchors_per_class(logits, k, group_size=group_size, mirror_pairs=pairs)
        expected = full.topk(k, dim=1).values.t()
        live = [0, 1, 3, 4]
        torch.testing.assert_close(values[:, live], expected[:, live], atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.gather(full.t(), 0, index)[:, live], values[:, live], atol=1e-6, rtol=0)
        assert torch.isneginf(values[:, 2]).all()  # the right eye is scored with the left


def test_class_major_log_probs_equal_the_log_softmax():
    generator = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(1000, 6, generator=generator)
    expected = torch.log_softmax(logits, dim=-1)[:, 1:].t()
    torch.testing.assert_close(class_major_log_probs(logits), expected, atol=1e-5, rtol=1e-6)
    huge = torch.tensor([[1000.0, 0.0, -1000.0]])  # no overflow: shifted by the row maximum
    torch.testing.assert_close(class_major_log_probs(huge), torch.tensor([[-1000.0], [-2000.0]]))


def _full_nms_candidates(logits, deltas, anchors, nms_iou):
    """Reference: softmax, every anchor decoded, greedy NMS over all of them per class (eyes merged)."""
    from igrpn import boxes as box_ops

    probs = logits.softmax(dim=-1)[:, 1:]
    probs[:, 0] = probs[:, 0] + probs[:, 2]  # the eyes scored as one class (merge_mirror_pairs)
    boxes = box_ops.decode(deltas, anchors)
    expected = {}
    for c in (0, 1, 3, 4):
        keep = box_ops.nms(box_ops.centre_to_corner(boxes), probs[:, c], nms_iou, 4 if c == 0 else 2)
        expected[c] = (boxes[keep], probs[keep, c])
    return expected


def test_rpn_candidates_equal_nms_over_every_anchor():
    """The candidates equal those of a softmax, decode and NMS over all anchors, also when the
    best anchors of a class all decode onto one box and the first round must widen."""
    from igrpn import boxes as box_ops

    torch.manual_seed(0)
    model = build_model("rpn", SMOKE).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        outputs = model(torch.randn(1, 1, 32, 32, 32, generator=generator))
    logits = 2 * torch.randn(outputs["cls_logits"].shape, generator=generator)[0]
    deltas = 0.1 * torch.randn(outputs["deltas"].shape, generator=generator)[0]
    anchors = outputs["anchors"]
    assert anchors.shape[0] > 10 * model.nms_prefix  # the grouped path is taken
    # The nose's 200 best anchors all decode onto one box; its second place ranks 201st.
    crowd = torch.randperm(anchors.shape[0], generator=generator)[:201]
    logits[crowd, 4] = 20.0 - torch.arange(201, dtype=torch.float32) * 0.01
    one_box = torch.tensor([[16.0, 16.0, 16.0, 6.0, 6.0, 6.0]])
    deltas[crowd[:200]] = box_ops.encode(one_box.expand(200, 6), anchors[crowd[:200]])
    for layout in ("cell_major", "class_major"):
        given = logits if layout == "cell_major" else logits.t().contiguous().t()
        found = model.candidates({"cls_logits": given[None], "deltas": deltas[None], "anchors": anchors}, top_k=2)[0]
        expected = _full_nms_candidates(logits, deltas, anchors, SMOKE.nms_iou)
        for c, (boxes, scores) in enumerate(found):
            expected_boxes, expected_scores = expected[0 if c == 2 else c]  # the right eye: the merged list
            torch.testing.assert_close(boxes, expected_boxes)
            torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=0)
        nose_boxes = found[3][0]
        torch.testing.assert_close(nose_boxes[0], one_box[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(nose_boxes[1], box_ops.decode(deltas[crowd[200:]], anchors[crowd[200:]])[0])


def test_fast_path_tracks_weight_changes_and_keeps_training_and_state_dict():
    torch.manual_seed(0)
    stack = _randomise_batchnorm(ConvBNReLU(*conv_bn_relu(2, 3), *conv_bn_relu(3, 3))).eval()
    plain = nn.Sequential(*copy.deepcopy(list(stack))).eval()  # the same layers as a plain Sequential
    assert list(stack.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 2, 8, 8, 8)
    with torch.no_grad():
        assert torch.allclose(stack(x), plain(x), atol=1e-5)
        # An in-place update (as an optimiser step or load_state_dict makes) must be seen.
        stack[0].weight.mul_(2.0)
        plain[0].weight.mul_(2.0)
        stack[1].running_mean.add_(0.3)
        plain[1].running_mean.add_(0.3)
        assert torch.allclose(stack(x), plain(x), atol=1e-5)
    # Outside no_grad (training, or eval with autograd) the layers run as a plain Sequential.
    out = stack(x)
    assert out.requires_grad and torch.equal(out, plain(x))
    stack.train()
    plain.train()
    assert torch.equal(stack(x), plain(x))


def test_target_sentences_report_met_and_not_met():
    size = bench.parse_sizes("smoke")[0]
    nan = math.nan

    def row(what, median, gflops=nan, note=""):
        return {"what": what, "input": "32^3", "median_ms": median, "gflops_per_s": gflops, "note": note}

    rows = [row("conv3d_peak", 1.0, 100.0, "fastest conv row: conv3d_ncdhw"),
            row("ig_rpn_inference", 10.0, 60.0), row("ig_rpn_postprocess", 30.0),
            row("heatmap_inference", 70.0), row("heatmap_postprocess", 2.0),
            row("monai_retinanet_inference", 100.0), row("monai_retinanet_postprocess", 5.0)]
    text = " ".join(bench.target_sentences(rows, [size]))
    assert "takes 30.0 ms per volume (untrained weights): target < 20 ms **not met**" in text
    assert "60 % of the measured conv3d peak" in text and "target ≥ 50 % **met**" in text
    assert "40 ms against the heatmap baseline's 72 ms" in text and "target ≤ 0.5 **not met**" in text
    assert "IG-RPN faster **met**" in text


def test_target_sentence_prefers_the_trained_post_processing_and_shows_both():
    size = bench.parse_sizes("smoke")[0]
    rows = [{"what": "ig_rpn_postprocess", "input": "32^3", "median_ms": 45.0},
            {"what": "ig_rpn_postprocess_trained", "input": "32^3", "median_ms": 17.5}]
    text = " ".join(bench.target_sentences(rows, [size]))
    assert "takes 17.5 ms per volume with the trained checkpoint (45.0 ms with untrained weights" in text
    assert "target < 20 ms **met** (trained)" in text
    rows[1]["median_ms"] = 21.0
    assert "**not met** (trained)" in " ".join(bench.target_sentences(rows, [size]))


def test_trained_rows_are_skipped_with_a_reason(tmp_path):
    group, reason = bench.trained_measurements(tmp_path / "missing.pt", 2, torch.device("cpu"))
    assert group == [] and "no trained checkpoint" in reason and "missing.pt" in reason


def test_box_iou_against_few_boxes_equals_the_general_path():
    from igrpn import boxes as box_ops

    generator = torch.Generator().manual_seed(3)
    centres = 40 * torch.rand(40000, 3, generator=generator)
    many = box_ops.centre_to_corner(torch.cat([centres, 1 + 9 * torch.rand(40000, 3, generator=generator)], 1))
    few = many[:5] + 0.5
    general = box_ops.box_iou(many, few, chunk_size=4096)  # an explicit chunk size: the general path
    assert torch.equal(box_ops.box_iou(many, few), general)  # (N, 5), the few-boxes path
    assert torch.equal(box_ops.box_iou(few, many), general.t())  # (5, N)
    assert float(general.max()) > 0.5  # the boxes do overlap


def _match_anchors_reference(anchors_corner, gt_corner, gt_labels, pos_iou, neg_iou):
    """The matcher as first written: dense (A, G) IoU, every anchor compared with every GT's best."""
    from igrpn import boxes as box_ops

    iou = box_ops.box_iou(anchors_corner, gt_corner, chunk_size=4096)
    max_iou, matched_gt = iou.max(dim=1)
    labels = torch.full((len(anchors_corner),), -1, dtype=torch.int64)
    labels[max_iou < neg_iou] = 0
    above = max_iou > pos_iou
    labels[above] = gt_labels[matched_gt[above]]
    best_per_gt = iou.max(dim=0).values
    is_best = (iou == best_per_gt[None, :]) & (best_per_gt[None, :] > 0)
    forced = is_best.any(dim=1)
    forced_gt = torch.where(is_best[forced], iou[forced], -1.0).argmax(dim=1)
    matched_gt[forced] = forced_gt
    labels[forced] = gt_labels[forced_gt]
    return labels, matched_gt


def test_match_anchors_equals_the_dense_reference_with_ties():
    from igrpn import boxes as box_ops
    from igrpn import anchors as anchor_ops

    anchors = box_ops.centre_to_corner(anchor_ops.make_anchors((14, 14, 14), 2, [3.25, 4.0, 5.0, 7.0]))
    generator = torch.Generator().manual_seed(4)
    centres = 4 + 20 * torch.rand(5, 3, generator=generator)
    centres[1] = centres[0]  # two identical GT boxes: tied IoUs and shared best anchors
    centres[3] = torch.tensor([0.5, 0.5, 0.5])  # a box at the grid's edge (anchor centre 0.5)
    sizes = torch.tensor([3.5, 3.5, 6.0, 6.0, 6.0])[:, None].expand(5, 3)
    gt = box_ops.centre_to_corner(torch.cat([centres, sizes], 1))
    gt_labels = torch.arange(1, 6)
    labels, matched = anchor_ops.match_anchors(anchors, gt, gt_labels, 0.5, 0.25)
    expected_labels, expected_matched = _match_anchors_reference(anchors, gt, gt_labels, 0.5, 0.25)
    assert torch.equal(labels, expected_labels)
    positive = labels > 0
    assert torch.equal(matched[positive], expected_matched[positive])
    assert int((labels == 1).sum()) > 0 and int((labels == 4).sum()) > 0


@pytest.mark.parametrize("mode", ["combinations", "cubes"])
@pytest.mark.parametrize("min_iou", [0.0, 0.25, 0.5])
def test_grid_anchors_near_holds_every_anchor_reaching_the_iou(min_iou, mode):
    from igrpn import boxes as box_ops
    from igrpn import anchors as anchor_ops

    grid, stride, sizes = (12, 13, 11), 2, [3.25, 4.0, 5.0, 7.0]
    anchors = box_ops.centre_to_corner(anchor_ops.make_anchors(grid, stride, sizes, mode))
    generator = torch.Generator().manual_seed(7)
    centres = torch.rand(6, 3, generator=generator) * torch.tensor([24.0, 26.0, 22.0]) - 1  # some off the edge
    edges = torch.tensor([3.5, 6.0, 9.0, 3.5, 6.0, 2.0])[:, None] * torch.tensor([[1.0, 1.2, 0.8]])
    gt = box_ops.centre_to_corner(torch.cat([centres, edges], 1))
    near = anchor_ops.grid_anchors_near(gt, grid, stride, sizes, min_iou, mode)
    iou = box_ops.box_iou(anchors, gt).amax(dim=1)
    reaching = torch.nonzero(iou > 0 if min_iou == 0 else iou >= min_iou).reshape(-1)
    assert reaching.numel() > 0
    assert bool(torch.isin(reaching, near).all())
    assert near.numel() < anchors.shape[0] / 2  # and it is a window, not everything
    assert torch.equal(near, near.unique())  # increasing, no repeats


def test_match_anchors_on_candidates_equals_matching_every_anchor():
    from igrpn import boxes as box_ops
    from igrpn import anchors as anchor_ops

    grid, stride, sizes = (16, 16, 16), 2, [3.25, 4.0, 5.0, 7.0]
    anchors = box_ops.centre_to_corner(anchor_ops.make_anchors(grid, stride, sizes))
    generator = torch.Generator().manual_seed(5)
    gt_labels = torch.arange(1, 6)
    for trial in range(4):
        centres = 2 + 28 * torch.rand(5, 3, generator=generator)
        edges = torch.tensor([3.5, 6.0, 3.5, 6.0, 6.0])[:, None].expand(5, 3)
        gt = box_ops.centre_to_corner(torch.cat([centres, edges], 1))
        near = anchor_ops.grid_anchors_near(gt, grid, stride, sizes, 0.25)
        labels, matched = anchor_ops.match_anchors(anchors, gt, gt_labels, 0.5, 0.25, candidates=near)
        expected_labels, expected_matched = anchor_ops.match_anchors(anchors, gt, gt_labels, 0.5, 0.25)
        assert torch.equal(labels, expected_labels)
        assert torch.equal(matched[labels > 0], expected_matched[labels > 0])


def test_match_anchors_falls_back_when_a_gt_reaches_no_candidate():
    from igrpn import boxes as box_ops
    from igrpn import anchors as anchor_ops

    # A GT far smaller than every anchor: its best IoU stays below neg_iou, so its best anchor
    # (a positive by the best-anchor rule) may be outside any window; an empty window must not
    # lose it.
    anchors = box_ops.centre_to_corner(anchor_ops.make_anchors((8, 8, 8), 4, [8.0]))
    gt = torch.tensor([[10.0, 10.0, 10.0, 11.0, 11.0, 11.0]])
    empty = torch.zeros(0, dtype=torch.int64)
    labels, _ = anchor_ops.match_anchors(anchors, gt, torch.tensor([3]), 0.5, 0.25, candidates=empty)
    expected, _ = anchor_ops.match_anchors(anchors, gt, torch.tensor([3]), 0.5, 0.25)
    assert torch.equal(labels, expected) and int((labels == 3).sum()) >= 1


def test_sample_balanced_sparse_draw_is_uniform_and_distinct():
    from igrpn import anchors as anchor_ops

    # Two million anchors, nearly all background: the negatives are drawn by rejection.
    labels = torch.zeros(2_000_000, dtype=torch.int64)
    labels[:1000] = -1
    labels[1000:1010] = 3
    counts = torch.zeros(10)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        picked = anchor_ops.sample_balanced(labels, 256, 0.5, generator)
        assert picked.numel() == 256 and picked.unique().numel() == 256  # 10 positives, 246 negatives
        assert int((labels[picked] > 0).sum()) == 10 and not bool((labels[picked] < 0).any())
        negatives = picked[labels[picked] == 0]
        counts += torch.bincount(negatives // 200_000, minlength=10)[:10].float()
    # 40 × 246 draws over ten equal tenths: each near 984 (binomial σ ≈ 30).
    assert float(counts.min()) > 850 and float(counts.max()) < 1120


def test_budget_curve_places_runs_at_steps_times_step_cost_and_names_the_curves_seed():
    from pathlib import Path

    import pandas as pd

    from benchmarks.budget_curve import budget_points, curve_label

    points = budget_points(pd.DataFrame({"name": ["lean", "other"], "steps": [120, 60]}), {"lean": 0.5})
    assert list(points["name"]) == ["lean"] and list(points["minutes"]) == [1.0]
    assert curve_label("lean", Path("/tmp/exp/lean_e44/seed1/log.csv")) == "lean, seed 1, during training"
    assert curve_label("lean", Path("log.csv")) == "lean, during training"
