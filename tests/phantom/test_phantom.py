"""Tests of the synthetic fetal-face ultrasound phantom (igrpn.phantom).

Small grids keep the field of view of the data set (about 166 mm) at a coarse spacing.
"""

from __future__ import annotations

import csv
import dataclasses

import nibabel as nib
import numpy as np
import pytest

from igrpn.config import GT_BOX_MM, LANDMARKS, get_profile
from igrpn.phantom import (
    MANIFEST_COLUMNS,
    MATERIAL_NAMES,
    case_seeds,
    ensure_dataset,
    generate_dataset,
    main,
    make_phantom,
    make_phantom_with_info,
    split_labels,
)

FOV_MM = 166.4
GRID, SPACING = 64, FOV_MM / 64  # 2.6 mm, the smoke profile's phantom
SMALL, SMALL_SPACING = 32, FOV_MM / 32  # 5.2 mm, for data-set plumbing
NO_DISTRACTORS = {"hand_prob": 0.0, "foot_prob": 0.0, "cord_prob": 0.0}


def voxel_of(points_mm, affine):
    """(N, 3) world mm -> (N, 3) voxel indices."""
    return (np.asarray(points_mm) - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T


def distances_mm(grid, affine, point_mm):
    """(grid, grid, grid) distance (mm) of every voxel centre from ``point_mm``."""
    axis = np.arange(grid)
    i, j, k = np.meshgrid(axis, axis, axis, indexing="ij")
    world = np.stack([i, j, k], axis=-1) @ affine[:3, :3].T + affine[:3, 3]
    return np.linalg.norm(world - point_mm, axis=-1)


def test_shapes_dtypes_and_affine():
    volume, affine, landmarks = make_phantom(0, grid=48, spacing_mm=FOV_MM / 48)
    assert volume.shape == (48, 48, 48) and volume.dtype == np.uint8
    assert affine.shape == (4, 4) and affine.dtype == np.float64
    np.testing.assert_allclose(np.diag(affine)[:3], FOV_MM / 48)
    np.testing.assert_allclose(affine[3], [0, 0, 0, 1])
    # The volume is centred on the world origin.
    np.testing.assert_allclose(affine[:3, :3] @ np.full(3, 23.5) + affine[:3, 3], 0.0, atol=1e-9)
    assert landmarks.shape == (5, 3) and landmarks.dtype == np.float64
    assert np.isfinite(landmarks).all()
    assert 5 < volume.mean() < 150 and volume.max() > 200  # neither blank nor saturated


def test_same_seed_same_bytes_and_different_seeds_differ():
    a = make_phantom(11, grid=GRID, spacing_mm=SPACING)
    b = make_phantom(11, grid=GRID, spacing_mm=SPACING)
    c = make_phantom(12, grid=GRID, spacing_mm=SPACING)
    assert a[0].tobytes() == b[0].tobytes()
    assert np.array_equal(a[2], b[2]) and np.array_equal(a[1], b[1])
    assert a[0].tobytes() != c[0].tobytes()
    assert not np.allclose(a[2], c[2])


@pytest.mark.parametrize("seed", range(8))
def test_every_landmark_half_a_box_plus_margin_inside(seed):
    volume, affine, landmarks = make_phantom(seed, grid=48, spacing_mm=FOV_MM / 48)
    vox = voxel_of(landmarks, affine)
    margin_vox = (np.asarray(GT_BOX_MM) / 2 + 2.0) / affine[0, 0]
    assert np.all(vox >= margin_vox[:, None] - 1e-9)
    assert np.all(vox <= 47 - margin_vox[:, None] + 1e-9)


def test_landmarks_follow_the_anatomy_in_the_face_frame():
    """Biometric ranges of docs/design.md §4 / phantom-facts, in the face frame (x right, y anterior, z up)."""
    ratios = []
    for seed in range(10):
        _, _, landmarks, info = make_phantom_with_info(seed, grid=SMALL, spacing_mm=SMALL_SPACING)
        face = info.landmarks_face_mm
        # The face frame maps onto the world landmarks through face_to_world (a proper rotation).
        rotation, translation = info.face_to_world[:3, :3], info.face_to_world[:3, 3]
        np.testing.assert_allclose(face @ rotation.T + translation, landmarks, atol=1e-9)
        np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(rotation) == pytest.approx(1.0)
        left, brow, right, nose, chin = face
        eye_line_z, eye_plane_y = 0.5 * (left[2] + right[2]), 0.5 * (left[1] + right[1])
        assert left[0] < 0 < right[0]  # fetal left is -x in the (RAS) face frame
        assert 20.0 - 1e-6 <= np.linalg.norm(left - right) <= 33.0 + 1e-6
        assert 1.0 <= brow[2] - eye_line_z <= 11.0  # a few mm above the eye line
        assert 14.0 <= brow[2] - nose[2] <= 26.0
        assert 7.0 <= nose[1] - eye_plane_y <= 16.0
        assert 29.0 <= brow[2] - chin[2] <= 46.0
        assert chin[1] < nose[1] - 2.0  # chin set back from the nose tip
        assert 0.8 <= info.scale <= 1.2
        assert 50.0 <= 2 * info.skull_semi_axes_mm[0] <= 80.0  # BPD
        assert 65.0 <= 2 * info.skull_semi_axes_mm[1] <= 105.0  # OFD
        ratios.append(np.linalg.norm(left - right) / np.linalg.norm(brow - nose))
    assert np.std(ratios) > 0.05  # shape variation: distance ratios really vary


def test_poses_vary():
    spins, tilts = [], []
    for seed in range(10):
        info = make_phantom_with_info(seed, grid=SMALL, spacing_mm=SMALL_SPACING)[3]
        spins.append(info.pose_deg[0])
        tilts.extend(info.pose_deg[1:])
        # Broadly facing the probe (+z): the anterior axis never points away from it.
        assert info.face_to_world[2, 1] > 0.0
    assert np.ptp(spins) > 120 and max(np.abs(tilts)) > 15 and max(np.abs(tilts)) <= 40


def test_eye_centres_are_darker_than_their_surroundings():
    """Hypoechoic eyes: a small ball at each eye centre is darker than a shell around it."""
    contrasts = []
    for seed in range(5):
        volume, affine, landmarks = make_phantom(seed, grid=GRID, spacing_mm=SPACING)
        for eye in (0, 2):
            distance = distances_mm(GRID, affine, landmarks[eye])
            ball = volume[distance <= 2.8].astype(float).mean()
            shell = volume[(distance >= 7.5) & (distance <= 12.0)].astype(float).mean()
            contrasts.append(shell - ball)
    assert np.mean(contrasts) > 20.0
    assert np.mean(np.array(contrasts) > 0) >= 0.8


def test_skull_is_brighter_than_fluid():
    skull_means, fluid_means = [], []
    for seed in range(3):
        volume, affine, _, info = make_phantom_with_info(seed, grid=GRID, spacing_mm=SPACING, fan=False)
        # Voxels of the bony vault: bone labels within the cranial ellipsoid's outer layer.
        axis = np.arange(GRID)
        i, j, k = np.meshgrid(axis, axis, axis, indexing="ij")
        world = np.stack([i, j, k], axis=-1) @ affine[:3, :3].T + affine[:3, 3]
        rotation, translation = info.face_to_world[:3, :3], info.face_to_world[:3, 3]
        face = (world - translation) @ rotation  # world -> face frame
        radius = np.linalg.norm((face - info.skull_centre_mm) / info.skull_semi_axes_mm, axis=-1)
        labels = info.labels
        skull = (labels == MATERIAL_NAMES.index("bone")) & (radius > 0.9) & (radius < 1.05)
        fluid = labels == MATERIAL_NAMES.index("fluid")
        assert skull.sum() > 50 and fluid.sum() > 1000
        skull_means.append(volume[skull].mean())
        fluid_means.append(volume[fluid].mean())
    assert np.mean(skull_means) > np.mean(fluid_means) + 80.0


def test_landmarks_sit_on_their_features():
    """Eye landmarks inside the globe; brow, nose and chin on the skin (tissue next to non-fetus)."""
    fetus = {MATERIAL_NAMES.index(name) for name in ("soft_tissue", "bone", "thin_bone", "vitreous", "lens",
                                                     "brain", "csf", "choroid", "falx")}
    for seed in range(3):
        _, affine, landmarks, info = make_phantom_with_info(seed, grid=GRID, spacing_mm=SPACING, **NO_DISTRACTORS)
        vox = np.rint(voxel_of(landmarks, affine)).astype(int)
        for index, (i, j, k) in enumerate(vox):
            if LANDMARKS[index].endswith("eye"):
                assert MATERIAL_NAMES[info.labels[i, j, k]] == "vitreous"
            else:
                near = set(np.unique(info.labels[i - 1:i + 2, j - 1:j + 2, k - 1:k + 2]).tolist())
                assert MATERIAL_NAMES.index("soft_tissue") in near, LANDMARKS[index]
                assert near - fetus, LANDMARKS[index]  # some fluid or uterus next to the skin point


def test_fan_shaped_field_of_view():
    volume, _, _, info = make_phantom_with_info(3, grid=GRID, spacing_mm=SPACING)
    # The apex is above the volume (high z): the top corners are outside the fan, hence zero.
    for i in (0, GRID - 1):
        for j in (0, GRID - 1):
            assert volume[i, j, GRID - 1] == 0
    assert info.imaging["apex_mm"][2] > FOV_MM / 2
    assert 60.0 <= 2 * min(info.imaging["fan_half_angles_deg"]) <= 75.0
    unmasked = make_phantom(3, grid=GRID, spacing_mm=SPACING, fan=False)[0]
    inside = volume > 0
    assert np.array_equal(volume[inside], unmasked[inside])  # the mask only zeroes voxels
    assert (unmasked[~inside] > 0).any()


def test_distractors_change_nothing_else():
    _, _, landmarks, info = make_phantom_with_info(2, grid=SMALL, spacing_mm=SMALL_SPACING)
    _, _, bare_landmarks, bare = make_phantom_with_info(2, grid=SMALL, spacing_mm=SMALL_SPACING, **NO_DISTRACTORS)
    np.testing.assert_array_equal(landmarks, bare_landmarks)
    assert not any(tag.startswith(("hand", "foot", "cord")) for tag in bare.distractors)
    assert "cord" in info.distractors or any(tag.startswith(("hand", "foot")) for tag in info.distractors)


def test_limbs_near_the_face_in_a_good_share():
    limbs = 0
    for seed in range(20):
        info = make_phantom_with_info(seed, grid=SMALL, spacing_mm=SMALL_SPACING)[3]
        limbs += any(tag.startswith(("hand", "foot")) for tag in info.distractors)
    assert 6 <= limbs <= 17  # ~57 % expected


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="unknown phantom options"):
        make_phantom(0, grid=SMALL, spacing_mm=SMALL_SPACING, hands=1)
    with pytest.raises(ValueError, match="seed"):
        make_phantom(-1)
    with pytest.raises(ValueError, match="grid"):
        make_phantom(0, grid=4)
    with pytest.raises(ValueError, match="hand_prob"):
        make_phantom(0, grid=SMALL, spacing_mm=SMALL_SPACING, hand_prob=1.5)
    with pytest.raises(ValueError, match="no pose"):
        make_phantom(0, grid=16, spacing_mm=2.0)  # 32 mm of field cannot hold a face


