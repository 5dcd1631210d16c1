"""Faster R-CNN baseline of Table 1 (docs/design.md §5), on the shared backbone: "we replace the detection
part of our model" with a two-stage detector (Ren et al.), with RoIAlign (He et al.) in 3D.

Stage one, an RPN with binary objectness: a 3×3×3 conv on the backbone's detection map (``features``,
stride 4, or 2 at half the paper's resolution), then 1×1×1
convs giving one sigmoid objectness logit and 6 deltas for each of the IG-RPN's anchors
(``make_anchors`` on the fused map, the profile's anchor shapes). Anchors are labelled as the
RPN's (``profile.matcher``: the paper's IoU rule or ATSS) with the landmark classes merged into
"object", and ``profile.samples_per_volume`` of them are sampled per volume (at most ``positive_fraction``
positive). Proposals: decode, clip to the volume, drop boxes under one voxel, keep the
``PRE_NMS_TOP_N`` best, NMS at ``RPN_NMS_IOU`` = 0.7, keep ``POST_NMS_TOP_N`` (300 training /
100 testing; ``profile.extra`` may override them, see :meth:`FasterRCNNModel.__init__`).

Stage two: :func:`roi_align_3d` pools each proposal from the fused map into 4³ bins (2³ samples
each), then flatten -> FC -> ReLU -> FC giving K+1 class logits and class-specific deltas
(6 per landmark class) w.r.t. the proposal. The deltas are Eq. (1) scaled by
``ROI_DELTA_WEIGHTS`` = (10, 10, 10, 5, 5, 5), as torchvision's second stage, since a proposal is
already close to its box. Training samples ``rois_per_volume`` RoIs per volume
(``max(32, samples_per_volume // 4)``: 64 at the cpu profile) among the proposals and the GT
boxes, at most 25 % positive (IoU ≥ 0.5 with a GT, that GT's class), the rest background
(IoU < 0.5).

Loss = RPN objectness (BCE) + RPN regression + RoI classification (K+1 CE) + RoI regression
(smooth-L1 on the positives' deltas of their class). With ``profile.merge_mirror_pairs`` the two
eyes are one class in stage two, as in the RPN and the SSD: the cross-entropy's target is
p_left + p_right, both eyes regress with the left eye's deltas, and the candidates list the merged
class's places under both names (``select_per_class``'s ``mirror_pairs``). The IoU-balanced loss has no Faster R-CNN row
in the paper: ``iou_balance`` is accepted and ignored.

In training mode ``forward`` stops after the proposals (stage two runs in :meth:`loss`, on the
sampled RoIs, since it needs the GT); in eval mode it runs stage two on the proposals too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from igrpn import boxes as box_ops
from igrpn import anchors as anchor_ops
from igrpn.config import Profile
from igrpn.losses import iou_balanced_cross_entropy, smooth_l1
from igrpn.models.backbone import Backbone, detection_stride, pad_to_multiple
from igrpn.models.base import LandmarkModel
from igrpn.models.fast_cpu import conv3d_relu, fast_path_applies, single_threaded
from igrpn.models.rpn import pointwise_head
from igrpn.models.ssd import flatten_anchor_outputs, select_per_class

#: Proposals kept per volume before and after stage one's NMS, in training and at test time.
PRE_NMS_TOP_N = {"train": 2000, "test": 1000}
POST_NMS_TOP_N = {"train": 300, "test": 100}
RPN_NMS_IOU = 0.7
#: Proposals with an edge shorter than this (voxels) are dropped.
MIN_PROPOSAL_SIZE = 1.0
#: RoIAlign output bins per axis and sampling points per bin and axis.
ROI_OUTPUT_SIZE = (4, 4, 4)
ROI_SAMPLING_RATIO = 2
#: Second stage: IoU of a positive RoI with its GT, and the largest share of positives.
ROI_POS_IOU = 0.5
ROI_POSITIVE_FRACTION = 0.25
#: Scaling of the second stage's Eq. (1) deltas (tx, ty, tz, tw, th, td).
ROI_DELTA_WEIGHTS = (10.0, 10.0, 10.0, 5.0, 5.0, 5.0)


def _normalised(coord: torch.Tensor, size: int) -> torch.Tensor:
    """Map feature-cell coordinates (cell centres at integers) to ``grid_sample``'s [−1, 1]
    with ``align_corners=True`` (−1 = centre of cell 0, +1 = centre of cell size − 1)."""
    return coord * (2.0 / max(size - 1, 1)) - 1.0


def roi_align_3d(
    features: torch.Tensor,
    rois: torch.Tensor,
    spatial_scale: float,
    output_size=(4, 4, 4),
    sampling_ratio: int = 2,
) -> torch.Tensor:
    """3D RoIAlign: average of trilinearly interpolated features over a regular grid of sampling
    points in each output bin (He et al., Mask R-CNN), via ``grid_sample``.

    Coordinates: voxel centres of the input volume and cell centres of the feature map both sit at
    integer indices. A feature map at stride s = 1 / spatial_scale made by max-pooling covers input
    voxels ``s·f … s·f + s − 1`` with cell f, so input coordinate x maps to feature coordinate
    ``(x − (s − 1) / 2) / s``. Sampling points outside the feature grid take the border value.

    Args:
        features: (N, C, X, Y, Z) feature map.
        rois: (R, 7) rows ``[batch_index, x0, y0, z0, x1, y1, z1]``, corners in input voxels.
        spatial_scale: 1 / stride of ``features`` w.r.t. the input.
        output_size: bins per axis (Ox, Oy, Oz), or one int for all three.
        sampling_ratio: sampling points per bin along each axis (sampling_ratio³ per bin).

    Returns:
        (R, C, Ox, Oy, Oz) pooled features.
    """
    if features.ndim != 5:
        raise ValueError(f"roi_align_3d: features must be (N, C, X, Y, Z), got {tuple(features.shape)}")
    if rois.ndim != 2 or rois.shape[1] != 7:
        raise ValueError(f"roi_align_3d: rois must be (R, 7) [batch, x0, y0, z0, x1, y1, z1], got {tuple(rois.shape)}")
    if sampling_ratio < 1:
        raise ValueError(f"roi_align_3d: sampling_ratio must be ≥ 1, got {sampling_ratio}")
    out = (output_size,) * 3 if isinstance(output_size, int) else tuple(output_size)
    n, c, *size = features.shape
    r = rois.shape[0]
    result = features.new_zeros((r, c) + out)
    if r == 0:
        return result
    batch_index = rois[:, 0].long()
    if batch_index.min() < 0 or batch_index.max() >= n:
        raise ValueError(f"roi_align_3d: batch indices must lie in [0, {n - 1}]")

    stride = 1.0 / spatial_scale
    # RoI corners in feature-cell coordinates.
    start = (rois[:, 1:4] - (stride - 1) / 2.0) * spatial_scale  # (R, 3)
    end = (rois[:, 4:7] - (stride - 1) / 2.0) * spatial_scale
    bin_size = (end - start) / rois.new_tensor(out)  # (R, 3)

    # Normalised sampling coordinates per axis: bin b, point p → start + (b + (p + ½)/ratio)·bin.
    axis_coords = []
    for axis in range(3):
        steps = (torch.arange(out[axis] * sampling_ratio, device=rois.device, dtype=rois.dtype) + 0.5) / sampling_ratio
        coords = start[:, axis, None] + steps[None, :] * bin_size[:, axis, None]  # (R, O·ratio)
        axis_coords.append(_normalised(coords, size[axis]))
    gx, gy, gz = axis_coords
    sx, sy, sz = (o * sampling_ratio for o in out)
    # grid_sample's last grid dimension is ordered (W, H, D) = (z, y, x) for (N, C, D, H, W) input.
    grid = torch.stack(
        torch.broadcast_tensors(
            gz[:, None, None, :], gy[:, None, :, None], gx[:, :, None, None]
        ),
        dim=-1,
    ).to(features.dtype)  # (R, Sx, Sy, Sz, 3)

    # One grid_sample per volume: its RoIs are stacked along the output's first spatial axis, so
    # the feature map is never copied per RoI.
    for b in batch_index.unique().tolist():
        sel = (batch_index == b).nonzero(as_tuple=True)[0]
        g = grid[sel].reshape(1, sel.numel() * sx, sy, sz, 3)
        sampled = F.grid_sample(
            features[b : b + 1], g, mode="bilinear", padding_mode="border", align_corners=True
        )  # (1, C, R_b·Sx, Sy, Sz); "bilinear" is trilinear for 5D input
        # Average the sampling points of each bin: a ratio³ average pool (each RoI's Sx = Ox·ratio
        # rows along the first axis hold whole bins), much faster than a mean over strided axes.
        pooled = F.avg_pool3d(sampled, sampling_ratio) if sampling_ratio > 1 else sampled
        # grid_sample runs in fp32 under autocast: back to the features' dtype (bf16 there).
        result[sel] = pooled.reshape(c, sel.numel(), *out).transpose(0, 1).to(result.dtype)
    return result


def clip_to_volume(boxes_corner: Tensor, volume_shape) -> Tensor:
    """Clip corner-form boxes (..., 6), voxels, to the volume's extent: voxel centres run from 0 to
    size − 1, so the volume spans [−0.5, size − 0.5] along each axis."""
    upper = torch.as_tensor(volume_shape, dtype=boxes_corner.dtype, device=boxes_corner.device) - 0.5
    low = torch.maximum(boxes_corner[..., :3], torch.full_like(upper, -0.5))
    high = torch.minimum(boxes_corner[..., 3:], upper)
    low = torch.minimum(low, upper)  # a box entirely outside becomes a flat box on the edge
    high = torch.maximum(high, low)
    return torch.cat([low, high], dim=-1)


def generate_proposals(
    objectness: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    volume_shape,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_iou: float = RPN_NMS_IOU,
    min_size: float = MIN_PROPOSAL_SIZE,
) -> Tensor:
    """Stage-one proposals of a batch (no gradient).

    Per volume: the ``pre_nms_top_n`` anchors of highest objectness, decoded (Eq. 1), clipped to the
    volume, boxes with an edge under ``min_size`` dropped, NMS at ``nms_iou``, the best
    ``post_nms_top_n`` kept.

    Args:
        objectness: (N, A) logits.
        deltas: (N, A, 6).
        anchors: (A, 6) centre form, voxels.
        volume_shape: (X, Y, Z) of the (unpadded) input, voxels.

    Returns:
        (R, 7) rows ``[batch_index, x0, y0, z0, x1, y1, z1]`` (corner form, input voxels), each
        volume's proposals by decreasing objectness.
    """
    rois = []
    with torch.no_grad():
        for index, (scores, volume_deltas) in enumerate(zip(objectness.detach(), deltas.detach())):
            top_scores, top = scores.float().topk(min(pre_nms_top_n, scores.numel()))
            corner = box_ops.centre_to_corner(box_ops.decode(volume_deltas[top].float(), anchors[top]))
            corner = clip_to_volume(corner, volume_shape)
            large = ((corner[:, 3:] - corner[:, :3]) >= min_size).all(dim=1)
            corner, top_scores = corner[large], top_scores[large]
            keep = box_ops.nms(corner, top_scores, nms_iou, post_nms_top_n)
            batch_column = corner.new_full((keep.numel(), 1), float(index))
            rois.append(torch.cat([batch_column, corner[keep]], dim=1))
    return torch.cat(rois) if rois else anchors.new_zeros((0, 7))


class FasterRCNNModel(LandmarkModel):
    """Faster R-CNN on the shared backbone, see the module docstring.

    ``forward`` returns ``objectness`` (N, A), ``rpn_deltas`` (N, A, 6), ``anchors`` (A, 6) centre
    form voxels (A = cells of the fused map × 64), ``features`` (N, 4·width, X/4, Y/4, Z/4),
    ``rois`` (R, 7) ``[batch_index, corner form]`` in voxels, ``volume_shape`` (3,) int64; in eval
    mode also ``roi_logits`` (R, K+1) and ``roi_deltas`` (R, K, 6) (weighted Eq. 1 deltas w.r.t.
    the RoI).
    """

    method = "faster_rcnn"
    #: initial objectness probability of every anchor
    object_prior = 0.01

    def __init__(self, profile: Profile, iou_balance: bool = True):
        # iou_balance is accepted for a uniform interface; the paper has no IG Faster R-CNN.
        super().__init__(profile, iou_balance)
        extra = profile.extra
        self.pre_nms_top_n = {k: int(extra.get(f"frcnn_pre_nms_{k}", v)) for k, v in PRE_NMS_TOP_N.items()}
        self.post_nms_top_n = {k: int(extra.get(f"frcnn_post_nms_{k}", v)) for k, v in POST_NMS_TOP_N.items()}
        #: RoIs sampled per volume for stage two (64 at samples_per_volume = 256).
        self.rois_per_volume = int(extra.get("frcnn_rois_per_volume", max(32, profile.samples_per_volume // 4)))
        self.backbone = Backbone(profile.width, stride=detection_stride(profile), fusion=profile.fusion,
                                 block1_convs=profile.block1_convs)
        self.stride = self.backbone.stride
        channels = self.backbone.out_channels
        self.num_anchors_per_cell = self.anchors_per_cell()
        # Stage one.
        self.rpn_conv = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        self.rpn_cls = nn.Conv3d(channels, self.num_anchors_per_cell, kernel_size=1)
        self.rpn_reg = nn.Conv3d(channels, self.num_anchors_per_cell * 6, kernel_size=1)
        # Stage two: flatten -> FC -> ReLU -> FC (class logits and class-specific deltas).
        hidden = 16 * profile.width
        self.roi_fc = nn.Linear(channels * math.prod(ROI_OUTPUT_SIZE), hidden)
        self.roi_cls = nn.Linear(hidden, self.num_classes + 1)
        self.roi_reg = nn.Linear(hidden, self.num_classes * 6)
        self.register_buffer("roi_delta_weights", torch.tensor(ROI_DELTA_WEIGHTS), persistent=False)
        self._init_heads()

    def _init_heads(self) -> None:
        # Objectness starts at p = 0.01 (nearly every anchor is background), deltas near 0 so the
        # first proposals are the anchors themselves.
        nn.init.normal_(self.rpn_cls.weight, std=0.01)
        nn.init.constant_(self.rpn_cls.bias, math.log(self.object_prior / (1 - self.object_prior)))
        nn.init.normal_(self.rpn_reg.weight, std=0.001)
        nn.init.zeros_(self.rpn_reg.bias)
        nn.init.normal_(self.roi_cls.weight, std=0.01)
        nn.init.zeros_(self.roi_cls.bias)
        nn.init.normal_(self.roi_reg.weight, std=0.001)
        nn.init.zeros_(self.roi_reg.bias)

    def box_head(self, features: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
        """Stage two on RoIs (R, 7): class logits (R, K+1) and weighted deltas (R, K, 6)."""
        pooled = roi_align_3d(features, rois, 1.0 / self.stride, ROI_OUTPUT_SIZE, ROI_SAMPLING_RATIO)
        hidden = F.relu(self.roi_fc(pooled.flatten(1)))
        return self.roi_cls(hidden), self.roi_reg(hidden).view(-1, self.num_classes, 6)

    def forward(self, volumes: Tensor) -> dict[str, Tensor]:
        """volumes: (N, 1, X, Y, Z), padded here to multiples of 8 (high end); see the class
        docstring for the outputs."""
        volume_shape = tuple(volumes.shape[2:])
        features = self.backbone(pad_to_multiple(volumes))["features"]
        hidden = conv3d_relu(self, "rpn_conv", self.rpn_conv, features)
        if fast_path_applies(self, hidden):
            # The 1×1×1 heads as matrix products on the channels-last map (no permute-copy).
            objectness = pointwise_head(hidden, self.rpn_cls, 1)[..., 0]
            rpn_deltas = pointwise_head(hidden, self.rpn_reg, 6)
        else:
            objectness = flatten_anchor_outputs(self.rpn_cls(hidden), self.num_anchors_per_cell, 1)[..., 0]
            rpn_deltas = flatten_anchor_outputs(self.rpn_reg(hidden), self.num_anchors_per_cell, 6)
        anchors = self.anchors(features.shape[2:], self.stride, device=features.device)
        phase = "train" if self.training else "test"
        rois = generate_proposals(
            objectness, rpn_deltas, anchors, volume_shape, self.pre_nms_top_n[phase], self.post_nms_top_n[phase]
        )
        outputs = {
            "objectness": objectness, "rpn_deltas": rpn_deltas, "anchors": anchors, "features": features,
            "rois": rois, "volume_shape": torch.tensor(volume_shape, dtype=torch.int64),
        }
        if not self.training:
            outputs["roi_logits"], outputs["roi_deltas"] = self.box_head(features, rois)
        return outputs

    def _rpn_loss(self, outputs, gt_corner: Tensor, generator) -> tuple[Tensor, Tensor]:
        """Binary objectness (BCE) on sampled anchors and smooth-L1 on the sampled positives."""
        objectness, deltas, anchors = outputs["objectness"], outputs["rpn_deltas"], outputs["anchors"]
        anchors_corner = self.corner_anchors(anchors)
        object_labels = torch.ones(gt_corner.shape[1], dtype=torch.int64, device=anchors.device)
        chosen_volume, chosen_anchor, targets, pos_volume, pos_anchor, pos_targets = [], [], [], [], [], []
        for volume_index, gt in enumerate(gt_corner):
            gt_centre = box_ops.corner_to_centre(gt)
            labels, matched = self.label_anchors(anchors, anchors_corner, gt_centre, gt, object_labels)
            chosen = anchor_ops.sample_balanced(
                labels, self.profile.samples_per_volume, self.profile.positive_fraction, generator
            )
            positives = chosen[labels[chosen] > 0]
            chosen_volume.append(torch.full_like(chosen, volume_index))
            chosen_anchor.append(chosen)
            targets.append((labels[chosen] > 0).to(objectness.dtype))
            pos_volume.append(torch.full_like(positives, volume_index))
            pos_anchor.append(positives)
            pos_targets.append(box_ops.encode(gt_centre[matched[positives]], anchors[positives]))
        # One gather per output for the whole batch: each index's backward fills a zero tensor of
        # the full output, so per-volume gathers cost one such fill per volume.
        logits = objectness[torch.cat(chosen_volume), torch.cat(chosen_anchor)]
        pos_deltas = deltas[torch.cat(pos_volume), torch.cat(pos_anchor)]
        loss_cls = F.binary_cross_entropy_with_logits(logits, torch.cat(targets))
        loss_reg = smooth_l1(pos_deltas, torch.cat(pos_targets))
        return loss_cls, loss_reg

    def _sample_rois(self, rois: Tensor, gt_corner: Tensor, generator) -> tuple[Tensor, Tensor, Tensor]:
        """Stage-two training RoIs: per volume the proposals plus the GT boxes, labelled by IoU
        (≥ ``ROI_POS_IOU``: the GT's class, else background), ``rois_per_volume`` sampled with at
        most ``ROI_POSITIVE_FRACTION`` positive.

        Returns RoIs (S, 7), labels (S,) int64 and matched GT boxes (S, 6) corner form."""
        sampled_rois, sampled_labels, sampled_gt = [], [], []
        for volume_index, gt in enumerate(gt_corner):
            boxes = torch.cat([rois[rois[:, 0] == volume_index, 1:], gt])
            best_iou, matched = box_ops.box_iou(boxes, gt).max(dim=1)
            labels = torch.where(best_iou >= ROI_POS_IOU, matched + 1, torch.zeros_like(matched))
            chosen = anchor_ops.sample_balanced(labels, self.rois_per_volume, ROI_POSITIVE_FRACTION, generator)
            batch_column = boxes.new_full((chosen.numel(), 1), float(volume_index))
            sampled_rois.append(torch.cat([batch_column, boxes[chosen]], dim=1))
            sampled_labels.append(labels[chosen])
            sampled_gt.append(gt[matched[chosen]])
        return torch.cat(sampled_rois), torch.cat(sampled_labels), torch.cat(sampled_gt)

    def loss(self, outputs: dict[str, Tensor], landmarks_vox: Tensor) -> dict[str, Tensor]:
        """RPN objectness + RPN regression + RoI classification + RoI regression (see the module
        docstring). ``loss_cls``/``loss_reg`` in the log are the sums over both stages."""
        features = outputs["features"]
        landmarks_vox = self._check_landmarks(torch.as_tensor(landmarks_vox, device=features.device), features.shape[0])
        gt_corner = box_ops.centre_to_corner(self.gt_boxes(landmarks_vox))  # (N, 5, 6)
        generator = self.sampling_generator()
        rpn_cls, rpn_reg = self._rpn_loss(outputs, gt_corner, generator)

        rois, labels, matched_gt = self._sample_rois(outputs["rois"].detach(), gt_corner, generator)
        roi_logits, roi_deltas = self.box_head(features, rois)
        # A mirror pair is one class (p_a + p_b, as the RPN's and the SSD's) with class a's deltas.
        roi_cls = iou_balanced_cross_entropy(roi_logits, labels, torch.zeros(labels.shape, device=labels.device),
                                             enabled=False, mirror_pairs=self.mirror_pairs)
        positive = labels > 0
        pos_rois = box_ops.corner_to_centre(rois[positive, 1:])
        pos_pred = roi_deltas[positive, self._regression_class(labels[positive]) - 1]
        targets = box_ops.encode(box_ops.corner_to_centre(matched_gt[positive]), pos_rois) * self.roi_delta_weights
        roi_reg = smooth_l1(pos_pred, targets)
        with torch.no_grad():
            refined = box_ops.decode(pos_pred.detach() / self.roi_delta_weights, pos_rois)
            pos_iou = box_ops.paired_box_iou(box_ops.centre_to_corner(refined), matched_gt[positive])
        return {
            "loss": rpn_cls + rpn_reg + roi_cls + roi_reg,
            "loss_cls": (rpn_cls + roi_cls).detach(),
            "loss_reg": (rpn_reg + roi_reg).detach(),
            "loss_rpn_cls": rpn_cls.detach(),
            "loss_rpn_reg": rpn_reg.detach(),
            "loss_roi_cls": roi_cls.detach(),
            "loss_roi_reg": roi_reg.detach(),
            "num_pos": positive.sum().float(),
            "mean_pos_iou": pos_iou.mean() if pos_iou.numel() else pos_iou.new_zeros(()),
        }

    def _regression_class(self, labels: Tensor) -> Tensor:
        """The class whose deltas regress a RoI of class ``labels``: its own, class a for a mirror pair's b."""
        for a, b in self.mirror_pairs:
            labels = torch.where(labels == b, torch.full_like(labels, a), labels)
        return labels

    @torch.no_grad()
    @single_threaded
    def candidates(self, outputs: dict[str, Tensor], top_k: int | None = None) -> list[list[tuple[Tensor, Tensor]]]:
        """Per volume and landmark, up to ``top_k`` boxes (``None``: ``profile.top_k``; 2·top_k for
        a merged mirror pair): stage-two softmax score of the class, the RoI refined by that class's
        deltas and clipped to the volume, per-class NMS at ``profile.nms_iou``.

        Returns ``[volume][landmark] = (boxes (n, 6) centre form voxels, scores (n,))``."""
        top_k = self.profile.top_k if top_k is None else int(top_k)
        rois = outputs["rois"]
        if "roi_logits" in outputs:
            roi_logits, roi_deltas = outputs["roi_logits"], outputs["roi_deltas"]
        else:  # a training-mode forward stops after the proposals
            roi_logits, roi_deltas = self.box_head(outputs["features"], rois)
        volume_shape = outputs["volume_shape"].tolist()
        proposals = box_ops.corner_to_centre(rois[:, 1:])[:, None, :]  # (R, 1, 6)
        boxes = box_ops.decode(roi_deltas.float() / self.roi_delta_weights, proposals)  # (R, K, 6)
        boxes = box_ops.corner_to_centre(clip_to_volume(box_ops.centre_to_corner(boxes), volume_shape))
        scores = torch.softmax(roi_logits.float(), dim=-1)[:, 1:]  # (R, K)
        results = []
        for volume_index in range(outputs["features"].shape[0]):
            mine = rois[:, 0] == volume_index
            results.append(select_per_class(boxes[mine], scores[mine], self.profile.nms_iou, top_k, int(mine.sum()),
                                            self.mirror_pairs))
        return results
