"""The numpy slice renderer and the ipywidgets slice viewer, on tiny synthetic volumes."""

from __future__ import annotations

import io

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pytest
from viz_fixtures import BLUE, FACE_VOX, RED, colour_mask, face_case, face_predictions, random_volume, tiny_manifest

from igrpn import viz
from igrpn.viz import browser


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
    rows, cols = np.nonzero(colour_mask(boxed[:, :16], RED))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (10, 15, 2, 7)
    assert not colour_mask(boxed[12:14, 4:6], RED).any()  # a 2-pixel outline, not a filled square
    missed = viz.render_slices(volume, (4, 2, 3), [(box, RED, False)], scale=2, crosshair=False)
    assert colour_mask(missed[:, :16], RED).sum() == 0  # i = 4 misses the box (i ∈ [−0.5, 2.5])
    assert colour_mask(missed[:, 16:], RED).sum() > 0   # the other planes still cut it


def test_slice_viewer_redraws_and_shows_boxes():
    pytest.importorskip("ipywidgets")
    case = face_case()
    viewer = viz.SliceViewer.from_case(case, predictions=face_predictions(case=case))
    assert viewer.point == tuple(np.rint(FACE_VOX.mean(axis=0)).astype(int))
    first = viewer.render()
    assert colour_mask(first, RED).sum() > 0 and colour_mask(first, BLUE).sum() > 0
    assert "igrpn-slices" in viewer.image._dom_classes
    assert viewer.image.layout.width == f"{first.shape[1]}px" and viewer.image.layout.height == f"{first.shape[0]}px"
    assert {"igrpn-slider", "igrpn-slider-i"} <= set(viewer.sliders[0]._dom_classes)
    png = viewer.image.value

    viewer.sliders[0].value = 0  # far from every box
    moved = viewer.render()
    assert not np.array_equal(moved, first) and viewer.image.value != png
    assert colour_mask(moved[:, : 32 * viewer.scale], RED).sum() == 0  # the sagittal panel is empty

    viewer.checkboxes["gt"].value = False
    viewer.set_point(FACE_VOX[4])
    hidden = viewer.render()
    assert colour_mask(hidden, RED).sum() == 0 and colour_mask(hidden, BLUE).sum() > 0

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
    layout = viz.PanelLayout(shape, scale, gap=4)
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
        layout = viz.PanelLayout(shape, scale)
        assert image.shape[:2] == layout.size
        for axis, voxel in ((0, (3, 6, 0)), (1, (4, 2, 5)), (2, (0, 0, 4))):
            x, y = layout.voxel_to_pixel(axis, voxel)
            assert image[y, x, 0] == volume[voxel]
            assert layout.pixel_to_voxel(x, y, point) == (axis, voxel)


def test_window_level_mapping():
    assert viz.window_level(-1.0, 3.0) == (4.0, 1.0)
    assert viz.window_range(4.0, 1.0) == (-1.0, 3.0)
    lo, hi = viz.window_range(0.0, 2.0)  # a zero width stays a valid range
    assert lo < 2.0 < hi
    grey = viz.apply_window(np.array([-5.0, 10.0, 15.0, 20.0, 99.0]), 10.0, 20.0)
    assert grey.dtype == np.uint8 and grey.tolist() == [0, 0, 128, 255, 255]
    # a narrower window around the same level spreads the same intensities further apart
    values = np.array([14.0, 16.0])
    assert np.ptp(viz.apply_window(values, 13.0, 17.0).astype(int)) > np.ptp(
        viz.apply_window(values, 10.0, 20.0).astype(int))
    assert viz.nice_step(0.0123) == pytest.approx(0.02) and viz.nice_step(3.0) == 5.0
    assert viz.nice_step(0.01) == pytest.approx(0.01)
    assert viz.snap(0.337, 0.02) == pytest.approx(0.34)


def test_wheel_and_key_steps():
    assert [viz.wheel_step(d) for d in (-120, -3, 0, 4, 100)] == [1, 1, 0, -1, -1]
    keys = ("ArrowUp", "ArrowRight", "ArrowDown", "ArrowLeft", "PageUp", "PageDown", "a", None)
    assert [viz.key_step(k) for k in keys] == [1, 1, -1, -1, 5, -5, 0, 0]
    assert viz.step_point((3, 4, 5), 2, 1, (10, 10, 6)) == (3, 4, 5)  # clipped at the last slice
    assert viz.step_point((3, 4, 5), 0, -5, (10, 10, 6)) == (0, 4, 5)
    assert viz.step_point((3, 4, 5), 1, 2, (10, 10, 6)) == (3, 6, 5)


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
        image = viz.render_slices(volume, (15, 15, 15), [viz.Overlay(box, RED, style)], scale=2,
                                  crosshair=False)
        mask = colour_mask(image[:, :60], RED)
        top = np.flatnonzero(mask.any(axis=1))[0]
        runs[style] = _top_edge_runs(mask[top])
    assert len(runs["solid"]) == 1 and runs["solid"][0] == 40  # 20 voxels × 2 pixels
    assert set(runs["dashed"][:-1]) == {8} and len(runs["dashed"]) > 3
    assert set(runs["dotted"][:-1]) == {2} and len(runs["dotted"]) > 6
    # a (boxes, colour, dashed) tuple still draws dashes
    legacy = viz.render_slices(volume, (15, 15, 15), [(box, RED, True)], scale=2, crosshair=False)
    assert len(_top_edge_runs(colour_mask(legacy[:, :60], RED)[np.flatnonzero(
        colour_mask(legacy[:, :60], RED).any(axis=1))[0]])) > 3

    low = np.array([[15.0, 15.0, 12.0, 16.0, 16.0, 16.0]])  # k ∈ [4, 20]: room above for the label
    plain = viz.render_slices(volume, (15, 15, 15), [viz.Overlay(low, RED, "solid")], scale=2,
                              crosshair=False)
    labelled = viz.render_slices(volume, (15, 15, 15), [viz.Overlay(low, RED, "solid", ["3"], "top-left")],
                                 scale=2, crosshair=False)
    # the label sits just above the box's top-left corner: red digit pixels on a black plate
    left, top = int(np.floor((7 + 0.5) * 2)), int(np.floor((30 - 0.5 - 20) * 2))
    plate = labelled[top - 12: top, left: left + 12]
    assert colour_mask(plate, RED).sum() > 10 and colour_mask(plate, (0, 0, 0)).sum() > 10
    assert colour_mask(plain[top - 12: top, left: left + 12], RED).sum() == 0
    assert np.array_equal(labelled[top:], plain[top:])  # nothing else changed below the label


