"""Which kernels Debian serves, and what a kernel spec means.

Every suite that carries kernels is read through the kit's own archive client
(``ground.debarchive``: signed InRelease, sha256-checked indexes), never the
host's apt. A kernel is an *offer*: an ABI and flavour in one suite, with the
packages that make it (image, or from 6.19 on the image meta package's
``linux-binary-``/``linux-modules-``/``linux-base-``; headers, common headers,
kbuild) and the compiler its headers ask for.

Specs: a line Debian serves with headers (``5.10``, ``6.1``, ``6.12``, ``7.3``: the
newest ABI of that line, preferring the newest Debian release that carries it), ``rc`` (the
release candidate in experimental), an exact ABI (``6.12.118+deb13``,
``7.3.4+deb13``), each optionally with a flavour (``-amd64``, ``-rt-amd64``,
default ``-cloud-amd64``); ``exact:<abi>[-flavour]`` names an ABI shaped like
a line (the rc's is ``7.3``: ``exact:7.3-cloud-amd64``, what ``kernels.exact_spec``
makes for it, while ``7.3-cloud-amd64`` stays the 7.3 line). Groups for lists: ``lts`` (5.10, 6.1, 6.12, 6.18), ``stable`` (the newest
released line), ``supported`` (lts + stable + rc).
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ground import debarchive, debversion
from ground.errors import ArchiveError, KernelError
from ground.http import NotServed
from ground.paths import kernels_dir

from .entry import abi_sort_key

# suite -> the Debian release it belongs to (its build root), oldest first
KERNEL_SUITES = {
    "bullseye": "bullseye", "bullseye-security": "bullseye",
    "bookworm": "bookworm", "bookworm-updates": "bookworm", "bookworm-security": "bookworm",
    "trixie": "trixie", "trixie-security": "trixie", "trixie-backports": "trixie",
    "sid": "sid", "experimental": "sid",
}
RELEASE_ORDER = ("bullseye", "bookworm", "trixie", "sid")
FLAVOURS = ("cloud-amd64", "amd64", "rt-amd64")
DEFAULT_FLAVOUR = "cloud-amd64"
DEFAULT_KERNEL = "6.12"
LTS = ("5.10", "6.1", "6.12", "6.18")
GROUPS = ("lts", "stable", "supported", "rc")
_FLAVOUR_ALT = "cloud-amd64|rt-amd64|amd64|cloud|rt"
_IMAGE_RE = re.compile(rf"^linux-image-(?P<abi>\d+\.\d+[^\s]*?)-(?P<flavour>{_FLAVOUR_ALT})$")
_ABI = r"\d+\.\d+(?:\.\d+)?(?:-\d+(?:\.deb\d+\.\d+)?)?(?:\+deb\d+(?:\.\d+)?)?"
_SPEC_RE = re.compile(rf"^(?P<what>rc|stable|{_ABI})(?:[-@/:](?P<flavour>{_FLAVOUR_ALT}))?$")
_LINE_RE = re.compile(r"^\d+\.\d+$")
_GCC_RE = re.compile(r"\bgcc-(\d+)\b")
# names an ABI even where a line of that name exists: exact:7.3-cloud-amd64 is the rc
EXACT = "exact:"
# the common headers: linux-headers-<abi>-common, or -common-<featureset> (rt)
_COMMON_RE = re.compile(r"^linux-headers-\S+-common(?:-[a-z0-9]+)?$")
SPEC_HINT = ("use a line ({lines}: its newest ABI), rc (the release candidate), "
             "an exact ABI such as 6.1.0-57, 6.12.118+deb13 or 7.3.4+deb13, optionally with "
             "-cloud-amd64, -amd64 or -rt-amd64; exact:<abi>[-flavour] for an ABI shaped like "
             "a line (the rc's: exact:7.3-cloud-amd64); `invoke kernels` lists them; or a kernel built "
             "from source: source:6.12[+debug|+FILE]")
# the released lines the hint names before any offers are cached (each with headers)
KNOWN_LINES = ("5.10", "6.1", "6.12", "7.3")
OFFERS_CACHE = ".offers.json"
OFFERS_VERSION = 4


@dataclass(frozen=True)
class Offer:
    """One kernel Debian serves: ABI + flavour in one suite, and its packages."""

    abi: str
    flavour: str
    suite: str
    version: str            # the Debian version of its image package
    packages: tuple         # ((name, version), ...) to download and unpack
    compiler: str           # gcc-NN, from the headers' dependencies

    @property
    def release(self) -> str:
        return f"{self.abi}-{self.flavour}"

    key = release

    @property
    def buildable(self) -> bool:
        """Headers are served too (an image without them cannot get modules)."""
        return bool(self.packages)

    @property
    def rc(self) -> bool:
        return "~rc" in self.version

    @property
    def line(self) -> str:
        return "rc" if self.rc else line_of(self.abi)

    @property
    def debian_release(self) -> str:
        return KERNEL_SUITES[self.suite]


def line_of(abi: str) -> str:
    m = re.match(r"^(\d+)\.(\d+)", abi)
    return f"{m.group(1)}.{m.group(2)}" if m else abi


def _flavour(name: str | None) -> str:
    return {"cloud": "cloud-amd64", "rt": "rt-amd64", None: DEFAULT_FLAVOUR}.get(name, name)


def parse_spec(spec: str | None) -> tuple[str, str]:
    """Split a user spec into (line, group word or ABI; flavour); raise with valid forms."""
    spec = (spec or DEFAULT_KERNEL).strip()
    m = _SPEC_RE.match(spec.removeprefix(EXACT))
    if not m or (spec.startswith(EXACT) and m.group("what") in ("rc", "stable")):
        raise KernelError(f"invalid kernel spec {spec!r}", hint=spec_hint())
    return m.group("what"), _flavour(m.group("flavour"))


def spec_hint() -> str:
    """The valid spec forms, naming the released lines that can get modules (with headers)."""
    return SPEC_HINT.format(lines=", ".join(cached_lines() or KNOWN_LINES))


def cached_lines() -> list[str]:
    """The released lines with headers in the cached offers, whatever their age; never
    asks the mirror ([] when nothing is cached or the mirror is not configured)."""
    try:
        archive = debarchive.Archive()
    except ArchiveError:
        return []
    data = _read_offers(kernels_dir() / OFFERS_CACHE, [archive.mirror, archive.security_mirror])
    return [l for l in lines(data["offers"]) if l != "rc"] if data else []


def is_line(what: str) -> bool:
    """Whether a parsed spec names a line or group word (rc, stable, 7.3), not an ABI."""
    return what in ("rc", "stable") or bool(_LINE_RE.match(what))


def names_abi(spec: str | None) -> bool:
    """Whether *spec* names one ABI: ``6.12.118+deb13[-flavour]``, or ``exact:<abi>
    [-flavour]``, which names even an ABI shaped like a line (the rc's ``7.3``)."""
    if spec and spec.strip().startswith(EXACT):
        return True
    return not is_line(parse_spec(spec)[0])


# ---------------------------------------------------------------- reading the archive

_vkey = functools.cmp_to_key(debversion.compare)


def _newest(pkgs):
    return max(pkgs, key=lambda p: _vkey(p.version))


def _deps(pkg) -> list[str]:
    """Names in a package's Depends (every alternative), without versions."""
    return [alt.split("(")[0].strip() for part in (pkg.depends or "").split(",")
            for alt in part.split("|") if alt.strip()]


def _pick(index, name: str, version: str | None):
    pkgs = index.get(name) or []
    same = [p for p in pkgs if version is None or p.version == version]
    return _newest(same) if same else None


def _offer(index, suite: str, image) -> Offer | None:
    """The offer of one image package, or None (meta package, no headers)."""
    m = _IMAGE_RE.match(image.name)
    abi, flavour = m.group("abi"), _flavour(m.group("flavour"))
    deps = _deps(image)
    if any(d.startswith("linux-image-") for d in deps):
        return None                              # a meta package over another image
    headers = _pick(index, f"linux-headers-{abi}-{flavour}", image.version)
    if headers is None:                          # an image whose headers are gone
        return Offer(abi, flavour, suite, image.version, (), "")
    split = [d for d in deps if re.match(rf"^linux-(binary|modules|base)-{re.escape(abi)}-", d)]
    extra = [d for d in _deps(headers)
             if _COMMON_RE.match(d) or d.startswith("linux-kbuild-") or
             re.match(rf"^linux-base-{re.escape(abi)}-", d)]
    names = [image.name, headers.name, *dict.fromkeys(split + extra)]
    pkgs = []
    for name in names:
        pkg = _pick(index, name, image.version) or _pick(index, name, None)
        if pkg is None:
            return None
        pkgs.append((pkg.name, pkg.version))
    gcc = _GCC_RE.search(headers.depends or "")
    return Offer(abi, flavour, suite, image.version, tuple(pkgs),
                 f"gcc-{gcc.group(1)}" if gcc else "gcc")


def _suite_offers(archive, suite: str) -> list[Offer]:
    index = archive.packages(suite)
    offers = []
    for name in index.search(r"^linux-image-"):
        if not _IMAGE_RE.match(name):
            continue
        offer = _offer(index, suite, _newest(index.get(name)))
        if offer and offer.flavour in FLAVOURS:
            offers.append(offer)
    return offers


def _served(archive, refresh: bool = False) -> dict[str, str]:
    """{kernel suite: the hash of its signed package index} for the suites the mirror
    serves. A suite it no longer has (HTTP 404: bullseye moving to archive.debian.org)
    is left out with a warning, so the other lines still resolve."""
    out = {}
    for s in KERNEL_SUITES:
        try:
            out[s] = archive.release(s, refresh).entry("main/binary-amd64/Packages.xz", s)[0]
        except NotServed as exc:
            left_out(s, exc)
    return out


def left_out(suite: str, exc: NotServed):
    """Warn that a suite the mirror does not serve is left out (the rest still resolve)."""
    print(f"nflab: warning: {exc.message}: the kernels of {suite} are left out "
          "(set NFLAB_DEBIAN_MIRROR to a mirror that has it)", file=sys.stderr)


def _stamp(served: dict[str, str]) -> str:
    """Changes whenever any kernel suite's signed index changes (or one goes away)."""
    return ",".join(f"{s}:{h}" for s, h in served.items())


def _read_offers(cache: Path, mirrors: list[str]) -> dict | None:
    """The cached offers, if they were read from *mirrors* (main, security)."""
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    if data.get("version") != OFFERS_VERSION or data.get("mirrors") != mirrors:
        return None
    try:
        data["offers"] = [Offer(**{**o, "packages": tuple(map(tuple, o["packages"]))})
                          for o in data["offers"]]
    except (KeyError, TypeError):
        return None
    return data


def offers(*, refresh: bool = False) -> list[Offer]:
    """Every kernel Debian serves, newest first. Reused without asking the mirror
    for as long as the archive client trusts a fresh index ($NFLAB_ARCHIVE_TTL),
    then recomputed only if a suite's signed index changed. The cache belongs to
    the mirrors it was read from, and none is kept of a mirror that offered nothing
    (a wrong NFLAB_DEBIAN_MIRROR, once corrected, is not remembered)."""
    archive = debarchive.Archive()
    mirrors = [archive.mirror, archive.security_mirror]
    cache = kernels_dir() / OFFERS_CACHE
    data = _read_offers(cache, mirrors)
    if data and not refresh and time.time() - data.get("made", 0) < debarchive.ttl():
        return data["offers"]
    served = _served(archive, refresh)
    stamp = _stamp(served)
    if data and data.get("stamp") == stamp:
        found = data["offers"]
    else:
        found = sorted((o for s in served for o in _suite_offers(archive, s)),
                       key=sort_key, reverse=True)
    if found:
        _write_offers(cache, mirrors, stamp, found)
    return found


def _write_offers(cache: Path, mirrors: list[str], stamp: str, found: list[Offer]):
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"version": OFFERS_VERSION, "mirrors": mirrors, "stamp": stamp,
                               "made": time.time(), "offers": [asdict(o) for o in found]}))
    os.replace(tmp, cache)


