"""The phantom's anatomy: the fetus's head and face, its hands, feet and cord, and the uterus.

Everything here is built from ``shapes`` in a canonical face frame (x = fetal right, y =
anterior, z = superior, origin midway between the eye centres; right-handed, so the face is
never mirrored), except the uterus, which is built in the world frame around the posed head.
Random draws come from the stream each builder is given, in a fixed order, so the same seed
gives the same fetus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from igrpn.phantom.records import PhantomOptions
from igrpn.phantom.shapes import MATERIAL_ID, capsule, ellipsoid, first_hit, halfspace, rot_x, rot_z, Shape, sphere

#: Direction (face frame) from the chin's soft-tissue centre to its skin point (gnathion).
_CHIN_DIR = np.array([0.0, 0.55, -0.835]) / np.linalg.norm([0.0, 0.55, -0.835])
#: Normal of the plane behind the orbits that cuts the brain and opens the vault over the face.
_CUT_NORMAL = np.array([0.0, 0.766, -0.643])


# ------------------------------------------------------------------------------ the subject

@dataclass
class Subject:
    """One fetus in its face frame (mm): shapes in painting order, landmarks, anchor points."""

    scale: float
    shapes: list
    landmarks: np.ndarray  # (5, 3)
    skull_centre: np.ndarray
    skull_semi: np.ndarray
    anchors: list  # (name, point (3,), outward unit normal (3,)) where distractors touch the face
    hull: list  # ellipsoids enclosing the head and trunk (for keeping the cord outside)


@dataclass(frozen=True)
class _Features:
    """The drawn size and place of the skull and of every landmark's feature (face frame, mm).

    brow, nose and chin are the centres the skin landmarks are measured from (``_measure_landmarks``).
    """

    scale: float
    skull_centre: np.ndarray
    skull_semi: np.ndarray  # outer skull surface
    eye_radius: float
    left_eye: np.ndarray
    right_eye: np.ndarray
    brow: np.ndarray
    nose: np.ndarray
    chin: np.ndarray

    @property
    def skull_thick(self) -> float:
        return 1.4 + 0.8 * self.scale

    @property
    def eye_plane_y(self) -> float:
        return 0.5 * (self.left_eye[1] + self.right_eye[1])

    @property
    def half_sep(self) -> float:
        return 0.5 * abs(self.right_eye[0] - self.left_eye[0])

    @property
    def nasion(self) -> np.ndarray:
        s, brow, nose = self.scale, self.brow, self.nose
        return np.array([0.5 * (brow[0] + nose[0]), brow[1] - 1.8 * s, brow[2] - 3 * s])

    @property
    def bridge_end(self) -> np.ndarray:
        """Lower end of the nasal bridge, above and behind the nose tip."""
        return self.nose + [0, -3.5 * self.scale, 4.5 * self.scale]

    @property
    def cut_offset(self) -> float:
        """Offset (along ``_CUT_NORMAL``, from the skull centre) of the plane behind the orbits."""
        return float(_CUT_NORMAL @ (np.array([0.0, 0.0, 3.5 * self.scale]) - self.skull_centre))


def _jitter(rng: np.random.Generator, jit: float) -> np.ndarray:
    """A feature's own displacement (3,): normal with sd ``jit`` mm, clipped at 2.5 sd."""
    return np.clip(rng.normal(0.0, jit, 3), -2.5 * jit, 2.5 * jit) if jit > 0 else np.zeros(3)


def _draw_skull(rng: np.random.Generator, s: float) -> tuple[np.ndarray, np.ndarray]:
    """(centre, semi-axes) of the outer skull surface: BPD 50-80 mm, OFD 65-105 mm."""
    bpd = float(np.clip(66.0 * s * rng.uniform(0.93, 1.07), 50.0, 80.0))
    ofd = float(np.clip(84.0 * s * rng.uniform(0.93, 1.07), 65.0, 105.0))
    height = 72.0 * s * rng.uniform(0.95, 1.05)
    skull_semi = np.array([bpd / 2, ofd / 2, height / 2])
    skull_centre = np.array([0.0, 6.0 * s - skull_semi[1], 14.0 * s])
    return skull_centre, skull_semi


