"""Tables beside the paper's numbers, and the reading of the paper's claims."""

import re

import numpy as np
import pandas as pd
import pytest

from igrpn.evaluation import report, tables
from igrpn.evaluation.answers import mean_position_answers


def test_paper_tables_are_the_typed_in_data():
    paper = tables.paper_tables()
    ig_rpn = paper[(paper["table"] == 1) & (paper["method"] == "IG-RPN")].iloc[0]
    assert ig_rpn["d_mean"] == pytest.approx(4.38) and ig_rpn["ap50"] == pytest.approx(82.50)
    assert len(paper[paper["table"] == 2]) == 8


def test_table_puts_percentages_and_paper_numbers_beside_ours():
    results = pd.DataFrame([{
        "run": "rpn_ib", "method": "rpn", "iou_balance": True, "prior": True, "ap": 0.3, "ap35": 0.9,
        "ap50": 0.8, "ap75": 0.2, "miou": 0.6, "d_mean": 4.0, "time_ms": 100.0, "hit35": 0.95,
        "hit50": 0.85, "hit75": 0.25, "d_mean_lo": 3.5, "d_mean_hi": 4.5, "ap50_lo": 0.7, "ap50_hi": 0.9,
    }])
    table = tables.build_table(results, tables.TABLE1_ROWS, 1)
    row = table[table["method"] == "IG-RPN"].iloc[0]
    assert row["status"] == "ok" and row["ap50"] == pytest.approx(80.0) and row["d_mean"] == 4.0
    assert row["paper_ap50"] == pytest.approx(82.50) and row["paper_time_ms"] == 515
    others = table[~table["method"].isin(["IG-RPN", tables.REFERENCE_LABEL])]
    assert (others["status"] == "not trained").all()
    assert table.iloc[-1]["status"] == "no training split"  # no reference row in these results
    markdown = tables.table_markdown(table)
    assert "80.00 [70.00, 90.00] (82.50)" in markdown and "not trained (4.74)" in markdown
    table2 = tables.build_table(results, tables.TABLE2_ROWS, 2)
    rpn_rows = table2[table2["method"] == "RPN"]
    assert list(rpn_rows["paper_d_mean"]) == [4.77, 4.43, 4.52, 4.38]


@pytest.mark.parametrize("lo, hi, expected", [(-2.0, -0.5, "holds"), (-1.0, 1.0, "not shown"),
                                              (0.2, 1.5, "contradicted")])
def test_claim_verdicts_follow_the_interval(lo, hi, expected):
    assert tables.verdict(lo, hi) == expected


def test_claims_table_reads_paired_bootstraps():
    gt = pd.DataFrame([{"case_id": f"c{i}", "landmark": "chin", "x": 0.0, "y": 0.0, "z": 0.0,
                        "w": 31.2, "h": 31.2, "d": 31.2} for i in range(10)])
    near = gt.assign(score=0.9, x=1.0)
    far = gt.assign(score=0.9, x=np.linspace(5, 9, 10))
    evaluation = {"gt": gt, "predictions": {("rpn_ib", False): far, ("rpn_ib", True): near}}
    claims = tables.claims_table(evaluation, n_boot=200)
    prior_claim = claims[claims["claim"] == "RPN: the prior helps"].iloc[0]
    assert prior_claim["verdict"] == "holds" and prior_claim["d_mean_diff"] == pytest.approx(-6.0)
    assert (claims.loc[claims["claim"] != "RPN: the prior helps", "status"] == "not trained").all()


def test_ranking_compares_our_order_with_the_papers():
    table = pd.DataFrame([
        {"method": "A", "status": "ok", "d_mean": 3.0, "paper_d_mean": 5.0},
        {"method": "B", "status": "ok", "d_mean": 4.0, "paper_d_mean": 4.0},
        {"method": "C", "status": "not trained", "d_mean": np.nan, "paper_d_mean": 1.0},
    ])
    text = tables.ranking_markdown(table)
    assert "here: A < B; the paper: B < A" in text and "The orders differ" in text


