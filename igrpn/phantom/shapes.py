"""The phantom's solid-geometry vocabulary: tissue materials and the shapes painted with them.

A ``Shape`` is an ellipsoid, a tapered capsule or an undulating half-space in its own local
frame, optionally hollowed to a shell and cut by half-spaces; it gives a signed distance, the
sub-voxel coverage used for painting, and a bounding box. The helpers build shapes from centres
and radii (``ellipsoid``, ``sphere``, ``capsule``, ``halfspace``), find where a ray enters
a union of shapes (``first_hit``, used to measure the skin landmarks), and rotate about the
axes (``rot_x``, ``rot_y``, ``rot_z``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np


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
#: Label value of each material name.
MATERIAL_ID = {name: index for index, name in enumerate(MATERIAL_NAMES)}
# Property vector of each material, painted into the maps: echo amplitude (linear), impedance,
# relative attenuation, bone density, texture strength. (materials, 5) float32.
PROPERTIES = np.array(
    [[10.0 ** (m.echo_db / 20.0), m.impedance, m.attenuation, m.bone, m.texture] for m in _MATERIALS],
    dtype=np.float32,
)
AMP, IMPEDANCE, ATTEN, BONE, TEXTURE = range(5)


# ------------------------------------------------------------------------------ shape geometry

@dataclass(frozen=True)
class Shape:
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

    def moved(self, rotation: np.ndarray, translation: np.ndarray) -> "Shape":
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


def ellipsoid(centre, semi, material, axes=None, **kwargs) -> Shape:
    """Ellipsoid with semi-axes ``semi`` (mm) along the rows of ``axes`` (identity by default)."""
    axes = np.eye(3) if axes is None else np.asarray(axes, dtype=np.float64)
    return Shape("ellipsoid", material, np.asarray(centre, dtype=np.float64), axes,
                  tuple(float(s) for s in semi), **kwargs)


def sphere(centre, radius, material, **kwargs) -> Shape:
    return ellipsoid(centre, (radius, radius, radius), material, **kwargs)


def capsule(start, end, r_start, r_end, material, **kwargs) -> Shape:
    """Rounded segment from ``start`` to ``end`` (mm) whose radius goes from r_start to r_end."""
    start, end = np.asarray(start, dtype=np.float64), np.asarray(end, dtype=np.float64)
    length = float(np.linalg.norm(end - start))
    axes = _frame_from_x(end - start) if length > 1e-9 else np.eye(3)
    return Shape("capsule", material, 0.5 * (start + end), axes,
                  (max(0.5 * length, 1e-6), float(r_start), float(r_end)), **kwargs)


def halfspace(point, outward, material, waves=(), shell=0.0) -> Shape:
    """Everything behind the plane through ``point`` with unit normal ``outward`` (its fluid side)."""
    axes = _frame_from_x(outward)[[1, 2, 0]]  # local z = outward
    return Shape("halfspace", material, np.asarray(point, dtype=np.float64), axes, (), shell=shell,
                  waves=tuple(waves))


def union_distance(shapes, points: np.ndarray) -> np.ndarray:
    """Signed distance (mm) of points (N, 3) to the union of ``shapes`` (same frame)."""
    best = np.full(len(points), np.inf)
    for shape in shapes:
        best = np.minimum(best, shape.signed_distance(*shape.to_local(points)))
    return best


def first_hit(shapes, start, direction, length: float, step: float = 0.05) -> np.ndarray:
    """First point (3,) where the ray ``start + t direction`` enters the union of ``shapes``."""
    direction = np.asarray(direction, dtype=np.float64) / np.linalg.norm(direction)
    t = np.arange(0.0, length, step)
    inside = union_distance(shapes, start + t[:, None] * direction) <= 0
    if not inside.any():
        raise ValueError("phantom anatomy: a landmark ray missed the skin (inconsistent geometry)")
    return start + t[int(np.argmax(inside))] * direction


# ------------------------------------------------------------------------------------ rotations

def rot_x(deg):
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])


def rot_y(deg):
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])


def rot_z(deg):
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])

