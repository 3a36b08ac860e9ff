"""Which Debian mirror to use: the host's apt sources (one-line
``sources.list`` and deb822 ``.sources``) and debootstrap's default, read from
the files themselves so no mirror is named in the kit."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

APT_DIR = Path("/etc/apt")
_ONE_LINE = re.compile(r"^\s*deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)", re.M)
_DEF_MIRROR = re.compile(r'^DEF_MIRROR="([^"]+)"', re.M)
_SIGNED_BY = re.compile(r"(?:^|\s)signed-by=(\S+)", re.I)
_DEBIAN_FILES = ("sources.list", "debian.sources")


@dataclass(frozen=True)
class Source:
    """One enabled binary (``deb``) source: its URI, suites, file and Signed-By."""

    uri: str
    suites: tuple
    path: Path
    signed_by: str = ""

    def debian_rank(self) -> int:
        """0: Debian's by its URI (``.../debian``) or keyring; 1: by its file
        (sources.list, debian.sources); 2: anyone's (a third-party repository
        naming a Debian codename: ``deb https://packages.adoptium.net/... trixie``)."""
        if re.search(r"/debian(-security)?/?$", self.uri) or "debian-archive" in self.signed_by:
            return 0
        return 1 if self.path.name in _DEBIAN_FILES else 2


def source_files() -> list[Path]:
    """apt's own list: sources.list, then sources.list.d/*.list and *.sources."""
    parts = sorted(p for p in (APT_DIR / "sources.list.d").glob("*")
                   if p.suffix in (".list", ".sources"))
    return [APT_DIR / "sources.list", *parts]


def sources(files: Iterable[Path] | None = None) -> list[Source]:
    """Every enabled binary source, in file order."""
    out = []
    for path in source_files() if files is None else files:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        out += [Source(m.group(2), (m.group(3),), Path(path), _signed_by(m.group(1) or ""))
                for m in _ONE_LINE.finditer(text)]
        out += _deb822_sources(text, Path(path))
    return out


def _signed_by(options: str) -> str:
    m = _SIGNED_BY.search(options)
    return m.group(1) if m else ""


def entries(files: Iterable[Path] | None = None) -> list[tuple[str, list[str]]]:
    """``(uri, suites)`` of every enabled binary (``deb``) source, in file order."""
    return [(s.uri, list(s.suites)) for s in sources(files)]


def _deb822_sources(text: str, path: Path) -> list[Source]:
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.M))
        if "deb" not in fields.get("Types", "").split() or fields.get("Enabled") == "no":
            continue
        out += [Source(uri, tuple(fields.get("Suites", "").split()), path,
                       fields.get("Signed-By", "").strip())
                for uri in fields.get("URIs", "").split()]
    return out


def find_source(wanted: Callable[[str], bool], files: Iterable[Path] | None = None
                ) -> Source | None:
    """The source serving a suite for which *wanted* is true, Debian's own first
    (see ``Source.debian_rank``), then in apt's file order."""
    found = [s for s in sources(files) if any(wanted(x) for x in s.suites)]
    return min(found, key=Source.debian_rank) if found else None


def find(wanted: Callable[[str], bool], files: Iterable[Path] | None = None) -> str | None:
    """The URI of the source ``find_source`` picks."""
    found = find_source(wanted, files)
    return found.uri.rstrip("/") if found else None


def origin(uri: str, files: Iterable[Path] | None = None) -> Path | None:
    """The apt source file naming mirror *uri* (for errors about that mirror)."""
    for s in sources(files):
        if s.uri.rstrip("/") == uri.rstrip("/"):
            return s.path
    return None


def debootstrap_mirror() -> str | None:
    """``DEF_MIRROR`` of the debootstrap script on PATH (or in /usr/sbin)."""
    path = shutil.which("debootstrap") or shutil.which("debootstrap", path="/usr/sbin:/sbin")
    if not path:
        return None
    try:
        m = _DEF_MIRROR.search(Path(path).read_text(errors="replace"))
    except OSError:
        return None
    return m.group(1).rstrip("/") if m else None


def env_mirror(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value.rstrip("/") or None
