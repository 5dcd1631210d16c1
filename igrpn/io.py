"""Atomic file writes: every igrpn output goes through here, and this is the only ``mkstemp``.

A reader never sees a half-written file: each file is written to a temporary file beside it and
renamed over the target; a failure or Ctrl-C leaves neither a temporary nor a partial file
(docs/design.md §2).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

import torch


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: see :func:`atomic_write_files`."""
    atomic_write_files({path: text})


def atomic_write_files(contents: Mapping) -> None:
    """Write several files all or none: every one to a temporary file beside it, then renamed.

    The one place every igrpn output goes through (predictions, markups, manifests, checkpoints,
    logs, phantom volumes). A reader never sees a half-written file; a failure or Ctrl-C while
    writing leaves no temporary file and no new file; the renames, the only step that touches
    the targets, hold Ctrl-C until they are all done. Each file gets the permissions a plain
    ``open(path, "w")`` would give: an existing file keeps its mode, a new one gets 0666 less the
    umask. A symbolic link is written through (its target replaced, the link kept), as ``open``
    does.

    Args:
        contents: {path: str (written as UTF-8) or bytes}. The folders must exist.

    Raises:
        OSError naming the file (missing folder, no permission, disk full, ...).
    """
    pending: list[tuple[str, Path]] = []
    try:
        for path, data in contents.items():
            target = _write_target(Path(path))
            pending.append((_write_temporary(target, data), target))
        with _ctrl_c_held():
            for temporary, target in pending:
                os.replace(temporary, target)
    except BaseException:
        for temporary, _ in pending:
            Path(temporary).unlink(missing_ok=True)
        raise


def _write_target(path: Path) -> Path:
    """The file a write to ``path`` changes: the target of a symbolic link, else ``path``."""
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    if not target.parent.is_dir():
        raise FileNotFoundError(f"{path}: cannot write: directory {target.parent} does not exist")
    if target.is_dir():
        raise IsADirectoryError(f"{path}: cannot write: it is a directory")
    return target


def _write_temporary(target: Path, data) -> str:
    """A temporary file beside ``target`` holding ``data``, with the mode ``target`` will have."""
    try:
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as error:
        raise OSError(f"{target}: cannot write: {error.strerror or error}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        # mkstemp creates 0600 files; an output should look like any file the user writes.
        os.chmod(temporary, output_mode(target))
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return temporary


def output_mode(path) -> int:
    """Permission bits for writing ``path``: its own when it exists, else 0o666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)  # the only portable way to read the umask is to set it
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def _ctrl_c_held():
    """Hold a Ctrl-C (SIGINT) until the block has run, then raise it (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def atomic_torch_save(obj, path) -> None:
    """Write ``obj`` with ``torch.save`` atomically (see :func:`atomic_write_files`); creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_files({path: buffer.getvalue()})


def check_writable(path: Path) -> None:
    """Fail early, before any work, when ``path`` cannot be written.

    Creates and removes a temporary file in the target directory (what the atomic write will do).

    Raises:
        OSError naming the file: directory missing, not a directory, not writable; path is a
        directory.
    """
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise IsADirectoryError(f"{path}: cannot write the output: it is a directory")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise FileNotFoundError(f"{path}: cannot write the output: directory {parent} {what}")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise PermissionError(f"{path}: cannot write the output in {parent}: "
                              f"{error.strerror or error}") from None
    os.close(fd)
    os.unlink(probe)
