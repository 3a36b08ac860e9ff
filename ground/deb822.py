"""Debian control files (deb822): stanzas of ``Field: value`` lines, a value
continued on lines that start with a space, stanzas separated by blank lines.
Packages, Sources, Release, .dsc and a .deb's control file all use it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

_REL = re.compile(r"^\s*([^\s(\[<:]+)(?::\S+)?\s*(?:\(\s*([<>=]+)\s*([^)\s]+)\s*\))?")


@dataclass(frozen=True)
class Relation:
    """One name of a dependency field: ``name (op version)``; op and version
    are empty for an unversioned relation."""

    name: str
    op: str = ""
    version: str = ""


def parse(text: str) -> dict[str, str]:
    """The fields of one stanza; a continued value keeps its lines, joined with
    newlines (the first line stripped, continuation lines as written)."""
    fields: dict[str, str] = {}
    key = None
    for line in text.split("\n"):
        if line[:1] in (" ", "\t"):
            if key is not None:
                fields[key] += "\n" + line
            continue
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"not a deb822 field line: {line[:60]!r}")
        key = name.strip()
        fields[key] = value.strip()
    return fields


def spans(text: str | bytes) -> Iterator[tuple[int, int]]:
    """``(start, end)`` offsets of every non-empty stanza of *text* (str or bytes)."""
    sep = b"\n\n" if isinstance(text, bytes) else "\n\n"
    pos, n = 0, len(text)
    while pos < n:
        while text[pos:pos + 1] == sep[:1]:
            pos += 1
        end = text.find(sep, pos)
        if end < 0:
            end = n
        if end > pos and text[pos:end].strip():
            yield pos, end
        pos = end + 2


def stanzas(text: str) -> Iterator[dict[str, str]]:
    for start, end in spans(text):
        yield parse(text[start:end])


def pick(text: str, keys: frozenset[str]) -> dict[str, str]:
    """Only the single-line fields in *keys* of one stanza (fast: no
    continuation handling), for scanning large indexes."""
    out = {}
    for line in text.split("\n"):
        name, _, value = line.partition(":")
        if name in keys:
            out[name] = value.strip()
    return out


def relations(value: str) -> list[list[Relation]]:
    """A dependency field (``Depends``, ``Pre-Depends``, ``Provides``...) as a
    list of alternatives groups: ``a | b (>= 1), c`` -> ``[[a, b>=1], [c]]``.
    Architecture qualifiers (``:any``) and restrictions are dropped."""
    groups = []
    for group in value.split(","):
        alts = []
        for alt in group.split("|"):
            m = _REL.match(alt)
            if m:
                alts.append(Relation(m.group(1), m.group(2) or "", m.group(3) or ""))
        if alts:
            groups.append(alts)
    return groups


def checksums(value: str) -> list[tuple[str, int, str]]:
    """A multi-line ``Checksums-Sha256``/``SHA256`` value as ``(hash, size, name)``."""
    out = []
    for line in value.split("\n"):
        parts = line.split()
        if len(parts) == 3:
            out.append((parts[0], int(parts[1]), parts[2]))
    return out
