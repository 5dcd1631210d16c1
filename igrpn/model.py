"""The shared 3D backbone, the common model interface, and the IG-RPN detector (paper §2.1–2.2).

Tensors are (N, C, X, Y, Z); boxes are centre form ``(x, y, z, w, h, d)`` in voxels of the input
volume (voxel centres at integer indices). See docs/architecture.md for the interface every method
(rpn, ssd, faster_rcnn, heatmap) implements.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from igrpn import boxes as box_ops
from igrpn.config import (BACKBONE_NORMS, FUSIONS, LANDMARKS, LEFT_RIGHT_CLASS_PAIRS, METHODS, NUM_LANDMARKS, Profile,
                          get_profile)
from igrpn.losses import iou_balanced_cross_entropy, iou_balanced_focal_loss, smooth_l1

#: The backbone down-samples three times, so input edges must be multiples of 2³.
INPUT_MULTIPLE = 8


def pad_to_multiple(x: Tensor, multiple: int = INPUT_MULTIPLE) -> Tensor:
    """Zero-pad the spatial edges of ``x`` (N, C, X, Y, Z) at their high end up to multiples of
    ``multiple``. Voxel coordinates are unchanged (padding is only added after the last voxel)."""
    if x.ndim != 5:
        raise ValueError(f"pad_to_multiple: expected (N, C, X, Y, Z), got shape {tuple(x.shape)}")
    extra = [(-n) % multiple for n in x.shape[2:]]
    if not any(extra):
        return x
    # F.pad lists the last axis first: (z_low, z_high, y_low, y_high, x_low, x_high).
    return F.pad(x, (0, extra[2], 0, extra[1], 0, extra[0]))


def _conv_bn_relu(in_channels: int, out_channels: int, norm: str = "batch") -> list[nn.Module]:
    """3×3×3 convolution (no bias: a normalisation follows), BatchNorm3d (or GroupNorm with 8
    channels per group, or InstanceNorm3d with affine weights: ``norm``), ReLU."""
    if norm not in BACKBONE_NORMS:
        raise ValueError(f"norm must be one of {list(BACKBONE_NORMS)}, got {norm!r}")
    if norm == "batch":
        layer = nn.BatchNorm3d(out_channels)
    elif norm == "group":
        layer = nn.GroupNorm(_head_groups(out_channels), out_channels)
    else:
        layer = nn.InstanceNorm3d(out_channels, affine=True)
    return [nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False), layer, nn.ReLU(inplace=True)]


# --- CPU inference fast path ---------------------------------------------------------------------
# Profiling the cpu profile's forward (torch.profiler, benchmarks/NOTES.md) showed three costs that
# do not change the result: PyTorch's backend heuristic sends most batch-1 3D convolutions to the
# slow im2col path (it only picks oneDNN above a 2D-tuned size), BatchNorm and ReLU are separate
# passes over every activation, and the activations are reordered to oneDNN's blocked layout and
# back around every convolution. At inference (eval mode, no autograd, CPU float32) the fast path
# folds BatchNorm into the convolution's weights, runs each convolution with its ReLU as a single
# oneDNN call on weights pre-packed for the input shape, and keeps activations channels-last.
# Outputs equal the plain path's up to float rounding; training is untouched.

#: The fast path is on unless the environment sets IGRPN_FAST_INFERENCE=0 (see :func:`fast_inference`).
_FAST_INFERENCE = os.environ.get("IGRPN_FAST_INFERENCE", "1") != "0"
#: Whether oneDNN's fused convolution op works in this PyTorch build (None: not tried yet).
_ONEDNN_FUSED_OK: bool | None = None


@contextlib.contextmanager
def fast_inference(enabled: bool = True):
    """Switch the CPU inference fast path on or off inside a ``with`` block (benchmarks, tests).

    The fast path only ever applies in eval mode with autograd off (``torch.no_grad`` or
    ``torch.inference_mode``) to CPU float32 tensors; it gives the plain path's outputs up to float
    rounding (relative differences around 1e-6)."""
    global _FAST_INFERENCE
    previous, _FAST_INFERENCE = _FAST_INFERENCE, bool(enabled)
    try:
        yield
    finally:
        _FAST_INFERENCE = previous


def fast_path_applies(module: nn.Module, x: Tensor) -> bool:
    """True when ``module`` may run its inference fast path on ``x`` (N, C, X, Y, Z): the fast
    path is switched on, ``module`` is in eval mode, autograd is off, ``x`` is CPU float32."""
    return (_FAST_INFERENCE and not module.training and not torch.is_grad_enabled()
            and x.device.type == "cpu" and x.dtype == torch.float32 and x.ndim == 5)


def _tensor_state(*tensors) -> tuple:
    """Identity and in-place version of each tensor: changes when a weight is replaced (``.to``,
    a new Parameter) or updated in place (optimiser step, ``load_state_dict``)."""
    return tuple((t.data_ptr(), t._version) if t is not None else None for t in tensors)


class _FoldedConv3d:
    """An inference-time copy of a Conv3d with an optional eval-mode BatchNorm3d folded into its
    weight and bias: ``bn(conv(x)) = conv'(x)`` with ``w' = w·γ/√(σ²+ε)`` per output channel and
    ``b' = (b − µ)·γ/√(σ²+ε) + β``. ``__call__`` runs it (with an optional fused ReLU) through
    oneDNN on channels-last activations, with the weight re-packed once per input shape."""

    def __init__(self, conv: nn.Conv3d, bn: nn.BatchNorm3d | None):
        weight = conv.weight.detach()
        bias = conv.bias.detach() if conv.bias is not None else weight.new_zeros(weight.shape[0])
        if bn is not None:
            scale = torch.rsqrt(bn.running_var.detach() + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.detach()
            bias = (bias - bn.running_mean.detach()) * scale
            if bn.bias is not None:
                bias = bias + bn.bias.detach()
            weight = weight * scale[:, None, None, None, None]
        self.weight, self.bias = weight.contiguous(), bias.contiguous()
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self._packed: dict[tuple, Tensor] = {}  # input shape -> oneDNN-packed weight

    def __call__(self, x: Tensor, relu: bool) -> Tensor:
        """x: (N, Cin, X, Y, Z) float32 CPU -> (N, Cout, X', Y', Z') channels-last."""
        global _ONEDNN_FUSED_OK
        x = x.contiguous(memory_format=torch.channels_last_3d)
        if _ONEDNN_FUSED_OK is not False:
            try:
                out = self._onednn(x, relu)
                _ONEDNN_FUSED_OK = True
                return out
            except (AttributeError, RuntimeError, TypeError):
                if _ONEDNN_FUSED_OK:  # it worked before: a genuine error, not a missing op
                    raise
                _ONEDNN_FUSED_OK = False  # this build has no usable oneDNN op: plain conv below
        out = F.conv3d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return out.relu_() if relu else out

    def _onednn(self, x: Tensor, relu: bool) -> Tensor:
        shape = tuple(x.shape)
        if shape not in self._packed:
            self._packed[shape] = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight, self.padding, self.stride, self.dilation, self.groups, list(shape)
            )
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed[shape], self.bias, self.padding, self.stride, self.dilation, self.groups,
            "relu" if relu else "none", [None] if relu else [], "",
        )


