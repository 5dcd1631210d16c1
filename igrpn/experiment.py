"""Kept import path and entry point of the experiment runner (:mod:`igrpn.training.experiment`).

    python -m igrpn.experiment --name NAME --set key=value --seeds 0 1 --minutes 4
"""

from igrpn.training.experiment import *  # noqa: F401,F403  (the names older code imports from here)
from igrpn.training.experiment import main

if __name__ == "__main__":
    raise SystemExit(main())