def _draw_eyes(rng: np.random.Generator, s: float, jit: float) -> tuple[float, np.ndarray, np.ndarray]:
    """(radius, left centre, right centre): ocular diameter 8-14 mm, centres 20-33 mm apart,
    each jittered on its own."""
    eye_radius = float(np.clip(5.3 * s * rng.uniform(0.9, 1.1), 4.0, 7.0))
    separation = 26.5 * s * rng.uniform(0.94, 1.06)
    left_eye = np.array([-separation / 2, 0.0, 0.0]) + _jitter(rng, jit)
    right_eye = np.array([separation / 2, 0.0, 0.0]) + _jitter(rng, jit)
    gap = right_eye - left_eye
    distance = float(np.linalg.norm(gap))
    if not 20.0 <= distance <= 33.0:  # keep the separation in the biometric range
        mid, target = 0.5 * (left_eye + right_eye), float(np.clip(distance, 20.0, 33.0))
        left_eye, right_eye = mid - 0.5 * target * gap / distance, mid + 0.5 * target * gap / distance
    return eye_radius, left_eye, right_eye


def _draw_midline(rng: np.random.Generator, s: float, jit: float, eye_plane_y: float,
                  eye_radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(brow, nose, chin) feature centres on the face's midline, each jittered on its own."""
    # Brow / glabella: a few mm above the eye line, on the skin between the eyes.
    j = _jitter(rng, jit)
    brow = np.array([j[0], eye_plane_y + eye_radius + 4.2 * s * rng.uniform(0.85, 1.15) + 0.5 * j[1],
                     float(np.clip(5.0 * s * rng.uniform(0.7, 1.3) + j[2], 2.5, 9.0))])
    # Nose tip: 15-25 mm below the glabella, 8-15 mm in front of the eye plane.
    j = _jitter(rng, jit)
    nose = np.array([j[0], eye_plane_y + float(np.clip(12.0 * s * rng.uniform(0.85, 1.15) + j[1], 8.0, 15.0)),
                     brow[2] - float(np.clip(20.0 * s * rng.uniform(0.88, 1.12) + j[2], 15.0, 25.0))])
    # Chin (soft-tissue gnathion): 30-45 mm below the glabella, set back from the nose tip.
    j = _jitter(rng, jit)
    chin = np.array([j[0], nose[1] - max(6.0 * s * rng.uniform(0.6, 1.5) + j[1], 2.5),
                     brow[2] - float(np.clip(37.0 * s * rng.uniform(0.9, 1.1) + j[2], 30.0, 45.0))])
    return brow, nose, chin


def _draw_features(rng: np.random.Generator, options: PhantomOptions) -> _Features:
    """Draw the gestational scale, then skull, eyes and midline features, in that order."""
    s = float(rng.uniform(*options.scale_range))
    jit = options.jitter_mm
    skull_centre, skull_semi = _draw_skull(rng, s)
    eye_radius, left_eye, right_eye = _draw_eyes(rng, s, jit)
    brow, nose, chin = _draw_midline(rng, s, jit, 0.5 * (left_eye[1] + right_eye[1]), eye_radius)
    return _Features(s, skull_centre, skull_semi, eye_radius, left_eye, right_eye, brow, nose, chin)


def _trunk(s: float) -> list[Shape]:
    """Trunk and neck, behind and below the chin."""
    soft = MATERIAL_ID["soft_tissue"]
    return [ellipsoid([0, -24 * s, -88 * s], [30 * s, 26 * s, 38 * s], soft, skin=True),
            capsule([0, -16 * s, -24 * s], [0, -26 * s, -70 * s], 15 * s, 15 * s, soft, skin=True)]


def _head_skin(f: _Features) -> list[Shape]:
    """Scalp over the skull, the soft tissue of the face, cheeks and ears."""
    soft, s, half_sep = MATERIAL_ID["soft_tissue"], f.scale, f.half_sep
    skull_centre, skull_semi = f.skull_centre, f.skull_semi
    skin = [ellipsoid(skull_centre, skull_semi + 2.0 * s, soft, skin=True),
            ellipsoid([0, -9 * s, -11 * s], [half_sep + 14 * s, 18.5 * s, 26 * s], soft, skin=True)]
    for side in (-1, 1):
        skin.append(ellipsoid([side * (half_sep + 2 * s), f.eye_plane_y - 1.5 * s, -11 * s],
                               [10 * s, 8 * s, 10 * s], soft, skin=True))  # cheek
        # Ear on the side of the head, where the skull surface is at (y, z) = (-22 s, -6 s).
        y, z = skull_centre[1] + 0.33 * skull_semi[1], -6.0 * s
        r2 = 1.0 - ((y - skull_centre[1]) / skull_semi[1]) ** 2 - ((z - skull_centre[2]) / skull_semi[2]) ** 2
        x = skull_semi[0] * math.sqrt(max(r2, 0.05)) + 2.5 * s
        skin.append(ellipsoid([side * x, y, z], [3 * s, 7 * s, 10 * s], soft, skin=True))
    return skin


def _brow_and_eyelid_skin(f: _Features) -> list[Shape]:
    """The brow ridge (its front is the glabella) and the closed eyelids."""
    soft, s, brow, eye_radius = MATERIAL_ID["soft_tissue"], f.scale, f.brow, f.eye_radius
    skin = [ellipsoid([brow[0], brow[1] - 7 * s, brow[2] - 0.5 * s], [f.half_sep + 8 * s, 7 * s, 5.5 * s],
                       soft, skin=True)]
    for centre in (f.left_eye, f.right_eye):  # closed eyelids, ~1.8 mm in front of the eyeball
        lid_semi = [eye_radius + 2 * s, eye_radius + 0.6 * s, eye_radius + 1.5 * s]
        skin.append(ellipsoid(centre + [0, 1.2 * s, 0.3 * s], lid_semi, soft, skin=True))
    return skin


def _nose_skin(f: _Features) -> list[Shape]:
    """The nose (its front is the nose tip) and the nasal bridge."""
    soft, s = MATERIAL_ID["soft_tissue"], f.scale
    return [ellipsoid(f.nose - [0, 5 * s, 0], [6 * s, 5 * s, 6.5 * s], soft, skin=True),
            capsule(f.nasion, f.bridge_end, 3 * s, 3 * s, soft, skin=True)]


def _lips_and_chin_skin(f: _Features) -> list[Shape]:
    """Upper and lower lips, and the chin (its front is the soft-tissue gnathion)."""
    soft, s, nose = MATERIAL_ID["soft_tissue"], f.scale, f.nose
    upper_lip, lower_lip = nose + [-0.4 * nose[0], -7 * s, -7.5 * s], nose + [-0.6 * nose[0], -8.5 * s, -13.5 * s]
    return [ellipsoid(upper_lip, [8.5 * s, 4.5 * s, 3.5 * s], soft, skin=True),
            ellipsoid(lower_lip, [7.5 * s, 4.2 * s, 3.5 * s], soft, skin=True),
            ellipsoid(f.chin - 6.2 * s * _CHIN_DIR, [9 * s, 6 * s, 6.5 * s], soft, skin=True)]


def _mouth(f: _Features) -> Shape:
    """A thin disc of fluid between the lips."""
    s, nose = f.scale, f.nose
    return ellipsoid(nose + [-0.5 * nose[0], -7 * s, -10.8 * s], [6.5 * s, 5.5 * s, 0.6 * s], MATERIAL_ID["fluid"])


def _brain(f: _Features) -> list[Shape]:
    """Brain inside the vault, cut off in front of the plane behind the orbits; ventricles; falx."""
    s, skull_centre, cut = f.scale, f.skull_centre, f.cut_offset
    inner = f.skull_semi - f.skull_thick
    parts = [ellipsoid(skull_centre, inner, MATERIAL_ID["brain"], clips=((*_CUT_NORMAL, cut - 4 * s),))]
    for side in (-1, 1):
        # Lateral ventricle (fluid) with its bright choroid plexus.
        parts.append(ellipsoid(skull_centre + [side * 7 * s, 4 * s, 4 * s], [3.5 * s, 14 * s, 5 * s], MATERIAL_ID["csf"]))
        parts.append(ellipsoid(skull_centre + [side * 7 * s, 2 * s, 3 * s], [2.4 * s, 8 * s, 3 * s],
                                MATERIAL_ID["choroid"]))
    parts.append(ellipsoid(skull_centre, inner * 0.97, MATERIAL_ID["falx"],
                            clips=((1, 0, 0, 0.5), (-1, 0, 0, 0.5), (*_CUT_NORMAL, cut - 6 * s))))
    return parts


def _skull(f: _Features) -> list[Shape]:
    """The vault (open over the face) and the skull base, a plate along the brain's cut face."""
    s, skull_centre, cut, thick = f.scale, f.skull_centre, f.cut_offset, f.skull_thick
    base_offset = cut - 4 * s - 1.0
    return [ellipsoid(skull_centre, f.skull_semi - 0.5 * thick, MATERIAL_ID["bone"], shell=thick,
                       clips=((*_CUT_NORMAL, cut),)),
            ellipsoid(skull_centre, (f.skull_semi - thick) * 0.98, MATERIAL_ID["thin_bone"],
                       clips=((*_CUT_NORMAL, base_offset + 1.0), (*(-_CUT_NORMAL), -base_offset + 1.0)))]


def _orbits(f: _Features) -> list[Shape]:
    """Per side: the brow bone, the bony orbit rim (open in front) and the cheek bone."""
    bone, s, brow, half_sep = MATERIAL_ID["bone"], f.scale, f.brow, f.half_sep
    bones = []
    for side, centre in ((-1, f.left_eye), (1, f.right_eye)):
        bones.append(capsule(brow + [0, -3.2 * s, -0.5 * s],
                              [side * (half_sep + 7 * s), brow[1] - 7 * s, brow[2] - 1.5 * s], 1.2, 1.2, bone))
        rim = f.eye_radius + 1.6 * s
        bones.append(sphere(centre, rim, bone, shell=1.3, clips=((0, 1, 0, 0.35 * rim),)))
        bones.append(capsule(centre + [side * 2 * s, 1 * s, -6.5 * s], centre + [side * 13 * s, -9 * s, -4 * s],
                              1.2, 1.2, bone))
    return bones


def _nasal_bone(f: _Features) -> list[Shape]:
    """The nasal bone, under the upper half of the bridge's skin."""
    s, nasion = f.scale, f.nasion
    bone_r = 0.8 * math.sqrt(s)
    return [capsule(nasion + [0, 1.2 * s, 0], nasion + 0.45 * (f.bridge_end - nasion) + [0, 1.2 * s, 0],
                     bone_r, bone_r, MATERIAL_ID["bone"])]


def _jaws(f: _Features) -> list[Shape]:
    """The upper jaw (a curved plate), the mandible (a parabola of capsules) and its two rami."""
    bone, s, nose = MATERIAL_ID["bone"], f.scale, f.nose
    bones = [ellipsoid(nose + [-0.5 * nose[0], -14 * s, -6 * s], [13 * s, 10 * s, 5 * s], bone, shell=1.4,
                        clips=((0, -1, 0, -3 * s), (0, 0, 1, 2.5 * s), (0, 0, -1, 2.5 * s)))]
    symphysis = f.chin - 3.5 * s * _CHIN_DIR
    u = np.linspace(-1.0, 1.0, 9)
    jaw = symphysis + np.stack([22 * s * u, -26 * s * u**2, 9 * s * u**2], axis=1)
    jaw_r = 1.3 * math.sqrt(s)
    for a, b in zip(jaw[:-1], jaw[1:]):
        bones.append(capsule(a, b, jaw_r, jaw_r, bone))
    for end, side in ((jaw[0], -1), (jaw[-1], 1)):
        bones.append(capsule(end, end + [side * 1 * s, -4 * s, 17 * s], 1.6, 1.6, bone))
    return bones


def _spine(s: float) -> list[Shape]:
    """Thirteen vertebral bodies from the base of the skull down the trunk."""
    spine_top, spine_bottom = np.array([0, -32 * s, -26 * s]), np.array([0, -44 * s, -110 * s])
    return [ellipsoid(spine_top + t * (spine_bottom - spine_top), [3 * s, 3 * s, 2.2 * s], MATERIAL_ID["bone"])
            for t in np.linspace(0.0, 1.0, 13)]


def _eyes(f: _Features) -> list[Shape]:
    """Hypoechoic globes, each with a small bright lens ring near its front."""
    eyes = []
    for centre in (f.left_eye, f.right_eye):
        eyes.append(sphere(centre, f.eye_radius, MATERIAL_ID["vitreous"]))
        lens_r = 1.2 * math.sqrt(f.scale)
        eyes.append(sphere(centre + [0, f.eye_radius - lens_r - 0.3, 0], lens_r, MATERIAL_ID["lens"], shell=0.7))
    return eyes


def _measure_landmarks(skin_shapes, f: _Features) -> np.ndarray:
    """(5, 3) landmarks in ``LANDMARKS`` order: the eye centres, and where rays from in front of
    the brow, nose and chin first meet the skin."""
    far, brow, nose, chin = 60.0 * f.scale, f.brow, f.nose, f.chin
    glabella = first_hit(skin_shapes, np.array([brow[0], brow[1] + far, brow[2]]), [0, -1, 0], 2 * far)
    nose_tip = first_hit(skin_shapes, np.array([nose[0], nose[1] + far, nose[2]]), [0, -1, 0], 2 * far)
    chin_pt = first_hit(skin_shapes, chin + far * _CHIN_DIR, -_CHIN_DIR, 2 * far)
    return np.stack([f.left_eye, glabella, f.right_eye, nose_tip, chin_pt])


def _anchors(f: _Features) -> list:
    """(name, point, outward unit normal) where a hand, foot or the cord may touch the face."""
    s, half_sep, nose, eye_radius, skull_semi = f.scale, f.half_sep, f.nose, f.eye_radius, f.skull_semi
    anchors = [
        ("cheek", np.array([-(half_sep + 4 * s), 6 * s, -12 * s]), np.array([-0.6, 0.8, 0.0])),
        ("cheek", np.array([half_sep + 4 * s, 6 * s, -12 * s]), np.array([0.6, 0.8, 0.0])),
        ("mouth", nose + [0, -6 * s, -10 * s], np.array([0.0, 1.0, -0.2])),
        ("chin", f.chin.copy(), _CHIN_DIR.copy()),
        ("eye", f.left_eye + [0, eye_radius + 2 * s, 0], np.array([-0.2, 1.0, 0.1])),
        ("eye", f.right_eye + [0, eye_radius + 2 * s, 0], np.array([0.2, 1.0, 0.1])),
        ("forehead", np.array([0.0, 8 * s, 18 * s]), np.array([0.0, 0.7, 0.7])),
        ("side", np.array([-(skull_semi[0] + 3 * s), -15 * s, -4 * s]), np.array([-1.0, 0.2, 0.0])),
        ("side", np.array([skull_semi[0] + 3 * s, -15 * s, -4 * s]), np.array([1.0, 0.2, 0.0])),
    ]
    return [(name, p, n / np.linalg.norm(n)) for name, p, n in anchors]


def _hull(scalp: Shape, trunk: Shape, neck: Shape, landmarks: np.ndarray, s: float) -> list[Shape]:
    """Ellipsoids enclosing scalp, face, trunk and neck, which the cord is kept out of."""
    soft = MATERIAL_ID["soft_tissue"]
    face_centre = landmarks.mean(axis=0)
    face_radius = float(np.max(np.linalg.norm(landmarks - face_centre, axis=1)))
    # The hull holds ellipsoids only: the neck capsule as its enclosing ellipsoid.
    neck_hull = ellipsoid(neck.centre, [neck.size[0] + neck.size[1], neck.size[1], neck.size[1]], soft,
                           axes=neck.axes)
    return [scalp, sphere(face_centre, face_radius + 6.0 * s, soft), trunk, neck_hull]


def build_subject(rng: np.random.Generator, options: PhantomOptions) -> Subject:
    """Draw one fetus: sizes, shape variation, every feature and the five landmarks (face frame).

    Shapes are listed in painting order (a later shape covers an earlier one): trunk and neck,
    skin, mouth, brain, bones, eyes.
    """
    f = _draw_features(rng, options)
    body = _trunk(f.scale)
    skin = _head_skin(f) + _brow_and_eyelid_skin(f) + _nose_skin(f) + _lips_and_chin_skin(f)
    bones = _skull(f) + _orbits(f) + _nasal_bone(f) + _jaws(f) + _spine(f.scale)
    shapes = body + skin + [_mouth(f)] + _brain(f) + bones + _eyes(f)
    landmarks = _measure_landmarks([sh for sh in shapes if sh.skin], f)
    hull = _hull(skin[0], body[0], body[1], landmarks, f.scale)
    return Subject(f.scale, shapes, landmarks, f.skull_centre, f.skull_semi, _anchors(f), hull)


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
        flesh.append(capsule(start, end, flesh_r, 0.9 * flesh_r, soft))
        trim = min(0.7, 0.3 * length)
        bones.append(capsule(start + trim * direction, end - trim * direction, bone_r, bone_r, bone))
        start = end
    return flesh, bones


def build_hand(rng: np.random.Generator, s: float, anchor: np.ndarray, outward: np.ndarray):
    """A fist or open hand with forearm near ``anchor`` (face frame).

    Returns (shapes in painting order, ``;``-separated tags, the soft-tissue shapes).
    """
    soft, bone = MATERIAL_ID["soft_tissue"], MATERIAL_ID["bone"]
    palm_normal = -outward + 0.5 * _random_unit(rng)
    palm_normal /= np.linalg.norm(palm_normal)
    u = _perpendicular(rng, palm_normal)  # finger direction
    w = np.cross(u, palm_normal)
    fist = rng.random() < 0.6
    gap = rng.uniform(-3.0, 8.0)  # < 0: pressed into the face, occluding part of it
    centre = anchor + outward * (4.5 * s + gap)
    axes = np.stack([u, palm_normal, w])
    flesh = [ellipsoid(centre, [8.5 * s, 4.5 * s, 8 * s], soft, axes=axes)]
    bones = []
    for k, factor in enumerate((0.9, 1.0, 0.95, 0.8)):
        knuckle = centre + u * 7.5 * s + w * (-4.8 + 3.2 * k) * s
        bones.append(capsule(centre - u * 6 * s + w * (-3.8 + 2.6 * k) * s, knuckle - u * 1.2 * s, 0.9, 0.9, bone))
        bones.append(sphere(knuckle, 1.3 * s, bone))
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
    flesh.append(capsule(wrist, elbow, 6 * s, 7.5 * s, soft))
    side = np.cross(arm_dir, palm_normal)
    side /= np.linalg.norm(side)
    for offset in (-2.5, 2.5):
        bones.append(capsule(wrist + arm_dir * 2 + side * offset * s, elbow + side * offset * s, 1.0, 1.1, bone))
    tag = ("hand-fist" if fist else "hand-open") + (";touching-face" if gap < 1.0 else "")
    return flesh + bones, tag, flesh


def build_foot(rng: np.random.Generator, s: float, anchor: np.ndarray, outward: np.ndarray):
    """A foot with lower leg near ``anchor`` (face frame); returns like ``build_hand``."""
    soft, bone = MATERIAL_ID["soft_tissue"], MATERIAL_ID["bone"]
    dorsal = outward + 0.6 * _random_unit(rng)
    dorsal /= np.linalg.norm(dorsal)
    u = _perpendicular(rng, dorsal)  # heel -> toes
    w = np.cross(u, dorsal)
    gap = rng.uniform(0.0, 12.0)
    centre = anchor + outward * (6.5 * s + gap)
    flesh = [ellipsoid(centre, [21 * s, 6 * s, 8 * s], soft, axes=np.stack([u, dorsal, w]))]
    bones = [ellipsoid(centre - u * 15 * s, [6 * s, 4 * s, 3.5 * s], bone, axes=np.stack([u, dorsal, w]))]
    for k in range(5):
        lateral = (-5.0 + 2.5 * k) * s
        bones.append(capsule(centre - u * 5 * s + w * 0.7 * lateral, centre + u * 11 * s + w * lateral,
                              0.8, 0.8, bone))  # metatarsal
        toe = centre + u * (18.5 - 0.6 * abs(k - 1)) * s + w * 1.05 * lateral
        flesh.append(ellipsoid(toe, [2.6 * s, 2.2 * s, 2.2 * s], soft, axes=np.stack([u, dorsal, w])))
        bones.append(capsule(toe - u * 1.2 * s, toe + u * 1.0 * s, 0.6, 0.6, bone))
    ankle = centre - u * 12 * s + dorsal * 4 * s
    leg_dir = dorsal + 0.3 * _random_unit(rng)
    leg_dir /= np.linalg.norm(leg_dir)
    knee = ankle + leg_dir * rng.uniform(35, 50) * s
    flesh.append(capsule(ankle, knee, 7 * s, 8 * s, soft))
    side = np.cross(leg_dir, u)
    side /= np.linalg.norm(side)
    bones.append(capsule(ankle + leg_dir * 3 - side * 1.5 * s, knee - side * 1.5 * s, 1.4, 1.6, bone))
    bones.append(capsule(ankle + leg_dir * 3 + side * 3 * s, knee + side * 3 * s, 0.8, 0.9, bone))
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


def build_cord(rng: np.random.Generator, s: float, anchor: np.ndarray, outward: np.ndarray, hull):
    """Umbilical cord (jelly, two arteries and a vein twisting round it) passing near ``anchor``.

    The centre line is pushed out of the ``hull`` ellipsoids (head, face, trunk), so the cord may
    wrap round the fetus but not run through it. Returns like ``build_hand``.
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
    jelly = [capsule(a, b, radius, radius, MATERIAL_ID["cord_jelly"]) for a, b in zip(line[:-1], line[1:])]
    walls, lumens = [], []
    for k, lumen_r in enumerate((1.6, 1.6, 2.8)):  # two arteries, one vein
        phase = twist + 2 * math.pi * k / 3
        path = line + offset * (np.cos(phase)[:, None] * normal + np.sin(phase)[:, None] * binormal)
        for a, b in zip(path[:-1], path[1:]):
            walls.append(capsule(a, b, lumen_r + 0.6, lumen_r + 0.6, MATERIAL_ID["vessel_wall"]))
            lumens.append(capsule(a, b, lumen_r, lumen_r, MATERIAL_ID["blood"]))
    return jelly + walls + lumens, "cord", jelly


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
            shapes.append(halfspace(normal * depth, -normal, material, waves))
        else:
            shapes.append(halfspace(normal * (depth + 0.5 * thickness), -normal, material, waves, shell=thickness))
            depth += thickness
    return shapes


def build_uterus(rng: np.random.Generator, head_world, options: PhantomOptions):
    """Uterine walls, maternal abdominal wall and placenta around the head (world). -> (shapes, tags)"""
    tags = []
    tilt, azimuth = rng.uniform(0, 15), rng.uniform(0, 360)
    up = rot_z(azimuth) @ rot_x(tilt) @ np.array([0.0, 0.0, 1.0])  # towards the probe
    near_gap = rng.uniform(1.5, 6.0) if rng.random() < 0.35 else rng.uniform(6.0, 30.0)
    top = max(shape.support(up) for shape in head_world)
    placenta = rng.random() < options.placenta_prob
    site = rng.choice(["anterior", "posterior", "lateral"], p=[0.35, 0.4, 0.25])
    placenta_thick = rng.uniform(18.0, 32.0)
    waves = _waves(rng, (1.0, 5.0))
    myo, fat = rng.uniform(7, 14), rng.uniform(8, 20)
    anterior = [(MATERIAL_ID["myometrium"], myo), (MATERIAL_ID["fascia"], 1.2), (MATERIAL_ID["fat"], fat), (MATERIAL_ID["fascia"], 1.2),
                (MATERIAL_ID["myometrium"], 0)]
    if placenta and site == "anterior":
        anterior = [(MATERIAL_ID["placenta"], placenta_thick)] + anterior
    shapes = _layers(top + near_gap, up, anterior, waves)
    if placenta and site == "anterior":
        shapes.append(halfspace(up * (top + near_gap + 0.5), -up, MATERIAL_ID["chorionic_plate"], waves, shell=1.2))

    # The far wall (with the placenta when posterior), and a lateral placenta.
    down = rot_z(rng.uniform(0, 360)) @ rot_x(rng.uniform(0, 20)) @ np.array([0.0, 0.0, -1.0])
    lateral = rot_z(rng.uniform(0, 360)) @ rot_x(rng.uniform(60, 90)) @ np.array([0.0, 0.0, 1.0])
    far_gap, side_gap = rng.uniform(-3.0, 30.0), rng.uniform(-3.0, 15.0)
    far_waves, side_waves = _waves(rng, (1.0, 5.0)), _waves(rng, (1.0, 5.0))
    far = [(MATERIAL_ID["myometrium"], rng.uniform(7, 14)), (MATERIAL_ID["fat"], 0)]
    if placenta and site == "posterior":
        far = [(MATERIAL_ID["placenta"], placenta_thick)] + far
    start = max(shape.support(down) for shape in head_world) + far_gap
    shapes += _layers(start, down, far, far_waves)
    if placenta and site == "posterior":
        shapes.append(halfspace(down * (start + 0.5), -down, MATERIAL_ID["chorionic_plate"], far_waves, shell=1.2))
    if placenta and site == "lateral":
        start = max(shape.support(lateral) for shape in head_world) + side_gap
        shapes += _layers(start, lateral, [(MATERIAL_ID["placenta"], placenta_thick), (MATERIAL_ID["myometrium"], 0)], side_waves)
        shapes.append(halfspace(lateral * (start + 0.5), -lateral, MATERIAL_ID["chorionic_plate"], side_waves, shell=1.2))
    if placenta:
        tags.append(f"placenta-{site}")
    if near_gap < 6.0:
        tags.append("wall-close")
    return shapes, tags