def folded_conv(owner: nn.Module, slot: str, conv: nn.Conv3d, bn: nn.BatchNorm3d | None = None) -> _FoldedConv3d:
    """The cached :class:`_FoldedConv3d` of ``conv`` (+ ``bn``), kept on ``owner`` under ``slot``
    (outside the state dict) and rebuilt whenever one of the weights or statistics changed."""
    tensors = (conv.weight, conv.bias)
    if bn is not None:
        tensors += (bn.weight, bn.bias, bn.running_mean, bn.running_var)
    state = _tensor_state(*tensors)
    cache = owner.__dict__.setdefault("_folded_convs", {})
    if slot not in cache or cache[slot][0] != state:
        cache[slot] = (state, _FoldedConv3d(conv, bn))
    return cache[slot][1]


def fast_conv3d(owner: nn.Module, slot: str, conv: nn.Conv3d, x: Tensor, relu: bool = False) -> Tensor:
    """``conv(x)`` (then ReLU when ``relu``): one oneDNN call on channels-last activations on the
    inference fast path (cached on ``owner`` under ``slot``), else the plain ops."""
    if fast_path_applies(owner, x) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        return folded_conv(owner, slot, conv)(x, relu=relu)
    return F.relu(conv(x)) if relu else conv(x)


def conv3d_relu(owner: nn.Module, slot: str, conv: nn.Conv3d, x: Tensor) -> Tensor:
    """``relu(conv(x))`` through :func:`fast_conv3d`."""
    return fast_conv3d(owner, slot, conv, x, relu=True)


class ConvBNReLU(nn.Sequential):
    """A stack of [Conv3d, BatchNorm3d, ReLU] triples (:func:`_conv_bn_relu`): an ``nn.Sequential``
    (same parameters and state-dict keys) whose inference fast path runs each triple as one
    BatchNorm-folded, ReLU-fused oneDNN convolution on channels-last activations.

    Input (N, Cin, X, Y, Z) -> output (N, Cout, X, Y, Z); channels-last on the fast path."""

    def _triples(self) -> list[tuple[nn.Conv3d, nn.BatchNorm3d]] | None:
        """(conv, bn) per triple, or None when the layers are not all such triples."""
        layers = list(self)
        if len(layers) % 3:
            return None
        triples = []
        for conv, bn, relu in zip(layers[0::3], layers[1::3], layers[2::3]):
            if not (isinstance(conv, nn.Conv3d) and isinstance(bn, nn.BatchNorm3d) and isinstance(relu, nn.ReLU)
                    and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
                    and bn.running_mean is not None):
                return None
            triples.append((conv, bn))
        return triples

    def forward(self, x: Tensor) -> Tensor:
        triples = self._triples() if fast_path_applies(self, x) else None
        if triples is None:
            return super().forward(x)
        for index, (conv, bn) in enumerate(triples):
            x = folded_conv(self, str(index), conv, bn)(x, relu=True)
        return x


def detection_stride(profile: Profile) -> int:
    """Stride (voxels) of the detection feature map that keeps ``profile.feature_stride_mm``.

    The paper's map has stride 4 at 1.3 mm, i.e. 5.2 mm cells; at 2.6 mm the same cells need
    stride 2. Only 2 and 4 are built.
    """
    stride = round(profile.feature_stride_mm / profile.spacing_mm)
    return 2 if stride <= 2 else 4


