"""Kept import path of the evaluation metrics: they live in :mod:`igrpn.evaluation.metrics`."""

from igrpn.evaluation.metrics import *  # noqa: F401,F403
from igrpn.evaluation.metrics import __all__  # noqa: F401
