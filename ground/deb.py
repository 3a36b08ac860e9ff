"""Pure-Python .deb handling, so any Linux host can unpack Debian packages
without dpkg: the ar container, the control file, and a safe extraction of
the data tarball (xz, gz, bz2, zst or uncompressed).

Extraction never writes outside *dest*: absolute member names, ``..``
components and symlinks that lead out of *dest* are refused. It is aware of
merged /usr: when ``dest/bin`` (``lib``, ``lib64``, ``sbin``...) is a symlink
to ``usr/bin``, members under ``./bin`` go through it and the symlink stays
(like ``tar --keep-directory-symlink``). Owners are not restored (the files
belong to whoever unpacks), modes keep only the permission bits, device
nodes and fifos are skipped."""

from __future__ import annotations

import gzip
import io
import lzma
import os
import posixpath
import shutil
import tarfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import zstandard

from ground import deb822
from ground.errors import ArchiveError, write_failed

AR_MAGIC = b"!<arch>\n"
_MODES = {".xz": "r|xz", ".gz": "r|gz", ".bz2": "r|bz2", "": "r|"}
_MAX_LINKS = 40
_DAMAGE = (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile,
           zstandard.ZstdError)


class _Window(io.RawIOBase):
    """A read-only view of bytes [offset, offset+size) of an open file."""

    def __init__(self, f, offset: int, size: int):
        self._f, self._pos, self._end = f, offset, offset + size

    def readable(self):
        return True

    def readinto(self, buf):
        n = min(len(buf), self._end - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._pos)
        data = self._f.read(n)
        buf[:len(data)] = data
        self._pos += len(data)
        return len(data)


def members(f) -> dict[str, tuple[int, int]]:
    """``{name: (offset, size)}`` of the members of the ar archive open as *f*."""
    f.seek(0)
    if f.read(8) != AR_MAGIC:
        raise ArchiveError(f"{getattr(f, 'name', 'archive')}: not a .deb (no ar header)")
    out, pos = {}, 8
    while True:
        header = f.read(60)
        if not header:
            return out
        if len(header) < 60 or header[58:60] != b"`\n":
            raise ArchiveError(f"{getattr(f, 'name', 'archive')}: truncated or damaged ar header")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip() or 0)
        out[name] = (pos + 60, size)
        pos += 60 + size + (size & 1)
        f.seek(pos)


def _tar(f, prefix: str) -> tarfile.TarFile:
    """The streamed tarball ``<prefix>.tar[.xz|.gz|.bz2|.zst]`` inside the .deb *f*."""
    found = members(f)
    for name, (offset, size) in found.items():
        if not name.startswith(prefix + ".tar"):
            continue
        ext = name[len(prefix) + 4:]
        raw = io.BufferedReader(_Window(f, offset, size), 1 << 20)
        if ext == ".zst":
            stream = zstandard.ZstdDecompressor().stream_reader(raw)
            return tarfile.open(fileobj=stream, mode="r|")
        if ext in _MODES:
            return tarfile.open(fileobj=raw, mode=_MODES[ext])
        raise ArchiveError(f"{getattr(f, 'name', 'archive')}: unsupported member {name}")
    raise ArchiveError(f"{getattr(f, 'name', 'archive')}: no {prefix}.tar member "
                   f"(has {', '.join(found) or 'nothing'})")


def control(deb: Path) -> dict[str, str]:
    """The fields of the package's control file."""
    with open(deb, "rb") as f, _tar(f, "control") as tf:
        for m in tf:
            if m.isfile() and m.name.lstrip("./") == "control":
                return deb822.parse(tf.extractfile(m).read().decode("utf-8", "replace"))
    raise ArchiveError(f"{deb}: control.tar has no control file")


