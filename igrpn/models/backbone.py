"""The shared 3D backbone (paper §2.1; docs/design.md §5) and its convolution blocks.

Four blocks of 3×3×3 conv + normalisation + ReLU, channels doubling per block, max-pooled ×2
between blocks; the coarser blocks are fused into block 3 (stride 4) or block 2 (stride 2).
Tensors are (N, C, X, Y, Z).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from igrpn.config import BACKBONE_NORMS, FUSIONS, Profile
from igrpn.models.fast_cpu import fast_path_applies, folded_conv


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


def conv_bn_relu(in_channels: int, out_channels: int, norm: str = "batch") -> list[nn.Module]:
    """3×3×3 convolution (no bias: a normalisation follows), BatchNorm3d (or GroupNorm with 8
    channels per group, or InstanceNorm3d with affine weights: ``norm``), ReLU."""
    if norm not in BACKBONE_NORMS:
        raise ValueError(f"norm must be one of {list(BACKBONE_NORMS)}, got {norm!r}")
    if norm == "batch":
        layer = nn.BatchNorm3d(out_channels)
    elif norm == "group":
        layer = nn.GroupNorm(head_groups(out_channels), out_channels)
    else:
        layer = nn.InstanceNorm3d(out_channels, affine=True)
    return [nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=False), layer, nn.ReLU(inplace=True)]


class ConvBNReLU(nn.Sequential):
    """A stack of [Conv3d, BatchNorm3d, ReLU] triples (:func:`conv_bn_relu`): an ``nn.Sequential``
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
            layers = conv_bn_relu(previous, channels, norm)
            if index > 0 or block1_convs == 2:
                layers += conv_bn_relu(channels, channels, norm)
            blocks.append(ConvBNReLU(*layers))
            previous = channels
        self.block1, self.block2, self.block3, self.block4 = blocks
        if fusion == "concat":
            self.lateral = self.lateral_fine = None  # no projection: the conv sees the concatenation
            self.fuse = ConvBNReLU(*conv_bn_relu(4 * width + 8 * width, 4 * width, norm))
            self.fuse_fine = (ConvBNReLU(*conv_bn_relu(4 * width + 2 * width, 2 * width, norm))
                              if stride == 2 else None)
        else:
            self.lateral = nn.Conv3d(8 * width, 4 * width, kernel_size=1)
            self.fuse = ConvBNReLU(*conv_bn_relu(4 * width, 4 * width, norm))
            self.lateral_fine = nn.Conv3d(4 * width, 2 * width, kernel_size=1) if stride == 2 else None
            self.fuse_fine = ConvBNReLU(*conv_bn_relu(2 * width, 2 * width, norm)) if stride == 2 else None
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
                "pad with igrpn.models.pad_to_multiple"
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


def head_groups(channels: int) -> int:
    """GroupNorm groups of a head layer: 8 channels per group (at most 32 groups), as RetinaNet's
    heads use on 256 channels."""
    return max(1, min(32, channels // 8))
