"""Kernel supply: resolve a kernel spec, fetch Debian's packages, cache them.

A cache entry lives in ``$NFLAB_CACHE/kernels/<abi>-<flavour>/`` and holds the
``dpkg -x`` of the image, headers, common headers and kbuild packages, plus a
manifest ``nflab-kernel.json`` that is written last. An entry is built in a
temporary directory and renamed into place, so an interrupted fetch never
leaves something that looks complete. A file lock serialises two fetches of
the same kernel. Every use verifies the entry against what was recorded at
fetch time (``check_entry``: vmlinuz size/mtime/sha256, the listing of every
file); a damaged entry is reported and fetched again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ground import integrity
from ground.errors import KernelError
from ground.paths import kernels_dir
from ground.proc import file_lock, run

from . import source_kernels   # custom kernels: `source:6.12[+fragment]` specs

DEFAULT_KERNEL = "6.12"
DEFAULT_FLAVOUR = "cloud-amd64"
FLAVOURS = ("cloud-amd64", "amd64")
LINES = ("6.1", "6.12")
MANIFEST = "nflab-kernel.json"
MANIFEST_VERSION = 1

_ABI_RE = r"6\.1\.0-\d+|6\.12\.\d+\+deb12"
_IMAGE_RE = re.compile(rf"^linux-image-(?P<abi>{_ABI_RE})-(?P<flavour>cloud-amd64|amd64)$")
_SPEC_RE = re.compile(
    rf"^(?P<abi>{_ABI_RE}|6\.1|6\.12)(?:[-@/:](?P<flavour>cloud-amd64|amd64|cloud))?$")


@dataclass(frozen=True)
class KernelRef:
    """A concrete Debian kernel: ABI plus flavour."""

    abi: str
    flavour: str = DEFAULT_FLAVOUR

    @property
    def line(self) -> str:
        return "6.1" if self.abi.startswith("6.1.") else "6.12"

    @property
    def release(self) -> str:
        return f"{self.abi}-{self.flavour}"

    @property
    def key(self) -> str:
        return self.release

    def sort_key(self):
        return abi_sort_key(self.abi)


def abi_sort_key(abi: str):
    if abi.startswith("6.1.0-"):
        return (6, 1, int(abi.split("-")[1]))
    # 6.12.117+deb12, or the upstream version of a kernel built from source (6.1.192)
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)", abi)
    return tuple(int(x) for x in m.groups()) if m else (0, 0, 0)


@dataclass
class Kernel:
    """A cached kernel, as recorded in its manifest."""

    abi: str
    flavour: str
    release: str
    root: str
    vmlinuz: str
    headers: str
    config: str
    modules: str
    system_map: str
    packages: dict

    @property
    def spec(self) -> str:
        return f"{self.abi}-{self.flavour}"

    def config_value(self, option: str):
        """Value of CONFIG_<option> in the kernel's .config, or None if unset."""
        name = option if option.startswith("CONFIG_") else f"CONFIG_{option}"
        for line in Path(self.config).read_text().splitlines():
            if line.startswith(name + "="):
                return line.split("=", 1)[1].strip('"')
        return None

    @classmethod
    def load(cls, entry: Path) -> "Kernel":
        data = json.loads((entry / MANIFEST).read_text())
        if data.get("version") != MANIFEST_VERSION:
            raise KernelError(f"cache entry {entry} has an old manifest",
                              hint="delete it and run `invoke fetch-kernel` again")
        data.pop("version")
        return cls(**data)


def parse_spec(spec: str | None) -> tuple[str, str]:
    """Split a user spec into (abi-or-line, flavour); raise with valid forms."""
    spec = (spec or DEFAULT_KERNEL).strip()
    m = _SPEC_RE.match(spec)
    if not m:
        raise KernelError(
            f"invalid kernel spec {spec!r}",
            hint="use 6.1 or 6.12 (newest ABI of that line), an exact ABI such as "
                 "6.1.0-56 or 6.12.117+deb12, optionally with -cloud-amd64 or -amd64; "
                 "`invoke kernels` lists them; or a kernel built from source: "
                 "source:6.12[+debug|+FILE]")
    flavour = m.group("flavour") or DEFAULT_FLAVOUR
    if flavour == "cloud":
        flavour = "cloud-amd64"
    return m.group("abi"), flavour


