"""Constants shared by every module, and the three run profiles of docs/design.md §8.

Every size is given in millimetres and converted to voxels with the profile's spacing, so the
paper's voxel numbers hold exactly at 1.3 mm and a coarser profile keeps the same anatomy.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

#: The checkout that holds the package, its notebooks, docs and default data set: the paths of
#: ``make reproduce`` and of the profiles' manifests are relative to it.
REPO_ROOT = Path(__file__).resolve().parents[1]

#: Landmark names in class-id order (class id = index + 1; 0 is background). Left/right are the
#: fetus's own.
LANDMARKS: tuple[str, ...] = ("left_eye", "middle_eyebrow", "right_eye", "nose_tip", "chin")
NUM_LANDMARKS = len(LANDMARKS)
#: Class ids of the landmarks swapped by a left-right flip.
LEFT_RIGHT_PAIRS: tuple[tuple[int, int], ...] = ((0, 2),)  # indices into LANDMARKS
#: The same pairs as class ids (background 0), as the losses and the anchor scoring use them.
LEFT_RIGHT_CLASS_PAIRS: tuple[tuple[int, int], ...] = tuple((a + 1, b + 1) for a, b in LEFT_RIGHT_PAIRS)

PAPER_SPACING_MM = 1.3
#: Ground-truth box edge per landmark (cube centred on the landmark): 14³ voxels for the eyes and
#: 24³ voxels for the others at 1.3 mm (the extracted text's "143"/"243").
GT_BOX_MM: tuple[float, ...] = tuple(
    round(n * PAPER_SPACING_MM, 4) for n in (14, 24, 14, 24, 24)
)
#: The paper's four anchor base sizes {13, 16, 20, 28} voxels at 1.3 mm, in mm.
ANCHOR_SIZES_MM: tuple[float, ...] = tuple(round(n * PAPER_SPACING_MM, 4) for n in (13, 16, 20, 28))

METHODS: tuple[str, ...] = ("rpn", "ssd", "faster_rcnn", "heatmap")
#: The peer no one here wrote: MONAI's 3D RetinaNet (igrpn.training.peer), trained by the same runner.
PEER_METHOD = "monai_retinanet"
#: Values of ``Profile.classification_anchors`` and ``Profile.optimizer``.
CLASSIFICATION_ANCHORS: tuple[str, ...] = ("sampled", "all", "hard_pool", "near_face")
#: Values of ``Profile.backbone_norm``.
BACKBONE_NORMS: tuple[str, ...] = ("batch", "group", "instance")
#: Values of ``Profile.fusion``.
FUSIONS: tuple[str, ...] = ("concat", "sum")
#: Values of ``Profile.matcher``.
MATCHERS: tuple[str, ...] = ("iou", "atss")
#: Values of ``Profile.anchor_shapes`` (igrpn.boxes.ANCHOR_MODES).
ANCHOR_SHAPES: tuple[str, ...] = ("combinations", "cubes")
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")


@dataclass(frozen=True)
class Profile:
    """Every size and count of one run; a run is named by its profile alone."""

    name: str
    spacing_mm: float  # isotropic spacing the volumes are resampled to
    width: int  # backbone base width (channels of block 1; doubled per block)
    #: of every method without an entry in ``epochs_by_method`` (to train every method N epochs,
    #: use :meth:`with_epochs`: ``dataclasses.replace(profile, epochs=N)`` keeps the table)
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-4
    val_fraction: float = 0.1  # of the training split, held out for validation
    anchor_sizes_mm: tuple[float, ...] = ANCHOR_SIZES_MM
    #: ``"combinations"`` (the paper: every (w, h, d) of the base sizes, 4³ = 64 per cell) or
    #: ``"cubes"`` (one cube per base size, 4 per cell; every GT box is a cube) — igrpn.boxes.anchor_shapes
    anchor_shapes: str = "combinations"
    #: Normalisation of the RPN's backbone: ``"batch"`` (docs/design.md §5), ``"group"`` or ``"instance"``
    #: (nnDetection's choice for small 3D batches); the inference fast path folds BatchNorm only
    backbone_norm: str = "batch"
    #: How the backbone merges a coarser map into a finer one: ``"concat"`` (the paper's U-Net
    #: fusion: upsample, concatenate, 3×3×3 conv over both) or ``"sum"`` (FPN: a 1×1×1 projection of
    #: the coarser map to the finer map's channels, upsampled and added, then the 3×3×3 conv over
    #: the finer map's channels alone: each fusion conv then costs a third of the concatenation's)
    fusion: str = "concat"
    #: [3×3×3 conv, norm, ReLU] layers of block 1, the full-resolution block: the paper's 2, or 1
    #: (the costliest convolution of the backbone dropped)
    block1_convs: int = 2
    #: 3×3×3 convolutions of the RPN head: the paper's 1, or more with GroupNorm (RetinaNet's heads have 4)
    head_convs: int = 1
    gt_box_mm: tuple[float, ...] = GT_BOX_MM
    #: edge of a detection feature cell: the paper's stride 4 at 1.3 mm (see model.detection_stride)
    feature_stride_mm: float = 4 * PAPER_SPACING_MM
    samples_per_volume: int = 256  # anchors sampled per volume for the classification loss
    positive_fraction: float = 0.5
    #: background anchors with the highest landmark scores added to the RPN's sample per volume
    #: (online hard negative mining, beyond the paper; 0 = the paper's random sampling only)
    hard_negatives_per_volume: int = 0
    #: Which anchors enter the RPN's classification loss (docs/design.md §10.8): ``"sampled"`` —
    #: ``samples_per_volume`` drawn at random with at most ``positive_fraction`` positives (the
    #: torchvision RPN's rule; the paper does not say); ``"all"`` — every non-ignored anchor, each
    #: scaled by the focal factor (1 − p_t)^``focal_gamma`` and the sum divided by the positives
    #: (RetinaNet, on which the IoU-balanced loss's own paper builds); ``"hard_pool"`` — the
    #: positives as ``"sampled"``, the negatives drawn at random among the ``hard_negative_pool`` ×
    #: as many background anchors scored most like a landmark (MONAI's and nnDetection's sampler).
    #: ``"near_face"`` — the positives as ``"sampled"``, the share ``near_face_fraction`` of the
    #: negatives drawn among the background anchors centred in a GT box grown by ``near_face_mm``
    #: on every side, the rest among all (negatives stratified on and near the face).
    classification_anchors: str = "sampled"
    near_face_fraction: float = 0.5
    near_face_mm: float = 20.0
    focal_gamma: float = 2.0
    #: Weight of the RPN's smooth-L1 regression beside its classification loss (the paper: 1)
    regression_weight: float = 1.0
    hard_negative_pool: int = 20
    #: ``"adamw"`` (AdamW, ``lr``, ``weight_decay``) or ``"sgd"`` (momentum 0.9, Nesterov, as
    #: nnDetection and MONAI's detection tutorials train); both with warm-up and cosine decay.
    optimizer: str = "adamw"
    #: Anchor labels: ``"iou"`` (the paper: positive above ``pos_iou`` or a GT's best anchor) or
    #: ``"atss"`` (positives by adaptive training-sample selection over the ``atss_cells`` cells
    #: nearest each GT, igrpn.boxes.atss_positives; negatives as the paper's)
    matcher: str = "iou"
    atss_cells: int = 4
    pos_iou: float = 0.5
    neg_iou: float = 0.25
    eta: float = 1.75  # IoU-balance exponent
    nms_iou: float = 0.25  # docs/design.md §10.15: the two candidates are distinct places
    top_k: int = 2  # candidates per landmark kept for the graph prior (2⁵ = 32 combinations)
    heatmap_sigma_mm: float = 4.0  # Gaussian σ of the heatmap baseline's targets
    rotation_deg: float = 25.0  # augmentation: uniform in [−r, r] about each axis
    crop_mm: float | None = None  # edge of the random training crop (None: whole volume)
    flip_prob: float = 0.5
    #: Beyond the paper (REPORT.md): train and score the left and right eye as one "eye" class
    #: (their probabilities summed) and tell them apart afterwards by the face's handedness
    #: (igrpn.detect.select_answers, igrpn.prior.face_handedness). A face in any pose, mirrored by the augmentation, gives
    #: an eye's local appearance no left or right: the paper's two classes then each get p ≈ 0.5
    #: on a true eye, below look-alikes elsewhere. False: the paper's two independent classes.
    merge_mirror_pairs: bool = True
    #: Train forward and loss under bf16 autocast where the device computes bf16 natively (CUDA
    #: Ampere+, CPUs with AMX; igrpn.training.distributed.mixed_precision); fp32 elsewhere.
    #: Weights, optimiser and inference stay fp32.
    mixed_precision: bool = True
    # Synthetic data set generated when missing (phantom grid and spacing, number of volumes).
    phantom_n: int = 152
    phantom_n_test: int = 32
    phantom_grid: int = 128
    phantom_spacing_mm: float = PAPER_SPACING_MM
    manifest: str = "data_manifest.csv"  # default data set, relative to the repository
    data_dir: str = "data/phantom"  # where its volumes are generated, relative to the manifest
    extra: dict = field(default_factory=dict)
    #: Epochs of particular methods (``METHODS`` name -> epochs) where they differ from ``epochs``;
    #: :meth:`for_method` resolves them. A training stores the resolved profile.
    epochs_by_method: dict = field(default_factory=dict)
    #: Other fields of particular methods (``METHODS`` name -> {field: value}), e.g. the RPN's
    #: optimiser where the baselines keep theirs; :meth:`for_method` resolves them too.
    settings_by_method: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.classification_anchors not in CLASSIFICATION_ANCHORS:
            raise ValueError(f"profile {self.name!r}: classification_anchors must be one of "
                             f"{list(CLASSIFICATION_ANCHORS)}, got {self.classification_anchors!r}")
        if not 0.0 <= self.near_face_fraction <= 1.0 or not self.near_face_mm >= 0:
            raise ValueError(f"profile {self.name!r}: near_face_fraction must be in [0, 1] and near_face_mm >= 0, "
                             f"got {self.near_face_fraction!r} and {self.near_face_mm!r}")
        if not (math.isfinite(self.regression_weight) and self.regression_weight > 0):
            raise ValueError(f"profile {self.name!r}: regression_weight must be a finite number > 0, "
                             f"got {self.regression_weight!r}")
        if self.matcher not in MATCHERS:
            raise ValueError(f"profile {self.name!r}: matcher must be one of {list(MATCHERS)}, got {self.matcher!r}")
        if int(self.atss_cells) != self.atss_cells or self.atss_cells < 1:
            raise ValueError(f"profile {self.name!r}: atss_cells must be a positive integer, got {self.atss_cells!r}")
        if self.backbone_norm not in BACKBONE_NORMS:
            raise ValueError(f"profile {self.name!r}: backbone_norm must be one of {list(BACKBONE_NORMS)}, "
                             f"got {self.backbone_norm!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"profile {self.name!r}: fusion must be one of {list(FUSIONS)}, got {self.fusion!r}")
        if self.block1_convs not in (1, 2):
            raise ValueError(f"profile {self.name!r}: block1_convs must be 1 or 2, got {self.block1_convs!r}")
        if self.anchor_shapes not in ANCHOR_SHAPES:
            raise ValueError(f"profile {self.name!r}: anchor_shapes must be one of {list(ANCHOR_SHAPES)}, "
                             f"got {self.anchor_shapes!r}")
        if int(self.head_convs) != self.head_convs or self.head_convs < 1:
            raise ValueError(f"profile {self.name!r}: head_convs must be a positive integer, got {self.head_convs!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"profile {self.name!r}: optimizer must be one of {list(OPTIMIZERS)}, "
                             f"got {self.optimizer!r}")
        unknown = sorted(set(self.epochs_by_method) - set(METHODS))
        if unknown:
            raise ValueError(f"profile {self.name!r}: epochs_by_method names unknown methods {unknown}; "
                             f"expected some of {list(METHODS)}")
        unknown = sorted(set(self.settings_by_method) - set(METHODS))
        if unknown:
            raise ValueError(f"profile {self.name!r}: settings_by_method names unknown methods {unknown}; "
                             f"expected some of {list(METHODS)}")
        settable = {f.name for f in dataclasses.fields(self)} - {"name", "epochs", "epochs_by_method",
                                                                  "settings_by_method"}
        for method, settings in self.settings_by_method.items():
            wrong = sorted(set(settings) - settable)
            if wrong:
                raise ValueError(f"profile {self.name!r}: settings_by_method[{method!r}] sets {wrong}, which are "
                                 "not per-method Profile fields (epochs go in epochs_by_method)")
        bad = {m: e for m, e in self.epochs_by_method.items() if int(e) != e or e < 1}
        if bad:
            raise ValueError(f"profile {self.name!r}: epochs_by_method must give positive integers, got {bad}")

    def for_method(self, method: str) -> "Profile":
        """This profile with ``method``'s own epochs and settings and no per-method table left."""
        if not self.epochs_by_method and not self.settings_by_method:
            return self
        return dataclasses.replace(self, epochs=int(self.epochs_by_method.get(method, self.epochs)),
                                   epochs_by_method={}, settings_by_method={},
                                   **self.settings_by_method.get(method, {}))

    def with_epochs(self, epochs: int) -> "Profile":
        """This profile with every method trained ``epochs`` epochs (the per-method table cleared)."""
        return dataclasses.replace(self, epochs=int(epochs), epochs_by_method={})

    def epochs_text(self) -> str:
        """E.g. ``16 epochs (rpn 22, heatmap 30)``."""
        overrides = ", ".join(f"{m} {e}" for m, e in self.epochs_by_method.items())
        return f"{self.epochs} epochs" + (f" ({overrides})" if overrides else "")

    def settings_text(self) -> str:
        """The per-method settings, e.g. ``rpn: optimizer=sgd, lr=0.01`` (empty when none)."""
        return "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in settings.items())
                         for m, settings in self.settings_by_method.items())

    def mm_to_vox(self, mm):
        """Convert a length (or tuple of lengths) in mm to voxels at this profile's spacing."""
        if isinstance(mm, (tuple, list)):
            return tuple(m / self.spacing_mm for m in mm)
        return mm / self.spacing_mm

    def to_dict(self) -> dict:
        """Plain data (JSON- and ``weights_only``-safe) describing the profile."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Profile":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = set(data) - known, known - set(data) - _FIELDS_WITH_SAFE_DEFAULTS
        if unknown or missing:
            # Filling a missing field with today's default could silently build another network.
            raise ValueError(f"profile from another igrpn version: unknown fields {sorted(unknown)}, "
                             f"missing fields {sorted(missing)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


#: Fields added later that change no network or training when left at their defaults: a profile
#: stored without them (an older checkpoint) still loads.
_FIELDS_WITH_SAFE_DEFAULTS = {"epochs_by_method", "settings_by_method", "classification_anchors", "focal_gamma",
                              "optimizer", "hard_negative_pool", "anchor_shapes", "head_convs",
                              "near_face_fraction", "near_face_mm", "matcher", "atss_cells", "backbone_norm",
                              "regression_weight", "fusion", "block1_convs"}


#: The `cpu` profile's optimiser, anchors and lean backbone, shared by the three anchor detectors.
_RPN_RECIPE = {"optimizer": "sgd", "lr": 0.01, "weight_decay": 3e-5, "anchor_shapes": "cubes",
               "fusion": "sum", "block1_convs": 1}


PROFILES: dict[str, Profile] = {
    # CI and tests: every notebook and method end to end in minutes; numbers meaningless.
    "smoke": Profile(
        name="smoke", spacing_mm=5.2, width=4, epochs=2, batch_size=2, lr=2e-3,
        samples_per_volume=64, phantom_n=12, phantom_n_test=4, phantom_grid=64,
        phantom_spacing_mm=2.6, manifest="build/smoke/data/data_manifest.csv", data_dir=".",
        val_fraction=0.25, feature_stride_mm=4 * 5.2,
    ),
    # make reproduce: all of Table 1 and 2 on a 2-core CPU at half the paper's resolution, on whole
    # volumes (docs/design.md §10.3), without hard negatives (§10.9), with the epochs of §10.13.
    "cpu": Profile(
        name="cpu", spacing_mm=2.6, width=16, epochs=16, batch_size=2, lr=2e-3,
        epochs_by_method={"rpn": 44, "ssd": 24, "heatmap": 30},
        # The recipe chosen on validation with two seeds: SGD (docs/design.md §10.12), cube anchors
        # (§10.6), the lean backbone (§10.5), and for the RPN the dense loss and ATSS (§10.7, §10.8);
        # the SSD and Faster R-CNN keep their own negatives.
        settings_by_method={"rpn": {**_RPN_RECIPE, "classification_anchors": "all",
                                    "matcher": "atss"},
                            "ssd": _RPN_RECIPE, "faster_rcnn": _RPN_RECIPE},
    ),
    # The paper's sizes exactly (GPU).
    "paper": Profile(
        name="paper", spacing_mm=1.3, width=32, epochs=100, batch_size=2, lr=1e-3,
    ),
}


def get_profile(name: str) -> Profile:
    """Return the named profile; ``ValueError`` naming the known ones otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; expected one of {sorted(PROFILES)}") from None

#: The trainings of Table 1 and 2: run name -> (method, IoU-balanced loss). Table 2 needs two
#: trainings per detector (the IoU balance changes training, the prior only inference).
RUN_CONFIGS: dict[str, tuple[str, bool]] = {
    "rpn_ib": ("rpn", True),
    "rpn_noib": ("rpn", False),
    "ssd_ib": ("ssd", True),
    "ssd_noib": ("ssd", False),
    "faster_rcnn": ("faster_rcnn", False),
    "heatmap": ("heatmap", False),
    # The RPN with IoU balance once more with the next seed: the spread between two seeds of the
    # paper's configuration, reported beside it (it is in no table of the paper).
    "rpn_ib_seed1": ("rpn", True),
}
#: Added to the reproduction's seed for the runs that repeat another with another seed.
RUN_SEED_OFFSETS: dict[str, int] = {"rpn_ib_seed1": 1}
