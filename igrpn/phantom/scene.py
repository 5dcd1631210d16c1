"""One phantom volume: argument checks, the pose, the distractors' placement and the scene.

``_build_scene`` draws everything before image formation from the volume's seed, one
``numpy.random.Generator(PCG64)`` stream per stage (anatomy, pose, uterus, hand, foot, cord,
imaging, speckle), so the same seed gives the same bytes and switching a distractor off changes
nothing else; ``make_phantom_with_info`` then forms the image.
"""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np

from igrpn.config import GT_BOX_MM
from igrpn.phantom.anatomy import build_cord, build_foot, build_hand, build_subject, build_uterus, Subject
from igrpn.phantom.imaging import draw_imaging, form_image, Grid, in_fan, paint
from igrpn.phantom.records import PhantomInfo, PhantomOptions
from igrpn.phantom.shapes import MATERIAL_ID, PROPERTIES, rot_x, rot_y, rot_z, union_distance

__all__ = ["BOX_MARGIN_MM", "FAN_MARGIN_MM", "MAX_GRID", "make_phantom", "make_phantom_with_info"]

#: Margin (mm) kept between each landmark's ground-truth box and the volume's faces.
BOX_MARGIN_MM = 2.0
#: Margin (mm) kept between each landmark and the edge of the fan.
FAN_MARGIN_MM = 3.0
#: Largest grid (voxels per edge): generating one volume holds about 20 float32 copies of it
#: (property maps, scatterers, convolutions), some 1.3 GiB at 256³; 100000 would need petabytes.
MAX_GRID = 256
#: Pose draws before giving up (a grid too small for the face).
MAX_POSE_DRAWS = 200
#: Placement draws for one distractor before leaving it out.
MAX_PLACEMENT_DRAWS = 30


# ---------------------------------------------------------------------------------- placement

def _place(rng, builder, subject: Subject, clearance: float, *extra):
    """Draw a distractor at a random anchor until no landmark lies within ``clearance`` mm of it."""
    for _ in range(MAX_PLACEMENT_DRAWS):
        name, point, outward = subject.anchors[int(rng.integers(len(subject.anchors)))]
        point = point + rng.uniform(-5.0, 5.0, 3)
        shapes, tag, solid = builder(rng, subject.scale, point, outward, *extra)
        if np.all(union_distance(solid, subject.landmarks) > clearance):
            if name == "eye" and tag != "cord":
                tag += ";eye-covered"
            return shapes, tag
    return [], ""


# ---------------------------------------------------------------------------------- one volume

