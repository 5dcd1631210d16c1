"""3D Slicer markups (.mrk.json) I/O: coordinate systems, units, bad files, manifest rows."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from fixtures_ckpt import FACE_MM, random_volume, write_nifti

from igrpn.config import LANDMARKS
from igrpn.data import LANDMARK_COLUMNS, load_case, read_manifest
from igrpn.data.markups import (manifest_row_from_markups, markups_path_for, MarkupsError, read_markups, SCHEMA_URL,
                                volume_stem, write_markups)


def _write_json(path, document):
    path.write_text(json.dumps(document))
    return path


def _point_list(points, labels, **markup):
    return {"@schema": SCHEMA_URL, "markups": [{
        "type": "Fiducial", **markup,
        "controlPoints": [{"label": label, "position": list(map(float, p))} for label, p in zip(labels, points)],
    }]}


def test_write_lps_stores_negated_x_y_and_reads_back_ras(tmp_path):
    path = write_markups(tmp_path / "a.mrk.json", LANDMARKS, FACE_MM)
    document = json.loads(path.read_text())
    markup = document["markups"][0]
    assert document["@schema"] == SCHEMA_URL
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == "LPS"
    stored = np.array([p["position"] for p in markup["controlPoints"]])
    np.testing.assert_allclose(stored, FACE_MM * [-1, -1, 1])
    assert [p["label"] for p in markup["controlPoints"]] == list(LANDMARKS)

    names, points = read_markups(path)
    assert names == list(LANDMARKS)
    np.testing.assert_allclose(points, FACE_MM)


def test_write_ras_stores_points_unchanged(tmp_path):
    path = write_markups(tmp_path / "a.mrk.json", ["p"], [[1.0, -2.0, 3.5]], coordinate_system="RAS")
    stored = json.loads(path.read_text())["markups"][0]["controlPoints"][0]["position"]
    assert stored == [1.0, -2.0, 3.5]
    np.testing.assert_allclose(read_markups(path)[1], [[1.0, -2.0, 3.5]])


def test_read_honours_file_coordinate_system_units_and_default(tmp_path):
    lps = _write_json(tmp_path / "lps.mrk.json", _point_list([[1, 2, 3]], ["a"], coordinateSystem="LPS"))
    ras = _write_json(tmp_path / "ras.mrk.json", _point_list([[1, 2, 3]], ["a"], coordinateSystem="RAS"))
    # The schema's default coordinate system is LPS.
    default = _write_json(tmp_path / "default.mrk.json", _point_list([[1, 2, 3]], ["a"]))
    micrometres = _write_json(tmp_path / "um.mrk.json",
                              _point_list([[1000, 2000, 3000]], ["a"], coordinateSystem="RAS",
                                          coordinateUnits="um"))
    np.testing.assert_allclose(read_markups(lps)[1], [[-1, -2, 3]])
    np.testing.assert_allclose(read_markups(ras)[1], [[1, 2, 3]])
    np.testing.assert_allclose(read_markups(default)[1], [[-1, -2, 3]])
    np.testing.assert_allclose(read_markups(micrometres)[1], [[1, 2, 3]])


def test_read_joins_point_lists_skips_other_markups_and_marks_undefined_points(tmp_path):
    document = {"@schema": SCHEMA_URL, "markups": [
        {"type": "Line", "controlPoints": [{"label": "l", "position": [0, 0, 0]}]},
        {"type": "Fiducial", "coordinateSystem": "RAS", "controlPoints": [
            {"label": "a", "position": [1, 1, 1]},
            {"label": "b", "positionStatus": "undefined"}]},
        {"type": "Fiducial", "coordinateSystem": "LPS", "controlPoints": [{"label": "c", "position": [2, 2, 2]}]},
    ]}
    names, points = read_markups(_write_json(tmp_path / "m.mrk.json", document))
    assert names == ["a", "b", "c"]
    np.testing.assert_allclose(points[0], [1, 1, 1])
    assert np.isnan(points[1]).all()
    np.testing.assert_allclose(points[2], [-2, -2, 2])


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("{not json", "not a markups JSON file"),
    (json.dumps({"points": []}), "no 'markups' list"),
    (json.dumps({"markups": [{"type": "Line", "controlPoints": []}]}), "no point list"),
    (json.dumps(_point_list([[1, 2]], ["a"])), "three finite numbers"),
    (json.dumps({"markups": [{"type": "Fiducial", "controlPoints": [{"label": "a", "position": ["x", 1, 2]}]}]}),
     "three finite numbers"),
    (json.dumps(_point_list([[1, 2, 3]], ["a"], coordinateSystem="XYZ")), "coordinateSystem"),
    (json.dumps(_point_list([[1, 2, 3]], ["a"], coordinateUnits="inch")), "coordinateUnits"),
])
def test_bad_markups_files_name_the_file_and_problem(tmp_path, content, message):
    path = tmp_path / "bad.mrk.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(MarkupsError, match=message) as caught:
        read_markups(path)
    assert str(path) in str(caught.value)


def test_write_markups_refuses_bad_input_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="2 names for 1 points"):
        write_markups(tmp_path / "a.mrk.json", ["a", "b"], [[0, 0, 0]])
    with pytest.raises(ValueError, match="NaN"):
        write_markups(tmp_path / "a.mrk.json", ["a"], [[np.nan, 0, 0]])
    with pytest.raises(ValueError, match="coordinate_system"):
        write_markups(tmp_path / "a.mrk.json", ["a"], [[0, 0, 0]], coordinate_system="IJK")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_markups(tmp_path / "missing" / "a.mrk.json", ["a"], [[0, 0, 0]])
    assert list(tmp_path.iterdir()) == []


def test_manifest_row_maps_labels_to_columns(tmp_path):
    labels = ["Left eye", "middle-eyebrow", "RIGHT_EYE", "nose tip", "chin", "extra point"]
    points = np.vstack([FACE_MM, [[99.0, 99.0, 99.0]]])
    path = write_markups(tmp_path / "case.mrk.json", labels, points)
    row = manifest_row_from_markups("c1", "c1.nii.gz", "train", path)
    assert (row["case_id"], row["image"], row["split"]) == ("c1", "c1.nii.gz", "train")
    np.testing.assert_allclose([row[c] for c in LANDMARK_COLUMNS], FACE_MM.ravel())


def test_manifest_row_reports_missing_duplicate_and_undefined_landmarks(tmp_path):
    path = write_markups(tmp_path / "four.mrk.json", LANDMARKS[:4], FACE_MM[:4])
    with pytest.raises(MarkupsError, match=r"missing landmark\(s\) \['chin'\]") as caught:
        manifest_row_from_markups("c1", "x.nii", "test", path)
    assert str(path) in str(caught.value)

    twice = write_markups(tmp_path / "twice.mrk.json", [*LANDMARKS, "chin"], np.vstack([FACE_MM, FACE_MM[4:]]))
    with pytest.raises(MarkupsError, match="'chin' given 2 times"):
        manifest_row_from_markups("c1", "x.nii", "test", twice)

    document = _point_list(FACE_MM, LANDMARKS, coordinateSystem="RAS")
    document["markups"][0]["controlPoints"][1] = {"label": "middle_eyebrow", "positionStatus": "undefined"}
    undefined = _write_json(tmp_path / "undef.mrk.json", document)
    with pytest.raises(MarkupsError, match="'middle_eyebrow' has no defined position"):
        manifest_row_from_markups("c1", "x.nii", "test", undefined)

    with pytest.raises(ValueError, match="split"):
        manifest_row_from_markups("c1", "x.nii", "validation", path)


def test_markups_row_gives_a_manifest_that_loads_with_the_same_landmarks(tmp_path):
    # A 4 mm volume whose field of view holds the face; landmarks written in Slicer's LPS.
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = [-40.0, -40.0, -60.0]
    write_nifti(tmp_path / "c1.nii.gz", random_volume((21, 21, 26)), affine)
    path = write_markups(tmp_path / "c1.mrk.json", LANDMARKS, FACE_MM, coordinate_system="LPS")
    row = manifest_row_from_markups("c1", "c1.nii.gz", "train", path)
    pd.DataFrame([row]).to_csv(tmp_path / "manifest.csv", index=False)

    case = load_case(read_manifest(tmp_path / "manifest.csv").iloc[0], spacing_mm=5.2)
    np.testing.assert_allclose(case.landmarks_mm, FACE_MM)


def test_volume_stem_and_markups_path():
    assert volume_stem("a/b/scan.nii.gz") == "scan"
    assert volume_stem("scan.NII") == "scan"
    assert volume_stem("scan.v2.nii.gz") == "scan.v2"
    assert markups_path_for("x/scan.nii.gz", "out").as_posix() == "out/scan.mrk.json"