def test_mean_position_answers_every_case_at_the_training_mean():
    train = np.zeros((2, 5, 3))
    train[1] += np.arange(15).reshape(5, 3)  # the mean is half of this
    answers = mean_position_answers(train, ["a", "b"])
    assert len(answers) == 10 and answers["selected"].all()
    chin = answers[(answers["case_id"] == "b") & (answers["landmark"] == "chin")].iloc[0]
    assert (chin["x"], chin["y"], chin["z"]) == (6.0, 6.5, 7.0) and chin["w"] == pytest.approx(31.2)
    with pytest.raises(ValueError, match=r"\(N, 5, 3\)"):
        mean_position_answers(np.zeros((0, 5, 3)), ["a"])


def test_reference_table_says_whether_a_method_beats_ignoring_the_image():
    gt = pd.DataFrame([{"case_id": f"c{i}", "landmark": "chin", "x": 10.0 * (i % 3), "y": 0.0, "z": 0.0,
                        "w": 31.2, "h": 31.2, "d": 31.2} for i in range(12)])
    reference = gt.assign(score=1.0, x=10.0)  # the mean position: 0 or 10 mm off
    good = gt.assign(score=0.9, x=gt["x"] + 1.0)  # 1 mm off everywhere
    bad = gt.assign(score=0.9, x=gt["x"] + 25.0)
    evaluation = {"gt": gt, "predictions": {(tables.REFERENCE_RUN, False): reference,
                                            ("rpn_ib", False): good, ("ssd_ib", True): bad}}
    frame = tables.reference_table(evaluation, n_boot=200).set_index("run")
    assert frame.loc["rpn_ib", "verdict"] == "better" and frame.loc["ssd_ib", "verdict"] == "worse"
    assert frame.loc["rpn_ib", "d_mean_diff"] == pytest.approx(1.0 - 20.0 / 3)
    assert "ssd_ib + prior" in tables.reference_markdown(frame.reset_index())


def test_per_landmark_markdown_gives_mean_and_median_per_configuration():
    frame = pd.DataFrame([{"config": "rpn_ib", "landmark": "chin", "d_mean": 30.04, "d_median": 28.0},
                          {"config": "rpn_ib", "landmark": "left_eye", "d_mean": 2.0, "d_median": 1.0},
                          {"config": "mean_position", "landmark": "chin", "d_mean": 31.0, "d_median": 29.0}])
    text = tables.per_landmark_markdown(frame)
    assert "| configuration | left_eye | chin |" in text
    assert "| rpn_ib | 2.0 (1.0) | 30.0 (28.0) |" in text and "| mean_position | – | 31.0 (29.0) |" in text


def test_training_seconds_come_from_the_runs_log(tmp_path):
    run = tmp_path / "runs" / "rpn_ib"
    run.mkdir(parents=True)
    pd.DataFrame([{"kind": "step", "seconds": np.nan}, {"kind": "epoch", "seconds": 20.5},
                  {"kind": "epoch", "seconds": 21.0}]).to_csv(run / "log.csv", index=False)
    assert report.training_seconds(tmp_path, "02_train rpn_ib") == pytest.approx(41.5)
    assert np.isnan(report.training_seconds(tmp_path, "03_evaluate"))
    assert np.isnan(report.training_seconds(tmp_path, "02_train ssd_ib"))


def test_seed_spread_gives_each_seed_and_their_difference():
    from igrpn.evaluation.report import seed_spread_markdown

    results = pd.DataFrame([
        {"run": "rpn_ib", "prior": False, "d_mean": 10.0, "hit50": 0.5},
        {"run": "rpn_ib_seed1", "prior": False, "d_mean": 12.5, "hit50": 0.4},
        {"run": "rpn_ib", "prior": True, "d_mean": 9.0, "hit50": 0.6},
    ])
    text = seed_spread_markdown(results)
    assert "| rpn_ib | 10.00, 50.0 | 12.50, 40.0 | 2.50 |" in text
    assert "+ prior" not in text  # the second seed has no row with the prior
    assert "not trained" in seed_spread_markdown(results[results["run"] == "rpn_ib"])


