"""Synthetic fetal-face 3D ultrasound phantom: the default data set (DESIGN §4, §9).

The paper's 152 volumes are private, so the package generates volumes that are hard in the ways
real 3D ultrasound of the fetal face is hard. One volume is made in four steps (sizes in mm):

1. **Anatomy** in a canonical face frame — x = fetal right, y = anterior, z = superior, origin
   midway between the eye centres (right-handed, so the face is never mirrored). Skull shell,
   brain, hypoechoic eyes with lens rings and bony orbit rims, brow, nose with nasal bone, lips,
   chin with mandible, cheeks, ears, neck and trunk. A gestational scale factor (±20 %) sizes the
   subject and every landmark's feature is jittered on its own, so distance ratios vary. The five
   landmarks are measured on that anatomy: the eyeball centres, and the skin points of the brow
   (between the eyes), the nose tip and the chin.
2. **Scene**: a random pose (any spin about the beam, tilts up to ±40°, shifts) with every landmark
   at least half its ground-truth box plus 2 mm inside the volume and the fan; amniotic fluid,
   uterine wall and placenta (often close to the face), the umbilical cord (whose cross-sections
   look like eyes), and a hand or foot near or touching the face in 55-60 % of volumes.
3. **Painting**: every shape is drawn with sub-voxel coverage into property maps (echo level,
   acoustic impedance, attenuation, bone density, texture strength).
4. **Image formation** along the beam (array axis k; the probe's apex sits above the volume, at
   high z, and the beam runs towards -z): attenuation with partial time-gain compensation,
   acoustic shadowing behind bone, specular echoes at interfaces facing the beam, complex Gaussian
   scatterers convolved with an anisotropic, depth-dependent point-spread function (axis-aligned,
   so done as three 1-D convolutions), envelope, log compression to a 40-60 dB dynamic range, and a
   fan-shaped field of view (zero outside).

The world frame is the volume's own: ``affine`` is a diagonal spacing with the volume centred on
the origin (RAS+), so world mm and voxel indices differ by a scale and a shift.

Every random draw comes from ``numpy.random.Generator(PCG64)`` streams spawned from the volume's
seed (one stream per stage), so the same seed gives the same bytes, and switching a distractor off
changes nothing else.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from igrpn.config import GT_BOX_MM, LANDMARKS, NUM_LANDMARKS
from igrpn.io import atomic_write_files

__all__ = [
    "MATERIAL_NAMES", "MANIFEST_COLUMNS", "PhantomOptions", "PhantomInfo", "make_phantom",
    "make_phantom_with_info", "case_seeds", "split_labels", "generate_dataset", "ensure_dataset",
    "command_manifest", "check_manifest_path", "main",
]

#: Margin (mm) kept between each landmark's ground-truth box and the volume's faces.
BOX_MARGIN_MM = 2.0
#: Margin (mm) kept between each landmark and the edge of the fan.
FAN_MARGIN_MM = 3.0
#: Largest grid (voxels per edge): generating one volume holds about 20 float32 copies of it
#: (property maps, scatterers, convolutions), some 1.3 GiB at 256³; 100000 would need petabytes.
MAX_GRID = 256
#: Most volumes one data set may have (the seeds and the manifest are built in memory).
MAX_VOLUMES = 100_000
#: Pose draws before giving up (a grid too small for the face).
MAX_POSE_DRAWS = 200
#: Placement draws for one distractor before leaving it out.
MAX_PLACEMENT_DRAWS = 30
#: Manifest columns, in order.
MANIFEST_COLUMNS: tuple[str, ...] = (
    ("case_id", "image", "split")
    + tuple(f"{name}_{axis}" for name in LANDMARKS for axis in "xyz")
    + ("source", "seed", "notes")
)


# ------------------------------------------------------------------------------------ materials

@dataclass(frozen=True)
class _Material:
    """Acoustic properties of one tissue class.

    echo_db: mean echo amplitude relative to the display's white level (dB).
    impedance: acoustic impedance (MRayl); its jumps along the beam make specular echoes.
    attenuation: attenuation relative to soft tissue (the rate itself is drawn per volume).
    bone: shadowing strength (1 = cortical bone).
    texture: standard deviation of the log-amplitude heterogeneity (placenta, fat, ...).
    """

    name: str
    echo_db: float
    impedance: float
    attenuation: float
    bone: float
    texture: float


_MATERIALS: tuple[_Material, ...] = (
    _Material("fluid", -80.0, 1.52, 0.0, 0.0, 0.0),
    _Material("soft_tissue", -27.0, 1.63, 1.0, 0.0, 0.25),
    _Material("brain", -29.0, 1.60, 0.9, 0.0, 0.3),
    _Material("csf", -80.0, 1.52, 0.05, 0.0, 0.0),
    _Material("choroid", -15.0, 1.66, 1.0, 0.0, 0.2),
    _Material("falx", -23.0, 1.64, 1.0, 0.0, 0.0),
    _Material("bone", -12.0, 2.6, 1.0, 1.0, 0.1),
    _Material("thin_bone", -18.0, 2.0, 1.0, 0.4, 0.1),
    _Material("vitreous", -75.0, 1.53, 0.1, 0.0, 0.0),
    _Material("lens", -20.0, 1.62, 1.0, 0.0, 0.0),
    _Material("myometrium", -22.0, 1.64, 1.1, 0.0, 0.35),
    _Material("fat", -31.0, 1.45, 0.8, 0.0, 0.35),
    _Material("fascia", -19.0, 1.66, 1.0, 0.0, 0.3),
    _Material("placenta", -19.0, 1.64, 1.0, 0.0, 0.55),
    _Material("chorionic_plate", -13.0, 1.68, 1.0, 0.0, 0.2),
    _Material("cord_jelly", -30.0, 1.60, 0.7, 0.0, 0.1),
    _Material("vessel_wall", -11.0, 1.70, 1.0, 0.0, 0.1),
    _Material("blood", -72.0, 1.61, 0.2, 0.0, 0.0),
)
#: Material of each value of ``PhantomInfo.labels``.
MATERIAL_NAMES: tuple[str, ...] = tuple(m.name for m in _MATERIALS)
_M = {name: index for index, name in enumerate(MATERIAL_NAMES)}
# Property vector of each material, painted into the maps: echo amplitude (linear), impedance,
# relative attenuation, bone density, texture strength. (materials, 5) float32.
_PROPERTIES = np.array(
    [[10.0 ** (m.echo_db / 20.0), m.impedance, m.attenuation, m.bone, m.texture] for m in _MATERIALS],
    dtype=np.float32,
)
_AMP, _IMPEDANCE, _ATTEN, _BONE, _TEXTURE = range(5)


# ------------------------------------------------------------------------------ public records

@dataclass(frozen=True)
class PhantomOptions:
    """What a phantom volume may contain, and how hard it is (defaults: the data set's).

    hand_prob, foot_prob, cord_prob, placenta_prob: per-volume probabilities of a hand (with
        forearm) or foot (with lower leg) near or touching the face, of the umbilical cord passing
        near it, and of a placenta (anterior, posterior or lateral).
    max_tilt_deg: tilts about the two axes across the beam are uniform in [-max, max].
    max_shift_mm: shift of the landmarks' centroid from the volume centre, uniform per axis.
    scale_range: gestational scale factor of the subject (1 = about 26 weeks).
    jitter_mm: standard deviation of each landmark feature's own displacement (clipped at 2.5 sd).
    speckle: False gives the noiseless echo map (same anatomy, pose and seed-derived settings).
    shadows: False switches off shadowing behind bone.
    fan: False keeps the voxels outside the fan-shaped field of view.
    """

    hand_prob: float = 0.5
    foot_prob: float = 0.15
    cord_prob: float = 0.6
    placenta_prob: float = 0.65
    max_tilt_deg: float = 40.0
    max_shift_mm: float = 18.0
    scale_range: tuple[float, float] = (0.8, 1.2)
    jitter_mm: float = 1.5
    speckle: bool = True
    shadows: bool = True
    fan: bool = True

    def validate(self) -> "PhantomOptions":
        """Return self; ``ValueError`` naming the first bad option."""
        for name in ("hand_prob", "foot_prob", "cord_prob", "placenta_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"phantom option {name}={value!r}: expected a probability in [0, 1]")
        if not 0.0 <= self.max_tilt_deg <= 90.0:
            raise ValueError(f"phantom option max_tilt_deg={self.max_tilt_deg!r}: expected 0-90 degrees")
        if self.max_shift_mm < 0 or self.jitter_mm < 0:
            raise ValueError("phantom options max_shift_mm and jitter_mm must be >= 0")
        low, high = self.scale_range
        if not 0.5 <= low <= high <= 1.5:
            raise ValueError(f"phantom option scale_range={self.scale_range!r}: expected 0.5 <= low <= high <= 1.5")
        return self


@dataclass(frozen=True, eq=False)
class PhantomInfo:
    """What made one phantom volume (returned by ``make_phantom_with_info``).

    Attributes:
        seed, grid, spacing_mm: the arguments.
        scale: gestational scale factor of the subject (1 = about 26 weeks).
        pose_deg: (spin about the beam, tilt about x, tilt about y), degrees.
        face_to_world: (4, 4) float64, face frame (x fetal right, y anterior, z superior, origin
            midway between the eyes, mm) -> world mm.
        landmarks_face_mm: (5, 3) float64, the landmarks in the face frame.
        skull_centre_mm, skull_semi_axes_mm: the cranial ellipsoid (outer skull surface) in the
            face frame.
        distractors: tags of what surrounds the face, in ``placenta-anterior``,
            ``placenta-posterior``, ``placenta-lateral``, ``wall-close`` (uterine wall within 6 mm
            of the head), ``hand-fist``, ``hand-open``, ``foot``, ``touching-face`` (a limb within
            1 mm of, or pressed into, the face), ``eye-covered`` (a limb in front of an eye),
            ``cord``.
        imaging: the image-formation parameters (dynamic range, PSF widths, fan, apex, ...).
        labels: (grid, grid, grid) uint8, the material covering most of each voxel
            (``MATERIAL_NAMES``), before image formation.
    """

    seed: int
    grid: int
    spacing_mm: float
    scale: float
    pose_deg: tuple[float, float, float]
    face_to_world: np.ndarray
    landmarks_face_mm: np.ndarray
    skull_centre_mm: np.ndarray
    skull_semi_axes_mm: np.ndarray
    distractors: tuple[str, ...]
    imaging: dict
    labels: np.ndarray = field(repr=False)

    @property
    def notes(self) -> str:
        """Short ``;``-separated tags for the manifest's ``notes`` column."""
        return ";".join(self.distractors)


# ------------------------------------------------------------------------------ shape geometry

@dataclass(frozen=True)
class _Shape:
    """One solid painted with a material, described in its own local frame.

    kind: ``"ellipsoid"`` (semi-axes ``size``), ``"capsule"`` (segment along local x from
        ``-size[0]`` to ``+size[0]``, radius ``size[1]`` -> ``size[2]``) or ``"halfspace"``
        (inside where local z <= the undulation ``waves``).
    centre: (3,) mm in the parent frame; axes: (3, 3) rows = local unit axes in the parent frame.
    shell: > 0 keeps only a layer of that thickness (mm) centred on the surface.
    clips: ``(nx, ny, nz, offset)`` local half-spaces ``n . q <= offset`` the shape is cut to.
    waves: ``(amplitude, kx, ky, phase)`` sinusoids of a half-space's surface (mm, rad/mm).
    skin: part of the fetal skin surface on which the brow, nose and chin landmarks are measured.
    """

    kind: str
    material: int
    centre: np.ndarray
    axes: np.ndarray
    size: tuple[float, ...] = ()
    shell: float = 0.0
    clips: tuple[tuple[float, float, float, float], ...] = ()
    waves: tuple[tuple[float, float, float, float], ...] = ()
    skin: bool = False

    def moved(self, rotation: np.ndarray, translation: np.ndarray) -> "_Shape":
        """The shape after ``p -> rotation @ p + translation`` (rotation (3, 3), translation (3,))."""
        return replace(self, centre=rotation @ self.centre + translation, axes=self.axes @ rotation.T)

    def to_local(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Local coordinates (3 arrays (N,)) of points (N, 3) given in the parent frame (mm)."""
        q = (points - self.centre) @ self.axes.T
        return q[:, 0], q[:, 1], q[:, 2]

    def _surface_distance(self, qx, qy, qz) -> np.ndarray:
        """Approximate signed distance (mm) to the base surface, before shell and clips."""
        if self.kind == "ellipsoid":
            a, b, c = self.size
            k0 = np.sqrt((qx / a) ** 2 + (qy / b) ** 2 + (qz / c) ** 2)
            k1 = np.sqrt((qx / a**2) ** 2 + (qy / b**2) ** 2 + (qz / c**2) ** 2)
            # k0 (k0 - 1) / k1 is a good distance estimate near the surface; at the centre it is 0/0.
            ratio = np.divide(k0, k1, out=np.full(np.broadcast(k0, k1).shape, min(self.size)), where=k1 > 0)
            return (k0 - 1.0) * ratio
        if self.kind == "capsule":
            half, r0, r1 = self.size
            t = np.clip(qx, -half, half)
            radius = r0 + (r1 - r0) * (t + half) / (2.0 * half)
            return np.sqrt((qx - t) ** 2 + qy**2 + qz**2) - radius
        if self.kind == "halfspace":
            surface = 0.0
            for amplitude, kx, ky, phase in self.waves:
                surface = surface + amplitude * np.sin(kx * qx + ky * qy + phase)
            return qz - surface
        raise ValueError(f"unknown shape kind {self.kind!r}")

    def signed_distance(self, qx, qy, qz) -> np.ndarray:
        """Approximate signed distance (mm, negative inside) at local coordinates (broadcastable)."""
        sd = self._surface_distance(qx, qy, qz)
        if self.shell > 0:
            sd = np.abs(sd) - 0.5 * self.shell
        for nx, ny, nz, offset in self.clips:
            sd = np.maximum(sd, nx * qx + ny * qy + nz * qz - offset)
        return sd

    def coverage(self, qx, qy, qz, voxel: float) -> np.ndarray:
        """Fraction (0-1) of a voxel of edge ``voxel`` mm covered by the shape, at local coordinates.

        Box-filter estimate across the surface: a thin shell covers at most thickness / voxel, so
        structures thinner than a voxel stay thin and faint instead of filling whole voxels.
        """
        sd = self._surface_distance(qx, qy, qz)
        if self.shell > 0:  # overlap of [sd - voxel/2, sd + voxel/2] with [-shell/2, shell/2]
            overlap = np.minimum(sd + 0.5 * voxel, 0.5 * self.shell) - np.maximum(sd - 0.5 * voxel, -0.5 * self.shell)
            cover = np.clip(overlap / voxel, 0.0, 1.0)
        else:
            cover = np.clip(0.5 - sd / voxel, 0.0, 1.0)
        for nx, ny, nz, offset in self.clips:
            cover = cover * np.clip(0.5 - (nx * qx + ny * qy + nz * qz - offset) / voxel, 0.0, 1.0)
        return cover

    def half_extent(self) -> np.ndarray | None:
        """(3,) half size of the parent-frame bounding box around ``centre`` (mm); None if unbounded."""
        pad = 0.5 * self.shell
        if self.kind == "ellipsoid":
            # Support of an ellipsoid along parent axis j: || diag(size) @ axes[:, j] ||.
            return np.sqrt(((np.asarray(self.size)[:, None] * self.axes) ** 2).sum(axis=0)) + pad
        if self.kind == "capsule":
            half, r0, r1 = self.size
            return half * np.abs(self.axes[0]) + max(r0, r1) + pad
        return None

    def support(self, direction: np.ndarray) -> float:
        """max over the shape of ``p . direction`` (mm); clips ignored (an upper bound)."""
        local = self.axes @ direction
        if self.kind == "ellipsoid":
            return float(self.centre @ direction + np.linalg.norm(np.asarray(self.size) * local) + 0.5 * self.shell)
        if self.kind == "capsule":
            half, r0, r1 = self.size
            return float(self.centre @ direction + half * abs(local[0]) + max(r0, r1) + 0.5 * self.shell)
        return math.inf


def _frame_from_x(u: np.ndarray) -> np.ndarray:
    """(3, 3) right-handed orthonormal rows (u, v, w), u along ``u`` (any non-zero (3,))."""
    u = np.asarray(u, dtype=np.float64)
    u = u / np.linalg.norm(u)
    helper = np.eye(3)[int(np.argmin(np.abs(u)))]  # the world axis least aligned with u
    v = helper - (helper @ u) * u
    v = v / np.linalg.norm(v)
    return np.stack([u, v, np.cross(u, v)])


def _ellipsoid(centre, semi, material, axes=None, **kwargs) -> _Shape:
    """Ellipsoid with semi-axes ``semi`` (mm) along the rows of ``axes`` (identity by default)."""
    axes = np.eye(3) if axes is None else np.asarray(axes, dtype=np.float64)
    return _Shape("ellipsoid", material, np.asarray(centre, dtype=np.float64), axes,
                  tuple(float(s) for s in semi), **kwargs)


def _sphere(centre, radius, material, **kwargs) -> _Shape:
    return _ellipsoid(centre, (radius, radius, radius), material, **kwargs)


def _capsule(start, end, r_start, r_end, material, **kwargs) -> _Shape:
    """Rounded segment from ``start`` to ``end`` (mm) whose radius goes from r_start to r_end."""
    start, end = np.asarray(start, dtype=np.float64), np.asarray(end, dtype=np.float64)
    length = float(np.linalg.norm(end - start))
    axes = _frame_from_x(end - start) if length > 1e-9 else np.eye(3)
    return _Shape("capsule", material, 0.5 * (start + end), axes,
                  (max(0.5 * length, 1e-6), float(r_start), float(r_end)), **kwargs)


def _halfspace(point, outward, material, waves=(), shell=0.0) -> _Shape:
    """Everything behind the plane through ``point`` with unit normal ``outward`` (its fluid side)."""
    axes = _frame_from_x(outward)[[1, 2, 0]]  # local z = outward
    return _Shape("halfspace", material, np.asarray(point, dtype=np.float64), axes, (), shell=shell,
                  waves=tuple(waves))


def _union_distance(shapes, points: np.ndarray) -> np.ndarray:
    """Signed distance (mm) of points (N, 3) to the union of ``shapes`` (same frame)."""
    best = np.full(len(points), np.inf)
    for shape in shapes:
        best = np.minimum(best, shape.signed_distance(*shape.to_local(points)))
    return best


def _first_hit(shapes, start, direction, length: float, step: float = 0.05) -> np.ndarray:
    """First point (3,) where the ray ``start + t direction`` enters the union of ``shapes``."""
    direction = np.asarray(direction, dtype=np.float64) / np.linalg.norm(direction)
    t = np.arange(0.0, length, step)
    inside = _union_distance(shapes, start + t[:, None] * direction) <= 0
    if not inside.any():
        raise ValueError("phantom anatomy: a landmark ray missed the skin (inconsistent geometry)")
    return start + t[int(np.argmax(inside))] * direction


# --------------------------------------------------------------------------------- the anatomy

def _rot_x(deg):
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])


def _rot_y(deg):
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])


def _rot_z(deg):
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


@dataclass
class _Subject:
    """One fetus in its face frame (mm): shapes in painting order, landmarks, anchor points."""

    scale: float
    shapes: list
    landmarks: np.ndarray  # (5, 3)
    skull_centre: np.ndarray
    skull_semi: np.ndarray
    anchors: list  # (name, point (3,), outward unit normal (3,)) where distractors touch the face
    hull: list  # ellipsoids enclosing the head and trunk (for keeping the cord outside)


def _build_subject(rng: np.random.Generator, options: PhantomOptions) -> _Subject:
    """Draw one fetus: sizes, shape variation, every feature and the five landmarks (face frame)."""
    soft, bone, thin = _M["soft_tissue"], _M["bone"], _M["thin_bone"]
    s = float(rng.uniform(*options.scale_range))
    jit = options.jitter_mm

    def jitter():
        return np.clip(rng.normal(0.0, jit, 3), -2.5 * jit, 2.5 * jit) if jit > 0 else np.zeros(3)

    # Head (outer skull surface): BPD 50-80 mm, OFD 65-105 mm.
    bpd = float(np.clip(66.0 * s * rng.uniform(0.93, 1.07), 50.0, 80.0))
    ofd = float(np.clip(84.0 * s * rng.uniform(0.93, 1.07), 65.0, 105.0))
    height = 72.0 * s * rng.uniform(0.95, 1.05)
    skull_semi = np.array([bpd / 2, ofd / 2, height / 2])
    skull_centre = np.array([0.0, 6.0 * s - skull_semi[1], 14.0 * s])
    skull_thick = 1.4 + 0.8 * s

    # Eyes: ocular diameter 8-14 mm, centres 20-33 mm apart, each jittered on its own.
    eye_radius = float(np.clip(5.3 * s * rng.uniform(0.9, 1.1), 4.0, 7.0))
    separation = 26.5 * s * rng.uniform(0.94, 1.06)
    left_eye = np.array([-separation / 2, 0.0, 0.0]) + jitter()
    right_eye = np.array([separation / 2, 0.0, 0.0]) + jitter()
    gap = right_eye - left_eye
    distance = float(np.linalg.norm(gap))
    if not 20.0 <= distance <= 33.0:  # keep the separation in the biometric range
        mid, target = 0.5 * (left_eye + right_eye), float(np.clip(distance, 20.0, 33.0))
        left_eye, right_eye = mid - 0.5 * target * gap / distance, mid + 0.5 * target * gap / distance
    eye_plane_y = 0.5 * (left_eye[1] + right_eye[1])
    half_sep = 0.5 * abs(right_eye[0] - left_eye[0])

    # Brow / glabella: a few mm above the eye line, on the skin between the eyes.
    j = jitter()
    brow = np.array([j[0], eye_plane_y + eye_radius + 4.2 * s * rng.uniform(0.85, 1.15) + 0.5 * j[1],
                     float(np.clip(5.0 * s * rng.uniform(0.7, 1.3) + j[2], 2.5, 9.0))])
    # Nose tip: 15-25 mm below the glabella, 8-15 mm in front of the eye plane.
    j = jitter()
    nose = np.array([j[0], eye_plane_y + float(np.clip(12.0 * s * rng.uniform(0.85, 1.15) + j[1], 8.0, 15.0)),
                     brow[2] - float(np.clip(20.0 * s * rng.uniform(0.88, 1.12) + j[2], 15.0, 25.0))])
    # Chin (soft-tissue gnathion): 30-45 mm below the glabella, set back from the nose tip.
    j = jitter()
    chin_dir = np.array([0.0, 0.55, -0.835]) / np.linalg.norm([0.0, 0.55, -0.835])
    chin = np.array([j[0], nose[1] - max(6.0 * s * rng.uniform(0.6, 1.5) + j[1], 2.5),
                     brow[2] - float(np.clip(37.0 * s * rng.uniform(0.9, 1.1) + j[2], 30.0, 45.0))])

    body, skin, brain_parts, bones, eyes = [], [], [], [], []
    # Trunk and neck, behind and below the chin.
    body.append(_ellipsoid([0, -24 * s, -88 * s], [30 * s, 26 * s, 38 * s], soft, skin=True))
    body.append(_capsule([0, -16 * s, -24 * s], [0, -26 * s, -70 * s], 15 * s, 15 * s, soft, skin=True))
    # Scalp over the skull, then the soft tissue of the face.
    skin.append(_ellipsoid(skull_centre, skull_semi + 2.0 * s, soft, skin=True))
    skin.append(_ellipsoid([0, -9 * s, -11 * s], [half_sep + 14 * s, 18.5 * s, 26 * s], soft, skin=True))
    for side in (-1, 1):
        skin.append(_ellipsoid([side * (half_sep + 2 * s), eye_plane_y - 1.5 * s, -11 * s],
                               [10 * s, 8 * s, 10 * s], soft, skin=True))  # cheek
        # Ear on the side of the head, where the skull surface is at (y, z) = (-22 s, -6 s).
        y, z = skull_centre[1] + 0.33 * skull_semi[1], -6.0 * s
        r2 = 1.0 - ((y - skull_centre[1]) / skull_semi[1]) ** 2 - ((z - skull_centre[2]) / skull_semi[2]) ** 2
        x = skull_semi[0] * math.sqrt(max(r2, 0.05)) + 2.5 * s
        skin.append(_ellipsoid([side * x, y, z], [3 * s, 7 * s, 10 * s], soft, skin=True))
    skin.append(_ellipsoid([brow[0], brow[1] - 7 * s, brow[2] - 0.5 * s], [half_sep + 8 * s, 7 * s, 5.5 * s],
                           soft, skin=True))  # brow ridge: its front is the glabella
    for centre in (left_eye, right_eye):  # closed eyelids, ~1.8 mm in front of the eyeball
        lid_semi = [eye_radius + 2 * s, eye_radius + 0.6 * s, eye_radius + 1.5 * s]
        skin.append(_ellipsoid(centre + [0, 1.2 * s, 0.3 * s], lid_semi, soft, skin=True))
    skin.append(_ellipsoid(nose - [0, 5 * s, 0], [6 * s, 5 * s, 6.5 * s], soft, skin=True))  # front = nose tip
    nasion = np.array([0.5 * (brow[0] + nose[0]), brow[1] - 1.8 * s, brow[2] - 3 * s])
    bridge_end = nose + [0, -3.5 * s, 4.5 * s]
    skin.append(_capsule(nasion, bridge_end, 3 * s, 3 * s, soft, skin=True))  # nasal bridge
    upper_lip, lower_lip = nose + [-0.4 * nose[0], -7 * s, -7.5 * s], nose + [-0.6 * nose[0], -8.5 * s, -13.5 * s]
    skin.append(_ellipsoid(upper_lip, [8.5 * s, 4.5 * s, 3.5 * s], soft, skin=True))
    skin.append(_ellipsoid(lower_lip, [7.5 * s, 4.2 * s, 3.5 * s], soft, skin=True))
    chin_centre = chin - 6.2 * s * chin_dir
    skin.append(_ellipsoid(chin_centre, [9 * s, 6 * s, 6.5 * s], soft, skin=True))
    # The mouth: a thin disc of fluid between the lips.
    mouth = _ellipsoid(nose + [-0.5 * nose[0], -7 * s, -10.8 * s], [6.5 * s, 5.5 * s, 0.6 * s], _M["fluid"])

    # Brain inside the vault, cut off in front of the plane behind the orbits.
    plane_n = np.array([0.0, 0.766, -0.643])
    plane_offset = float(plane_n @ (np.array([0.0, 0.0, 3.5 * s]) - skull_centre))
    inner = skull_semi - skull_thick
    brain_parts.append(_ellipsoid(skull_centre, inner, _M["brain"], clips=((*plane_n, plane_offset - 4 * s),)))
    for side in (-1, 1):
        # Lateral ventricle (fluid) with its bright choroid plexus.
        brain_parts.append(_ellipsoid(skull_centre + [side * 7 * s, 4 * s, 4 * s], [3.5 * s, 14 * s, 5 * s],
                                      _M["csf"]))
        brain_parts.append(_ellipsoid(skull_centre + [side * 7 * s, 2 * s, 3 * s], [2.4 * s, 8 * s, 3 * s],
                                      _M["choroid"]))
    brain_parts.append(_ellipsoid(skull_centre, inner * 0.97, _M["falx"],
                                  clips=((1, 0, 0, 0.5), (-1, 0, 0, 0.5), (*plane_n, plane_offset - 6 * s))))

    # Bones: vault (open over the face), skull base, brow, orbit rims, cheek bones, nasal bone,
    # upper jaw, mandible, spine.
    bones.append(_ellipsoid(skull_centre, skull_semi - 0.5 * skull_thick, bone, shell=skull_thick,
                            clips=((*plane_n, plane_offset),)))
    base_offset = plane_offset - 4 * s - 1.0  # skull base: a plate along the brain's cut face
    bones.append(_ellipsoid(skull_centre, inner * 0.98, thin,
                            clips=((*plane_n, base_offset + 1.0), (*(-plane_n), -base_offset + 1.0))))
    for side, centre in ((-1, left_eye), (1, right_eye)):
        bones.append(_capsule(brow + [0, -3.2 * s, -0.5 * s],
                              [side * (half_sep + 7 * s), brow[1] - 7 * s, brow[2] - 1.5 * s], 1.2, 1.2, bone))
        rim = eye_radius + 1.6 * s
        bones.append(_sphere(centre, rim, bone, shell=1.3, clips=((0, 1, 0, 0.35 * rim),)))
        bones.append(_capsule(centre + [side * 2 * s, 1 * s, -6.5 * s], centre + [side * 13 * s, -9 * s, -4 * s],
                              1.2, 1.2, bone))
    bone_r = 0.8 * math.sqrt(s)
    bones.append(_capsule(nasion + [0, 1.2 * s, 0], nasion + 0.45 * (bridge_end - nasion) + [0, 1.2 * s, 0],
                          bone_r, bone_r, bone))
    bones.append(_ellipsoid(nose + [-0.5 * nose[0], -14 * s, -6 * s], [13 * s, 10 * s, 5 * s], bone, shell=1.4,
                            clips=((0, -1, 0, -3 * s), (0, 0, 1, 2.5 * s), (0, 0, -1, 2.5 * s))))
    symphysis = chin - 3.5 * s * chin_dir
    u = np.linspace(-1.0, 1.0, 9)
    jaw = symphysis + np.stack([22 * s * u, -26 * s * u**2, 9 * s * u**2], axis=1)
    jaw_r = 1.3 * math.sqrt(s)
    for a, b in zip(jaw[:-1], jaw[1:]):
        bones.append(_capsule(a, b, jaw_r, jaw_r, bone))
    for end, side in ((jaw[0], -1), (jaw[-1], 1)):
        bones.append(_capsule(end, end + [side * 1 * s, -4 * s, 17 * s], 1.6, 1.6, bone))
    spine_top, spine_bottom = np.array([0, -32 * s, -26 * s]), np.array([0, -44 * s, -110 * s])
    for t in np.linspace(0.0, 1.0, 13):
        bones.append(_ellipsoid(spine_top + t * (spine_bottom - spine_top), [3 * s, 3 * s, 2.2 * s], bone))

    # Eyes last: hypoechoic globe, small bright lens ring near its front.
    for centre in (left_eye, right_eye):
        eyes.append(_sphere(centre, eye_radius, _M["vitreous"]))
        lens_r = 1.2 * math.sqrt(s)
        eyes.append(_sphere(centre + [0, eye_radius - lens_r - 0.3, 0], lens_r, _M["lens"], shell=0.7))

    shapes = body + skin + [mouth] + brain_parts + bones + eyes
    skin_shapes = [sh for sh in shapes if sh.skin]
    # Landmarks measured on the anatomy: eye centres; skin points of brow, nose tip and chin.
    far = 60.0 * s
    glabella = _first_hit(skin_shapes, np.array([brow[0], brow[1] + far, brow[2]]), [0, -1, 0], 2 * far)
    nose_tip = _first_hit(skin_shapes, np.array([nose[0], nose[1] + far, nose[2]]), [0, -1, 0], 2 * far)
    chin_pt = _first_hit(skin_shapes, chin + far * chin_dir, -chin_dir, 2 * far)
    landmarks = np.stack([left_eye, glabella, right_eye, nose_tip, chin_pt])

    anchors = [
        ("cheek", np.array([-(half_sep + 4 * s), 6 * s, -12 * s]), np.array([-0.6, 0.8, 0.0])),
        ("cheek", np.array([half_sep + 4 * s, 6 * s, -12 * s]), np.array([0.6, 0.8, 0.0])),
        ("mouth", nose + [0, -6 * s, -10 * s], np.array([0.0, 1.0, -0.2])),
        ("chin", chin.copy(), chin_dir.copy()),
        ("eye", left_eye + [0, eye_radius + 2 * s, 0], np.array([-0.2, 1.0, 0.1])),
        ("eye", right_eye + [0, eye_radius + 2 * s, 0], np.array([0.2, 1.0, 0.1])),
        ("forehead", np.array([0.0, 8 * s, 18 * s]), np.array([0.0, 0.7, 0.7])),
        ("side", np.array([-(skull_semi[0] + 3 * s), -15 * s, -4 * s]), np.array([-1.0, 0.2, 0.0])),
        ("side", np.array([skull_semi[0] + 3 * s, -15 * s, -4 * s]), np.array([1.0, 0.2, 0.0])),
    ]
    anchors = [(name, p, n / np.linalg.norm(n)) for name, p, n in anchors]
    face_centre = landmarks.mean(axis=0)
    face_radius = float(np.max(np.linalg.norm(landmarks - face_centre, axis=1)))
    neck = body[1]  # the hull holds ellipsoids only: the neck capsule as its enclosing ellipsoid
    neck_hull = _ellipsoid(neck.centre, [neck.size[0] + neck.size[1], neck.size[1], neck.size[1]], soft,
                           axes=neck.axes)
    hull = [skin[0], _sphere(face_centre, face_radius + 6.0 * s, soft), body[0], neck_hull]
    return _Subject(s, shapes, landmarks, skull_centre, skull_semi, anchors, hull)


# ------------------------------------------------------------------------------ distractors

def _random_unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def _perpendicular(rng: np.random.Generator, normal: np.ndarray) -> np.ndarray:
    """A random unit vector perpendicular to ``normal``."""
    v = _random_unit(rng)
    v = v - (v @ normal) * normal
    return v / np.linalg.norm(v)


def _digit(base, directions, lengths, flesh_r, bone_r, soft, bone):
    """Soft-tissue capsules and phalanx bones (with joint gaps) of one finger or toe."""
    flesh, bones = [], []
    start = np.asarray(base, dtype=np.float64)
    for direction, length in zip(directions, lengths):
        end = start + length * direction
        flesh.append(_capsule(start, end, flesh_r, 0.9 * flesh_r, soft))
        trim = min(0.7, 0.3 * length)
        bones.append(_capsule(start + trim * direction, end - trim * direction, bone_r, bone_r, bone))
        start = end
    return flesh, bones


def _build_hand(rng: np.random.Generator, s: float, anchor: np.ndarray, outward: np.ndarray):
    """A fist or open hand with forearm near ``anchor`` (face frame).

    Returns (shapes in painting order, ``;``-separated tags, the soft-tissue shapes).
    """
    soft, bone = _M["soft_tissue"], _M["bone"]
    palm_normal = -outward + 0.5 * _random_unit(rng)
    palm_normal /= np.linalg.norm(palm_normal)
    u = _perpendicular(rng, palm_normal)  # finger direction
    w = np.cross(u, palm_normal)
    fist = rng.random() < 0.6
    gap = rng.uniform(-3.0, 8.0)  # < 0: pressed into the face, occluding part of it
    centre = anchor + outward * (4.5 * s + gap)
    axes = np.stack([u, palm_normal, w])
    flesh = [_ellipsoid(centre, [8.5 * s, 4.5 * s, 8 * s], soft, axes=axes)]
    bones = []
    for k, factor in enumerate((0.9, 1.0, 0.95, 0.8)):
        knuckle = centre + u * 7.5 * s + w * (-4.8 + 3.2 * k) * s
        bones.append(_capsule(centre - u * 6 * s + w * (-3.8 + 2.6 * k) * s, knuckle - u * 1.2 * s, 0.9, 0.9, bone))
        bones.append(_sphere(knuckle, 1.3 * s, bone))
        flex = rng.uniform(60, 95, 3) if fist else rng.uniform(0, 25, 3)
        angles = np.radians(np.cumsum(flex))
        directions = [math.cos(a) * u + math.sin(a) * palm_normal for a in angles]
        lengths = factor * s * np.array([6.2, 4.0, 3.0])
        f, b = _digit(knuckle, directions, lengths, 2.3 * s, 0.75 * math.sqrt(s), soft, bone)
        flesh += f
        bones += b
    thumb_dir = 0.7 * u - 0.5 * w + 0.5 * palm_normal
    thumb_dir /= np.linalg.norm(thumb_dir)
    f, b = _digit(centre - u * 3 * s - w * 7 * s, [thumb_dir, thumb_dir], s * np.array([5.0, 3.5]),
                  2.5 * s, 0.8 * math.sqrt(s), soft, bone)
    flesh += f
    bones += b
    wrist = centre - u * 9 * s
    arm_dir = -u + 0.5 * _random_unit(rng)
    arm_dir /= np.linalg.norm(arm_dir)
    elbow = wrist + arm_dir * rng.uniform(35, 50) * s
    flesh.append(_capsule(wrist, elbow, 6 * s, 7.5 * s, soft))
    side = np.cross(arm_dir, palm_normal)
    side /= np.linalg.norm(side)
    for offset in (-2.5, 2.5):
        bones.append(_capsule(wrist + arm_dir * 2 + side * offset * s, elbow + side * offset * s, 1.0, 1.1, bone))
    tag = ("hand-fist" if fist else "hand-open") + (";touching-face" if gap < 1.0 else "")
    return flesh + bones, tag, flesh


def _build_foot(rng: np.random.Generator, s: float, anchor: np.ndarray, outward: np.ndarray):
    """A foot with lower leg near ``anchor`` (face frame); returns like ``_build_hand``."""
    soft, bone = _M["soft_tissue"], _M["bone"]
    dorsal = outward + 0.6 * _random_unit(rng)
    dorsal /= np.linalg.norm(dorsal)
    u = _perpendicular(rng, dorsal)  # heel -> toes
    w = np.cross(u, dorsal)
    gap = rng.uniform(0.0, 12.0)
    centre = anchor + outward * (6.5 * s + gap)
    flesh = [_ellipsoid(centre, [21 * s, 6 * s, 8 * s], soft, axes=np.stack([u, dorsal, w]))]
    bones = [_ellipsoid(centre - u * 15 * s, [6 * s, 4 * s, 3.5 * s], bone, axes=np.stack([u, dorsal, w]))]
    for k in range(5):
        lateral = (-5.0 + 2.5 * k) * s
        bones.append(_capsule(centre - u * 5 * s + w * 0.7 * lateral, centre + u * 11 * s + w * lateral,
                              0.8, 0.8, bone))  # metatarsal
        toe = centre + u * (18.5 - 0.6 * abs(k - 1)) * s + w * 1.05 * lateral
        flesh.append(_ellipsoid(toe, [2.6 * s, 2.2 * s, 2.2 * s], soft, axes=np.stack([u, dorsal, w])))
        bones.append(_capsule(toe - u * 1.2 * s, toe + u * 1.0 * s, 0.6, 0.6, bone))
    ankle = centre - u * 12 * s + dorsal * 4 * s
    leg_dir = dorsal + 0.3 * _random_unit(rng)
    leg_dir /= np.linalg.norm(leg_dir)
    knee = ankle + leg_dir * rng.uniform(35, 50) * s
    flesh.append(_capsule(ankle, knee, 7 * s, 8 * s, soft))
    side = np.cross(leg_dir, u)
    side /= np.linalg.norm(side)
    bones.append(_capsule(ankle + leg_dir * 3 - side * 1.5 * s, knee - side * 1.5 * s, 1.4, 1.6, bone))
    bones.append(_capsule(ankle + leg_dir * 3 + side * 3 * s, knee + side * 3 * s, 0.8, 0.9, bone))
    return flesh + bones, "foot" + (";touching-face" if gap < 1.0 else ""), flesh


def _push_outside(points: np.ndarray, hull, margin: float) -> np.ndarray:
    """Move points (N, 3) radially out of each hull ellipsoid grown by ``margin`` mm."""
    points = points.copy()
    for shape in hull:
        semi = np.asarray(shape.size) + margin
        q = (points - shape.centre) @ shape.axes.T
        k = np.sqrt(((q / semi) ** 2).sum(axis=1))
        inside = k < 1.0
        q[inside] /= np.maximum(k[inside, None], 1e-6)
        points[inside] = shape.centre + q[inside] @ shape.axes
    return points


def _build_cord(rng: np.random.Generator, s: float, anchor: np.ndarray, outward: np.ndarray, hull):
    """Umbilical cord (jelly, two arteries and a vein twisting round it) passing near ``anchor``.

    The centre line is pushed out of the ``hull`` ellipsoids (head, face, trunk), so the cord may
    wrap round the fetus but not run through it. Returns like ``_build_hand``.
    """
    radius = rng.uniform(6.0, 8.0)
    through = anchor + outward * (radius + rng.uniform(4.0, 22.0))
    direction = _perpendicular(rng, outward) if rng.random() < 0.7 else _random_unit(rng)
    e1 = _perpendicular(rng, direction)
    e2 = np.cross(direction, e1)
    tau = np.arange(-130.0, 130.1, 8.0)
    wave = 2 * math.pi / rng.uniform(70, 140)
    amp1, amp2 = rng.uniform(3, 15, 2)
    ph1, ph2 = rng.uniform(0, 2 * math.pi, 2)
    line = (through + tau[:, None] * direction + (amp1 * np.sin(wave * tau + ph1))[:, None] * e1
            + (amp2 * np.sin(wave * tau + ph2))[:, None] * e2)
    for _ in range(2):
        line = _push_outside(line, hull, radius + 1.5)
    # Helical vessels: a frame that follows the line, and a twist angle growing with arc length.
    tangent = np.gradient(line, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    normal = np.cross(tangent, e1 if abs(direction @ e1) < 0.9 else e2)
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9)
    binormal = np.cross(tangent, normal)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(line, axis=0), axis=1))])
    twist = rng.uniform(0, 2 * math.pi) + 2 * math.pi * arc / rng.uniform(40, 70)
    offset = 0.5 * radius
    jelly = [_capsule(a, b, radius, radius, _M["cord_jelly"]) for a, b in zip(line[:-1], line[1:])]
    walls, lumens = [], []
    for k, lumen_r in enumerate((1.6, 1.6, 2.8)):  # two arteries, one vein
        phase = twist + 2 * math.pi * k / 3
        path = line + offset * (np.cos(phase)[:, None] * normal + np.sin(phase)[:, None] * binormal)
        for a, b in zip(path[:-1], path[1:]):
            walls.append(_capsule(a, b, lumen_r + 0.6, lumen_r + 0.6, _M["vessel_wall"]))
            lumens.append(_capsule(a, b, lumen_r, lumen_r, _M["blood"]))
    return jelly + walls + lumens, "cord", jelly


def _place(rng, builder, subject: _Subject, clearance: float, *extra):
    """Draw a distractor at a random anchor until no landmark lies within ``clearance`` mm of it."""
    for _ in range(MAX_PLACEMENT_DRAWS):
        name, point, outward = subject.anchors[int(rng.integers(len(subject.anchors)))]
        point = point + rng.uniform(-5.0, 5.0, 3)
        shapes, tag, solid = builder(rng, subject.scale, point, outward, *extra)
        if np.all(_union_distance(solid, subject.landmarks) > clearance):
            if name == "eye" and tag != "cord":
                tag += ";eye-covered"
            return shapes, tag
    return [], ""


# ------------------------------------------------------------------------ uterus and placenta

def _waves(rng: np.random.Generator, amplitude: tuple[float, float]):
    """Two gentle sinusoidal undulations (amplitude mm, wavelength 50-140 mm) of a layer."""
    out = []
    for _ in range(2):
        k = 2 * math.pi / rng.uniform(50, 140)
        angle = rng.uniform(0, 2 * math.pi)
        out.append((rng.uniform(*amplitude), k * math.cos(angle), k * math.sin(angle), rng.uniform(0, 2 * math.pi)))
    return tuple(out)


def _layers(start: float, normal: np.ndarray, layers, waves) -> list:
    """Parallel tissue layers beyond the plane ``p . normal = start`` (world), listed fluid side first.

    ``layers``: (material, thickness mm); the last one fills the half-space beyond (thickness
    ignored); ``0 < thickness < 2`` draws a thin bright line.
    """
    shapes, depth = [], start
    for index, (material, thickness) in enumerate(layers):
        if index == len(layers) - 1:
            shapes.append(_halfspace(normal * depth, -normal, material, waves))
        else:
            shapes.append(_halfspace(normal * (depth + 0.5 * thickness), -normal, material, waves, shell=thickness))
            depth += thickness
    return shapes


def _build_uterus(rng: np.random.Generator, head_world, options: PhantomOptions):
    """Uterine walls, maternal abdominal wall and placenta around the head (world). -> (shapes, tags)"""
    tags = []
    tilt, azimuth = rng.uniform(0, 15), rng.uniform(0, 360)
    up = _rot_z(azimuth) @ _rot_x(tilt) @ np.array([0.0, 0.0, 1.0])  # towards the probe
    near_gap = rng.uniform(1.5, 6.0) if rng.random() < 0.35 else rng.uniform(6.0, 30.0)
    top = max(shape.support(up) for shape in head_world)
    placenta = rng.random() < options.placenta_prob
    site = rng.choice(["anterior", "posterior", "lateral"], p=[0.35, 0.4, 0.25])
    placenta_thick = rng.uniform(18.0, 32.0)
    waves = _waves(rng, (1.0, 5.0))
    myo, fat = rng.uniform(7, 14), rng.uniform(8, 20)
    anterior = [(_M["myometrium"], myo), (_M["fascia"], 1.2), (_M["fat"], fat), (_M["fascia"], 1.2),
                (_M["myometrium"], 0)]
    if placenta and site == "anterior":
        anterior = [(_M["placenta"], placenta_thick)] + anterior
    shapes = _layers(top + near_gap, up, anterior, waves)
    if placenta and site == "anterior":
        shapes.append(_halfspace(up * (top + near_gap + 0.5), -up, _M["chorionic_plate"], waves, shell=1.2))

    # The far wall (with the placenta when posterior), and a lateral placenta.
    down = _rot_z(rng.uniform(0, 360)) @ _rot_x(rng.uniform(0, 20)) @ np.array([0.0, 0.0, -1.0])
    lateral = _rot_z(rng.uniform(0, 360)) @ _rot_x(rng.uniform(60, 90)) @ np.array([0.0, 0.0, 1.0])
    far_gap, side_gap = rng.uniform(-3.0, 30.0), rng.uniform(-3.0, 15.0)
    far_waves, side_waves = _waves(rng, (1.0, 5.0)), _waves(rng, (1.0, 5.0))
    far = [(_M["myometrium"], rng.uniform(7, 14)), (_M["fat"], 0)]
    if placenta and site == "posterior":
        far = [(_M["placenta"], placenta_thick)] + far
    start = max(shape.support(down) for shape in head_world) + far_gap
    shapes += _layers(start, down, far, far_waves)
    if placenta and site == "posterior":
        shapes.append(_halfspace(down * (start + 0.5), -down, _M["chorionic_plate"], far_waves, shell=1.2))
    if placenta and site == "lateral":
        start = max(shape.support(lateral) for shape in head_world) + side_gap
        shapes += _layers(start, lateral, [(_M["placenta"], placenta_thick), (_M["myometrium"], 0)], side_waves)
        shapes.append(_halfspace(lateral * (start + 0.5), -lateral, _M["chorionic_plate"], side_waves, shell=1.2))
    if placenta:
        tags.append(f"placenta-{site}")
    if near_gap < 6.0:
        tags.append("wall-close")
    return shapes, tags


# ------------------------------------------------------------------------------------ painting

@dataclass(frozen=True)
class _Grid:
    """The voxel grid: ``size`` voxels per edge, ``spacing`` mm, centred on the world origin."""

    size: int
    spacing: float

    @property
    def coords(self) -> np.ndarray:
        """(size,) world coordinate (mm) of the voxel centres along any axis."""
        return (np.arange(self.size) - 0.5 * (self.size - 1)) * self.spacing

    @property
    def affine(self) -> np.ndarray:
        affine = np.diag([self.spacing, self.spacing, self.spacing, 1.0])
        affine[:3, 3] = -0.5 * (self.size - 1) * self.spacing
        return affine

    def to_voxel(self, points_mm: np.ndarray) -> np.ndarray:
        return points_mm / self.spacing + 0.5 * (self.size - 1)


def _index_range(low_mm: float, high_mm: float, grid: _Grid) -> slice:
    """Voxel indices whose centres lie in [low_mm, high_mm] (grown by one voxel)."""
    origin = -0.5 * (grid.size - 1) * grid.spacing
    start = max(int(math.floor((low_mm - origin) / grid.spacing)) - 1, 0)
    stop = min(int(math.ceil((high_mm - origin) / grid.spacing)) + 2, grid.size)
    return slice(start, max(stop, start))


def _bounding_slices(shape: _Shape, grid: _Grid) -> tuple[slice, slice, slice]:
    """Voxel box that holds the shape (for a half-space: the voxels its surface layer can reach)."""
    half = shape.half_extent()
    if half is not None:
        return tuple(_index_range(shape.centre[a] - half[a], shape.centre[a] + half[a], grid) for a in range(3))
    # Half-space: along each axis, keep the slices where n . (p - c) can fall below ``high``
    # (and above ``low`` for a thin layer); n . p is linear, so its range over a slice is exact.
    normal = shape.axes[2]
    reach = sum(abs(w[0]) for w in shape.waves) + 0.5 * shape.shell + grid.spacing
    high, low = reach, (-reach if shape.shell > 0 else -math.inf)
    x = grid.coords
    extent = 0.5 * (grid.size - 1) * grid.spacing
    slices = []
    for axis in range(3):
        others = sum(abs(normal[b]) * extent for b in range(3) if b != axis)
        value = normal[axis] * x - normal @ shape.centre  # n . p - n . c at this slice, other axes at 0
        hit = (value - others <= high) & (value + others >= low)
        index = np.flatnonzero(hit)
        slices.append(slice(int(index[0]), int(index[-1]) + 1) if index.size else slice(0, 0))
    return tuple(slices)


def _paint(maps: np.ndarray, labels: np.ndarray, shape: _Shape, grid: _Grid) -> None:
    """Blend the shape's material into ``maps`` (5, X, Y, Z) with sub-voxel coverage, in place."""
    box = _bounding_slices(shape, grid)
    if any(sl.stop <= sl.start for sl in box):
        return
    x = grid.coords
    dx = (x[box[0]] - shape.centre[0])[:, None, None]
    dy = (x[box[1]] - shape.centre[1])[None, :, None]
    dz = (x[box[2]] - shape.centre[2])[None, None, :]
    q = [shape.axes[i, 0] * dx + shape.axes[i, 1] * dy + shape.axes[i, 2] * dz for i in range(3)]
    alpha = shape.coverage(*q, grid.spacing).astype(np.float32)
    region = maps[(slice(None),) + box]
    region += alpha * (_PROPERTIES[shape.material][:, None, None, None] - region)
    labels[box][alpha >= 0.5] = shape.material


def _smooth_noise(rng: np.random.Generator, grid: _Grid, correlation_mm: float) -> np.ndarray:
    """Unit-variance smooth random field (X, Y, Z) float32: a coarse lattice, linearly interpolated.

    Interpolation is done axis by axis with explicit weights (no BLAS, so bit-stable).
    """
    pos = (grid.coords - grid.coords[0]) / correlation_mm
    n = int(math.floor(pos[-1])) + 2
    field_ = rng.standard_normal((n, n, n))
    base = np.minimum(np.floor(pos).astype(int), n - 2)
    frac = pos - base
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = grid.size
        f = frac.reshape(shape)
        field_ = (1.0 - f) * np.take(field_, base, axis=axis) + f * np.take(field_, base + 1, axis=axis)
    # Divide by the exact standard deviation of each voxel's weighted sum of unit normals.
    norm = np.sqrt((1.0 - frac) ** 2 + frac**2)
    return (field_ / (norm[:, None, None] * norm[None, :, None] * norm[None, None, :])).astype(np.float32)


# ---------------------------------------------------------------------------- image formation

def _beam_cumsum(values: np.ndarray) -> np.ndarray:
    """Sum (per voxel) of ``values`` the beam crossed before reaching the voxel's centre.

    The beam runs towards -z (decreasing k), so this sums the voxels above plus half the voxel.
    """
    total = np.cumsum(values[:, :, ::-1], axis=2, dtype=np.float32)[:, :, ::-1]
    return total - 0.5 * values


def _gaussian_taps(sigma_vox, unit_energy: bool = True) -> np.ndarray:
    """Gaussian taps: sigma (Z,) voxels -> weights (T, Z), T odd.

    Unit energy (sum of squares 1) keeps the mean power of speckle; otherwise unit sum (a blur).
    """
    sigma = np.maximum(np.atleast_1d(np.asarray(sigma_vox, dtype=np.float64)), 0.3)
    half = int(math.ceil(3.0 * float(sigma.max())))
    t = np.arange(-half, half + 1, dtype=np.float64)[:, None]
    taps = np.exp(-0.5 * (t / sigma[None, :]) ** 2)
    norm = np.sqrt((taps**2).sum(axis=0, keepdims=True)) if unit_energy else taps.sum(axis=0, keepdims=True)
    return (taps / norm).astype(np.float32)


def _convolve_axis(field_: np.ndarray, taps: np.ndarray, axis: int, pad_mode: str = "constant") -> np.ndarray:
    """Convolution of (X, Y, Z) along ``axis`` with taps (T, Z) (one kernel per depth) or (T, 1).

    ``pad_mode`` as in ``numpy.pad``: zeros for echoes, ``"edge"`` for smooth maps.
    """
    half = (taps.shape[0] - 1) // 2
    if half == 0:
        return field_ * taps[0]
    pad = [(0, 0)] * 3
    pad[axis] = (half, half)
    padded = np.pad(field_, pad, mode=pad_mode)
    out = np.zeros_like(field_)
    n = field_.shape[axis]
    for t in range(taps.shape[0]):
        window = [slice(None)] * 3
        window[axis] = slice(t, t + n)
        weight = taps[t][None, None, :] if taps.shape[1] > 1 else taps[t, 0]
        out += weight * padded[tuple(window)]
    return out


def _draw_imaging(rng: np.random.Generator, grid: _Grid) -> dict:
    """Scanner settings of one volume (probe apex above the volume, beam towards -z)."""
    top = grid.coords[-1]
    half_lat, half_elev = rng.uniform(30.0, 37.5, 2)
    apex = np.array([rng.uniform(-10, 10), rng.uniform(-10, 10), top + rng.uniform(8.0, 35.0)])
    bottom_depth = apex[2] - grid.coords[0]
    return {
        "fan_half_angles_deg": (float(half_lat), float(half_elev)),
        "apex_mm": apex,
        "max_depth_mm": float(bottom_depth * rng.uniform(0.92, 1.1)),
        "psf_axial_fwhm_mm": float(rng.uniform(0.5, 1.0)),
        "psf_lateral_fwhm_mm": float(rng.uniform(1.5, 3.0)),
        "psf_elevation_fwhm_mm": float(rng.uniform(1.5, 3.0)),
        "psf_rayleigh_mm": float(rng.uniform(50.0, 90.0)),
        "focus_offset_mm": float(rng.uniform(-10.0, 10.0)),
        "attenuation_db_per_cm": float(rng.uniform(1.5, 2.6)),  # round trip, soft tissue
        "tgc_db_per_cm": float(rng.uniform(0.7, 1.4)),
        "shadow_per_mm": float(rng.uniform(0.12, 0.22)),  # one way (1/mm), fetal bone
        "specular_gain": float(rng.uniform(0.7, 1.3)),
        "noise_db": float(rng.uniform(-72.0, -66.0)),
        "dynamic_range_db": float(rng.uniform(40.0, 60.0)),
        "gain_db": float(rng.uniform(-4.0, 3.0)),
    }


def _in_fan(points: np.ndarray, imaging: dict, margin: float = 0.0) -> np.ndarray:
    """(N,) bool: points (N, 3) world mm inside the fan by at least ``margin`` mm."""
    d = points - imaging["apex_mm"]
    depth = -d[:, 2]
    tan_lat, tan_elev = (math.tan(math.radians(a)) for a in imaging["fan_half_angles_deg"])
    return ((np.abs(d[:, 0]) + margin <= tan_lat * depth) & (np.abs(d[:, 1]) + margin <= tan_elev * depth)
            & (np.linalg.norm(d, axis=1) + margin <= imaging["max_depth_mm"]))


def _fan_mask(grid: _Grid, imaging: dict) -> np.ndarray:
    """(X, Y, Z) bool: voxels inside the fan-shaped field of view."""
    x = grid.coords
    dx = (x - imaging["apex_mm"][0])[:, None, None]
    dy = (x - imaging["apex_mm"][1])[None, :, None]
    depth = (imaging["apex_mm"][2] - x)[None, None, :]
    tan_lat, tan_elev = (math.tan(math.radians(a)) for a in imaging["fan_half_angles_deg"])
    return ((np.abs(dx) <= tan_lat * depth) & (np.abs(dy) <= tan_elev * depth)
            & (dx**2 + dy**2 + depth**2 <= imaging["max_depth_mm"] ** 2))


def _form_image(maps: np.ndarray, grid: _Grid, imaging: dict, rng: np.random.Generator,
                options: PhantomOptions) -> np.ndarray:
    """Ultrasound image (X, Y, Z) uint8 from the painted property maps (5, X, Y, Z)."""
    h = grid.spacing
    depth = (imaging["apex_mm"][2] - grid.coords)[None, None, :].astype(np.float32)  # (1, 1, Z) mm
    texture = _smooth_noise(rng, grid, 6.0)
    amplitude = maps[_AMP] * np.exp(maps[_TEXTURE] * texture)
    # Point-spread function: narrow along the beam, wider across it, widening away from the focus.
    fwhm_to_sigma = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    focus = float(np.median(depth)) + imaging["focus_offset_mm"]
    widening = np.sqrt(1.0 + ((depth[0, 0] - focus) / imaging["psf_rayleigh_mm"]) ** 2)
    sigma_lateral = imaging["psf_lateral_fwhm_mm"] * fwhm_to_sigma / h * widening  # (Z,) voxels
    sigma_elevation = imaging["psf_elevation_fwhm_mm"] * fwhm_to_sigma / h * widening
    # Echo gain along the beam: tissue attenuation (round trip), partly undone by the TGC ramp,
    # and transmission through bone (round trip) for the shadows. The beam has a width, so the
    # losses are averaged across it (no one-voxel-wide streaks).
    tgc_db = imaging["tgc_db_per_cm"] * (depth - depth.min()) / 10.0
    loss = imaging["attenuation_db_per_cm"] * (h / 10.0) * _beam_cumsum(maps[_ATTEN])  # dB
    if options.shadows:  # in dB too: 20 log10(e) per neper
        loss += (2.0 * 20.0 / math.log(10.0) * imaging["shadow_per_mm"] * h) * _beam_cumsum(maps[_BONE])
    loss = _convolve_axis(loss, _gaussian_taps(1.5 * sigma_lateral, unit_energy=False), 0, "edge")
    loss = _convolve_axis(loss, _gaussian_taps(1.5 * sigma_elevation, unit_energy=False), 1, "edge")
    gain = np.power(np.float32(10.0), (tgc_db - loss) / 20.0)
    # Specular echo where the impedance jumps along the beam (interfaces facing the probe), on
    # the voxel just past the jump; saturating in the jump: skin/fluid about -15 dB, bone -6 dB.
    impedance = maps[_IMPEDANCE]
    jump = np.zeros_like(impedance)
    jump[:, :, :-1] = np.abs(impedance[:, :, 1:] - impedance[:, :, :-1])
    specular = (4.0 * imaging["specular_gain"]) * jump / (1.0 + 5.0 * jump) * gain
    # Electronic noise (partly amplified by the TGC) adds to the scatterers' power.
    noise = np.float32(10.0 ** (imaging["noise_db"] / 20.0)) * np.power(np.float32(10.0), tgc_db / 40.0)
    scatter = np.sqrt((amplitude * gain) ** 2 + noise**2)
    if options.speckle:
        phasors = rng.standard_normal((2,) + scatter.shape, dtype=np.float32)
        field_ = (scatter * np.float32(math.sqrt(0.5))) * (phasors[0] + 1j * phasors[1]) + specular
        field_ = field_.astype(np.complex64)
    else:
        field_ = scatter + specular
    field_ = _convolve_axis(field_, _gaussian_taps(sigma_lateral), 0)
    field_ = _convolve_axis(field_, _gaussian_taps(sigma_elevation), 1)
    field_ = _convolve_axis(field_, _gaussian_taps(imaging["psf_axial_fwhm_mm"] * fwhm_to_sigma / h), 2)
    envelope = np.abs(field_)
    # Log compression: [gain - range, gain] dB -> [0, 255].
    level_db = 20.0 * np.log10(np.maximum(envelope, np.float32(1e-12)))
    low = imaging["gain_db"] - imaging["dynamic_range_db"]
    image = np.clip(np.rint((level_db - low) * (255.0 / imaging["dynamic_range_db"])), 0, 255).astype(np.uint8)
    if options.fan:
        image[~_fan_mask(grid, imaging)] = 0
    return image


# ---------------------------------------------------------------------------------- one volume

def _check_arguments(seed, grid, spacing_mm, options) -> PhantomOptions:
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


def _fits(landmarks: np.ndarray, grid: _Grid, imaging: dict) -> bool:
    """Every landmark at least half its GT box + 2 mm inside the volume, and inside the fan."""
    margin_mm = np.asarray(GT_BOX_MM) / 2.0 + BOX_MARGIN_MM
    low = grid.coords[0] + margin_mm[:, None]
    high = grid.coords[-1] - margin_mm[:, None]
    inside = np.all((landmarks >= low) & (landmarks <= high))
    return bool(inside and np.all(_in_fan(landmarks, imaging, FAN_MARGIN_MM)))


def _draw_pose(rng: np.random.Generator, landmarks_face: np.ndarray, grid: _Grid, imaging: dict,
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
        rotation = _rot_z(spin) @ _rot_y(tilt_y) @ _rot_x(tilt_x) @ face_up
        translation = rng.uniform(-options.max_shift_mm, options.max_shift_mm, 3) - rotation @ centroid
        if _fits(landmarks_face @ rotation.T + translation, grid, imaging):
            return rotation, translation, (spin, tilt_x, tilt_y)
    raise ValueError(f"phantom seed {seed}: no pose keeps the landmarks inside a {grid.size} x {grid.spacing} mm "
                     f"volume and its fan after {MAX_POSE_DRAWS} draws; use a larger field of view")


def _build_scene(seed: int, grid: _Grid, options: PhantomOptions) -> dict:
    """Everything before image formation: painted maps (5, X, Y, Z), labels, landmarks, settings."""
    streams = [np.random.Generator(np.random.PCG64(child)) for child in np.random.SeedSequence(int(seed)).spawn(8)]
    rng_anatomy, rng_pose, rng_uterus, rng_hand, rng_foot, rng_cord, rng_imaging, rng_speckle = streams

    subject = _build_subject(rng_anatomy, options)
    imaging = _draw_imaging(rng_imaging, grid)
    rotation, translation, angles = _draw_pose(rng_pose, subject.landmarks, grid, imaging, options, seed)

    # Distractors, each from its own stream so that switching one off changes nothing else.
    extras, tags = [], []
    for rng, probability, builder, args in (
        (rng_hand, options.hand_prob, _build_hand, ()),
        (rng_foot, options.foot_prob, _build_foot, ()),
        (rng_cord, options.cord_prob, _build_cord, (subject.hull,)),
    ):
        if rng.random() < probability:
            shapes, tag = _place(rng, builder, subject, 2.0, *args)
            extras += shapes
            tags += tag.split(";") if tag else []

    fetus = [shape.moved(rotation, translation) for shape in subject.shapes + extras]
    head_world = [shape for shape in fetus[:len(subject.shapes)] if shape.skin][2:]  # skin minus trunk, neck
    uterus, uterus_tags = _build_uterus(rng_uterus, head_world, options)

    maps = np.empty((5,) + (grid.size,) * 3, dtype=np.float32)
    maps[:] = _PROPERTIES[_M["fluid"]][:, None, None, None]
    labels = np.zeros((grid.size,) * 3, dtype=np.uint8)
    for shape in uterus + fetus:
        _paint(maps, labels, shape, grid)
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
    opts = _check_arguments(seed, grid, spacing_mm, options)
    grid_ = _Grid(int(grid), float(spacing_mm))
    scene = _build_scene(int(seed), grid_, opts)
    volume = _form_image(scene["maps"], grid_, scene["imaging"], scene["rng_speckle"], opts)
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
    """One synthetic fetal-face ultrasound volume (see the module docstring).

    Returns:
        volume (grid, grid, grid) uint8; affine (4, 4) float64 voxel -> world mm (RAS+);
        landmarks_mm (5, 3) float64 world mm, rows in ``config.LANDMARKS`` order.
    """
    volume, affine, landmarks, _ = make_phantom_with_info(seed, grid, spacing_mm, **options)
    return volume, affine, landmarks


# ---------------------------------------------------------------------------------- data set

def case_seeds(seed: int, n: int) -> np.ndarray:
    """(n,) int64 per-volume seeds derived from ``seed``; the first k do not depend on n."""
    return np.random.SeedSequence(int(seed)).generate_state(n, dtype=np.uint32).astype(np.int64)


def split_labels(seed: int, n: int, n_test: int) -> list[str]:
    """``"train"``/``"test"`` for n volumes: a random but deterministic choice of n_test test cases."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), 1])))
    labels = np.full(n, "train", dtype=object)
    labels[rng.permutation(n)[:n_test]] = "test"
    return labels.tolist()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (never half-written;
    ``markups.atomic_write_files``), creating the folder."""

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_files({path: data})


def _nifti_bytes(volume: np.ndarray, affine: np.ndarray, description: str) -> bytes:
    """Gzipped NIfTI-1 bytes (mtime 0, so the same volume gives the same file)."""
    import nibabel as nib

    image = nib.Nifti1Image(volume, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = description.encode()[:79]
    return gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)


def _manifest_bytes(rows: list[dict]) -> bytes:
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def generate_dataset(out_dir, n: int = 152, seed: int = 0, n_test: int = 32, grid: int = 128,
                     spacing_mm: float = 1.3, manifest_path=None, progress: bool = True) -> Path:
    """Write n phantom volumes ``<out_dir>/<case_id>.nii.gz`` and their manifest.

    Every file is written atomically, so an interrupted run leaves only whole files and simply
    runs again. The manifest (default ``<out_dir>/data_manifest.csv``) has the columns
    ``MANIFEST_COLUMNS``; ``image`` is relative to the manifest's folder, landmarks in world mm.

    Returns:
        The manifest's path.
    """
    from tqdm.auto import tqdm

    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_VOLUMES:
        raise ValueError(f"generate_dataset: n must be a positive integer up to {MAX_VOLUMES}, got {n!r}")
    if not 0 <= n_test <= n:
        raise ValueError(f"generate_dataset: n_test must be in [0, n={n}], got {n_test!r}")
    _check_arguments(seed, grid, spacing_mm, {})  # before any folder or file is made
    out_dir = Path(out_dir)
    manifest = Path(manifest_path) if manifest_path is not None else out_dir / "data_manifest.csv"
    seeds, splits = case_seeds(seed, n), split_labels(seed, n, n_test)
    width = max(3, len(str(n - 1)))
    rows = []
    for index in tqdm(range(n), desc="phantom volumes", disable=not progress):
        case_id = f"phantom_{index:0{width}d}"
        volume, affine, landmarks, info = make_phantom_with_info(int(seeds[index]), grid, spacing_mm)
        image_path = out_dir / f"{case_id}.nii.gz"
        _atomic_write(image_path, _nifti_bytes(volume, affine, f"igrpn phantom seed={seeds[index]}"))
        row = {"case_id": case_id,
               "image": Path(os.path.relpath(image_path.resolve(), manifest.parent.resolve())).as_posix(),
               "split": splits[index]}
        for name, point in zip(LANDMARKS, landmarks):
            row.update({f"{name}_{axis}": f"{value:.4f}" for axis, value in zip("xyz", point)})
        row.update({"source": "phantom", "seed": int(seeds[index]), "notes": info.notes})
        rows.append(row)
    _atomic_write(manifest, _manifest_bytes(rows))
    return manifest


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        missing = [c for c in MANIFEST_COLUMNS[:3 + 3 * NUM_LANDMARKS] if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: manifest lacks columns {missing}")
        return list(reader)


def _compare_manifests(old_path: Path, new_path: Path) -> None:
    """``ValueError`` naming the first difference between two phantom manifests."""
    old, new = _read_rows(old_path), _read_rows(new_path)
    if len(old) != len(new):
        raise ValueError(f"{old_path}: lists {len(old)} volumes but the profile's phantom has {len(new)}; "
                         "delete the manifest (or pass another path) to regenerate")
    for a, b in zip(old, new):
        for column in ("case_id", "split", "seed"):
            if str(a.get(column, "")).strip() != str(b.get(column, "")).strip():
                raise ValueError(f"{old_path}: case {a['case_id']}: {column} {a.get(column)!r} differs from the "
                                 f"regenerated {b.get(column)!r}; delete the manifest to regenerate")
        old_image = (old_path.parent / a["image"]).resolve()
        new_image = (new_path.parent / b["image"]).resolve()
        if old_image != new_image:
            raise ValueError(f"{old_path}: case {a['case_id']}: image {old_image} is not where the profile "
                             f"generates it ({new_image}); pass data_dir or delete the manifest")
        for column in MANIFEST_COLUMNS[3:3 + 3 * NUM_LANDMARKS]:
            if abs(float(a[column]) - float(b[column])) > 1e-3:
                raise ValueError(f"{old_path}: case {a['case_id']}: {column} {a[column]} != regenerated "
                                 f"{b[column]}; the phantom generator changed since the manifest was written")


def ensure_dataset(manifest_path, profile, data_dir=None, progress: bool = True) -> Path:
    """Return ``manifest_path`` once it and every image it lists exist, generating them if needed.

    Generates the profile's phantom (``phantom_n``, ``phantom_n_test``, ``phantom_grid``,
    ``phantom_spacing_mm``; seed 0) into ``data_dir``. By default that is ``profile.data_dir``
    relative to the manifest's folder, or the manifest's folder itself when it already is that
    folder (e.g. ``build/smoke/data/data_manifest.csv`` for ``data_dir="build/smoke/data"``).
    When a manifest already existed (e.g. the committed one with its images missing), the
    regenerated rows must equal it, else ``ValueError``; it is then kept as it was.

    Args:
        manifest_path: the manifest to return (written when missing).
        profile: a ``config.Profile``.
        data_dir: folder of the volumes; see above for the default.
        progress: show a tqdm progress bar while generating.

    Returns:
        ``manifest_path`` as a ``Path``.
    """
    manifest = Path(manifest_path)
    existed = manifest.exists()
    if existed:
        rows = _read_rows(manifest)
        if rows and all((manifest.parent / row["image"]).exists() for row in rows):
            return manifest
    if data_dir is None:
        relative = Path(profile.data_dir)
        folder = manifest.parent.resolve()
        inside = not relative.is_absolute() and folder.parts[-len(relative.parts):] == relative.parts
        data_dir = folder if inside else manifest.parent / relative
    data_dir = Path(data_dir)
    target = manifest.with_name(f".{manifest.name}.regenerated.tmp") if existed else manifest
    try:
        generate_dataset(data_dir, n=profile.phantom_n, seed=0, n_test=profile.phantom_n_test,
                         grid=profile.phantom_grid, spacing_mm=profile.phantom_spacing_mm,
                         manifest_path=target, progress=progress)
        if existed:
            _compare_manifests(manifest, target)
    finally:
        if existed:
            target.unlink(missing_ok=True)
    return manifest


def command_manifest(profile_name: str, manifest=None, progress: bool = True) -> Path:
    """The manifest a command reads (``igrpn train``, ``igrpn evaluate``).

    A user's own ``manifest`` is returned as given: it is never generated over (reading it names
    what is missing). Without one, the profile's own data set (``reproduce.default_manifest``) is
    returned, generated with a progress bar when missing, as ``make reproduce`` does
    (:func:`ensure_dataset`), so every command works from a fresh clone.
    """
    if manifest is not None:
        return Path(manifest)
    from igrpn.config import get_profile
    from igrpn.reproduce import default_manifest

    return ensure_dataset(default_manifest(profile_name), get_profile(profile_name), progress=progress)


# ------------------------------------------------------------------------------ command line

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The generator's command-line options (shared by ``python -m igrpn.phantom`` and
    ``igrpn phantom``)."""
    parser.add_argument("--out", default="data/phantom", help="folder of the volumes (default: %(default)s)")
    parser.add_argument("--n", type=int, default=152, help="number of volumes (default: %(default)s)")
    parser.add_argument("--n-test", type=int, default=32, help="test volumes among them (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (default: %(default)s)")
    parser.add_argument("--grid", type=int, default=128, help="voxels per edge (default: %(default)s)")
    parser.add_argument("--spacing", type=float, default=1.3, help="voxel edge in mm (default: %(default)s)")
    parser.add_argument("--manifest", default=None, help="manifest path (default: OUT/data_manifest.csv)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def check_manifest_path(out_dir, manifest_path) -> None:
    """Refuse a ``--manifest`` whose folder does not exist (unless it is ``--out``, which is created).

    As in every igrpn command, a folder given as a folder (``--out``) is created, but the folder
    of an output file is not: a mistyped path fails instead of scattering files.

    Raises:
        ValueError naming the manifest and the missing folder.
    """
    if manifest_path is None:
        return
    manifest = Path(manifest_path)
    folder = manifest.absolute().parent
    if manifest.is_dir():
        raise ValueError(f"{manifest}: cannot write the manifest: it is a directory")
    if not folder.is_dir() and folder != Path(out_dir).absolute():
        raise ValueError(f"{manifest}: cannot write the manifest: directory {folder} does not exist "
                         "(the folder of an output file is not created; create it first)")


def main(argv=None) -> None:
    """``python -m igrpn.phantom --out data/phantom --n 152 --seed 0``."""
    parser = add_arguments(argparse.ArgumentParser(prog="python -m igrpn.phantom",
                                                   description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        check_manifest_path(args.out, args.manifest)
        path = generate_dataset(args.out, n=args.n, seed=args.seed, n_test=args.n_test, grid=args.grid,
                                spacing_mm=args.spacing, manifest_path=args.manifest, progress=not args.quiet)
    except ValueError as error:
        parser.error(str(error))
    print(path)


if __name__ == "__main__":
    main()