def sort_key(o: Offer):
    """Newest Debian release first within a line (6.12+deb13 before +deb12), then version."""
    return (_vkey(o.version), RELEASE_ORDER.index(o.debian_release))


# ---------------------------------------------------------------- specs

def lines(all_offers: list[Offer]) -> list[str]:
    """The lines Debian serves with headers, oldest first, then rc."""
    all_offers = [o for o in all_offers if o.buildable]
    released = sorted({o.line for o in all_offers if not o.rc},
                      key=lambda l: tuple(map(int, l.split("."))))
    return released + (["rc"] if any(o.rc for o in all_offers) else [])


def stable_line(all_offers: list[Offer]) -> str:
    released = [l for l in lines(all_offers) if l != "rc"]
    if not released:
        raise KernelError("Debian's archive offers no released kernel line",
                          hint="invoke doctor checks that the archive is reachable; "
                               "invoke kernels lists what it offers")
    return released[-1]


def group(name: str, all_offers: list[Offer]) -> list[str]:
    """The lines of a group word: lts, stable, rc, supported."""
    have = lines(all_offers)
    lts = [l for l in LTS if l in have]
    rc = ["rc"] if "rc" in have else []
    return {"lts": lts, "stable": [stable_line(all_offers)], "rc": rc,
            "supported": list(dict.fromkeys(lts + [stable_line(all_offers)] + rc))}[name]


