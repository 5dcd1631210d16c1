"""Figures (paper Fig. 1, 3, 4) and the numpy slice viewer, on tiny synthetic volumes."""

from __future__ import annotations

import io
from types import SimpleNamespace

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from igrpn import config, viewer, viz

RED, BLUE = viz.BOX_COLOURS["gt"], viz.BOX_COLOURS["pred"]

# A face looking towards +j (anterior): left eye at +i, brow above the eyes, nose in front.
FACE_VOX = np.array([
    [20.0, 16.0, 18.0],  # left_eye
    [16.0, 17.0, 20.0],  # middle_eyebrow
    [12.0, 16.0, 18.0],  # right_eye
    [16.0, 21.0, 13.0],  # nose_tip
    [16.0, 17.0, 7.0],   # chin
])


def _volume(shape=(32, 32, 32), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _case(spacing=2.0) -> SimpleNamespace:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-30.0, 5.0, 10.0]
    landmarks_mm = FACE_VOX * spacing + affine[:3, 3]
    return SimpleNamespace(volume=_volume(), affine=affine, landmarks_vox=FACE_VOX.copy(),
                           landmarks_mm=landmarks_mm, case_id="case_a")


def _predictions(offset_vox=(2.0, 0.0, 0.0), spacing=2.0, case: SimpleNamespace | None = None) -> pd.DataFrame:
    """Two candidates per landmark: rank 0 (selected) at GT + offset, rank 1 six voxels away in j."""
    centres = np.concatenate([FACE_VOX + offset_vox, FACE_VOX + [0.0, 6.0, 0.0]])
    frame = pd.DataFrame({
        "landmark": list(config.LANDMARKS) * 2,
        "class_id": list(range(1, 6)) * 2,
        "rank": [0] * 5 + [1] * 5,
        "selected": [True] * 5 + [False] * 5,
        "score": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05],
        "i": centres[:, 0], "j": centres[:, 1], "k": centres[:, 2],
    })
    frame["w"] = frame["h"] = frame["d"] = np.tile(config.GT_BOX_MM, 2)
    if case is not None:
        world = centres * spacing + case.affine[:3, 3]
        frame["x"], frame["y"], frame["z"] = world.T
        frame.insert(0, "case_id", case.case_id)
    return frame


def _rectangles(ax) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def _colour_mask(rgb: np.ndarray, colour) -> np.ndarray:
    return np.all(rgb == np.asarray(colour, np.uint8), axis=-1)


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
    volume = _volume()
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
    assert viz.plot_planes(_volume(), (1, 2, 3), axes=axes[1]) is fig
    assert len(fig.axes) == 6 and all(ax.images for ax in axes[1])
    with pytest.raises(ValueError, match="outside the volume"):
        viz.plot_planes(_volume(), (40, 0, 0))
    with pytest.raises(ValueError, match="3D"):
        viz.plot_planes(np.zeros((4, 4)), (0, 0, 0))
    with pytest.raises(ValueError, match="centre form"):
        viz.plot_planes(_volume(), (0, 0, 0), gt_boxes=[[1, 2, 3]])


def test_plot_mip_projects_landmarks_and_boxes():
    boxes = viz.landmark_boxes_vox(FACE_VOX, 2.0)
    fig = viz.plot_mip(_volume(), FACE_VOX, boxes=boxes)
    (ax,) = fig.axes
    assert len(_rectangles(ax)) == 5
    assert "j (y)" in ax.get_title()  # the face looks along j
    offsets = ax.collections[0].get_offsets()
    np.testing.assert_allclose(offsets, FACE_VOX[:, [0, 2]])  # (i, k) of each landmark
    assert [t.get_text() for t in ax.texts] == ["1", "2", "3", "4", "5"]
    assert len(viz.plot_mip(_volume(), axis=0, mode="render").axes) == 1


def test_plot_case_fig1_layout(tmp_path):
    fig = viz.plot_case(_case())
    assert len(fig.axes) == 6
    # every plane passes through the landmarks' centroid, which lies inside the brow's box
    assert all(len(_rectangles(ax)) >= 1 for ax in fig.axes[:3])
    assert len(_rectangles(fig.axes[5])) == 5  # the five projected boxes
    fig.savefig(tmp_path / "fig1.png", dpi=50)
    assert (tmp_path / "fig1.png").stat().st_size > 1000


