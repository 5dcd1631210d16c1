"""The phantom's public records: ``PhantomOptions`` (what a volume may contain, how hard it is)
and ``PhantomInfo`` (what made one volume)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["PhantomOptions", "PhantomInfo"]


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
