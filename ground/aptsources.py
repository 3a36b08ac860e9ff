"""Which Debian mirror to use: the host's apt sources (one-line
``sources.list`` and deb822 ``.sources``) and debootstrap's default, read from
the files themselves so no mirror is named in the kit."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable

APT_DIR = Path("/etc/apt")
_ONE_LINE = re.compile(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", re.M)
_DEF_MIRROR = re.compile(r'^DEF_MIRROR="([^"]+)"', re.M)


def source_files() -> list[Path]:
    """apt's own list: sources.list, then sources.list.d/*.list and *.sources."""
    parts = sorted(p for p in (APT_DIR / "sources.list.d").glob("*")
                   if p.suffix in (".list", ".sources"))
    return [APT_DIR / "sources.list", *parts]


def entries(sources: Iterable[Path] | None = None) -> list[tuple[str, list[str]]]:
    """``(uri, suites)`` of every enabled binary (``deb``) source, in file order."""
    out = []
    for path in source_files() if sources is None else sources:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        out += [(m.group(1), [m.group(2)]) for m in _ONE_LINE.finditer(text)]
        out += _deb822_entries(text)
    return out


def _deb822_entries(text: str) -> list[tuple[str, list[str]]]:
    out = []
    for stanza in re.split(r"\n\s*\n", text):
        fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.M))
        if "deb" not in fields.get("Types", "").split() or fields.get("Enabled") == "no":
            continue
        out += [(uri, fields.get("Suites", "").split()) for uri in fields.get("URIs", "").split()]
    return out


def find(wanted: Callable[[str], bool], sources: Iterable[Path] | None = None) -> str | None:
    """The URI of the first source serving a suite for which *wanted* is true."""
    for uri, suites in entries(sources):
        if any(wanted(s) for s in suites):
            return uri.rstrip("/")
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
