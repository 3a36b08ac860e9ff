"""Records that let the kit's caches notice damage: size and mtime of a file,
checked on every use, and its sha256, checked when the mtime moved (or on
demand). Used for kernel entries, boot files and the root image."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record(path: Path) -> dict:
    """``{"size", "mtime_ns", "sha256"}`` of *path*, for :func:`check`."""
    st = Path(path).stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256_file(path)}


def check(path: Path, rec: dict, *, name: str | None = None, full: bool = False) -> str | None:
    """None if *path* still matches *rec*, else what is wrong, as a phrase that
    names the file (*name*, default the path): missing, truncated or replaced
    (size), or changed content (sha256, read when the mtime moved or *full*)."""
    path = Path(path)
    label = name or str(path)
    if not path.is_file():
        return f"{label} is missing"
    st = path.stat()
    if st.st_size != rec.get("size"):
        return f"{label} has {st.st_size} bytes, {rec.get('size')} were recorded (truncated or replaced)"
    if (full or st.st_mtime_ns != rec.get("mtime_ns")) and sha256_file(path) != rec.get("sha256"):
        return f"{label} does not match its recorded sha256 (its content changed)"
    return None
