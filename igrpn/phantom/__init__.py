"""Synthetic fetal-face 3D ultrasound phantom: the default data set (docs/design.md §4, §9).

The paper's 152 volumes are private, so the package generates volumes that are hard in the ways
real 3D ultrasound of the fetal face is hard. One volume is made in four steps (sizes in mm):

1. **Anatomy** (``anatomy``, built from the shapes and materials of ``shapes``) in a canonical
   face frame — x = fetal right, y = anterior, z = superior, origin midway between the eye centres
   (right-handed, so the face is never mirrored). Skull shell, brain, hypoechoic eyes with lens
   rings and bony orbit rims, brow, nose with nasal bone, lips, chin with mandible, cheeks, ears,
   neck and trunk. A gestational scale factor (±20 %) sizes the subject and every landmark's
   feature is jittered on its own, so distance ratios vary. The five landmarks are measured on
   that anatomy: the eyeball centres, and the skin points of the brow (between the eyes), the
   nose tip and the chin.
2. **Scene** (``scene``): a random pose (any spin about the beam, tilts up to ±40°, shifts) with
   every landmark at least half its ground-truth box plus 2 mm inside the volume and the fan;
   amniotic fluid, uterine wall and placenta (often close to the face), the umbilical cord (whose
   cross-sections look like eyes), and a hand or foot near or touching the face in 55-60 % of
   volumes.
3. **Painting** (``imaging``): every shape is drawn with sub-voxel coverage into property maps
   (echo level, acoustic impedance, attenuation, bone density, texture strength).
4. **Image formation** (``imaging``) along the beam (array axis k; the probe's apex sits above the
   volume, at high z, and the beam runs towards -z): attenuation with partial time-gain
   compensation, acoustic shadowing behind bone, specular echoes at interfaces facing the beam,
   complex Gaussian scatterers convolved with an anisotropic, depth-dependent point-spread
   function (axis-aligned, so done as three 1-D convolutions), envelope, log compression to a
   40-60 dB dynamic range, and a fan-shaped field of view (zero outside).

The world frame is the volume's own: ``affine`` is a diagonal spacing with the volume centred on
the origin (RAS+), so world mm and voxel indices differ by a scale and a shift.

Every random draw comes from ``numpy.random.Generator(PCG64)`` streams spawned from the volume's
seed (one stream per stage), so the same seed gives the same bytes, and switching a distractor off
changes nothing else.

``dataset`` writes data sets of such volumes (NIfTI files and a manifest) and holds the command
line, ``python -m igrpn.phantom`` (``igrpn phantom``); ``records`` holds ``PhantomOptions`` and
``PhantomInfo``.
"""

from igrpn.phantom.dataset import (MANIFEST_COLUMNS, MAX_VOLUMES, add_arguments, case_seeds, check_manifest_path,
                                   command_manifest, default_manifest, ensure_dataset, generate_dataset, main,
                                   split_labels)
from igrpn.phantom.records import PhantomInfo, PhantomOptions
from igrpn.phantom.scene import BOX_MARGIN_MM, FAN_MARGIN_MM, MAX_GRID, make_phantom, make_phantom_with_info
from igrpn.phantom.shapes import MATERIAL_NAMES

__all__ = [
    "MATERIAL_NAMES", "MANIFEST_COLUMNS", "MAX_GRID", "MAX_VOLUMES", "BOX_MARGIN_MM", "FAN_MARGIN_MM",
    "PhantomOptions", "PhantomInfo", "make_phantom", "make_phantom_with_info", "case_seeds", "split_labels",
    "generate_dataset", "ensure_dataset", "default_manifest", "command_manifest", "add_arguments",
    "check_manifest_path", "main",
]
