"""The experiment runner: its configuration language, its log and one budgeted run end to end."""

import dataclasses

import pandas as pd
import pytest

from igrpn.training import experiment
from igrpn.config import get_profile


def test_overrides_are_checked_against_the_profile_fields():
    base = get_profile("cpu")
    overrides = experiment.parse_overrides(["optimizer=sgd", "lr=1e-2", "focal_gamma=2", "top_k=3"], base)
    assert overrides == {"optimizer": "sgd", "lr": 0.01, "focal_gamma": 2.0, "top_k": 3}
    assert isinstance(overrides["focal_gamma"], float)
    assert experiment.change_text(overrides) == "optimizer=sgd; lr=0.01; focal_gamma=2.0; top_k=3"
    assert experiment.change_text({}) == "baseline"
    with pytest.raises(ValueError, match="no field 'learning_rate'"):
        experiment.parse_overrides(["learning_rate=0.1"], base)
    with pytest.raises(ValueError, match="expected FIELD=VALUE"):
        experiment.parse_overrides(["lr"], base)
    with pytest.raises(ValueError, match="top_k is a int"):
        experiment.parse_overrides(["top_k=two"], base)


def test_an_override_wins_over_the_methods_own_settings():
    # the cpu profile gives the RPN SGD at lr 0.01 (settings_by_method); --set lr=0.05 must reach it
    profile = experiment.run_profile("cpu", "rpn", {"lr": 0.05, "anchor_shapes": "cubes"})
    assert (profile.lr, profile.optimizer, profile.anchor_shapes) == (0.05, "sgd", "cubes")
    # the heatmap has no per-method settings: it keeps the profile's own optimizer
    assert experiment.run_profile("cpu", "heatmap", {}).optimizer == "adamw"
    # the SSD shares the RPN's optimizer but keeps its own negatives (the 3:1 miner)
    ssd = experiment.run_profile("cpu", "ssd", {})
    assert ssd.optimizer == "sgd" and ssd.classification_anchors != "all"


def test_a_bad_setting_is_a_usage_error_before_any_training(capsys):
    with pytest.raises(SystemExit) as exit_info:
        experiment.main(["--name", "x", "--minutes", "1", "--set", "optimizer=adam"])
    assert exit_info.value.code == 2
    assert "optimizer must be one of" in capsys.readouterr().err


def test_an_epoch_budget_trains_those_epochs_and_logs_no_seconds_budget(smoke_manifest, tmp_path, capsys):
    log = tmp_path / "experiments.csv"
    row = experiment.run_one("epochs", {"epochs": 1}, "rpn", True, 0, None, smoke_manifest, tmp_path / "runs", log,
                             base="smoke", progress=False)
    # one epoch of the smoke profile's 6 training volumes (8 minus the quarter held out), batch 2
    assert row["steps"] == 3 and row["epochs"] == pytest.approx(1.0)
    table = pd.read_csv(log)
    assert table["budget_s"].isna().all() and table["change"].tolist() == ["epochs=1"]
    with pytest.raises(SystemExit) as exit_info:
        experiment.main(["--name", "x", "--minutes", "1", "--epochs", "2"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(ValueError, match="wall-clock budget only"):
        experiment.run_one("peer", {}, experiment.PEER_METHOD, True, 0, None, smoke_manifest, tmp_path / "runs", log,
                           base="smoke", progress=False)


def test_one_budgeted_run_appends_one_row_scored_on_validation(smoke_manifest, tmp_path):
    log = tmp_path / "experiments.csv"
    for seed in (0, 1):
        row = experiment.run_one("smoke_run", {"lr": 3e-3}, "rpn", True, seed, 1.5, smoke_manifest,
                                 tmp_path / "runs", log, base="smoke", progress=False)
        assert row["val_cases"] == 2  # a quarter of the smoke profile's 8 training volumes
    # A finished training scored afterwards gets the same validation score as the runner gave it.
    again = experiment.score_checkpoint("again", tmp_path / "runs" / "smoke_run" / "seed1" / "checkpoint.pt",
                                        smoke_manifest, tmp_path / "scored.csv", base="smoke")
    assert again["val_d_mean"] == pytest.approx(row["val_d_mean"]) and again["change"] == "lr=0.003"
    table = pd.read_csv(log)
    assert list(table.columns) == list(experiment.LOG_COLUMNS)
    assert list(table["seed"]) == [0, 1] and set(table["change"]) == {"lr=0.003"}
    # IG-RPN is scored on the same hold-out, with a prior fitted on the run's training volumes only
    assert table["val_prior_d_mean"].notna().all() and table["val_prior_eyes_found"].str.endswith("/2").all()
    assert (table["steps"] >= 1).all() and table["val_d_mean"].notna().all()
    # the validation cases are the run's own hold-out, never the test split
    from igrpn.training import loop as train
    from igrpn.data import read_manifest

    manifest = read_manifest(smoke_manifest)
    train_ids = list(manifest.loc[manifest["split"] == "train", "case_id"])
    profile = dataclasses.replace(get_profile("smoke"), lr=3e-3)
    assert len(train.split_train_val(train_ids, profile.val_fraction, 0)[1]) == 2


def test_step_times_come_per_configuration_and_round(smoke_manifest, capsys):
    profiles = [experiment.run_profile("smoke", "rpn", {}), experiment.run_profile("smoke", "rpn", {"head_convs": 3})]
    seconds = experiment.step_seconds(profiles, "rpn", smoke_manifest, rounds=2, steps=1)
    assert len(seconds) == 2 and all(len(r) == 2 and min(r) > 0 for r in seconds)
    assert experiment.main(["steptime", "--base", "smoke", "--manifest", str(smoke_manifest), "--rounds", "1",
                            "--steps", "1", "--configs", "", "head_convs=3; anchor_shapes=cubes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("baseline") and "x1.00" in lines[0]
    assert lines[1].startswith("head_convs=3; anchor_shapes=cubes") and "s/step" in lines[1]


def test_a_log_with_fewer_columns_is_rewritten_with_todays(tmp_path):
    log = tmp_path / "experiments.csv"
    old_columns = [c for c in experiment.LOG_COLUMNS if not c.startswith("val_prior")]
    log.write_text(",".join(old_columns) + "\n" + ",".join("old" if c == "name" else "" for c in old_columns) + "\n")
    experiment.append_row({"name": "new", "val_prior_d_mean": 4.25}, log)
    table = pd.read_csv(log)
    assert list(table.columns) == list(experiment.LOG_COLUMNS)
    assert list(table["name"]) == ["old", "new"]
    assert pd.isna(table["val_prior_d_mean"][0]) and table["val_prior_d_mean"][1] == 4.25


def test_a_log_with_unknown_columns_is_refused_not_rewritten(tmp_path):
    log = tmp_path / "experiments.csv"
    log.write_text("name,mystery\nold,1\n")
    with pytest.raises(ValueError, match="mystery"):
        experiment.append_row({"name": "new"}, log)
    assert log.read_text() == "name,mystery\nold,1\n"
