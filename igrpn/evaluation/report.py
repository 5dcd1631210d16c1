"""``REPORT.md``: the tables beside the paper's, the claims, the peer, the figures, the wall time and
the decisions of docs/design.md §10, written from what ``make reproduce`` left on disk.

Percentages are printed as the paper prints them (AP, hit rates and mIoU × 100); distances in mm;
times in ms per volume on the machine that ran the evaluation.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd
import torch

from igrpn.config import PEER_METHOD, REPO_ROOT, Profile
from igrpn.evaluation import metrics
from igrpn.evaluation.answers import configuration_label
from igrpn.evaluation.tables import (REFERENCE_RUN, comparison, format_value, paper_tables, per_landmark_markdown,
                                     ranking_markdown, scores_record)

#: The project's reading of the paper; its §10 (the decisions) is repeated in every report.
DESIGN_DOC = REPO_ROOT / "docs" / "design.md"
#: The heading that opens §10 of the design document.
DECISIONS_HEADING = "## 10. "


def design_decisions(path: str | Path = DESIGN_DOC) -> str:
    """§10 of ``docs/design.md`` (the decisions where the paper is silent or ambiguous), as Markdown
    for the report: from its heading to the end of the file, every heading one level deeper.

    Raises:
        FileNotFoundError naming the file; ValueError when it has no §10 heading.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the design document is missing; the report repeats its §10")
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(DECISIONS_HEADING)), None)
    if start is None:
        raise ValueError(f"{path}: no section starting with {DECISIONS_HEADING!r} (the decisions)")
    body = lines[start + 1:]
    return "\n".join("#" + line if line.startswith("#") else line for line in body).strip() + "\n"