def choose(what: str, flavour: str, all_offers: list[Offer], *, exact: bool = False) -> Offer:
    """The offer a parsed spec names, or KernelError listing what exists. *exact*:
    *what* is an ABI even if shaped like a line (``exact:7.3``, see ``names_abi``)."""
    if what == "stable":
        what = stable_line(all_offers)
    same = [o for o in all_offers if o.flavour == flavour and o.buildable]
    if not exact and is_line(what):
        of_line = [o for o in same if o.line == what]
        if of_line:
            return max(of_line, key=line_preference)
        _refuse_headerless(what, flavour, all_offers)
        raise KernelError(f"Debian's archive has no kernel line {what}"
                          f"{'' if flavour == DEFAULT_FLAVOUR else ' in flavour ' + flavour}; "
                          f"lines: {', '.join(lines(same or all_offers))}")
    named = [o for o in same if o.abi == what]
    if named:
        return max(named, key=sort_key)
    _refuse_headerless(what, flavour, all_offers)
    near = sorted({o.abi for o in same if o.line == line_of(what)} or {o.abi for o in same},
                  key=lambda abi: (abi_sort_key(abi), abi), reverse=True)[:5]
    raise KernelError(f"kernel {what}-{flavour} is not in Debian's archive with headers",
                      hint=f"nearest valid: {', '.join(near) or 'none'}")


def _refuse_headerless(what: str, flavour: str, all_offers: list[Offer]):
    """A line or ABI Debian serves only as an image: say so, and what does exist."""
    bare = sorted({(o.abi, o.suite) for o in all_offers if o.flavour == flavour and
                   not o.buildable and (o.line == what or o.abi == what)},
                  key=lambda b: abi_sort_key(b[0]), reverse=True)
    bare = [f"{abi} in {suite}" for abi, suite in bare]
    if bare:
        raise KernelError(f"Debian's archive serves {what} only as kernel images "
                          f"({', '.join(bare[:3])}), without headers: out-of-tree modules "
                          f"cannot be built for it; lines with headers: "
                          f"{', '.join(lines(all_offers))}")


def line_preference(o: Offer):
    """For a line: the newest Debian release that carries it, then the newest version
    (6.1 is bookworm's, not bullseye's backport; 6.12 is +deb13's 6.12.118)."""
    return (RELEASE_ORDER.index(o.debian_release), _vkey(o.version))
