"""Output paths built from names (run names, search names), kept inside their base directory.

A name given on the command line or read back from a tracking store becomes one
directory under a base (``outputs/<run name>``, ``<storage>/<search name>``,
``experiments/<search name>``). ``safe_child`` makes sure it is exactly one plain path
component, so that ``../x``, ``/abs`` or ``a/b`` can never write outside the base.
A user who wants another place passes an explicit directory (``--out-dir``, ``--out``).

Files that others read while they are written (checkpoints, decoded-image caches,
metrics) are written with ``atomic_write``: readers see the old file or the whole new
one, never a part.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from seg.errors import ConfigError

__all__ = ["MAX_NAME_BYTES", "atomic_write", "check_name", "fsync_directory", "safe_child"]

MAX_NAME_BYTES = 255  # the longest file name common file systems allow


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it can be used as a single directory name, else raise ConfigError.

    Refused: a non-string or empty name, ``.`` and ``..``, separators (``/``, ``\\``),
    absolute paths, NUL and other control characters, and names longer than
    MAX_NAME_BYTES bytes. ``what`` names the option in the message (e.g. ``--run-name``).
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{what} {name!r} is empty: give a plain name such as 'lr-sweep'")
    problem = None
    if name in (".", ".."):
        problem = "it refers to a directory itself"
    elif Path(name).is_absolute() or name.startswith(("/", "\\")):
        problem = "it is an absolute path"
    elif any(sep in name for sep in {"/", "\\", os.sep, os.altsep or "/"}):
        problem = "it contains a path separator"
    elif any(ord(char) < 32 or ord(char) == 127 for char in name):
        problem = "it contains a control character"
    elif name != name.strip():
        problem = "it starts or ends with white space"
    elif len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        problem = f"it is longer than {MAX_NAME_BYTES} bytes"
    if problem is not None:
        raise ConfigError(f"{what} {name!r} must be a plain name (letters, digits, '.', '_', '-'; no '/', "
                          f"not '..'): {problem}. It names a directory; to write elsewhere, pass an explicit "
                          f"output directory instead")
    return name


def safe_child(base: str | os.PathLike, name: str, what: str = "name") -> Path:
    """``base / name``, refusing (ConfigError) any ``name`` that is not one plain component.

    The check is on the name itself, not on the file system: ``base / name`` is
    guaranteed to have ``base`` as its parent, whatever exists on disk. (A symbolic link
    the user put at ``base / name`` is followed, as they intended.)
    """
    child = Path(base) / check_name(name, what)
    if child.parent != Path(base):  # belt and braces: pathlib agreeing that it is one component
        raise ConfigError(f"{what} {name!r} leaves the directory {base}")
    return child


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, durable: bool = False) -> Iterator[BinaryIO]:
    """Write ``path`` through a binary temporary file beside it (``.<name>.<random>.tmp``)
    that replaces it when the block ends (``os.replace``); on any error the temporary file
    is removed and ``path`` is left as it was.

    ``durable``: fsync the file before the rename and the directory after it, so that the
    new file survives a power loss (checkpoints); caches and reports can do without.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_directory(path.parent)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make the renames in ``directory`` durable (a no-op where directories cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
