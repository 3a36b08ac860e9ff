"""The kit's own Debian archive client: no host apt, any Linux host.

``Archive().packages("trixie-backports")`` downloads the suite's ``InRelease``,
checks its signature with ``gpgv`` against the Debian archive keyring, then
reads ``main/binary-amd64/Packages.xz`` after checking its sha256 and size
against the signed list; ``download(pkg)`` fetches a .deb and checks it
against the index. Nothing that fails a check enters the cache.

Cache (``$NFLAB_CACHE/debian``, or *cache*):

* ``<mirror-key>/dists/<suite>/InRelease`` and ``InRelease.json`` (when it was
  fetched, its ETag and Last-Modified). It is used without asking the mirror
  while fresh: before its Valid-Until and at most ``$NFLAB_ARCHIVE_TTL``
  seconds (default 6 h) after the fetch. A stale one is asked for again with
  a conditional GET; a 304 or the same index hashes keep the parsed indexes.
  ``refresh=True`` forces that check. When the mirror cannot be reached a
  stale (but still valid) InRelease is used as it is.
* ``.../<component>/binary-<arch>/Packages-<sha>`` (the text) and ``.idx``
  (the parsed rows, see :mod:`ground.debindex`), named by the index's sha256.
* ``pool/<basename>`` for .debs and source files, with ``<basename>.json``
  (size, mtime, sha256: a reused file is checked, its sha256 recomputed only
  when its mtime moved).

Mirrors: *mirror*, else ``$NFLAB_DEBIAN_MIRROR``, else the host's apt source
for Debian, else debootstrap's default. Suites ``*-security`` come from
*security_mirror*, ``$NFLAB_DEBIAN_SECURITY_MIRROR``, the host's apt source for
them, or the main mirror with its last path component ``debian`` replaced by
``debian-security``.

An InRelease past its Valid-Until is used with a warning (as debootstrap does), or refused (after one more fetch) when
*check_valid_until* is true or ``$NFLAB_DEBIAN_CHECK_VALID_UNTIL=1`` (apt's
``Check-Valid-Until``); either way its signature is checked."""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import sys
import time
from pathlib import Path

from ground import aptsources, debindex, debsource, http, integrity
from ground.debindex import Package, PackageIndex, SourceIndex, SourcePackage, closure
from ground.debrelease import Release, keyring_missing, verify
from ground.errors import ArchiveError
from ground.files import atomic_write
from ground.paths import cache_dir
from ground.proc import file_lock

__all__ = ["Archive", "ArchiveError", "Package", "PackageIndex", "Release", "SourceIndex",
           "SourcePackage", "SUITES", "closure", "canonical_suite"]

SUITES = ("bullseye", "bullseye-updates", "bullseye-security",
          "bookworm", "bookworm-updates", "bookworm-security", "bookworm-backports",
          "trixie", "trixie-updates", "trixie-security", "trixie-backports",
          "forky", "sid", "experimental")
ALIASES = {"unstable": "sid", "testing": "forky"}
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
TTL = 6 * 3600


def default_keyring() -> Path:
    """The keyring InRelease files are checked against ($NFLAB_DEBIAN_KEYRING)."""
    return Path(os.environ.get("NFLAB_DEBIAN_KEYRING") or KEYRING)


def canonical_suite(suite: str) -> str:
    """The suite's name in the archive (``unstable`` -> ``sid``); an unknown
    suite raises ArchiveError listing the known ones."""
    name = ALIASES.get(suite, suite)
    if name not in SUITES:
        raise ArchiveError(f"unknown Debian suite {suite!r}; known: "
                           f"{', '.join(SUITES + tuple(ALIASES))}")
    return name


