"""Heatmap-regression baseline of Table 1 (docs/design.md §5): an encoder-decoder on the shared backbone
regresses one Gaussian heatmap per landmark (as Payer et al.); a landmark is the heatmap's arg-max
refined to sub-voxel precision.

Decoder (decision): U-Net-like skip connections from block 4 up to block 2, i.e. the heatmaps are
predicted at half the input resolution (``output_stride = 2``): a full-resolution stage on block 1
would add a 3×3×3 convolution over every input voxel, several times the cost of the rest of the
decoder, for a landmark that the sub-voxel refinement places to well under a voxel anyway.
``profile.extra["heatmap_stride"] = 1`` gives the full-resolution decoder.

Targets and loss (decision): a Gaussian of σ = ``profile.heatmap_sigma_mm / spacing_mm`` input
voxels with peak 1 at each landmark (as Payer et al.), and a foreground-balanced mean-squared error
(:func:`balanced_mse`): each voxel's squared error is weighted by ``1 + λ·target`` with λ chosen
per heatmap so that the Gaussian carries as much weight as the whole volume. Plain MSE over a volume
that is > 99.9 % background makes "predict zero everywhere" a near-optimal answer. Scaling the
targets (e.g. ×100) is the other common remedy; under SGD it amounts to a larger step, but under
Adam (our optimiser, whose steps do not depend on the loss scale) it only asks the last layer to
grow 100×, which takes far more steps than a profile's budget, so we reweight rather than rescale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from igrpn.config import NUM_LANDMARKS, Profile
from igrpn.models.backbone import Backbone, conv_bn_relu, ConvBNReLU, pad_to_multiple
from igrpn.models.base import LandmarkModel
from igrpn.models.fast_cpu import single_threaded


def cell_centres_vox(size: int, stride: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Input-voxel coordinates of the centres of the cells along one axis of a strided grid.

    A cell ``f`` of a map at ``stride`` s covers input voxels ``s·f … s·f + s − 1`` (max-pooling
    by 2 per level), so its centre is at ``s·f + (s − 1) / 2``; at stride 1 it is ``f``.

    Returns: (size,) float tensor, in input voxels.
    """
    return torch.arange(size, device=device, dtype=dtype) * stride + (stride - 1) / 2.0


