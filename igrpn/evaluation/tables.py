"""Table 1, Table 2, the reference table and the paper's claims, beside the paper's numbers.

Percentages are printed as the paper prints them (AP, hit rates and mIoU × 100); distances in mm;
times in ms per volume on the machine that ran the evaluation (docs/design.md §7).
"""

from __future__ import annotations

import io
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from igrpn.config import LANDMARKS, RUN_CONFIGS
from igrpn.evaluation import metrics
from igrpn.evaluation.answers import configuration_label
from igrpn.io import atomic_write_files


#: Metrics of the tables, in the paper's order, then ours beyond the paper.
PAPER_METRICS = ("ap", "ap35", "ap50", "ap75", "miou", "d_mean", "time_ms")
EXTRA_METRICS = ("hit35", "hit50", "hit75")
PERCENT_METRICS = ("ap", "ap35", "ap50", "ap75", "miou", "hit35", "hit50", "hit75")
CI_METRICS = ("d_mean", "ap", "ap50", "hit50", "miou")
#: The image-blind reference: every landmark answered at its mean position over the training
#: annotations (world mm), whatever the volume shows. A method that does not beat it has learnt
#: where faces usually are, not where this face is.
REFERENCE_RUN = "mean_position"
REFERENCE_LABEL = "Mean training position (no image)"
#: (row label, run name, prior) of Table 1; the paper's detector column names the paper's row.
TABLE1_ROWS = (
    ("Faster R-CNN", "faster_rcnn", False),
    ("IG-SSD", "ssd_ib", True),
    ("Heatmap", "heatmap", False),
    ("IG-RPN", "rpn_ib", True),
    (REFERENCE_LABEL, REFERENCE_RUN, False),
)
#: Table 2: each detector with and without the IoU-balanced loss and the prior.
TABLE2_ROWS = tuple(
    (label, f"{detector}_{'ib' if balance else 'noib'}", prior)
    for label, detector in (("SSD", "ssd"), ("RPN", "rpn"))
    for balance, prior in ((False, False), (True, False), (False, True), (True, True))
)
#: The paper's claims tested with paired bootstraps: (claim, (run, prior) before, (run, prior) after).
CLAIMS = (
    ("RPN: the prior helps", ("rpn_ib", False), ("rpn_ib", True)),
    ("RPN: the IoU balance helps", ("rpn_noib", False), ("rpn_ib", False)),
    ("RPN: both together help most", ("rpn_noib", False), ("rpn_ib", True)),
    ("SSD: the prior helps", ("ssd_ib", False), ("ssd_ib", True)),
    ("SSD: the IoU balance helps", ("ssd_noib", False), ("ssd_ib", False)),
    ("SSD: both together help most", ("ssd_noib", False), ("ssd_ib", True)),
    ("IG-RPN beats Faster R-CNN", ("faster_rcnn", False), ("rpn_ib", True)),
    ("IG-RPN beats IG-SSD", ("ssd_ib", True), ("rpn_ib", True)),
    ("IG-RPN beats heatmap regression", ("heatmap", False), ("rpn_ib", True)),
)


def paper_tables() -> pd.DataFrame:
    """The paper's Table 1 and 2, typed in once as data (``igrpn/resources/paper_tables.csv``)."""
    text = resources.files("igrpn").joinpath("resources/paper_tables.csv").read_text()
    table = pd.read_csv(io.StringIO(text))
    table = table.rename(columns={"d_mean_mm": "d_mean"})
    return table


def scores_record(chosen: pd.DataFrame, gt: pd.DataFrame, n_boot: int, seed: int) -> dict:
    """Table metrics (fractions) and their bootstrap CIs of one configuration's answers."""

    scores = metrics.evaluate(chosen, gt)
    intervals = metrics.bootstrap_ci(chosen, gt, n_boot=n_boot, seed=seed)
    record = {k: scores[k] for k in (*PAPER_METRICS[:-1], *EXTRA_METRICS)}
    for key in CI_METRICS:
        if key in intervals:
            record[f"{key}_lo"], record[f"{key}_hi"] = intervals[key]
    return record


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    atomic_write_files({path: frame.to_csv(index=False)})


