"""Tests of igrpn.data: manifest validation, NIfTI loading geometry, augmentation and batching.

Every volume is tiny (≤ 48³) and written to ``tmp_path``.
"""

from __future__ import annotations

import math
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from igrpn import data
from igrpn.config import LANDMARKS

NOSE = LANDMARKS.index("nose_tip")
LEFT_EYE, RIGHT_EYE = LANDMARKS.index("left_eye"), LANDMARKS.index("right_eye")


# ------------------------------------------------------------------------------------ helpers


def oblique_affine() -> np.ndarray:
    """Anisotropic (0.9 × 1.7 × 1.2 mm), third axis negative, axes permuted (i → world y) and
    rotated 20° about z: as_closest_canonical must permute and flip, the rest stays oblique."""
    angle = np.deg2rad(20.0)
    rotate_z = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    permute = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = rotate_z @ permute @ np.diag([0.9, 1.7, -1.2])
    affine[:3, 3] = [12.0, -30.0, 25.0]
    return affine


def blob(shape, affine, centre_mm, sigma_mm=3.0) -> np.ndarray:
    """Gaussian blob of world-space radius ``sigma_mm`` at ``centre_mm``, sampled on a grid."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    world = data.voxel_to_world(index, affine)
    return np.exp(-np.sum((world - centre_mm) ** 2, axis=-1) / (2 * sigma_mm**2))


def write_nifti(path, volume, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(volume), np.eye(4) if affine is None else affine), str(path))
    return path


def manifest_row(case_id, image, landmarks_mm, split="train") -> dict:
    row = {"case_id": case_id, "image": image, "split": split}
    for name, point in zip(LANDMARKS, np.asarray(landmarks_mm, dtype=float)):
        row.update({f"{name}_x": point[0], f"{name}_y": point[1], f"{name}_z": point[2]})
    return row


def write_manifest(folder, rows, name="manifest.csv"):
    path = folder / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def default_landmarks_mm(shape=(16, 16, 16)) -> np.ndarray:
    """Five points well inside an identity-affine volume of ``shape``."""
    c = (np.asarray(shape) - 1) / 2
    return c + np.array([[-3, 2, 0], [0, 3, 1], [3, 2, 0], [0, 0, 3], [0, -4, 1]], dtype=float)


def random_volume(shape=(16, 16, 16), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def simple_case_row(tmp_path, case_id="case_a", shape=(16, 16, 16), volume=None, landmarks=None):
    """Write one identity-affine NIfTI and a manifest of it; return the validated row."""
    image = write_nifti(tmp_path / f"{case_id}.nii.gz", random_volume(shape) if volume is None else volume)
    lm = default_landmarks_mm(shape) if landmarks is None else landmarks
    manifest = write_manifest(tmp_path, [manifest_row(case_id, image.name, lm)])
    return data.read_manifest(manifest).iloc[0]


def centroid(volume, fraction=0.5) -> np.ndarray:
    """Intensity-weighted centroid (voxel indices) of the voxels above ``fraction`` of the peak."""
    volume = np.asarray(volume, dtype=np.float64)
    weights = volume - np.median(volume)
    weights = np.where(weights > fraction * weights.max(), weights, 0.0)
    index = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), axis=-1)
    return (index * weights[..., None]).sum(axis=(0, 1, 2)) / weights.sum()


# ------------------------------------------------------------------------------------ coordinates


def test_world_voxel_round_trip_and_inside():
    affine = oblique_affine()
    points = np.random.default_rng(1).normal(size=(4, 5, 3)) * 10
    assert np.allclose(data.world_to_voxel(data.voxel_to_world(points, affine), affine), points, atol=1e-10)
    # Translation only: world = voxel + t.
    shifted = np.eye(4)
    shifted[:3, 3] = [1, 2, 3]
    assert np.allclose(data.voxel_to_world([0, 0, 0], shifted), [1, 2, 3])
    inside = data.inside_volume([[-0.5, 0, 0], [9.5, 9.5, 9.5], [-0.6, 0, 0], [0, 10.1, 0]], (10, 10, 10))
    assert inside.tolist() == [True, True, False, False]


# ------------------------------------------------------------------------------------ resampling


def test_resample_reproduces_a_linear_field_exactly():
    """Trilinear interpolation is exact for a linear function of world position, so every
    interior voxel of the new grid must hold the field's value at its own world position."""
    affine = oblique_affine()
    shape = (20, 12, 16)
    gradient, offset = np.array([0.3, -0.2, 0.5]), 7.0
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    field = data.voxel_to_world(index, affine) @ gradient + offset

    volume, new_affine = data.resample_volume(field, affine, spacing_mm=1.5)
    voxel_mm = np.array([0.9, 1.7, 1.2])
    assert volume.shape == tuple(math.ceil(n * v / 1.5) for n, v in zip(shape, voxel_mm))  # (12, 14, 13)
    assert volume.dtype == np.float32
    # Isotropic columns parallel to the source's axes.
    assert np.allclose(np.linalg.norm(new_affine[:3, :3], axis=0), 1.5)
    assert np.allclose(new_affine[:3, :3] / 1.5, affine[:3, :3] / voxel_mm)
    # The new grid is centred on the old field of view.
    centre_old = data.voxel_to_world((np.array(shape) - 1) / 2, affine)
    centre_new = data.voxel_to_world((np.array(volume.shape) - 1) / 2, new_affine)
    assert np.allclose(centre_old, centre_new)

    new_index = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), axis=-1)
    new_world = data.voxel_to_world(new_index, new_affine)
    source = data.world_to_voxel(new_world, affine)
    interior = np.all((source >= 0) & (source <= np.array(shape) - 1), axis=-1)
    assert interior.mean() > 0.5
    expected = new_world @ gradient + offset
    assert np.allclose(volume[interior], expected[interior], atol=1e-4)


