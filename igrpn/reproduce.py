"""Regenerate the report end to end: data → 00 → 01 → 02 (once per training) → 03 → 04.

    python -m igrpn.reproduce --profile cpu --out report          (what `make reproduce` runs)
    python -m igrpn.reproduce --profile smoke --out build/smoke/report

lays out ``OUT`` as ``REPORT.md``, ``tables/``, ``figures/``, ``predictions/``, ``notebooks/``
(executed ``.ipynb`` and their ``.html``) and ``runs/`` (checkpoints and logs). A training whose
checkpoint already holds all epochs of the same configuration is reused (``--force`` redoes it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

from igrpn.checkpoint import CheckpointError, load_checkpoint
from igrpn.config import REPO_ROOT, RUN_CONFIGS, RUN_SEED_OFFSETS, get_profile
from igrpn.data import load_cases, read_manifest
from igrpn.evaluation.answers import answers, ground_truth
from igrpn.evaluation.report import (PEER_COMPARED, PEER_RUN, peer_test_markdown, peer_test_table, training_seconds,
                                     write_report)
from igrpn.phantom import command_manifest, default_manifest
from igrpn.training import peer
from igrpn.viz.browser import save_viewer_screenshot

NOTEBOOKS = REPO_ROOT / "notebooks"


class ReproduceError(RuntimeError):
    """A step of the reproduction failed; the message names the notebook and the failing cell."""


def run_notebook(name: str | Path, output: Path, parameters: dict, progress: bool = True) -> None:
    """Execute ``notebooks/<name>`` (or the notebook at an absolute path) with papermill into
    ``output`` and render it to HTML.

    Raises:
        ReproduceError: naming the notebook, the failing cell and its error.
    """
    import papermill  # here, not at the top: several seconds to import, and only the notebooks need it
    from papermill.exceptions import PapermillExecutionError

    source = NOTEBOOKS / name
    name = source.name
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(str(source), str(output), parameters=parameters,
                                   cwd=str(NOTEBOOKS), progress_bar=False, log_output=False,
                                   kernel_name="python3")
    except PapermillExecutionError as error:
        raise ReproduceError(
            f"notebook {name} failed in cell {error.exec_count}: {error.ename}: {error.evalue}"
            f" (executed copy: {output})"
        ) from None
    render_html(output)


def render_html(notebook_path: Path) -> Path:
    """Write ``notebook_path`` as a self-contained HTML page beside it."""
    import nbformat  # here, not at the top: nbconvert takes seconds to import
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook_path, as_version=4))
    html = notebook_path.with_suffix(".html")
    html.write_text(body, encoding="utf-8")
    return html


def finished_run(run_dir: Path, profile_name: str, method: str, iou_balance: bool, seed: int) -> bool:
    """True when ``run_dir`` holds a checkpoint of this configuration with every epoch done."""

    try:
        ckpt = load_checkpoint(run_dir / "checkpoint.pt", method=method)
    except CheckpointError:
        return False
    config = ckpt["config"]
    profile = get_profile(profile_name).for_method(method)
    return (config["profile"] == profile.to_dict() and config["iou_balance"] == iou_balance
            and config["seed"] == seed and ckpt["epoch"] == profile.epochs - 1)


def _holds_other_configuration(run_dir: Path, profile_name: str, method: str, iou_balance: bool,
                               seed: int) -> bool:
    """True when ``run_dir`` has a checkpoint that training would refuse to resume."""

    path = run_dir / "checkpoint.pt"
    if not path.exists():
        return False
    try:
        config = load_checkpoint(path)["config"]
    except CheckpointError:
        return True
    return not (config["profile"] == get_profile(profile_name).for_method(method).to_dict()
                and config["method"] == method
                and config["iou_balance"] == iou_balance and config["seed"] == seed)


#: The peer's detection cell in ``make reproduce``, in voxels of the profile's grid: stride 4, the
#: tutorial's layout (10.4 mm at the cpu profile's 2.6 mm, as the runner's logged peer runs); a
#: stride-2 peer step costs ~10× (igrpn.training.peer.backbone_layout).
PEER_STRIDE_VOX = 4
#: The run whose training minutes the peer gets.
PEER_BUDGET_RUN = "rpn_ib"


def peer_profile(profile_name: str):
    """The profile the peer trains with: the named one at ``PEER_STRIDE_VOX`` cells."""
    profile = get_profile(profile_name)
    return dataclasses.replace(profile, feature_stride_mm=PEER_STRIDE_VOX * profile.spacing_mm)


def finished_peer(ckpt: dict, profile, seed: int, budget_s: float) -> bool:
    """True when a peer checkpoint's dict (:func:`igrpn.training.peer.read_peer_checkpoint`) holds a training
    of this profile and seed for this budget. The budget is compared exactly: it is read again
    from the same ``log.csv`` whenever ``rpn_ib`` is reused, and the peer overshoots it by a step."""
    return (ckpt.get("profile") == profile.to_dict() and ckpt.get("seed") == seed
            and ckpt.get("budget_s") is not None and math.isclose(float(ckpt["budget_s"]), budget_s, rel_tol=1e-9))


def peer_run_plan(profile_name: str, out_dir: Path, seed: int, force: bool):
    """The peer's profile, budget (the seconds ``rpn_ib``'s epochs took, from its log), checkpoint
    path, and whether a finished checkpoint of them is reused."""

    budget_s = training_seconds(out_dir, f"02_train {PEER_BUDGET_RUN}")
    profile = peer_profile(profile_name)
    checkpoint = out_dir / "runs" / PEER_RUN / peer.CHECKPOINT_NAME
    try:
        reuse = not force and finished_peer(peer.read_peer_checkpoint(checkpoint), profile, seed, budget_s)
    except ValueError:  # none, or one that cannot be read: trained again
        reuse = False
    return profile, budget_s, checkpoint, reuse


def train_and_score_peer(profile, budget_s: float, checkpoint: Path, reuse: bool, out_dir: Path, manifest: Path,
                         seed: int, progress: bool = True) -> None:
    """MONAI's RetinaNet trained for ``budget_s`` (unless ``reuse``), scored on the test split beside
    the RPN and IG-RPN: ``tables/peer_test.csv|md``. Needs ``03_evaluate``'s predictions of ``rpn_ib``."""
    if not reuse:
        shutil.rmtree(checkpoint.parent, ignore_errors=True)
        peer.train_peer(profile, seed, checkpoint.parent, manifest, budget_s, progress=progress)
    table = read_manifest(manifest)
    cases = load_cases(table[table["split"] == "test"], profile.spacing_mm, progress=progress)
    predictions = {}
    for run, use_prior in PEER_COMPARED:
        path = out_dir / "predictions" / f"{run}_{'prior' if use_prior else 'noprior'}.csv"
        if path.exists():
            # case ids stay text ("001" is not 1, "NA" not missing), as igrpn.data.read_manifest keeps them
            predictions[(run, use_prior)] = answers(pd.read_csv(path, dtype={"case_id": str}, keep_default_na=False,
                                                                na_values=[""]))
    frame = peer_test_table(peer.validation_answers({"checkpoint": checkpoint}, cases), predictions,
                            ground_truth(cases))
    ckpt = peer.read_peer_checkpoint(checkpoint)  # its training time; the network is not needed again
    frame.to_csv(out_dir / "tables" / "peer_test.csv", index=False)
    (out_dir / "tables" / "peer_test.md").write_text(
        peer_test_markdown(frame, float(ckpt["train_seconds"]), budget_s))


