"""What every ``igrpn`` command shares: the usage error, the exit statuses, argparse number types."""

from __future__ import annotations

import argparse

import numpy as np


EXIT_STATUS_TEXT = """\
exit status:
  0  every volume was processed
  1  a volume failed (each failure is reported on stderr, naming the file and the reason; the
     other volumes still run and are written), or the checkpoint, prior or output was unusable
  2  a usage error (unknown option, unsupported output suffix, ...)"""


class UsageError(ValueError):
    """A command line that cannot be run as given (exit status 2)."""


#: Exit status after Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130


def checked_number(text: str, kind: type, least: float, what: str):
    """``kind(text)`` if it is finite and >= ``least``, else the usage error ``must be {what}``."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not (np.isfinite(value) and value >= least):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return checked_number(text, int, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return checked_number(text, int, 0, "an integer >= 0")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (NaN and inf refused)."""
    return checked_number(text, float, 0.0, "a finite number >= 0")


def exit_code(stop: SystemExit) -> int:
    return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
