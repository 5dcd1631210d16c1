"""Image formation: paint the scene's shapes into property maps, then make the ultrasound image.

Painting (``paint``) blends every shape's material, with sub-voxel coverage, into five maps
(echo level, acoustic impedance, attenuation, bone density, texture strength) on the ``Grid``.
``form_image`` then works along the beam (array axis k; the probe's apex sits above the volume,
at high z, and the beam runs towards -z): attenuation with partial time-gain compensation,
acoustic shadowing behind bone (``_beam_cumsum``), specular echoes at interfaces facing the beam,
complex Gaussian scatterers convolved with an anisotropic, depth-dependent point-spread function
(``_gaussian_taps``, ``_convolve_axis``), envelope, log compression, and the fan-shaped field of
view (``_fan_mask``). ``draw_imaging`` draws the scanner settings of one volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from igrpn.phantom.records import PhantomOptions
from igrpn.phantom.shapes import AMP, ATTEN, BONE, IMPEDANCE, PROPERTIES, TEXTURE, Shape


# ------------------------------------------------------------------------------------ painting

@dataclass(frozen=True)
class Grid:
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


def _index_range(low_mm: float, high_mm: float, grid: Grid) -> slice:
    """Voxel indices whose centres lie in [low_mm, high_mm] (grown by one voxel)."""
    origin = -0.5 * (grid.size - 1) * grid.spacing
    start = max(int(math.floor((low_mm - origin) / grid.spacing)) - 1, 0)
    stop = min(int(math.ceil((high_mm - origin) / grid.spacing)) + 2, grid.size)
    return slice(start, max(stop, start))


def _bounding_slices(shape: Shape, grid: Grid) -> tuple[slice, slice, slice]:
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


def paint(maps: np.ndarray, labels: np.ndarray, shape: Shape, grid: Grid) -> None:
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
    region += alpha * (PROPERTIES[shape.material][:, None, None, None] - region)
    labels[box][alpha >= 0.5] = shape.material


# ---------------------------------------------------------------------------- image formation

def _smooth_noise(rng: np.random.Generator, grid: Grid, correlation_mm: float) -> np.ndarray:
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


def draw_imaging(rng: np.random.Generator, grid: Grid) -> dict:
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


def in_fan(points: np.ndarray, imaging: dict, margin: float = 0.0) -> np.ndarray:
    """(N,) bool: points (N, 3) world mm inside the fan by at least ``margin`` mm."""
    d = points - imaging["apex_mm"]
    depth = -d[:, 2]
    tan_lat, tan_elev = (math.tan(math.radians(a)) for a in imaging["fan_half_angles_deg"])
    return ((np.abs(d[:, 0]) + margin <= tan_lat * depth) & (np.abs(d[:, 1]) + margin <= tan_elev * depth)
            & (np.linalg.norm(d, axis=1) + margin <= imaging["max_depth_mm"]))


def _fan_mask(grid: Grid, imaging: dict) -> np.ndarray:
    """(X, Y, Z) bool: voxels inside the fan-shaped field of view."""
    x = grid.coords
    dx = (x - imaging["apex_mm"][0])[:, None, None]
    dy = (x - imaging["apex_mm"][1])[None, :, None]
    depth = (imaging["apex_mm"][2] - x)[None, None, :]
    tan_lat, tan_elev = (math.tan(math.radians(a)) for a in imaging["fan_half_angles_deg"])
    return ((np.abs(dx) <= tan_lat * depth) & (np.abs(dy) <= tan_elev * depth)
            & (dx**2 + dy**2 + depth**2 <= imaging["max_depth_mm"] ** 2))


def form_image(maps: np.ndarray, grid: Grid, imaging: dict, rng: np.random.Generator,
                options: PhantomOptions) -> np.ndarray:
    """Ultrasound image (X, Y, Z) uint8 from the painted property maps (5, X, Y, Z)."""
    h = grid.spacing
    depth = (imaging["apex_mm"][2] - grid.coords)[None, None, :].astype(np.float32)  # (1, 1, Z) mm
    texture = _smooth_noise(rng, grid, 6.0)
    amplitude = maps[AMP] * np.exp(maps[TEXTURE] * texture)
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
    loss = imaging["attenuation_db_per_cm"] * (h / 10.0) * _beam_cumsum(maps[ATTEN])  # dB
    if options.shadows:  # in dB too: 20 log10(e) per neper
        loss += (2.0 * 20.0 / math.log(10.0) * imaging["shadow_per_mm"] * h) * _beam_cumsum(maps[BONE])
    loss = _convolve_axis(loss, _gaussian_taps(1.5 * sigma_lateral, unit_energy=False), 0, "edge")
    loss = _convolve_axis(loss, _gaussian_taps(1.5 * sigma_elevation, unit_energy=False), 1, "edge")
    gain = np.power(np.float32(10.0), (tgc_db - loss) / 20.0)
    # Specular echo where the impedance jumps along the beam (interfaces facing the probe), on
    # the voxel just past the jump; saturating in the jump: skin/fluid about -15 dB, bone -6 dB.
    impedance = maps[IMPEDANCE]
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