def test_prepare_volume_is_canonical_and_normalised():
    volume, affine = data.prepare_volume(random_volume((20, 12, 16)) * 50 + 3, oblique_affine(), 2.0)
    assert volume.dtype == np.float32
    assert abs(volume.mean()) < 1e-5 and abs(volume.std() - 1) < 1e-4
    # Closest RAS+: each voxel axis points mostly along the same positive world axis.
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    assert np.all(np.argmax(np.abs(directions), axis=0) == [0, 1, 2])
    assert np.all(np.diag(directions) > 0)


# ------------------------------------------------------------------------------------ load_case


def test_load_case_oblique_anisotropic_flipped_blob_lands_on_landmark(tmp_path):
    affine = oblique_affine()
    shape = (40, 24, 32)
    landmarks_mm = data.voxel_to_world(
        np.array([[12, 8, 10], [20, 12, 16], [28, 8, 10], [25, 9, 20], [20, 16, 24]], dtype=float), affine)
    volume = 10 + 200 * blob(shape, affine, landmarks_mm[NOSE], sigma_mm=3.0)
    image = write_nifti(tmp_path / "oblique.nii.gz", volume.astype(np.float32), affine)
    row = data.read_manifest(write_manifest(tmp_path, [manifest_row("oblique", image.name, landmarks_mm)])).iloc[0]

    case = data.load_case(row, spacing_mm=2.0)

    assert case.case_id == "oblique" and case.split == "train"
    assert case.volume.dtype == np.float32 and case.volume.ndim == 3
    assert abs(case.volume.mean()) < 1e-5 and abs(case.volume.std() - 1) < 1e-4
    assert np.isclose(case.spacing_mm, 2.0)
    # affine @ [vox, 1] == mm
    homogeneous = np.c_[case.landmarks_vox, np.ones(5)]
    assert np.allclose((case.affine @ homogeneous.T).T[:, :3], case.landmarks_mm, atol=1e-9)
    assert np.allclose(case.landmarks_mm, landmarks_mm)
    # The blob, wherever the reorientation and resampling put it, is at the landmark's voxel.
    assert np.linalg.norm(centroid(case.volume) - case.landmarks_vox[NOSE]) < 0.5
    peak = np.array(np.unravel_index(np.argmax(case.volume), case.volume.shape))
    assert np.linalg.norm(peak - case.landmarks_vox[NOSE]) <= 1.0