def check_arguments(seed, grid, spacing_mm, options) -> PhantomOptions:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"phantom seed must be a non-negative integer, got {seed!r}")
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or not 16 <= grid <= MAX_GRID:
        raise ValueError(f"phantom grid must be an integer from 16 to {MAX_GRID} voxels (igrpn.phantom.MAX_GRID), "
                         f"got {grid!r}")
    if not (isinstance(spacing_mm, (int, float, np.floating)) and math.isfinite(spacing_mm) and spacing_mm > 0):
        raise ValueError(f"phantom spacing_mm must be a positive number, got {spacing_mm!r}")
    known = {f.name for f in fields(PhantomOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown phantom options {unknown}; expected some of {sorted(known)}")
    return PhantomOptions(**options).validate()


def _fits(landmarks: np.ndarray, grid: Grid, imaging: dict) -> bool:
    """Every landmark at least half its GT box + 2 mm inside the volume, and inside the fan."""
    margin_mm = np.asarray(GT_BOX_MM) / 2.0 + BOX_MARGIN_MM
    low = grid.coords[0] + margin_mm[:, None]
    high = grid.coords[-1] - margin_mm[:, None]
    inside = np.all((landmarks >= low) & (landmarks <= high))
    return bool(inside and np.all(in_fan(landmarks, imaging, FAN_MARGIN_MM)))


def _draw_pose(rng: np.random.Generator, landmarks_face: np.ndarray, grid: Grid, imaging: dict,
               options: PhantomOptions, seed: int):
    """Face turned broadly towards the probe (+z), any spin about the beam, tilts and a shift.

    Redrawn until every landmark fits (``_fits``). Returns (rotation (3, 3), translation (3,),
    angles (spin, tilt_x, tilt_y) degrees); face frame -> world is ``p -> rotation p + translation``.
    """
    centroid = landmarks_face.mean(axis=0)
    face_up = np.array([[1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]])  # anterior -> +z, superior -> -y
    for _ in range(MAX_POSE_DRAWS):
        spin = float(rng.uniform(0.0, 360.0))
        tilt_x, tilt_y = (float(v) for v in rng.uniform(-options.max_tilt_deg, options.max_tilt_deg, 2))
        rotation = rot_z(spin) @ rot_y(tilt_y) @ rot_x(tilt_x) @ face_up
        translation = rng.uniform(-options.max_shift_mm, options.max_shift_mm, 3) - rotation @ centroid
        if _fits(landmarks_face @ rotation.T + translation, grid, imaging):
            return rotation, translation, (spin, tilt_x, tilt_y)
    raise ValueError(f"phantom seed {seed}: no pose keeps the landmarks inside a {grid.size} x {grid.spacing} mm "
                     f"volume and its fan after {MAX_POSE_DRAWS} draws; use a larger field of view")


def _build_scene(seed: int, grid: Grid, options: PhantomOptions) -> dict:
    """Everything before image formation: painted maps (5, X, Y, Z), labels, landmarks, settings."""
    streams = [np.random.Generator(np.random.PCG64(child)) for child in np.random.SeedSequence(int(seed)).spawn(8)]
    rng_anatomy, rng_pose, rng_uterus, rng_hand, rng_foot, rng_cord, rng_imaging, rng_speckle = streams

    subject = build_subject(rng_anatomy, options)
    imaging = draw_imaging(rng_imaging, grid)
    rotation, translation, angles = _draw_pose(rng_pose, subject.landmarks, grid, imaging, options, seed)

    # Distractors, each from its own stream so that switching one off changes nothing else.
    extras, tags = [], []
    for rng, probability, builder, args in (
        (rng_hand, options.hand_prob, build_hand, ()),
        (rng_foot, options.foot_prob, build_foot, ()),
        (rng_cord, options.cord_prob, build_cord, (subject.hull,)),
    ):
        if rng.random() < probability:
            shapes, tag = _place(rng, builder, subject, 2.0, *args)
            extras += shapes
            tags += tag.split(";") if tag else []

    fetus = [shape.moved(rotation, translation) for shape in subject.shapes + extras]
    head_world = [shape for shape in fetus[:len(subject.shapes)] if shape.skin][2:]  # skin minus trunk, neck
    uterus, uterus_tags = build_uterus(rng_uterus, head_world, options)

    maps = np.empty((5,) + (grid.size,) * 3, dtype=np.float32)
    maps[:] = PROPERTIES[MATERIAL_ID["fluid"]][:, None, None, None]
    labels = np.zeros((grid.size,) * 3, dtype=np.uint8)
    for shape in uterus + fetus:
        paint(maps, labels, shape, grid)
    face_to_world = np.eye(4)
    face_to_world[:3, :3], face_to_world[:3, 3] = rotation, translation
    return {"maps": maps, "labels": labels, "subject": subject, "imaging": imaging, "rng_speckle": rng_speckle,
            "landmarks": subject.landmarks @ rotation.T + translation, "face_to_world": face_to_world,
            "angles": angles, "tags": list(dict.fromkeys(uterus_tags + tags))}


def make_phantom_with_info(seed: int, grid: int = 128, spacing_mm: float = 1.3, **options):
    """One synthetic fetal-face ultrasound volume, with what made it.

    Args:
        seed: non-negative integer; the same seed (and arguments) gives the same bytes.
        grid: voxels per edge of the cubic volume.
        spacing_mm: isotropic voxel edge (mm); 128 x 1.3 mm = 166 mm of field.
        **options: fields of ``PhantomOptions`` (distractor probabilities, pose range, ...).

    Returns:
        volume (grid, grid, grid) uint8; affine (4, 4) float64 voxel -> world mm (RAS+, volume
        centred on the origin); landmarks_mm (5, 3) float64 world mm in ``LANDMARKS`` order;
        ``PhantomInfo``.
    """
    opts = check_arguments(seed, grid, spacing_mm, options)
    grid_ = Grid(int(grid), float(spacing_mm))
    scene = _build_scene(int(seed), grid_, opts)
    volume = form_image(scene["maps"], grid_, scene["imaging"], scene["rng_speckle"], opts)
    subject = scene["subject"]
    imaging = {k: (tuple(float(x) for x in v) if isinstance(v, np.ndarray) else v)
               for k, v in scene["imaging"].items()}
    info = PhantomInfo(
        seed=int(seed), grid=grid_.size, spacing_mm=grid_.spacing, scale=subject.scale,
        pose_deg=scene["angles"], face_to_world=scene["face_to_world"], landmarks_face_mm=subject.landmarks,
        skull_centre_mm=subject.skull_centre, skull_semi_axes_mm=subject.skull_semi,
        distractors=tuple(scene["tags"]), imaging=imaging, labels=scene["labels"],
    )
    return volume, grid_.affine, scene["landmarks"], info


def make_phantom(seed: int, grid: int = 128, spacing_mm: float = 1.3, **options):
    """One synthetic fetal-face ultrasound volume (see ``igrpn.phantom``).

    Returns:
        volume (grid, grid, grid) uint8; affine (4, 4) float64 voxel -> world mm (RAS+);
        landmarks_mm (5, 3) float64 world mm, rows in ``config.LANDMARKS`` order.
    """
    volume, affine, landmarks, _ = make_phantom_with_info(seed, grid, spacing_mm, **options)
    return volume, affine, landmarks