def test_plot_prior_graph_and_histograms():
    from igrpn.prior import GraphPrior

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
    case = _case()
    predictions = _predictions(case=case)
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
    case = _case()
    plain = _predictions(offset_vox=(3.0, 0.0, 0.0), case=case)
    prior = _predictions(offset_vox=(0.0, 0.0, 0.0), case=case)
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


# ---------------------------------------------------------------------------- numpy viewer


def test_encode_png_round_trip():
    rgb = np.random.default_rng(2).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    decoded = mpimg.imread(io.BytesIO(viz.encode_png(rgb)), format="png")
    np.testing.assert_array_equal(np.rint(decoded[..., :3] * 255).astype(np.uint8), rgb)


def test_render_slices_orientation_and_box_pixels():
    volume = np.zeros((6, 8, 10), np.uint8)
    volume[1, 2, 3] = 255
    image = viz.render_slices(volume, (1, 2, 3), scale=2, gap=4, crosshair=False)
    # panels: sagittal (j, k) 8 × 10, coronal (i, k) 6 × 10, axial (i, j) 6 × 8 voxels
    assert image.shape == (20, 16 + 4 + 12 + 4 + 12, 3)
    # the bright voxel: column = 2·u, row = 2·(V − 1 − v) in each panel
    assert image[2 * (10 - 1 - 3), 2 * 2].tolist() == [255, 255, 255]            # sagittal (j=2, k=3)
    assert image[2 * (10 - 1 - 3), 20 + 2 * 1].tolist() == [255, 255, 255]       # coronal (i=1, k=3)
    assert image[2 * (8 - 1 - 2), 36 + 2 * 1].tolist() == [255, 255, 255]        # axial (i=1, j=2), top-aligned
    assert int((image == 255).all(axis=-1).sum()) == 3 * 4

    box = np.array([[1.0, 2.0, 3.0, 3.0, 3.0, 3.0]])
    boxed = viz.render_slices(volume, (1, 2, 3), [(box, RED, False)], scale=2, crosshair=False)
    # sagittal cut: j ∈ [0.5, 3.5] → columns 2..7; k ∈ [1.5, 4.5] → rows 10..15 (k points up)
    rows, cols = np.nonzero(_colour_mask(boxed[:, :16], RED))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (10, 15, 2, 7)
    assert not _colour_mask(boxed[12:14, 4:6], RED).any()  # a 2-pixel outline, not a filled square
    missed = viz.render_slices(volume, (4, 2, 3), [(box, RED, False)], scale=2, crosshair=False)
    assert _colour_mask(missed[:, :16], RED).sum() == 0  # i = 4 misses the box (i ∈ [−0.5, 2.5])
    assert _colour_mask(missed[:, 16:], RED).sum() > 0   # the other planes still cut it


def test_slice_viewer_redraws_and_shows_boxes():
    pytest.importorskip("ipywidgets")
    case = _case()
    viewer = viz.SliceViewer.from_case(case, predictions=_predictions(case=case))
    assert viewer.point == tuple(np.rint(FACE_VOX.mean(axis=0)).astype(int))
    first = viewer.render()
    assert _colour_mask(first, RED).sum() > 0 and _colour_mask(first, BLUE).sum() > 0
    assert "igrpn-slices" in viewer.image._dom_classes
    assert viewer.image.layout.width == f"{first.shape[1]}px" and viewer.image.layout.height == f"{first.shape[0]}px"
    assert {"igrpn-slider", "igrpn-slider-i"} <= set(viewer.sliders[0]._dom_classes)
    png = viewer.image.value

    viewer.sliders[0].value = 0  # far from every box
    moved = viewer.render()
    assert not np.array_equal(moved, first) and viewer.image.value != png
    assert _colour_mask(moved[:, : 32 * viewer.scale], RED).sum() == 0  # the sagittal panel is empty

    viewer.checkboxes["gt"].value = False
    viewer.set_point(FACE_VOX[4])
    hidden = viewer.render()
    assert _colour_mask(hidden, RED).sum() == 0 and _colour_mask(hidden, BLUE).sum() > 0

    viewer.jump.value = ("gt", 0)  # jump to the left eye
    assert viewer.point == (20, 16, 18) and viewer.jump.value is None
    assert viewer.last_render_ms < 1e4  # a number was recorded

    table = viewer.summary()
    assert table["distance_mm"].tolist() == pytest.approx([4.0] * 5)  # 2 voxels × 2 mm
    assert table["candidates"].tolist() == [2] * 5
    assert "igrpn-table" in viewer.table._dom_classes
    assert len(viewer.candidate_rows) == 15  # 5 ground truths, 5 answers, 5 other candidates
    assert "application/vnd.jupyter.widget-view+json" in viewer._repr_mimebundle_()


