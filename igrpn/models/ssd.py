"""SSD baseline of Table 1/2 (docs/design.md §5), on the shared backbone: "we replace the detection part of
our model" with a one-stage multi-scale detector (Liu et al., SSD).

* Two feature scales: the backbone's detection map (``features``: the fused stride-4 map, or its
  stride-2 refinement at half the paper's resolution, see ``model.detection_stride``) and block 4 (stride 8, 8·width
  channels), each with its own 3×3×3 convolutions giving K+1 class logits and 6 deltas per anchor.
* Anchors (decision): the two smaller of ``profile.anchor_sizes_mm`` on the stride-4 map and the
  two larger on the stride-8 map, every (w, h, d) combination of the pair: 2³ = 8 anchors per cell
  on each map (at 1.3 mm: {13, 16} voxels at stride 4, {20, 28} voxels at stride 8).
* Matching as the RPN (:func:`igrpn.boxes.match_anchors`, the profile's IoU thresholds); every
  positive is used, and the negatives are the hardest ones by background loss, 3 per positive per
  volume (hard negative mining). The classification loss over the positives and the mined
  negatives is the K+1 softmax cross-entropy, IoU-balanced on the positives (Eq. 2-3) when
  ``iou_balance`` is on (IG-SSD); regression is smooth-L1 on the positives. Beyond the paper,
  ``profile.classification_anchors = "all"`` replaces the miner by the RPN's focal loss over every
  anchor (:func:`igrpn.losses.iou_balanced_focal_loss`); the default ``"sampled"`` is SSD's miner.
* Candidates: softmax, decode, per-class top scores, NMS at ``profile.nms_iou``, ``top_k`` per class.

``forward`` returns the same keys as the RPN: ``cls_logits`` (N, A, K+1), ``deltas`` (N, A, 6) and
``anchors`` (A, 6) centre form in voxels, A = 8·(cells of the stride-4 map) + 8·(cells of the
stride-8 map), the stride-4 anchors first (each scale cell-major, anchor-minor as make_anchors).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from igrpn import boxes as box_ops
from igrpn import anchors as anchor_ops
from igrpn.config import Profile
from igrpn.losses import iou_balanced_cross_entropy, iou_balanced_focal_loss, smooth_l1
from igrpn.models.backbone import Backbone, detection_stride, pad_to_multiple
from igrpn.models.base import LandmarkModel
from igrpn.models.fast_cpu import fast_conv3d, single_threaded
from igrpn.models.postprocess import anchor_candidates

#: Negatives kept per positive by the hard negative miner (Liu et al., SSD).
NEGATIVES_PER_POSITIVE = 3


def hard_negative_mask(
    background_loss: Tensor, labels: Tensor, negatives_per_positive: int = NEGATIVES_PER_POSITIVE
) -> Tensor:
    """Hard negative mining: per volume, the ``negatives_per_positive × P`` negatives with the
    highest background loss, P being that volume's number of positives.

    Args:
        background_loss: (N, A) loss of each anchor for the background class (−log p₀).
        labels: (N, A) int64 anchor labels: −1 ignored, 0 negative, c > 0 positive.
        negatives_per_positive: ratio of kept negatives to positives.

    Returns:
        (N, A) bool, True for the kept negatives (never a positive or an ignored anchor). A volume
        with fewer negatives than wanted keeps them all; one with no positive keeps none.
    """
    if background_loss.shape != labels.shape or background_loss.ndim != 2:
        raise ValueError(
            f"hard_negative_mask: background_loss {tuple(background_loss.shape)} and labels "
            f"{tuple(labels.shape)} must both be (N, A)"
        )
    is_negative = labels == 0
    num_keep = (labels > 0).sum(dim=1, keepdim=True) * negatives_per_positive  # (N, 1)
    # Rank the negatives by decreasing loss; the other anchors sort last.
    loss = torch.where(is_negative, background_loss.detach(), torch.full_like(background_loss, -math.inf))
    order = loss.argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1)  # rank[i, a] = position of anchor a in the sorted order
    return is_negative & (rank < num_keep)


def flatten_anchor_outputs(x: Tensor, num_anchors: int, per_anchor: int) -> Tensor:
    """Head output (N, A·C, X, Y, Z), channel ``a·C + c`` -> (N, X·Y·Z·A, C), the row order of
    :func:`igrpn.boxes.make_anchors` (cell-major, anchor-minor)."""
    n, _, gx, gy, gz = x.shape
    x = x.view(n, num_anchors, per_anchor, gx, gy, gz)
    return x.permute(0, 3, 4, 5, 1, 2).reshape(n, -1, per_anchor)


def select_per_class(
    boxes: Tensor, scores: Tensor, nms_iou: float, top_k: int, pre_nms_top_n: int = 1000, mirror_pairs=()
) -> list[tuple[Tensor, Tensor]]:
    """Per-class candidates of one volume: the ``pre_nms_top_n`` best-scored boxes of each class,
    greedy NMS at ``nms_iou``, at most ``top_k`` kept.

    Args:
        boxes: (A, 6) class-agnostic or (A, K, 6) class-specific boxes, centre form, voxels.
        scores: (A, K) score of each box for each landmark class (background excluded).
        nms_iou: NMS IoU threshold.
        top_k: boxes kept per class.
        pre_nms_top_n: boxes per class entering NMS.
        mirror_pairs: class-id pairs (a, b) scored as one class: score p_a + p_b, class a's boxes,
            up to ``2·top_k`` kept (two places per rank), the same list for both.

    Returns:
        K tuples ``(boxes (n, 6), scores (n,))`` by decreasing score, n <= top_k (2·top_k for a
        mirror pair).
    """
    if scores.ndim != 2 or boxes.shape[0] != scores.shape[0] or boxes.shape[-1] != 6:
        raise ValueError(
            f"select_per_class: expected boxes (A, 6) or (A, K, 6) and scores (A, K), got "
            f"{tuple(boxes.shape)} and {tuple(scores.shape)}"
        )
    pair_of = {b - 1: a - 1 for a, b in mirror_pairs}
    if mirror_pairs:
        scores = scores.clone()
        for a, b in mirror_pairs:
            scores[:, a - 1] += scores[:, b - 1]
    keep_n = min(int(pre_nms_top_n), scores.shape[0])
    top_scores, top_index = scores.topk(keep_n, dim=0)  # (keep_n, K) each
    results = []
    for c in range(scores.shape[1]):
        if c in pair_of:
            results.append(results[pair_of[c]])  # the merged class's list (a < b: built already)
            continue
        index = top_index[:, c]
        class_boxes = boxes[index] if boxes.ndim == 2 else boxes[index, c]
        wanted = 2 * top_k if c in pair_of.values() else top_k
        keep = box_ops.nms(box_ops.centre_to_corner(class_boxes), top_scores[:, c], nms_iou, wanted)
        results.append((class_boxes[keep], top_scores[keep, c]))
    return results


class SSDModel(LandmarkModel):
    """SSD on the shared backbone (IG-SSD with ``iou_balance=True``), see the module docstring."""

    method = "ssd"
    #: anchors per class decoded in the first round of :meth:`candidates`' NMS (more when needed)
    nms_prefix = 256
    #: initial background probability of every anchor (as the RPN head)
    background_prior = 0.99

    def __init__(self, profile: Profile, iou_balance: bool = True):
        super().__init__(profile, iou_balance)
        sizes = sorted(self.anchor_sizes_vox())
        if len(sizes) < 2:
            raise ValueError(f"profile {profile.name!r}: SSD needs at least 2 anchor sizes, got {sizes}")
        if profile.classification_anchors not in ("sampled", "all"):
            raise ValueError(f"profile {profile.name!r}: the SSD's classification_anchors must be 'sampled' (its "
                             f"3:1 hard negatives) or 'all' (focal loss), got {profile.classification_anchors!r}")
        half = len(sizes) // 2
        self.backbone = Backbone(profile.width, stride=detection_stride(profile), fusion=profile.fusion,
                                 block1_convs=profile.block1_convs)
        # (feature key, stride, anchor base sizes in voxels) of each scale.
        self.scales = (
            ("features", self.backbone.stride, tuple(sizes[:half])),
            ("block4", self.backbone.block_strides[3], tuple(sizes[half:])),
        )
        in_channels = (self.backbone.out_channels, self.backbone.block_channels[3])
        self.anchors_per_scale = tuple(self.anchors_per_cell(len(s)) for _, _, s in self.scales)
        outputs = self.num_classes + 1
        self.cls_heads = nn.ModuleList(
            nn.Conv3d(c, a * outputs, kernel_size=3, padding=1) for c, a in zip(in_channels, self.anchors_per_scale)
        )
        self.reg_heads = nn.ModuleList(
            nn.Conv3d(c, a * 6, kernel_size=3, padding=1) for c, a in zip(in_channels, self.anchors_per_scale)
        )
        self._init_heads()

    def _init_heads(self) -> None:
        # As the RPN head: every anchor starts at p(background) = 0.99, deltas start near 0.
        background_bias = math.log(self.background_prior * self.num_classes / (1 - self.background_prior))
        for cls_head, reg_head, anchors in zip(self.cls_heads, self.reg_heads, self.anchors_per_scale):
            nn.init.normal_(cls_head.weight, std=0.01)
            bias = torch.zeros(anchors, self.num_classes + 1)
            bias[:, 0] = background_bias
            with torch.no_grad():
                cls_head.bias.copy_(bias.reshape(-1))
            nn.init.normal_(reg_head.weight, std=0.001)
            nn.init.zeros_(reg_head.bias)

    def forward(self, volumes: Tensor) -> dict[str, Tensor]:
        """volumes: (N, 1, X, Y, Z), padded here to multiples of 8 (high end).

        Returns ``cls_logits`` (N, A, K+1), ``deltas`` (N, A, 6), ``anchors`` (A, 6) centre form,
        voxels (stride-4 anchors first, then stride-8).
        """
        features = self.backbone(pad_to_multiple(volumes))
        logits, deltas, grids = [], [], []
        for (key, stride, sizes), cls_head, reg_head, per_cell in zip(
            self.scales, self.cls_heads, self.reg_heads, self.anchors_per_scale
        ):
            feature = features[key]
            # fast_conv3d: one oneDNN call on the inference fast path (igrpn.models.fast_cpu), else cls_head(x).
            cls_out = fast_conv3d(self, f"cls_{key}", cls_head, feature)
            reg_out = fast_conv3d(self, f"reg_{key}", reg_head, feature)
            logits.append(flatten_anchor_outputs(cls_out, per_cell, self.num_classes + 1))
            deltas.append(flatten_anchor_outputs(reg_out, per_cell, 6))
            grids.append((feature.shape[2:], stride, sizes))
        anchors = self.concatenated_anchors(grids, device=volumes.device)
        return {"cls_logits": torch.cat(logits, 1), "deltas": torch.cat(deltas, 1), "anchors": anchors}

    def loss(self, outputs: dict[str, Tensor], landmarks_vox: Tensor) -> dict[str, Tensor]:
        """Softmax cross-entropy on all positives and the 3:1 hardest negatives (IoU-balanced on the
        positives when ``iou_balance``), smooth-L1 on the positives' deltas.

        The IoU of a positive is between its decoded predicted box and its GT (no gradient).
        """
        logits, deltas, anchors = outputs["cls_logits"], outputs["deltas"], outputs["anchors"]
        landmarks_vox = self._check_landmarks(torch.as_tensor(landmarks_vox, device=logits.device), logits.shape[0])
        anchors_corner = self.corner_anchors(anchors)
        gt_labels = torch.arange(1, self.num_classes + 1, device=logits.device)
        gt_centre = self.gt_boxes(landmarks_vox)  # (N, 5, 6)

        # Match every volume's anchors to its five GT cubes (IoUs only near the cubes).
        labels, matched = zip(*(
            anchor_ops.match_anchors(anchors_corner, g, gt_labels, self.profile.pos_iou, self.profile.neg_iou,
                                  candidates=self.anchors_near(anchors, g, self.profile.neg_iou))
            for g in box_ops.centre_to_corner(gt_centre)
        ))
        labels, matched = torch.stack(labels), torch.stack(matched)  # (N, A) each
        dense = self.profile.classification_anchors == "all"
        if not dense:
            background_loss = -F.log_softmax(logits.detach().float(), dim=-1)[..., 0]  # fp32 under autocast too
            selected = (labels > 0) | hard_negative_mask(background_loss, labels)

        positive = labels > 0
        volume_index, anchor_index = torch.nonzero(positive, as_tuple=True)
        pos_gt = gt_centre[volume_index, matched[positive]]  # (P, 6)
        pos_anchors = anchors[anchor_index]
        pos_deltas = deltas[positive]
        # IoU of the regressed box with its GT: a weight only, no gradient (Eq. 3).
        with torch.no_grad():
            decoded = box_ops.centre_to_corner(box_ops.decode(pos_deltas.detach(), pos_anchors))
            pos_iou = box_ops.paired_box_iou(decoded, box_ops.centre_to_corner(pos_gt))
        ious = torch.zeros(labels.shape, device=logits.device)
        ious[positive] = pos_iou

        if dense:
            loss_cls = iou_balanced_focal_loss(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ious.reshape(-1),
                gamma=self.profile.focal_gamma, eta=self.profile.eta, enabled=self.iou_balance,
                mirror_pairs=self.mirror_pairs,
            )
        else:
            loss_cls = iou_balanced_cross_entropy(
                logits[selected], labels[selected], ious[selected], eta=self.profile.eta, enabled=self.iou_balance,
                mirror_pairs=self.mirror_pairs,
            )
        loss_reg = smooth_l1(pos_deltas, box_ops.encode(pos_gt, pos_anchors))
        num_pos = positive.sum()
        return {
            "loss": loss_cls + loss_reg,
            "loss_cls": loss_cls.detach(),
            "loss_reg": loss_reg.detach(),
            "num_pos": num_pos.float(),
            "mean_pos_iou": pos_iou.mean() if bool(num_pos) else pos_iou.new_zeros(()),
        }

    @torch.no_grad()
    @single_threaded
    def candidates(self, outputs: dict[str, Tensor], top_k: int | None = None) -> list[list[tuple[Tensor, Tensor]]]:
        """Per volume and landmark, up to ``top_k`` boxes (``None``: ``profile.top_k``): softmax over
        K+1, decode, greedy NMS at ``profile.nms_iou`` over all anchors of each class (as the RPN,
        :func:`igrpn.models.postprocess.anchor_candidates`).

        Returns ``[volume][landmark] = (boxes (n, 6) centre form voxels, scores (n,))``."""
        top_k = self.profile.top_k if top_k is None else int(top_k)
        anchors = outputs["anchors"]
        results = []
        for volume_logits, volume_deltas in zip(outputs["cls_logits"], outputs["deltas"]):
            # The best anchors of each class without a softmax and a top-k over all of them, as the
            # RPN (igrpn.models.postprocess.top_anchors_per_class; each cell's anchors form a group); only
            # they are decoded. Ranking on log p is ranking on p.
            results.append(anchor_candidates(volume_logits, volume_deltas, anchors, self.nms_prefix,
                                             math.gcd(*self.anchors_per_scale), self.profile.nms_iou, top_k,
                                             self.mirror_pairs))
        return results
