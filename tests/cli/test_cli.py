"""The ``igrpn`` command line, called in-process through ``igrpn.cli.main``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_ckpt import (  # noqa: F401  (fixtures are found by name)
    FACE_MM,
    make_checkpoint,
    prior_file,
    random_volume,
    smoke_checkpoint,
    write_nifti,
)

from igrpn.cli import main
from igrpn.config import LANDMARKS
from igrpn.data import LANDMARK_COLUMNS, read_manifest
from igrpn.detect import PREDICTION_COLUMNS
from igrpn.data.markups import read_markups, write_markups

OBLIQUE = np.array([
    [0.0, -3.0, 0.0, 40.0],
    [2.5, 0.0, 0.0, -20.0],
    [0.0, 0.0, 4.0, -30.0],
    [0.0, 0.0, 0.0, 1.0],
])


@pytest.fixture()
def volumes(tmp_path):
    """Two small volumes: axis-aligned 4 mm, and permuted/flipped with anisotropic voxels."""
    first = write_nifti(tmp_path / "first.nii.gz", random_volume((24, 20, 16), seed=1))
    second = write_nifti(tmp_path / "second.nii", random_volume((18, 22, 15), seed=2), OBLIQUE)
    return [first, second]


def _run(argv, capsys):
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("command", ["predict", "evaluate", "markups-to-manifest", "phantom", "train", "reproduce"])
def test_help_of_every_command_has_an_example(command, capsys):
    status, out, _ = _run([command, "--help"], capsys)
    assert status == 0
    assert out.startswith(f"usage: igrpn {command}")
    assert "example" in out


def test_phantom_help_has_the_phantom_module_options(capsys):
    status, out, _ = _run(["phantom", "--help"], capsys)
    assert status == 0 and out.startswith("usage: igrpn phantom")
    for option in ("--out", "--n ", "--n-test", "--seed", "--grid", "--spacing", "--manifest"):
        assert option in out


def test_phantom_options_are_those_of_python_m_igrpn_phantom(capsys):
    """igrpn phantom mirrors the module's parser (built inside phantom.main): same option names."""
    import re

    from igrpn.phantom import main as phantom_main

    with pytest.raises(SystemExit):
        phantom_main(["--help"])
    module_help = capsys.readouterr().out
    _, ours, _ = _run(["phantom", "--help"], capsys)
    options = re.compile(r"--[a-z][a-z-]*")
    assert set(options.findall(ours)) == set(options.findall(module_help))


def test_phantom_writes_a_loadable_data_set(tmp_path, capsys):
    status, out, err = _run(["phantom", "--out", tmp_path / "data", "--n", "2", "--n-test", "1", "--grid", "24",
                             "--spacing", "4", "--quiet"], capsys)
    assert status == 0, err
    manifest = read_manifest(out.strip())
    assert len(manifest) == 2 and sorted(manifest["split"]) == ["test", "train"]


def test_phantom_bad_option_values_are_reported(tmp_path, capsys):
    status, _, err = _run(["phantom", "--out", tmp_path / "data", "--n", "0"], capsys)
    assert status == 1 and "n must be a positive integer" in err


def test_top_level_help_lists_commands_and_no_command_is_a_usage_error(capsys):
    status, out, _ = _run(["--help"], capsys)
    assert status == 0
    for command in ("predict", "evaluate", "phantom", "train", "reproduce", "markups-to-manifest"):
        assert command in out
    assert _run([], capsys)[0] == 2
    assert _run(["predict"], capsys)[0] == 2  # VOLUME and --checkpoint are required


def test_predict_help_states_size_limit_and_exit_status(capsys):
    _, out, _ = _run(["predict", "--help"], capsys)
    assert "256^3" in out and "MAX_GRID_VOXELS" in out
    assert "exit status" in out and "1  a volume failed" in out


def test_console_script_runs():
    script = Path(sys.executable).parent / "igrpn"
    if not script.exists():
        pytest.skip(f"console script not installed at {script} (pip install -e .)")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "predict" in result.stdout and "reproduce" in result.stdout


def test_predict_csv_has_every_candidate_and_consistent_coordinates(tmp_path, volumes, smoke_checkpoint, capsys):
    out = tmp_path / "pred.csv"
    status, _, err = _run(["predict", *volumes, "--checkpoint", smoke_checkpoint, "--out", out, "--quiet"], capsys)
    assert status == 0, err
    rows = pd.read_csv(out)
    assert list(rows.columns) == ["volume", *PREDICTION_COLUMNS]
    assert sorted(rows["volume"].unique()) == sorted(str(v) for v in volumes)
    for volume, affine in zip(volumes, (np.diag([4.0, 4.0, 4.0, 1.0]), OBLIQUE)):
        own = rows[rows["volume"] == str(volume)]
        selected = own[own["selected"]]
        assert list(selected.sort_values("class_id")["landmark"]) == list(LANDMARKS)
        eyes = own["landmark"].isin(["left_eye", "right_eye"])
        assert set(own.loc[~eyes, "rank"]) <= {0, 1}  # smoke profile: top 2 per landmark
        assert set(own.loc[eyes, "rank"]) <= {0, 1, 2, 3}  # the eyes share 4 places between them
        assert eyes.sum() <= 4
        # i, j, k are voxels of the file as given: its affine maps them to x, y, z.
        ijk1 = np.c_[own[["i", "j", "k"]].to_numpy(), np.ones(len(own))]
        np.testing.assert_allclose((affine @ ijk1.T).T[:, :3], own[["x", "y", "z"]].to_numpy(), atol=1e-6)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*tmp"))