def test_4d_single_volume_loads_like_3d(tmp_path):
    volume = random_volume((16, 16, 16))
    write_nifti(tmp_path / "four_d.nii.gz", volume[..., None])
    write_nifti(tmp_path / "three_d.nii.gz", volume)
    lm = default_landmarks_mm()
    table = data.read_manifest(write_manifest(tmp_path, [manifest_row("four_d", "four_d.nii.gz", lm),
                                                         manifest_row("three_d", "three_d.nii.gz", lm)]))
    four, three = (data.load_case(table.iloc[i], 2.0) for i in range(2))
    assert four.volume.shape == three.volume.shape == (8, 8, 8)
    assert np.allclose(four.volume, three.volume)
    assert np.allclose(four.landmarks_vox, three.landmarks_vox)


# ------------------------------------------------------------------------------------ errors


def _rows(tmp_path, n=2):
    """n valid rows (files written) as dicts, to be spoilt by a test."""
    rows = []
    for i in range(n):
        image = write_nifti(tmp_path / f"c{i}.nii.gz", random_volume(seed=i))
        rows.append(manifest_row(f"c{i}", image.name, default_landmarks_mm()))
    return rows


def test_manifest_is_validated_and_resolved(tmp_path):
    rows = _rows(tmp_path)
    rows[0]["seed"], rows[1]["seed"] = 3, 4
    rows[0]["notes"], rows[1]["notes"] = "", "x"
    sub = tmp_path / "sub"
    sub.mkdir()
    for row in rows:
        row["image"] = "../" + row["image"]  # relative to the manifest's folder, not the cwd
    table = data.read_manifest(write_manifest(sub, rows))
    assert list(table.columns[:3]) == ["case_id", "image", "split"]
    assert table["image"].tolist() == [str(tmp_path / "c0.nii.gz"), str(tmp_path / "c1.nii.gz")]
    assert table["seed"].tolist() == [3, 4] and table["notes"].tolist() == ["", "x"]
    assert table["nose_tip_z"].dtype == np.float64


def test_case_ids_stay_text(tmp_path):
    rows = _rows(tmp_path, 1)
    rows[0]["case_id"] = "007"
    table = data.read_manifest(write_manifest(tmp_path, rows))
    assert table["case_id"].tolist() == ["007"]


@pytest.mark.parametrize(
    "spoil, expected",
    [
        (lambda rows: [r.pop("nose_tip_z") for r in rows], ["missing column", "nose_tip_z"]),
        (lambda rows: rows[1].update(image="nowhere.nii.gz"), ["case 'c1'", "'nowhere.nii.gz' not found"]),
        (lambda rows: rows[1].update(case_id="c0"), ["case 'c0'", "duplicate case_id"]),
        (lambda rows: rows[1].update(split="validation"), ["case 'c1'", "unknown split 'validation'"]),
        (lambda rows: rows[0].update(chin_y="abc"), ["case 'c0'", "chin_y", "'abc'", "not a finite number"]),
        (lambda rows: rows[0].update(chin_y=float("inf")), ["case 'c0'", "chin_y", "not a finite number"]),
        (lambda rows: rows[0].update(case_id=""), ["row 0 (line 2)", "empty case_id"]),
    ],
)
def test_manifest_errors_name_file_case_and_problem(tmp_path, spoil, expected):
    rows = _rows(tmp_path)
    spoil(rows)
    manifest = write_manifest(tmp_path, rows, name="my_manifest.csv")
    with pytest.raises(ValueError) as info:
        data.read_manifest(manifest)
    assert isinstance(info.value, data.ManifestError)
    message = str(info.value)
    assert "my_manifest.csv" in message
    for fragment in expected:
        assert fragment in message, message


