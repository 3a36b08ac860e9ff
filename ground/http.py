"""Streamed HTTP downloads into a cache: a temporary file beside the target,
size and sha256 checked (and any other check the caller adds) before an
``os.replace`` puts it in place, so a failed or partial download never enters
the cache. A download holds a lock on its temporary file; one a killed download
left (unlocked, no longer new) is removed by the next download of the same file.
Conditional GETs (ETag, Last-Modified) report 304 instead of
downloading. urllib honours ``http_proxy``/``https_proxy``/``no_proxy``."""

from __future__ import annotations

import fcntl
import glob
import hashlib
import http.client
import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ground.errors import ArchiveError, write_failed

TIMEOUT = 60
CHUNK = 1 << 20
# a part file this old (seconds) and unlocked was left by a killed download; the age
# only covers the instant between a live download's mkstemp and its lock
STALE_PART = 60
Progress = Callable[[str, int, "int | None"], None]


class Unreachable(ArchiveError):
    """The server did not answer (refused, no route, DNS, timeout)."""


class NotServed(ArchiveError):
    """The server answered that it has no such file (HTTP 404 or 410)."""


@dataclass
class Fetched:
    """What a GET gave: 200 (the file is in place) or 304 (not modified)."""

    status: int
    etag: str | None = None
    last_modified: str | None = None
    size: int = 0
    sha256: str = ""
    headers: dict = field(default_factory=dict, repr=False)


def conditional(etag: str | None, last_modified: str | None) -> dict:
    """Request headers that turn a GET into a conditional one."""
    out = {}
    if etag:
        out["If-None-Match"] = etag
    if last_modified:
        out["If-Modified-Since"] = last_modified
    return out


def fetch(url: str, dest: Path, *, size: int | None = None, sha256: str | None = None,
          headers: dict | None = None, check: Callable[[Path], None] | None = None,
          progress: Progress | None = None, timeout: float = TIMEOUT) -> Fetched:
    """GET *url* into *dest*; *size*/*sha256* (when given) and *check(tmp)*
    must pass before the file replaces *dest*. Raises ArchiveError naming the
    URL and the reason (Unreachable when nothing answered)."""
    try:
        req = urllib.request.Request(url, headers=headers or {})
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            return Fetched(304, exc.headers.get("ETag"), exc.headers.get("Last-Modified"))
        gone = NotServed if exc.code in (404, 410) else ArchiveError
        raise gone(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except http.client.HTTPException as exc:     # BadStatusLine: not an HTTP server
        raise ArchiveError(f"{url}: not an HTTP answer ({type(exc).__name__}: {exc})",
                           hint="check NFLAB_DEBIAN_MIRROR: it must be a Debian mirror's "
                                "http:// or https:// URL") from None
    except (urllib.error.URLError, OSError) as exc:
        raise Unreachable(f"{url}: {getattr(exc, 'reason', exc)}") from None
    except ValueError as exc:
        raise ArchiveError(f"{url}: not a URL the kit can fetch ({exc})") from None
    with resp:
        expected = size if size is not None else _length(resp)
        got, digest = _stream(resp, url, dest, expected, sha256, check, progress)
        return Fetched(resp.status, resp.headers.get("ETag"), resp.headers.get("Last-Modified"),
                       got, digest, dict(resp.headers))


def _length(resp) -> int | None:
    value = resp.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


def _stream(resp, url, dest: Path, expected, sha256, check, progress) -> tuple[int, str]:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_parts(dest)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        held = os.dup(fd)     # the lock lives until this closes, after the rename
        fcntl.flock(held, fcntl.LOCK_EX)
    except OSError as exc:
        raise write_failed(dest.parent, exc) from None
    try:
        got, digest = _write(resp, fd, url, dest, expected, progress)
        _verify(url, got, digest, expected, sha256)
        if check:
            check(Path(tmp))
        os.replace(tmp, dest)
        return got, digest
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        os.close(held)


def _remove_stale_parts(dest: Path):
    """Remove the part files of *dest* that killed downloads left (SIGKILL, power
    loss): those no download holds locked, older than STALE_PART seconds."""
    prefix = f".{dest.name}."
    for part in dest.parent.glob(glob.escape(prefix) + "*.part"):
        if "." in part.name[len(prefix):-len(".part")]:
            continue             # mkstemp adds no dot: another file's (.<dest>.x.<random>)
        try:
            fd = os.open(part, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue             # gone meanwhile: its download finished or failed
        try:
            if time.time() - os.fstat(fd).st_mtime >= STALE_PART:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                part.unlink()
        except OSError:          # locked by a live download (BlockingIOError), or gone
            pass
        finally:
            os.close(fd)


def _write(resp, fd: int, url, dest: Path, expected, progress) -> tuple[int, str]:
    """The body into the open temporary file *fd*; a write that fails (disk full,
    file size limit) is an ArchiveError (read errors already are, in ``_copy``)."""
    try:
        with os.fdopen(fd, "wb") as out:
            return _copy(resp, out, url, expected, progress)
    except OSError as exc:
        raise write_failed(dest, exc) from None


def _copy(resp, out, url, expected, progress) -> tuple[int, str]:
    h, got = hashlib.sha256(), 0
    while True:
        try:
            block = resp.read(CHUNK)
        except (OSError, http.client.HTTPException) as exc:
            raise ArchiveError(f"{url}: truncated download ({got} bytes, then {exc})") from None
        if not block:
            return got, h.hexdigest()
        h.update(block)
        out.write(block)
        got += len(block)
        if expected is not None and got > expected:     # stop before a bad server fills the disk
            raise ArchiveError(f"{url}: size mismatch (more than the {expected} bytes expected)",
                               hint="the mirror serves another file: set NFLAB_DEBIAN_MIRROR to another")
        if progress:
            progress(url, got, expected)


def _verify(url, got, digest, expected, sha256):
    if expected is not None and got != expected:
        raise ArchiveError(f"{url}: truncated download ({got} of {expected} bytes)"
                           if got < expected else
                           f"{url}: size mismatch ({got} bytes, {expected} expected)")
    if sha256 and digest != sha256:
        raise ArchiveError(f"{url}: sha256 mismatch (got {digest}, expected {sha256})")