def test_predict_json_groups_landmarks_and_candidates_per_volume(tmp_path, volumes, smoke_checkpoint, capsys):
    out = tmp_path / "pred.json"
    status, _, err = _run(["predict", *volumes, "--checkpoint", smoke_checkpoint, "--out", out, "--quiet"], capsys)
    assert status == 0, err
    document = json.loads(out.read_text())
    assert [entry["volume"] for entry in document] == [str(v) for v in volumes]
    for entry in document:
        assert [row["landmark"] for row in entry["landmarks"]] == list(LANDMARKS)
        assert all(row["selected"] for row in entry["landmarks"])
        assert len(entry["candidates"]) >= 5
        assert set(entry["candidates"][0]) == set(PREDICTION_COLUMNS)
        chosen = [row for row in entry["candidates"] if row["selected"]]
        assert sorted(map(json.dumps, chosen)) == sorted(map(json.dumps, entry["landmarks"]))


def test_predict_without_out_prints_a_table(volumes, smoke_checkpoint, capsys):
    status, out, _ = _run(["predict", volumes[0], "--checkpoint", smoke_checkpoint, "--quiet"], capsys)
    assert status == 0
    assert str(volumes[0]) in out
    for name in LANDMARKS:
        assert name in out
    assert "x_mm" in out


def test_predict_writes_slicer_markups_of_the_selected_landmarks(tmp_path, volumes, smoke_checkpoint, capsys):
    out, markups = tmp_path / "pred.csv", tmp_path / "marks" / "deeper"
    status, _, err = _run(["predict", *volumes, "--checkpoint", smoke_checkpoint, "--out", out,
                           "--markups", markups, "--quiet"], capsys)
    assert status == 0, err
    rows = pd.read_csv(out)
    assert sorted(p.name for p in markups.iterdir()) == ["first.mrk.json", "second.mrk.json"]
    for volume, stem in zip(volumes, ("first", "second")):
        names, points = read_markups(markups / f"{stem}.mrk.json")
        selected = rows[(rows["volume"] == str(volume)) & rows["selected"]].sort_values("class_id")
        assert names == list(LANDMARKS)
        np.testing.assert_allclose(points, selected[["x", "y", "z"]].to_numpy(), atol=1e-9)


def test_predict_with_prior_selects_one_candidate_per_landmark(tmp_path, volumes, smoke_checkpoint, prior_file,
                                                               capsys):
    out = tmp_path / "pred.csv"
    status, _, err = _run(["predict", volumes[0], "--checkpoint", smoke_checkpoint, "--prior", prior_file,
                           "--lambda", "0.5", "--out", out, "--quiet"], capsys)
    assert status == 0, err
    rows = pd.read_csv(out)
    assert rows.groupby("landmark")["selected"].sum().to_dict() == {name: 1 for name in LANDMARKS}


def test_quoted_glob_is_expanded_and_unmatched_pattern_fails(tmp_path, volumes, smoke_checkpoint, capsys):
    out = tmp_path / "pred.csv"
    status, _, err = _run(["predict", str(tmp_path / "*.nii*"), str(tmp_path / "nothing*.nii"),
                           "--checkpoint", smoke_checkpoint, "--out", out, "--quiet"], capsys)
    assert status == 1
    assert "nothing*.nii: no file matches this pattern" in err
    assert set(pd.read_csv(out)["volume"]) == {str(v) for v in volumes}


def test_usage_errors_exit_2_and_write_nothing(tmp_path, volumes, smoke_checkpoint, capsys):
    status, _, err = _run(["predict", volumes[0], "--checkpoint", smoke_checkpoint, "--out", tmp_path / "p.txt"],
                          capsys)
    assert status == 2 and "unsupported output suffix '.txt'" in err
    status, _, err = _run(["predict", volumes[0], "--checkpoint", smoke_checkpoint, "--lambda", "1"], capsys)
    assert status == 2 and "--lambda only applies with --prior" in err
    assert not (tmp_path / "p.txt").exists()


