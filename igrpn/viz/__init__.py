"""Figures of the paper (Fig. 1, 3, 4) and an interactive slice viewer for 3D volumes.

Modules:

* ``common`` — plane and box conventions, colours, input checks, the intensity window, voxel ↔
  world, landmark boxes, prediction-table helpers (shared by figures and viewer);
* ``figures`` — matplotlib: three planes through a point, projections, Fig. 1 (``plot_case``);
* ``prior_plots`` — Fig. 3: the landmark graph and the distance-ratio histograms;
* ``predictions`` — prediction tables, Fig. 4 and the failure gallery, the notebooks' data helpers;
* ``render`` — the viewer's numpy renderer of three planes with boxes into one PNG;
* ``viewer_logic`` — the viewer's input handling, shown texts and boxes, without widgets;
* ``viewer`` — ``SliceViewer`` (ipywidgets + ipyevents) and ``browse_manifest``;
* ``browser`` — Voilà and headless Chromium: ``save_viewer_screenshot`` and the browser tests' page.

Every public name is importable from ``igrpn.viz``. Settings read at call time, such as
``igrpn.viz.browser.CHROMIUM``, are changed (or monkeypatched) on their own module.
"""

from igrpn.viz.browser import (browser_missing, chromium_page, open_viewer_page, save_viewer_screenshot,
                               serve_voila, viewer_notebook)
from igrpn.viz.common import (AXIS_NAMES, BOX_COLOURS, CROSSHAIR_COLOUR, PLANES, intensity_window,
                              landmark_boxes_vox, plane_cuts, voxel_spacing)
from igrpn.viz.figures import face_plane_names, face_view, plot_case, plot_mip, plot_planes, project_volume
from igrpn.viz.predictions import (best_configuration, dataset_summary, load_demo_case, manifest_landmarks,
                                   pick_comparison_cases, plot_prediction_comparison, plot_worst_cases,
                                   prediction_boxes_vox, selected_distances, worst_cases)
from igrpn.viz.prior_plots import plot_prior_graph, plot_ratio_histograms
from igrpn.viz.render import (LINE_STYLES, Overlay, PanelLayout, apply_window, encode_png, render_slices,
                              window_level, window_range)
from igrpn.viz.viewer import ManifestBrowser, SliceViewer, browse_manifest, candidate_table, landmark_summary
from igrpn.viz.viewer_logic import key_step, nice_step, snap, step_point, wheel_step

__all__ = [
    "PLANES",
    "AXIS_NAMES",
    "BOX_COLOURS",
    "CROSSHAIR_COLOUR",
    "intensity_window",
    "voxel_spacing",
    "plane_cuts",
    "landmark_boxes_vox",
    "face_view",
    "face_plane_names",
    "project_volume",
    "plot_planes",
    "plot_mip",
    "plot_case",
    "plot_prior_graph",
    "plot_ratio_histograms",
    "prediction_boxes_vox",
    "manifest_landmarks",
    "selected_distances",
    "pick_comparison_cases",
    "worst_cases",
    "best_configuration",
    "plot_prediction_comparison",
    "plot_worst_cases",
    "dataset_summary",
    "load_demo_case",
    "LINE_STYLES",
    "Overlay",
    "PanelLayout",
    "window_level",
    "window_range",
    "apply_window",
    "encode_png",
    "render_slices",
    "nice_step",
    "snap",
    "wheel_step",
    "key_step",
    "step_point",
    "landmark_summary",
    "candidate_table",
    "SliceViewer",
    "ManifestBrowser",
    "browse_manifest",
    "browser_missing",
    "serve_voila",
    "chromium_page",
    "viewer_notebook",
    "open_viewer_page",
    "save_viewer_screenshot",
]