def _package_versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for name in ("igrpn", "torch", "numpy", "pandas", "nibabel", "matplotlib", "papermill", "ipywidgets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _device() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"CPU: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    if torch.cuda.is_available():
        text += f"; GPU: {torch.cuda.get_device_name(0)} (evaluation ran on the CPU)"
    return text


def _ap_column_note(table1: pd.DataFrame) -> str:
    paper = paper_tables()
    boxed = paper.dropna(subset=["ap", "ap50"])
    gap = (boxed["ap"] - boxed["ap50"]).abs().max()
    above_bound = (boxed["ap"] > (5 * boxed["ap50"] + 5 * boxed["ap75"]) / 10).all()
    lines = [
        f"In every row of the paper's tables its \"AP\" is within {gap:.2f} points of its AP50, and far "
        "above what a mean over IoU 0.50:0.05:0.95 can reach when AP75 is 20–28 %: AP at IoU 0.75 and "
        "above is at most AP75, so the mean over the ten thresholds is at most (5·AP50 + 5·AP75)/10"
        + (" — the paper's AP exceeds that bound in every row" if above_bound else "") + ". "
        "The paper's AP column is therefore most likely the AP at IoU 0.5 (perhaps with another "
        "interpolation), not COCO's mean. Our `ap` column is the COCO mean over 0.50:0.95, so it is "
        "expected to sit far below the paper's.",
    ]
    ours = table1[(table1["status"] == "ok") & table1["ap"].notna()]
    for _, row in ours.iterrows():
        lines.append(f"- {row['method']}: our AP (0.50:0.95) {row['ap']:.2f}, AP50 {row['ap50']:.2f}, "
                     f"hit50 {row['hit50']:.2f}.")
    return "\n".join(lines)


def targets_markdown(table1: pd.DataFrame, table2: pd.DataFrame, out_dir: Path) -> str:
    """The issues' accuracy targets for the `cpu` profile, read off our tables: met or not."""
    def value(table, label, prior, key, balance=None):
        rows = table[(table["method"] == label) & (table["prior"] == prior) & (table["status"] == "ok")]
        if balance is not None:
            rows = rows[rows["iou_balance"] == balance]
        return float(rows.iloc[0][key]) if len(rows) else float("nan")

    tables = out_dir / "tables"
    eyes = pd.read_csv(tables / "eyes.csv") if (tables / "eyes.csv").exists() else pd.DataFrame()
    found = eyes[(eyes["run"] == "rpn_ib") & (~eyes["prior"].astype(bool))] if len(eyes) else eyes
    reference = pd.read_csv(tables / "reference.csv") if (tables / "reference.csv").exists() else pd.DataFrame()
    plain = reference[~reference["prior"].astype(bool)] if len(reference) else reference
    checks = [
        ("RPN with IoU balance, top-1 (no prior): d-mean ≤ 8 mm", value(table2, "RPN", False, "d_mean", True), 8.0, "≤"),
        ("RPN with IoU balance (no prior): both eyes within 5 mm in ≥ 28 of 32 volumes",
         float(found["found"].iloc[0]) if len(found) else float("nan"), 28.0, "≥"),
        ("IG-RPN (IoU balance + prior): d-mean ≤ 6 mm", value(table1, "IG-RPN", True, "d_mean"), 6.0, "≤"),
        ("Every configuration without the prior beats the image-blind reference (configurations that do)",
         float((plain["verdict"] == "better").sum()) if len(plain) else float("nan"), float(len(plain)), "≥"),
    ]
    lines = ["| target | ours | met |", "|---|---|---|"]
    for text, ours, bound, sense in checks:
        met = (ours <= bound) if sense == "≤" else (ours >= bound)
        shown = f"{ours:.0f} of {bound:.0f}" if text.startswith("Every") else format_value(ours, 0 if "eyes" in text else 2)
        lines.append(f"| {text} | {shown} | {'yes' if met else '**no**'} |")
    lines.append(_peer_target_row(tables))
    gap = out_dir / "tables" / "train_test_rpn_ib.csv"
    if gap.exists():
        frame = pd.read_csv(gap, index_col=0)
        lines += ["", "Same model (rpn_ib, no prior) on training and on test volumes — a large training error "
                  "means under-fitting within the profile's budget, not over-fitting:", "",
                  "| | training volumes | test volumes |", "|---|---|---|"]
        lines += [f"| {index} | {format_value(row.iloc[0])} | {format_value(row.iloc[1])} |" for index, row in frame.iterrows()]
    return "\n".join(lines) + "\n"


def _peer_target_row(tables: Path) -> str:
    """The target row "IG-RPN better than the peer trained for the RPN's minutes" (test split)."""
    text = "IG-RPN better than MONAI's RetinaNet trained for the RPN's minutes (test split, paired)"
    path = tables / "peer_test.csv"
    if not path.exists():
        return f"| {text} | the peer was not trained (the report's \"Against a peer\") | not run |"
    frame = pd.read_csv(path)
    ours = frame[frame["configuration"] == configuration_label("rpn_ib", True)]
    if ours.empty:
        return f"| {text} | no IG-RPN row (rpn_ib's predictions with the prior are missing) | not run |"
    row = ours.iloc[0]
    return (f"| {text} | Δ {row['diff_vs_peer']:+.2f} mm [{row['diff_lo']:+.2f}, {row['diff_hi']:+.2f}] | "
            f"{'yes' if row['verdict'] == 'better' else '**no**'} |")


#: The runs that repeat ``rpn_ib`` with another seed (``config.RUN_SEED_OFFSETS``).
SEED_RUNS = ("rpn_ib", "rpn_ib_seed1")


def seed_spread_markdown(results: pd.DataFrame) -> str:
    """The RPN with IoU balance trained with two seeds, test split: d-mean and hit50 of each, with
    and without the prior, and the spread (the difference between the seeds)."""
    if results.empty:
        return "_no results_\n"
    lines = ["| configuration | seed 0 (d-mean mm, hit50 %) | seed 1 | spread (mm) |", "|---|---|---|---|"]
    for use_prior in (False, True):
        cells = []
        for run in SEED_RUNS:
            row = results[(results["run"] == run) & (results["prior"] == use_prior)]
            cells.append(None if row.empty else row.iloc[0])
        if any(c is None for c in cells):
            continue
        text = [f"{c['d_mean']:.2f}, {100 * c['hit50']:.1f}" for c in cells]
        lines.append(f"| {configuration_label('rpn_ib', use_prior)} | {text[0]} | {text[1]} | "
                     f"{abs(cells[0]['d_mean'] - cells[1]['d_mean']):.2f} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else "_the second seed was not trained_\n"


def reference_intro(table1: pd.DataFrame) -> str:
    """What the image-blind reference is, with its d-mean read off Table 1."""
    row = table1[(table1["run"] == REFERENCE_RUN) & (table1["status"] == "ok")]
    if row.empty:
        return "_no image-blind reference (the manifest has no training split)_"
    row = row.iloc[0]
    return (f"The last row of Table 1 answers every landmark at its mean position over the training "
            f"annotations (world mm), whatever the volume shows: d-mean {row['d_mean']:.2f} mm "
            f"[{row['d_mean_lo']:.2f}, {row['d_mean_hi']:.2f}]. A method that does not beat it has learnt where "
            "faces usually lie in the volume, not where this face is. Paired bootstrap over the test "
            "volumes (Δ = configuration − reference; negative is better):")


def training_seconds(out_dir: Path, step: str) -> float:
    """Seconds the epochs of a ``02_train <run>`` step's training took, from ``runs/<run>/log.csv``
    (NaN for other steps or without a log)."""
    if not step.startswith("02_train "):
        return float("nan")
    log = Path(out_dir) / "runs" / step.split(" ", 1)[1] / "log.csv"
    if not log.exists():
        return float("nan")
    frame = pd.read_csv(log)
    return float(frame.loc[frame["kind"] == "epoch", "seconds"].sum())


#: The experiment runner's table (igrpn.training.experiment), read for the report's "Against a peer".
EXPERIMENTS_CSV = REPO_ROOT / "docs" / "experiments.csv"


def peer_markdown(experiments: pd.DataFrame) -> str:
    """The runs at the budgets where MONAI's RetinaNet peer was trained, on validation data.

    One row per configuration and budget: the number of seeds, the mean and spread (min–max) over
    seeds of the validation d-mean, the mean hit50 and, where the run was scored with it, the graph
    prior's d-mean. Empty string when no peer run exists.
    """

    if experiments.empty or not (experiments["method"] == PEER_METHOD).any():
        return ""
    budgets = experiments.loc[experiments["method"] == PEER_METHOD, "budget_s"].astype(float).unique()
    # Trainings by epoch count (make reproduce's) take a few % more or less than a peer's budget.
    near = experiments["budget_s"].astype(float).apply(lambda b: any(abs(b - p) <= 0.15 * p for p in budgets))
    rows = experiments[near]
    lines = ["| budget (min) | configuration | method | seeds | val d-mean (mm), mean [min–max] | val hit50 (%) "
             "| with the graph prior: val d-mean (mm) |",
             "|---|---|---|---|---|---|---|"]
    for (name, method), runs in rows.groupby(["name", "method"], sort=True):
        budget = runs["budget_s"].astype(float)
        minutes = (f"{budget.min() / 60:.1f}" if budget.max() - budget.min() < 6
                   else f"{budget.min() / 60:.1f}–{budget.max() / 60:.1f}")
        lines.append(f"| {minutes} | {name} | {method} | {len(runs)} | {_spread(runs['val_d_mean'])} "
                     f"| {100 * runs['val_hit50'].astype(float).mean():.1f} "
                     f"| {_spread(runs.get('val_prior_d_mean', pd.Series(dtype=float)))} |")
    return "\n".join(lines) + "\n"


def _spread(values: pd.Series) -> str:
    """``mean [min–max]`` of the finite values (2 decimals), ``–`` when there are none (the peer has
    no graph prior)."""
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return "–"
    return f"{values.mean():.2f} [{values.min():.2f}–{values.max():.2f}]"


#: The run name of the MONAI peer that ``make reproduce`` trains (``runs/monai_peer/``) and scores
#: on the test split beside the RPN (``tables/peer_test.csv``).
PEER_RUN = "monai_peer"
#: The configurations compared with the peer on the test split: (run, prior).
PEER_COMPARED = (("rpn_ib", False), ("rpn_ib", True))


def peer_test_table(peer_answers: pd.DataFrame, predictions: dict, gt: pd.DataFrame, n_boot: int = 1000,
                    seed: int = 0) -> pd.DataFrame:
    """The peer and our configurations on the test split, each of ours paired against the peer.

    Args:
        peer_answers: the peer's selected rows (``case_id, landmark, score, x, y, z, w, h, d``, mm).
        predictions: ``{(run, prior): selected rows}`` of our configurations (``PEER_COMPARED``
            that are present are compared).
        gt: ground truth rows of the same cases.

    Returns:
        One row per configuration, the peer first: ``configuration, d_mean`` (mm) with its
        bootstrap ``d_mean_lo/hi``, ``hit50`` (fraction), ``eyes_found`` ("k/n"), and for ours
        ``diff_vs_peer`` (mm, ours − the peer's; negative = ours better), ``diff_lo/hi``, ``p_value``
        and ``verdict`` ("better", "worse" or "not distinguishable" than the peer).
    """

    def scores(chosen: pd.DataFrame) -> dict:
        record = scores_record(chosen, gt, n_boot, seed)
        eyes = metrics.eye_pair(chosen, gt)
        return {**{k: record[k] for k in ("d_mean", "d_mean_lo", "d_mean_hi", "hit50")},
                "eyes_found": f"{eyes['found']}/{eyes['n_cases']}"}

    records = [{"configuration": PEER_RUN, **scores(peer_answers)}]
    for run, use_prior in PEER_COMPARED:
        if (run, use_prior) not in predictions:
            continue
        chosen = predictions[(run, use_prior)]
        test = metrics.paired_bootstrap(peer_answers, chosen, gt, metric="d_mean", n_boot=n_boot, seed=seed)
        records.append({"configuration": configuration_label(run, use_prior), **scores(chosen),
                        "diff_vs_peer": test["diff"], "diff_lo": test["lo"], "diff_hi": test["hi"],
                        "p_value": test["p_value"], "verdict": comparison(test["lo"], test["hi"])})
    return pd.DataFrame.from_records(records, columns=[
        "configuration", "d_mean", "d_mean_lo", "d_mean_hi", "hit50", "eyes_found", "diff_vs_peer", "diff_lo",
        "diff_hi", "p_value", "verdict"])


def peer_test_markdown(frame: pd.DataFrame, peer_seconds: float, rpn_seconds: float) -> str:
    """The test-split comparison as a table, with the two trainings' minutes."""
    lines = [f"Test split, one training each: the peer trained {peer_seconds / 60:.1f} min, the RPN "
             f"(`rpn_ib`) {rpn_seconds / 60:.1f} min.", "",
             "| configuration | d-mean (mm) [95 % CI] | hit50 (%) | both eyes within 5 mm | "
             "Δ d-mean vs the peer, mm [95 % CI] | p | than the peer |", "|---|---|---|---|---|---|---|"]
    for row in frame.itertuples():
        versus = ("–", "–", "–") if pd.isna(row.diff_vs_peer) else (
            f"{row.diff_vs_peer:+.2f} [{row.diff_lo:+.2f}, {row.diff_hi:+.2f}]", f"{row.p_value:.3f}", row.verdict)
        lines.append(f"| {row.configuration} | {row.d_mean:.2f} [{row.d_mean_lo:.2f}, {row.d_mean_hi:.2f}] | "
                     f"{100 * row.hit50:.1f} | {row.eyes_found} | {' | '.join(versus)} |")
    return "\n".join(lines) + "\n"


def peer_section(tables: Path, experiments: pd.DataFrame) -> list[str]:
    """The report's "Against a peer": the test split (``tables/peer_test.md``, written by
    ``make reproduce``) and the runner's validation runs; no section when neither exists."""
    test = (tables / "peer_test.md").read_text() if (tables / "peer_test.md").exists() else ""
    validation = peer_markdown(experiments)
    if not test and not validation:
        return []
    parts = ["## Against a peer", "",
             "MONAI's 3D RetinaNet (ResNet-FPN, ATSS matcher, hard-negative sampler; `igrpn.training.peer`), trained on "
             "the same training volumes with the same augmentation, for the same wall-clock minutes as the RPN, "
             "and scored the same way.", ""]
    if test:
        parts += ["`make reproduce` trains it for the seconds `rpn_ib`'s epochs took and scores it on the test "
                  "split; Δ is paired over the test volumes (our configuration − the peer).", "", test]
    if validation:
        parts += ["The experiment runner (`python -m igrpn.experiment`) at the budgets where the peer was "
                  "trained, on the validation part of the training split (`docs/experiments.csv`; the budgets "
                  "are wall-clock on the machine of each run):", "", validation]
    return parts


#: The `cpu` profile's budget for the whole ``make reproduce`` (docs/design.md §8), minutes: aimed at, at most.
CPU_BUDGET_MIN = (60, 120)


def _budget_sentence(profile: Profile, total_s: float, reused: bool = False) -> str:
    """The run's wall time against the `cpu` budget (empty for the other profiles, which have none);
    ``reused``: some training was reused, so the run is shorter than a full one."""
    if profile.name != "cpu":
        return ""
    aim, cap = CPU_BUDGET_MIN
    verdict = ("within the aim" if total_s <= 60 * aim else
               f"over the {aim} minutes aimed at, within the {cap} allowed" if total_s <= 60 * cap else
               f"over the {cap} minutes allowed")
    partial = " Some trainings were reused: a full run (`--force`) takes longer." if reused else ""
    return (f"The whole run took {total_s / 60:.1f} min: {verdict} (docs/design.md §8).{partial} What shorter budgets "
            "reach on validation: `docs/accuracy.md`.")


def write_report(out_dir: str | Path, profile: Profile, steps: list[dict]) -> Path:
    """Write ``out_dir/REPORT.md`` from the tables, figures and step times already on disk."""
    out_dir = Path(out_dir)
    tables = out_dir / "tables"
    read = lambda name: (tables / name).read_text() if (tables / name).exists() else "_not produced_\n"  # noqa: E731
    table1 = pd.read_csv(tables / "table1.csv") if (tables / "table1.csv").exists() else pd.DataFrame()
    figures = sorted((out_dir / "figures").glob("*.png"))
    total = sum(s["seconds"] for s in steps)
    parts = [
        "# IG-RPN reproduction report",
        "",
        f"Profile **{profile.name}** (spacing {profile.spacing_mm} mm, backbone width {profile.width}, "
        f"{profile.epochs_text()}, batch {profile.batch_size}). Generated by `python -m igrpn.reproduce "
        f"--profile {profile.name}`.",
        "",
        "> **Our numbers come from a synthetic fetal-face ultrasound phantom** (`igrpn.phantom`), not from "
        "the paper's 152 private volumes, and (for the `cpu` profile) at half the paper's resolution. "
        "They test whether the method and its claims behave as the paper says on data with the same "
        "difficulties (speckle, shadows, arbitrary pose, look-alike distractors); they are not "
        "comparable to the paper's numbers as a benchmark. Each cell reads *ours (paper)*; brackets are "
        "95 % bootstrap confidence intervals over test volumes. Percentages as the paper prints them.",
        "",
        "## Table 1 — methods",
        "",
        read("table1.md"),
        "## Table 2 — ablation of the IoU-balanced loss and the graph prior",
        "",
        read("table2.md"),
        "## Ranking of the methods, here and in the paper",
        "",
        ranking_markdown(table1) if len(table1) else "_no table_",
        "## Better than ignoring the image?",
        "",
        reference_intro(table1) if len(table1) else "_no table_",
        "",
        read("reference.md"),
        "## The paper's claims, tested here",
        "",
        "Paired bootstrap over test volumes (Δ = after − before; a negative Δ d-mean is an improvement). "
        "A claim *holds* when the d-mean falls and the 95 % interval of the change excludes zero.",
        "",
        read("claims.md"),
        "## The issues' accuracy targets",
        "",
        targets_markdown(table1, pd.read_csv(tables / "table2.csv"), out_dir)
        if len(table1) and (tables / "table2.csv").exists() else "_no table_",
        "## Two seeds of the RPN",
        "",
        "The RPN with IoU balance (Table 2's row) trained once more with the next seed (`rpn_ib_seed1`): "
        "the difference between two seeds is the scale below which a change of recipe cannot be "
        "ranked from one run.",
        "",
        seed_spread_markdown(pd.read_csv(tables / "results.csv")) if (tables / "results.csv").exists()
        else "_not produced_\n",
        "## Per landmark",
        "",
        "Mean (median) distance of each landmark's answer to its ground truth, test split, mm.",
        "",
        per_landmark_markdown(pd.read_csv(tables / "per_landmark.csv"))
        if (tables / "per_landmark.csv").exists() else "_not produced_\n",
        "## The eyes: found, and named",
        "",
        "The eye distances above mix two failures: missing an eye, and finding both but calling the "
        "left one right (the two answers are named by the face's handedness, taken from the brow and "
        "nose answers). As a pair, the nearer of the two namings counts.",
        "",
        read("eyes.md"),
        *peer_section(tables, pd.read_csv(EXPERIMENTS_CSV) if EXPERIMENTS_CSV.exists() else pd.DataFrame()),
        "## The AP column",
        "",
        _ap_column_note(table1) if len(table1) else "_no table_",
        "",
        "## Figures",
        "",
        *[f"![{f.stem}](figures/{f.name})\n" for f in figures],
        "## Decisions where the paper is silent or ambiguous (docs/design.md §10)",
        "",
        design_decisions(),
        "## What differs from the paper, and why",
        "",
        "- Data: a deterministic synthetic phantom (152 volumes, 120 train / 32 test, 128³ at 1.3 mm) "
        "instead of the private clinical volumes.",
        f"- Resolution: the `{profile.name}` profile resamples to {profile.spacing_mm} mm "
        f"({'the paper' if profile.spacing_mm == 1.3 else 'coarser than the paper'}'s 1.3 mm); sizes are "
        "set in mm so the anatomy and the boxes are the same.",
        f"- Training budget: {profile.epochs_text()} with backbone width {profile.width} so that all seven "
        "trainings (six configurations and a second seed of the RPN) fit on a 2-core CPU (the wall time of "
        "each is below); the paper trained on a GPU for longer."
        + (f" Per-method settings: {profile.settings_text()}." if profile.settings_by_method else ""),
        "- Time column: measured on this machine's CPU (below), per volume, model and post-processing; the "
        "paper's times are on its GPU.",
        "",
        read("../benchmarks.md") if (out_dir / "benchmarks.md").exists() else "",
        "## Environment and wall time",
        "",
        f"- Device: {_device()}",
        "- Packages: " + ", ".join(f"{k} {v}" for k, v in _package_versions().items()),
        "",
        "| step | seconds | checkpoint reused | its epochs when trained, from the log (s) |",
        "|---|---|---|---|",
        *[f"| {s['step']} | {s['seconds']:.0f} | {'yes' if s.get('reused') else ''} | "
          f"{format_value(training_seconds(out_dir, s['step']), 0)} |" for s in steps],
        f"| **total** | **{total:.0f}** | | |",
        "",
        _budget_sentence(profile, total, reused=any(s.get("reused") for s in steps)),
        "",
        "A reused training's step only re-executes its notebook; the last column is the time its epochs "
        "took when it was trained (optimiser steps, validation excluded: the sum of the epoch times in "
        "`runs/<run>/log.csv`).",
        "",
        "Executed notebooks: `notebooks/*.ipynb` and their `.html` renderings beside them.",
        "",
    ]
    path = out_dir / "REPORT.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path