def build_table(results: pd.DataFrame, rows, table_number: int) -> pd.DataFrame:
    """One of the paper's tables from our results, the paper's numbers beside ours.

    Columns: ``method, run, iou_balance, prior``, our metrics (percentages as the paper prints
    them), their CI columns, and ``paper_<metric>``. A run that was not trained gets a row that
    says so in ``status``.
    """
    paper = paper_tables()
    paper = paper[paper["table"] == table_number]
    out = []
    for label, run, use_prior in rows:
        method, iou_balance = RUN_CONFIGS.get(run, ("reference", False))
        row = {"method": label, "run": run, "iou_balance": iou_balance, "prior": use_prior}
        ours = results[(results["run"] == run) & (results["prior"] == use_prior)] if len(results) else results
        if len(ours):
            ours = ours.iloc[0]
            for key in (*PAPER_METRICS, *EXTRA_METRICS):
                value = ours[key]
                row[key] = 100.0 * value if key in PERCENT_METRICS else value
            for key in CI_METRICS:
                scale = 100.0 if key in PERCENT_METRICS else 1.0
                for end in ("lo", "hi"):
                    column = f"{key}_{end}"
                    row[column] = scale * ours[column] if column in ours and pd.notna(ours[column]) else np.nan
            row["status"] = "ok"
        else:
            row["status"] = "not trained" if run in RUN_CONFIGS else "no training split"
        if table_number == 1:
            match = paper[paper["method"] == label]
        else:
            match = paper[(paper["detector"] == method)
                          & (paper["iou_balance"].fillna(0).astype(int) == int(iou_balance))
                          & (paper["prior"].fillna(0).astype(int) == int(use_prior))]
        for key in PAPER_METRICS:
            row[f"paper_{key}"] = float(match.iloc[0][key]) if len(match) and pd.notna(match.iloc[0][key]) else np.nan
        out.append(row)
    table = pd.DataFrame.from_records(out)
    # Heatmap regression has no boxes: the paper prints "–" for its AP and IoU columns.
    for key in ("ap", "ap35", "ap50", "ap75", "miou", "hit35", "hit50", "hit75", "ap_lo", "ap_hi",
                "ap50_lo", "ap50_hi", "hit50_lo", "hit50_hi", "miou_lo", "miou_hi"):
        if key in table:
            table.loc[table["run"] == "heatmap", key] = np.nan
    return table


def verdict(lo: float, hi: float) -> str:
    """Reading of a 95 % interval of the change in d-mean (after − before, mm): "holds" when the
    whole interval is an improvement, "contradicted" when it is all a deterioration, else
    "not shown"."""
    if hi < 0:
        return "holds"
    if lo > 0:
        return "contradicted"
    return "not shown"


def comparison(lo: float, hi: float) -> str:
    """A paired Δ d-mean interval (second − first, mm) as "better", "worse" or "not distinguishable"."""
    return {"holds": "better", "contradicted": "worse"}.get(verdict(lo, hi), "not distinguishable")