def test_bad_checkpoint_and_prior_are_reported_by_name(tmp_path, volumes, smoke_checkpoint, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    status, _, err = _run(["predict", volumes[0], "--checkpoint", bad], capsys)
    assert status == 1 and str(bad) in err and "not an igrpn checkpoint (not a file written by torch.save)" in err
    status, _, err = _run(["predict", volumes[0], "--checkpoint", tmp_path / "missing.pt"], capsys)
    assert status == 1 and "missing.pt: checkpoint not found" in err
    status, _, err = _run(["predict", volumes[0], "--checkpoint", smoke_checkpoint,
                           "--prior", tmp_path / "none.json"], capsys)
    assert status == 1 and "none.json: graph prior file not found" in err


def test_markups_round_trip_to_a_manifest(tmp_path, volumes, smoke_checkpoint, capsys):
    """predict --markups, then markups-to-manifest: the manifest holds the predicted landmarks."""
    marks = tmp_path / "marks"
    out = tmp_path / "pred.csv"
    assert _run(["predict", *volumes, "--checkpoint", smoke_checkpoint, "--out", out, "--markups", marks,
                 "--quiet"], capsys)[0] == 0
    manifest_path = tmp_path / "sub" / "manifest.csv"
    manifest_path.parent.mkdir()
    status, _, err = _run(["markups-to-manifest", *volumes, "--markups-dir", marks, "--split", "test",
                           "--out", manifest_path], capsys)
    assert status == 0, err
    manifest = read_manifest(manifest_path)
    assert list(manifest["case_id"]) == ["first", "second"]
    assert list(manifest["image"]) == [str(v.resolve()) for v in volumes]
    predicted = pd.read_csv(out)
    for volume, (_, row) in zip(volumes, manifest.iterrows()):
        selected = predicted[(predicted["volume"] == str(volume)) & predicted["selected"]].sort_values("class_id")
        np.testing.assert_allclose(row[list(LANDMARK_COLUMNS)].to_numpy(dtype=float),
                                   selected[["x", "y", "z"]].to_numpy().ravel(), atol=1e-9)


def test_markups_to_manifest_writes_nothing_when_a_landmark_is_missing(tmp_path, volumes, capsys):
    marks = tmp_path / "marks"
    marks.mkdir()
    write_markups(marks / "first.mrk.json", LANDMARKS, FACE_MM)
    write_markups(marks / "second.mrk.json", LANDMARKS[:4], FACE_MM[:4])
    status, _, err = _run(["markups-to-manifest", *volumes, "--markups-dir", marks, "--split", "train",
                           "--out", tmp_path / "m.csv"], capsys)
    assert status == 1
    assert "second.mrk.json" in err and "'chin'" in err
    assert not (tmp_path / "m.csv").exists()


def _tiny_manifest(folder: Path) -> Path:
    """Two test cases (random 4 mm volumes) with FACE_MM inside their field of view."""
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = [-40.0, -40.0, -60.0]
    rows = []
    for index in range(2):
        write_nifti(folder / f"c{index}.nii.gz", random_volume((21, 21, 26), seed=index), affine)
        row = {"case_id": f"c{index}", "image": f"c{index}.nii.gz", "split": "test"}
        row.update(dict(zip(LANDMARK_COLUMNS, (FACE_MM + index).ravel())))
        rows.append(row)
    path = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_evaluate_prints_tables_1_and_2(tmp_path, capsys):
    manifest = _tiny_manifest(tmp_path)
    report = tmp_path / "report"
    make_checkpoint(report / "runs" / "rpn_ib" / "checkpoint.pt")
    status, out, err = _run(["evaluate", "--profile", "smoke", "--manifest", manifest, "--report-dir", report,
                             "--n-boot", "20", "--quiet"], capsys)
    assert status == 0, err
    assert "Table 1" in out and "Table 2" in out and "IG-RPN" in out
    assert "runs evaluated: rpn_ib" in out
    assert (report / "tables" / "table1.md").is_file() and (report / "tables" / "table2.csv").is_file()
    assert (report / "predictions" / "rpn_ib_noprior.csv").is_file()


def test_evaluate_without_runs_or_with_missing_prior_fails_clearly(tmp_path, capsys):
    manifest = _tiny_manifest(tmp_path)
    status, _, err = _run(["evaluate", "--profile", "smoke", "--manifest", manifest,
                           "--report-dir", tmp_path / "empty"], capsys)
    assert status == 1 and "no trained run" in err
    make_checkpoint(tmp_path / "r" / "runs" / "rpn_ib" / "checkpoint.pt")
    status, _, err = _run(["evaluate", "--profile", "smoke", "--manifest", manifest, "--report-dir", tmp_path / "r",
                           "--prior", tmp_path / "nope.json"], capsys)
    assert status == 1 and "nope.json: graph prior file not found" in err


def test_markups_name_clash_is_a_usage_error(tmp_path, smoke_checkpoint, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_nifti(tmp_path / "a" / "scan.nii.gz", random_volume((16, 16, 16)))
    second = write_nifti(tmp_path / "b" / "scan.nii", random_volume((16, 16, 16)))
    status, _, err = _run(["predict", first, second, "--checkpoint", smoke_checkpoint,
                           "--markups", tmp_path / "marks"], capsys)
    assert status == 2 and "would both write" in err and "scan.mrk.json" in err
    assert not (tmp_path / "marks").exists()
