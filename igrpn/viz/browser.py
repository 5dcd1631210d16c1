"""The viewer page in a real browser: Voilà serves ``notebooks/viewer.ipynb``, headless Chromium shows it.

``serve_voila`` runs a Voilà server for one notebook on a free local port, ``chromium_page`` opens
a headless page of the system Chromium through Playwright (its own browser download is not used),
``viewer_notebook`` writes the viewer notebook with its parameters set and ``open_viewer_page``
waits for the image. ``save_viewer_screenshot`` combines them to photograph the viewer as a
reader would see it; the browser tests drive the same page. ``browser_missing`` says what is not
installed for this.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from igrpn.config import REPO_ROOT

# playwright (optional: ``browser_missing`` reports it) and papermill / nbformat (seconds to import)
# are imported inside the functions that use them, so that ``import igrpn.viz`` stays light.

__all__ = [
    "REPO_ROOT",
    "VIEWER_NOTEBOOK",
    "CHROMIUM",
    "CHROMIUM_FLAGS",
    "browser_missing",
    "serve_voila",
    "chromium_page",
    "viewer_notebook",
    "open_viewer_page",
    "save_viewer_screenshot",
    "free_port",
    "wait_for_server",
]

VIEWER_NOTEBOOK = REPO_ROOT / "notebooks" / "viewer.ipynb"
#: Debian's Chromium; Playwright drives it (its own browser download is not used).
CHROMIUM = Path("/usr/lib/chromium/chromium")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--no-first-run")


def _voila_command() -> str | None:
    beside = Path(sys.executable).with_name("voila")
    return str(beside) if beside.exists() else shutil.which("voila")


def browser_missing() -> str | None:
    """Why the viewer page cannot be opened in a browser here (with the fix), or ``None``."""
    if not CHROMIUM.exists():
        return f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright; no browser download needed)"
    if _voila_command() is None:
        return "voila is not installed (pip install voila)"
    if importlib.util.find_spec("ipyevents") is None:
        return "ipyevents is not installed (pip install ipyevents)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    """Return once ``url`` answers over HTTP; ``RuntimeError`` if the server exits or is late."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"voila exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            # in single-notebook mode /api answers 403 and / starts a kernel: ask a static URL,
            # and take any HTTP answer, 404 included, as "up"
            urllib.request.urlopen(f"{url}/voila/static/x", timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"voila did not answer within {timeout_s:.0f} s:\n{log_path.read_text()}")
            time.sleep(0.3)


@contextlib.contextmanager
def serve_voila(notebook, timeout_s: float = 60.0):
    """Serve one notebook with Voilà on a free local port; stop the server and its kernels after.

    Args:
        notebook: the ``.ipynb`` to serve; Voilà's log goes to ``voila.log`` beside it.
        timeout_s: how long to wait for the server to answer (s).

    Yields:
        The base URL (``http://127.0.0.1:PORT``).
    """
    notebook = Path(notebook)
    port = free_port()
    log_path = notebook.with_name("voila.log")
    with open(log_path, "wb") as log:
        # its own process group, so that stopping the group stops the kernels it started too
        process = subprocess.Popen(
            [_voila_command(), str(notebook), f"--port={port}", "--no-browser", "--Voila.ip=127.0.0.1",
             "--VoilaConfiguration.extension_denylist=['@jupyter-notebook/lab-extension']"],
            cwd=notebook.parent, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "JUPYTER_PLATFORM_DIRS": "1"})
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_server(url, process, log_path, timeout_s)
            yield url
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@contextlib.contextmanager
def chromium_page(base_url: str, width: int = 1400, height: int = 1100):
    """A headless Chromium page (Playwright) that may load only from ``base_url``.

    Voilà's page asks a CDN for a font; every other URL is refused so that nothing waits on a
    network this machine may not have.

    Yields:
        A ``playwright.sync_api.Page`` of ``width`` × ``height`` CSS pixels.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_FLAGS))
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base_url)
                       else route.abort())
            yield page
        finally:
            browser.close()


def viewer_notebook(folder, **parameters) -> Path:
    """Write ``notebooks/viewer.ipynb`` with its ``parameters`` cell set (papermill) into ``folder``.

    Paths among the parameters should be absolute: the copy is served from ``folder``.

    Returns:
        The written notebook's path.
    """
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    notebook = parameterize_notebook(load_notebook_node(str(VIEWER_NOTEBOOK)), parameters)
    path = Path(folder) / "viewer.ipynb"
    nbformat.write(notebook, path)
    return path


def open_viewer_page(page, base_url: str, timeout_ms: int = 60_000):
    """Load the served viewer and wait until its image is drawn; returns the image's locator."""
    page.goto(f"{base_url}/", timeout=timeout_ms)
    image = page.locator(".igrpn-slices img, img.igrpn-slices").first
    image.wait_for(state="visible", timeout=timeout_ms)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                           timeout=timeout_ms)
    return image


def save_viewer_screenshot(path, profile: str = "cpu", manifest=None, report_dir="report",
                           method: str = "rpn_ib", split: str = "test", case_index: int = 0,
                           timeout_s: float = 120.0) -> Path | None:
    """Photograph the viewer page (Voilà, headless Chromium) on a volume with its predictions.

    Serves ``notebooks/viewer.ipynb`` with these parameters (the volume: row ``case_index`` of
    ``split`` in ``manifest``, a phantom when it is missing; the predictions:
    ``{report_dir}/predictions/{method}_prior.csv`` when it exists) and saves the viewer widget
    as PNG — what a reader would see, without running it.

    Args:
        path: the PNG to write (its folder is created).
        profile, manifest, report_dir, method, split, case_index: the notebook's parameters
            (``manifest`` default: the committed ``data_manifest.csv``).
        timeout_s: for the server and the page to come up (s).

    Returns:
        ``path``, or ``None`` (with the reason printed) where Chromium, Playwright, Voilà or
        ipyevents is missing or the page did not come up.
    """
    reason = browser_missing()
    if reason:
        print(f"save_viewer_screenshot: skipped: {reason}")
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest = Path(manifest) if manifest is not None else REPO_ROOT / "data_manifest.csv"
    with tempfile.TemporaryDirectory(prefix="igrpn-viewer-") as folder:
        notebook = viewer_notebook(folder, profile=profile, manifest=str(manifest.resolve()),
                                   report_dir=str(Path(report_dir).resolve()), method=method,
                                   split=split, case_index=int(case_index))
        try:
            with serve_voila(notebook, timeout_s) as url, chromium_page(url) as page:
                open_viewer_page(page, url, int(timeout_s * 1000))
                widget = page.locator(".igrpn-viewer").first
                # Chromium paints only what the viewport holds: make it as tall as the page
                box = widget.bounding_box()
                page.set_viewport_size({"width": 1400, "height": int(box["y"] + box["height"]) + 40})
                widget.screenshot(path=str(path))
        except Exception as error:  # a page that never came up is reported, not raised: a figure
            print(f"save_viewer_screenshot: failed: {type(error).__name__}: {error}")
            return None
    return path
