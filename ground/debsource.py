"""Unpacking a Debian source package without dpkg-source: the upstream
tarball(s) and the Debian tarball are extracted in pure Python (the same safe
extraction as .debs), then ``debian/patches/series`` is applied with
``patch`` when the host has it (without ``patch`` the tree stays unpatched
and ``.nflab-source.json`` says so). Formats 3.0 (quilt), 3.0 (native) and
1.0 (a tarball and an optional .diff.gz) are understood."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ground.deb import extract_tarball
from ground.errors import ArchiveError

RECORD = ".nflab-source.json"
_ORIG = re.compile(r"\.orig(?:-([A-Za-z0-9][A-Za-z0-9-]*))?\.tar\.[a-z0-9]+$")
_TAR = re.compile(r"\.tar(?:\.[a-z0-9]+)?$")


def tree_name(name: str, version: str) -> str:
    """``<name>-<version>`` without the epoch."""
    return f"{name}-{version.split(':', 1)[-1]}"


def is_upstream(fname: str) -> bool:
    """Whether *fname* of a source package is an upstream (or native) tarball."""
    return bool(_TAR.search(fname)) and ".debian.tar." not in fname


def unpack(src, files: dict[str, Path], dest: Path, upstream_only: bool = False) -> Path:
    """Extract *src* (a SourcePackage) from its downloaded *files* into
    ``dest/<name>-<version>``, replacing an older tree; an existing tree of
    the same version is reused (a full one also when *upstream_only*)."""
    out = dest / tree_name(src.name, src.version)
    record = _read_record(out)
    if (record.get("version"), record.get("name")) == (src.version, src.name) \
            and (upstream_only or not record.get("upstream_only")):
        return out
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=f".{out.name}.") as tmp:
        tree = Path(tmp) / out.name
        tree.mkdir()
        _extract(files, tree, src.name)
        patches = [] if upstream_only else _patch(tree, files)
        sha = {fname: h for h, _, fname in src.files}
        info = {"name": src.name, "version": src.version, "suite": src.suite,
                "upstream_only": upstream_only, "files": {n: sha[n] for n in sorted(files)},
                "patched": patches is not None and not upstream_only, "patches": patches or []}
        (tree / RECORD).write_text(json.dumps(info, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tree.rename(out)
    return out


def _read_record(tree: Path) -> dict:
    try:
        return json.loads((tree / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def _extract(files: dict[str, Path], tree: Path, name: str):
    """Upstream first (component tarballs into their subdirectory), then the
    Debian tarball on top."""
    tars = [f for f in sorted(files) if _TAR.search(f)]
    if not tars:
        raise ArchiveError(f"source {name} has no tarball (files: {', '.join(sorted(files))})")
    debian = [f for f in tars if ".debian.tar." in f]
    for fname in [f for f in tars if f not in debian]:
        m = _ORIG.search(fname)
        where = tree / m.group(1) if m and m.group(1) else tree
        extract_tarball(files[fname], where, strip=1)
    for fname in debian:
        extract_tarball(files[fname], tree, strip=0)


def _patch(tree: Path, files: dict[str, Path]) -> list[str] | None:
    """Apply debian/patches/series (or a 1.0 .diff.gz); the applied patch
    names, or None when ``patch`` is not installed."""
    series = tree / "debian" / "patches" / "series"
    diffs = [files[f] for f in files if f.endswith(".diff.gz")]
    if not series.is_file() and not diffs:
        return []
    if not shutil.which("patch"):
        return None
    applied = []
    for diff in diffs:
        _apply(tree, gzip.decompress(diff.read_bytes()), diff.name, "-p1")
        applied.append(diff.name)
    for line in series.read_text().splitlines() if series.is_file() else ():
        parts = line.split("#", 1)[0].split()
        if parts:
            patch = series.parent / parts[0]
            _apply(tree, patch.read_bytes(), parts[0], parts[1] if len(parts) > 1 else "-p1")
            applied.append(parts[0])
    return applied


def _apply(tree: Path, diff: bytes, name: str, strip: str):
    res = subprocess.run(["patch", strip, "--batch", "--forward", "--quiet", "--no-backup-if-mismatch"],
                         cwd=tree, input=diff, capture_output=True, check=False)
    if res.returncode != 0:
        tail = (res.stdout or res.stderr).decode(errors="replace").strip().splitlines()[-1:]
        raise ArchiveError(f"patch {name} does not apply to {tree.name}: {' '.join(tail)}")
