"""The ``igrpn`` command line: ``app`` (the parsers and ``main``), ``predict``, ``commands``
(phantom, evaluate, markups-to-manifest) and ``args`` (what they share)."""

from igrpn.cli.app import main

__all__ = ["main"]