# ---------------------------------------------------------------------------- viewer logic


@pytest.mark.parametrize("scale", [1, 3, 8])
def test_panel_layout_maps_pixels_to_voxels_under_zoom(scale):
    shape = (6, 8, 5)
    layout = viewer.PanelLayout(shape, scale, gap=4)
    assert layout.size == (8 * scale, (8 + 6 + 6) * scale + 8)
    point = (2, 3, 4)
    # every pixel of a voxel's scale × scale block maps to that voxel, in each of the three planes
    for axis, voxel in ((0, (2, 7, 0)), (1, (5, 3, 4)), (2, (0, 7, 4))):
        x, y = layout.voxel_to_pixel(axis, voxel)
        n = [fixed for _, fixed in viz.PLANES].index(axis)
        _, u_axis, v_axis, left, _ = layout.panel(n)
        x0 = left + voxel[u_axis] * scale
        y0 = (shape[v_axis] - 1 - voxel[v_axis]) * scale
        assert x0 <= x < x0 + scale and y0 <= y < y0 + scale
        for dx, dy in ((0, 0), (scale - 1, scale - 1), (0.99, 0.5)):
            hit_axis, hit = layout.pixel_to_voxel(x0 + dx, y0 + dy, point)
            expected = list(point)
            expected[u_axis], expected[v_axis] = voxel[u_axis], voxel[v_axis]
            assert (hit_axis, hit) == (axis, tuple(expected))
    width = layout.panel(0)[4]
    assert layout.pixel_to_voxel(width, 0, point) is None            # in the gap after panel 1
    assert layout.pixel_to_voxel(width + 4, 0, point)[0] == 1         # first column of panel 2
    axial_left = layout.panel(2)[3]
    assert layout.pixel_to_voxel(axial_left, 8 * scale - 1, point)[0] == 2  # axial is 8 voxels high
    assert layout.pixel_to_voxel(layout.panel(1)[3], 5 * scale, point) is None  # coronal is 5 high
    assert layout.pixel_to_voxel(-1, 0, point) is None
    assert layout.pixel_to_voxel(layout.size[1], 0, point) is None


def test_panel_layout_agrees_with_the_renderer():
    # each voxel holds its own number: the pixel the layout names shows that voxel's value
    shape = (5, 7, 6)
    volume = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    point = (3, 2, 4)
    for scale in (2, 5):
        image = viz.render_slices(volume, point, scale=scale, crosshair=False)
        layout = viewer.PanelLayout(shape, scale)
        assert image.shape[:2] == layout.size
        for axis, voxel in ((0, (3, 6, 0)), (1, (4, 2, 5)), (2, (0, 0, 4))):
            x, y = layout.voxel_to_pixel(axis, voxel)
            assert image[y, x, 0] == volume[voxel]
            assert layout.pixel_to_voxel(x, y, point) == (axis, voxel)


def test_window_level_mapping():
    assert viewer.window_level(-1.0, 3.0) == (4.0, 1.0)
    assert viewer.window_range(4.0, 1.0) == (-1.0, 3.0)
    lo, hi = viewer.window_range(0.0, 2.0)  # a zero width stays a valid range
    assert lo < 2.0 < hi
    grey = viewer.apply_window(np.array([-5.0, 10.0, 15.0, 20.0, 99.0]), 10.0, 20.0)
    assert grey.dtype == np.uint8 and grey.tolist() == [0, 0, 128, 255, 255]
    # a narrower window around the same level spreads the same intensities further apart
    values = np.array([14.0, 16.0])
    assert np.ptp(viewer.apply_window(values, 13.0, 17.0).astype(int)) > np.ptp(
        viewer.apply_window(values, 10.0, 20.0).astype(int))
    assert viewer.nice_step(0.0123) == pytest.approx(0.02) and viewer.nice_step(3.0) == 5.0
    assert viewer.nice_step(0.01) == pytest.approx(0.01)
    assert viewer.snap(0.337, 0.02) == pytest.approx(0.34)


