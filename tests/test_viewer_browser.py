"""The slice viewer served by Voilà and driven in a real browser (headless system Chromium).

Serves a parameterised copy of ``notebooks/viewer.ipynb`` (a one-volume synthetic data set and a
predictions CSV fabricated from its ground truth — only for this test), moves a slider with the
keyboard and compares screenshots of the image widget: the displayed planes change and the
boxes' colours (red ground truth, blue predictions) are on screen.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "viewer.ipynb"
CHROMIUM = Path("/usr/lib/chromium/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--no-first-run"]
VOILA = Path(sys.executable).with_name("voila")
PROFILE = "smoke"


def _missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    if not CHROMIUM.exists():
        return f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright; no browser download needed)"
    if not VOILA.exists() and shutil.which("voila") is None:
        return "voila is not installed (pip install voila)"
    return None


if _missing():
    pytest.skip(_missing(), allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_inputs(folder: Path) -> tuple[Path, tuple[int, int, int]]:
    """A one-volume data set, a fabricated predictions CSV and a parameterised viewer notebook.

    The volume is noise with a bright blob at each landmark, written as NIfTI and listed in a
    manifest, so the served notebook takes the real path (manifest → ``load_case`` → viewer).
    The predictions (each answer 1.5 voxels from its ground truth, a second candidate 6 voxels
    away) are made up from the ground truth, only for this test.

    Returns:
        (the notebook's path, the shape of the volume it shows).
    """
    import nbformat
    import nibabel as nib
    import pandas as pd
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from igrpn import config, data

    spacing = config.get_profile(PROFILE).spacing_mm
    shape = (36, 40, 32)  # not a cube, so the three panels differ in width
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = [-90.0, -100.0, -80.0]
    landmarks_vox = np.array([[21, 22, 18], [18, 23, 20], [15, 22, 18], [18, 26, 14], [18, 23, 9]], float)
    volume = np.random.default_rng(0).normal(100, 20, size=shape)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    for point in landmarks_vox:
        volume += 150 * np.exp(-((grid - point) ** 2).sum(-1) / 4.0)
    nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), folder / "case0.nii.gz")
    landmarks_mm = data.voxel_to_world(landmarks_vox, affine)
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
    pd.DataFrame(rows).to_csv(folder / "report" / "predictions" / "rpn_ib_prior.csv", index=False)

    notebook = parameterize_notebook(load_notebook_node(str(NOTEBOOK)), {
        "profile": PROFILE, "manifest": str(folder / "manifest.csv"), "report_dir": str(folder / "report"),
        "method": "rpn_ib", "split": "test", "case_index": 0})
    path = folder / "viewer.ipynb"
    nbformat.write(notebook, path)
    return path, case.volume.shape


@pytest.fixture
def voila_url(tmp_path):
    """Serve the parameterised viewer with Voilà on a free port; stop its process group after.

    Yields:
        (base URL, shape of the displayed volume).
    """
    notebook, shape = _write_inputs(tmp_path)
    port = _free_port()
    log = open(tmp_path / "voila.log", "wb")
    voila = str(VOILA) if VOILA.exists() else shutil.which("voila")
    process = subprocess.Popen(
        [voila, str(notebook), f"--port={port}", "--no-browser", "--Voila.ip=127.0.0.1",
         "--VoilaConfiguration.extension_denylist=['@jupyter-notebook/lab-extension']"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "JUPYTER_PLATFORM_DIRS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # any HTTP answer from a static URL means the server is up
            if process.poll() is not None:
                pytest.fail(f"voila exited with {process.returncode}:\n{(tmp_path / 'voila.log').read_text()}")
            try:
                urllib.request.urlopen(f"{url}/voila/static/x", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("voila did not answer within 60 s")
                time.sleep(0.3)
        yield url, shape
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the kernel it started
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def _screenshot(locator) -> np.ndarray:
    import matplotlib.image as mpimg

    return np.rint(mpimg.imread(io.BytesIO(locator.screenshot()), format="png")[..., :3] * 255).astype(int)


def _pixels(image: np.ndarray, colour, tolerance: int = 40) -> int:
    return int((np.abs(image - np.asarray(colour)) <= tolerance).all(axis=-1).sum())


def test_slider_redraws_the_planes_in_the_browser(voila_url):
    from playwright.sync_api import sync_playwright

    from igrpn import viz

    base_url, shape = voila_url

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            # only the local server: Voilà's page asks a CDN for a font
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base_url)
                       else route.abort())
            page.goto(f"{base_url}/", timeout=60_000)
            image = page.locator(".igrpn-slices img, img.igrpn-slices").first
            image.wait_for(state="visible", timeout=60_000)
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
            before = _screenshot(image)
            source = image.get_attribute("src")

            handle = page.locator(".igrpn-slider-i .noUi-handle")
            start = int(float(handle.get_attribute("aria-valuenow")))
            handle.focus()
            page.keyboard.press("Home")  # plane i to 0: one step, one redraw
            page.wait_for_function(
                "([img, old]) => img.src !== old && img.complete && img.naturalWidth > 0",
                arg=[image.element_handle(), source], timeout=20_000)
            assert int(float(handle.get_attribute("aria-valuenow"))) == 0 != start
            after = _screenshot(image)
        finally:
            browser.close()

    # the image is shown at its natural size: the sagittal panel (j × k) is the first Y·scale columns
    scale = max(1, 256 // max(shape))
    assert before.shape == after.shape
    assert before.shape[1] == (shape[1] + 2 * shape[0]) * scale + 2 * 4
    sagittal_width = shape[1] * scale
    assert np.abs(before[:, :sagittal_width] - after[:, :sagittal_width]).mean() > 2.0
    # the planes through the face centre cut ground-truth (red) and predicted (blue) boxes
    assert _pixels(before, viz.BOX_COLOURS["gt"]) > 50
    assert _pixels(before, viz.BOX_COLOURS["pred"]) > 50
    # at i = 0 the sagittal plane misses every box; the two other planes still cut them
    assert _pixels(after[:, :sagittal_width], viz.BOX_COLOURS["gt"]) == 0
    assert _pixels(after[:, sagittal_width:], viz.BOX_COLOURS["gt"]) > 50
