"""Figures (paper Fig. 1, 3, 4), prediction tables and the notebooks' data helpers, on tiny synthetic volumes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from viz_fixtures import BLUE, FACE_VOX, RED, face_case, face_predictions, random_volume, tiny_manifest

from igrpn import config, viz
from igrpn.prior import GraphPrior


def _rectangles(ax) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


# ---------------------------------------------------------------------------- geometry helpers


def test_plane_cuts_boundaries_and_rectangle():
    boxes = np.array([[10.0, 20.0, 30.0, 4.0, 6.0, 8.0]])
    # along i the box spans [8, 12]: planes 8 and 12 cut it (boundary included), 7.9 and 12.1 do not
    assert [bool(viz.plane_cuts(boxes, 0, s)[0][0]) for s in (7.9, 8, 12, 12.1)] == [False, True, True, False]
    cut, rect = viz.plane_cuts(boxes, 1, 20)
    assert cut.tolist() == [True]
    np.testing.assert_allclose(rect[0], [8.0, 26.0, 12.0, 34.0])  # (i0, k0, i1, k1)
    nan_cut, _ = viz.plane_cuts(np.full((1, 6), np.nan), 0, 0)
    assert nan_cut.tolist() == [False]


def test_landmark_boxes_use_millimetres_over_spacing():
    boxes = viz.landmark_boxes_vox(FACE_VOX, 2.6)
    np.testing.assert_allclose(boxes[:, :3], FACE_VOX)
    np.testing.assert_allclose(boxes[:, 3], np.array(config.GT_BOX_MM) / 2.6)
    np.testing.assert_allclose(boxes[0, 3:], [7.0, 7.0, 7.0])  # 14 voxels at 1.3 mm = 7 at 2.6 mm


def test_face_view_and_plane_names():
    assert viz.face_view(FACE_VOX) == (1, 1)  # looks towards +j
    assert viz.face_plane_names(FACE_VOX) == {0: "sagittal", 1: "coronal", 2: "transverse"}
    flipped = FACE_VOX * [1, -1, 1] + [0, 40, 0]  # the same face looking towards −j
    assert viz.face_view(flipped) == (1, -1)


def test_intensity_window_ignores_empty_background():
    volume = np.zeros((20, 20, 20), np.float32)
    volume[5:15, 5:15, 5:15] = np.linspace(10, 20, 1000).reshape(10, 10, 10)
    lo, hi = viz.intensity_window(volume, 0, 100)
    assert lo > 9.9 and hi == pytest.approx(20.0)


def test_project_volume_mip_and_render():
    volume = np.zeros((8, 6, 4), np.float32)
    volume[2, 3, 1] = 5.0
    mip = viz.project_volume(volume, 1)
    assert mip.shape == (8, 4) and mip[2, 1] == 5.0 and mip.sum() == 5.0
    # rendering: a dim layer (v = 0.5, α = 0.225) in front of a bright one (v = 1, α = 0.9)
    stack = np.zeros((4, 4, 10), np.float32)
    stack[:2, :, 2] = 0.5  # near the low end of k, only where i < 2
    stack[:, :, 7] = 1.0
    from_low = viz.project_volume(stack, 2, mode="render", window=(0, 1), opacity=0.9)
    assert from_low[3, 0] == pytest.approx(0.9)  # bright layer alone: 1 · 0.9
    assert from_low[0, 0] == pytest.approx(0.5 * 0.225 + 0.9 * (1 - 0.225))  # partly hidden
    from_high = viz.project_volume(stack, 2, mode="render", window=(0, 1), opacity=0.9, from_high=True)
    assert from_high[0, 0] == pytest.approx(0.9 + 0.5 * 0.225 * (1 - 0.9))


# ---------------------------------------------------------------------------- matplotlib figures


def test_plot_planes_draws_only_the_cut_boxes():
    volume = random_volume()
    gt = [[16.0, 16.0, 16.0, 4.0, 4.0, 4.0]]
    far_in_k = [[16.0, 16.0, 26.0, 4.0, 4.0, 4.0]]  # cut by the i and j planes, not by k = 16
    candidate = [[16.0, 16.0, 16.0, 10.0, 10.0, 10.0]]
    fig = viz.plot_planes(volume, (16, 16, 16), gt_boxes=gt, pred_boxes=far_in_k,
                          candidate_boxes=candidate, labels=["1"], title="t")
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    counts = [len(_rectangles(ax)) for ax in fig.axes]
    assert counts == [3, 3, 2]
    sagittal = _rectangles(fig.axes[0])
    by_gid = {r.get_gid(): r for r in sagittal}
    assert by_gid["box-gt"].get_edgecolor()[:3] == pytest.approx(np.array(RED) / 255)
    assert by_gid["box-pred"].get_edgecolor()[:3] == pytest.approx(np.array(BLUE) / 255)
    assert by_gid["box-candidate"].get_linestyle() == "--"
    # the GT rectangle in the sagittal plane (j, k) spans [14, 18] × [14, 18]
    assert (by_gid["box-gt"].get_x(), by_gid["box-gt"].get_y()) == (14.0, 14.0)
    assert by_gid["box-gt"].get_width() == by_gid["box-gt"].get_height() == 4.0

    empty = viz.plot_planes(volume, (16, 16, 2), gt_boxes=far_in_k)
    assert [len(_rectangles(ax)) for ax in empty.axes] == [1, 1, 0]


def test_plot_planes_into_given_axes_and_errors():
    fig = Figure()
    axes = fig.subplots(2, 3)
    assert viz.plot_planes(random_volume(), (1, 2, 3), axes=axes[1]) is fig
    assert len(fig.axes) == 6 and all(ax.images for ax in axes[1])
    with pytest.raises(ValueError, match="outside the volume"):
        viz.plot_planes(random_volume(), (40, 0, 0))
    with pytest.raises(ValueError, match="3D"):
        viz.plot_planes(np.zeros((4, 4)), (0, 0, 0))
    with pytest.raises(ValueError, match="centre form"):
        viz.plot_planes(random_volume(), (0, 0, 0), gt_boxes=[[1, 2, 3]])


def test_plot_mip_projects_landmarks_and_boxes():
    boxes = viz.landmark_boxes_vox(FACE_VOX, 2.0)
    fig = viz.plot_mip(random_volume(), FACE_VOX, boxes=boxes)
    (ax,) = fig.axes
    assert len(_rectangles(ax)) == 5
    assert "j (y)" in ax.get_title()  # the face looks along j
    offsets = ax.collections[0].get_offsets()
    np.testing.assert_allclose(offsets, FACE_VOX[:, [0, 2]])  # (i, k) of each landmark
    assert [t.get_text() for t in ax.texts] == ["1", "2", "3", "4", "5"]
    assert len(viz.plot_mip(random_volume(), axis=0, mode="render").axes) == 1


def test_plot_case_fig1_layout(tmp_path):
    fig = viz.plot_case(face_case())
    assert len(fig.axes) == 6
    # every plane passes through the landmarks' centroid, which lies inside the brow's box
    assert all(len(_rectangles(ax)) >= 1 for ax in fig.axes[:3])
    assert len(_rectangles(fig.axes[5])) == 5  # the five projected boxes
    fig.savefig(tmp_path / "fig1.png", dpi=50)
    assert (tmp_path / "fig1.png").stat().st_size > 1000


def test_plot_prior_graph_and_histograms():
    rng = np.random.default_rng(1)
    faces = FACE_VOX * 2.0 + rng.normal(scale=0.5, size=(40, 5, 3))
    prior = GraphPrior().fit(faces)
    fig = viz.plot_prior_graph(prior, faces)
    (ax,) = fig.axes
    edges = [line for line in ax.lines if len(line.get_xdata()) == 2]
    assert len(edges) == 9
    nodes = {t.get_text(): t.get_position() for t in ax.texts if t.get_text() in "12345"}
    assert sorted(nodes) == ["1", "2", "3", "4", "5"]
    assert nodes["1"][0] > nodes["3"][0]  # left eye on the viewer's right, facing the fetus
    assert nodes["2"][1] > nodes["4"][1] > nodes["5"][1]  # brow above nose above chin
    assert len(viz.plot_prior_graph(GraphPrior).axes) == 1  # schematic layout without data

    ratios = prior.ratios(faces)
    hist = viz.plot_ratio_histograms(prior, ratios)
    visible = [ax for ax in hist.axes if ax.axison]
    assert len(visible) == 6
    curve = visible[0].lines[0]
    peak = curve.get_xdata()[np.argmax(curve.get_ydata())]
    assert peak == pytest.approx(prior.mu[0], abs=4 * prior.sigma[0] / 100)
    with pytest.raises(ValueError, match=r"\(N, 6\)"):
        viz.plot_ratio_histograms(prior, ratios[:, :5])


# ---------------------------------------------------------------------------- prediction tables


def test_prediction_boxes_from_voxels_and_from_world():
    case = face_case()
    predictions = face_predictions(case=case)
    selected, candidates, which = viz.prediction_boxes_vox(predictions, 2.0)
    np.testing.assert_allclose(selected[:, :3], FACE_VOX + [2, 0, 0])
    np.testing.assert_allclose(selected[:, 3], np.array(config.GT_BOX_MM) / 2.0)  # mm / 2 mm
    assert which.tolist() == [0, 1, 2, 3, 4] and len(candidates) == 5
    from_world, _, _ = viz.prediction_boxes_vox(predictions.drop(columns=["i", "j", "k"]), 2.0, case.affine)
    np.testing.assert_allclose(from_world, selected)
    # without ``selected`` the highest score of each landmark is the answer
    unselected = predictions.drop(columns="selected")
    np.testing.assert_allclose(viz.prediction_boxes_vox(unselected, 2.0)[0], selected)
    with pytest.raises(ValueError, match="missing columns"):
        viz.prediction_boxes_vox(predictions.drop(columns="w"), 2.0)


def test_distances_comparison_worst_and_best():
    gt = pd.DataFrame({"case_id": ["a"] * 5 + ["b"] * 5, "landmark": list(config.LANDMARKS) * 2,
                       "x": 0.0, "y": 0.0, "z": 0.0})

    def rows(dist_a, dist_b):
        frame = gt.copy()
        frame["x"] = list(dist_a) + list(dist_b)
        frame["score"], frame["selected"] = 0.5, True
        return frame

    plain = rows([3, 0, 0, 0, 0], [0, 0, 0, 0, 8])
    prior = rows([1, 0, 0, 0, 0], [0, 0, 0, 0, 8])  # the prior fixed case a's left eye only
    d_plain, d_prior = viz.selected_distances(plain, gt), viz.selected_distances(prior, gt)
    assert d_plain["distance_mm"].tolist() == [3, 0, 0, 0, 0, 0, 0, 0, 0, 8]
    picked = viz.pick_comparison_cases(d_plain, d_prior, n_cases=2)
    assert picked["case_id"].tolist() == ["a", "b"]  # the changed case first, then a fallback
    assert picked.loc[0, "landmark"] == "left_eye" and picked.loc[0, "improvement_mm"] == 2
    assert picked["changed"].tolist() == [True, False]

    worst = viz.worst_cases(d_plain, n_worst=1)
    assert len(worst) == 5 and worst["landmark"].tolist() == list(config.LANDMARKS)
    assert worst.set_index("landmark").loc["chin", "case_id"] == "b"

    name, table = viz.best_configuration({"plain": plain, "prior": prior}, gt)
    assert name == "prior"
    assert table.set_index("name").loc["plain", "d_mean_mm"] == pytest.approx(11 / 10)

    manifest = pd.DataFrame({"case_id": ["a"], **{f"{n}_{a}": [float(i)] for i, n in
                                                  enumerate(config.LANDMARKS) for a in "xyz"}})
    long = viz.manifest_landmarks(manifest)
    assert long.shape == (5, 5) and long.loc[4, "x"] == 4.0


def test_fig4_comparison_and_worst_gallery():
    case = face_case()
    plain = face_predictions(offset_vox=(3.0, 0.0, 0.0), case=case)
    prior = face_predictions(offset_vox=(0.0, 0.0, 0.0), case=case)
    fig = viz.plot_prediction_comparison(case, {"RPN": plain, "IG-RPN": prior}, landmark="left_eye")
    assert len(fig.axes) == 8
    titles = [fig.axes[0].get_title(), fig.axes[4].get_title()]
    # the MIP panel projects the left eye's GT, answer and alternative
    assert len(_rectangles(fig.axes[3])) == 3
    assert "d = 6.0 mm" in titles[0] and "d = 0.0 mm" in titles[1] and "IoU = 1.00" in titles[1]
    distances = viz.selected_distances(plain, viz.manifest_landmarks(pd.DataFrame(
        {"case_id": ["case_a"], **{f"{n}_{a}": [case.landmarks_mm[i, "xyz".index(a)]]
                                   for i, n in enumerate(config.LANDMARKS) for a in "xyz"}})))
    gallery = viz.plot_worst_cases([case, case], plain, "chin", distances)
    assert len(gallery.axes) == 8
    assert "d = 6.0 mm" in gallery.axes[0].get_title()
    # only the focus landmark's alternative is dashed in the Fig. 4 rows
    dashed = [r for r in _rectangles(fig.axes[0]) if r.get_gid() == "box-candidate"]
    assert len(dashed) == 1  # (the middle eyebrow's candidate would be cut too, were it drawn)


# ---------------------------------------------------------------------------- data helpers


def test_dataset_summary_counts_edges_and_notes():
    rows = []
    for n, (split, notes) in enumerate((("train", "hand-open;cord"), ("train", "cord"), ("test", None))):
        world = FACE_VOX * (1.0 + n)  # eye-to-eye distance 8, 16, 24 mm
        rows.append({"case_id": f"c{n}", "split": split, "notes": notes,
                     **{f"{name}_{axis}": world[i, a] for i, name in enumerate(config.LANDMARKS)
                        for a, axis in enumerate("xyz")}})
    summary = viz.dataset_summary(pd.DataFrame(rows))
    assert summary["splits"]["volumes"].to_dict() == {"train": 2, "test": 1, "total": 3}
    eyes = summary["edges_mm"].loc[("left_eye-right_eye", "train")]
    assert (eyes["mean"], eyes["min"], eyes["max"]) == pytest.approx((12.0, 8.0, 16.0))
    assert len(summary["edges_mm"]) == 9 * 3  # nine edges; train, test and all
    assert summary["edges_mm"].loc[("left_eye-right_eye", "all"), "mean"] == pytest.approx(16.0)
    tags = summary["notes"].set_index(["tag", "split"])["volumes"].to_dict()
    assert tags == {("cord", "train"): 2, ("hand-open", "train"): 1}


def test_load_demo_case_from_manifest_and_from_phantom(tmp_path):
    manifest = tiny_manifest(tmp_path)
    case = viz.load_demo_case(str(manifest), 2.0, case_index=1)
    assert case.case_id == "case1" and case.volume.shape == (32, 32, 32)
    np.testing.assert_allclose(case.landmarks_vox, FACE_VOX + 1, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        viz.load_demo_case(str(manifest), 2.0, case_index=5)

    phantom = viz.load_demo_case(str(tmp_path / "absent.csv"), 5.2, phantom_seed=2, phantom_grid=32,
                                 phantom_spacing_mm=5.2)
    assert phantom.case_id == "phantom_seed2" and phantom.volume.ndim == 3
    # the landmarks map back to world mm through the grid's affine
    world = phantom.landmarks_vox @ phantom.affine[:3, :3].T + phantom.affine[:3, 3]
    np.testing.assert_allclose(world, phantom.landmarks_mm, atol=1e-6)