def extract(deb: Path, dest: Path) -> list[str]:
    """Unpack the data tarball of *deb* into *dest* (see the module doc for what
    is refused); returns the member names, normalised (``usr/bin/x``)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with open(deb, "rb") as f, _tar(f, "data") as tf, _named(deb, dest):
        return extract_tar(tf, dest)


def extract_tarball(path: Path, dest: Path, strip: int = 0) -> list[str]:
    """Safely unpack a tarball file (any compression tarfile reads, or zstd)."""
    dest.mkdir(parents=True, exist_ok=True)
    with open(path, "rb") as raw, _named(path, dest):
        if str(path).endswith(".zst"):
            tf = tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(raw), mode="r|")
        else:
            tf = tarfile.open(fileobj=raw, mode="r|*")
        with tf:
            return extract_tar(tf, dest, strip)


@contextmanager
def _named(label, dest: Path):
    """Errors of an extraction into *dest* as one ArchiveError line that names *label*."""
    try:
        yield
    except _DAMAGE as exc:
        raise ArchiveError(f"{label}: damaged tarball ({exc})") from None
    except ArchiveError as exc:
        raise ArchiveError(f"{label}: {exc.message}", hint=exc.hint) from None
    except OSError as exc:       # disk full (ENOSPC), quota, permissions while unpacking
        err = write_failed(exc.filename or dest, exc)
        raise ArchiveError(f"unpacking {label}: {err.message}", hint=err.hint) from None


def extract_tar(tf: tarfile.TarFile, dest: Path, strip: int = 0) -> list[str]:
    """Safely unpack the (possibly streamed) tarball *tf* into *dest*, dropping
    the first *strip* path components of every member."""
    dest = Path(dest).resolve()
    names = []
    for m in tf:
        rel = _member_path(m.name, strip)
        if rel is None or not (m.isdir() or m.isfile() or m.issym() or m.islnk()):
            continue        # device nodes and fifos are not made (nor is what they would replace removed)
        if m.isdir():
            _mkdir(dest, rel, m)
        else:
            _write(tf, m, _place(dest, rel, m.name), dest, strip)
        names.append("/".join(rel))
    return names


def _member_path(name: str, strip: int) -> list[str] | None:
    """The components of member *name* after *strip*; None for the root entry."""
    if name.startswith("/"):
        raise ArchiveError(f"refusing member with an absolute path: {name}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"refusing member with a '..' component: {name}")
    parts = parts[strip:]
    return parts or None


def _place(dest: Path, rel: list[str], name: str) -> Path:
    """Where member *rel* goes: its parent resolved inside *dest*, following
    directory symlinks that stay inside *dest* (merged /usr)."""
    parent = _resolve(dest, rel[:-1], name)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ArchiveError(f"member {name} lies under {parent}, which is a file, not a directory",
                           hint="two packages unpacked into one root disagree about that path: "
                                "remove the root (or the kernel's cache entry) and fetch again") from None
    return parent / rel[-1]


def _resolve(dest: Path, parts: list[str], name: str, depth: int = 0) -> Path:
    """The real path for *parts* under *dest*, symlinks taken as if *dest* were
    the root (an absolute or ``..`` target never leaves *dest*)."""
    if depth > _MAX_LINKS:
        raise ArchiveError(f"too many levels of symlinks under {dest} for {name}")
    cur = dest
    for i, part in enumerate(parts):
        nxt = cur / part
        if nxt.is_symlink():
            link = os.readlink(nxt)
            base = "/" if link.startswith("/") else "/" + str(cur.relative_to(dest))
            norm = posixpath.normpath(posixpath.join(base, link))
            target = [p for p in norm.split("/") if p]  # normpath of "/..." drops ".."
            return _resolve(dest, target + parts[i + 1:], name, depth + 1)
        cur = nxt
    return cur


def _mkdir(dest: Path, rel: list[str], m: tarfile.TarInfo):
    """A directory member; an existing directory, or a symlink to one inside
    *dest*, is kept (merged /usr)."""
    real = _resolve(dest, rel, m.name)
    if not real.is_dir():
        _clear(real)
        real.mkdir(parents=True)
    os.chmod(real, (m.mode & 0o777) | 0o700)


def _write(tf: tarfile.TarFile, m: tarfile.TarInfo, target: Path, dest: Path, strip: int):
    if target.is_dir() and not target.is_symlink():
        raise ArchiveError(f"member {m.name} would replace the directory {target}")
    _clear(target)
    if m.issym():
        os.symlink(m.linkname, target)
    elif m.islnk():
        rel = _member_path(m.linkname, strip)
        source = _place(dest, rel, m.name) if rel else None
        if source is None or not source.is_file() or source.is_symlink():
            raise ArchiveError(f"hard link {m.name} points to a missing member {m.linkname}")
        os.link(source, target)
    elif m.isfile():
        with tf.extractfile(m) as src, open(target, "xb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        os.chmod(target, m.mode & 0o777)
        os.utime(target, (m.mtime, m.mtime))


def _clear(target: Path):
    """Remove what is at *target* unless it is a real directory, as tar
    overwrites files and symlinks."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        target.unlink()
