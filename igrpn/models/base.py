"""The interface every landmark detector implements (rpn, ssd, faster_rcnn, heatmap).

Tensors are (N, C, X, Y, Z); boxes are centre form ``(x, y, z, w, h, d)`` in voxels of the input
volume (voxel centres at integer indices); docs/architecture.md gives the interface.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from igrpn import boxes as box_ops
from igrpn import anchors as anchor_ops
from igrpn.config import LANDMARKS, LEFT_RIGHT_CLASS_PAIRS, NUM_LANDMARKS, Profile


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
            centre = anchor_ops.make_anchors(grid_shape, stride, sizes, self.profile.anchor_shapes).to(device or "cpu")
            self._anchor_cache[key] = (centre, box_ops.centre_to_corner(centre))
        return self._anchor_cache[key]

    def anchors_per_cell(self, num_sizes: int | None = None) -> int:
        """Anchors per feature cell for ``num_sizes`` base sizes (default: the profile's), in the
        profile's ``anchor_shapes`` mode (:func:`igrpn.boxes.anchor_shapes`)."""
        num_sizes = len(self.profile.anchor_sizes_mm) if num_sizes is None else num_sizes
        return anchor_ops.anchors_per_cell(num_sizes, self.profile.anchor_shapes)

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
                parts.append(anchor_ops.grid_anchors_near(gt_corner, shape, stride, sizes, min_iou,
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
            return anchor_ops.match_anchors(anchors_corner, gt_corner, gt_labels, profile.pos_iou, profile.neg_iou,
                                         candidates=near)
        # With both thresholds at neg_iou, label 0 is exactly "IoU < neg_iou with every GT".
        labels, _ = anchor_ops.match_anchors(anchors_corner, gt_corner, gt_labels, profile.neg_iou, profile.neg_iou,
                                          candidates=near)
        labels = torch.where(labels == 0, 0, -1)
        matched = torch.zeros_like(labels)
        positive, gt_index = anchor_ops.atss_positives(anchors, gt_centre, self.num_anchors_per_cell,
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