def test_candidate_table_lists_ground_truth_and_candidates_with_distances():
    table = viz.candidate_table(FACE_VOX, face_predictions(offset_vox=(3.0, 4.0, 0.0)), spacing_mm=2.0)
    assert len(table) == 15
    first = table[table["landmark"] == "left_eye"]
    assert first["kind"].tolist() == ["ground truth", "answer", "candidate"]
    assert np.isnan(first["distance_mm"].iloc[0])
    assert first["distance_mm"].iloc[1:].tolist() == pytest.approx([10.0, 12.0])  # 5 and 6 voxels × 2 mm
    np.testing.assert_allclose(first[["i", "j", "k"]].to_numpy(float)[0], FACE_VOX[0])
    assert table["#"].tolist() == sorted(table["#"].tolist())
    no_gt = viz.candidate_table(None, face_predictions())
    assert len(no_gt) == 10 and no_gt["distance_mm"].isna().all()
    assert viz.candidate_table(FACE_VOX, None)["kind"].eq("ground truth").sum() == 5
    assert viz.candidate_table().empty


def _click(viewer_obj, axis, voxel, kind="click", **extra):
    x, y = viewer_obj.layout.voxel_to_pixel(axis, voxel)
    viewer_obj.handle_event({"event": kind, "dataX": x, "dataY": y, **extra})


def test_slice_viewer_events_navigate_like_a_medical_viewer():
    pytest.importorskip("ipyevents")
    case = face_case()
    view = viz.SliceViewer.from_case(case, predictions=face_predictions(case=case))
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
    case = face_case()
    view = viz.SliceViewer.from_case(case, predictions=face_predictions(case=case))
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
    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "no-chromium")  # read by browser_missing
    assert viz.save_viewer_screenshot(tmp_path / "viewer.png") is None
    assert "Chromium not found" in capsys.readouterr().out
    assert not (tmp_path / "viewer.png").exists()


def test_slice_viewer_validates_input():
    pytest.importorskip("ipywidgets")
    with pytest.raises(ValueError, match=r"\(5, 3\)"):
        viz.SliceViewer(random_volume(), gt_landmarks_vox=np.zeros((4, 3)))
    with pytest.raises(ValueError, match="missing columns"):
        viz.SliceViewer(random_volume(), predictions=face_predictions().drop(columns=["score"]))
    with pytest.raises(ValueError, match="3D"):
        viz.SliceViewer(np.zeros((4, 4)))


def test_manifest_browser_switches_cases(tmp_path):
    pytest.importorskip("ipywidgets")
    manifest = tiny_manifest(tmp_path)
    browser = viz.browse_manifest(manifest, 2.0)
    assert browser.split.value == "test" and list(browser.case.options) == ["case0", "case1"]
    assert browser.viewer.title == "case0" and browser.widget.children[1] is browser.viewer.widget
    browser.case.value = "case1"
    assert browser.viewer.title == "case1"
    assert browser.viewer.point == tuple(np.rint(FACE_VOX.mean(axis=0) + 1).astype(int))


def test_slice_viewer_from_nifti_maps_world_positions(tmp_path):
    pytest.importorskip("ipywidgets")
    manifest = tiny_manifest(tmp_path, n_cases=1)
    case = viz.load_demo_case(str(manifest), 2.0)
    predictions = face_predictions(offset_vox=(0.0, 0.0, 2.0), case=case)
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
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    nib.save(nib.Nifti1Image(random_volume((20, 24, 10)), affine), tmp_path / "own.nii")
    own = viz.SliceViewer.from_nifti(tmp_path / "own.nii")  # resampled to 1.5 mm voxels
    assert own.spacing_mm == 1.5 and own.point == tuple(np.rint((np.asarray(own.shape) - 1) / 2).astype(int))
    assert own.candidates.empty and len(own.candidate_rows) == 0
    np.testing.assert_allclose(own.world_mm((0, 0, 0)), own.affine[:3, 3])
    # in the file's world: along k its first 3 mm voxel (centre 30 mm) holds two 1.5 mm ones
    np.testing.assert_allclose(own.world_mm((0, 0, 0)), [10.0, -20.0, 29.25], atol=1e-6)
    with pytest.raises(ValueError, match="file not found"):
        viz.SliceViewer.from_nifti(tmp_path / "absent.nii.gz")