class Backbone(nn.Module):
    """3D VGG-16-like feature extractor with a U-Net-style fusion of blocks 3 and 4 (paper §2.1).

    Four blocks of two [3×3×3 conv, BatchNorm (or ``norm``), ReLU] with ``width, 2w, 4w, 8w`` channels
    and a 2× max-pool between blocks (strides 1, 2, 4, 8). Block 4 is upsampled trilinearly to block 3's
    grid, concatenated with it, and a 3×3×3 conv (+BN+ReLU) gives ``fused`` (stride 4, 4w channels).

    ``stride=2`` repeats the same fusion one level further (``fused`` upsampled to block 2's grid,
    concatenated with block 2, a 3×3×3 conv to 2w channels): a profile at half the paper's
    resolution then keeps the paper's 5.2 mm feature cells (4 voxels of 1.3 mm), so that small
    boxes still get well-overlapping anchors (:func:`detection_stride`). ``features`` is the map the
    detection heads use: ``fused`` at stride 4, the finer map at stride 2.

    Beyond the paper (profile fields): ``fusion="sum"`` merges as an FPN does instead — a 1×1×1
    projection (``lateral``, ``lateral_fine``) of the coarser map to the finer map's channels,
    upsampled and added to it, then the same 3×3×3 conv over those channels only;
    ``block1_convs=1`` keeps only the first conv of block 1.
    """

    def __init__(self, width: int, in_channels: int = 1, stride: int = 4, norm: str = "batch",
                 fusion: str = "concat", block1_convs: int = 2):
        super().__init__()
        if width < 1 or in_channels < 1:
            raise ValueError(f"Backbone: width and in_channels must be >= 1, got {width}, {in_channels}")
        if stride not in (2, 4):
            raise ValueError(f"Backbone: stride must be 2 or 4, got {stride}")
        if fusion not in FUSIONS:
            raise ValueError(f"Backbone: fusion must be one of {list(FUSIONS)}, got {fusion!r}")
        if block1_convs not in (1, 2):
            raise ValueError(f"Backbone: block1_convs must be 1 or 2, got {block1_convs!r}")
        self.width = width
        self.block_channels = (width, 2 * width, 4 * width, 8 * width)
        self.block_strides = (1, 2, 4, 8)
        #: stride of ``features`` relative to the input
        self.stride = stride
        self.fusion = fusion
        blocks, previous = [], in_channels
        for index, channels in enumerate(self.block_channels):
            layers = _conv_bn_relu(previous, channels, norm)
            if index > 0 or block1_convs == 2:
                layers += _conv_bn_relu(channels, channels, norm)
            blocks.append(ConvBNReLU(*layers))
            previous = channels
        self.block1, self.block2, self.block3, self.block4 = blocks
        if fusion == "concat":
            self.lateral = self.lateral_fine = None  # no projection: the conv sees the concatenation
            self.fuse = ConvBNReLU(*_conv_bn_relu(4 * width + 8 * width, 4 * width, norm))
            self.fuse_fine = (ConvBNReLU(*_conv_bn_relu(4 * width + 2 * width, 2 * width, norm))
                              if stride == 2 else None)
        else:
            self.lateral = nn.Conv3d(8 * width, 4 * width, kernel_size=1)
            self.fuse = ConvBNReLU(*_conv_bn_relu(4 * width, 4 * width, norm))
            self.lateral_fine = nn.Conv3d(4 * width, 2 * width, kernel_size=1) if stride == 2 else None
            self.fuse_fine = ConvBNReLU(*_conv_bn_relu(2 * width, 2 * width, norm)) if stride == 2 else None
        #: channels of ``features``
        self.out_channels = 2 * width if stride == 2 else 4 * width
        # Channels-last weights: oneDNN then keeps every activation channels-last instead of
        # reordering it to its blocked layout and back around each convolution (a training step
        # ~15 % faster on CPU, benchmarks/NOTES.md). Values and state-dict keys are unchanged.
        self.to(memory_format=torch.channels_last_3d)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (N, in_channels, X, Y, Z) with X, Y, Z multiples of 8 (see :func:`pad_to_multiple`).

        Returns ``block1`` (N, w, X, Y, Z), ``block2`` (N, 2w, X/2, …), ``block3`` (N, 4w, X/4, …),
        ``block4`` (N, 8w, X/8, …), ``fused`` (N, 4w, X/4, Y/4, Z/4) and ``features`` (``fused``, or
        (N, 2w, X/2, Y/2, Z/2) at stride 2).
        """
        if x.ndim != 5:
            raise ValueError(f"Backbone: expected input (N, C, X, Y, Z), got shape {tuple(x.shape)}")
        if any(n % INPUT_MULTIPLE for n in x.shape[2:]):
            raise ValueError(
                f"Backbone: spatial shape {tuple(x.shape[2:])} must be multiples of {INPUT_MULTIPLE}; "
                "pad with igrpn.model.pad_to_multiple"
            )
        block1 = self.block1(x)
        block2 = self.block2(F.max_pool3d(block1, 2))
        block3 = self.block3(F.max_pool3d(block2, 2))
        block4 = self.block4(F.max_pool3d(block3, 2))
        fused = self._merge(block3, block4, self.fuse, self.lateral)
        features = fused
        if self.fuse_fine is not None:
            features = self._merge(block2, fused, self.fuse_fine, self.lateral_fine)
        return {"block1": block1, "block2": block2, "block3": block3, "block4": block4, "fused": fused,
                "features": features}

    def _merge(self, fine: Tensor, coarse: Tensor, conv: ConvBNReLU, lateral: nn.Conv3d | None) -> Tensor:
        """``coarse`` (N, C', X/2, …) merged into ``fine`` (N, C, X, …) -> (N, C_out, X, …)."""
        if lateral is None:  # the paper's concatenation
            upsampled = F.interpolate(coarse, size=fine.shape[2:], mode="trilinear", align_corners=False)
            return conv(torch.cat([fine, upsampled], dim=1))
        # Project before upsampling: the 1×1×1 conv then runs on 8× fewer voxels (same result,
        # both are linear per voxel).
        upsampled = F.interpolate(lateral(coarse), size=fine.shape[2:], mode="trilinear", align_corners=False)
        return conv(fine + upsampled)


class LandmarkModel(nn.Module):
    """Common interface of every landmark detector (docs/architecture.md).

    Subclasses set the class attribute ``method`` and implement ``forward(volumes) -> dict``,
    ``loss(outputs, landmarks_vox) -> dict`` (``"loss"`` is back-propagated, the rest are detached
    scalars for the log) and ``candidates(outputs, top_k) -> [volume][landmark] (boxes, scores)``.
    This base class holds the profile and the IoU-balance switch and offers GT boxes in voxels,
    cached anchors and a reproducible sampling generator.
    """

    method: str = ""
    num_classes: int = NUM_LANDMARKS  # K, background excluded

    def __init__(self, profile: Profile, iou_balance: bool = True):
        super().__init__()
        if not isinstance(profile, Profile):
            raise ValueError(f"{type(self).__name__}: profile must be an igrpn.config.Profile, got {profile!r}")
        if len(profile.gt_box_mm) != NUM_LANDMARKS:
            raise ValueError(
                f"profile {profile.name!r}: gt_box_mm needs {NUM_LANDMARKS} sizes ({', '.join(LANDMARKS)}), "
                f"got {len(profile.gt_box_mm)}"
            )
        self.profile = profile
        self.iou_balance = bool(iou_balance)
        self._anchor_cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._sampling_calls = 0

    # --- sizes in voxels ------------------------------------------------------------------------
    def gt_box_vox(self) -> Tensor:
        """(5,) float32 edge of each landmark's GT cube, voxels (``profile.gt_box_mm / spacing``)."""
        return torch.tensor(self.profile.gt_box_mm, dtype=torch.float32) / self.profile.spacing_mm

    def anchor_sizes_vox(self) -> tuple[float, ...]:
        """The profile's anchor base sizes in voxels."""
        return tuple(s / self.profile.spacing_mm for s in self.profile.anchor_sizes_mm)

    def gt_boxes(self, landmarks_vox: Tensor) -> Tensor:
        """GT cubes (..., 5, 6) centre form, voxels, for landmarks (..., 5, 3) in voxels."""
        landmarks_vox = torch.as_tensor(landmarks_vox)
        return box_ops.landmark_boxes(landmarks_vox, self.gt_box_vox().to(landmarks_vox.device))

    # --- anchors --------------------------------------------------------------------------------
    def _anchor_pair(self, grid_shape, stride, sizes_vox, device) -> tuple[Tensor, Tensor]:
        sizes = tuple(float(s) for s in (self.anchor_sizes_vox() if sizes_vox is None else sizes_vox))
        key = (tuple(int(g) for g in grid_shape), int(stride), sizes, str(torch.device(device or "cpu")))
        if key not in self._anchor_cache:
            centre = box_ops.make_anchors(grid_shape, stride, sizes, self.profile.anchor_shapes).to(device or "cpu")
            self._anchor_cache[key] = (centre, box_ops.centre_to_corner(centre))
        return self._anchor_cache[key]

    def anchors_per_cell(self, num_sizes: int | None = None) -> int:
        """Anchors per feature cell for ``num_sizes`` base sizes (default: the profile's), in the
        profile's ``anchor_shapes`` mode (:func:`igrpn.boxes.anchor_shapes`)."""
        num_sizes = len(self.profile.anchor_sizes_mm) if num_sizes is None else num_sizes
        return box_ops.anchors_per_cell(num_sizes, self.profile.anchor_shapes)

    def anchors(self, grid_shape, stride: int, sizes_vox=None, device=None) -> Tensor:
        """Cached :func:`igrpn.boxes.make_anchors` (centre form, voxels) for a feature grid;
        ``sizes_vox`` defaults to the profile's anchor sizes."""
        return self._anchor_pair(grid_shape, stride, sizes_vox, device)[0]

    def corner_anchors(self, anchors: Tensor) -> Tensor:
        """Corner form of centre-form ``anchors`` (A, 6): the cached tensor when ``anchors`` is one
        that :meth:`anchors` returned (as in a forward's outputs), else computed."""
        for centre, corner in self._anchor_cache.values():
            if centre is anchors:
                return corner
        return box_ops.centre_to_corner(anchors)

    def anchors_corner(self, grid_shape, stride: int, sizes_vox=None, device=None) -> Tensor:
        """The same anchors as :meth:`anchors`, in corner form (cached too)."""
        return self._anchor_pair(grid_shape, stride, sizes_vox, device)[1]

    def concatenated_anchors(self, grids, device=None) -> Tensor:
        """Cached concatenation of the anchors of several grids, each ``(grid_shape, stride,
        sizes_vox)`` as for :meth:`anchors` (the SSD's two scales): (A₁ + A₂ + …, 6) centre form."""
        grids = tuple((tuple(int(g) for g in shape), int(stride), tuple(float(s) for s in sizes))
                      for shape, stride, sizes in grids)
        key = ("concat", grids, str(torch.device(device or "cpu")))
        if key not in self._anchor_cache:
            centre = torch.cat([self.anchors(shape, stride, sizes, device) for shape, stride, sizes in grids])
            self._anchor_cache[key] = (centre, box_ops.centre_to_corner(centre))
        return self._anchor_cache[key][0]

    def anchors_near(self, anchors: Tensor, gt_corner: Tensor, min_iou: float) -> Tensor | None:
        """Indices of the rows of ``anchors`` that may reach IoU ``min_iou`` with one of the
        ``gt_corner`` (G, 6) boxes (:func:`igrpn.boxes.grid_anchors_near`), for
        :func:`igrpn.boxes.match_anchors`'s ``candidates`` (``min_iou`` = its ``neg_iou``); None
        when ``anchors`` is not a tensor that :meth:`anchors` or :meth:`concatenated_anchors`
        returned (the matching then looks at every anchor)."""
        for key, (centre, _) in self._anchor_cache.items():
            if centre is not anchors:
                continue
            grids = key[1] if key[0] == "concat" else ((key[0], key[1], key[2]),)
            parts, offset = [], 0
            for shape, stride, sizes in grids:
                parts.append(box_ops.grid_anchors_near(gt_corner, shape, stride, sizes, min_iou,
                                                       self.profile.anchor_shapes) + offset)
                offset += math.prod(shape) * self.anchors_per_cell(len(sizes))
            return torch.cat(parts).to(anchors.device)
        return None

    def label_anchors(self, anchors: Tensor, anchors_corner: Tensor, gt_centre: Tensor, gt_corner: Tensor,
                      gt_labels: Tensor) -> tuple[Tensor, Tensor]:
        """Labels (A,) and matched GT (A,) of the anchors of one volume (``profile.matcher``); used
        by the RPN and by Faster R-CNN's stage one (there with every GT labelled 1, "object").

        ``"iou"``: the paper's rule (:func:`igrpn.boxes.match_anchors`). ``"atss"``: the positives
        of :func:`igrpn.boxes.atss_positives` (``profile.atss_cells`` nearest cells), the paper's
        negatives (IoU < ``neg_iou`` with every GT), every other anchor ignored.
        """
        profile = self.profile
        near = self.anchors_near(anchors, gt_corner, profile.neg_iou)
        if profile.matcher == "iou":
            return box_ops.match_anchors(anchors_corner, gt_corner, gt_labels, profile.pos_iou, profile.neg_iou,
                                         candidates=near)
        # With both thresholds at neg_iou, label 0 is exactly "IoU < neg_iou with every GT".
        labels, _ = box_ops.match_anchors(anchors_corner, gt_corner, gt_labels, profile.neg_iou, profile.neg_iou,
                                          candidates=near)
        labels = torch.where(labels == 0, 0, -1)
        matched = torch.zeros_like(labels)
        positive, gt_index = box_ops.atss_positives(anchors, gt_centre, self.num_anchors_per_cell,
                                                    profile.atss_cells)
        labels[positive], matched[positive] = gt_labels[gt_index], gt_index
        return labels, matched

    @property
    def mirror_pairs(self) -> tuple[tuple[int, int], ...]:
        """Class-id pairs trained and scored as one class (``profile.merge_mirror_pairs``), or ()."""
        return LEFT_RIGHT_CLASS_PAIRS if self.profile.merge_mirror_pairs else ()

    # --- reproducible sampling ------------------------------------------------------------------
    def sampling_generator(self) -> torch.Generator:
        """A CPU generator seeded from a per-model call counter, so that a training run that makes
        the same calls draws the same anchors."""
        generator = torch.Generator().manual_seed(self._sampling_calls)
        self._sampling_calls += 1
        return generator

    def _check_landmarks(self, landmarks_vox: Tensor, batch: int) -> Tensor:
        if landmarks_vox.shape != (batch, NUM_LANDMARKS, 3):
            raise ValueError(
                f"{type(self).__name__}.loss: landmarks_vox must have shape ({batch}, {NUM_LANDMARKS}, 3), "
                f"got {tuple(landmarks_vox.shape)}"
            )
        return landmarks_vox.float()

    # --- the interface --------------------------------------------------------------------------
    def forward(self, volumes: Tensor) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, outputs: dict[str, Tensor], landmarks_vox: Tensor) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def candidates(self, outputs: dict[str, Tensor], top_k: int) -> list[list[tuple[Tensor, Tensor]]]:  # pragma: no cover
        raise NotImplementedError