def test_wheel_and_key_steps():
    assert [viewer.wheel_step(d) for d in (-120, -3, 0, 4, 100)] == [1, 1, 0, -1, -1]
    keys = ("ArrowUp", "ArrowRight", "ArrowDown", "ArrowLeft", "PageUp", "PageDown", "a", None)
    assert [viewer.key_step(k) for k in keys] == [1, 1, -1, -1, 5, -5, 0, 0]
    assert viewer.step_point((3, 4, 5), 2, 1, (10, 10, 6)) == (3, 4, 5)  # clipped at the last slice
    assert viewer.step_point((3, 4, 5), 0, -5, (10, 10, 6)) == (0, 4, 5)
    assert viewer.step_point((3, 4, 5), 1, 2, (10, 10, 6)) == (3, 6, 5)


def _top_edge_runs(mask_row: np.ndarray) -> list[int]:
    """Lengths of the runs of True along a row (the drawn dashes)."""
    padded = np.r_[False, mask_row, False].astype(int)
    starts, stops = np.flatnonzero(np.diff(padded) == 1), np.flatnonzero(np.diff(padded) == -1)
    return (stops - starts).tolist()


def test_render_slices_line_styles_and_labels():
    volume = np.full((30, 30, 30), 128, np.uint8)
    box = np.array([[15.0, 15.0, 15.0, 20.0, 20.0, 20.0]])
    runs = {}
    for style in ("solid", "dashed", "dotted"):
        image = viz.render_slices(volume, (15, 15, 15), [viewer.Overlay(box, RED, style)], scale=2,
                                  crosshair=False)
        mask = _colour_mask(image[:, :60], RED)
        top = np.flatnonzero(mask.any(axis=1))[0]
        runs[style] = _top_edge_runs(mask[top])
    assert len(runs["solid"]) == 1 and runs["solid"][0] == 40  # 20 voxels × 2 pixels
    assert set(runs["dashed"][:-1]) == {8} and len(runs["dashed"]) > 3
    assert set(runs["dotted"][:-1]) == {2} and len(runs["dotted"]) > 6
    # the older (boxes, colour, dashed) form still draws dashes
    legacy = viz.render_slices(volume, (15, 15, 15), [(box, RED, True)], scale=2, crosshair=False)
    assert len(_top_edge_runs(_colour_mask(legacy[:, :60], RED)[np.flatnonzero(
        _colour_mask(legacy[:, :60], RED).any(axis=1))[0]])) > 3

    low = np.array([[15.0, 15.0, 12.0, 16.0, 16.0, 16.0]])  # k ∈ [4, 20]: room above for the label
    plain = viz.render_slices(volume, (15, 15, 15), [viewer.Overlay(low, RED, "solid")], scale=2,
                              crosshair=False)
    labelled = viz.render_slices(volume, (15, 15, 15), [viewer.Overlay(low, RED, "solid", ["3"], "top-left")],
                                 scale=2, crosshair=False)
    # the label sits just above the box's top-left corner: red digit pixels on a black plate
    left, top = int(np.floor((7 + 0.5) * 2)), int(np.floor((30 - 0.5 - 20) * 2))
    plate = labelled[top - 12: top, left: left + 12]
    assert _colour_mask(plate, RED).sum() > 10 and _colour_mask(plate, (0, 0, 0)).sum() > 10
    assert _colour_mask(plain[top - 12: top, left: left + 12], RED).sum() == 0
    assert np.array_equal(labelled[top:], plain[top:])  # nothing else changed below the label


def test_candidate_table_lists_ground_truth_and_candidates_with_distances():
    table = viz.candidate_table(FACE_VOX, _predictions(offset_vox=(3.0, 4.0, 0.0)), spacing_mm=2.0)
    assert len(table) == 15
    first = table[table["landmark"] == "left_eye"]
    assert first["kind"].tolist() == ["ground truth", "answer", "candidate"]
    assert np.isnan(first["distance_mm"].iloc[0])
    assert first["distance_mm"].iloc[1:].tolist() == pytest.approx([10.0, 12.0])  # 5 and 6 voxels × 2 mm
    np.testing.assert_allclose(first[["i", "j", "k"]].to_numpy(float)[0], FACE_VOX[0])
    assert table["#"].tolist() == sorted(table["#"].tolist())
    no_gt = viz.candidate_table(None, _predictions())
    assert len(no_gt) == 10 and no_gt["distance_mm"].isna().all()
    assert viz.candidate_table(FACE_VOX, None)["kind"].eq("ground truth").sum() == 5
    assert viz.candidate_table().empty