def test_case_seeds_and_split():
    assert np.array_equal(case_seeds(0, 5), case_seeds(0, 12)[:5])
    assert len(set(case_seeds(0, 152).tolist())) == 152
    assert not np.array_equal(case_seeds(0, 5), case_seeds(1, 5))
    labels = split_labels(0, 152, 32)
    assert labels.count("test") == 32 and labels.count("train") == 120
    assert labels == split_labels(0, 152, 32) and labels != split_labels(1, 152, 32)


def read_manifest_rows(path):
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        return reader.fieldnames, list(reader)


def test_generate_dataset_writes_volumes_and_manifest(tmp_path):
    out = tmp_path / "data" / "phantom"
    manifest = generate_dataset(out, n=5, seed=3, n_test=2, grid=SMALL, spacing_mm=SMALL_SPACING, progress=False)
    assert manifest == out / "data_manifest.csv"
    columns, rows = read_manifest_rows(manifest)
    assert tuple(columns) == MANIFEST_COLUMNS
    assert columns[:3] == ["case_id", "image", "split"] and columns[-3:] == ["source", "seed", "notes"]
    assert [row["case_id"] for row in rows] == [f"phantom_{i:03d}" for i in range(5)]
    assert sum(row["split"] == "test" for row in rows) == 2
    assert sum(row["split"] == "train" for row in rows) == 3
    assert [int(row["seed"]) for row in rows] == case_seeds(3, 5).tolist()
    for row in rows:
        assert row["source"] == "phantom" and row["image"] == f"{row['case_id']}.nii.gz"
        assert all(len(row[f"{name}_x"].split(".")[1]) == 4 for name in LANDMARKS)
        image = nib.load(out / row["image"])
        volume = np.asarray(image.dataobj)
        assert volume.shape == (SMALL,) * 3 and volume.dtype == np.uint8
        landmarks = np.array([[float(row[f"{name}_{axis}"]) for axis in "xyz"] for name in LANDMARKS])
        vox = voxel_of(landmarks, image.affine)
        assert np.all((vox >= 0) & (vox <= SMALL - 1))
        # The file holds exactly what make_phantom makes for that seed.
        expected, affine, expected_landmarks = make_phantom(int(row["seed"]), grid=SMALL, spacing_mm=SMALL_SPACING)
        assert np.array_equal(volume, expected)
        np.testing.assert_allclose(image.affine, affine)
        np.testing.assert_allclose(landmarks, expected_landmarks, atol=6e-5)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))  # no temporary left behind

    # Same arguments, same files; a manifest elsewhere points back to the volumes.
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    elsewhere = generate_dataset(out, n=5, seed=3, n_test=2, grid=SMALL, spacing_mm=SMALL_SPACING,
                                 manifest_path=tmp_path / "data_manifest.csv", progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    _, moved = read_manifest_rows(elsewhere)
    assert moved[0]["image"] == "data/phantom/phantom_000.nii.gz"
    assert [r["left_eye_x"] for r in moved] == [r["left_eye_x"] for r in rows]


def test_generate_dataset_rejects_bad_counts(tmp_path):
    with pytest.raises(ValueError, match="n_test"):
        generate_dataset(tmp_path, n=3, n_test=4, grid=SMALL, spacing_mm=SMALL_SPACING, progress=False)
    with pytest.raises(ValueError, match="n must"):
        generate_dataset(tmp_path, n=0, grid=SMALL, spacing_mm=SMALL_SPACING, progress=False)


def tiny_profile():
    return dataclasses.replace(get_profile("smoke"), phantom_n=4, phantom_n_test=1, phantom_grid=SMALL,
                               phantom_spacing_mm=SMALL_SPACING, data_dir="volumes")


def test_ensure_dataset_generates_reuses_and_checks(tmp_path):
    profile = tiny_profile()
    manifest = tmp_path / "data_manifest.csv"
    assert ensure_dataset(manifest, profile, progress=False) == manifest
    _, rows = read_manifest_rows(manifest)
    assert len(rows) == 4 and sum(r["split"] == "test" for r in rows) == 1
    assert rows[0]["image"] == "volumes/phantom_000.nii.gz"
    text = manifest.read_text()

    # Complete: returned as is, nothing rewritten.
    stamp = (tmp_path / "volumes" / "phantom_001.nii.gz").stat().st_mtime_ns
    ensure_dataset(manifest, profile, progress=False)
    assert (tmp_path / "volumes" / "phantom_001.nii.gz").stat().st_mtime_ns == stamp

    # A committed manifest without its images: regenerated, checked, kept.
    for image in (tmp_path / "volumes").glob("*.nii.gz"):
        image.unlink()
    ensure_dataset(manifest, profile, progress=False)
    assert manifest.read_text() == text
    assert len(list((tmp_path / "volumes").glob("*.nii.gz"))) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # A manifest that the generator does not reproduce: a clear error, the manifest untouched.
    tampered = text.replace(rows[2]["nose_tip_y"], f"{float(rows[2]['nose_tip_y']) + 1.0:.4f}", 1)
    manifest.write_text(tampered)
    (tmp_path / "volumes" / "phantom_000.nii.gz").unlink()
    with pytest.raises(ValueError, match="phantom_002.*nose_tip_y"):
        ensure_dataset(manifest, profile, progress=False)
    assert manifest.read_text() == tampered


def test_command_line(tmp_path, capsys):
    main(["--out", str(tmp_path / "out"), "--n", "2", "--n-test", "1", "--grid", str(SMALL),
          "--spacing", str(SMALL_SPACING), "--quiet"])
    manifest = tmp_path / "out" / "data_manifest.csv"
    assert str(manifest) in capsys.readouterr().out
    _, rows = read_manifest_rows(manifest)
    assert [r["split"] for r in rows].count("test") == 1
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad"), "--n", "2", "--n-test", "3", "--quiet"])


def test_ensure_dataset_with_the_manifest_inside_the_data_folder(tmp_path):
    profile = tiny_profile()  # data_dir "volumes"
    manifest = tmp_path / "volumes" / "data_manifest.csv"
    ensure_dataset(manifest, profile, progress=False)
    _, rows = read_manifest_rows(manifest)
    assert rows[0]["image"] == "phantom_000.nii.gz"
    assert (tmp_path / "volumes" / "phantom_000.nii.gz").exists()
    assert not (tmp_path / "volumes" / "volumes").exists()
