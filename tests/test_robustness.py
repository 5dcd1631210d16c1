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

import igrpn.cli.commands
import igrpn.cli.predict
import igrpn.io
import igrpn.data.markups
import igrpn.reproduce
import igrpn.training.loop
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

        monkeypatch.setattr(igrpn.io.tempfile, "mkstemp", refuse)
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

    monkeypatch.setattr(igrpn.io.os, "replace", failing_replace)
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


# --------------------------------------------------------------------------------------------
# No silent wrong answer, no traceback (issue 16): each bad input is built here, and the command
# must exit with the documented status, one line naming the file and the problem, and leave the
# folder as it was.


def _listing(folder: Path) -> dict:
    """Every file and folder under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def _error_line(err: str, *needles) -> str:
    """The one error line of ``err`` holding every needle (and no traceback anywhere)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if all(str(n) in line for n in needles)]
    assert lines, f"no line with {needles} in:\n{err}"
    return lines[0]


def _checkpoint_variant(source: Path, target: Path, change) -> Path:
    """A copy of a checkpoint with ``change(ckpt)`` applied (the dict is edited in place)."""
    import torch

    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    change(ckpt)
    torch.save(ckpt, target)
    return target


def _set_profile(**fields):
    def change(ckpt):
        ckpt["config"]["profile"].update(fields)
    return change


def _nan_weight(ckpt):
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name] = ckpt["model"][name] * float("nan")


def _drop_weight(ckpt):
    ckpt["model"].pop(next(iter(ckpt["model"])))


def _reshape_weight(ckpt):
    name = next(k for k, v in ckpt["model"].items() if v.ndim == 5)
    ckpt["model"][name] = ckpt["model"][name][:1]


