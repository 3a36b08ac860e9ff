"""Debian version comparison, as dpkg does it: ``[epoch:]upstream[-revision]``,
each part compared as alternating non-digit and digit runs, where ``~`` sorts
before everything (even the end of the string) and letters before other
characters."""

from __future__ import annotations

import functools
import re

_RUN = re.compile(r"(\D*)(\d*)")


def _split(version: str) -> tuple[int, str, str]:
    epoch, colon, rest = version.partition(":")
    if not colon:
        epoch, rest = "0", version
    upstream, dash, revision = rest.rpartition("-")
    if not dash:
        upstream, revision = rest, ""
    return int(epoch or 0), upstream, revision


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _cmp_text(a: str, b: str) -> int:
    for i in range(max(len(a), len(b))):
        x = _order(a[i]) if i < len(a) else 0
        y = _order(b[i]) if i < len(b) else 0
        if x != y:
            return -1 if x < y else 1
    return 0


def _cmp_part(a: str, b: str) -> int:
    ra, rb = _RUN.findall(a), _RUN.findall(b)
    for i in range(max(len(ra), len(rb))):
        ta, da = ra[i] if i < len(ra) else ("", "")
        tb, db = rb[i] if i < len(rb) else ("", "")
        c = _cmp_text(ta, tb) or (int(da or 0) > int(db or 0)) - (int(da or 0) < int(db or 0))
        if c:
            return c
    return 0


def compare(a: str, b: str) -> int:
    """-1, 0 or 1 as Debian version *a* sorts before, equal to or after *b*."""
    ea, ua, va = _split(a)
    eb, ub, vb = _split(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _cmp_part(ua, ub) or _cmp_part(va, vb)


key = functools.cmp_to_key(compare)


def satisfies(version: str, op: str, wanted: str) -> bool:
    """Whether *version* meets the relation ``(op wanted)`` of a dependency."""
    c = compare(version, wanted)
    return {"<<": c < 0, "<=": c <= 0, "<": c <= 0, "=": c == 0,
            ">=": c >= 0, ">>": c > 0, ">": c >= 0, "": True}.get(op, False)
