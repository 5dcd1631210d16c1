"""The peer detector: MONAI's 3D ``RetinaNetDetector``, trained on igrpn's data for a wall-clock budget.

Built as MONAI's 3D detection tutorial builds it (Project-MONAI tutorials, ``detection/``: a ResNet
with ``BackboneWithFPN``, ``RetinaNet``, ``AnchorGeneratorWithAnchorShape``, ATSS matcher,
hard-negative sampler, smooth-L1 boxes, SGD with Nesterov momentum), at the sizes of
``/work/shared/notes/monai-peer.md``: widths 32–256, 64 FPN channels, the two eyes as one class.
It trains on the same volumes, hold-out and augmentation as igrpn's own methods
(:class:`igrpn.data.LandmarkDataset`, :func:`igrpn.data.collate`) and its answers are selected by
igrpn's rule (:func:`igrpn.detect.select_answers`), so its validation row is scored exactly as
igrpn's are::

    result = train_peer(get_profile("cpu"), seed=0, out_dir=Path("runs/peer"),
                        manifest=Path("data_manifest.csv"), budget_s=600)
    rows = validation_answers(result, cases)   # one selected row per case and landmark

Coordinates. igrpn puts voxel centres at integer indices (docs/design.md §3); MONAI's boxes treat voxel
``i`` as the interval [i, i + 1) (its anchors centre on ``stride·n + stride // 2``, its boxes are
clipped to [0, size]): a MONAI coordinate is an igrpn voxel index + 0.5
(:func:`to_monai_boxes`, :func:`from_monai_boxes`).

``monai`` is optional (the ``bench`` extra) and imported only inside the functions that need it.
MONAI's detector borrows two pure-Python pieces from torchvision (a layer getter and a type for an
``isinstance`` check); where torchvision does not import (missing, or a build for another torch),
this module stands in for both (:class:`LayerOutputs`), so the peer trains on the CPU torch alone.
"""

from __future__ import annotations

import csv
import functools
import itertools
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from igrpn.config import LANDMARKS, LEFT_RIGHT_PAIRS, NUM_LANDMARKS, PEER_METHOD, Profile
from igrpn.data import collate, LandmarkDataset, load_cases, read_manifest
from igrpn.detect import Detector, PREDICTION_COLUMNS, select_answers
from igrpn.evaluation.answers import answers
from igrpn.io import atomic_torch_save
from igrpn.prior import fit_handedness
from igrpn.training.loop import learning_rate_at, seed_everything, split_train_val

#: ``method`` of a peer checkpoint (the experiment runner's ``--method``).
METHOD = PEER_METHOD
CHECKPOINT_NAME = "peer.pt"
LOG_NAME = "log.csv"
LOG_FIELDS = ("step", "epoch", "lr", "loss", "loss_cls", "loss_box", "seconds")
CHECKPOINT_FORMAT = 1
INSTALL_HINT = 'pip install -e ".[bench]" "torch==2.13.0"'

#: MONAI coordinate of a voxel's centre minus its igrpn index (voxel i spans [i, i + 1) in MONAI).
MONAI_OFFSET = 0.5

# Network and recipe (monai-peer.md): the tutorial's layout at the widths that make one step cost
# what an igrpn RPN step costs on the 2-core CPU (~0.38 s at 64³, batch 2).
BLOCK_INPLANES = (32, 64, 128, 256)
BLOCK_LAYERS = (1, 1, 1, 1)  # ResNet-10 (basic blocks)
FPN_CHANNELS = 64
STEM_STRIDE = 2
BASE_LR = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 3e-5
ATSS_CANDIDATES = 4
SAMPLES_PER_IMAGE = 64
POSITIVE_FRACTION = 0.3
MIN_NEGATIVES = 16  # the tutorial's min_neg
NEGATIVE_POOL = 20
TOPK_PER_LEVEL = 1000