BAD_CHECKPOINTS = {
    "no_config": (lambda ckpt: ckpt.pop("config"), "incomplete igrpn checkpoint: no config"),
    "no_method": (lambda ckpt: ckpt.pop("method"), "incomplete igrpn checkpoint: no method"),
    "no_profile": (lambda ckpt: ckpt["config"].pop("profile"), "incomplete igrpn checkpoint: no config['profile']"),
    "missing_weight": (_drop_weight, "its weights do not fit the rpn model its profile describes: 1 missing"),
    "reshaped_weight": (_reshape_weight, "1 of another shape"),
    "changed_width": (_set_profile(width=8), "of another shape (first: "),
    "zero_spacing": (_set_profile(spacing_mm=0.0), "unusable profile: spacing_mm = 0.0 (must be a positive number)"),
    "negative_spacing": (_set_profile(spacing_mm=-5.2), "unusable profile: spacing_mm = -5.2"),
    "zero_top_k": (_set_profile(top_k=0), "unusable profile: top_k = 0 (must be a positive integer)"),
    "nan_weights": (_nan_weight, "weight tensor(s) hold NaN or inf"),
    "unknown_method": (lambda ckpt: ckpt.update(method="magic"), "unknown method 'magic'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_a_checkpoint_error_naming_the_file(kind, tmp_path, smoke_checkpoint, capsys):
    change, message = BAD_CHECKPOINTS[kind]
    bad = _checkpoint_variant(smoke_checkpoint, tmp_path / "bad.pt", change)
    good = write_nifti(tmp_path / "good.nii.gz", random_volume((20, 20, 20)))
    before = _listing(tmp_path)
    status, out, err = _run(["predict", good, "--checkpoint", bad, "--out", tmp_path / "p.json", "--quiet"], capsys)
    assert status == 1 and out == ""
    line = _error_line(err, bad, message)
    assert line.startswith(f"igrpn predict: error: {bad}: ")
    assert len(err.strip().splitlines()) == 1
    assert _listing(tmp_path) == before


def _pickled_code_checkpoint(path: Path) -> Path:
    import torch

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format_version": 1, "payload": RunsCode()}, path)
    return path


@pytest.mark.parametrize("kind, message", [
    ("random_bytes", "not an igrpn checkpoint (not a file written by torch.save)"),
    ("nifti", "not an igrpn checkpoint (not a file written by torch.save)"),
    ("pickled_code", "refused: it holds pickled Python objects (posix.system) that loading would import and run"),
    ("directory", "is a directory, not a checkpoint"),
])
def test_checkpoint_that_is_not_ours_never_suggests_weights_only_false(kind, message, tmp_path, capsys):
    if kind == "random_bytes":
        bad = tmp_path / "model.pt"
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "nifti":
        bad = write_nifti(tmp_path / "scan_as_ckpt.nii.gz", random_volume((8, 8, 8)))
    elif kind == "pickled_code":
        bad = _pickled_code_checkpoint(tmp_path / "evil.pt")
    else:
        bad = tmp_path / "runs"
        bad.mkdir()
    good = write_nifti(tmp_path / "good.nii.gz", random_volume((20, 20, 20)))
    status, _, err = _run(["predict", good, "--checkpoint", bad, "--quiet"], capsys)
    assert status == 1
    _error_line(err, bad, message)
    assert "weights_only" not in err and "Traceback" not in err


def test_non_finite_model_output_names_the_volume_and_the_checkpoint(smoke_checkpoint):
    """Weights that overflow at inference (the checkpoint's own are checked when it is loaded)."""
    import torch

    broken = Detector.from_checkpoint(smoke_checkpoint)
    with torch.no_grad():
        for parameter in broken.model.parameters():
            parameter.fill_(float("inf"))
    with pytest.raises(ValueError) as refused:
        broken.predict(random_volume((20, 20, 20)), np.diag([4.0, 4.0, 4.0, 1.0]), name="scan.nii.gz")
    message = str(refused.value)
    assert message.startswith("scan.nii.gz: the model's output is not finite")
    assert f"with checkpoint {smoke_checkpoint}" in message


def test_json_output_is_valid_json_even_with_a_non_finite_value(detector, tmp_path):
    rows = detector.predict(random_volume((20, 20, 20)), np.diag([4.0, 4.0, 4.0, 1.0]))
    rows.insert(0, "volume", "v.nii")
    rows.loc[rows.index[0], "score"] = np.nan
    text = igrpn.cli.predict.predictions_text([("v.nii", rows)], tmp_path / "p.json")

    def refuse(constant):
        raise AssertionError(f"bare {constant} in JSON")

    document = __import__("json").loads(text, parse_constant=refuse)
    assert document[0]["candidates"][0]["score"] is None


# Priors and --lambda.


@pytest.mark.parametrize("change, message", [
    ({"mean_face_mm": [[float("nan")] * 3] * 5}, "mean_face_mm holds NaN or inf"),
    ({"landmarks": 5}, "landmarks 5 differ from this version's"),
    ({"edges": 7}, "graph edges 7 differ from this version's"),
    ({"edges": [[0, 1]] * 9}, "graph edges [[0, 1]"),
    ({"ratio_names": None}, "ratio names null differ"),
])
def test_bad_prior_file_is_reported_by_name(change, message, tmp_path, smoke_checkpoint, prior_file, capsys):
    import json

    bad = tmp_path / "prior.json"
    bad.write_text(json.dumps({**json.loads(prior_file.read_text()), **change}))
    good = write_nifti(tmp_path / "good.nii.gz", random_volume((20, 20, 20)))
    status, out, err = _run(["predict", good, "--checkpoint", smoke_checkpoint, "--prior", bad, "--quiet"], capsys)
    assert status == 1 and out == ""
    _error_line(err, bad, message)


@pytest.mark.parametrize("value", ["nan", "-5", "inf", "many"])
def test_bad_lambda_is_a_usage_error(value, tmp_path, smoke_checkpoint, prior_file, capsys):
    good = write_nifti(tmp_path / "good.nii.gz", random_volume((20, 20, 20)))
    before = _listing(tmp_path)
    status, out, err = _run(["predict", good, "--checkpoint", smoke_checkpoint, "--prior", prior_file,
                             "--lambda", value, "--out", tmp_path / "p.csv"], capsys)
    assert status == 2 and out == ""
    _error_line(err, "argument --lambda: must be a finite number >= 0", repr(value))
    assert _listing(tmp_path) == before


def test_detector_refuses_a_non_finite_or_negative_lambda(detector, prior_file):
    for value in (float("nan"), -5.0):
        with pytest.raises(ValueError, match="prior_lambda must be a finite number >= 0"):
            Detector(detector.model, detector.profile, prior=prior_file, prior_lambda=value)


# Volumes that used to lose information silently, or to fail with a misleading message.


def _complex_volume(folder: Path) -> Path:
    volume = random_volume((20, 20, 20)) * (1 + 1j)
    return write_nifti(folder / "complex.nii.gz", volume.astype(np.complex64))


def _rgb_volume(folder: Path) -> Path:
    grey = (random_volume((20, 20, 20)) * 50).astype(np.uint8)
    rgb = np.zeros(grey.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    for channel in "RGB":
        rgb[channel] = grey
    return write_nifti(folder / "rgb.nii.gz", rgb)


def _huge_values_volume(folder: Path) -> Path:
    volume = np.where(random_volume((20, 20, 20)) > 1, 3e38, -3e38).astype(np.float32)
    return write_nifti(folder / "huge_values.nii.gz", volume)


@pytest.mark.parametrize("make, message", [
    (_complex_volume, "complex-valued voxels (complex64); igrpn needs real grey levels"),
    (_rgb_volume, "colour voxels (R/G/B); igrpn needs one grey level per voxel"),
    (_huge_values_volume, "voxel values reach 3e+38 in magnitude, beyond the 1e+37"),
])
def test_volume_igrpn_would_misread_is_refused_saying_why(make, message, tmp_path, smoke_checkpoint, capsys):
    bad = make(tmp_path)
    good = write_nifti(tmp_path / "good.nii.gz", random_volume((20, 20, 20)))
    out = tmp_path / "pred.csv"
    status, _, err = _run(["predict", bad, good, "--checkpoint", smoke_checkpoint, "--out", out, "--quiet"], capsys)
    assert status == 1
    line = _error_line(err, bad, message)
    assert "constant volume" not in line and "truncated or corrupt" not in line
    assert set(pd.read_csv(out)["volume"]) == {str(good)}


def _no_orientation_zero_pixdim(path: Path) -> Path:
    """A NIfTI-1 file with neither qform nor sform and pixdim 0: written byte by byte, since
    nibabel repairs the header it saves."""
    header = nib.Nifti1Header()
    header.set_data_shape((40, 40, 40))  # 40 mm once read as 1 mm voxels
    header.set_data_dtype(np.float32)
    header["pixdim"][1:4] = 0
    header["qform_code"] = header["sform_code"] = 0
    header["vox_offset"] = 352
    path.write_bytes(header.binaryblock + b"\0" * 4 + random_volume((40, 40, 40)).tobytes(order="F"))
    return path


def test_volume_without_geometry_is_predicted_and_the_guess_is_stated(tmp_path, smoke_checkpoint, capsys):
    volume = _no_orientation_zero_pixdim(tmp_path / "no_geometry.nii")
    status, _, err = _run(["predict", volume, "--checkpoint", smoke_checkpoint, "--out", tmp_path / "p.csv",
                           "--quiet"], capsys)
    assert status == 0
    _error_line(err, "igrpn predict: note:", volume, "no qform or sform and voxel size (pixdim) 0 along axis [1, 2, 3]",
                "read as 1 mm voxels")


def test_load_case_warns_about_a_volume_without_geometry(tmp_path):
    from igrpn.data import load_case

    volume = _no_orientation_zero_pixdim(tmp_path / "no_geometry.nii")
    row = {"case_id": "c0", "image": str(volume), "split": "train",
           **dict(zip(LANDMARK_COLUMNS, np.full(15, 0.0)))}
    with pytest.warns(UserWarning, match="no_geometry.nii: no qform or sform"):
        load_case(row, 4.0)


def test_a_volume_given_twice_is_predicted_once_and_said_so(tmp_path, smoke_checkpoint, capsys):
    volume = write_nifti(tmp_path / "scan.nii.gz", random_volume((20, 20, 20)))
    link = tmp_path / "same_scan.nii.gz"
    link.symlink_to(volume)
    out = tmp_path / "p.csv"
    status, _, err = _run(["predict", volume, str(tmp_path / "*.nii.gz"), link, "--checkpoint", smoke_checkpoint,
                           "--out", out, "--quiet"], capsys)
    assert status == 0
    _error_line(err, "igrpn predict: note:", link, "is given more than once; predicted once")
    assert set(pd.read_csv(out)["volume"]) == {str(volume)}


# markups-to-manifest.


def test_markups_to_manifest_refuses_two_images_with_one_name(tmp_path, capsys):
    from igrpn.data.markups import write_markups

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_nifti(tmp_path / folder / "scan.nii.gz", random_volume((20, 20, 20)))
    marks = tmp_path / "marks"
    marks.mkdir()
    write_markups(marks / "scan.mrk.json", LANDMARKS, FACE_MM)
    before = _listing(tmp_path)
    status, _, err = _run(["markups-to-manifest", tmp_path / "a" / "scan.nii.gz", tmp_path / "b" / "scan.nii.gz",
                           "--markups-dir", marks, "--split", "train", "--out", tmp_path / "m.csv"], capsys)
    assert status == 1
    _error_line(err, tmp_path / "a" / "scan.nii.gz", tmp_path / "b" / "scan.nii.gz", "would both be case_id 'scan'")
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("kind, message", [
    ("text", "not a readable NIfTI file"),
    ("2d", "not 3D: shape (20, 20)"),
    ("complex", "complex-valued voxels"),
])
def test_markups_to_manifest_refuses_an_image_that_is_not_a_3d_nifti(kind, message, tmp_path, capsys):
    from igrpn.data.markups import write_markups

    if kind == "text":
        image = tmp_path / "scan.nii.gz"
        image.write_text("not an image\n" * 30)
    elif kind == "2d":
        image = write_nifti(tmp_path / "scan.nii.gz", random_volume((20, 20)))
    else:
        image = _complex_volume(tmp_path)
    marks = tmp_path / "marks"
    marks.mkdir()
    write_markups(marks / f"{igrpn.data.markups.volume_stem(image)}.mrk.json", LANDMARKS, FACE_MM)
    before = _listing(tmp_path)
    status, _, err = _run(["markups-to-manifest", image, "--markups-dir", marks, "--split", "train",
                           "--out", tmp_path / "m.csv"], capsys)
    assert status == 1
    _error_line(err, "no manifest written", image, message)
    assert _listing(tmp_path) == before


# Phantom sizes and output folders.


@pytest.mark.parametrize("argv, message", [
    (["--grid", "100000"], "phantom grid must be an integer from 16 to 256 voxels (igrpn.phantom.MAX_GRID), got 100000"),
    (["--n", "1000000000"], "n must be a positive integer up to 100000"),
    (["--spacing", "nan"], "phantom spacing_mm must be a positive number, got nan"),
])
def test_phantom_sizes_are_checked_before_anything_is_made(argv, message, tmp_path, capsys):
    status, _, err = _run(["phantom", "--out", tmp_path / "data", "--quiet", *argv], capsys)
    assert status == 1
    _error_line(err, "igrpn phantom: error:", message)
    assert list(tmp_path.iterdir()) == []


def test_phantom_refuses_a_manifest_in_a_missing_folder_and_makes_nothing(tmp_path, capsys):
    manifest = tmp_path / "nonexistent" / "dir" / "m.csv"
    status, _, err = _run(["phantom", "--out", tmp_path / "data", "--n", "1", "--grid", "24", "--spacing", "4",
                           "--manifest", manifest, "--quiet"], capsys)
    assert status == 1
    _error_line(err, manifest, f"directory {manifest.parent} does not exist")
    assert list(tmp_path.iterdir()) == []


def test_phantom_manifest_may_go_into_the_out_folder_it_creates(tmp_path, capsys):
    out = tmp_path / "data"
    status, printed, err = _run(["phantom", "--out", out, "--n", "1", "--n-test", "0", "--grid", "24",
                                 "--spacing", "4", "--manifest", out / "m.csv", "--quiet"], capsys)
    assert status == 0, err
    assert (out / "m.csv").is_file() and printed.strip() == str(out / "m.csv")


# Ctrl-C.


def test_ctrl_c_during_predict_stops_cleanly_and_writes_nothing(tmp_path, smoke_checkpoint, capsys, monkeypatch):
    volumes = [write_nifti(tmp_path / f"v{i}.nii.gz", random_volume((20, 20, 20), seed=i)) for i in range(3)]
    out, marks = tmp_path / "pred.csv", tmp_path / "marks"
    predict_file, calls = igrpn.cli.predict.predict_file, []

    def interrupted_on_the_third(detector, path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return predict_file(detector, path)

    monkeypatch.setattr(igrpn.cli.predict, "predict_file", interrupted_on_the_third)
    before = _listing(tmp_path)
    status, out_text, err = _run(["predict", *volumes, "--checkpoint", smoke_checkpoint, "--out", out,
                                  "--markups", marks, "--quiet"], capsys)
    assert status == 130 and out_text == ""
    assert err.strip() == "igrpn predict: interrupted (Ctrl-C): nothing written"
    assert _listing(tmp_path) == before  # no markups of the two volumes done, not even the folder


def test_ctrl_c_while_writing_leaves_all_markups_or_none(tmp_path, smoke_checkpoint, capsys, monkeypatch):
    volumes = [write_nifti(tmp_path / f"v{i}.nii.gz", random_volume((20, 20, 20), seed=i)) for i in range(3)]
    marks = tmp_path / "marks"
    marks.mkdir()
    (marks / "v0.mrk.json").write_text("earlier answer\n")
    write_temporary, written = igrpn.io._write_temporary, []

    def interrupted_on_the_third_file(target, data):
        written.append(target)
        if len(written) == 3:
            raise KeyboardInterrupt
        return write_temporary(target, data)

    monkeypatch.setattr(igrpn.io, "_write_temporary", interrupted_on_the_third_file)
    status, _, err = _run(["predict", *volumes, "--checkpoint", smoke_checkpoint, "--markups", marks, "--quiet"],
                          capsys)
    assert status == 130
    assert err.strip().splitlines()[-1] == "igrpn predict: interrupted (Ctrl-C)"
    assert sorted(p.name for p in marks.iterdir()) == ["v0.mrk.json"]
    assert (marks / "v0.mrk.json").read_text() == "earlier answer\n"


def test_renames_hold_ctrl_c_until_every_file_is_in_place(tmp_path, monkeypatch):
    import signal

    replace, renamed = igrpn.io.os.replace, []

    def replace_then_ctrl_c(source, target):
        replace(source, target)
        renamed.append(target)
        if len(renamed) == 1:
            signal.raise_signal(signal.SIGINT)  # arrives between the first and the second rename

    monkeypatch.setattr(igrpn.io.os, "replace", replace_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        igrpn.io.atomic_write_files({tmp_path / "a.txt": "a", tmp_path / "b.txt": b"b"})
    assert (tmp_path / "a.txt").read_text() == "a" and (tmp_path / "b.txt").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


# Checked before any work: arguments, output paths.


def test_evaluate_bad_n_boot_is_a_usage_error_before_any_prediction(tmp_path, smoke_checkpoint, capsys):
    report = tmp_path / "report"
    (report / "runs" / "rpn_ib").mkdir(parents=True)
    (report / "runs" / "rpn_ib" / "checkpoint.pt").write_bytes(smoke_checkpoint.read_bytes())
    manifest = _manifest_with_bad_value(tmp_path)
    before = _listing(tmp_path)
    for argv in (["--n-boot", "0"], ["--n-boot", "-3"], ["--seed", "-1"]):
        status, _, err = _run(["evaluate", "--profile", "smoke", "--manifest", manifest, "--report-dir", report,
                               *argv], capsys)
        assert status == 2
        _error_line(err, f"argument {argv[0]}: must be")
    assert _listing(tmp_path) == before  # no predictions/ folder


def test_out_naming_an_existing_folder_says_so(tmp_path, smoke_checkpoint, capsys):
    good = write_nifti(tmp_path / "good.nii.gz", random_volume((20, 20, 20)))
    folder = tmp_path / "results"
    folder.mkdir()
    status, _, err = _run(["predict", good, "--checkpoint", smoke_checkpoint, "--out", folder], capsys)
    assert status == 1
    _error_line(err, folder, "cannot write the output: it is a directory")
    assert "suffix" not in err and list(folder.iterdir()) == []


# File modes and links: outputs look like any file the user writes.


@pytest.fixture()
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_outputs_get_the_mode_of_a_plain_write_and_keep_an_existing_one(tmp_path, smoke_checkpoint, capsys,
                                                                        umask_022):
    good = write_nifti(tmp_path / "good.nii.gz", random_volume((20, 20, 20)))
    out, marks = tmp_path / "pred.json", tmp_path / "marks"
    assert _run(["predict", good, "--checkpoint", smoke_checkpoint, "--out", out, "--markups", marks,
                 "--quiet"], capsys)[0] == 0
    assert _mode(out) == 0o644 and _mode(marks / "good.mrk.json") == 0o644
    out.chmod(0o640)
    assert _run(["predict", good, "--checkpoint", smoke_checkpoint, "--out", out, "--quiet"], capsys)[0] == 0
    assert _mode(out) == 0o640
    manifest = tmp_path / "m.csv"
    assert _run(["markups-to-manifest", good, "--markups-dir", marks, "--split", "test", "--out", manifest],
                capsys)[0] == 0
    assert _mode(manifest) == 0o644
    os.umask(0o077)
    igrpn.io.atomic_torch_save({"x": 1}, tmp_path / "run" / "checkpoint.pt")
    assert _mode(tmp_path / "run" / "checkpoint.pt") == 0o600


def test_a_symlinked_out_is_written_through_and_stays_a_link(tmp_path, smoke_checkpoint, capsys):
    good = write_nifti(tmp_path / "good.nii.gz", random_volume((20, 20, 20)))
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "latest.csv"
    target.write_text("old\n")
    link = tmp_path / "pred.csv"
    link.symlink_to(target)
    assert _run(["predict", good, "--checkpoint", smoke_checkpoint, "--out", link, "--quiet"], capsys)[0] == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert set(pd.read_csv(target)["volume"]) == {str(good)}
    assert not [p for p in (tmp_path / "store").iterdir() if p.name.endswith(".tmp")]


def test_phantom_files_get_the_mode_of_a_plain_write(tmp_path, capsys, umask_022):
    out = tmp_path / "data"
    assert _run(["phantom", "--out", out, "--n", "1", "--n-test", "0", "--grid", "24", "--spacing", "4",
                 "--quiet"], capsys)[0] == 0
    assert {p.name: _mode(p) for p in out.iterdir()} == {"phantom_000.nii.gz": 0o644, "data_manifest.csv": 0o644}


# From a fresh clone: the default data set is generated, a user's own manifest never is.


def test_train_without_manifest_generates_the_profiles_data_set(tmp_path, capsys, monkeypatch):
    import dataclasses

    import igrpn.phantom.dataset
    import igrpn.training.loop
    from igrpn import config

    tiny = dataclasses.replace(config.PROFILES["smoke"], phantom_n=2, phantom_n_test=1, phantom_grid=24,
                               phantom_spacing_mm=4.0)
    monkeypatch.setitem(config.PROFILES, "smoke", tiny)
    monkeypatch.setattr(igrpn.phantom.dataset, "REPO_ROOT", tmp_path)  # a fresh clone without data
    trained = {}

    def record(profile, **kwargs):
        trained.update(kwargs)
        return Path(kwargs["out_dir"]) / "checkpoint.pt"

    monkeypatch.setattr(igrpn.training.loop, "train", record)
    status, out, err = _run(["train", "--profile", "smoke", "--out", tmp_path / "run"], capsys)
    assert status == 0, err
    manifest = tmp_path / tiny.manifest
    assert Path(trained["manifest"]) == manifest
    assert len(pd.read_csv(manifest)) == 2 and (manifest.parent / "phantom_000.nii.gz").is_file()
    assert "phantom volumes" in err  # the progress bar of the generation


def test_a_users_missing_manifest_is_never_generated(tmp_path, capsys):
    manifest = tmp_path / "mine.csv"
    status, _, err = _run(["train", "--profile", "smoke", "--manifest", manifest, "--out", tmp_path / "run"], capsys)
    assert status == 1
    _error_line(err, "igrpn train: error:", manifest, "manifest not found")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["predict", "markups-to-manifest", "phantom"])
def test_an_output_files_missing_folder_is_refused_by_every_command(command, tmp_path, smoke_checkpoint, capsys):
    """Folders given as folders (--out DIR, --markups DIR) are created; an output file's is not."""
    good = write_nifti(tmp_path / "good.nii.gz", random_volume((20, 20, 20)))
    target = tmp_path / "no" / "such" / ("m.csv" if command != "predict" else "p.csv")
    argv = {
        "predict": ["predict", good, "--checkpoint", smoke_checkpoint, "--out", target, "--quiet"],
        "markups-to-manifest": ["markups-to-manifest", good, "--markups-dir", tmp_path, "--split", "test",
                                "--out", target],
        "phantom": ["phantom", "--out", tmp_path / "data", "--n", "1", "--grid", "24", "--spacing", "4",
                    "--manifest", target, "--quiet"],
    }[command]
    before = _listing(tmp_path)
    status, _, err = _run(argv, capsys)
    assert status == 1
    _error_line(err, target, f"directory {target.parent} does not exist")
    assert _listing(tmp_path) == before


def test_a_volume_whose_contrast_resampling_averages_away_says_so():
    """2x2x2 voxels of 1 mm are one voxel at 5.2 mm (load_case's path has no extent check)."""
    from igrpn.data import prepare_volume

    with pytest.raises(ValueError) as refused:
        prepare_volume(random_volume((2, 2, 2)), np.eye(4), 5.2, name="tiny.nii")
    message = str(refused.value)
    assert message.startswith("tiny.nii: no contrast left once resampled to 5.2 mm: the 1x1x1 grid")
    assert "constant volume" not in message


def test_evaluate_without_manifest_uses_the_profiles_data_set(tmp_path, smoke_checkpoint, capsys, monkeypatch):
    import igrpn.phantom.dataset

    report = tmp_path / "report"
    (report / "runs" / "rpn_ib").mkdir(parents=True)
    (report / "runs" / "rpn_ib" / "checkpoint.pt").write_bytes(smoke_checkpoint.read_bytes())
    asked = []
    monkeypatch.setattr(igrpn.phantom.dataset, "ensure_dataset", lambda manifest, profile, progress: asked.append(
        (Path(manifest), profile.name)) or Path(manifest))

    def stop(profile, manifest, *args, **kwargs):
        raise ValueError(f"evaluated {manifest}")

    monkeypatch.setattr(igrpn.cli.commands, "evaluate_runs", stop)
    status, _, err = _run(["evaluate", "--profile", "smoke", "--report-dir", report, "--quiet"], capsys)
    expected = igrpn.reproduce.default_manifest("smoke")
    assert asked == [(expected, "smoke")]
    assert status == 1 and f"evaluated {expected}" in err