def test_peer_section_lists_the_runs_at_the_peers_budget():
    from igrpn.evaluation.report import peer_markdown

    rows = pd.DataFrame([
        {"budget_s": 480.0, "name": "peer", "method": "monai_retinanet", "val_d_mean": 12.0, "val_hit50": 0.3},
        {"budget_s": 480.0, "name": "peer", "method": "monai_retinanet", "val_d_mean": 14.0, "val_hit50": 0.1},
        {"budget_s": 450.0, "name": "sgd", "method": "rpn", "val_d_mean": 11.0, "val_hit50": 0.4,
         "val_prior_d_mean": 10.0},
        {"budget_s": 510.0, "name": "sgd", "method": "rpn", "val_d_mean": 13.0, "val_hit50": 0.2,
         "val_prior_d_mean": 9.0},
        {"budget_s": 240.0, "name": "sgd4", "method": "rpn", "val_d_mean": 20.0, "val_hit50": 0.1},
    ])
    text = peer_markdown(rows)
    # the peer has no graph prior: its prior column is a dash
    assert "| 8.0 | peer | monai_retinanet | 2 | 13.00 [12.00–14.00] | 20.0 | – |" in text
    assert "| 7.5–8.5 | sgd | rpn | 2 | 12.00 [11.00–13.00] | 30.0 | 9.50 [9.00–10.00] |" in text
    assert "sgd4" not in text
    assert peer_markdown(rows[rows["method"] == "rpn"]) == ""


def test_targets_read_the_tables_and_say_which_are_met(tmp_path):
    from igrpn.evaluation.report import targets_markdown

    (tmp_path / "tables").mkdir()
    pd.DataFrame([{"run": "rpn_ib", "prior": False, "found": 29}, {"run": "rpn_ib", "prior": True, "found": 3}]
                 ).to_csv(tmp_path / "tables" / "eyes.csv", index=False)
    pd.DataFrame([{"run": "rpn_ib", "prior": False, "verdict": "better"},
                  {"run": "ssd_ib", "prior": False, "verdict": "not distinguishable"},
                  {"run": "ssd_ib", "prior": True, "verdict": "worse"}]).to_csv(tmp_path / "tables" / "reference.csv",
                                                                                 index=False)
    table1 = pd.DataFrame([{"method": "IG-RPN", "prior": True, "status": "ok", "d_mean": 5.5}])
    table2 = pd.DataFrame([{"method": "RPN", "prior": False, "iou_balance": True, "status": "ok", "d_mean": 9.0}])
    text = targets_markdown(table1, table2, tmp_path)
    assert "| RPN with IoU balance, top-1 (no prior): d-mean ≤ 8 mm | 9.00 | **no** |" in text
    assert "in ≥ 28 of 32 volumes | 29 | yes |" in text
    assert "| IG-RPN (IoU balance + prior): d-mean ≤ 6 mm | 5.50 | yes |" in text
    assert "| 1 of 2 | **no** |" in text  # only the configurations without the prior count


def _chin_cases(offset_mm: float, n: int = 12) -> pd.DataFrame:
    return pd.DataFrame([{"case_id": f"c{i}", "landmark": "chin", "x": 10.0 * (i % 3) + offset_mm, "y": 0.0,
                          "z": 0.0, "w": 31.2, "h": 31.2, "d": 31.2, "score": 0.9} for i in range(n)])


