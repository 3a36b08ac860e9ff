"""Files written whole: a reader, or a second writer, sees the old content or the
new, never a part. One helper for every cache entry, stamp and rendered source."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def atomic_write(path: Path, data: bytes | str):
    """Write *data* to *path* through a temp file of this writer's own (pid and
    thread in its name) in the same directory, then rename it over *path*."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_if_changed(path: Path, text: str) -> bool:
    """Write *text* to *path* (whole) unless it already holds it; True if written
    (Kbuild and make see an unchanged file's old mtime)."""
    if path.is_file() and path.read_text() == text:
        return False
    atomic_write(path, text)
    return True
