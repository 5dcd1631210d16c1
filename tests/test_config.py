"""Profiles: per-method epochs, and profiles stored by an older version."""

import dataclasses

import pytest

from igrpn.config import Profile, get_profile


def test_per_method_epochs_resolve_for_that_method_only():
    profile = dataclasses.replace(get_profile("smoke"), epochs=3, epochs_by_method={"heatmap": 5})
    assert profile.for_method("heatmap").epochs == 5 and profile.for_method("heatmap").epochs_by_method == {}
    assert profile.for_method("rpn").epochs == 3
    assert profile.epochs_text() == "3 epochs (heatmap 5)"
    plain = get_profile("smoke")
    assert plain.for_method("rpn") is plain
    # with_epochs sets every method's epochs; a plain replace keeps the per-method table
    assert profile.with_epochs(7).for_method("heatmap").epochs == 7
    assert dataclasses.replace(profile, epochs=7).for_method("heatmap").epochs == 5


@pytest.mark.parametrize("table, message", [({"unet": 4}, "unknown methods \\['unet'\\]"),
                                            ({"rpn": 0}, "positive integers")])
def test_bad_per_method_epochs_are_refused_with_the_profile_name(table, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(get_profile("smoke"), epochs_by_method=table)


def test_a_profile_stored_without_per_method_epochs_still_loads():
    stored = get_profile("cpu").to_dict()
    del stored["epochs_by_method"]
    assert Profile.from_dict(stored).epochs_by_method == {}
    del stored["width"]
    with pytest.raises(ValueError, match="missing fields \\['width'\\]"):
        Profile.from_dict(stored)


def test_settings_by_method_are_resolved_for_their_method_only():
    profile = dataclasses.replace(get_profile("smoke"), settings_by_method={"rpn": {"optimizer": "sgd", "lr": 0.01}})
    rpn, ssd = profile.for_method("rpn"), profile.for_method("ssd")
    assert (rpn.optimizer, rpn.lr, rpn.settings_by_method) == ("sgd", 0.01, {})
    assert (ssd.optimizer, ssd.lr) == ("adamw", get_profile("smoke").lr)
    assert profile.settings_text() == "rpn: optimizer=sgd, lr=0.01"
    with pytest.raises(ValueError, match="unknown methods"):
        dataclasses.replace(get_profile("smoke"), settings_by_method={"yolo": {}})
    with pytest.raises(ValueError, match="epochs go in epochs_by_method"):
        dataclasses.replace(get_profile("smoke"), settings_by_method={"rpn": {"epochs": 3}})
    with pytest.raises(ValueError, match="optimizer must be one of"):
        profile = dataclasses.replace(get_profile("smoke"), settings_by_method={"rpn": {"optimizer": "adam"}})
        profile.for_method("rpn")


@pytest.mark.parametrize("field, value, message", [
    ("anchor_shapes", "spheres", "anchor_shapes must be one of"),
    ("head_convs", 0, "head_convs must be a positive integer"),
    ("head_convs", 2.5, "head_convs must be a positive integer"),
    ("regression_weight", 0.0, "regression_weight must be a finite number > 0"),
    ("regression_weight", float("nan"), "regression_weight must be a finite number > 0"),
])
def test_bad_anchor_and_head_settings_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(get_profile("smoke"), **{field: value})


def test_the_paper_anchors_and_head_stay_the_default():
    for name in ("smoke", "paper"):
        profile = get_profile(name).for_method("rpn")
        assert (profile.anchor_shapes, profile.head_convs, profile.classification_anchors) == (
            "combinations", 1, "sampled")
    # the cpu profile's RPN: cube anchors and the dense focal loss (chosen on validation); the SSD and
    # Faster R-CNN share its optimiser, anchors and backbone but keep their own negatives
    cpu = get_profile("cpu")
    rpn = cpu.for_method("rpn")
    assert (rpn.anchor_shapes, rpn.classification_anchors, rpn.matcher) == ("cubes", "all", "atss")
    assert (rpn.fusion, rpn.block1_convs) == ("sum", 1)
    assert get_profile("paper").matcher == "iou"
    assert (get_profile("paper").fusion, get_profile("paper").block1_convs) == ("concat", 2)
    assert cpu.for_method("heatmap").fusion == "concat"
    for baseline in ("ssd", "faster_rcnn"):
        settings = cpu.for_method(baseline)
        assert (settings.optimizer, settings.anchor_shapes, settings.fusion) == ("sgd", "cubes", "sum")
        assert (settings.classification_anchors, settings.matcher) == ("sampled", "iou")
    assert cpu.for_method("heatmap").optimizer == "adamw"