APT_LISTS = Path("/var/lib/apt/lists")


def _apt_lists_stamp() -> str:
    """Changes whenever `apt-get update` rewrites the package lists."""
    try:
        lists = [p for p in APT_LISTS.iterdir() if "_Packages" in p.name or p.name.endswith("Release")]
    except OSError:
        return ""
    return ",".join(f"{p.name}:{p.stat().st_mtime_ns}" for p in sorted(lists))


def archive_kernels() -> list[KernelRef]:
    """Kernels Debian's archive offers with headers (newest first).

    Two `apt-cache pkgnames` calls cost ~1 s; the answer is cached beside the
    kernels and reused until apt's package lists change."""
    cache = kernels_dir() / ".archive.json"
    stamp = _apt_lists_stamp()
    if stamp:
        try:
            data = json.loads(cache.read_text())
            if data.get("stamp") == stamp:
                return [KernelRef(a, f) for a, f in data["refs"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    refs = _query_archive()
    if stamp and refs:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"stamp": stamp, "refs": [[r.abi, r.flavour] for r in refs]}))
            os.replace(tmp, cache)
        except OSError:
            pass
    return refs


def _query_archive() -> list[KernelRef]:
    try:
        out = subprocess.run(["apt-cache", "pkgnames", "linux-headers-6."],
                             capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return []
    headers = set(out.split())
    out = subprocess.run(["apt-cache", "pkgnames", "linux-image-6."],
                         capture_output=True, text=True, check=False).stdout
    refs = []
    for name in out.split():
        m = _IMAGE_RE.match(name)
        if not m:
            continue
        abi, flavour = m.group("abi"), m.group("flavour")
        if f"linux-headers-{abi}-{flavour}" in headers and f"linux-headers-{abi}-common" in headers:
            refs.append(KernelRef(abi, flavour))
    refs.sort(key=lambda r: (r.sort_key(), r.flavour == DEFAULT_FLAVOUR), reverse=True)
    return refs


def cached_kernels() -> list[Kernel]:
    base = kernels_dir()
    found = []
    if base.is_dir():
        for entry in sorted(base.iterdir()):
            if (entry / MANIFEST).is_file():
                try:
                    found.append(Kernel.load(entry))
                except (KernelError, TypeError, json.JSONDecodeError):
                    continue
    found.sort(key=lambda k: abi_sort_key(k.abi), reverse=True)
    return found


def _nearest(abi: str, refs: list[KernelRef]) -> str:
    names = sorted({r.abi for r in refs}, key=abi_sort_key, reverse=True)
    line = KernelRef(abi).line
    same_line = [n for n in names if KernelRef(n).line == line] or names
    return ", ".join(same_line[:5]) or "none (is apt's package list up to date? run `apt-get update`)"


def resolve(spec: str | None) -> KernelRef:
    """Turn a spec into a concrete KernelRef, preferring what is cached."""
    if source_kernels.is_source_spec(spec):
        p = source_kernels.plan(spec)
        return KernelRef(p.upstream, f"{source_kernels.FLAVOUR_PREFIX}{p.key}")
    abi, flavour = parse_spec(spec)
    if abi in LINES:
        refs = [r for r in archive_kernels() if r.line == abi and r.flavour == flavour]
        if refs:
            return refs[0]
        cached = [k for k in cached_kernels()
                  if KernelRef(k.abi, k.flavour).line == abi and k.flavour == flavour]
        if cached:
            return KernelRef(cached[0].abi, cached[0].flavour)
        raise KernelError(f"no {abi} kernel with headers found in apt's lists or the cache",
                          hint="run `apt-get update`, then `invoke kernels`")
    ref = KernelRef(abi, flavour)
    if (kernels_dir() / ref.key / MANIFEST).is_file():
        return ref
    refs = archive_kernels()
    if ref not in refs:
        raise KernelError(f"kernel {ref.release} is not available with headers",
                          hint=f"nearest valid: {_nearest(abi, refs)}")
    return ref


def _pkg_field(pkg: str, field: str) -> str:
    out = run(["apt-cache", "show", "--no-all-versions", pkg]).stdout
    for line in out.splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise KernelError(f"apt has no {field} for {pkg}")


def packages_for(ref: KernelRef) -> list[str]:
    """The four packages a kernel needs: image, headers, common headers, kbuild."""
    headers = f"linux-headers-{ref.abi}-{ref.flavour}"
    depends = _pkg_field(headers, "Depends")
    kbuild = [d.strip().split()[0] for d in re.split(r"[,|]", depends)
              if d.strip().startswith("linux-kbuild-")]
    if not kbuild:
        raise KernelError(f"{headers} does not name its linux-kbuild package")
    return [f"linux-image-{ref.abi}-{ref.flavour}", headers,
            f"linux-headers-{ref.abi}-common", kbuild[0]]


def _fix_headers_makefile(root: Path, final_root: Path, ref: KernelRef) -> Path:
    """Point the headers' absolute include of the common Makefile at the cache."""
    hdr = root / "usr/src" / f"linux-headers-{ref.release}"
    makefile = hdr / "Makefile"
    text = makefile.read_text()
    fixed = re.sub(r"(?<![\w/])/usr/src/(linux-headers-[^/\s]+-common)",
                   lambda m: str(final_root / "usr/src" / m.group(1)), text)
    if fixed == text:
        raise KernelError(f"unexpected headers Makefile layout in {makefile}",
                          hint="no absolute /usr/src/...-common include found")
    makefile.write_text(fixed)
    return hdr


def _download(pkgs: list[str], dest: Path, progress=None) -> list[Path]:
    debs = []
    for pkg in pkgs:
        if progress:
            progress(f"apt-get download {pkg}")
        # apt-get download verifies the archive's checksums before it keeps a file
        run(["apt-get", "download", "-q", pkg], cwd=dest, timeout=900)
    for deb in sorted(dest.glob("*.deb")):
        debs.append(deb)
    if len(debs) != len(pkgs):
        raise KernelError(f"expected {len(pkgs)} packages, apt-get left {len(debs)} in {dest}")
    return debs


def _unpack(debs: list[Path], root: Path, progress=None):
    for deb in debs:
        if progress:
            progress(f"dpkg -x {deb.name}")
        run(["dpkg", "-x", deb, root], timeout=600)


def fetch(spec: str | None = None, *, progress=None, force=False) -> Kernel:
    """Make sure the kernel for *spec* is in the cache and return it."""
    if source_kernels.is_source_spec(spec):
        return source_kernels.fetch(spec, progress=progress, force=force)
    ref = resolve(spec)
    base = kernels_dir()
    entry = base / ref.key
    if not force and check_entry(entry) is None:
        return Kernel.load(entry)
    base.mkdir(parents=True, exist_ok=True)
    with file_lock(base / f".{ref.key}.lock"):
        problem = check_entry(entry)
        if not force and problem is None:
            return Kernel.load(entry)
        _remove_debris(base, ref.key, progress)
        if entry.exists():
            _say(progress, f"kernel cache entry {entry} is damaged: {problem}; "
                           "removing it and fetching again" if problem else
                           f"removing kernel cache entry {entry} (--force)")
            shutil.rmtree(entry)
        pkgs = packages_for(ref)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{ref.key}-", dir=base))
        try:
            debs_dir = tmp / "debs"
            debs_dir.mkdir()
            root = tmp / "root"
            debs = _download(pkgs, debs_dir, progress)
            _unpack(debs, root, progress)
            shutil.rmtree(debs_dir)
            kernel = _record(ref, tmp, entry, pkgs, progress)
            record_integrity(tmp, kernel)
            tmp.rename(entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Kernel.load(entry)


def _record(ref: KernelRef, tmp: Path, entry: Path, pkgs: list[str], progress=None) -> Kernel:
    """Fix up the unpacked tree and write the manifest (paths as they will be after rename)."""
    root = tmp / "root"
    release = ref.release
    vmlinuz = root / "boot" / f"vmlinuz-{release}"
    config = root / "boot" / f"config-{release}"
    modules = root / "lib/modules" / release
    for path in (vmlinuz, config, modules):
        if not path.exists():
            raise KernelError(f"package for {release} lacks {path.relative_to(root)}")
    _fix_headers_makefile(root, entry / "root", ref)
    if progress:
        progress(f"depmod {release}")
    run(["depmod", "-b", root, release], timeout=300)
    final = entry / "root"
    kernel = Kernel(
        abi=ref.abi, flavour=ref.flavour, release=release, root=str(final),
        vmlinuz=str(final / "boot" / f"vmlinuz-{release}"),
        headers=str(final / "usr/src" / f"linux-headers-{release}"),
        config=str(final / "boot" / f"config-{release}"),
        modules=str(final / "lib/modules" / release),
        system_map=str(final / "boot" / f"System.map-{release}"),
        packages={p: _pkg_field(p, "Version") for p in pkgs},
    )
    data = {"version": MANIFEST_VERSION, **asdict(kernel)}
    (tmp / MANIFEST).write_text(json.dumps(data, indent=2) + "\n")
    return kernel


def get(spec: str | None = None, *, fetch_missing=True, progress=None) -> Kernel:
    """The cached kernel for *spec*, fetching it first when allowed."""
    if source_kernels.is_source_spec(spec):
        return source_kernels.get(spec, fetch_missing=fetch_missing, progress=progress)
    if fetch_missing:
        return fetch(spec, progress=progress)
    ref = resolve(spec)
    entry = kernels_dir() / ref.key
    if not (entry / MANIFEST).is_file():
        raise KernelError(f"kernel {ref.release} is not in the cache",
                          hint=f"run `invoke fetch-kernel --kernel={ref.abi}`")
    problem = check_entry(entry)
    if problem:
        raise KernelError(f"kernel cache entry {entry} is damaged: {problem}",
                          hint=f"run `invoke fetch-kernel --kernel={ref.abi}-{ref.flavour}` "
                               "to fetch it again")
    return Kernel.load(entry)


def table_rows() -> list[dict]:
    """Rows for `invoke kernels`: cached and archive kernels, newest first."""
    cached = {k.spec: k for k in cached_kernels()}
    rows = {}
    for ref in archive_kernels():
        rows[ref.key] = {"abi": ref.abi, "flavour": ref.flavour, "line": ref.line,
                         "cached": ref.key in cached, "archive": True}
    for key, k in cached.items():
        rows.setdefault(key, {"abi": k.abi, "flavour": k.flavour,
                              "line": KernelRef(k.abi, k.flavour).line,
                              "cached": True, "archive": False})
    return sorted(rows.values(), key=lambda r: (abi_sort_key(r["abi"]), r["flavour"]), reverse=True)


# ---------------------------------------------------------------- cache entry verification
#
# Next to its manifest an entry records what it held when it was created:
# ``nflab-integrity.json`` (size, mtime and sha256 of the vmlinuz; the count,
# byte total and digest of the listing of every file under root/) and
# ``nflab-files.gz`` (the listing itself: path, size or symlink target), so a
# damaged entry says *what* is wrong. Every use checks the vmlinuz's size and
# mtime (full sha256 when the mtime moved) and walks the tree (~14k files,
# ~0.04 s); an entry from before these records gets the key-file checks and
# its records written then.

INTEGRITY = "nflab-integrity.json"
LISTING = "nflab-files.gz"




def _walk(root: Path) -> dict[str, str]:
    """relative path -> size (regular files) or '->target' (symlinks), dirs left out.
    One lstat per file at most (``os.scandir`` knows types from the directory
    listing): ~0.04 s for a kernel entry's ~14k files, paid by every `vm-up`."""
    out = {}
    stack = [("", str(root))]
    while stack:
        rel, path = stack.pop()
        with os.scandir(path) as it:
            for e in it:
                key = f"{rel}/{e.name}" if rel else e.name
                if e.is_symlink():
                    out[key] = "->" + os.readlink(e.path)
                elif e.is_dir(follow_symlinks=False):
                    stack.append((key, e.path))
                else:
                    out[key] = str(e.stat(follow_symlinks=False).st_size)
    return out


def _digest(listing: dict[str, str]) -> str:
    import hashlib
    h = hashlib.sha256()
    for path in sorted(listing):
        h.update(f"{path}\0{listing[path]}\n".encode())
    return h.hexdigest()


def _key_files(kernel: "Kernel") -> list[Path]:
    """What a build and a boot cannot do without (checked even without records)."""
    headers = Path(kernel.headers)
    return [Path(kernel.vmlinuz), Path(kernel.config), Path(kernel.modules) / "modules.dep",
            headers / "Makefile", headers / ".config", headers / "Module.symvers",
            headers / "include/generated/utsrelease.h", headers / "include/generated/autoconf.h"]


def record_integrity(entry: Path, kernel: "Kernel | None" = None):
    """Write the entry's integrity records (at fetch time, before the manifest)."""
    import gzip
    root = entry / "root"
    listing = _walk(root)
    vmlinuz = root / "boot" / f"vmlinuz-{kernel.release}" if kernel else None
    if vmlinuz is None:
        vmlinuz = next(iter(sorted((root / "boot").glob("vmlinuz-*"))))
    data = {
        "vmlinuz": {"path": str(vmlinuz.relative_to(root)), **integrity.record(vmlinuz)},
        "files": len(listing),
        "bytes": sum(int(v) for v in listing.values() if not v.startswith("->")),
        "digest": _digest(listing),
    }
    text = "".join(f"{p}\t{listing[p]}\n" for p in sorted(listing))
    for name, payload in ((LISTING, gzip.compress(text.encode())),
                          (INTEGRITY, (json.dumps(data, indent=2) + "\n").encode())):
        tmp = entry / f".{name}.tmp{os.getpid()}"
        tmp.write_bytes(payload)
        os.replace(tmp, entry / name)


def _listing_diff(entry: Path, now: dict[str, str]) -> str:
    import gzip
    try:
        text = gzip.decompress((entry / LISTING).read_bytes()).decode()
    except (OSError, EOFError, ValueError):
        return "its file listing differs from the one recorded (and the record is unreadable)"
    then = dict(line.split("\t", 1) for line in text.splitlines() if "\t" in line)
    missing = sorted(set(then) - set(now))
    extra = sorted(set(now) - set(then))
    changed = sorted(p for p in set(then) & set(now) if then[p] != now[p])
    parts = []
    for label, paths in (("missing", missing), ("changed", changed), ("unexpected", extra)):
        if paths:
            shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
            parts.append(f"{len(paths)} {label} ({shown})")
    return "; ".join(parts) or "its file listing digest differs from the one recorded"


def check_entry(entry: Path) -> str | None:
    """None if the cache entry is whole, else what is wrong with it (one line)."""
    if not entry.is_dir():
        return "it does not exist"
    if not (entry / MANIFEST).is_file():
        return f"it has no {MANIFEST} (an interrupted fetch, or the manifest was deleted)"
    try:
        kernel = Kernel.load(entry)
    except (KernelError, TypeError, ValueError, OSError) as exc:
        return f"its manifest is unreadable ({exc})"
    for path in _key_files(kernel):
        if not path.is_file():
            return f"{path.relative_to(entry)} is missing"
        if path.stat().st_size == 0:
            return f"{path.relative_to(entry)} is empty"
    try:
        data = json.loads((entry / INTEGRITY).read_text())
    except FileNotFoundError:
        try:   # an entry from before the records: adopt it as it is now
            record_integrity(entry, kernel)
        except OSError:
            pass
        return None
    except (OSError, ValueError) as exc:
        return f"its {INTEGRITY} is unreadable ({exc})"
    vm = data["vmlinuz"]
    vmlinuz = entry / "root" / vm["path"]
    wrong = integrity.check(vmlinuz, vm, name=str(vmlinuz.relative_to(entry)))
    if wrong:
        return wrong
    listing = _walk(entry / "root")
    if _digest(listing) != data["digest"]:
        return f"files under root/ changed since the fetch: {_listing_diff(entry, listing)}"
    return None


def _remove_debris(base: Path, key: str, progress=None):
    """Temporary entries of a fetch that was killed (kill -9, power loss); the
    caller holds the kernel's lock, so no live fetch owns them."""
    for old in base.glob(f".tmp-{key}-*"):
        _say(progress, f"removing {old.name}, left by an interrupted fetch")
        shutil.rmtree(old, ignore_errors=True)


def _say(progress, message: str):
    """A repair message is shown even to callers that pass no progress sink."""
    if progress:
        progress(message)
    else:
        import sys
        print(f"nflab: {message}", file=sys.stderr, flush=True)
