"""The whole `smoke` reproduction under papermill, and a failing notebook's message."""

import functools
import json

import nbformat
import pandas as pd
import pytest

from igrpn import reproduce
from igrpn.config import get_profile


def test_smoke_reproduction_end_to_end(smoke_manifest, tmp_path):
    out = tmp_path / "report"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "fig4_from_an_earlier_run.png").write_bytes(b"stale")
    report = reproduce.reproduce("smoke", out, manifest=smoke_manifest, progress=False)
    text = report.read_text()
    assert not (out / "figures" / "fig4_from_an_earlier_run.png").exists()
    assert "fig4_from_an_earlier_run" not in text
    assert "synthetic fetal-face ultrasound phantom" in text
    assert "## Table 1" in text and "## Table 2" in text
    for name in ("table1", "table2", "claims", "eyes", "reference"):
        assert (out / "tables" / f"{name}.csv").exists() and (out / "tables" / f"{name}.md").exists()
    assert "## The eyes: found, and named" in text
    eyes = pd.read_csv(out / "tables" / "eyes.csv")
    # seven runs (six configurations and the RPN's second seed) with and without the prior, and the
    # image-blind reference
    assert len(eyes) == 15 and (eyes["n_cases"] == 4).all()
    table1, table2 = pd.read_csv(out / "tables" / "table1.csv"), pd.read_csv(out / "tables" / "table2.csv")
    assert list(table1["method"]) == ["Faster R-CNN", "IG-SSD", "Heatmap", "IG-RPN", "Mean training position (no image)"]
    assert "## Better than ignoring the image?" in text
    assert len(pd.read_csv(out / "tables" / "reference.csv")) == 14
    assert len(table2) == 8 and (table1["status"] == "ok").all() and (table2["status"] == "ok").all()
    for column in ("method", "iou_balance", "prior", "ap", "ap35", "ap50", "ap75", "miou", "d_mean",
                   "time_ms", "hit35", "hit50", "hit75", "d_mean_lo", "d_mean_hi", "paper_d_mean"):
        assert column in table1.columns
    # the paper's numbers sit beside ours
    assert table1.loc[table1["method"] == "IG-RPN", "paper_d_mean"].item() == pytest.approx(4.38)
    executed = sorted(p.name for p in (out / "notebooks").glob("*.ipynb"))
    assert "00_data.ipynb" in executed and "03_evaluate.ipynb" in executed
    assert len([n for n in executed if n.startswith("02_train_")]) == 7
    assert "## Two seeds of the RPN" in text and "| rpn_ib | " in text
    import torch

    seeds = {run: torch.load(out / "runs" / run / "checkpoint.pt", weights_only=True)["config"]["seed"]
             for run in ("rpn_ib", "rpn_ib_seed1")}
    assert seeds == {"rpn_ib": 0, "rpn_ib_seed1": 1}
    assert all((out / "notebooks" / n).with_suffix(".html").exists() for n in executed)
    assert (out / "runs" / "graph_prior.json").exists()
    steps = json.loads((out / "steps.json").read_text())
    assert not any(step["reused"] for step in steps)
    from igrpn.viz.browser import browser_missing

    # the slice viewer photographed where a browser is installed (CI installs Chromium)
    assert "viewer screenshot" in [step["step"] for step in steps]
    if browser_missing() is None:
        assert (out / "figures" / "viewer.png").exists() and "figures/viewer.png" in text

    # MONAI's peer, trained for rpn_ib's seconds where MONAI is installed; the report says why not elsewhere
    from igrpn.training.peer import unavailable_reason

    assert "## Against a peer" in text
    if unavailable_reason() is None:
        peer_rows = pd.read_csv(out / "tables" / "peer_test.csv")
        assert list(peer_rows["configuration"]) == ["monai_peer", "rpn_ib", "rpn_ib + prior"]
        assert "peer monai_peer" in [step["step"] for step in steps]
    else:
        assert "The peer was not trained in this run: the MONAI peer needs monai" in text

    # A second run reuses every finished training.
    reproduce.reproduce("smoke", out, manifest=smoke_manifest, progress=False, runs=["rpn_ib"], screenshot=False)
    steps = json.loads((out / "steps.json").read_text())
    assert [s["reused"] for s in steps if s["step"].startswith(("02_train", "peer"))] == (
        [True] if unavailable_reason() else [True, True])


def test_a_failing_notebook_stops_with_its_name_and_error(tmp_path):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("raise ValueError('bad landmark')")]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "99_broken.ipynb"
    nbformat.write(notebook, path)
    with pytest.raises(reproduce.ReproduceError, match=r"99_broken.ipynb failed in cell 2: ValueError: bad landmark"):
        reproduce.run_notebook(path, tmp_path / "out" / "99_broken.ipynb", {})


def test_the_peer_step_says_why_it_did_not_run_and_leaves_no_stale_table(tmp_path, monkeypatch):
    from igrpn.training import peer

    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "peer_test.csv").write_text("from an earlier run")
    step = functools.partial(reproduce._peer_step, "smoke", tmp_path, tmp_path / "manifest.csv", 0, False, False)
    step(True, timed=None)
    assert not (tables / "peer_test.csv").exists()
    assert "rpn_ib is not trained" in (tables / "peer_test.md").read_text()
    step(False, timed=None)
    assert "not requested (--no-peer)" in (tables / "peer_test.md").read_text()
    (tmp_path / "runs" / "rpn_ib").mkdir(parents=True)
    (tmp_path / "runs" / "rpn_ib" / "checkpoint.pt").write_bytes(b"")
    step(True, timed=None)
    assert "gives no training time to match" in (tables / "peer_test.md").read_text()
    pd.DataFrame([{"kind": "epoch", "seconds": 12.5}]).to_csv(tmp_path / "runs" / "rpn_ib" / "log.csv", index=False)
    monkeypatch.setattr(peer, "unavailable_reason", lambda: "the MONAI peer needs monai")
    step(True, timed=None)
    assert "needs monai" in (tables / "peer_test.md").read_text()
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        peer.read_peer_checkpoint(tmp_path / "runs" / "rpn_ib" / "checkpoint.pt")


def test_a_peer_is_reused_only_for_the_same_profile_seed_and_budget():
    profile = reproduce.peer_profile("smoke")
    assert profile.feature_stride_mm == pytest.approx(4 * profile.spacing_mm)
    ckpt = {"profile": profile.to_dict(), "seed": 0, "budget_s": 12.5, "train_seconds": 13.4}
    assert reproduce.finished_peer(ckpt, profile, 0, 12.5)  # one step past the budget is its own
    assert not reproduce.finished_peer(ckpt, profile, 1, 12.5)
    assert not reproduce.finished_peer(ckpt, profile, 0, 13.4)  # rpn_ib was trained again
    assert not reproduce.finished_peer(ckpt, reproduce.peer_profile("cpu"), 0, 12.5)
    assert not reproduce.finished_peer({k: v for k, v in ckpt.items() if k != "budget_s"}, profile, 0, 12.5)
