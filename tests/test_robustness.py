"""Users' volumes and files: every bad input fails with a message naming the file and the problem,
the other volumes still run, and nothing is half-written."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from fixtures_ckpt import FACE_MM, prior_file, random_volume, smoke_checkpoint, write_nifti  # noqa: F401

import igrpn.cli
import igrpn.markups
from igrpn import detect
from igrpn.cli import main
from igrpn.config import LANDMARKS
from igrpn.data import LANDMARK_COLUMNS, inside_volume, prepare_volume, world_to_voxel
from igrpn.detect import Detector


@pytest.fixture(scope="module")
def detector(smoke_checkpoint):
    return Detector.from_checkpoint(smoke_checkpoint)


def _run(argv, capsys):
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _assert_five_landmarks(rows):
    selected = rows[rows["selected"]]
    assert sorted(selected["landmark"]) == sorted(LANDMARKS)
    assert np.isfinite(rows[["x", "y", "z", "i", "j", "k", "score"]].to_numpy(dtype=float)).all()


# --------------------------------------------------------------------------------------------
# Bad files through `igrpn predict`: reported by name, the good volume still written.


def _truncated(path: Path, keep_fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


def _make_bad(kind: str, folder: Path) -> Path:
    """Write one kind of bad input; returns its path."""
    if kind == "empty":
        path = folder / "empty.nii.gz"
        path.write_bytes(b"")
    elif kind == "missing":
        path = folder / "missing.nii.gz"
    elif kind == "directory":
        path = folder / "a_folder.nii"
        path.mkdir()
    elif kind == "truncated_gz":
        path = write_nifti(folder / "truncated.nii.gz", random_volume((30, 30, 30)))
        _truncated(path, 0.5)
    elif kind == "truncated_nii":
        path = write_nifti(folder / "truncated.nii", random_volume((30, 30, 30)))
        _truncated(path, 0.5)
    elif kind == "text":
        path = folder / "notes.nii"
        path.write_text("this is not an image\n" * 40)
    elif kind == "mgh":
        path = folder / "brain.mgz"
        nib.save(nib.MGHImage(random_volume((10, 10, 10)), np.eye(4)), str(path))
    elif kind == "2d":
        path = write_nifti(folder / "slice.nii.gz", random_volume((20, 20)))
    elif kind == "4d":
        path = write_nifti(folder / "series.nii.gz", random_volume((12, 12, 12, 3)))
    elif kind in ("nan", "inf"):
        volume = random_volume((12, 12, 12))
        volume[3, 4, 5] = np.nan if kind == "nan" else np.inf
        path = write_nifti(folder / f"{kind}.nii.gz", volume)
    elif kind == "constant":
        path = write_nifti(folder / "constant.nii.gz", np.full((12, 12, 12), 7, dtype=np.int16))
    elif kind == "huge_file":
        # A header announcing 600³ voxels of 0.1 mm (a 60 mm, 12³ grid at 5.2 mm) and no voxels:
        # refused from the header alone, before any attempt to read 216 M voxels.
        header = nib.Nifti1Header()
        header.set_data_shape((600, 600, 600))
        header.set_data_dtype(np.uint8)
        header.set_sform(np.diag([0.1, 0.1, 0.1, 1.0]), code=1)
        header.set_qform(np.diag([0.1, 0.1, 0.1, 1.0]), code=1)
        path = folder / "huge_file.nii"
        path.write_bytes(header.binaryblock + b"\0" * 4)
    elif kind == "huge_grid":
        # 8³ voxels of 200 mm: a 1600 mm field of view is a 308³ grid at the smoke spacing (5.2 mm).
        path = write_nifti(folder / "huge.nii.gz", random_volume((8, 8, 8)), np.diag([200.0, 200.0, 200.0, 1.0]))
    else:
        raise AssertionError(kind)
    return path


BAD_INPUTS = {
    "empty": "empty file",
    "missing": "file not found",
    "directory": "is a directory, not a NIfTI file",
    "truncated_gz": "file truncated or corrupt",
    "truncated_nii": "file truncated or corrupt",
    "text": "not a readable NIfTI file",
    "mgh": "not a NIfTI file (read as MGHImage)",
    "2d": "not 3D",
    "4d": "a 4D file holding 3 volumes",
    "nan": "1 NaN or infinite voxels",
    "inf": "1 NaN or infinite voxels",
    "constant": "constant volume",
    "huge_grid": "too large",
    "huge_file": "too large: 600x600x600 = 216.0 M voxels",
}


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_volume_is_reported_by_name_and_the_others_still_run(kind, tmp_path, smoke_checkpoint, capsys):
    good = write_nifti(tmp_path / "good.nii.gz", random_volume((20, 20, 20)))
    bad = _make_bad(kind, tmp_path)
    out = tmp_path / "pred.csv"
    status, _, err = _run(["predict", bad, good, "--checkpoint", smoke_checkpoint, "--out", out, "--quiet"], capsys)
    assert status == 1
    failure = [line for line in err.splitlines() if str(bad) in line and "error" in line]
    assert failure, err
    assert BAD_INPUTS[kind] in failure[0]
    assert "1 of 2 input(s) failed" in err
    rows = pd.read_csv(out)
    assert set(rows["volume"]) == {str(good)}
    _assert_five_landmarks(rows)


def test_huge_grid_message_names_the_size_and_limit(tmp_path, smoke_checkpoint, capsys):
    bad = _make_bad("huge_grid", tmp_path)
    status, _, err = _run(["predict", bad, "--checkpoint", smoke_checkpoint, "--quiet"], capsys)
    assert status == 1
    assert "8x8x8 volume resampled to 5.2 mm is a 308x308x308 grid (29.2 M voxels)" in err
    assert "256^3 = 16.8 M voxels" in err and "MAX_GRID_VOXELS" in err


def test_every_volume_failing_writes_nothing_and_keeps_an_existing_output(tmp_path, smoke_checkpoint, capsys):
    out = tmp_path / "pred.csv"
    out.write_text("previous results\n")
    status, _, err = _run(["predict", _make_bad("empty", tmp_path), "--checkpoint", smoke_checkpoint,
                           "--out", out, "--quiet"], capsys)
    assert status == 1 and "nothing written" in err
    assert out.read_text() == "previous results\n"


# --------------------------------------------------------------------------------------------
# Detector.predict on unusual but valid volumes, and its own checks.


@pytest.mark.parametrize("shape, voxel_mm, axis, span", [
    ((10, 12, 9), (1.3, 1.3, 1.3), 1, "13 mm (10 voxel(s) of 1.3 mm"),  # a 3x3x3 grid at 5.2 mm
    ((40, 36, 1), (1.0, 1.0, 1.0), 3, "1 mm (1 voxel(s) of 1 mm"),      # a single slice
    ((40, 36, 3), (1.0, 1.0, 1.0), 3, "3 mm (3 voxel(s) of 1 mm"),      # three slices (or an RGB stack)
    ((40, 40, 40), (1.0, 1.0, 0.01), 3, "0.4 mm (40 voxel(s) of 0.01 mm"),  # slices 0.01 mm thick
    ((2, 2, 2), (4.0, 4.0, 4.0), 1, "8 mm (2 voxel(s) of 4 mm"),        # a few voxels
])
def test_volumes_too_small_for_a_landmark_box_are_refused(detector, shape, voxel_mm, axis, span):
    """Every landmark of such volumes used to be placed outside them (exit 0)."""
    with pytest.raises(ValueError) as refused:
        detector.predict(random_volume(shape), np.diag([*voxel_mm, 1.0]), name="tiny")
    message = str(refused.value)
    assert message.startswith(f"tiny: too small: axis {axis} spans {span}")
    assert "at least 31.2 mm (6 voxels at its 5.2 mm) along every axis" in message


def test_the_smallest_volume_accepted_gives_five_landmarks_inside_it(detector):
    shape = (8, 8, 8)  # 32 mm at 4 mm: just holds the largest box (31.2 mm); padded to the network
    rows = detector.predict(random_volume(shape), np.diag([4.0, 4.0, 4.0, 1.0]), name="small")
    _assert_five_landmarks(rows)
    assert inside_volume(rows[["i", "j", "k"]].to_numpy(dtype=float), shape).all()


def test_candidates_in_the_padding_are_replaced_by_ones_inside(detector):
    """A 12³ volume of 4 mm is a 10³ grid padded to 16³: the untrained model answers in the padding."""
    shape, affine = (12, 12, 12), np.diag([4.0, 4.0, 4.0, 1.0])
    grid, grid_affine = prepare_volume(random_volume(shape), affine, detector.profile.spacing_mm)
    unfiltered = detector.predict_grid(grid, grid_affine)
    voxels = world_to_voxel(unfiltered[["x", "y", "z"]].to_numpy(dtype=float), affine)
    assert not inside_volume(voxels, shape).all()  # the case this test is about
    rows = detector.predict(random_volume(shape), affine)
    _assert_five_landmarks(rows)
    assert inside_volume(rows[["i", "j", "k"]].to_numpy(dtype=float), shape).all()
    for _, own in rows.groupby("landmark"):
        assert sorted(own["rank"]) == list(range(len(own)))


def test_integer_and_single_volume_4d_inputs_work(detector):
    volume = (random_volume((16, 16, 16)) * 100).astype(np.int16)
    _assert_five_landmarks(detector.predict(volume, np.diag([4.0, 4.0, 4.0, 1.0])))
    _assert_five_landmarks(detector.predict(volume[..., None], np.diag([4.0, 4.0, 4.0, 1.0])))


def test_voxel_coordinates_refer_to_the_volume_as_given(detector):
    """Flipped, permuted, anisotropic affine: (i, j, k) map to (x, y, z) through that affine."""
    affine = np.array([[0.0, 0.0, -3.0, 50.0], [2.0, 0.0, 0.0, -10.0], [0.0, 4.5, 0.0, 5.0], [0, 0, 0, 1]])
    rows = detector.predict(random_volume((20, 14, 18)), affine)
    ijk1 = np.c_[rows[["i", "j", "k"]].to_numpy(), np.ones(len(rows))]
    np.testing.assert_allclose((affine @ ijk1.T).T[:, :3], rows[["x", "y", "z"]].to_numpy(), atol=1e-6)


@pytest.mark.parametrize("volume, affine, message", [
    (np.ones((20, 20)), np.eye(4), "scan.nii: not 3D"),
    (random_volume((8, 8, 8, 2)), np.eye(4), "scan.nii: not 3D"),
    (np.full((8, 8, 8), np.nan), np.diag([4.0, 4.0, 4.0, 1.0]), "scan.nii: 512 NaN or infinite voxels"),
    (np.zeros((8, 8, 8)), np.diag([4.0, 4.0, 4.0, 1.0]), "scan.nii: constant volume"),
    (random_volume((8, 8, 8)), np.diag([1.0, 1.0, 0.0, 1.0]), "scan.nii: singular affine"),
    (random_volume((8, 8, 8)), np.eye(3), "scan.nii: affine must be a finite 4x4 matrix"),
    (random_volume((8, 8, 8)), np.diag([200.0, 200.0, 200.0, 1.0]), "scan.nii: too large"),
])
def test_predict_refuses_bad_input_naming_it(detector, volume, affine, message):
    with pytest.raises(ValueError, match=message):
        detector.predict(volume, affine, name="scan.nii")


def test_grid_limit_is_the_module_constant(detector, monkeypatch):
    affine = np.diag([4.0, 4.0, 4.0, 1.0])  # 26³ voxels of 4 mm: a 20³ grid at 5.2 mm
    monkeypatch.setattr(detect, "MAX_GRID_VOXELS", 20 ** 3)
    _assert_five_landmarks(detector.predict(random_volume((26, 26, 26)), affine))
    monkeypatch.setattr(detect, "MAX_GRID_VOXELS", 20 ** 3 - 1)
    with pytest.raises(ValueError, match="20x20x20 grid"):
        detector.predict(random_volume((26, 26, 26)), affine)


def _face_volume(shape, affine, landmarks_mm, seed=0):
    """Speckle with a bright blob at each landmark (so the face is 'in' the image)."""
    volume = random_volume(shape, seed=seed)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    for point in landmarks_mm:
        volume += 5.0 * np.exp(-np.sum((world - point) ** 2, axis=-1) / (2 * 6.0 ** 2))
    return volume


@pytest.mark.parametrize("use_prior", [False, True])
def test_face_partly_outside_the_field_of_view_still_gives_five_landmarks(detector, prior_file, use_prior):
    from igrpn.prior import GraphPrior

    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = [-40.0, -40.0, -20.0]  # z from -20 mm up: nose (z=-15) and chin (z=-38) cut off
    volume = _face_volume((21, 21, 15), affine, FACE_MM)
    chin_vox = np.linalg.solve(affine[:3, :3], FACE_MM[4] - affine[:3, 3])
    assert chin_vox[2] < 0  # the chin lies outside the volume
    rows = Detector(detector.model, detector.profile,
                    prior=GraphPrior.load(prior_file) if use_prior else None).predict(volume, affine)
    _assert_five_landmarks(rows)


# --------------------------------------------------------------------------------------------
# Outputs that cannot be written: a clear error before any work, nothing left behind.


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


@pytest.mark.parametrize("case, message", [
    ("missing_dir", "does not exist"),
    ("parent_is_file", "is not a directory"),
    ("out_is_dir", "it is a directory"),
])
def test_unwritable_output_fails_before_predicting(case, message, tmp_path, smoke_checkpoint, capsys):
    good = write_nifti(tmp_path / "good.nii.gz", random_volume((16, 16, 16)))
    if case == "missing_dir":
        out = tmp_path / "no" / "such" / "pred.csv"
    elif case == "parent_is_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "pred.csv"
    else:
        out = tmp_path / "existing.csv"
        out.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    status, out_text, err = _run(["predict", good, "--checkpoint", smoke_checkpoint, "--out", out,
                                  "--markups", tmp_path / "marks", "--quiet"], capsys)
    assert status == 1
    assert str(out) in err and message in err
    assert out_text == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # not even the markups folder


def test_read_only_output_directory_is_refused(tmp_path, smoke_checkpoint, capsys, monkeypatch):
    good = write_nifti(tmp_path / "good.nii.gz", random_volume((16, 16, 16)))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root writes anyway: make creating a file fail
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(igrpn.cli.tempfile, "mkstemp", refuse)
    try:
        status, _, err = _run(["predict", good, "--checkpoint", smoke_checkpoint, "--out", locked / "p.json"],
                              capsys)
    finally:
        locked.chmod(0o755)
    assert status == 1
    assert f"{locked / 'p.json'}: cannot write the output in {locked}: Permission denied" in err
    assert list(locked.iterdir()) == []


def test_a_write_failing_midway_leaves_no_partial_or_temporary_file(tmp_path, smoke_checkpoint, capsys, monkeypatch):
    good = write_nifti(tmp_path / "good.nii.gz", random_volume((16, 16, 16)))
    out = tmp_path / "pred.json"
    out.write_text("[]\n")

    def failing_replace(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(igrpn.markups.os, "replace", failing_replace)
    status, _, err = _run(["predict", good, "--checkpoint", smoke_checkpoint, "--out", out, "--quiet"], capsys)
    assert status == 1 and "No space left on device" in err
    assert out.read_text() == "[]\n"
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Manifests with wrong types reach the user, naming the file, the case and the column.


def _manifest_with_bad_value(folder: Path) -> Path:
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = [-40.0, -40.0, -60.0]
    write_nifti(folder / "c0.nii.gz", random_volume((21, 21, 26)), affine)
    row = {"case_id": "c0", "image": "c0.nii.gz", "split": "test", **dict(zip(LANDMARK_COLUMNS, FACE_MM.ravel()))}
    row["nose_tip_y"] = "twelve"
    path = folder / "manifest.csv"
    pd.DataFrame([row]).to_csv(path, index=False)
    return path


def test_manifest_with_wrong_types_through_evaluate_and_train(tmp_path, smoke_checkpoint, capsys):
    manifest = _manifest_with_bad_value(tmp_path)
    report = tmp_path / "report"
    (report / "runs" / "rpn_ib").mkdir(parents=True)
    (report / "runs" / "rpn_ib" / "checkpoint.pt").write_bytes(smoke_checkpoint.read_bytes())
    for argv in (["evaluate", "--profile", "smoke", "--manifest", manifest, "--report-dir", report],
                 ["train", "--profile", "smoke", "--manifest", manifest, "--out", tmp_path / "run"]):
        status, _, err = _run(argv, capsys)
        assert status == 1, err
        assert str(manifest) in err and "case 'c0'" in err and "nose_tip_y = 'twelve' is not a finite number" in err
    assert not (tmp_path / "run").exists()


def test_manifest_that_is_not_csv_is_reported(tmp_path, capsys):
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    report = tmp_path / "report"
    (report / "runs" / "rpn_ib").mkdir(parents=True)
    (report / "runs" / "rpn_ib" / "checkpoint.pt").write_bytes(b"")
    status, _, err = _run(["evaluate", "--profile", "smoke", "--manifest", manifest, "--report-dir", report], capsys)
    assert status == 1 and str(manifest) in err
