"""The landmark detectors: the IG-RPN and the baselines of Table 1, on one shared backbone.

``build_model(method, profile)`` gives the model of a method; every model implements
:class:`~igrpn.models.base.LandmarkModel` (docs/architecture.md).
"""

from __future__ import annotations

from igrpn.config import METHODS, Profile, get_profile
from igrpn.models.backbone import Backbone, ConvBNReLU, detection_stride, pad_to_multiple
from igrpn.models.base import LandmarkModel
from igrpn.models.faster_rcnn import FasterRCNNModel
from igrpn.models.heatmap import HeatmapModel
from igrpn.models.rpn import RPNModel
from igrpn.models.ssd import SSDModel

__all__ = ["Backbone", "ConvBNReLU", "LandmarkModel", "RPNModel", "SSDModel", "FasterRCNNModel", "HeatmapModel",
           "build_model", "detection_stride", "pad_to_multiple"]

#: The model class of each method.
MODELS = {model.method: model for model in (RPNModel, SSDModel, FasterRCNNModel, HeatmapModel)}


def build_model(method: str, profile: Profile | str, iou_balance: bool = True) -> LandmarkModel:
    """The model of ``method`` ("rpn", "ssd", "faster_rcnn" or "heatmap") for ``profile`` (a
    :class:`~igrpn.config.Profile` or a profile name)."""
    if isinstance(profile, str):
        profile = get_profile(profile)
    if method not in METHODS:
        raise ValueError(f"build_model: unknown method {method!r}; expected one of {list(METHODS)}")
    return MODELS[method](profile, iou_balance=iou_balance)
