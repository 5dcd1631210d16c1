"""Kept import path and entry point of the training loop, which lives in :mod:`igrpn.training.loop`.

    python -m igrpn.train --profile cpu --method rpn --seed 0 --out DIR
"""

from igrpn.training.loop import *  # noqa: F401,F403  (the names older code imports from here)
from igrpn.training.loop import main

if __name__ == "__main__":
    raise SystemExit(main())
