"""Kernel supply: resolve a kernel spec, fetch Debian's packages, cache them.

The façade every other layer uses (``get``, ``fetch``, ``resolve``,
``cached_kernels``, ``table_rows``): Debian kernels come through the kit's own
archive client (``supply.debian_kernels``), ``source:`` specs are built from
linux-source (``supply.source_kernels``); both end in the same cache entry shape
(``supply.entry``). A Debian entry is built in a temporary directory and renamed
into place, so an interrupted fetch never leaves something that looks complete;
a file lock serialises two fetches of the same kernel; every use verifies the
entry against what was recorded at fetch time, and a damaged one is fetched again,
as is one whose ABI the archive now serves with other packages (the rc's ``7.3``
from ``~rc7`` to ``~rc8``; offline, or when the download is unreachable, the
cached upload is used).

Both package layouts unpack into one shape: before 6.19 ``linux-image-<abi>``
holds ``/boot/vmlinuz-*`` and the modules; from 6.19 it is a meta package over
``linux-binary-``, ``linux-modules-`` and ``linux-base-<abi>``, and from 7.2 the
image is ``/usr/lib/modules/<release>/vmlinuz``. Either way the entry has
``root/boot/{vmlinuz,config,System.map}-<release>`` and
``root/lib/modules/<release>`` (``lib`` is the merged-/usr link to ``usr/lib``).
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ground import deb, debarchive
from ground.errors import ArchiveError, KernelError
from ground.http import Unreachable
from ground.paths import kernels_dir
from ground.proc import file_lock, run

from . import debian_kernels as dk
from . import source_kernels
from .debian_kernels import DEFAULT_FLAVOUR, DEFAULT_KERNEL, FLAVOURS, Offer, parse_spec
from .entry import (INTEGRITY, LISTING, MANIFEST, MANIFEST_VERSION, Kernel, abi_sort_key,
                    cached_kernels, check_entry, record_integrity, release_of_abi)

__all__ = ["DEFAULT_FLAVOUR", "DEFAULT_KERNEL", "FLAVOURS", "INTEGRITY", "LISTING", "MANIFEST",
           "MANIFEST_VERSION", "Kernel", "KernelRef", "Offer", "abi_sort_key", "cached_kernels",
           "check_entry", "exact_spec", "fetch", "get", "is_source_spec", "parse_spec", "record_integrity",
           "by_release", "release_spec", "resolve", "table_rows"]
MERGED_USR = ("bin", "sbin", "lib", "lib64")
is_source_spec = source_kernels.is_source_spec


@dataclass(frozen=True)
class KernelRef:
    """A concrete kernel known only by ABI and flavour (a cached or source-built one)."""

    abi: str
    flavour: str = DEFAULT_FLAVOUR

    @property
    def line(self) -> str:
        return dk.line_of(self.abi)

    @property
    def release(self) -> str:
        return f"{self.abi}-{self.flavour}"

    key = release


def _cached_of_line(what: str, flavour: str) -> KernelRef | None:
    """Offline: the cached kernel the online resolution would pick for line or group
    word *what* if the archive offered only what is cached (``dk.choose`` over the
    cached entries; ``stable`` is the stable line of the last offers read, if any)."""
    cached = [o for o in map(_as_offer, cached_kernels()) if o is not None]
    if what == "stable":
        known = dk.cached_lines()
        what = known[-1] if known else what
    try:
        offer = dk.choose(what, flavour, cached)
    except KernelError:
        return None
    return KernelRef(offer.abi, offer.flavour)


def _as_offer(k: Kernel) -> Offer | None:
    """A cached Debian kernel as the offer it was fetched from (None: not Debian's);
    an entry older than the suite field is taken as its Debian release's main suite."""
    suite = k.suite or release_of_abi(k.abi)
    if k.flavour not in FLAVOURS or suite not in dk.KERNEL_SUITES:
        return None
    return Offer(k.abi, k.flavour, suite, _version(k, ""), tuple(k.packages.items()),
                 k.extra.get("compiler", ""))


def _line(k: Kernel) -> str:
    """A cached kernel's line; the release candidate's is rc, not its bare ABI (7.3)."""
    return "rc" if k.extra.get("rc") else dk.line_of(k.abi)


def resolve(spec: str | None):
    """The concrete kernel a spec names: an exact cached ABI without asking the
    archive, else the archive's offer; offline, a line (or stable, rc) falls back to
    the cached ABI the archive's preference picks among the cached (with a warning)."""
    if source_kernels.is_source_spec(spec):
        p = source_kernels.plan(spec)
        return KernelRef(p.upstream, f"{source_kernels.FLAVOUR_PREFIX}{p.key}")
    what, flavour = parse_spec(spec)
    exact = dk.names_abi(spec)
    if exact and (kernels_dir() / f"{what}-{flavour}" / MANIFEST).is_file():
        return KernelRef(what, flavour)
    try:
        return dk.choose(what, flavour, dk.offers(), exact=exact)
    except ArchiveError as exc:
        cached = None if exact else _cached_of_line(what, flavour)
        if cached is None:
            raise
        print(f"nflab: {exc}; using the cached {cached.release}", file=sys.stderr)
        return cached


def _offer_for(ref) -> Offer:
    if isinstance(ref, Offer):
        return ref
    return dk.choose(ref.abi, ref.flavour, dk.offers(), exact=True)


def fetch(spec: str | None = None, *, progress=None, force=False, listing=True) -> Kernel:
    """Make sure the kernel for *spec* is in the cache and return it (*listing*: see
    ``check_entry``; a damaged entry is always checked whole before it is replaced)."""
    if source_kernels.is_source_spec(spec):
        return source_kernels.fetch(spec, progress=progress, force=force, listing=listing)
    try:
        return _fetch_debian(spec, progress, force, listing)
    except _Gone as exc:   # the offers predate the suite's index: read them again, once
        _say(progress, f"{exc.message}; reading the archive's kernel lists again")
        dk.offers(refresh=True)
        return _fetch_debian(spec, progress, force, listing)


class _Gone(KernelError):
    """A package of an offer is no longer in its suite's index."""


def _fetch_debian(spec, progress, force, listing) -> Kernel:
    ref = resolve(spec)
    base = kernels_dir()
    entry = base / ref.key
    if not force and check_entry(entry, listing=listing) is None:
        cached = Kernel.load(entry)
        if not _superseded(cached, ref):
            return cached
    base.mkdir(parents=True, exist_ok=True)
    with file_lock(base / f".{ref.key}.lock"):
        problem = check_entry(entry)
        newer = None if problem else _superseded(Kernel.load(entry), ref)
        if not force and problem is None and not newer:
            return Kernel.load(entry)
        _remove_debris(base, ref.key, progress)
        offer = _offer_for(ref)      # before anything is removed: the ABI may be gone
        if entry.exists():
            _say(progress, _refetch_reason(entry, problem, newer))
        try:
            _make_entry(offer, base, entry, progress)
        except Unreachable as exc:
            if not newer or force:
                raise
            _say(progress, f"{exc.message}; using the cached {ref.release} "
                           f"({_version(Kernel.load(entry))}) meanwhile")
    return Kernel.load(entry)


def _superseded(cached: Kernel, ref) -> str | None:
    """Why the intact entry *cached* is not what the offer *ref* names (None when it is, or
    when *ref* is no offer: an exact cached ABI, or offline): the archive serves other
    packages under the same ABI (the rc's 7.3 from ~rc7 to ~rc8, a re-upload)."""
    if not isinstance(ref, Offer) or _same_upload(cached, ref):
        return None
    return f"it holds {_version(cached)}, the archive now serves {ref.version}"


def _same_upload(k: Kernel, offer: Offer) -> bool:
    """Is cached *k* the very packages *offer* names (not an older upload of its ABI)?"""
    return k.packages == dict(offer.packages)


def _version(k: Kernel, unknown: str = "an older upload") -> str:
    """The Debian version cached *k* was fetched as (its image package's)."""
    return k.extra.get("version") or k.packages.get(f"linux-image-{k.release}", unknown)


def _refetch_reason(entry: Path, problem: str | None, newer: str | None) -> str:
    if problem:
        return f"kernel cache entry {entry} is damaged: {problem}; fetching it again"
    if newer:
        return f"kernel cache entry {entry} is out of date: {newer}; fetching it"
    return f"fetching kernel cache entry {entry} again (--force)"


def _make_entry(offer: Offer, base: Path, entry: Path, progress):
    """Build the entry in a temporary directory; only a complete one replaces
    what was there (a failed download keeps the old entry)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{offer.key}-", dir=base))
    try:
        root = tmp / "root"
        _unpack(offer, root, progress)
        kernel = _record(offer, tmp, entry, progress)
        record_integrity(tmp, kernel)
        (tmp / MANIFEST).write_text(kernel.manifest())
        if entry.exists():
            entry.rename(tmp.with_name(tmp.name + "-old"))   # debris if killed right here
        tmp.rename(entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp.with_name(tmp.name + "-old"), ignore_errors=True)


def _unpack(offer: Offer, root: Path, progress):
    """Download (sha256-checked, cached) and unpack every package of the offer."""
    (root / "usr").mkdir(parents=True)
    for name in MERGED_USR:
        (root / "usr" / name).mkdir()
        (root / name).symlink_to(f"usr/{name}")
    archive = debarchive.Archive()
    index = archive.packages(offer.suite)
    for name, version in offer.packages:
        pkg = next((p for p in index.get(name) or [] if p.version == version), None)
        if pkg is None:
            raise _Gone(f"{name} {version} is no longer in {offer.suite}",
                        hint="the archive moved on: run `invoke kernels --refresh` and fetch again")
        _say(progress, f"unpacking {name} {version}", quiet_ok=True)
        deb.extract(archive.download(pkg), root)


_BOOT_FILES = {"vmlinuz": ("boot/vmlinuz-{r}", "usr/lib/modules/{r}/vmlinuz", "boot/vmlinux-{r}"),
               "config": ("boot/config-{r}", "usr/lib/modules/{r}/config"),
               "System.map": ("boot/System.map-{r}", "usr/lib/modules/{r}/System.map")}


def _normalise_boot(root: Path, release: str):
    """Put vmlinuz, config and System.map under boot/, whichever layout shipped them."""
    (root / "boot").mkdir(exist_ok=True)
    for what, candidates in _BOOT_FILES.items():
        found = [root / c.format(r=release) for c in candidates if (root / c.format(r=release)).exists()]
        if not found:
            raise KernelError(f"the packages of {release} hold no {what} (looked at "
                              f"{', '.join(c.format(r=release) for c in candidates)})",
                              hint=f"the unpacked packages look incomplete: invoke fetch-kernel "
                                   f"--kernel={release_spec(release)} --force")
        want = root / "boot" / f"{what}-{release}"
        if found[0] != want:
            shutil.move(found[0], want)


def _record(offer: Offer, tmp: Path, entry: Path, progress=None) -> Kernel:
    """Fix up the unpacked tree; the Kernel with paths as they will be after rename."""
    root = tmp / "root"
    release = offer.release
    _normalise_boot(root, release)
    if not (root / "lib/modules" / release).is_dir():
        raise KernelError(f"the packages of {release} hold no lib/modules/{release}",
                          hint=f"the unpacked packages look incomplete: invoke fetch-kernel "
                               f"--kernel={exact_spec(offer)} --force")
    _fix_headers_makefile(root, entry / "root", release)
    _say(progress, f"depmod {release}", quiet_ok=True)
    run(["depmod", "-b", root, release], timeout=300)
    final = entry / "root"
    return Kernel(
        abi=offer.abi, flavour=offer.flavour, release=release, root=str(final),
        vmlinuz=str(final / "boot" / f"vmlinuz-{release}"),
        headers=str(final / "usr/src" / f"linux-headers-{release}"),
        config=str(final / "boot" / f"config-{release}"),
        modules=str(final / "lib/modules" / release),
        system_map=str(final / "boot" / f"System.map-{release}"),
        packages=dict(offer.packages), suite=offer.suite, toolchain=offer.debian_release,
        extra={"rc": offer.rc, "version": offer.version})


def _fix_headers_makefile(root: Path, final_root: Path, release: str) -> Path:
    """Point the headers' absolute include of the common Makefile at the cache."""
    hdr = root / "usr/src" / f"linux-headers-{release}"
    makefile = hdr / "Makefile"
    text = makefile.read_text()
    # the include of the common Makefile, and from 7.x also KBUILD_OUTPUT
    fixed = re.sub(r"(?<![\w/])/usr/src/(linux-headers-[^/\s]+)",
                   lambda m: str(final_root / "usr/src" / m.group(1)), text)
    if not re.search(rf"include {re.escape(str(final_root))}/usr/src/"
                     r"linux-headers-\S+-common(?:-[a-z0-9]+)?/", fixed):
        raise KernelError(f"unexpected headers Makefile layout in {makefile}: no absolute "
                          "include of /usr/src/linux-headers-<abi>-common[-<featureset>]/Makefile",
                          hint=f"Debian changed how its headers are packaged: report it with "
                               f"the Makefile's include lines; `invoke kernels` lists other "
                               f"flavours of {release} to use meanwhile")
    makefile.write_text(fixed)
    return hdr


def get(spec: str | None = None, *, fetch_missing=True, progress=None, listing=True) -> Kernel:
    """The cached kernel for *spec*, fetching it first when allowed; *listing* False
    skips the walk of the entry's files (see ``check_entry``)."""
    if source_kernels.is_source_spec(spec):
        return source_kernels.get(spec, fetch_missing=fetch_missing, progress=progress,
                                  listing=listing)
    if fetch_missing:
        return fetch(spec, progress=progress, listing=listing)
    ref = resolve(spec)
    entry = kernels_dir() / ref.key
    if not (entry / MANIFEST).is_file():
        raise KernelError(f"kernel {ref.release} is not in the cache",
                          hint=f"run `invoke fetch-kernel --kernel={exact_spec(ref)}`")
    problem = check_entry(entry, listing=listing)
    if problem:
        raise KernelError(f"kernel cache entry {entry} is damaged: {problem}",
                          hint=f"run `invoke fetch-kernel --kernel={exact_spec(ref)}` "
                               "to fetch it again")
    return Kernel.load(entry)


def table_rows(*, every: bool = False) -> list[dict]:
    """Rows for `invoke kernels`: per line its newest ABI (every ABI with *every*),
    with suite, compiler, flavours and what is cached (the very packages offered);
    cached-only kernels too (an older upload of an offered ABI among them)."""
    cached = {k.release: k for k in cached_kernels()}
    rows, current = {}, set()
    for o in dk.offers():
        row = rows.setdefault((o.abi, o.suite), {
            "line": o.line, "abi": o.abi, "suite": o.suite,
            "compiler": o.compiler or "(image only: no headers)",
            "version": o.version, "flavours": [], "cached": [], "archive": True})
        row["flavours"].append(o.flavour)
        if o.release in cached and _same_upload(cached[o.release], o):
            row["cached"].append(o.flavour)
            current.add(o.release)
    for k in cached.values():
        if k.release not in current:
            rows[(k.abi, k.suite or "cache", k.flavour)] = _cached_row(
                k, superseded=any(k.release == f"{r['abi']}-{f}" for r in rows.values()
                                  for f in r["flavours"]))
    ordered = sorted(rows.values(), key=lambda r: abi_sort_key(r["abi"]), reverse=True)
    return ordered if every else _newest_per_line(ordered)


def _cached_row(k: Kernel, *, superseded: bool) -> dict:
    """The row of a cached kernel the archive does not serve (as cached)."""
    suite = k.suite or "(cache only)"
    return {"line": _line(k), "abi": k.abi,
            "suite": f"{suite} ({_version(k)}, superseded)" if superseded else suite,
            "compiler": k.compiler, "version": k.extra.get("version", ""),
            "flavours": [k.flavour], "cached": [k.flavour], "archive": False}


def _newest_per_line(rows: list[dict]) -> list[dict]:
    seen, out = set(), []
    for r in rows:
        if r["line"] not in seen or r["cached"]:
            seen.add(r["line"])
            out.append(r)
    return out


def _remove_debris(base: Path, key: str, progress=None):
    """Temporary entries of a fetch that was killed (kill -9, power loss); the
    caller holds the kernel's lock, so no live fetch owns them."""
    for old in base.glob(f".tmp-{key}-*"):
        _say(progress, f"removing {old.name}, left by an interrupted fetch")
        shutil.rmtree(old, ignore_errors=True)


def _say(progress, message: str, *, quiet_ok: bool = False):
    """A repair message is shown even to callers that pass no progress sink."""
    if progress:
        progress(message)
    elif not quiet_ok:
        print(f"nflab: {message}", file=sys.stderr, flush=True)


def expand(kernels: str | list[str]) -> list[str]:
    """A comma list of specs and groups (lts, stable, rc, supported) -> specs, in order."""
    items = kernels.split(",") if isinstance(kernels, str) else list(kernels)
    out = []
    for item in (i.strip() for i in items if i.strip()):
        if item in dk.GROUPS:
            out += dk.group(item, dk.offers())
        else:
            out.append(item)
    return list(dict.fromkeys(out))


def exact_spec(k: Kernel | KernelRef | Offer) -> str:
    """The spec naming kernel *k* (cached, or a reference or offer) and no other: a
    Debian kernel by its ABI and flavour (any flavour, rt included; ``exact:`` before
    an ABI shaped like a line, the rc's ``7.3``), a kernel built from source by its
    release."""
    if k.flavour not in FLAVOURS:
        return k.release
    return f"{dk.EXACT if dk.is_line(k.abi) else ''}{k.abi}-{k.flavour}"


def release_spec(release: str) -> str:
    """The spec naming exactly the kernel whose ``uname -r`` is *release*: a source
    build's release as it is, a Debian kernel's with ``exact:`` when its ABI is
    shaped like a line (the rc's ``7.3-cloud-amd64`` is not the 7.3 line)."""
    if source_kernels.is_source_spec(release):
        return release
    try:
        what, _ = parse_spec(dk.EXACT + release)
    except KernelError:
        return release           # not a kernel release: the spec's error says so
    return f"{dk.EXACT if dk.is_line(what) else ''}{release}"


def by_release(release: str) -> Kernel:
    """The cached kernel whose ``uname -r`` is *release* (what a VM reports), fetched
    when missing. A release is not a spec (``release_spec`` makes the one for it)."""
    entry = kernels_dir() / release
    if (entry / MANIFEST).is_file():
        problem = check_entry(entry)
        if problem:
            raise KernelError(f"kernel cache entry {entry} is damaged: {problem}",
                              hint=f"run `invoke fetch-kernel --kernel={release_spec(release)}` "
                                   "to fetch it again")
        return Kernel.load(entry)
    return get(release_spec(release))
