"""Files that are whole or absent: atomic writes, the process's umask, JSON read leniently.

Every file movegen writes for a later command reaches its final name only when complete
(:func:`atomic_path`): a crash never leaves a half-written checkpoint, result, record or image
grid that looks whole, and the temporary name (``.NAME.XXXX`` beside it) is what a run folder's
owner cleans up after a crash (``runs.claim_run``).

Imports: the standard library only (``checkpoint``, ``runs`` and the code store use it).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success the file is synced to disk, given the
    usual permissions (0666 & ~umask; mkstemp makes 0600) and renamed to ``path``, else removed.
    A crash never leaves a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # on disk before it takes the final name
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def read_json(path: str | os.PathLike) -> dict | None:
    """A JSON object, or None when the file is missing, truncated or not an object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


__all__ = ["atomic_path", "atomic_write_text", "current_umask", "read_json"]