def _click(viewer_obj, axis, voxel, kind="click", **extra):
    x, y = viewer_obj.layout.voxel_to_pixel(axis, voxel)
    viewer_obj.handle_event({"event": kind, "dataX": x, "dataY": y, **extra})


def test_slice_viewer_events_navigate_like_a_medical_viewer():
    pytest.importorskip("ipyevents")
    case = _case()
    view = viz.SliceViewer.from_case(case, predictions=_predictions(case=case))
    start = view.point
    _click(view, 0, (start[0], 3, 25))  # a click in the sagittal plane sets j and k
    assert view.point == (start[0], 3, 25)
    _click(view, 2, (30, 1, 25))  # in the axial plane: i and j
    assert view.point == (30, 1, 25)
    _click(view, 1, (30, 1, 25), kind="wheel", deltaY=-100)  # wheel up over the coronal plane: j + 1
    assert view.point == (30, 2, 25) and view.active_axis == 1
    view.handle_event({"event": "keydown", "key": "ArrowDown"})  # keys step the plane under the mouse
    view.handle_event({"event": "keydown", "key": "ArrowDown"})
    assert view.point == (30, 0, 25)
    view.handle_event({"event": "keydown", "key": "ArrowDown"})  # clipped at the first slice
    assert view.point == (30, 0, 25)
    _click(view, 2, (4, 4, 25), kind="mousemove")  # moving the mouse moves no plane...
    assert view.point == (30, 0, 25) and view.active_axis == 2  # ...but chooses the keys' plane
    view.handle_event({"event": "keydown", "key": "PageUp"})
    assert view.point == (30, 0, 30)
    # between panels, or without a position: nothing happens
    gap_x = view.layout.panel(0)[4] + 1
    view.handle_event({"event": "click", "dataX": gap_x, "dataY": 0})
    view.handle_event({"event": "click"})
    assert view.point == (30, 0, 30)
    # the status line gives the crosshair's world position through the case's affine
    world = case.affine[:3, :3] @ np.array([30.0, 0.0, 30.0]) + case.affine[:3, 3]
    assert f"({world[0]:.1f}, {world[1]:.1f}, {world[2]:.1f}) mm" in view.status.value
    assert "mouse" in view.status.value


def test_slice_viewer_window_level_zoom_and_candidate_rows():
    pytest.importorskip("ipyevents")
    case = _case()
    view = viz.SliceViewer.from_case(case, predictions=_predictions(case=case))
    view.checkboxes["crosshair"].value = False
    view.checkboxes["labels"].value = False
    before = view.render()
    lo, hi = view.window
    view.set_window(lo + (hi - lo) / 2, hi + (hi - lo) / 2)  # a brighter level: the image darkens
    darker = view.render()
    assert darker.mean() < before.mean() - 20
    assert view.level_slider.value == pytest.approx((lo + hi) / 2 + (hi - lo) / 2)
    view.reset_window()
    assert np.array_equal(view.render(), before)

    scale = view.scale
    view.zoom.value = scale + 2  # nearest-neighbour zoom: every voxel a bigger block, same values
    zoomed = view.render()
    assert zoomed.shape[:2] == view.layout.size and view.image.layout.width == f"{zoomed.shape[1]}px"
    assert zoomed[:: scale + 2, : (scale + 2) * 32: scale + 2].shape[1] == 32
    np.testing.assert_array_equal(zoomed[0, : (scale + 2) * 32: scale + 2], before[0, : scale * 32: scale])

    n = view.candidates.index[(view.candidates["landmark"] == "chin")
                              & (view.candidates["kind"] == "candidate")][0]
    view.go_to_candidate(n)  # what a click on that table row does
    assert view.point == tuple(np.rint(FACE_VOX[4] + [0, 6, 0]).astype(int))
    assert "igrpn-row-here" in view.candidate_rows[n]._dom_classes
    view._row_events[0]._dom_handlers(({"event": "click"}))  # the first row's click handler
    assert view.point == tuple(np.rint(FACE_VOX[0]).astype(int))
    assert "igrpn-row-here" not in view.candidate_rows[n]._dom_classes