def test_manifest_reports_every_problem_at_once(tmp_path):
    rows = _rows(tmp_path, 3)
    rows[0]["image"], rows[2]["image"] = "gone_0.nii.gz", "gone_2.nii.gz"
    rows[1]["split"] = "val"
    with pytest.raises(data.ManifestError) as info:
        data.read_manifest(write_manifest(tmp_path, rows))
    message = str(info.value)
    assert "3 problem(s)" in message
    for fragment in ("case 'c0': image 'gone_0.nii.gz' not found", "case 'c2': image 'gone_2.nii.gz' not found",
                     "case 'c1': unknown split 'val'"):
        assert fragment in message, message


def test_missing_manifest(tmp_path):
    with pytest.raises(data.ManifestError, match="absent.csv: manifest not found"):
        data.read_manifest(tmp_path / "absent.csv")


def _write_bad(path, kind):
    """Write a file that load_case must refuse."""
    if kind == "garbage":
        path.write_bytes(b"this is not a NIfTI file" * 20)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        write_nifti(path, random_volume((24, 24, 24)))
        content = path.read_bytes()
        path.write_bytes(content[: len(content) // 2])
    elif kind == "nan":
        volume = random_volume()
        volume[3, 4, 5] = np.nan
        write_nifti(path, volume)
    elif kind == "2d":
        write_nifti(path, random_volume((16, 16, 1))[..., 0])
    elif kind == "4d":
        write_nifti(path, random_volume((16, 16, 16, 2)))
    elif kind == "constant":
        write_nifti(path, np.full((16, 16, 16), 5.0, dtype=np.float32))


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("garbage", "not a readable NIfTI"),
        ("empty", "empty file"),
        ("truncated", "truncated or corrupt"),
        ("nan", "1 NaN or infinite voxels"),
        ("2d", "not 3D: shape (16, 16)"),
        ("4d", "not 3D: shape (16, 16, 16, 2)"),
        ("constant", "constant volume"),
    ],
)
def test_unloadable_files_name_case_file_and_problem(tmp_path, kind, expected):
    path = tmp_path / "bad.nii.gz"
    _write_bad(path, kind)
    row = data.read_manifest(write_manifest(tmp_path, [manifest_row("bad_case", path.name, default_landmarks_mm())])).iloc[0]
    with pytest.raises(ValueError) as info:
        data.load_case(row, 2.0)
    assert isinstance(info.value, data.CaseError)
    message = str(info.value)
    for fragment in ("case 'bad_case'", "bad.nii.gz", expected):
        assert fragment in message, message


def test_landmark_outside_the_volume_is_refused(tmp_path):
    lm = default_landmarks_mm()
    lm[LANDMARKS.index("chin")] = [7.5, 40.0, 7.5]  # beyond y = 15.5 mm
    row = simple_case_row(tmp_path, "far_chin", landmarks=lm)
    with pytest.raises(data.CaseError) as info:
        data.load_case(row, 2.0)
    message = str(info.value)
    for fragment in ("case 'far_chin'", "landmark 'chin'", "[7.5, 40.0, 7.5] mm", "outside"):
        assert fragment in message, message
    assert "nose_tip" not in message


def test_landmark_on_the_edge_of_the_field_of_view_is_accepted(tmp_path):
    lm = default_landmarks_mm()
    lm[0] = [-0.5, 7.5, 15.5]  # on the outer faces of the first/last source voxels
    case = data.load_case(simple_case_row(tmp_path, landmarks=lm), 2.0)
    # 16 voxels of 1 mm → 8 of 2 mm centred on the same field of view: world = 2·i + 0.5.
    assert case.volume.shape == (8, 8, 8)
    assert np.allclose(case.landmarks_vox[0], [-0.5, 3.5, 7.5])


# ------------------------------------------------------------------------------------ load_cases