def reproduce(profile_name: str = "cpu", out_dir: str | Path = "report", manifest: str | Path | None = None,
              force: bool = False, seed: int = 0, runs: list[str] | None = None,
              progress: bool = True, screenshot: bool = True, peer: bool = True) -> Path:
    """Run every step and write ``out_dir/REPORT.md``; returns its path.

    ``peer``: train and score MONAI's RetinaNet for the RPN's minutes (:func:`train_and_score_peer`)
    where MONAI is installed and ``rpn_ib`` is trained; otherwise the report says why it is missing.

    ``screenshot``: photograph the slice viewer on a test volume into ``figures/viewer.png``
    (:func:`igrpn.viz.browser.save_viewer_screenshot`; needs Chromium, Playwright and Voilà).
    """

    profile = get_profile(profile_name)
    out_dir = Path(out_dir).resolve()
    manifest = Path(manifest).resolve() if manifest else default_manifest(profile_name)
    runs = list(RUN_CONFIGS) if runs is None else runs
    unknown = set(runs) - set(RUN_CONFIGS)
    if unknown:
        raise ValueError(f"unknown runs {sorted(unknown)}; expected some of {list(RUN_CONFIGS)}")
    for sub in ("tables", "figures", "notebooks", "runs", "predictions"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    if set(runs) == set(RUN_CONFIGS):
        # Every figure is drawn again below; one left from an earlier run (e.g. another volume
        # chosen for Fig. 4) would otherwise be listed in REPORT.md as if current.
        for stale in (out_dir / "figures").glob("*.png"):
            stale.unlink()
    common = {"profile": profile_name, "manifest": str(manifest), "report_dir": str(out_dir)}
    steps: list[dict] = []

    def timed(step: str, action, reused: bool = False) -> None:
        if progress:
            print(f"[reproduce] {step} ...", flush=True)
        start = time.perf_counter()
        action()
        seconds = time.perf_counter() - start
        steps.append({"step": step, "seconds": round(seconds, 1), "reused": reused})
        if progress:
            print(f"[reproduce] {step} done in {seconds:.0f} s", flush=True)

    nb_dir = out_dir / "notebooks"
    # The profile's own data set is generated when missing; a user's own manifest never is.
    own = manifest if manifest != default_manifest(profile_name) else None
    timed("data", lambda: command_manifest(profile_name, own, progress=progress))
    timed("00_data", lambda: run_notebook("00_data.ipynb", nb_dir / "00_data.ipynb", common, progress))
    timed("01_graph_prior", lambda: run_notebook("01_graph_prior.ipynb", nb_dir / "01_graph_prior.ipynb",
                                                 common, progress))
    for run in runs:
        method, iou_balance = RUN_CONFIGS[run]
        run_seed = seed + RUN_SEED_OFFSETS.get(run, 0)
        run_dir = out_dir / "runs" / run
        if force and run_dir.exists():
            shutil.rmtree(run_dir)
        reused = finished_run(run_dir, profile_name, method, iou_balance, run_seed)
        if not reused and _holds_other_configuration(run_dir, profile_name, method, iou_balance, run_seed):
            raise ReproduceError(f"{run_dir / 'checkpoint.pt'} holds a training of another configuration "
                                 "(another profile, seed or igrpn version): rerun with --force to retrain it")
        parameters = dict(common, method=method, iou_balance=iou_balance, seed=run_seed, run=run)
        timed(f"02_train {run}", lambda p=parameters, r=run: run_notebook(
            "02_train.ipynb", nb_dir / f"02_train_{r}.ipynb", p, progress), reused=reused)
    timed("03_evaluate", lambda: run_notebook("03_evaluate.ipynb", nb_dir / "03_evaluate.ipynb", common, progress))
    if (NOTEBOOKS / "04_visualize.ipynb").exists():
        timed("04_visualize", lambda: run_notebook("04_visualize.ipynb", nb_dir / "04_visualize.ipynb",
                                                   common, progress))
    _peer_step(profile_name, out_dir, manifest, seed, force, progress, peer, timed)
    if screenshot:
        # The slice viewer as a reader would see it (skipped with the reason where no browser is installed).
        timed("viewer screenshot", lambda: save_viewer_screenshot(
            out_dir / "figures" / "viewer.png", profile=profile_name, manifest=manifest, report_dir=out_dir))
    (out_dir / "steps.json").write_text(json.dumps(steps, indent=2))
    return write_report(out_dir, profile, steps)


def _peer_step(profile_name: str, out_dir: Path, manifest: Path, seed: int, force: bool, progress: bool,
               wanted: bool, timed) -> None:
    """The peer's timed step, or ``tables/peer_test.md`` saying why there is none (never a stale table)."""

    for stale in ("peer_test.csv", "peer_test.md"):
        (out_dir / "tables" / stale).unlink(missing_ok=True)
    run_dir = out_dir / "runs" / PEER_BUDGET_RUN
    reason = ("not requested (--no-peer)" if not wanted
              else f"{PEER_BUDGET_RUN} is not trained" if not (run_dir / "checkpoint.pt").exists()
              else f"{run_dir / 'log.csv'} gives no training time to match"
              if not training_seconds(out_dir, f"02_train {PEER_BUDGET_RUN}") > 0
              else peer.unavailable_reason())
    if reason is None:
        profile, budget_s, checkpoint, reuse = peer_run_plan(profile_name, out_dir, seed, force)
        timed(f"peer {PEER_RUN}", lambda: train_and_score_peer(profile, budget_s, checkpoint, reuse, out_dir,
                                                               manifest, seed, progress), reused=reuse)
        return
    (out_dir / "tables" / "peer_test.md").write_text(f"_The peer was not trained in this run: {reason}._\n")
    if progress:
        print(f"[reproduce] {PEER_RUN} skipped: {reason}", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m igrpn.reproduce",
        description="Regenerate the data set, the trainings, Table 1, Table 2, the figures and REPORT.md.",
        epilog="example: python -m igrpn.reproduce --profile cpu --out report",
    )
    parser.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "paper"])
    parser.add_argument("--out", default=None, help="report folder (default: report/ for cpu, "
                        "build/<profile>/report otherwise)")
    parser.add_argument("--manifest", default=None, help="data set manifest (default: the profile's)")
    parser.add_argument("--force", action="store_true", help="retrain even when a finished checkpoint exists")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", nargs="+", default=None, choices=list(RUN_CONFIGS),
                        help="only these trainings (default: all seven)")
    parser.add_argument("--no-peer", action="store_true",
                        help="do not train MONAI's RetinaNet peer for the RPN's minutes (it needs the bench extra)")
    parser.add_argument("--no-screenshot", action="store_true",
                        help="do not photograph the slice viewer (figures/viewer.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = args.out or ("report" if args.profile == "cpu" else f"build/{args.profile}/report")
    try:
        path = reproduce(args.profile, out, manifest=args.manifest, force=args.force, seed=args.seed,
                         runs=args.runs, screenshot=not args.no_screenshot, peer=not args.no_peer)
    except ReproduceError as error:
        print(f"reproduce: {error}", file=sys.stderr)
        return 1
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