def test_save_viewer_screenshot_without_a_browser(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(viewer, "CHROMIUM", tmp_path / "no-chromium")
    assert viz.save_viewer_screenshot(tmp_path / "viewer.png") is None
    assert "Chromium not found" in capsys.readouterr().out
    assert not (tmp_path / "viewer.png").exists()


def test_slice_viewer_validates_input():
    pytest.importorskip("ipywidgets")
    with pytest.raises(ValueError, match=r"\(5, 3\)"):
        viz.SliceViewer(_volume(), gt_landmarks_vox=np.zeros((4, 3)))
    with pytest.raises(ValueError, match="missing columns"):
        viz.SliceViewer(_volume(), predictions=_predictions().drop(columns=["score"]))
    with pytest.raises(ValueError, match="3D"):
        viz.SliceViewer(np.zeros((4, 4)))


# ---------------------------------------------------------------------------- data helpers


def _tiny_manifest(folder, n_cases=2) -> "Path":
    """NIfTI volumes (noise, identity-like affine at 2 mm) and a manifest listing them."""
    import nibabel as nib

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    rows = []
    for n in range(n_cases):
        nib.save(nib.Nifti1Image(_volume(seed=n), affine), folder / f"case{n}.nii.gz")
        world = (FACE_VOX + n) * 2.0
        rows.append({"case_id": f"case{n}", "image": f"case{n}.nii.gz", "split": "test",
                     **{f"{name}_{axis}": world[i, a] for i, name in enumerate(config.LANDMARKS)
                        for a, axis in enumerate("xyz")}})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv"


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
    manifest = _tiny_manifest(tmp_path)
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


def test_manifest_browser_switches_cases(tmp_path):
    pytest.importorskip("ipywidgets")
    manifest = _tiny_manifest(tmp_path)
    browser = viz.browse_manifest(manifest, 2.0)
    assert browser.split.value == "test" and list(browser.case.options) == ["case0", "case1"]
    assert browser.viewer.title == "case0" and browser.widget.children[1] is browser.viewer.widget
    browser.case.value = "case1"
    assert browser.viewer.title == "case1"
    assert browser.viewer.point == tuple(np.rint(FACE_VOX.mean(axis=0) + 1).astype(int))


def test_slice_viewer_from_nifti_maps_world_positions(tmp_path):
    pytest.importorskip("ipywidgets")
    manifest = _tiny_manifest(tmp_path, n_cases=1)
    case = viz.load_demo_case(str(manifest), 2.0)
    predictions = _predictions(offset_vox=(0.0, 0.0, 2.0), case=case)
    viewer = viz.SliceViewer.from_nifti(tmp_path / "case0.nii.gz", spacing_mm=2.0,
                                        landmarks_mm=case.landmarks_mm, predictions=predictions)
    np.testing.assert_allclose(viewer.gt_landmarks_vox, FACE_VOX, atol=1e-6)
    assert viewer.summary()["distance_mm"].tolist() == pytest.approx([4.0] * 5)
    assert viewer.title == "case0.nii.gz"
    # world coordinates shown are the file's (mm): the ground truth's voxel maps back to its mm
    np.testing.assert_allclose(viewer.world_mm(np.rint(FACE_VOX[0])), case.landmarks_mm[0], atol=1e-6)
    viewer.set_point(FACE_VOX[0])
    x, y, z = case.landmarks_mm[0]
    assert f"({x:.1f}, {y:.1f}, {z:.1f}) mm" in viewer.status.value

    # a user's own volume, shifted and with no landmarks nor predictions: still a working viewer
    import nibabel as nib

    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    nib.save(nib.Nifti1Image(_volume((20, 24, 10)), affine), tmp_path / "own.nii")
    own = viz.SliceViewer.from_nifti(tmp_path / "own.nii")  # resampled to 1.5 mm voxels
    assert own.spacing_mm == 1.5 and own.point == tuple(np.rint((np.asarray(own.shape) - 1) / 2).astype(int))
    assert own.candidates.empty and len(own.candidate_rows) == 0
    np.testing.assert_allclose(own.world_mm((0, 0, 0)), own.affine[:3, 3])
    # in the file's world: along k its first 3 mm voxel (centre 30 mm) holds two 1.5 mm ones
    np.testing.assert_allclose(own.world_mm((0, 0, 0)), [10.0, -20.0, 29.25], atol=1e-6)
    with pytest.raises(ValueError, match="file not found"):
        viz.SliceViewer.from_nifti(tmp_path / "absent.nii.gz")
