"""Training on the smoke profile: the loss falls, checkpoints are safe and a killed run resumes."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from igrpn.checkpoint import CheckpointError, load_checkpoint
from igrpn.training import loop as train
from igrpn.config import get_profile


@pytest.fixture(scope="module")
def profile():
    # A few more epochs than `smoke` so a falling loss is visible; still seconds.
    return dataclasses.replace(get_profile("smoke"), epochs=4, lr=3e-3)


def test_run_name_and_validation_split_are_deterministic():
    assert train.run_name("rpn", True) == "rpn_ib"
    assert train.run_name("ssd", False) == "ssd_noib"
    assert train.run_name("heatmap", True) == "heatmap"
    ids = [f"c{i}" for i in range(20)]
    first = train.split_train_val(ids, 0.1, seed=3)
    assert first == train.split_train_val(ids, 0.1, seed=3)
    train_ids, val_ids = first
    assert len(val_ids) == 2 and not set(train_ids) & set(val_ids) and set(train_ids) | set(val_ids) == set(ids)


def test_learning_rate_warms_up_then_decays():
    rates = [train.learning_rate(step, 100, 1.0) for step in range(100)]
    assert rates[0] < rates[4] <= 1.0
    assert rates[-1] < 0.1 and all(a >= b - 1e-12 for a, b in zip(rates[5:], rates[6:]))


def test_rpn_training_loss_falls_and_checkpoint_loads_weights_only(smoke_manifest, profile, tmp_path):
    path = train.train(profile, method="rpn", seed=0, out_dir=tmp_path / "run", manifest=smoke_manifest,
                       progress=False)
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    epochs = log[log["kind"] == "epoch"]
    assert len(epochs) == profile.epochs
    assert epochs["loss"].iloc[-1] < epochs["loss"].iloc[0]
    assert epochs["val_d_mean_mm"].notna().all()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["method"] == "rpn" and ckpt["config"]["profile"]["name"] == "smoke"
    assert ckpt["global_step"] == int(log["step"].max())
    assert not list((tmp_path / "run").glob("*.tmp"))
    # the training split's handedness, as the annotations give it (phantom faces are never mirrored)
    from igrpn.data import landmarks_from_row, read_manifest
    from igrpn.prior import face_handedness

    table = read_manifest(smoke_manifest)
    signs = {int(np.sign(face_handedness(landmarks_from_row(row)))) for _, row in table.iterrows()}
    assert signs == {ckpt["handedness"]}


def test_interrupted_training_resumes_to_the_same_steps_and_weights(smoke_manifest, profile, tmp_path):
    whole = train.train(profile, method="rpn", seed=1, out_dir=tmp_path / "whole", manifest=smoke_manifest,
                        progress=False)
    # "Killed" after two epochs, then started again with the same command.
    train.train(profile, method="rpn", seed=1, out_dir=tmp_path / "cut", manifest=smoke_manifest,
                progress=False, max_epochs=2)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = train.train(profile, method="rpn", seed=1, out_dir=tmp_path / "cut", manifest=smoke_manifest,
                          progress=False)
    a = torch.load(whole, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    assert a["global_step"] == b["global_step"]
    log = pd.read_csv(tmp_path / "cut" / "log.csv")
    steps = log.loc[log["kind"] == "step", "step"]
    assert steps.is_unique and steps.max() == a["global_step"]
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, msg=f"parameter {name} differs after resume")


def test_a_checkpoint_of_another_configuration_is_not_resumed(smoke_manifest, profile, tmp_path):
    train.train(profile, method="rpn", seed=0, out_dir=tmp_path / "run", manifest=smoke_manifest,
                progress=False, max_epochs=1)
    with pytest.raises(CheckpointError, match="another configuration"):
        train.train(profile, method="rpn", iou_balance=False, seed=0, out_dir=tmp_path / "run",
                    manifest=smoke_manifest, progress=False)
    with pytest.raises(CheckpointError, match="method 'rpn', not 'ssd'"):
        load_checkpoint(tmp_path / "run" / "checkpoint.pt", method="ssd")


@pytest.mark.parametrize("method", ["ssd", "faster_rcnn", "heatmap"])
def test_baselines_train_through_the_same_loop(smoke_manifest, method, tmp_path):
    profile = dataclasses.replace(get_profile("smoke"), epochs=1)
    path = train.train(profile, method=method, seed=0, out_dir=tmp_path / method, manifest=smoke_manifest,
                       progress=False)
    assert torch.load(path, weights_only=True)["method"] == method


def test_anchor_coverage_reports_every_landmark(smoke_manifest):
    from igrpn.data import load_cases, read_manifest

    profile = get_profile("smoke")
    table = read_manifest(smoke_manifest)
    cases = load_cases(table[table["split"] == "train"].head(2), profile.spacing_mm, progress=False)
    coverage = train.anchor_coverage(cases, profile)
    assert len(coverage) == 2 * 5
    assert coverage["best_iou"].between(0, 1).all() and (coverage["num_positive"] >= 1).all()


def test_a_method_trains_its_own_epochs_and_stores_them(smoke_manifest, tmp_path):
    profile = dataclasses.replace(get_profile("smoke"), epochs=3, epochs_by_method={"heatmap": 1})
    path = train.train(profile, method="heatmap", seed=0, out_dir=tmp_path / "run", manifest=smoke_manifest,
                       progress=False)
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    assert len(log[log["kind"] == "epoch"]) == 1
    stored = torch.load(path, map_location="cpu", weights_only=True)["config"]["profile"]
    assert stored["epochs"] == 1 and stored["epochs_by_method"] == {}


def test_learning_rate_of_a_wall_clock_budget_warms_up_then_decays():
    assert train.learning_rate_at(0.0, 1.0) < train.learning_rate_at(0.04, 1.0) < 1.0
    assert train.learning_rate_at(0.05, 1.0) == pytest.approx(1.0)
    assert train.learning_rate_at(1.0, 1.0) == pytest.approx(0.05)
    assert train.learning_rate_at(2.0, 1.0) == pytest.approx(0.05)  # past the budget: the floor


def test_the_profile_names_the_optimiser():
    model = torch.nn.Linear(2, 2)
    sgd = train.make_optimizer(model.parameters(), dataclasses.replace(get_profile("smoke"), optimizer="sgd", lr=0.01))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    assert isinstance(train.make_optimizer(model.parameters(), get_profile("smoke")), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        dataclasses.replace(get_profile("smoke"), optimizer="adam")


def test_a_time_budgeted_run_stops_when_its_budget_is_spent(smoke_manifest, tmp_path):
    profile = dataclasses.replace(get_profile("smoke"), classification_anchors="all")
    path = train.train(profile, method="rpn", seed=0, out_dir=tmp_path / "run", manifest=smoke_manifest,
                       progress=False, max_seconds=2.0, validate_every=3)
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    steps = log[log["kind"] == "step"]
    # The budget counts whole steps: it stops at the first step that ends past 2 s.
    assert 1 <= len(steps) and steps["seconds"].iloc[:-1].sum() < 2.0
    assert np.isfinite(steps["loss"]).all()
    epochs = log[log["kind"] == "epoch"]
    assert epochs["val_d_mean_mm"].iloc[-1] == epochs["val_d_mean_mm"].iloc[-1]  # the last epoch validated
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["config"]["max_seconds"] == 2.0 and ckpt["global_step"] == len(steps)