def mirror_key(url: str) -> str:
    """A directory name for a mirror URL."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", url.split("://", 1)[-1]).strip("_")


def default_mirror() -> str:
    found = (aptsources.env_mirror("NFLAB_DEBIAN_MIRROR")
             or aptsources.find(lambda s: s in SUITES and not s.endswith("-security"))
             or aptsources.debootstrap_mirror())
    if not found:
        raise ArchiveError("no Debian mirror configured and none found in apt's sources "
                           "or debootstrap", hint="set NFLAB_DEBIAN_MIRROR to a Debian mirror URL")
    return found


def mirror_origin(url: str) -> str:
    """``" (from <where>)"``: where the kit found mirror *url*, for errors about it
    (a third-party apt source taken for Debian's is then easy to spot); "" if unknown."""
    for name in ("NFLAB_DEBIAN_MIRROR", "NFLAB_DEBIAN_SECURITY_MIRROR"):
        if aptsources.env_mirror(name) == url:
            return f" (from ${name})"
    path = aptsources.origin(url)
    return f" (from {path})" if path else ""


def default_security_mirror(mirror: str) -> str | None:
    return (aptsources.env_mirror("NFLAB_DEBIAN_SECURITY_MIRROR")
            or aptsources.find(lambda s: s in SUITES and s.endswith("-security"))
            or (mirror[:-len("debian")] + "debian-security" if mirror.endswith("/debian")
                else None))


def ttl() -> float:
    value = os.environ.get("NFLAB_ARCHIVE_TTL", "")
    try:
        return float(value) if value else TTL
    except ValueError:
        raise ArchiveError(f"NFLAB_ARCHIVE_TTL={value!r} is not a number of seconds",
                           hint="e.g. NFLAB_ARCHIVE_TTL=3600, or 0 to read the archive's indexes again") from None


def env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in ("0", "1", "yes", "no", "true", "false"):
        raise ArchiveError(f"{name}={value!r} is not a yes/no value",
                           hint="use 1, yes or true; 0, no or false; or leave it unset")
    return value in ("1", "yes", "true")


_WARNED: set[str] = set()


class _Expired(Exception):
    """An InRelease whose signature is good but whose Valid-Until has passed."""

    def __init__(self, release: Release):
        super().__init__("expired")
        self.release = release


class _Older(Exception):
    """A good signature, but an older Release than the cached one (a replay or a
    mirror that lags behind)."""


class Archive:
    """A Debian mirror (and its security mirror) with a local, checked cache."""

    def __init__(self, mirror=None, security_mirror=None, keyring=None, cache=None,
                 progress=None, check_valid_until=None):
        self.mirror = (mirror or default_mirror()).rstrip("/")
        self.security_mirror = (security_mirror or default_security_mirror(self.mirror) or "")
        self.security_mirror = self.security_mirror.rstrip("/")
        self.keyring = Path(keyring) if keyring else default_keyring()
        self.cache = Path(cache) if cache else cache_dir() / "debian"
        self.progress = progress
        self.check_valid_until = (check_valid_until if check_valid_until is not None
                                  else env_flag("NFLAB_DEBIAN_CHECK_VALID_UNTIL", False))
        self._releases: dict[str, Release] = {}
        self._indexes: dict[tuple, debindex.Index] = {}

    def __repr__(self):
        return f"Archive({self.mirror}, security={self.security_mirror or None})"

    def base(self, suite: str) -> str:
        """The mirror URL that serves *suite*."""
        if not suite.endswith("-security"):
            return self.mirror
        if not self.security_mirror:
            raise ArchiveError(f"no security mirror for {suite}",
                               hint="set NFLAB_DEBIAN_SECURITY_MIRROR")
        return self.security_mirror

    def suite_dir(self, suite: str) -> Path:
        return self.cache / mirror_key(self.base(suite)) / "dists" / suite

    # -- InRelease ---------------------------------------------------------

    def release(self, suite: str, refresh: bool = False) -> Release:
        """The verified Release of *suite*, from the cache while fresh."""
        suite = canonical_suite(suite)
        if suite in self._releases and not refresh:
            return self._releases[suite]
        if not self.keyring.is_file():
            raise keyring_missing(self.keyring)
        folder = self.suite_dir(suite)
        with file_lock(folder / ".lock"):
            rel, meta = self._cached_release(suite)
            if rel is None or refresh or not self._fresh(rel, meta):
                rel = self._refresh_release(suite, rel, meta, forced=refresh)
        self._releases[suite] = rel
        return rel

    def _cached_release(self, suite: str) -> tuple[Release | None, dict]:
        path = self.suite_dir(suite) / "InRelease"
        try:
            meta = json.loads((path.parent / "InRelease.json").read_text())
            return Release.parse(verify(path, self.keyring, str(path))), meta
        except (OSError, ValueError, ArchiveError):
            return None, {}

    def _expired(self, rel: Release) -> bool:
        """Past Valid-Until and refused; past it but accepted is said once, on stderr."""
        if rel.expired() and not self.check_valid_until and rel.suite not in _WARNED:
            _WARNED.add(rel.suite)
            print(f"nflab: warning: the {rel.suite} InRelease expired on "
                  f"{rel.valid_until:%Y-%m-%d} (Valid-Until): the mirror lags behind; using it, "
                  "its signature checked (NFLAB_DEBIAN_CHECK_VALID_UNTIL=1 refuses it)",
                  file=sys.stderr)
        return self.check_valid_until and rel.expired()

    def _fresh(self, rel: Release, meta: dict) -> bool:
        return not self._expired(rel) and time.time() - meta.get("fetched", 0) < ttl()

    def _refresh_release(self, suite, rel, meta, forced) -> Release:
        """Ask the mirror (conditionally when *rel* is cached); an expired
        answer is fetched once more unconditionally before giving up."""
        url = f"{self.base(suite)}/dists/{suite}/InRelease"
        headers = http.conditional(meta.get("etag"), meta.get("last_modified")) if rel else {}
        for _ in range(2):
            got_release: list[Release] = []
            try:
                got = self._get(suite, url, self.suite_dir(suite) / "InRelease", headers=headers,
                                check=self._verifier(url, got_release, suite, rel))
            except _Expired as exc:
                rel, headers = exc.release, {}
                continue
            except _Older:
                return rel               # a lagging mirror: keep the newer cached one
            except http.Unreachable:
                if rel is not None and not self._expired(rel) and not forced:
                    return rel
                raise
            rel = got_release[0] if got.status == 200 else rel
            if not self._expired(rel):
                self._save_meta(suite, url, got, meta)
                return rel
            headers = {}
        raise ArchiveError(f"{url}: expired on {rel.valid_until:%Y-%m-%d %H:%M %Z} (Valid-Until), "
                           "also when fetched again",
                           hint="the mirror is out of date: set NFLAB_DEBIAN_MIRROR to another, "
                                "or NFLAB_DEBIAN_CHECK_VALID_UNTIL=0 to accept it")

    def _verifier(self, url: str, out: list, suite: str, cached: Release | None = None):
        """A check for http.fetch: the signature must be good, the Release must
        be *suite*'s (Suite or Codename, as apt checks), not older than the
        *cached* one and not expired before the new InRelease replaces it."""
        def check(tmp: Path):
            rel = Release.parse(verify(tmp, self.keyring, url))
            if suite not in (rel.suite, rel.codename):
                raise ArchiveError(f"{url}: the signed InRelease is for suite {rel.suite!r} "
                                   f"(codename {rel.codename!r}), not {suite}",
                                   hint="the mirror serves the wrong file: set "
                                        "NFLAB_DEBIAN_MIRROR to another")
            if cached and cached.date and rel.date and rel.date < cached.date:
                print(f"nflab: warning: {url} is older ({rel.date:%Y-%m-%d %H:%M}) than the "
                      f"cached one ({cached.date:%Y-%m-%d %H:%M}); keeping the cached one",
                      file=sys.stderr)
                raise _Older()
            if self._expired(rel):
                raise _Expired(rel)
            out.append(rel)
        return check

    def _save_meta(self, suite: str, url: str, got: http.Fetched, old: dict):
        meta = {"url": url, "fetched": time.time(),
                "etag": got.etag or old.get("etag"),
                "last_modified": got.last_modified or old.get("last_modified")}
        atomic_write(self.suite_dir(suite) / "InRelease.json",
                              json.dumps(meta, indent=1).encode())

    def _get(self, suite: str, url: str, dest: Path, **kw) -> http.Fetched:
        """http.fetch, with an unreachable mirror named with the suite and where
        the kit found it (an apt source file, an environment variable)."""
        try:
            return http.fetch(url, dest, progress=self.progress, **kw)
        except http.Unreachable as exc:
            raise http.Unreachable(
                f"cannot reach the Debian mirror {self.base(suite)} for suite {suite} "
                f"({exc.message.split(': ', 1)[-1]}){mirror_origin(self.base(suite))}",
                hint="check the network, or set NFLAB_DEBIAN_MIRROR") from None
        except http.NotServed as exc:
            raise http.NotServed(exc.message + mirror_origin(self.base(suite)),
                                 hint=exc.hint) from None

    # -- Packages and Sources ---------------------------------------------

    def packages(self, suite: str, component: str = "main", arch: str = "amd64",
                 refresh: bool = False) -> PackageIndex:
        """The binary packages of *suite* (``<component>/binary-<arch>/Packages``)."""
        return self._index(suite, f"{component}/binary-{arch}/Packages", refresh,
                           debindex.scan_packages, PackageIndex)

    def sources(self, suite: str, component: str = "main", refresh: bool = False) -> SourceIndex:
        """The source packages of *suite* (``<component>/source/Sources``)."""
        return self._index(suite, f"{component}/source/Sources", refresh,
                           debindex.scan_sources, SourceIndex)

    def _index(self, suite, path, refresh, scan, cls):
        suite = canonical_suite(suite)
        rel = self.release(suite, refresh)
        sha, size = rel.entry(path + ".xz", f"{self.base(suite)}/dists/{suite}")
        key = (suite, path, sha)
        if key not in self._indexes:
            folder = self.suite_dir(suite) / path.rsplit("/", 1)[0]
            text = folder / f"{path.rsplit('/', 1)[1]}-{sha[:16]}"
            idx = text.with_name(text.name + ".idx")
            rows = debindex.load(idx, text)
            if rows is None:
                with file_lock(folder / ".lock"):
                    rows = debindex.load(idx, text) or self._build(suite, rel, path, scan, text, idx)
            self._indexes[key] = cls(rows, text, suite)
        return self._indexes[key]

    def _build(self, suite, rel, path, scan, text: Path, idx: Path) -> list[tuple]:
        """Download ``<path>.xz`` (by hash when the Release offers it), check
        it, scan it and store text and rows; older versions are removed."""
        sha, size = rel.entry(path + ".xz", suite)
        folder, name = path.rsplit("/", 1)
        where = f"{folder}/by-hash/SHA256/{sha}" if rel.acquire_by_hash else path + ".xz"
        url = f"{self.base(suite)}/dists/{suite}/{where}"
        xz = text.with_name(f".{text.name}.xz")
        self._get(suite, url, xz, size=size, sha256=sha)
        try:
            data = lzma.decompress(xz.read_bytes())
        except lzma.LZMAError as exc:
            raise ArchiveError(f"{url}: cannot decompress ({exc})") from None
        finally:
            xz.unlink()
        rows = scan(data)
        debindex.store(rows, data, idx, text)
        for old in text.parent.glob(f"{name}-*"):
            if old not in (text, idx):
                old.unlink()
        return rows

    # -- files -------------------------------------------------------------

    def download(self, pkg: Package, dest_dir: Path | None = None) -> Path:
        """The .deb of *pkg*, checked against the index (size, sha256), from
        ``pool/`` when it is there and intact; copied into *dest_dir* if given."""
        path = self.fetch_file(pkg.suite, pkg.filename, pkg.sha256, pkg.size)
        if dest_dir is None:
            return path
        out = Path(dest_dir) / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)
        return out

    def fetch_file(self, suite: str, path: str, sha256: str, size: int) -> Path:
        """The file at *path* (relative to the mirror) of *suite*, cached in
        ``pool/`` under its basename once its size and sha256 matched."""
        target = self.cache / "pool" / path.rsplit("/", 1)[-1]
        if self._intact(target, sha256, size):
            return target
        self._get(suite, f"{self.base(suite)}/{path}", target, size=size, sha256=sha256)
        self._record(target)
        return target

    @staticmethod
    def _record_path(target: Path) -> Path:
        return target.with_name(target.name + ".json")

    def _record(self, target: Path) -> dict:
        rec = integrity.record(target)
        atomic_write(self._record_path(target), json.dumps(rec).encode())
        return rec

    def _intact(self, target: Path, sha256: str, size: int) -> bool:
        """Whether the cached *target* still is the file with *sha256*/*size*."""
        if not target.is_file():
            return False
        try:
            rec = json.loads(self._record_path(target).read_text())
        except (OSError, ValueError):
            rec = None
        if rec is None or integrity.check(target, rec) is not None:
            rec = self._record(target)
        return rec.get("size") == size and rec.get("sha256") == sha256

    def fetch_source(self, suite: str, name: str, dest: Path, upstream_only: bool = False
                     ) -> Path:
        """Unpack the newest source of *name* in *suite* into
        ``dest/<name>-<version>/``: every file of the .dsc's Checksums-Sha256
        is downloaded and checked, the tarballs are extracted in Python and
        debian/patches/series is applied with ``patch -p1`` when ``patch``
        exists (else the tree stays unpatched; ``.nflab-source.json`` in the
        tree records version, files and patches). *upstream_only* fetches and
        extracts only the upstream tarball(s)."""
        src = self.sources(suite).newest(name)
        if src is None:
            raise ArchiveError(f"no source package {name} in {canonical_suite(suite)}")
        files = {fname: self.fetch_file(src.suite, f"{src.directory}/{fname}", sha, size)
                 for sha, size, fname in src.files
                 if not upstream_only or debsource.is_upstream(fname)}
        return debsource.unpack(src, files, Path(dest), upstream_only)