def single_threaded(function):
    """Decorator: run ``function`` with one intra-op thread (``torch.set_num_threads``, restored
    afterwards). For post-processing: it is hundreds of small operations, each a parallel region
    whose two threads must meet; on a 2-core machine shared with other busy processes one of them
    is often descheduled, and every region then waits a time slice (candidates at the cpu profile:
    45 ms on one thread, 90–120 ms on two with OpenMP's default wait policy, benchmarks/NOTES.md).
    The thread count is process-wide: another Python thread running torch meanwhile gets one too."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        previous = torch.get_num_threads()
        if previous == 1:
            return function(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(previous)

    return wrapper


#: Anchors per chunk in :func:`top_anchors_per_class`: small enough for the CPU caches.
_SCORE_CHUNK = 16384
#: Fewest groups scored exactly in pass 2 of :func:`_top_by_margin_bound`.
_MIN_SEED_GROUPS = 64
#: Slack (nats) on the first pass's bound in :func:`top_anchors_per_class`, far above float rounding.
_BOUND_SLACK = 1e-3


def class_major_log_probs(logits: Tensor, mirror_pairs=()) -> Tensor:
    """Log-softmax of anchors' class logits, returned class-major for the foreground classes.

    The logits are transposed first so that the reductions over the K+1 classes run along
    contiguous rows of anchors (vectorised); reducing over the last axis of size 6 of (M, 6), as
    ``torch.logsumexp(logits, -1)`` does, was 2× slower on CPU. Values equal
    ``(logits[:, 1:] - logsumexp(logits, -1, keepdim=True)).t()`` up to float rounding.

    Args:
        logits: (M, K+1) class logits of M anchors (class 0 = background).
        mirror_pairs: class-id pairs (a, b) scored as one class: row a holds log(p_a + p_b),
            row b −inf.

    Returns:
        (K, M) log-probabilities of classes 1..K.
    """
    columns = logits.t().contiguous()  # (K+1, M)
    top = columns.amax(dim=0)
    log_sum = (columns - top).exp_().sum(dim=0).log_().add_(top)
    log_probs = columns[1:] - log_sum
    for a, b in mirror_pairs:  # on contiguous rows: no copy of the (M, K+1) logits
        log_probs[a - 1] = torch.logaddexp(log_probs[a - 1], log_probs[b - 1])
        log_probs[b - 1] = float("-inf")
    return log_probs


def top_anchors_per_class(logits: Tensor, k: int, group_size: int = 1, chunk: int = _SCORE_CHUNK,
                          mirror_pairs=(), margins: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` anchors of highest softmax probability for each foreground class, as
    ``class_major_log_probs(logits).topk(k, dim=1)``, without computing the log-softmax of every
    anchor when the anchors come in groups (the A anchors of a cell).

    Two exact strategies. For class-major logits (``logits.t()`` contiguous, as the RPN's inference
    head writes them) a bound is tried first (:func:`_top_by_margin_bound`). Pass 1 needs no
    exponential: for every group and class it keeps the best margin over the background,
    ``max_a (l_c − l_0)``; the softmax's normaliser is at least ``logaddexp(l_0, l_c)``, so
    ``log p_c ≤ log σ(l_c − l_0)``, increasing in the margin (for a mirror pair scored as one
    class, ``log(p_a + p_b) ≤ log σ(max(l_a, l_b) − l_0 + log 2)``). With the background row all
    zero (``class_major_head(reference=0)``) pass 1 is one reduction of contiguous memory. Pass 2
    scores exactly the anchors of the few groups with the best margins: their k-th best
    log-probability T is a lower bound of the true k-th best, so only groups whose bound reaches T
    can hold a top-k anchor. Pass 3 scores those exactly and ranks the anchors at or above T. On
    trained ``cpu`` RPNs with k = 256 (the first NMS round) pass 3 sees 2–7 % of the groups.

    Otherwise, and where the bound prunes too little (near-uniform scores, as an untrained head
    gives), exact group maxima (:func:`_top_by_group_maxima`): the log-softmax of every anchor,
    chunk by chunk, keeping each group's best, then the anchors of each class's k best groups.

    Args:
        logits: (M, K+1) class logits of M anchors (class 0 = background), M = groups ·
            ``group_size``, each group contiguous along M.
        k: how many to keep per class, ``0 <= k <= M``.
        group_size: anchors per group (1: no grouping: score everything, plain top-k).
        chunk: anchors per chunk of pass 1 (keeps its working set in the CPU caches).
        mirror_pairs: class-id pairs scored as one class (see :func:`class_major_log_probs`).
        margins: :func:`group_margins` of these logits when already computed (calls for several
            k on one volume), else computed here when needed.

    Returns:
        log-probabilities (k, K), by decreasing value in each column, and their anchor indices
        (k, K) int64. Equal values may come in another order than ``topk``'s (unspecified there).
    """
    num_anchors, num_outputs = logits.shape
    if not 0 <= k <= num_anchors:
        raise ValueError(f"top_anchors_per_class: k must be in [0, {num_anchors}], got {k}")
    num_groups = num_anchors // max(group_size, 1)
    if group_size > 1 and num_groups * group_size == num_anchors and 0 < k < num_groups:
        result = None
        if margin_bound_applies(logits, group_size):
            result = _top_by_margin_bound(logits, k, group_size, chunk, mirror_pairs, margins)
        if result is None:
            result = _top_by_group_maxima(logits, k, group_size, chunk, mirror_pairs)
        if result is not None:
            return result
    top_values, top = class_major_log_probs(logits, mirror_pairs).topk(k, dim=1)
    return top_values.t(), top.t()