def test_load_cases_filters_split_and_caches(tmp_path):
    rows = _rows(tmp_path, 3)
    rows[2]["split"] = "test"
    manifest = write_manifest(tmp_path, rows)
    data.clear_cache()
    first = data.load_cases(data.read_manifest(manifest), 2.0, split="train", progress=False)
    assert [c.case_id for c in first] == ["c0", "c1"]
    assert all(c.split == "train" for c in first)

    # The second call reads no file: spoil c0 keeping its size and mtime, and the cached
    # volume still comes back (a re-read would fail on the garbage).
    path = tmp_path / "c0.nii.gz"
    stat = path.stat()
    path.write_bytes(b"x" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = data.load_cases(manifest, 2.0, split="train", progress=False)
    assert second[0].volume is first[0].volume

    # A rewritten file or another spacing is loaded again.
    write_nifti(path, random_volume((20, 16, 16), seed=9))
    third = data.load_cases(manifest, 2.0, split="train", progress=False)
    assert third[0].volume.shape == (10, 8, 8)
    assert data.load_cases(manifest, 4.0, split="train", progress=False)[0].volume.shape == (5, 4, 4)
    test_cases = data.load_cases(manifest, 2.0, split="test", progress=False)
    assert [c.case_id for c in test_cases] == ["c2"]
    with pytest.raises(ValueError, match="unknown split 'val'"):
        data.load_cases(manifest, 2.0, split="val", progress=False)
    data.clear_cache()


def test_load_cases_takes_landmarks_from_the_manifest_not_the_cache(tmp_path):
    rows = _rows(tmp_path, 1)
    data.clear_cache()
    first = data.load_cases(write_manifest(tmp_path, rows), 2.0, progress=False)[0]
    rows[0]["chin_x"] += 2.0
    second = data.load_cases(write_manifest(tmp_path, rows, "other.csv"), 2.0, progress=False)[0]
    assert second.volume is first.volume
    assert np.isclose(second.landmarks_vox[4, 0] - first.landmarks_vox[4, 0], 1.0)  # 2 mm / 2 mm
    data.clear_cache()


# ------------------------------------------------------------------------------------ augmentation


def blob_case(shape, landmarks_vox, blob_rows, sigma_vox=1.5) -> data.Case:
    """A Case on an identity grid whose volume holds a unit blob at each of ``blob_rows``."""
    volume = np.zeros(shape, dtype=np.float32)
    for row in blob_rows:
        volume += blob(shape, np.eye(4), landmarks_vox[row], sigma_mm=sigma_vox).astype(np.float32)
    landmarks_vox = np.asarray(landmarks_vox, dtype=np.float64)
    return data.Case("blob", volume, np.eye(4), landmarks_vox.copy(), landmarks_vox.copy(), "train")


def test_rotation_moves_volume_and_landmarks_together():
    shape = (36, 40, 32)
    centre = (np.array(shape) - 1) / 2
    landmarks = centre + np.array([[-2, 1, 0], [0, 2, 0], [2, 1, 0], [8, -7, 4], [0, -2, 1]], dtype=float)
    case = blob_case(shape, landmarks, [NOSE])
    dataset = data.LandmarkDataset([case], augment=True, rotation_deg=25.0, flip_prob=0.0, seed=3)
    moved = []
    for epoch in range(4):
        dataset.set_epoch(epoch)
        item = dataset[0]
        assert item["volume"].shape == (1, *shape) and item["volume"].dtype == torch.float32
        assert item["landmarks_vox"].shape == (5, 3) and item["landmarks_vox"].dtype == torch.float32
        target = item["landmarks_vox"][NOSE].numpy()
        assert np.linalg.norm(centroid(item["volume"][0].numpy()) - target) < 1.0
        # Distances to the rotation centre are preserved: a rotation, not any motion.
        assert np.allclose(np.linalg.norm(item["landmarks_vox"].numpy() - centre, axis=1),
                           np.linalg.norm(landmarks - centre, axis=1), atol=1e-4)
        moved.append(np.linalg.norm(target - landmarks[NOSE]))
    assert max(moved) > 2.0  # the augmentation did rotate


def test_rotate_sample_known_quarter_turn():
    """90° about z maps (x, y) → (−y, x) about the centre; the outside fill is the minimum."""
    shape = (9, 9, 5)
    landmarks = np.array([[6.0, 4.0, 2.0]] * 5)
    volume = torch.zeros(shape)
    volume[6, 4, 2] = 1.0
    rotated, moved = data.rotate_sample(volume, landmarks, data.rotation_matrix([0, 0, 90]))
    assert np.allclose(moved[0], [4.0, 6.0, 2.0])
    assert rotated[4, 6, 2] == pytest.approx(1.0, abs=1e-5)
    assert float(rotated.sum()) == pytest.approx(1.0, abs=1e-4)

    # Content rotated in from outside a 45°-turned rectangle takes the volume's minimum (−3).
    rect = torch.full((12, 4, 3), 2.0)
    rect[0, 0, 0] = -3.0
    out, _ = data.rotate_sample(rect, np.full((5, 3), 1.0), data.rotation_matrix([0, 0, 45]))
    assert float(out.min()) == pytest.approx(-3.0) and float(out.max()) <= 2.0 + 1e-5
    assert (out == -3.0).sum() > 5


def test_rotation_falls_back_to_none_when_a_landmark_would_leave():
    shape = (16, 16, 16)
    landmarks = np.full((5, 3), 7.5)
    landmarks[1] = [-0.5, -0.5, -0.5]  # the corner of the extent: any rotation takes it outside
    case = blob_case(shape, landmarks, [NOSE])
    item = data.LandmarkDataset([case], augment=True, rotation_deg=25.0, flip_prob=0.0)[0]
    assert np.allclose(item["landmarks_vox"].numpy(), landmarks)
    assert torch.equal(item["volume"][0], torch.from_numpy(case.volume))


@pytest.mark.parametrize("axes, swapped", [((0,), True), ((1,), True), ((0, 1), False), ((0, 1, 2), True)])
def test_flip_swaps_eyes_after_an_odd_number_of_mirrors(axes, swapped):
    shape = (20, 18, 16)
    landmarks = np.array([[5, 6, 7], [9, 4, 8], [14, 6, 7], [10, 9, 3], [9, 14, 5]], dtype=float)
    case = blob_case(shape, landmarks, [LEFT_EYE, RIGHT_EYE])
    volume, moved = data.flip_sample(torch.from_numpy(case.volume), landmarks, axes)
    mirrored = landmarks.copy()
    for axis in axes:
        mirrored[:, axis] = shape[axis] - 1 - mirrored[:, axis]
    expected = mirrored[[2, 1, 0, 3, 4]] if swapped else mirrored
    assert np.allclose(moved, expected)
    # The eye landmarks still sit on the eye blobs.
    for row in (LEFT_EYE, RIGHT_EYE):
        i, j, k = np.round(moved[row]).astype(int)
        assert float(volume[i, j, k]) > 0.99


def test_dataset_flip_all_axes_swaps_eyes_and_is_reproducible():
    shape = (20, 18, 16)
    landmarks = np.array([[5, 6, 7], [9, 4, 8], [14, 6, 7], [10, 9, 3], [9, 14, 5]], dtype=float)
    case = blob_case(shape, landmarks, [LEFT_EYE, RIGHT_EYE])
    item = data.LandmarkDataset([case], augment=True, rotation_deg=0.0, flip_prob=1.0)[0]
    mirrored = np.array(shape) - 1 - landmarks
    assert np.allclose(item["landmarks_vox"].numpy(), mirrored[[2, 1, 0, 3, 4]])
    assert torch.equal(item["volume"][0], torch.from_numpy(case.volume).flip((0, 1, 2)))

    random_case = data.Case("r", random_volume((16, 16, 16)), np.eye(4), default_landmarks_mm(),
                            default_landmarks_mm(), "train")
    make = lambda seed: data.LandmarkDataset([random_case], augment=True, seed=seed)  # noqa: E731
    a, b = make(5), make(5)
    assert torch.equal(a[0]["volume"], b[0]["volume"])
    a.set_epoch(1)
    assert not torch.equal(a[0]["volume"], b[0]["volume"])
    b.set_epoch(1)
    assert torch.equal(a[0]["landmarks_vox"], b[0]["landmarks_vox"])
    assert not torch.equal(make(6)[0]["volume"], make(5)[0]["volume"])
    # Without augmentation the item is the case itself.
    plain = data.LandmarkDataset([random_case])[0]
    assert torch.equal(plain["volume"][0], torch.from_numpy(random_case.volume))
    assert plain["case_id"] == "r"


def test_dataset_rejects_bad_parameters():
    with pytest.raises(ValueError, match="flip_prob"):
        data.LandmarkDataset([], flip_prob=1.5)
    with pytest.raises(ValueError, match="rotation_deg"):
        data.LandmarkDataset([], rotation_deg=-1)
    with pytest.raises(ValueError, match="seed"):
        data.LandmarkDataset([], seed=-2)


# ------------------------------------------------------------------------------------ collate


def test_collate_pads_to_a_multiple_of_eight_at_the_high_end():
    items = [
        {"volume": torch.ones(1, 10, 16, 7), "landmarks_vox": torch.zeros(5, 3), "case_id": "a"},
        {"volume": torch.full((1, 12, 9, 17), 2.0), "landmarks_vox": torch.ones(5, 3), "case_id": "b"},
    ]
    batch = data.collate(items)
    assert batch["volume"].shape == (2, 1, 16, 16, 24)
    assert batch["landmarks_vox"].shape == (2, 5, 3) and batch["case_id"] == ["a", "b"]
    assert torch.equal(batch["volume"][0, 0, :10, :16, :7], torch.ones(10, 16, 7))
    assert batch["volume"][0, 0, 10:].abs().sum() == 0 and batch["volume"][0, 0, :, :, 7:].abs().sum() == 0
    assert float(batch["volume"][1].sum()) == 2.0 * 12 * 9 * 17
    assert torch.equal(batch["landmarks_vox"][1], torch.ones(5, 3))
    # Already a multiple of 8: no padding.
    exact = {"volume": torch.ones(1, 8, 16, 8), "landmarks_vox": torch.zeros(5, 3), "case_id": "c"}
    assert data.collate([exact])["volume"].shape == (1, 1, 8, 16, 8)


def test_training_crop_keeps_landmarks_on_their_voxels_and_inside_the_margin():
    import igrpn.data as data_module

    volume = np.zeros((48, 44, 40), dtype=np.float32)
    landmarks = np.array([[14, 20, 18], [20, 24, 18], [26, 20, 18], [20, 18, 24], [20, 12, 26]], float)
    for n, point in enumerate(landmarks):
        volume[tuple(point.astype(int))] = n + 1.0  # each landmark marks its own voxel
    case = data_module.Case(case_id="crop", volume=volume, affine=np.eye(4), landmarks_mm=landmarks,
                            landmarks_vox=landmarks, split="train")
    for augment in (False, True):
        dataset = data_module.LandmarkDataset([case], augment=augment, rotation_deg=0.0, flip_prob=0.0,
                                              crop_size=32, crop_margin=5)
        for epoch in range(4):
            dataset.set_epoch(epoch)
            item = dataset[0]
            cropped, moved = item["volume"][0].numpy(), item["landmarks_vox"].numpy()
            assert cropped.shape == (32, 32, 32)
            assert (moved >= 5).all() and (moved <= 31 - 5).all()
            for n, point in enumerate(moved):
                assert cropped[tuple(np.round(point).astype(int))] == n + 1.0


def test_rotating_only_a_window_equals_cropping_the_rotated_volume():
    import igrpn.data as data_module

    generator = torch.Generator().manual_seed(0)
    volume = torch.rand((20, 18, 16), generator=generator)
    landmarks = np.array([[9.0, 8.0, 7.0], [10.5, 9.0, 8.0]])
    rotation = data_module.rotation_matrix([20.0, -10.0, 15.0])
    whole, moved = data_module.rotate_sample(volume, landmarks, rotation)
    window, moved_window = data_module.rotate_sample(volume, landmarks, rotation, origin=(3, 2, 4),
                                                     out_shape=(12, 10, 8))
    torch.testing.assert_close(window, whole[3:15, 2:12, 4:12])
    np.testing.assert_allclose(moved_window, moved - [3, 2, 4])