def _peer_classes() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Names of the peer's foreground classes and the class (0-based, MONAI's labels) of each of
    ``LANDMARKS``: the two eyes of each ``LEFT_RIGHT_PAIRS`` pair share one class ("eye")."""
    partner = {b: a for a, b in LEFT_RIGHT_PAIRS}
    heads = [i for i in range(NUM_LANDMARKS) if i not in partner]
    names = tuple(LANDMARKS[i].removeprefix("left_") for i in heads)
    classes = tuple(heads.index(partner.get(i, i)) for i in range(NUM_LANDMARKS))
    return names, classes


#: ("eye", "middle_eyebrow", "nose_tip", "chin") and, per landmark, its peer class (0, 1, 0, 2, 3).
PEER_CLASSES, LANDMARK_PEER_CLASS = _peer_classes()


def _require_monai() -> None:
    """Import MONAI's detection code.

    Raises:
        RuntimeError: MONAI is missing; the message says how to install the ``bench`` extra.
    """
    try:
        import monai.apps.detection.networks.retinanet_detector  # noqa: F401
    except ImportError as error:
        raise RuntimeError(f"the MONAI peer needs monai ({error}); install it with: {INSTALL_HINT}") from None


def unavailable_reason() -> str | None:
    """Why the peer cannot train here (MONAI missing), ``None`` when it can."""
    try:
        _require_monai()
    except RuntimeError as error:
        return str(error)
    return None


@functools.lru_cache(maxsize=1)
def torchvision_usable() -> bool:
    """Whether torchvision imports. Any failure counts: a wheel built for another torch (the PyPI
    torchvision 0.28.0 is a CUDA build; against the CPU torch its C ops fail to load and its import
    raises RuntimeError, not ImportError) is as good as none."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - see above
        return False
    return True


