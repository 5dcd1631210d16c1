"""The slice viewer served by Voilà and driven in a real browser (headless system Chromium).

Serves a parameterised copy of ``notebooks/viewer.ipynb`` (a one-volume synthetic data set and a
predictions CSV fabricated from its ground truth — only for this test) through the library's own
path (``igrpn.viz.browser.serve_voila`` / ``chromium_page``), and drives it as a user would: a slider
moved with the keyboard, a click at a known pixel of one plane, the mouse wheel and the arrow
keys over a plane, the window / level controls and their reset, a click on a row of the
candidate table; and ``save_viewer_screenshot`` writes a picture of the page. One test runs the
same notebook in JupyterLab and clicks a plane there.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from igrpn import config, data, viz
from igrpn.viz import browser

pytestmark = pytest.mark.browser

if browser.browser_missing():
    pytest.skip(browser.browser_missing(), allow_module_level=True)

PROFILE = "smoke"
SHAPE = (36, 40, 32)  # not a cube, so the three panels differ in width
LANDMARKS_VOX = np.array([[21, 22, 18], [18, 23, 20], [15, 22, 18], [18, 26, 14], [18, 23, 9]], float)


def _write_inputs(folder):
    """A one-volume data set, a fabricated predictions CSV and a parameterised viewer notebook.

    The volume is noise with a bright blob at each landmark, written as NIfTI and listed in a
    manifest, so the served notebook takes the real path (manifest → ``load_case`` → viewer).
    The predictions (each answer 1.5 voxels from its ground truth, a second candidate 6 voxels
    away) are made up from the ground truth, only for this test.

    Returns:
        (the notebook's path, the ``Case`` it shows, the predictions, the parameters).
    """
    spacing = config.get_profile(PROFILE).spacing_mm
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-90.0, -100.0, -80.0]
    volume = np.random.default_rng(0).normal(100, 20, size=SHAPE)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1)
    for point in LANDMARKS_VOX:
        volume += 150 * np.exp(-((grid - point) ** 2).sum(-1) / 4.0)
    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), folder / "case0.nii.gz")
    landmarks_mm = data.voxel_to_world(LANDMARKS_VOX, affine)
    row = {"case_id": "case0", "image": "case0.nii.gz", "split": "test"}
    row.update({f"{name}_{axis}": landmarks_mm[n, a] for n, name in enumerate(config.LANDMARKS)
                for a, axis in enumerate("xyz")})
    pd.DataFrame([row]).to_csv(folder / "manifest.csv", index=False)
    case = data.load_case(data.read_manifest(folder / "manifest.csv").iloc[0], spacing)

    rows = []
    for n, name in enumerate(config.LANDMARKS):
        for rank, offset in enumerate(([1.5, 0.0, 0.0], [0.0, 6.0, 0.0])):
            voxel = case.landmarks_vox[n] + offset
            world = data.voxel_to_world(voxel, case.affine)
            rows.append({"case_id": case.case_id, "landmark": name, "class_id": n + 1, "rank": rank,
                         "selected": rank == 0, "score": 0.9 - 0.4 * rank, "x": world[0], "y": world[1],
                         "z": world[2], "i": voxel[0], "j": voxel[1], "k": voxel[2],
                         "w": config.GT_BOX_MM[n], "h": config.GT_BOX_MM[n], "d": config.GT_BOX_MM[n]})
    (folder / "report" / "predictions").mkdir(parents=True)
    predictions = pd.DataFrame(rows)
    predictions.to_csv(folder / "report" / "predictions" / "rpn_ib_prior.csv", index=False)
    parameters = {"profile": PROFILE, "manifest": str(folder / "manifest.csv"),
                  "report_dir": str(folder / "report"), "method": "rpn_ib", "split": "test", "case_index": 0}
    return browser.viewer_notebook(folder, **parameters), case, predictions, parameters


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The parameterised viewer served by Voilà for the whole module (each page: a new kernel).

    Yields:
        ``(base URL, case, predictions, parameters)``.
    """
    folder = tmp_path_factory.mktemp("viewer")
    notebook, case, predictions, parameters = _write_inputs(folder)
    with browser.serve_voila(notebook) as url:
        yield url, case, predictions, parameters


@pytest.fixture
def page(served):
    """A fresh browser page on the served viewer, its image drawn; yields (page, image, served)."""
    url = served[0]
    with browser.chromium_page(url) as page:
        image = browser.open_viewer_page(page, url)
        yield page, image, served


def _screenshot(locator) -> np.ndarray:
    return np.rint(mpimg.imread(io.BytesIO(locator.screenshot()), format="png")[..., :3] * 255).astype(int)


def _pixels(image: np.ndarray, colour, tolerance: int = 40) -> int:
    return int((np.abs(image - np.asarray(colour)) <= tolerance).all(axis=-1).sum())


def _layout(case) -> viz.PanelLayout:
    """Where the planes lie in the image at the viewer's default zoom (display_size 320)."""
    return viz.PanelLayout(case.volume.shape, max(1, 320 // max(case.volume.shape)))


def _slider_values(page) -> tuple[int, int, int]:
    return tuple(int(float(page.locator(f".igrpn-slider-{letter} .noUi-handle").get_attribute("aria-valuenow")))
                 for letter in "ijk")


def _wait_for_point(page, point, timeout_ms: int = 60_000) -> None:
    """Wait until the three sliders read ``point`` (the kernel has answered the event)."""
    page.wait_for_function(
        """target => ['i', 'j', 'k'].every((letter, n) => {
               const handle = document.querySelector(`.igrpn-slider-${letter} .noUi-handle`);
               return handle && Math.round(Number(handle.getAttribute('aria-valuenow'))) === target[n];
           })""", arg=[int(v) for v in point], timeout=timeout_ms)


def _wait_for_redraw(page, image, old_source: str, timeout_ms: int = 60_000) -> None:
    page.wait_for_function("([img, old]) => img.src !== old && img.complete && img.naturalWidth > 0",
                           arg=[image.element_handle(), old_source], timeout=timeout_ms)


def test_slider_redraws_the_planes_in_the_browser(page):
    page, image, (_, case, _, _) = page
    before = _screenshot(image)
    source = image.get_attribute("src")
    handle = page.locator(".igrpn-slider-i .noUi-handle")
    start = int(float(handle.get_attribute("aria-valuenow")))
    handle.focus()
    page.keyboard.press("Home")  # plane i to 0: one step, one redraw
    _wait_for_redraw(page, image, source)
    assert int(float(handle.get_attribute("aria-valuenow"))) == 0 != start
    after = _screenshot(image)

    # the image is shown at its natural size (no resampling): the layout's size (a fractional
    # position on the page may add one row to the element's screenshot)
    layout = _layout(case)
    assert before.shape == after.shape and before.shape[1] == layout.size[1]
    assert layout.size[0] <= before.shape[0] <= layout.size[0] + 1
    sagittal_width = layout.panel(0)[4]
    assert np.abs(before[:, :sagittal_width] - after[:, :sagittal_width]).mean() > 2.0
    # the planes through the face centre cut ground-truth (red) and predicted (blue) boxes
    assert _pixels(before, viz.BOX_COLOURS["gt"]) > 50
    assert _pixels(before, viz.BOX_COLOURS["pred"]) > 50
    # at i = 0 the sagittal plane misses every box; the two other planes still cut them
    assert _pixels(after[:, :sagittal_width], viz.BOX_COLOURS["gt"]) == 0
    assert _pixels(after[:, sagittal_width:], viz.BOX_COLOURS["gt"]) > 50


def test_click_in_one_plane_moves_the_other_two(page):
    page, image, (_, case, _, _) = page
    start = _slider_values(page)
    target = (start[0], 5, 7)  # a voxel of the sagittal plane (i fixed): j = 5, k = 7
    x, y = _layout(case).voxel_to_pixel(0, target)
    image.click(position={"x": x, "y": y})
    _wait_for_point(page, target)
    assert _slider_values(page) == target
    # the status line gives the new crosshair's world position through the case's affine (mm)
    world = case.affine[:3, :3] @ np.asarray(target, float) + case.affine[:3, 3]
    status = page.locator(".igrpn-status").inner_text()
    assert f"({world[0]:.1f}, {world[1]:.1f}, {world[2]:.1f}) mm" in status

    # a click in the axial plane (k fixed) moves i and j and leaves k
    second = (30, 2, 7)
    x, y = _layout(case).voxel_to_pixel(2, second)
    image.click(position={"x": x, "y": y})
    _wait_for_point(page, second)


def test_wheel_and_arrow_keys_step_the_plane_under_the_mouse(page):
    page, image, (_, case, _, _) = page
    i, j, k = _slider_values(page)
    x, y = _layout(case).voxel_to_pixel(2, (i, j, k))  # over the axial panel
    image.hover(position={"x": x, "y": y})
    page.mouse.wheel(0, -100)  # wheel up: the next slice
    _wait_for_point(page, (i, j, k + 1))
    page.mouse.wheel(0, 100)
    page.mouse.wheel(0, 100)
    _wait_for_point(page, (i, j, k - 1))
    page.keyboard.press("ArrowUp")  # the keys step the plane under the mouse too
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowUp")
    _wait_for_point(page, (i, j, k + 2))
    x, y = _layout(case).voxel_to_pixel(1, (i, j, k + 2))  # now over the coronal panel
    image.hover(position={"x": x, "y": y})
    page.keyboard.press("PageDown")
    _wait_for_point(page, (i, j - 5, k + 2))


def test_window_level_changes_the_intensities_and_resets(page):
    page, image, (_, case, _, _) = page
    layout = _layout(case)
    sagittal = (slice(0, case.volume.shape[2] * layout.scale), slice(0, layout.panel(0)[4]))
    before = _screenshot(image)
    source = image.get_attribute("src")
    handle = page.locator(".igrpn-level .noUi-handle")
    handle.focus()
    page.keyboard.press("End")  # level to the volume's maximum: almost everything below the window
    _wait_for_redraw(page, image, source)
    darker = _screenshot(image)
    assert darker[sagittal].mean() < before[sagittal].mean() - 30

    source = image.get_attribute("src")
    page.locator(".igrpn-wl-reset button, button.igrpn-wl-reset").first.click()
    _wait_for_redraw(page, image, source)
    assert np.array_equal(_screenshot(image), before)  # the default window again, pixel for pixel

    source = image.get_attribute("src")
    handle = page.locator(".igrpn-window .noUi-handle")
    handle.focus()
    page.keyboard.press("Home")  # the narrowest window: nearly black and white
    _wait_for_redraw(page, image, source)
    narrow = _screenshot(image)[sagittal][..., 0]
    grey = before[sagittal][..., 0]
    extreme = lambda values: np.mean((values < 10) | (values > 245))  # noqa: E731
    assert extreme(narrow) > extreme(grey) + 0.2


def test_candidate_row_moves_the_planes_to_its_centre(page):
    page, image, (_, case, predictions, _) = page
    # the table as the served notebook builds it (predictions re-expressed on the case's grid)
    table = viz.SliceViewer.from_case(case, predictions=predictions).candidates
    spacing = float(viz.voxel_spacing(case.affine).mean())
    # the nose tip's second candidate: 6 voxels from its ground truth along j
    n = table.index[(table["landmark"] == "nose_tip") & (table["kind"] == "candidate")][0]
    centre = tuple(int(v) for v in np.rint(table.loc[n, ["i", "j", "k"]].to_numpy(float)))
    assert centre != _slider_values(page)
    row = page.locator(f".igrpn-candidate-{n}")
    assert f"{6 * spacing:.1f}" in row.inner_text()  # its distance to the GT, mm
    row.click()
    _wait_for_point(page, centre)
    # the row of the ground truth itself leads back to the landmark
    gt_row = table.index[(table["landmark"] == "nose_tip") & (table["kind"] == "ground truth")][0]
    page.locator(f".igrpn-candidate-{gt_row}").click()
    _wait_for_point(page, tuple(int(v) for v in np.rint(case.landmarks_vox[3])))


def test_save_viewer_screenshot_writes_the_page(served, tmp_path):
    _, case, _, parameters = served
    path = browser.save_viewer_screenshot(
        tmp_path / "figures" / "viewer.png", profile=parameters["profile"], manifest=parameters["manifest"],
        report_dir=parameters["report_dir"], method=parameters["method"])
    assert path == tmp_path / "figures" / "viewer.png" and path.exists()
    picture = np.rint(mpimg.imread(path)[..., :3] * 255).astype(int)
    # the whole widget: wider than the planes, taller than planes + controls, boxes of both kinds
    height, width = _layout(case).size
    assert picture.shape[1] >= width and picture.shape[0] > height + 200
    assert _pixels(picture, viz.BOX_COLOURS["gt"]) > 50 and _pixels(picture, viz.BOX_COLOURS["pred"]) > 50


@contextlib.contextmanager
def _serve_jupyterlab(folder: Path):
    """JupyterLab on a free port over ``folder`` (no token; the app exposed as window.jupyterapp)."""
    port = browser.free_port()
    log_path = folder / "lab.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("jupyter")), "lab", "--no-browser", f"--port={port}",
             "--ServerApp.ip=127.0.0.1", "--allow-root", "--IdentityProvider.token=", "--ServerApp.password=",
             f"--ServerApp.root_dir={folder}", "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "JUPYTER_PLATFORM_DIRS": "1", "JUPYTERLAB_WORKSPACES_DIR": str(folder / "workspaces"),
                 "JUPYTER_CONFIG_DIR": str(folder / "config")})
        url = f"http://127.0.0.1:{port}"
        try:
            browser.wait_for_server(url, process, log_path, 60)
            yield url
        finally:
            os.killpg(process.pid, signal.SIGTERM)  # the server and its kernel
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_the_viewer_works_in_jupyterlab_too(tmp_path):
    notebook, case, _, _ = _write_inputs(tmp_path)
    with _serve_jupyterlab(tmp_path) as url, browser.chromium_page(url) as page:
        page.goto(f"{url}/lab/tree/{notebook.name}", timeout=60_000)
        # the kernel is up (status bar "Idle"), then run every cell as a user would
        page.wait_for_function("""() => window.jupyterapp && [...document.querySelectorAll('.jp-StatusBar-TextItem')]
                                      .some(item => item.textContent.includes('Idle'))""", timeout=90_000)
        page.locator(".jp-Notebook .jp-Cell").first.click()
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        image = page.locator(".igrpn-slices img, img.igrpn-slices").first
        image.wait_for(state="visible", timeout=120_000)
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
        start = _slider_values(page)
        target = (start[0], 5, 7)
        x, y = _layout(case).voxel_to_pixel(0, target)
        image.click(position={"x": x, "y": y})  # ipyevents' front end works in JupyterLab as well
        _wait_for_point(page, target)
        x, y = _layout(case).voxel_to_pixel(2, target)
        image.hover(position={"x": x, "y": y})
        page.mouse.wheel(0, -100)
        _wait_for_point(page, (target[0], target[1], target[2] + 1))
        # the arrow keys reach the viewer, not JupyterLab's own shortcuts (ArrowUp: cell above)
        page.keyboard.press("ArrowUp")
        _wait_for_point(page, (target[0], target[1], target[2] + 2))