def heatmap_targets(
    landmarks_vox: torch.Tensor, shape, sigma_vox: float, stride: int = 1
) -> torch.Tensor:
    """Unit-peak Gaussian heatmap of each landmark.

    Args:
        landmarks_vox: (N, L, 3) landmark positions in input voxels (x, y, z).
        shape: (X, Y, Z) of the input volume, in voxels.
        sigma_vox: Gaussian standard deviation in input voxels.
        stride: the heatmap's down-sampling factor; the grid has ceil(X / stride) cells per edge,
            cell centres at ``stride·f + (stride − 1) / 2`` input voxels.

    Returns:
        (N, L, X', Y', Z') float tensor, ``exp(−|p − landmark|² / (2σ²))`` at each cell centre p
        (value 1 where a cell centre coincides with the landmark).
    """
    if landmarks_vox.ndim != 3 or landmarks_vox.shape[-1] != 3:
        raise ValueError(f"heatmap_targets: landmarks_vox must be (N, L, 3), got {tuple(landmarks_vox.shape)}")
    if sigma_vox <= 0:
        raise ValueError(f"heatmap_targets: sigma_vox must be positive, got {sigma_vox}")
    if len(shape) != 3:
        raise ValueError(f"heatmap_targets: shape must be (X, Y, Z), got {tuple(shape)}")
    landmarks_vox = landmarks_vox.float()
    # The Gaussian is separable: one 1D profile per axis, combined by an outer product.
    profiles = []
    for axis, size in enumerate(shape):
        centres = cell_centres_vox(-(-int(size) // stride), stride, device=landmarks_vox.device)
        offset = centres - landmarks_vox[..., axis, None]  # (N, L, size')
        profiles.append(torch.exp(-(offset**2) / (2.0 * sigma_vox**2)))
    px, py, pz = profiles
    return px[..., :, None, None] * py[..., None, :, None] * pz[..., None, None, :]


def balanced_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Foreground-balanced mean-squared error between heatmaps.

    Per heatmap, voxel v has weight ``1 + λ·target_v`` with ``λ = V / Σ_v target_v`` (V voxels),
    so the background and the Gaussian each carry half of the weight ``2V``; the result is
    ``Σ_v w_v (pred_v − target_v)² / (2V)`` averaged over heatmaps (0 for a perfect prediction).

    Args:
        pred, target: (N, L, X, Y, Z); target ≥ 0 (unit-peak Gaussians).

    Returns:
        scalar.
    """
    if pred.shape != target.shape or pred.ndim != 5:
        raise ValueError(
            f"balanced_mse: pred {tuple(pred.shape)} and target {tuple(target.shape)} must have "
            "the same shape (N, L, X, Y, Z)"
        )
    # fp32 even under bf16 autocast: a sum over ~10⁵ weighted squares needs more than bf16's 8 bits.
    pred, target = pred.float(), target.float()
    num_voxels = target[0, 0].numel()
    # λ per heatmap; a heatmap whose Gaussian lies wholly outside the grid gets plain MSE.
    mass = target.flatten(2).sum(-1)[..., None, None, None]
    balance = num_voxels / mass.clamp_min(1e-6) * (mass > 1e-6)
    weights = 1.0 + balance * target
    return (weights * (pred - target) ** 2).flatten(2).sum(-1).div(2.0 * num_voxels).mean()


def refine_argmax(heatmaps: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Sub-voxel arg-max of each heatmap.

    The arg-max cell is refined along each axis by the vertex of the parabola through the log of
    the heatmap at the cell and its two neighbours; the log of a Gaussian is a parabola, so a
    sampled isotropic (or axis-aligned) Gaussian is located exactly. Values are floored at 10⁻³ of
    the peak before the log, and an arg-max on the border of the grid is not refined along that
    axis (one neighbour is missing).

    Args:
        heatmaps: (N, L, X, Y, Z) heatmaps (any positive scale).
        stride: the heatmaps' down-sampling factor w.r.t. the input (see ``heatmap_targets``).

    Returns:
        (N, L, 3) refined maxima in input voxels (x, y, z).
    """
    if heatmaps.ndim != 5:
        raise ValueError(f"refine_argmax: heatmaps must be (N, L, X, Y, Z), got {tuple(heatmaps.shape)}")
    n, l, *size = heatmaps.shape
    flat = heatmaps.detach().reshape(n, l, -1).float()
    peaks, index = flat.max(dim=-1)  # (N, L)
    # Unravel the flat index into (i, j, k) cell indices.
    strides = (size[1] * size[2], size[2], 1)
    cell = torch.stack([(index // s) % d for s, d in zip(strides, size)], dim=-1)  # (N, L, 3)

    floor = (peaks.abs() * 1e-3).clamp_min(1e-12)  # (N, L): keeps the logs finite
    offsets = []
    for axis in range(3):
        lower_ok = cell[..., axis] > 0
        upper_ok = cell[..., axis] < size[axis] - 1
        step = strides[axis]
        # Neighbours along this axis (index clamped where missing; masked out below).
        lower = flat.gather(-1, (index - step * lower_ok)[..., None])[..., 0]
        upper = flat.gather(-1, (index + step * upper_ok)[..., None])[..., 0]
        log_m, log_0, log_p = (torch.log(torch.maximum(v, floor)) for v in (lower, peaks, upper))
        curvature = log_m - 2.0 * log_0 + log_p  # ≤ 0 at a maximum
        valid = lower_ok & upper_ok & (curvature < 0)
        vertex = 0.5 * (log_m - log_p) / torch.where(valid, curvature, torch.ones_like(curvature))
        offsets.append(torch.where(valid, vertex.clamp(-0.5, 0.5), torch.zeros_like(vertex)))
    refined_cell = cell.float() + torch.stack(offsets, dim=-1)
    return refined_cell * stride + (stride - 1) / 2.0


class HeatmapModel(LandmarkModel):
    """Heatmap regression on the shared backbone (see the module docstring).

    Decoder: the backbone's ``fused`` map (block 4 upsampled and concatenated with block 3, then a
    conv: the first U-Net stage) -> conv -> upsample to block 2, concatenate, two convs
    [-> upsample to block 1, concatenate, two convs when ``output_stride`` is 1] -> 1×1×1 conv to
    five heatmaps. ``forward`` returns ``heatmaps`` (N, 5, ceil(X/s), ceil(Y/s), ceil(Z/s)),
    s = ``output_stride``, the unit-peak Gaussians' units.
    """

    method = "heatmap"

    def __init__(self, profile: Profile, iou_balance: bool = True):
        # iou_balance is accepted for a uniform interface; a heatmap has no classification loss.
        super().__init__(profile, iou_balance)
        self.output_stride = int(profile.extra.get("heatmap_stride", 2))
        if self.output_stride not in (1, 2):
            raise ValueError(
                f"profile {profile.name!r}: extra['heatmap_stride'] must be 1 or 2, got {self.output_stride}"
            )
        self.sigma_vox = profile.heatmap_sigma_mm / profile.spacing_mm
        self.backbone = Backbone(profile.width)
        w = profile.width
        self.stage4 = ConvBNReLU(*conv_bn_relu(4 * w, 4 * w))
        self.stage2 = ConvBNReLU(*conv_bn_relu(4 * w + 2 * w, 2 * w), *conv_bn_relu(2 * w, 2 * w))
        if self.output_stride == 1:
            self.stage1 = ConvBNReLU(*conv_bn_relu(2 * w + w, w), *conv_bn_relu(w, w))
        self.out = nn.Conv3d(2 * w if self.output_stride == 2 else w, NUM_LANDMARKS, kernel_size=1)
        # Small initial outputs: the first predictions are near-flat, not noise.
        nn.init.normal_(self.out.weight, std=0.001)
        nn.init.zeros_(self.out.bias)

    @staticmethod
    def _up_concat(coarse: Tensor, skip: Tensor) -> Tensor:
        """Upsample ``coarse`` trilinearly to ``skip``'s grid and concatenate along channels."""
        upsampled = F.interpolate(coarse, size=skip.shape[2:], mode="trilinear", align_corners=False)
        return torch.cat([upsampled, skip], dim=1)

    def forward(self, volumes: Tensor) -> dict[str, Tensor]:
        """volumes: (N, 1, X, Y, Z), padded here to multiples of 8 (high end); the heatmaps are
        cropped back to the unpadded extent."""
        shape = volumes.shape[2:]
        features = self.backbone(pad_to_multiple(volumes))
        x = self.stage4(features["fused"])
        x = self.stage2(self._up_concat(x, features["block2"]))
        if self.output_stride == 1:
            x = self.stage1(self._up_concat(x, features["block1"]))
        heatmaps = self.out(x)
        s = self.output_stride
        heatmaps = heatmaps[:, :, : -(-shape[0] // s), : -(-shape[1] // s), : -(-shape[2] // s)]
        return {"heatmaps": heatmaps}

    def loss(self, outputs: dict[str, Tensor], landmarks_vox: Tensor) -> dict[str, Tensor]:
        """:func:`balanced_mse` against unit-peak Gaussians of σ = ``heatmap_sigma_mm / spacing_mm``
        voxels; ``mean_dist_vox`` (for the log) is the distance of the refined arg-max to the
        landmark, voxels."""
        heatmaps = outputs["heatmaps"]
        landmarks_vox = self._check_landmarks(torch.as_tensor(landmarks_vox, device=heatmaps.device), heatmaps.shape[0])
        input_shape = [n * self.output_stride for n in heatmaps.shape[2:]]
        targets = heatmap_targets(landmarks_vox, input_shape, self.sigma_vox, self.output_stride)
        loss = balanced_mse(heatmaps, targets)
        with torch.no_grad():
            distance = torch.linalg.norm(refine_argmax(heatmaps, self.output_stride) - landmarks_vox, dim=-1)
        return {"loss": loss, "loss_heatmap": loss.detach(), "mean_dist_vox": distance.mean()}

    @torch.no_grad()
    @single_threaded
    def candidates(self, outputs: dict[str, Tensor], top_k: int | None = None) -> list[list[tuple[Tensor, Tensor]]]:
        """One candidate per landmark: the GT-sized cube centred at the refined arg-max, scored by
        the heatmap's peak value (≈ 1 for a confident peak). ``top_k`` = 0 gives none.

        With the mirror pair merged (``profile.merge_mirror_pairs``) the two eyes share one list of
        two places instead: the peaks of the pair's pooled map (the larger of the two heatmaps at
        each cell) at least half an eye box apart. Trained on mirrored faces, each eye heatmap
        fires on both eyes, so the two arg-maxes alone often land on the same eye.

        Returns ``[volume][landmark] = (boxes (n, 6) centre form voxels, scores (n,))``, n ≤ 1
        (n ≤ 2 for a merged pair)."""
        top_k = self.profile.top_k if top_k is None else int(top_k)
        heatmaps = outputs["heatmaps"].float()
        points = refine_argmax(heatmaps, self.output_stride)  # (N, 5, 3)
        peaks = heatmaps.flatten(2).amax(dim=-1)  # (N, 5)
        boxes = self.gt_boxes(points)  # (N, 5, 6)
        n = min(top_k, 1)
        results = [
            [(boxes[b, c, None][:n], peaks[b, c, None][:n]) for c in range(NUM_LANDMARKS)]
            for b in range(heatmaps.shape[0])
        ]
        if n == 0:
            return results
        for a, b in self.mirror_pairs:
            a, b = a - 1, b - 1  # class ids -> heatmap channels
            edge = float(self.gt_box_vox()[a])
            # Half an eye box: the distance select_answers asks between a pair's two answers.
            pair_points, pair_scores = two_peaks(torch.maximum(heatmaps[:, a], heatmaps[:, b]),
                                                 edge / 2, self.output_stride)
            sizes = pair_points.new_full((2, 3), edge)
            for volume, (volume_points, volume_scores) in enumerate(zip(pair_points, pair_scores)):
                pair = (torch.cat([volume_points, sizes], dim=1), volume_scores)
                results[volume][a] = results[volume][b] = pair
        return results


def _max_filter_3(x: Tensor) -> Tensor:
    """Maximum over each cell's 3×3×3 neighbourhood of (N, X, Y, Z) maps (borders: what exists).

    Separable: three running maxima of width 3, one per axis, several times cheaper on a CPU than
    ``max_pool3d`` with stride 1."""
    out = x
    for dim in (1, 2, 3):
        n = out.shape[dim]
        if n < 2:
            continue
        widened = out.clone()
        widened.narrow(dim, 1, n - 1).copy_(torch.maximum(out.narrow(dim, 1, n - 1), out.narrow(dim, 0, n - 1)))
        widened.narrow(dim, 0, n - 1).copy_(torch.maximum(widened.narrow(dim, 0, n - 1), out.narrow(dim, 1, n - 1)))
        out = widened
    return out


def two_peaks(heatmap: Tensor, min_distance_vox: float, stride: int = 1) -> tuple[Tensor, Tensor]:
    """The two highest peaks of each heatmap at least ``min_distance_vox`` apart.

    The first is the refined arg-max (:func:`refine_argmax`). The second is the highest local
    maximum (no higher cell among its 26 neighbours) whose centre lies at least
    ``min_distance_vox`` from the first: the first peak's own flank never counts as a second place.
    It is refined from its own 3×3×3 neighbourhood.

    Args:
        heatmap: (N, X, Y, Z), cells of ``stride`` input voxels.
        min_distance_vox: suppression radius, input voxels.

    Returns:
        points (N, 2, 3) input voxels, best first; scores (N, 2) the heatmap values at the two
        cells (the second is the map's minimum when there is no second local maximum).
    """
    if heatmap.ndim != 4:
        raise ValueError(f"two_peaks: heatmap must be (N, X, Y, Z), got {tuple(heatmap.shape)}")
    heatmap = heatmap.float()
    size = heatmap.shape[1:]
    first = refine_argmax(heatmap[:, None], stride)[:, 0]  # (N, 3)
    first_score = heatmap.flatten(1).amax(dim=1)
    centres = [cell_centres_vox(n, stride, device=heatmap.device) for n in size]
    # Squared distance of every cell centre to the first peak, separably per axis.
    dx, dy, dz = ((c[None, :] - first[:, axis, None]) ** 2 for axis, c in enumerate(centres))
    near = (dx[:, :, None, None] + dy[:, None, :, None] + dz[:, None, None, :]) < min_distance_vox ** 2
    floor = heatmap.flatten(1).amin(dim=1)
    candidates = torch.where((heatmap >= _max_filter_3(heatmap)) & ~near, heatmap, floor[:, None, None, None])
    second_score, index = candidates.flatten(1).max(dim=1)
    seconds = []
    for volume, flat in enumerate(index.tolist()):
        # Refine from the cell's own neighbourhood (clipped at the map's border, as refine_argmax does).
        cell = (flat // (size[1] * size[2]), (flat // size[2]) % size[1], flat % size[2])
        low = [max(c - 1, 0) for c in cell]
        window = heatmap[volume, low[0]:cell[0] + 2, low[1]:cell[1] + 2, low[2]:cell[2] + 2]
        point = refine_argmax(window[None, None], stride)[0, 0]
        seconds.append(point + torch.tensor(low, dtype=point.dtype, device=point.device) * stride)
    return torch.stack([first, torch.stack(seconds)], dim=1), torch.stack([first_score, second_score], dim=1)