class LayerOutputs(torch.nn.ModuleDict):
    """Stand-in for torchvision's ``IntermediateLayerGetter``, which MONAI's ``BackboneWithFPN``
    borrows, where torchvision does not import: the backbone's children up to the last returned
    one, run in order, returning ``{new name: output}`` of the returned layers. Pure glue: every
    layer that computes is MONAI's, and the state dict keys are the getter's."""

    def __init__(self, backbone: torch.nn.Module, return_layers: dict[str, str]):
        wanted, kept = set(return_layers), {}
        for name, child in backbone.named_children():
            kept[name] = child
            wanted.discard(name)
            if not wanted:
                break
        if wanted:
            raise ValueError(f"LayerOutputs: the backbone has no layers {sorted(wanted)}")
        super().__init__(kept)
        self.return_layers = dict(return_layers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = {}
        for name, layer in self.items():
            x = layer(x)
            if name in self.return_layers:
                outputs[self.return_layers[name]] = x
        return outputs


class _NoTorchvisionMatcher:
    """Never instantiated: stands for torchvision's ``Matcher`` in MONAI's detector, whose training
    step asks ``isinstance(matcher, Matcher)`` before its ATSS branch (and fails on the
    placeholder MONAI holds when torchvision does not import)."""


def fpn_feature_extractor(backbone, returned: list[int], out_channels: int) -> tuple[torch.nn.Module, str]:
    """MONAI's ``BackboneWithFPN`` on a MONAI ResNet, every layer trainable (an untrained backbone),
    as ``resnet_fpn_feature_extractor`` builds it but with ``out_channels`` FPN channels (that
    function fixes 256). Where torchvision does not import, :class:`LayerOutputs` stands in for its
    layer getter.

    Args:
        backbone: a MONAI ``ResNet``.
        returned: the ResNet layers (1-4) whose outputs feed the FPN.
        out_channels: FPN channels.

    Returns:
        (the extractor, a note: "" when built with torchvision, else what stood in).
    """
    from monai.networks.blocks import backbone_fpn_utils

    return_layers = {f"layer{layer}": str(n) for n, layer in enumerate(returned)}
    # MONAI's rule: the last layer's output channels / 8 are layer 1's, doubled per layer.
    in_channels = [backbone.in_planes // 8 * 2 ** (layer - 1) for layer in returned]

    def build():
        return backbone_fpn_utils.BackboneWithFPN(backbone, return_layers, in_channels, out_channels, spatial_dims=3)

    if torchvision_usable():
        return build(), ""
    saved = backbone_fpn_utils.torchvision_models
    backbone_fpn_utils.torchvision_models = type("_Models", (), {"_utils": type("_Utils", (), {
        "IntermediateLayerGetter": LayerOutputs})})
    try:
        extractor = build()
    finally:
        backbone_fpn_utils.torchvision_models = saved
    return extractor, "torchvision not importable: its layer getter replaced by equivalent glue"


# --------------------------------------------------------------------------------------------
# Coordinates


def to_monai_boxes(boxes_vox) -> torch.Tensor:
    """igrpn centre-form boxes (..., 6) ``(i, j, k, w, h, d)`` in voxels (centres at integer
    indices) → MONAI corner-form boxes (..., 6) ``(x0, y0, z0, x1, y1, z1)`` (voxel i spans
    [i, i + 1)). Inverse of :func:`from_monai_boxes`."""
    boxes = torch.as_tensor(boxes_vox, dtype=torch.float32)
    if boxes.shape[-1] != 6:
        raise ValueError(f"to_monai_boxes: expected boxes (..., 6) in centre form, got shape {tuple(boxes.shape)}")
    centre, size = boxes[..., :3] + MONAI_OFFSET, boxes[..., 3:]
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def from_monai_boxes(boxes) -> torch.Tensor:
    """MONAI corner-form boxes (..., 6) → igrpn centre-form boxes (..., 6) in voxels. Inverse of
    :func:`to_monai_boxes`."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.shape[-1] != 6:
        raise ValueError(f"from_monai_boxes: expected boxes (..., 6) in corner form, got shape {tuple(boxes.shape)}")
    low, high = boxes[..., :3], boxes[..., 3:]
    return torch.cat([(low + high) / 2 - MONAI_OFFSET, high - low], dim=-1)


def gt_box_vox(profile: Profile) -> torch.Tensor:
    """Edge (voxels) of each landmark's GT cube at the profile's spacing, (5,)."""
    return torch.tensor(profile.mm_to_vox(profile.gt_box_mm), dtype=torch.float32)


def targets_for(landmarks_vox: torch.Tensor, profile: Profile) -> list[dict[str, torch.Tensor]]:
    """MONAI training targets for a batch of landmark sets.

    Args:
        landmarks_vox: (N, 5, 3) voxel positions (igrpn indices), ``LANDMARKS`` order.
        profile: gives the GT cube edges (``gt_box_mm``, mm) and the spacing.

    Returns:
        N dicts ``{"boxes": (5, 6) MONAI corner form, "labels": (5,) int64 peer classes}``.
    """
    landmarks = torch.as_tensor(landmarks_vox, dtype=torch.float32)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (NUM_LANDMARKS, 3):
        raise ValueError(f"targets_for: expected landmarks (N, {NUM_LANDMARKS}, 3), got {tuple(landmarks.shape)}")
    sizes = gt_box_vox(profile)[:, None].expand(NUM_LANDMARKS, 3)
    labels = torch.tensor(LANDMARK_PEER_CLASS, dtype=torch.int64)
    return [{"boxes": to_monai_boxes(torch.cat([points, sizes], dim=1)), "labels": labels.clone()}
            for points in landmarks]


# --------------------------------------------------------------------------------------------
# Network


def backbone_layout(profile: Profile) -> tuple[bool, list[int]]:
    """Whether the ResNet stem keeps its max-pool, and the ResNet layers whose outputs feed the FPN,
    so that the finest FPN map has igrpn's detection cell.

    igrpn's RPN predicts on cells of ``profile.feature_stride_mm`` (5.2 mm: the paper's stride 4 at
    1.3 mm, stride 2 at the ``cpu`` profile's 2.6 mm, where the eye cube is 7 voxels). The
    tutorial's stem (a stride-2 convolution and a max-pool) puts ResNet layer ``n`` at stride
    ``2**(n + 1)``, and it returns two consecutive layers (its [1, 2]; the FPN adds a third,
    max-pooled level). Its layout is kept wherever it reaches the cell (stride 4 → [1, 2], 8 →
    [2, 3], 16 → [3, 4]); a stride-2 cell, below its layer 1, drops the max-pool (layer ``n`` at
    ``2**n``) and returns [1, 2]. That stride costs: a step at 64³ takes ~10× one at stride 4
    (the heads' four 3×3×3 convolutions run on 8× the cells); for a cheaper, coarser peer run
    ``--set feature_stride_mm=10.4`` (the profile's field is read by no other part of a peer run).

    Returns:
        (max_pool, returned layers).

    Raises:
        ValueError: the cell is not 2, 4, 8 or 16 voxels at the profile's spacing.
    """
    stride = profile.feature_stride_mm / profile.spacing_mm
    level = math.log2(stride) if stride > 0 else float("nan")
    if not (abs(level - round(level)) < 1e-6 and 1 <= round(level) <= 4):
        raise ValueError(f"profile {profile.name!r}: feature_stride_mm / spacing_mm = {stride:g}; the peer needs "
                         "a stride of 2, 4, 8 or 16 voxels (a ResNet layer's stride)")
    level = round(level)
    if level == 1:
        return False, [1, 2]
    return True, [level - 1, level]


def anchor_shapes(profile: Profile) -> list[list[float]]:
    """Base anchor shapes (voxels) of the finest level: one cube per distinct GT cube edge
    (7 and 12 voxels at 2.6 mm). MONAI scales them by 2 per coarser level (and rounds the half
    edges to whole voxels)."""
    edges = sorted({round(float(e), 6) for e in gt_box_vox(profile)})
    return [[e, e, e] for e in edges]


def level_strides(backbone, returned: list[int]) -> list[list[int]]:
    """Stride (voxels, per axis) of each FPN output of a MONAI ResNet: the stem, its max-pool
    (unless replaced by ``Identity``), ×2 per layer after the first, and ×2 for the FPN's extra
    pooled level."""
    stem = backbone.conv1.stride
    # The layer getter runs every child in order, so the max-pool child counts whatever the
    # backbone's ``no_max_pool`` (read only by ResNet.forward) says.
    pool = 1 if isinstance(backbone.maxpool, torch.nn.Identity) else 2
    strides = [[s * pool * 2 ** (layer - 1) for s in stem] for layer in returned]
    return strides + [[2 * s for s in strides[-1]]]


def assemble_retinanet(feature_extractor, backbone, returned: list[int], base_anchor_shapes, num_classes: int):
    """``RetinaNet`` and ``RetinaNetDetector`` on a feature extractor, as the tutorial assembles
    them: anchors of ``base_anchor_shapes`` (voxels) on the finest level, doubled per level, and
    inputs padded to the coarsest level's stride. No TorchScript (the tutorial scripts the network
    for speed on a GPU; the state dict is the same).

    Args:
        feature_extractor: a MONAI ``BackboneWithFPN`` over ``backbone``'s layers ``returned``.
        backbone: the MONAI ResNet inside it (for the strides).
        returned: the returned ResNet layers (1-4).
        base_anchor_shapes: [[w, h, d], ...] voxels.
        num_classes: foreground classes.

    Returns:
        The detector (train mode), with MONAI's default losses and no matcher or sampler set.
    """
    from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
    from monai.apps.detection.networks.retinanet_network import RetinaNet
    from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape

    strides = level_strides(backbone, list(returned))
    anchor_generator = AnchorGeneratorWithAnchorShape(
        feature_map_scales=[2**level for level in range(len(strides))], base_anchor_shapes=base_anchor_shapes)
    network = RetinaNet(spatial_dims=3, num_classes=num_classes,
                        num_anchors=anchor_generator.num_anchors_per_location()[0],
                        feature_extractor=feature_extractor, size_divisible=strides[-1])
    return RetinaNetDetector(network=network, anchor_generator=anchor_generator, debug=False)


def build_detector(profile: Profile):
    """The peer for ``profile``: ResNet-10 (widths 32–256, stride-2 stem), an FPN of 64 channels
    on the layers of :func:`backbone_layout`, anchors of the GT cube edges, 4 classes, with the
    tutorial's training components (ATSS, hard negatives, smooth-L1) and per-class box selection
    settings for inference.

    Returns:
        A MONAI ``RetinaNetDetector`` (train mode, CPU, fp32).
    """
    _require_monai()
    from monai.apps.detection.networks import retinanet_detector
    from monai.networks.nets import resnet

    max_pool, returned = backbone_layout(profile)
    backbone = resnet.ResNet(block=resnet.ResNetBlock, layers=list(BLOCK_LAYERS), block_inplanes=list(BLOCK_INPLANES),
                             spatial_dims=3, n_input_channels=1, conv1_t_size=7, conv1_t_stride=STEM_STRIDE,
                             no_max_pool=not max_pool, feed_forward=False)
    if not max_pool:
        # The FPN's layer getter runs the backbone's children, not its forward: ``no_max_pool``
        # alone would leave the pool in. An identity in its place removes it there too.
        backbone.maxpool = torch.nn.Identity()
    # 64 FPN channels, not resnet_fpn_feature_extractor's fixed 256: with widths 32-256 a step then
    # costs what igrpn's RPN step costs (monai-peer.md: ~0.38 s at 64³, batch 2), a fair budget match.
    extractor, _ = fpn_feature_extractor(backbone, returned, FPN_CHANNELS)
    if not torchvision_usable():
        retinanet_detector.Matcher = _NoTorchvisionMatcher  # see that class; MONAI's ATSS branch then runs
    detector = assemble_retinanet(extractor, backbone, returned, anchor_shapes(profile), len(PEER_CLASSES))
    detector.set_atss_matcher(num_candidates=ATSS_CANDIDATES, center_in_gt=False)
    detector.set_hard_negative_sampler(batch_size_per_image=SAMPLES_PER_IMAGE, positive_fraction=POSITIVE_FRACTION,
                                       min_neg=MIN_NEGATIVES, pool_size=NEGATIVE_POOL)
    # MONAI's default box loss, set here so the recipe reads whole: smooth L1 on encoded targets.
    detector.set_box_regression_loss(torch.nn.SmoothL1Loss(beta=1.0 / 9, reduction="mean"),
                                     encode_gt=True, decode_pred=False)
    # Inference: every score kept (an answer for every landmark, as igrpn gives), NMS at igrpn's
    # IoU (two candidates are two places), the pooled eye list twice as long as the others.
    detector.set_box_selector_parameters(score_thresh=0.0, topk_candidates_per_level=TOPK_PER_LEVEL,
                                         nms_thresh=profile.nms_iou, detections_per_img=2 * profile.top_k)
    return detector


# --------------------------------------------------------------------------------------------
# Training


def _handedness(train_cases) -> int:
    """The eye-naming sign of the training annotations, as igrpn.training.loop measures it."""
    handedness, agreement = fit_handedness(np.stack([case.landmarks_mm for case in train_cases]))
    if agreement < 0.95:
        warnings.warn(f"only {agreement:.0%} of the training landmark sets share one handedness "
                      "(left and right eye swapped in some annotations?)", stacklevel=3)
    return int(handedness)


def _train_cases(manifest: Path, profile: Profile, seed: int, progress: bool):
    """The manifest's train split minus the validation hold-out of igrpn.training.loop, as Cases."""

    table = read_manifest(manifest)
    train_table = table[table["split"] == "train"]
    train_ids, val_ids = split_train_val(list(train_table["case_id"]), profile.val_fraction, seed)
    by_id = {case.case_id: case for case in load_cases(train_table, profile.spacing_mm, progress=progress)}
    return [by_id[i] for i in train_ids], train_ids, val_ids


def _step(detector, optimizer, batch: dict, profile: Profile) -> dict[str, float]:
    """One SGD step on a batch of :func:`igrpn.data.collate`; returns the losses (floats).

    fp32 throughout: bf16 autocast gave NaN logits from the first step on this CPU (monai-peer.md).
    """
    outputs = detector(batch["volume"], targets_for(batch["landmarks_vox"], profile))
    loss = outputs[detector.cls_key] + outputs[detector.box_reg_key]  # the tutorial's w_cls = 1
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": float(loss.detach()), "loss_cls": float(outputs[detector.cls_key].detach()),
            "loss_box": float(outputs[detector.box_reg_key].detach())}


def _write_log(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def train_peer(profile: Profile, seed: int, out_dir: Path, manifest: Path, budget_s: float,
               progress: bool = True) -> dict:
    """Train the peer on the manifest's train split (minus igrpn's hold-out) for ``budget_s`` s.

    The clock is the training loop's: the loop time of each step including the loading (and
    augmentation) of its batch; the run stops at the first step that starts with the budget spent.
    Learning rate: :func:`igrpn.training.loop.learning_rate_at` of the fraction spent (5 % warm-up, then
    cosine) at base 0.01.

    Args:
        profile: spacing, GT box sizes, batch size, augmentation, hold-out fraction, NMS, top-k.
        seed: seeds the weights, the hold-out, the augmentation and the hard-negative sampling.
        out_dir: receives ``peer.pt`` (``torch.load(..., weights_only=True)``) and ``log.csv``.
        manifest: the data set.
        budget_s: wall-clock seconds of training (> 0).
        progress: tqdm bar of the budget.

    Returns:
        ``{"steps", "train_seconds", "checkpoint", "log", "handedness", "val_ids"}``.
    """
    if not budget_s > 0:
        raise ValueError(f"train_peer: budget_s must be > 0 seconds, got {budget_s}")
    _require_monai()
    out_dir, manifest = Path(out_dir), Path(manifest).resolve()
    seed_everything(seed)
    cases, train_ids, val_ids = _train_cases(manifest, profile, seed, progress)
    handedness = _handedness(cases)
    detector = build_detector(profile)
    optimizer = torch.optim.SGD(detector.network.parameters(), lr=BASE_LR, momentum=MOMENTUM, nesterov=True,
                                weight_decay=WEIGHT_DECAY)
    dataset = LandmarkDataset(cases, augment=True, rotation_deg=profile.rotation_deg, flip_prob=profile.flip_prob,
                              seed=seed)
    detector.train()
    rows, spent = [], 0.0
    bar = tqdm(total=round(budget_s), unit="s", desc="monai_retinanet", disable=not progress, leave=False)
    for epoch in itertools.count():
        dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=profile.batch_size, shuffle=True, collate_fn=collate,
                                             generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        mark = time.perf_counter()
        for batch in loader:
            if spent >= budget_s:
                break
            lr = learning_rate_at(spent / budget_s, BASE_LR)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = _step(detector, optimizer, batch, profile)
            now = time.perf_counter()
            seconds, mark = now - mark, now
            spent += seconds
            rows.append({"step": len(rows) + 1, "epoch": epoch, "lr": lr, "seconds": seconds, **losses})
            bar.update(min(seconds, max(0.0, budget_s - bar.n)))
            bar.set_postfix(loss=f"{losses['loss']:.3f}", step=len(rows))
        if spent >= budget_s:
            break
    bar.close()
    checkpoint = out_dir / CHECKPOINT_NAME
    atomic_torch_save({
        "format_version": CHECKPOINT_FORMAT, "method": METHOD, "profile": profile.to_dict(), "seed": int(seed),
        "handedness": handedness, "steps": len(rows), "train_seconds": spent, "budget_s": float(budget_s),
        "val_ids": list(val_ids),
        "train_ids": list(train_ids), "network": detector.network.state_dict(),
    }, checkpoint)
    _write_log(rows, out_dir / LOG_NAME)
    return {"steps": len(rows), "train_seconds": spent, "checkpoint": checkpoint, "log": out_dir / LOG_NAME,
            "handedness": handedness, "val_ids": list(val_ids)}


# --------------------------------------------------------------------------------------------
# Inference


def read_peer_checkpoint(path: str | Path) -> dict:
    """A peer checkpoint's dict (``weights_only=True``: no pickled code runs), without MONAI.

    Raises:
        ValueError: a missing or unreadable file, or one that is not a peer checkpoint of this format.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: peer checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several types for a damaged file
        raise ValueError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(ckpt, dict) or ckpt.get("method") != METHOD:
        raise ValueError(f"{path}: not a {METHOD} checkpoint")
    if ckpt.get("format_version") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: peer checkpoint format {ckpt.get('format_version')} is not supported "
                         f"(this igrpn reads format {CHECKPOINT_FORMAT})")
    return ckpt


def load_peer(path: str | Path):
    """Rebuild a trained peer from its checkpoint (:func:`read_peer_checkpoint`).

    Returns:
        (detector in eval mode, profile, checkpoint dict).

    Raises:
        ValueError: a file that is not a peer checkpoint of this format.
    """
    ckpt = read_peer_checkpoint(path)
    profile = Profile.from_dict(ckpt["profile"])
    detector = build_detector(profile)
    detector.network.load_state_dict(ckpt["network"])
    return detector.eval(), profile, ckpt


@torch.no_grad()
def peer_candidates(detector, volume: np.ndarray, top_k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The peer's candidates per class on one volume, MONAI's box selection run once per class.

    MONAI's selector ranks the boxes of all classes together and keeps the best
    ``detections_per_img``: a class whose scores are low everywhere then gets no box at all. The
    same selection (score top-k per level, clipping, NMS) on one class's logits at a time gives
    every class its own list.

    Args:
        detector: a MONAI ``RetinaNetDetector`` of :func:`build_detector` (eval mode).
        volume: (X, Y, Z) float32 on the profile's grid, normalised.
        top_k: boxes kept per class; the eye class (two landmarks) keeps ``2 * top_k``.

    Returns:
        Per peer class ``(boxes (n, 6) igrpn centre form, voxels; scores (n,))``, best first.
    """
    from monai.apps.detection.utils.detector_utils import preprocess_images

    image = torch.as_tensor(np.asarray(volume), dtype=torch.float32)[None]
    images, sizes = preprocess_images([image], 3, detector.size_divisible)  # padded at the high end
    maps = detector.network(images)
    detector.generate_anchors(images, maps)
    locations = [m.shape[2:].numel() for m in maps[detector.cls_key]]
    logits = detector._reshape_maps(maps[detector.cls_key])  # (1, anchors, classes)
    deltas = detector._reshape_maps(maps[detector.box_reg_key])  # (1, anchors, 6)
    eye_classes = {LANDMARK_PEER_CLASS[a] for pair in LEFT_RIGHT_PAIRS for a in pair}
    per_class = []
    for c in range(len(PEER_CLASSES)):
        outputs = {detector.cls_key: logits[..., c : c + 1], detector.box_reg_key: deltas}
        found = detector.postprocess_detections(outputs, detector.anchors, sizes, locations)[0]
        keep = (2 if c in eye_classes else 1) * int(top_k)
        per_class.append((from_monai_boxes(found[detector.target_box_key][:keep]),
                          found[detector.pred_score_key][:keep].float()))
    return per_class


def candidate_rows(per_class, affine: np.ndarray, spacing_mm: float) -> pd.DataFrame:
    """igrpn's candidate rows (``igrpn.detect.PREDICTION_COLUMNS``) from the peer's per-class boxes.

    A landmark gets its class's list; the two eyes both get the eye class's list (the pooled form
    igrpn's merged-eye models give, which :func:`igrpn.detect.select_answers` splits into a pair).

    Args:
        per_class: per peer class ``(boxes (n, 6) centre form voxels, scores (n,))``, best first.
        affine: (4, 4) voxel → world mm of the grid.
        spacing_mm: the grid's isotropic spacing (box sizes voxels → mm).
    """

    if len(per_class) != len(PEER_CLASSES):
        raise ValueError(f"candidate_rows: expected {len(PEER_CLASSES)} classes {PEER_CLASSES}, got {len(per_class)}")
    affine = np.asarray(affine, dtype=np.float64)
    records = []
    for index, name in enumerate(LANDMARKS):
        boxes, scores = (torch.as_tensor(t).double().numpy() for t in per_class[LANDMARK_PEER_CLASS[index]])
        centres_mm = boxes[:, :3] @ affine[:3, :3].T + affine[:3, 3]
        for rank in range(len(boxes)):
            records.append({
                "landmark": name, "class_id": index + 1, "rank": rank, "selected": False,
                "score": float(scores[rank]), "x": centres_mm[rank, 0], "y": centres_mm[rank, 1],
                "z": centres_mm[rank, 2], "i": boxes[rank, 0], "j": boxes[rank, 1], "k": boxes[rank, 2],
                "w": boxes[rank, 3] * spacing_mm, "h": boxes[rank, 4] * spacing_mm, "d": boxes[rank, 5] * spacing_mm,
            })
    return pd.DataFrame.from_records(records, columns=list(PREDICTION_COLUMNS))


def select_peer_answers(rows: pd.DataFrame, profile: Profile, handedness: int | None) -> pd.DataFrame:
    """igrpn's answer selection (no prior) on the peer's candidate rows: the top box per landmark,
    the eyes as two places at least half an eye box apart named left/right by ``handedness``
    (:meth:`igrpn.detect.Detector.pairing`, :func:`igrpn.detect.select_answers`)."""

    pairing = Detector(torch.nn.Identity(), profile, handedness=handedness).pairing()
    pairing["pair_eyes"] = True  # the peer always pools the eyes, whatever the profile's switch
    return select_answers(rows, **pairing)


ANSWER_COLUMNS = ("case_id", "landmark", "class_id", "rank", "selected", "score", "x", "y", "z", "w", "h", "d")


def validation_answers(result: dict, cases) -> pd.DataFrame:
    """The trained peer's selected answers on ``cases``, as ``igrpn.evaluation.answers.answers`` gives igrpn's.

    Args:
        result: :func:`train_peer`'s return (its ``"checkpoint"`` is read).
        cases: :class:`igrpn.data.Case` on the checkpoint profile's grid.

    Returns:
        One row per case and landmark: ``ANSWER_COLUMNS`` (world mm, centre form).
    """

    detector, profile, ckpt = load_peer(result["checkpoint"])
    frames = []
    for case in cases:
        rows = candidate_rows(peer_candidates(detector, case.volume, profile.top_k), case.affine, profile.spacing_mm)
        chosen = answers(select_peer_answers(rows, profile, ckpt["handedness"]))
        frames.append(chosen.assign(case_id=case.case_id)[list(ANSWER_COLUMNS)])
    if not frames:
        return pd.DataFrame(columns=list(ANSWER_COLUMNS))
    return pd.concat(frames, ignore_index=True)