def claims_table(evaluation: dict, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Paired bootstraps over test volumes for each of the paper's claims (d-mean and hit50)."""

    predictions, gt = evaluation["predictions"], evaluation["gt"]
    records = []
    for claim, before, after in CLAIMS:
        if before not in predictions or after not in predictions:
            records.append({"claim": claim, "status": "not trained"})
            continue
        record = {"claim": claim, "before": configuration_label(*before), "after": configuration_label(*after),
                  "status": "ok"}
        for metric in ("d_mean", "hit50", "ap50"):
            if "heatmap" in (before[0], after[0]) and metric != "d_mean":
                continue
            test = metrics.paired_bootstrap(predictions[before], predictions[after], gt, metric=metric,
                                            n_boot=n_boot, seed=seed)
            scale = 1.0 if metric == "d_mean" else 100.0
            record[f"{metric}_diff"] = scale * test["diff"]
            record[f"{metric}_lo"] = scale * test["lo"]
            record[f"{metric}_hi"] = scale * test["hi"]
            record[f"{metric}_p"] = test["p_value"]
        record["verdict"] = verdict(record["d_mean_lo"], record["d_mean_hi"])
        records.append(record)
    return pd.DataFrame.from_records(records)


def reference_table(evaluation: dict, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Each configuration against the image-blind reference: paired bootstrap of Δ d-mean (mm,
    configuration − reference; negative = better than ignoring the image)."""

    predictions, gt = evaluation["predictions"], evaluation["gt"]
    reference = predictions.get((REFERENCE_RUN, False))
    records = []
    for (run, use_prior), chosen in predictions.items():
        if reference is None or run == REFERENCE_RUN:
            continue
        test = metrics.paired_bootstrap(reference, chosen, gt, metric="d_mean", n_boot=n_boot, seed=seed)
        records.append({"run": run, "prior": use_prior, "d_mean_diff": test["diff"], "d_mean_lo": test["lo"],
                        "d_mean_hi": test["hi"], "p_value": test["p_value"],
                        "verdict": comparison(test["lo"], test["hi"])})
    return pd.DataFrame.from_records(records, columns=["run", "prior", "d_mean_diff", "d_mean_lo", "d_mean_hi",
                                                       "p_value", "verdict"])


def reference_markdown(frame: pd.DataFrame) -> str:
    lines = ["| configuration | Δ d-mean vs the image-blind answer, mm [95 % CI] | p | than ignoring the image |",
             "|---|---|---|---|"]
    for row in frame.itertuples():
        lines.append(f"| {configuration_label(row.run, row.prior)} | {row.d_mean_diff:+.2f} "
                     f"[{row.d_mean_lo:+.2f}, {row.d_mean_hi:+.2f}] | {row.p_value:.3f} | {row.verdict} |")
    return "\n".join(lines) + "\n"


def format_value(value, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def table_markdown(table: pd.DataFrame) -> str:
    """The table as Markdown: each metric as "ours (paper)", 95 % CIs on d-mean and AP50."""
    header = ["Method", "IoU bal.", "Prior", "AP", "AP35", "AP50", "AP75", "mIoU", "d-mean (mm)",
              "time (ms)", "hit35", "hit50", "hit75"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [row["method"], "✓" if row["iou_balance"] else "", "✓" if row["prior"] else ""]
        if row["status"] != "ok":
            cells += [f"{row['status']} ({format_value(row['paper_' + k], 0 if k == 'time_ms' else 2)})"
                      for k in PAPER_METRICS]
            cells += ["–"] * 3
        else:
            for key in PAPER_METRICS:
                ours = format_value(row[key], 0 if key == "time_ms" else 2)
                if key in ("d_mean", "ap50") and pd.notna(row.get(f"{key}_lo", np.nan)):
                    ours += f" [{format_value(row[f'{key}_lo'])}, {format_value(row[f'{key}_hi'])}]"
                cells.append(f"{ours} ({format_value(row['paper_' + key], 0 if key == 'time_ms' else 2)})")
            cells += [format_value(row[k]) for k in EXTRA_METRICS]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def claims_markdown(claims: pd.DataFrame) -> str:
    header = ["Claim (paper)", "before → after", "Δ d-mean mm [95 % CI]", "Δ hit50 pts [95 % CI]",
              "Δ AP50 pts [95 % CI]", "here"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in claims.iterrows():
        if row.get("status") != "ok":
            lines.append(f"| {row['claim']} | – | – | – | – | not trained |")
            continue
        cells = [row["claim"], f"{row['before']} → {row['after']}"]
        for metric in ("d_mean", "hit50", "ap50"):
            if pd.notna(row.get(f"{metric}_diff", np.nan)):
                cells.append(f"{row[f'{metric}_diff']:+.2f} [{row[f'{metric}_lo']:+.2f}, {row[f'{metric}_hi']:+.2f}]")
            else:
                cells.append("–")
        cells.append(row["verdict"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(evaluation: dict, tables_dir: str | Path, n_boot: int = 1000, seed: int = 0) -> dict:
    """Write ``table1``/``table2``, ``claims``, ``eyes`` and ``reference`` (csv + md) and ``results.csv``."""
    tables_dir = Path(tables_dir)
    tables_dir.mkdir(parents=True, exist_ok=True)
    results = evaluation["results"]
    table1 = build_table(results, TABLE1_ROWS, 1)
    table2 = build_table(results, TABLE2_ROWS, 2)
    claims = claims_table(evaluation, n_boot=n_boot, seed=seed)
    for name, frame in (("table1", table1), ("table2", table2), ("claims", claims), ("results", results)):
        write_csv(frame, tables_dir / f"{name}.csv")
    (tables_dir / "table1.md").write_text(table_markdown(table1))
    (tables_dir / "table2.md").write_text(table_markdown(table2))
    (tables_dir / "claims.md").write_text(claims_markdown(claims))
    eyes = eye_pair_table(evaluation)
    write_csv(eyes, tables_dir / "eyes.csv")
    (tables_dir / "eyes.md").write_text(eye_pair_markdown(eyes))
    reference = reference_table(evaluation, n_boot=n_boot, seed=seed)
    write_csv(reference, tables_dir / "reference.csv")
    (tables_dir / "reference.md").write_text(reference_markdown(reference))
    return {"table1": table1, "table2": table2, "claims": claims, "eyes": eyes, "reference": reference}


def eye_pair_table(evaluation: dict) -> pd.DataFrame:
    """Per configuration (run, prior): the eyes found as a pair and named right or not
    (:func:`igrpn.metrics.eye_pair`)."""

    records = [{"run": run, "prior": use_prior, **metrics.eye_pair(chosen, evaluation["gt"])}
               for (run, use_prior), chosen in evaluation["predictions"].items()]
    return pd.DataFrame.from_records(records, columns=["run", "prior", "n_cases", "named_mm", "pair_mm",
                                                       "found", "swapped", "found_mm"])


def eye_pair_markdown(eyes: pd.DataFrame) -> str:
    within = f"{eyes['found_mm'].iloc[0]:g} mm" if len(eyes) else "the distance"
    lines = ["| configuration | eye d-mean as named (mm) | as a pair, nearer naming (mm) | both eyes within "
             f"{within} | of those, named the wrong way round |", "|---|---|---|---|---|"]
    for row in eyes.itertuples():
        lines.append(f"| {configuration_label(row.run, row.prior)} | {format_value(row.named_mm)} | {format_value(row.pair_mm)} "
                     f"| {row.found} / {row.n_cases} | {row.swapped} |")
    return "\n".join(lines) + "\n"


def per_landmark_markdown(per_landmark: pd.DataFrame) -> str:
    """Mean (median) distance per landmark and configuration, mm, from notebook 03's
    ``per_landmark.csv`` (columns ``config, landmark, d_mean, d_median``)."""
    names = [n for n in LANDMARKS if n in set(per_landmark["landmark"])]
    lines = ["| configuration | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for config, rows in per_landmark.groupby("config", sort=False):
        rows = rows.set_index("landmark")
        lines.append(f"| {config} | " + " | ".join(
            f"{format_value(rows.loc[n, 'd_mean'], 1)} ({format_value(rows.loc[n, 'd_median'], 1)})" if n in rows.index else "–"
            for n in names) + " |")
    return "\n".join(lines) + "\n"


def ranking_markdown(table1: pd.DataFrame) -> str:
    """Table 1's methods ranked by d-mean here and in the paper, and where the two orders agree."""
    rows = table1[(table1["status"] == "ok") & (table1["method"] != REFERENCE_LABEL)]
    if rows.empty:
        return "_no trained method_\n"
    ours = list(rows.sort_values("d_mean")["method"])
    paper = list(rows.sort_values("paper_d_mean")["method"])
    lines = [f"- By d-mean, best first — here: {' < '.join(ours)}; the paper: {' < '.join(paper)}."]
    agree = [m for m, n in zip(ours, paper) if m == n]
    lines.append(f"- Places that agree: {', '.join(agree) if agree else 'none'}."
                 + (" The orders are the same." if ours == paper else " The orders differ."))
    best = rows.sort_values("d_mean").iloc[0]
    lines.append(f"- Our best method, {best['method']}, reaches {best['d_mean']:.2f} mm against the "
                 f"paper's {best['paper_d_mean']:.2f} mm for it: the gap to the paper is far larger than "
                 "any difference between methods, so the ranking here says little about the paper's.")
    return "\n".join(lines) + "\n"
