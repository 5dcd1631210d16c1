"""The IG-RPN detector (paper §2.2; docs/design.md §5): an RPN head on the shared backbone.

A 3×3×3 conv, then two sibling 1×1×1 convs give K+1 class logits and 6 deltas per anchor; the loss
is the IoU-balanced classification loss (Eq. 2–3) plus smooth-L1 on the positives. Tensors are
(N, C, X, Y, Z); boxes are centre form ``(x, y, z, w, h, d)`` in voxels of the input volume.
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
from igrpn.models.backbone import Backbone, detection_stride, head_groups, pad_to_multiple
from igrpn.models.base import LandmarkModel
from igrpn.models.fast_cpu import conv3d_relu, fast_path_applies, single_threaded
from igrpn.models.postprocess import anchor_candidates


def pointwise_head(features: Tensor, conv: nn.Conv3d, per_anchor: int) -> Tensor:
    """A 1×1×1 head conv with A·C output channels (channel ``a·C + c``), flattened like
    :meth:`RPNModel._flatten`, computed as one matrix product over channels.

    The 1×1×1 conv is a linear map of each cell's channel vector, so applying it to the
    channels-last view (N, X, Y, Z, Cin) gives (N, X, Y, Z, A·C) whose rows are already in
    make_anchors' cell-major, anchor-minor order: a free reshape instead of the permute-copy of a
    conv output, and one GEMM instead of a conv call.

    Args:
        features: (N, Cin, X, Y, Z).
        conv: a 1×1×1 Conv3d (groups 1) with A·``per_anchor`` output channels.

    Returns:
        (N, X·Y·Z·A, per_anchor).
    """
    if conv.kernel_size != (1, 1, 1) or conv.groups != 1 or conv.stride != (1, 1, 1):
        raise ValueError(f"pointwise_head: expected a 1×1×1 conv with stride 1 and groups 1, got {conv}")
    out = F.linear(features.permute(0, 2, 3, 4, 1), conv.weight.flatten(1), conv.bias)
    return out.reshape(features.shape[0], -1, per_anchor)


def class_major_head(features: Tensor, conv: nn.Conv3d, per_anchor: int, reference: int | None = None) -> Tensor:
    """:func:`pointwise_head` with the result stored class-major: the same (N, X·Y·Z·A, C) values
    (C = ``per_anchor``), held as the transpose of a contiguous (N, C, X·Y·Z·A) tensor.

    The post-processing reads every anchor's scores class by class (:func:`top_anchors_per_class`);
    on this layout each class is one contiguous row, where the cell-major layout makes every read
    a stride-C gather. Written directly by a batched matrix product, one (cells, Cin) × (Cin, A)
    per class, it costs about what the cell-major product costs, where transposing afterwards would
    cost far more (benchmarks/NOTES.md §6).

    Args:
        features: (N, Cin, X, Y, Z).
        conv: a 1×1×1 Conv3d (groups 1) with A·``per_anchor`` output channels (channel a·C + c).
        reference: a class whose logit is subtracted from every class's, per anchor (its own row
            is then 0): the softmax is unchanged, and a class's margin over the reference is read
            straight from memory. The difference is linear in the features, so it is computed
            from weight differences at no extra cost. ``None``: the logits themselves.

    Returns:
        (N, X·Y·Z·A, C) with strides (C·X·Y·Z·A, 1, X·Y·Z·A).
    """
    if conv.kernel_size != (1, 1, 1) or conv.groups != 1 or conv.stride != (1, 1, 1):
        raise ValueError(f"class_major_head: expected a 1×1×1 conv with stride 1 and groups 1, got {conv}")
    batch, in_channels = features.shape[:2]
    cells = features.permute(0, 2, 3, 4, 1).reshape(batch, -1, in_channels)  # (N, cells, Cin)
    num_anchors = conv.out_channels // per_anchor
    weight = conv.weight.view(num_anchors, per_anchor, in_channels).permute(1, 2, 0)  # (C, Cin, A)
    bias = (conv.bias if conv.bias is not None else conv.weight.new_zeros(conv.out_channels))
    bias = bias.view(num_anchors, per_anchor).t()  # (C, A)
    if reference is not None:
        weight, bias = weight - weight[reference], bias - bias[reference]
    out = features.new_empty(batch, per_anchor, cells.shape[1], num_anchors)  # (N, C, cells, A)
    for n in range(batch):
        # One batched product over the classes (the cells' rows broadcast, not copied).
        torch.baddbmm(bias[:, None, :], cells[n].expand(per_anchor, -1, -1), weight, out=out[n])
        if reference is not None:
            out[n, reference].zero_()  # exactly 0 (a product of zero weights may give −0.0)
    return out.view(batch, per_anchor, -1).transpose(1, 2)


class RPNModel(LandmarkModel):
    """IG-RPN (paper §2.2): backbone + 3D RPN head with K+1 class scores and 6 deltas per anchor.

    ``forward`` returns ``cls_logits`` (N, cells·A, K+1), ``deltas`` (N, cells·A, 6) and
    ``anchors`` (cells·A, 6) centre form in voxels, row-aligned (cell-major, anchor-minor). On the
    CPU inference fast path ``cls_logits`` is stored class-major and shifted per anchor so that the
    background logit is 0 (:func:`class_major_head`): the same softmax, another memory layout.
    """

    method = "rpn"
    #: anchors per class decoded in the first round of :meth:`candidates`' NMS (more when needed;
    #: 256 rarely needs a second round on the trained cpu RPN, 64 often did)
    nms_prefix = 256
    #: initial background probability of every anchor
    background_prior = 0.99

    def __init__(self, profile: Profile, iou_balance: bool = True):
        super().__init__(profile, iou_balance)
        self.backbone = Backbone(profile.width, stride=detection_stride(profile), norm=profile.backbone_norm,
                                 fusion=profile.fusion, block1_convs=profile.block1_convs)
        self.stride = self.backbone.stride
        channels = self.backbone.out_channels
        self.num_anchors_per_cell = self.anchors_per_cell()
        num_outputs = self.num_classes + 1
        # The paper's head is one 3×3×3 conv; ``head_convs`` > 1 puts [3×3×3 conv, GroupNorm, ReLU]
        # layers before it, as RetinaNet's heads (beyond the paper).
        self.head_tower = nn.Sequential(*[layer for _ in range(profile.head_convs - 1) for layer in (
            nn.Conv3d(channels, channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(head_groups(channels), channels), nn.ReLU(inplace=True))])
        self.head_tower.to(memory_format=torch.channels_last_3d)
        self.head_conv = nn.Conv3d(channels, channels, kernel_size=3, padding=1)
        self.cls_conv = nn.Conv3d(channels, self.num_anchors_per_cell * num_outputs, kernel_size=1)
        self.reg_conv = nn.Conv3d(channels, self.num_anchors_per_cell * 6, kernel_size=1)
        self._init_head()

    def _init_head(self) -> None:
        # Class logits: nearly all of the ~10⁵ anchors of a volume are background, so start every
        # anchor at p(background) = 0.99 (the focal-loss prior): scores and losses are sensible from
        # the first step instead of a uniform 1/(K+1) everywhere. With zero weights for the other
        # classes, softmax gives p_bg = e^b / (e^b + K) = prior  =>  b = log(prior·K / (1 − prior)).
        nn.init.normal_(self.cls_conv.weight, std=0.01)
        bias = torch.zeros(self.num_anchors_per_cell, self.num_classes + 1)
        bias[:, 0] = math.log(self.background_prior * self.num_classes / (1 - self.background_prior))
        with torch.no_grad():
            self.cls_conv.bias.copy_(bias.reshape(-1))
        # Deltas: small weights so the first decoded boxes are the anchors themselves (exp(t) ≈ 1);
        # large random deltas would give meaningless boxes and IoUs for the IoU-balanced weights.
        nn.init.normal_(self.reg_conv.weight, std=0.001)
        nn.init.zeros_(self.reg_conv.bias)

    def _flatten(self, x: Tensor, per_anchor: int) -> Tensor:
        """(N, A·C, X, Y, Z) -> (N, X·Y·Z·A, C), matching make_anchors' cell-major order."""
        n, _, gx, gy, gz = x.shape
        x = x.view(n, self.num_anchors_per_cell, per_anchor, gx, gy, gz)
        return x.permute(0, 3, 4, 5, 1, 2).reshape(n, -1, per_anchor)

    def forward(self, volumes: Tensor) -> dict[str, Tensor]:
        """volumes: (N, 1, X, Y, Z), padded here to multiples of 8 (high end)."""
        features = self.backbone(pad_to_multiple(volumes))["features"]
        hidden = conv3d_relu(self, "head_conv", self.head_conv, self.head_tower(features))
        if fast_path_applies(self, hidden):
            # The 1×1×1 heads as matrix products on the channels-last map (no permute-copy); the
            # class logits stored class-major and relative to the background, as the
            # post-processing reads them (top_anchors_per_class).
            cls_logits = class_major_head(hidden, self.cls_conv, self.num_classes + 1, reference=0)
            deltas = pointwise_head(hidden, self.reg_conv, 6)
        else:
            cls_logits = self._flatten(self.cls_conv(hidden), self.num_classes + 1)
            deltas = self._flatten(self.reg_conv(hidden), 6)
        anchors = self.anchors(features.shape[2:], self.stride, device=features.device)
        return {"cls_logits": cls_logits, "deltas": deltas, "anchors": anchors}

    def loss(self, outputs: dict[str, Tensor], landmarks_vox: Tensor) -> dict[str, Tensor]:
        """IoU-balanced classification + smooth-L1 regression (paper Eq. 2–3).

        Per volume: match the anchors to the five GT cubes. With ``classification_anchors =
        "sampled"``, sample ``profile.samples_per_volume`` anchors with at most
        ``positive_fraction`` positives (plus, when the profile asks for it, the
        ``hard_negatives_per_volume`` background anchors scored most like a landmark); the
        classification loss is the mean over the sampled anchors of the batch. With ``"all"``,
        every non-ignored anchor enters a focal, IoU-balanced loss divided by the number of
        positives (:func:`iou_balanced_focal_loss`). The IoU of a positive is between its decoded
        *predicted* box and its GT (no gradient); regression is the mean over the positives used.
        """
        logits, deltas, anchors = outputs["cls_logits"], outputs["deltas"], outputs["anchors"]
        landmarks_vox = self._check_landmarks(torch.as_tensor(landmarks_vox, device=logits.device), logits.shape[0])
        anchors_corner = self.corner_anchors(anchors)
        gt_labels = torch.arange(1, self.num_classes + 1, device=logits.device)
        generator = self.sampling_generator()
        gt_centres = self.gt_boxes(landmarks_vox)  # (N, 5, 6)
        dense = self.profile.classification_anchors == "all"
        chosen_volume, chosen_anchor, chosen_labels, pos_volume, pos_anchor, pos_gt = [], [], [], [], [], []
        all_labels = []
        for volume_index, gt_centre in enumerate(gt_centres):
            gt_corner = box_ops.centre_to_corner(gt_centre)
            labels, matched = self.label_anchors(anchors, anchors_corner, gt_centre, gt_corner, gt_labels)
            if dense:
                # Every anchor enters the classification loss; every positive is regressed.
                all_labels.append(labels)
                chosen = torch.nonzero(labels > 0).flatten()
            elif self.profile.classification_anchors == "hard_pool":
                chosen = self._hard_pool_sample(logits[volume_index], labels, generator)
            elif self.profile.classification_anchors == "near_face":
                chosen = self._near_face_sample(anchors, labels, gt_corner, generator)
            else:
                chosen = anchor_ops.sample_balanced(
                    labels, self.profile.samples_per_volume, self.profile.positive_fraction, generator
                )
            if self.profile.hard_negatives_per_volume and not dense:
                chosen = torch.cat([chosen, self._hard_negatives(logits[volume_index], labels, chosen, anchors,
                                                                 gt_centre)])
            positives = chosen[labels[chosen] > 0]
            chosen_volume.append(torch.full_like(chosen, volume_index))
            chosen_anchor.append(chosen)
            chosen_labels.append(labels[chosen])
            pos_volume.append(torch.full_like(positives, volume_index))
            pos_anchor.append(positives)
            pos_gt.append(gt_centre[matched[positives]])
        # One gather per output for the whole batch (the sampled anchors of volume 0 first, each
        # volume's positives first): each index's backward fills a zero tensor of the full output.
        chosen_volume, chosen_anchor = torch.cat(chosen_volume), torch.cat(chosen_anchor)
        pos_volume, pos_anchor, pos_gt = torch.cat(pos_volume), torch.cat(pos_anchor), torch.cat(pos_gt)
        labels = torch.cat(chosen_labels)
        pred = deltas[pos_volume, pos_anchor]
        pos_anchors = anchors[pos_anchor]
        # IoU of the regressed box with its GT: a weight only, no gradient (Eq. 3).
        with torch.no_grad():
            decoded = box_ops.centre_to_corner(box_ops.decode(pred.detach(), pos_anchors))
            pos_iou = box_ops.paired_box_iou(decoded, box_ops.centre_to_corner(pos_gt))
        ious = torch.zeros(labels.numel(), device=logits.device)
        ious[labels > 0] = pos_iou
        if dense:
            flat_labels = torch.cat(all_labels)  # (N·A,), volume-major like the flattened logits
            flat_ious = torch.zeros(flat_labels.numel(), device=logits.device)
            flat_ious[pos_volume * anchors.shape[0] + pos_anchor] = pos_iou
            loss_cls = iou_balanced_focal_loss(
                logits.reshape(-1, logits.shape[-1]), flat_labels, flat_ious, gamma=self.profile.focal_gamma,
                eta=self.profile.eta, enabled=self.iou_balance, mirror_pairs=self.mirror_pairs,
            )
        else:
            loss_cls = iou_balanced_cross_entropy(
                logits[chosen_volume, chosen_anchor], labels, ious, eta=self.profile.eta, enabled=self.iou_balance,
                mirror_pairs=self.mirror_pairs,
            )
        loss_reg = smooth_l1(pred, box_ops.encode(pos_gt, pos_anchors))
        is_pos = labels > 0
        num_pos = is_pos.sum()
        mean_pos_iou = ious[is_pos].mean() if bool(num_pos) else ious.new_zeros(())
        return {
            "loss": loss_cls + self.profile.regression_weight * loss_reg,
            "loss_cls": loss_cls.detach(),
            "loss_reg": loss_reg.detach(),
            "num_pos": num_pos.float(),
            "mean_pos_iou": mean_pos_iou.detach(),
        }

    def _sampled_positives(self, labels: Tensor, generator: torch.Generator) -> Tensor:
        """The positives ``sample_balanced`` would draw from ``labels`` (A,), without negatives."""
        return anchor_ops.sample_balanced(torch.where(labels > 0, labels, -1), self.profile.samples_per_volume,
                                       self.profile.positive_fraction, generator)

    def _cells_centred_in(self, anchors: Tensor, boxes_corner: Tensor, margin: float = 0.0) -> Tensor:
        """(cells,) bool: cells whose centre lies inside one of ``boxes_corner`` (G, 6), each grown
        by ``margin`` voxels on every side. The A anchors of a cell share its centre, so the cells
        are tested and the caller expands them to their anchors."""
        centres = anchors[::self.num_anchors_per_cell, :3]
        return ((centres[:, None] >= boxes_corner[None, :, :3] - margin)
                & (centres[:, None] <= boxes_corner[None, :, 3:] + margin)).all(dim=2).any(dim=1)

    def _hard_pool_sample(self, volume_logits: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Sampled positives as ``sample_balanced`` draws them, and as many negatives drawn at
        random from the ``hard_negative_pool`` × that many background anchors with the highest
        foreground log-odds (a pool, not the very hardest: a few mislabelled look-alikes cannot
        dominate the loss)."""
        profile = self.profile
        positives = self._sampled_positives(labels, generator)
        num_neg = profile.samples_per_volume - positives.numel()
        pool = anchor_ops.hardest_negatives(labels, foreground_log_odds(volume_logits),
                                         profile.hard_negative_pool * num_neg, group_size=self.num_anchors_per_cell)
        pick = torch.randperm(pool.numel(), generator=generator)[:num_neg].to(pool.device)
        return torch.cat([positives, pool[pick]])

    def _near_face_sample(self, anchors: Tensor, labels: Tensor, gt_corner: Tensor,
                          generator: torch.Generator) -> Tensor:
        """Sampled positives as ``sample_balanced`` draws them; of the negatives, the share
        ``near_face_fraction`` drawn at random among the background anchors centred inside a GT box
        grown by ``near_face_mm`` on every side, the rest among all background anchors.

        Random negatives out of ~10⁶ nearly never fall on the face, where the look-alikes that win
        the arg-max are; unlike mining by score, this does not pick the classifier's own mistakes.
        """
        profile = self.profile
        positives = self._sampled_positives(labels, generator)
        num_neg = profile.samples_per_volume - positives.numel()
        inside = self._cells_centred_in(anchors, gt_corner, margin=profile.mm_to_vox(profile.near_face_mm))
        near = anchor_ops.group_members(torch.nonzero(inside).flatten(), self.num_anchors_per_cell)
        near = near[labels[near] == 0]
        num_near = min(round(num_neg * profile.near_face_fraction), near.numel())
        near = near[torch.randperm(near.numel(), generator=generator)[:num_near].to(near.device)]
        # The rest at random among all negatives not drawn yet, near ones included.
        rest_labels = labels.clone()
        rest_labels[near] = -1
        rest = anchor_ops.sample_balanced(torch.where(rest_labels == 0, 0, -1), num_neg - num_near, 0.0, generator)
        return torch.cat([positives, near, rest])

    def _hard_negatives(self, volume_logits: Tensor, labels: Tensor, chosen: Tensor, anchors: Tensor,
                        gt_centre: Tensor) -> Tensor:
        """Indices of ``profile.hard_negatives_per_volume`` background anchors scored most like a
        landmark, outside every GT box and not already in ``chosen`` (online hard negative mining)."""
        # The top-scoring anchor of each class is the answer, so the background anchors that look
        # most like a landmark matter most; random sampling rarely meets them.
        hardness = foreground_log_odds(volume_logits)
        # Only places outside every GT box: a wrong-shaped anchor on a landmark is a negative too,
        # but its box centre is still the right answer. The A anchors of a cell share its centre.
        per_cell = self.num_anchors_per_cell
        inside = self._cells_centred_in(anchors, box_ops.centre_to_corner(gt_centre))
        hardness.view(-1, per_cell)[inside] = float("-inf")
        return anchor_ops.hardest_negatives(labels, hardness, self.profile.hard_negatives_per_volume,
                                         exclude=chosen, group_size=per_cell)

    @torch.no_grad()
    @single_threaded
    def candidates(self, outputs: dict[str, Tensor], top_k: int | None = None) -> list[list[tuple[Tensor, Tensor]]]:
        """Per volume and landmark, up to ``top_k`` boxes after per-class NMS.

        Softmax over K+1, decode, greedy NMS at ``profile.nms_iou`` over all anchors of each class
        (:func:`anchor_candidates`). Returns ``[volume][landmark] = (boxes (n, 6) centre form voxels,
        scores (n,))`` by decreasing score, n <= top_k (``None``: ``profile.top_k``).
        """
        top_k = self.profile.top_k if top_k is None else int(top_k)
        logits, deltas, anchors = outputs["cls_logits"], outputs["deltas"], outputs["anchors"]
        results = []
        for volume_logits, volume_deltas in zip(logits, deltas):
            results.append(anchor_candidates(volume_logits, volume_deltas, anchors, self.nms_prefix,
                                             self.num_anchors_per_cell, self.profile.nms_iou, top_k,
                                             self.mirror_pairs))
        return results


def foreground_log_odds(logits: Tensor) -> Tensor:
    """(A,) fp32, detached: each anchor's largest landmark logit minus its background logit, how
    strongly it is taken for some landmark (the hardness the negative miners rank by)."""
    logits = logits.detach()
    return logits[:, 1:].amax(dim=1).float().sub_(logits[:, 0].float())