def margin_bound_applies(logits: Tensor, group_size: int) -> bool:
    """Whether :func:`top_anchors_per_class` tries the margin bound on these (M, K+1) logits:
    class-major storage and whole groups of more than one anchor."""
    return group_size > 1 and logits.shape[0] % group_size == 0 and logits.t().is_contiguous()


def _top_by_margin_bound(logits: Tensor, k: int, group_size: int, chunk: int, mirror_pairs=(),
                         margins: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """:func:`top_anchors_per_class` by the margin bound (passes 1–3 of its docstring); ``None``
    where the bound prunes too little to pay (near-uniform scores, e.g. an untrained head) or a
    logit is NaN."""
    num_classes = logits.shape[1] - 1
    bound = margins if margins is not None else group_margins(logits, group_size, chunk, mirror_pairs)  # (K, groups)
    seed_count = min(bound.shape[1], max(4 * math.ceil(k / group_size), _MIN_SEED_GROUPS))
    # A NaN logit makes its group's margin NaN (amax propagates it).
    if seed_count >= bound.shape[1] or bool(torch.isnan(bound).any()):
        return None
    _, live = _live_classes(num_classes, mirror_pairs)
    # Pass 2: exact scores of each class's best groups by margin give its threshold T. (4× the
    # fewest groups that can hold k anchors: on trained RPNs more barely raise T, fewer leave it
    # far below the true k-th value.)
    seed_groups = torch.unique(bound[live].topk(seed_count, dim=1).indices)
    seed_scores = _group_log_probs(logits, seed_groups, group_size, mirror_pairs)  # (K, seeds·A)
    thresholds = seed_scores[live].kthvalue(seed_scores.shape[1] - k + 1, dim=1).values
    # log σ(m) ≥ T  <=>  m ≥ T − log(1 − e^T): the margin a group needs to hold a top-k anchor
    # (less a little, so that float rounding of the exact scores cannot drop a tie at T).
    needed = thresholds - torch.log(-torch.expm1(thresholds)) - _BOUND_SLACK
    reach = (bound[live] >= needed[:, None]).any(dim=0)
    reach[seed_groups] = True
    groups = torch.nonzero(reach).reshape(-1)
    if groups.numel() > max(4 * k, bound.shape[1] // 8):
        return None
    # Pass 3: every anchor of every group that can reach the top k, scored exactly; only those
    # at or above T (at least k: the seeds' own; less the slack, in case a score's last bit
    # differs from pass 2's) are ranked.
    scores = _group_log_probs(logits, groups, group_size, mirror_pairs)  # (K, groups·A)
    anchors = box_ops.group_members(groups, group_size)
    top_values = scores.new_full((num_classes, k), float("-inf"))
    top_index = anchors.new_zeros(num_classes, k)
    for row, c in enumerate(live):
        above = torch.nonzero(scores[c] >= thresholds[row] - _BOUND_SLACK).reshape(-1)
        values, order = scores[c, above].topk(k)
        top_values[c], top_index[c] = values, anchors[above[order]]
    return top_values.t(), top_index.t()


def _top_by_group_maxima(logits: Tensor, k: int, group_size: int, chunk: int,
                         mirror_pairs=()) -> tuple[Tensor, Tensor] | None:
    """:func:`top_anchors_per_class` by exact group maxima, for any layout and any scores: the
    k-th highest group maximum of a class is a lower bound of its k-th highest log-probability (k
    groups reach it), and at most k groups hold an anchor above it, so the top k lie among the
    anchors of the k best groups. ``None`` when NaN logits leave fewer than k candidates."""
    num_anchors, num_outputs = logits.shape
    num_classes, num_groups = num_outputs - 1, num_anchors // group_size
    # Pass 1: each group's best log-probability per class, chunk by chunk (no (K, M) tensor).
    rows = max(1, chunk // group_size) * group_size
    group_max = logits.new_empty(num_classes, num_groups)
    for start in range(0, num_anchors, rows):
        scores = class_major_log_probs(logits[start:start + rows], mirror_pairs)
        first = start // group_size
        group_max[:, first:first + scores.shape[1] // group_size] = (
            scores.view(num_classes, -1, group_size).amax(dim=2))
    bound, best_groups = group_max.topk(k, dim=1)  # (K, k) each
    # Pass 2: exact log-probabilities of the anchors of every class's k best groups (a class
    # merged into its mirror partner has none worth scoring).
    dropped, live = _live_classes(num_classes, mirror_pairs)
    groups = torch.unique(best_groups[live])  # sorted
    anchors = box_ops.group_members(groups, group_size)
    scores = _group_log_probs(logits, groups, group_size, mirror_pairs).view(num_classes, groups.numel(), group_size)
    position = torch.searchsorted(groups, best_groups).clamp_max(groups.numel() - 1)  # (K, k): rows of `scores`
    values, indices = [], []
    for c in range(num_classes):
        if c in dropped:
            values.append(bound.new_full((k,), float("-inf")))
            indices.append(best_groups.new_zeros(k))
            continue
        block = scores[c, position[c]].reshape(-1)
        candidates = torch.nonzero(block >= bound[c, -1]).reshape(-1)
        if candidates.numel() < k:  # only with NaN logits
            return None
        top_values, top = block[candidates].topk(k)
        values.append(top_values)
        indices.append(anchors.view(-1, group_size)[position[c]].reshape(-1)[candidates[top]])
    return torch.stack(values, dim=1), torch.stack(indices, dim=1)


def group_margins(logits: Tensor, group_size: int, chunk: int = _SCORE_CHUNK, mirror_pairs=()) -> Tensor:
    """Per group and foreground class, the best ``l_c − l_0`` of its anchors (a mirror pair's
    first class holds ``max(l_a, l_b) − l_0 + log 2``, the second −inf).

    Args:
        logits: (M, K+1) class-major (``logits.t()`` contiguous), M = groups · group_size.

    Returns:
        (K, groups).
    """
    num_anchors, num_outputs = logits.shape
    num_classes = num_outputs - 1
    columns = logits.t()  # (K+1, M), contiguous rows
    if not any(torch.aminmax(columns[0])):
        # Logits already relative to the background (class_major_head(reference=0)): the margins
        # are the logits; one reduction over contiguous memory.
        margins = columns[1:].reshape(-1, group_size).amax(dim=1).view(num_classes, -1)
    else:
        rows = max(1, chunk // group_size) * group_size
        margins = logits.new_empty(num_classes, num_anchors // group_size)
        difference = logits.new_empty(num_classes, min(rows, num_anchors))
        for start in range(0, num_anchors, rows):
            block = columns[:, start:start + rows]
            part = difference[:, :block.shape[1]]
            for c in range(num_classes):  # row by row: 2× faster than one broadcast subtraction
                torch.sub(block[c + 1], block[0], out=part[c])
            first = start // group_size
            torch.amax(part.view(num_classes, -1, group_size), dim=2,
                       out=margins[:, first:first + block.shape[1] // group_size])
    for a, b in mirror_pairs:
        margins[a - 1] = torch.maximum(margins[a - 1], margins[b - 1]) + math.log(2.0)
        margins[b - 1] = float("-inf")
    return margins


def _live_classes(num_classes: int, mirror_pairs=()) -> tuple[set[int], list[int]]:
    """Class rows (0-based, foreground) merged into their mirror partner, and the others."""
    dropped = {b - 1 for _, b in mirror_pairs}
    return dropped, [c for c in range(num_classes) if c not in dropped]


def _group_log_probs(logits: Tensor, groups: Tensor, group_size: int, mirror_pairs=()) -> Tensor:
    """Exact class-major log-probabilities (K, len(groups)·group_size) of the anchors of
    ``groups`` (sorted group indices), anchors in group order."""
    anchors = box_ops.group_members(groups, group_size)
    return class_major_log_probs(logits.t().index_select(1, anchors).t(), mirror_pairs)


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
    per class, it costs about what the cell-major product costs (~3 ms more at the cpu profile),
    where transposing afterwards would cost far more (benchmarks/NOTES.md §6).

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
            nn.GroupNorm(_head_groups(channels), channels), nn.ReLU(inplace=True))])
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
                chosen = box_ops.sample_balanced(
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
        return box_ops.sample_balanced(torch.where(labels > 0, labels, -1), self.profile.samples_per_volume,
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
        pool = box_ops.hardest_negatives(labels, _foreground_log_odds(volume_logits),
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
        near = box_ops.group_members(torch.nonzero(inside).flatten(), self.num_anchors_per_cell)
        near = near[labels[near] == 0]
        num_near = min(round(num_neg * profile.near_face_fraction), near.numel())
        near = near[torch.randperm(near.numel(), generator=generator)[:num_near].to(near.device)]
        # The rest at random among all negatives not drawn yet, near ones included.
        rest_labels = labels.clone()
        rest_labels[near] = -1
        rest = box_ops.sample_balanced(torch.where(rest_labels == 0, 0, -1), num_neg - num_near, 0.0, generator)
        return torch.cat([positives, near, rest])

    def _hard_negatives(self, volume_logits: Tensor, labels: Tensor, chosen: Tensor, anchors: Tensor,
                        gt_centre: Tensor) -> Tensor:
        """Indices of ``profile.hard_negatives_per_volume`` background anchors scored most like a
        landmark, outside every GT box and not already in ``chosen`` (online hard negative mining)."""
        # The top-scoring anchor of each class is the answer, so the background anchors that look
        # most like a landmark matter most; random sampling rarely meets them.
        hardness = _foreground_log_odds(volume_logits)
        # Only places outside every GT box: a wrong-shaped anchor on a landmark is a negative too,
        # but its box centre is still the right answer. The A anchors of a cell share its centre.
        per_cell = self.num_anchors_per_cell
        inside = self._cells_centred_in(anchors, box_ops.centre_to_corner(gt_centre))
        hardness.view(-1, per_cell)[inside] = float("-inf")
        return box_ops.hardest_negatives(labels, hardness, self.profile.hard_negatives_per_volume,
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


def _head_groups(channels: int) -> int:
    """GroupNorm groups of a head layer: 8 channels per group (at most 32 groups), as RetinaNet's
    heads use on 256 channels."""
    return max(1, min(32, channels // 8))


def _foreground_log_odds(logits: Tensor) -> Tensor:
    """(A,) fp32, detached: each anchor's largest landmark logit minus its background logit, how
    strongly it is taken for some landmark (the hardness the negative miners rank by)."""
    logits = logits.detach()
    return logits[:, 1:].amax(dim=1).float().sub_(logits[:, 0].float())


def anchor_candidates(logits: Tensor, deltas: Tensor, anchors: Tensor, first_prefix: int,
                      anchors_per_group: int, nms_iou: float, top_k: int,
                      mirror_pairs=()) -> list[tuple[Tensor, Tensor]]:
    """One volume's candidates per class from K+1-way anchor logits (RPN and SSD): softmax,
    decode, greedy NMS over all anchors of each class (DESIGN §6), the first ``top_k`` kept.

    Greedy NMS decides on a box from the boxes scored above it alone, so NMS of the ``n`` best
    anchors keeps exactly the boxes of the full NMS that lie among them: once that gives ``top_k``
    boxes, they are the full NMS's first ``top_k``. Only the ``first_prefix`` best anchors of
    each class are decoded at first, 4× more while a class has fewer than it needs.

    Args:
        logits: (A, K+1) class logits; deltas: (A, 6); anchors: (A, 6) centre form, voxels.
        first_prefix: anchors per class decoded in the first round.
        anchors_per_group: anchors per cell (see :func:`top_anchors_per_class`).
        mirror_pairs: class-id pairs (a, b) scored as one class, p_a + p_b: both get the same
            list of up to ``2·top_k`` boxes (two places per rank: the left and the right one).

    Returns:
        K tuples ``(boxes (n, 6) centre form voxels, scores (n,))`` by decreasing score, n <= top_k
        (2·top_k for a mirror pair).
    """
    pair_of = {b - 1: a - 1 for a, b in mirror_pairs}
    paired = {a - 1 for a, _ in mirror_pairs}
    logits = logits.float()
    prefix = min(max(int(first_prefix), 1), logits.shape[0])
    margins = None  # pass 1 of top_anchors_per_class, computed once for every round
    if margin_bound_applies(logits, anchors_per_group):
        margins = group_margins(logits, anchors_per_group, mirror_pairs=mirror_pairs)
    while True:
        # Ranking on log p is the same as on p; only the prefix is decoded and exponentiated.
        top_log_probs, top_index = top_anchors_per_class(logits, prefix, anchors_per_group,
                                                         mirror_pairs=mirror_pairs, margins=margins)
        top_scores = top_log_probs.exp()  # (prefix, K)
        per_class, complete = [], True
        for c in range(top_scores.shape[1]):
            if c in pair_of:
                per_class.append(per_class[pair_of[c]])  # the merged class's list (a < b: built already)
                continue
            index = top_index[:, c]
            boxes = box_ops.decode(deltas[index].float(), anchors[index])
            wanted = 2 * top_k if c in paired else top_k
            keep = box_ops.nms(box_ops.centre_to_corner(boxes), top_scores[:, c], nms_iou, wanted)
            per_class.append((boxes[keep], top_scores[keep, c]))
            complete = complete and keep.numel() >= wanted
        if complete or prefix == logits.shape[0]:
            return per_class
        prefix = min(4 * prefix, logits.shape[0])


def build_model(method: str, profile: Profile | str, iou_balance: bool = True) -> LandmarkModel:
    """The model of ``method`` ("rpn", "ssd", "faster_rcnn" or "heatmap") for ``profile``.

    The baselines live in ``igrpn.ssd``, ``igrpn.faster_rcnn`` and ``igrpn.heatmap`` and are
    imported only when asked for; the class is the module's LandmarkModel subclass whose
    ``method`` attribute equals ``method``.
    """
    if isinstance(profile, str):
        profile = get_profile(profile)
    if method not in METHODS:
        raise ValueError(f"build_model: unknown method {method!r}; expected one of {list(METHODS)}")
    if method == RPNModel.method:
        return RPNModel(profile, iou_balance=iou_balance)
    module = importlib.import_module(f"igrpn.{method}")
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, LandmarkModel) and value.method == method:
            return value(profile, iou_balance=iou_balance)
    raise ValueError(f"build_model: igrpn.{method} defines no LandmarkModel subclass with method={method!r}")