def test_peer_test_table_pairs_each_configuration_against_the_peer():
    gt = _chin_cases(0.0).drop(columns="score")
    predictions = {("rpn_ib", False): _chin_cases(2.0), ("rpn_ib", True): _chin_cases(12.0)}
    frame = report.peer_test_table(_chin_cases(10.0), predictions, gt, n_boot=200).set_index("configuration")
    assert list(frame.index) == ["monai_peer", "rpn_ib", "rpn_ib + prior"]
    assert frame.loc["monai_peer", "d_mean"] == pytest.approx(10.0) and pd.isna(frame.loc["monai_peer", "verdict"])
    # 2 mm off against the peer's 10 on every volume: 8 mm better, whatever the resample
    assert frame.loc["rpn_ib", "diff_vs_peer"] == pytest.approx(-8.0)
    assert frame.loc["rpn_ib", "verdict"] == "better" and frame.loc["rpn_ib + prior", "verdict"] == "worse"
    # a 31.2 mm cube 12 mm off has IoU 19.2 / 43.2 < 0.5; 2 mm off it is a hit
    assert frame.loc["rpn_ib + prior", "hit50"] == 0.0 and frame.loc["rpn_ib", "hit50"] == 1.0
    text = report.peer_test_markdown(frame.reset_index(), peer_seconds=600.0, rpn_seconds=612.0)
    assert "the peer trained 10.0 min, the RPN (`rpn_ib`) 10.2 min" in text
    assert "| rpn_ib | 2.00 [2.00, 2.00] | 100.0 | 0/0 | -8.00 [-8.00, -8.00] |" in text
    assert "| monai_peer | 10.00 [10.00, 10.00] | 100.0 | 0/0 | – | – | – |" in text


def test_peer_section_shows_the_test_split_and_validation_and_nothing_without_either(tmp_path):
    assert report.peer_section(tmp_path, pd.DataFrame()) == []
    (tmp_path / "peer_test.md").write_text("_The peer was not trained in this run: no MONAI._\n")
    text = "\n".join(report.peer_section(tmp_path, pd.DataFrame()))
    assert text.startswith("## Against a peer") and "no MONAI" in text and "experiment runner" not in text


def test_the_peer_target_reads_the_paired_test_comparison(tmp_path):
    assert report._peer_target_row(tmp_path).endswith("| not run |")
    pd.DataFrame([{"configuration": "monai_peer", "diff_vs_peer": np.nan, "verdict": np.nan},
                  {"configuration": "rpn_ib + prior", "diff_vs_peer": -1.5, "diff_lo": -2.5, "diff_hi": -0.5,
                   "verdict": "better"}]).to_csv(tmp_path / "peer_test.csv", index=False)
    assert report._peer_target_row(tmp_path).endswith("| Δ -1.50 mm [-2.50, -0.50] | yes |")


def test_the_wall_time_is_judged_against_the_cpu_budget():
    from igrpn.config import get_profile
    from igrpn.evaluation.report import _budget_sentence

    cpu = get_profile("cpu")
    assert "70.5 min: over the 60 minutes aimed at, within the 120 allowed" in _budget_sentence(cpu, 70.5 * 60)
    assert "within the aim" in _budget_sentence(cpu, 59 * 60) and "reused" not in _budget_sentence(cpu, 59 * 60)
    assert "a full run (`--force`) takes longer" in _budget_sentence(cpu, 59 * 60, reused=True)
    assert "over the 120 minutes allowed" in _budget_sentence(cpu, 121 * 60)
    assert _budget_sentence(get_profile("smoke"), 121 * 60) == ""


def test_design_decisions_are_section_10_of_the_design_document_one_heading_level_down(tmp_path):
    doc = tmp_path / "design.md"
    doc.write_text("# Design\n\n## 9. API\n\nnot this\n\n## 10. Decisions\n\nIntro.\n\n### 10.1 Boxes\n\nCubes.\n")
    assert report.design_decisions(doc) == "Intro.\n\n#### 10.1 Boxes\n\nCubes.\n"
    with pytest.raises(ValueError, match=r"design.md: no section starting with '## 10. '"):
        doc.write_text("# Design\n\n## 9. API\n")
        report.design_decisions(doc)
    with pytest.raises(FileNotFoundError, match="missing.md: the design document is missing"):
        report.design_decisions(tmp_path / "missing.md")


def test_the_report_repeats_every_decision_of_the_projects_design_document():
    text = report.design_decisions()
    decisions = re.findall(r"^#### (10\.\d+) ", text, flags=re.M)
    assert len(decisions) >= 20 and decisions[:3] == ["10.1", "10.2", "10.3"]
