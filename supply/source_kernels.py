"""Custom kernels: built from Debian's ``linux-source-6.x`` with a config fragment.

Spec forms (accepted wherever a kernel spec is)::

    source:6.12                  the kit's base config only (vm/configs/base.config)
    source:6.12+debug            plus a fragment shipped with the kit (vm/configs/debug.config)
    source:6.12+/path/my.config  plus your fragment (= fetch-kernel --config-fragment=FILE)
    source:6.12+1a2b3c4d         plus a fragment built before (its hash, kept in the cache)
    6.12.117-nflab-5e6f7a8b      an exact build, by its release (``uname -r`` in the guest)

How a kernel is made (``fetch``):

1. ``apt-get download linux-source-<line>``, ``dpkg -x``, untar
   ``/usr/src/linux-source-<line>.tar.xz`` into ``kernels/.src/<package version>/``
   (once per source version, shared by every build of it, kept: the build trees
   include its Makefile and headers).
2. In ``kernels/.build-<release>/build`` (``make O=``; a fixed work directory, so
   an interrupted or failed build is resumed, incrementally, by the next fetch; it
   has no manifest and never looks complete): ``make allnoconfig``,
   ``scripts/kconfig/merge_config.sh`` of the kit's base fragment, the user's
   fragment and ``CONFIG_LOCALVERSION="-nflab-<key>"``, ``make olddefconfig``; every
   option a fragment asks for must survive Kconfig (a KernelError lists those it
   dropped, with their ``depends on``).
3. ``nice -n 19 make -j$(nproc) bzImage modules``, ``make modules_install``; the
   entry gets ``root/boot/{vmlinuz,config,System.map}-<release>``,
   ``root/lib/modules/<release>`` (with modules.dep) and ``build/`` itself as the
   headers (``make -C build M=...`` works: Module.symvers, scripts, generated
   headers are all there), the same manifest shape as a Debian kernel, written
   last; then the work directory is renamed to ``kernels/<release>``.

The cache key is (source package version, sha256 of the kit's base fragment and
the user's fragment, both reduced to their option lines): release
``<upstream version>-nflab-<first 8 hex of the key>``. ``source:<line>[+frag]``
prefers the newest cached build of that fragment; ``--force`` rebuilds from the
newest source in apt's lists. The virtio drivers and overlayfs are built in, so
the initramfs loads no modules.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ground import deb, debarchive, debversion, kconfig
from ground.errors import KernelError
from ground.files import atomic_write
from ground.http import NotServed
from ground.paths import REPO, kernels_dir
from ground.proc import file_lock, run

from . import buildroot
from .debian_kernels import KERNEL_SUITES, RELEASE_ORDER, left_out
from .entry import MANIFEST, Kernel, check_entry, record_integrity

CONFIGS = REPO / "vm" / "configs"   # lab VM kernel configs live with the lab
BASE_FRAGMENT = CONFIGS / "base.config"
PREFIX = "source:"
FLAVOUR_PREFIX = "nflab-"
SOURCE_INFO = "nflab-source.json"   # beside the manifest: what the build was made from
ARCH = "x86_64"
BUILD_ENV = {"KBUILD_BUILD_USER": "nflab", "KBUILD_BUILD_HOST": "nflab"}

_SPEC_RE = re.compile(r"^source:(?P<line>\d+\.\d+)(?:\+(?P<frag>.+))?$")
RELEASE_RE = re.compile(r"^(?P<version>\d+\.\d+\.\d+)-nflab-(?P<key>[0-9a-f]{8})$")
_HASH_RE = re.compile(r"^[0-9a-f]{8}$")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")

SPEC_HINT = ("use source:6.1 or source:6.12, optionally +debug (a fragment in vm/configs/), "
             "+/path/to/fragment.config or +<hash> of a fragment built before; or "
             "`invoke fetch-kernel --kernel=source:6.12 --config-fragment=FILE`")


# ---------------------------------------------------------------- fragments

def normalize(text: str, where: str = "fragment") -> str:
    """The option lines of a fragment in a canonical form (what the hash covers)."""
    return "".join(f"{k}={v}\n" for k, v in kconfig.parse(text, where).items())


def fragment_hash(text: str) -> str:
    """Names a user fragment: ``source:6.12+<this>``."""
    return hashlib.sha256(normalize(text).encode()).hexdigest()[:8]


def cache_key(source_version: str, base_text: str, user_text: str) -> str:
    """(source package version, sha256 of base + user fragment) -> 8 hex digits."""
    h = hashlib.sha256()
    for part in (source_version, normalize(base_text, str(BASE_FRAGMENT)), normalize(user_text)):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:8]


def release_for(upstream: str, key: str) -> str:
    return f"{upstream}-nflab-{key}"


def fragments_store() -> Path:
    return kernels_dir() / ".fragments"


def shipped_fragments() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.config") if p.stem != "base")


def _stored_fragment(spec: str, line: str, frag: str) -> str:
    """The text of stored fragment *frag*, which must hash to its name."""
    stored = fragments_store() / f"{frag}.config"
    hint = f"pass the fragment file itself: source:{line}+/path/to/it.config or --config-fragment=FILE"
    if not stored.is_file():
        raise KernelError(f"{spec!r}: no fragment with hash {frag} in {fragments_store()}",
                          hint=hint)
    text = stored.read_text(errors="replace")
    if _hash_or_none(text) != frag:
        raise KernelError(f"{spec!r}: the stored fragment {stored} does not hash to {frag} "
                          "(changed or damaged since it was stored)",
                          hint=f"delete {stored} and {hint}")
    return text


def _hash_or_none(text: str) -> str | None:
    try:
        return fragment_hash(text)
    except KernelError:          # not Kconfig text at all
        return None


def store_fragment(text: str) -> Path:
    """Keep a user fragment under its hash (for ``source:<line>+<hash>``): written
    atomically when missing or not what its name says, else left alone."""
    store = fragments_store()
    path = store / f"{fragment_hash(text)}.config"
    if path.is_file() and _hash_or_none(path.read_text(errors="replace")) == path.stem:
        return path
    atomic_write(path, text)
    return path


# ---------------------------------------------------------------- specs

@dataclass(frozen=True)
class SourceSpec:
    """What a ``source:`` spec asks for: a line and a user fragment (text)."""

    line: str
    fragment: str = ""       # the user's fragment text ("" = kit base only)
    origin: str = ""         # "", a shipped name ("debug"), a path, or a hash

    @property
    def fragment_hash(self) -> str:
        return fragment_hash(self.fragment)

    @property
    def canonical(self) -> str:
        """A spec that names the same thing later (paths become the fragment's hash)."""
        if not self.origin:
            return f"{PREFIX}{self.line}"
        if _NAME_RE.match(self.origin) and not _HASH_RE.match(self.origin):
            return f"{PREFIX}{self.line}+{self.origin}"
        return f"{PREFIX}{self.line}+{self.fragment_hash}"


def is_source_spec(spec: str | None) -> bool:
    return bool(spec) and (spec.strip().startswith(PREFIX) or bool(RELEASE_RE.match(spec.strip())))


def parse_spec(spec: str) -> SourceSpec:
    """``source:<line>[+fragment]`` -> SourceSpec (reads the fragment; no apt, no build)."""
    spec = spec.strip()
    m = _SPEC_RE.match(spec)
    if not m:
        raise KernelError(f"invalid custom kernel spec {spec!r}", hint=SPEC_HINT)
    line, frag = m.group("line"), m.group("frag")
    if not frag:
        return SourceSpec(line)
    if _HASH_RE.match(frag) and not (CONFIGS / f"{frag}.config").is_file():
        return SourceSpec(line, _stored_fragment(spec, line, frag), frag)
    if _NAME_RE.match(frag) and "/" not in frag and not frag.endswith(".config"):
        path = CONFIGS / f"{frag}.config"
        if not path.is_file() or frag == "base":
            raise KernelError(f"{spec!r}: the kit ships no fragment {frag!r}",
                              hint=f"shipped: {', '.join(shipped_fragments()) or 'none'}; or give a "
                                   "path: source:6.12+./my.config")
        text = path.read_text()
        kconfig.parse(text, str(path))
        return SourceSpec(line, text, frag)
    path = Path(frag).expanduser()
    if not path.is_file():
        raise KernelError(f"{spec!r}: config fragment {str(path)!r} does not exist",
                          hint="give an existing file of CONFIG_ lines, "
                               f"or a shipped fragment: {', '.join(shipped_fragments())}")
    text = path.read_text()
    kconfig.parse(text, str(path))
    return SourceSpec(line, text, str(path.resolve()))


def check_spec(spec: str) -> None:
    """Validate a custom kernel spec without building (a release must be cached)."""
    spec = spec.strip()
    if RELEASE_RE.match(spec):
        if not (kernels_dir() / spec / SOURCE_INFO).is_file():
            raise KernelError(f"custom kernel {spec} is not in the cache",
                              hint="name it by how it is built: source:6.12[+fragment]")
        return
    parse_spec(spec)


def with_fragment_file(spec: str | None, fragment: str | None) -> str | None:
    """``fetch-kernel --kernel=source:6.12 --config-fragment=FILE`` -> one spec."""
    if not fragment:
        return spec
    spec = (spec or "").strip()
    m = _SPEC_RE.match(spec)
    if not m:
        raise KernelError(f"--config-fragment needs a kernel built from source, not {spec or 'the default'!r}",
                          hint="use --kernel=source:6.1 or --kernel=source:6.12")
    if m.group("frag"):
        raise KernelError(f"--kernel={spec} already names a fragment ({m.group('frag')})",
                          hint=f"use --kernel={PREFIX}{m.group('line')} --config-fragment={fragment}")
    return f"{PREFIX}{m.group('line')}+{Path(fragment).expanduser().resolve()}"


# ---------------------------------------------------------------- cache

@dataclass
class Plan:
    """A concrete build: source package and version, fragments, release."""

    line: str
    package: str
    version: str          # Debian package version of linux-source-<line>
    upstream: str         # its kernel version (Makefile VERSION.PATCHLEVEL.SUBLEVEL)
    key: str
    fragment: str
    fragment_hash: str
    base: str
    spec: str             # canonical spec
    suite: str = "bookworm"   # the Debian suite linux-source came from (its build root's release)

    @property
    def debian_release(self) -> str:
        return KERNEL_SUITES.get(self.suite, "bookworm")

    @property
    def release(self) -> str:
        return release_for(self.upstream, self.key)


def _upstream(version: str) -> str:
    """``6.12.117-1~deb12u1`` -> ``6.12.117`` (Debian's upstream version)."""
    m = re.match(r"^(\d+\.\d+(?:\.\d+)?)", version)
    if not m:
        raise KernelError(f"unexpected linux-source version {version!r}")
    up = m.group(1)
    return up if up.count(".") == 2 else up + ".0"


_vkey = functools.cmp_to_key(debversion.compare)


def source_offer(line: str):
    """(suite, package) of the newest linux-source-<line>, from the newest Debian
    release that carries it (through the kit's archive client, not the host's apt)."""
    indexes = _kernel_indexes(debarchive.Archive())
    name = f"linux-source-{line}"
    found = [(RELEASE_ORDER.index(KERNEL_SUITES[suite]), pkg.version, suite, pkg)
             for suite, index in indexes.items() for pkg in index.get(name) or []]
    if not found:
        lines = sorted({n[len("linux-source-"):] for index in indexes.values()
                        for n in index.search(r"^linux-source-")
                        if re.match(r"^linux-source-\d+\.\d+$", n)})
        raise KernelError(f"Debian's archive has no {name}",
                          hint=f"lines with linux-source: {', '.join(lines)}")
    # a released version before a release candidate, then the newest Debian release
    best = max(found, key=lambda f: ("~rc" not in f[1], f[0], _vkey(f[1])))
    return best[2], best[3]


def _kernel_indexes(archive) -> dict:
    """{suite: package index} of every kernel suite the mirror serves; one it does
    not (HTTP 404: bullseye moving to archive.debian.org) is left out, with a warning."""
    out = {}
    for suite in KERNEL_SUITES:
        try:
            out[suite] = archive.packages(suite)
        except NotServed as exc:
            left_out(suite, exc)
    return out


def cached_builds() -> list[dict]:
    """Source infos of every complete source-built entry, newest first."""
    found = []
    base = kernels_dir()
    if base.is_dir():
        for entry in base.iterdir():
            info = entry / SOURCE_INFO
            if RELEASE_RE.match(entry.name) and info.is_file() and (entry / "nflab-kernel.json").is_file():
                try:
                    data = json.loads(info.read_text())
                except (OSError, ValueError):
                    continue
                data["entry"] = str(entry)
                found.append(data)
    found.sort(key=lambda d: [int(x) for x in d.get("upstream", "0.0.0").split(".")], reverse=True)
    return found


def plan(spec: str, *, prefer_cached: bool = True) -> Plan:
    """Resolve *spec* to a Plan; cached builds first unless told otherwise."""
    spec = spec.strip()
    m = RELEASE_RE.match(spec)
    if m:
        entry = kernels_dir() / spec
        info = entry / SOURCE_INFO
        if not info.is_file():
            raise KernelError(f"custom kernel {spec} is not in the cache",
                              hint="build it: `invoke fetch-kernel --kernel=source:6.12[+fragment]`")
        data = json.loads(info.read_text())
        return _plan_of(data)
    want = parse_spec(spec)
    base = BASE_FRAGMENT.read_text()
    base_norm = normalize(base, str(BASE_FRAGMENT))
    if prefer_cached:
        for data in cached_builds():
            if data.get("line") == want.line and data.get("fragment_hash") == want.fragment_hash \
                    and normalize(data.get("base", "")) == base_norm:
                return _plan_of(data)
    suite, pkg = source_offer(want.line)
    key = cache_key(pkg.version, base, want.fragment)
    return Plan(line=want.line, package=pkg.name, version=pkg.version,
                upstream=_upstream(pkg.version), key=key, fragment=want.fragment,
                fragment_hash=want.fragment_hash, base=base, spec=want.canonical, suite=suite)


# ---------------------------------------------------------------- source tree

def source_tree(p: Plan, progress=None) -> Path:
    """``kernels/.src/<version>/linux-source-<line>``, unpacked once (locked, atomic)."""
    root = kernels_dir() / ".src"
    final = root / p.version
    tree = final / f"linux-source-{p.line}"
    if (tree / "Makefile").is_file():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{p.version}.lock"):
        if (tree / "Makefile").is_file():
            return tree
        if final.exists():
            shutil.rmtree(final)
        _remove_unpack_debris(root, p.version, progress)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{p.version}-", dir=root))
        try:
            debfile = _download_source(p, progress)
            deb.extract(debfile, tmp / "pkg")
            tarball = tmp / "pkg/usr/src" / f"linux-source-{p.line}.tar.xz"
            if not tarball.is_file():
                raise KernelError(f"{debfile.name} has no usr/src/{tarball.name}")
            if progress:
                progress(f"unpacking {tarball.name}")
            run(["tar", "-xJf", tarball, "-C", tmp], timeout=3600)
            shutil.rmtree(tmp / "pkg")
            if not (tmp / tree.name / "Makefile").is_file():
                raise KernelError(f"{tarball.name} did not unpack to {tree.name}/")
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return tree


def _remove_unpack_debris(root: Path, version: str, progress=None):
    """The temporary trees of unpacks of *version* that were killed (~1.7 GiB each);
    the caller holds the version's lock, so no live unpack owns them. ``mkdtemp``
    adds no ``-``: ``.tmp-<version>-<more>-<random>`` is another version's."""
    prefix = f".tmp-{version}-"
    for old in root.glob(glob.escape(prefix) + "*"):
        if "-" in old.name[len(prefix):]:
            continue
        if progress:
            progress(f"removing {old.name}, left by an interrupted unpack")
        shutil.rmtree(old, ignore_errors=True)


def _plan_of(data: dict) -> Plan:
    return Plan(**{k: data[k] for k in Plan.__dataclass_fields__ if k in data})


def _download_source(p: Plan, progress=None) -> Path:
    archive = debarchive.Archive()
    pkg = next((x for x in archive.packages(p.suite).get(p.package) or []
                if x.version == p.version), None)
    if pkg is None:
        raise KernelError(f"{p.package} {p.version} is no longer in {p.suite}",
                          hint=f"rebuild from the newest: `invoke fetch-kernel --kernel={p.spec} --force`")
    if progress:
        progress(f"downloading {p.package} {p.version} from {p.suite}")
    return archive.download(pkg)


def toolchain(p: Plan, progress=None) -> buildroot.BuildRoot:
    """The build root that compiles a whole kernel of *p*'s Debian release."""
    return buildroot.ensure(p.debian_release, extra=buildroot.KERNEL_BUILD_PACKAGES,
                            progress=progress)


def _in_root(root: buildroot.BuildRoot, cmd, *, cwd=None, timeout=600, rw=()):
    """*cmd* in *root*, with the kernel cache and *rw* writable; KernelError on failure."""
    res = root.run(cmd, rw=[kernels_dir(), *rw], cwd=cwd, timeout=timeout)
    if res.returncode != 0:
        raise KernelError(f"`{' '.join(map(str, cmd))}` failed with exit {res.returncode} "
                          f"in the {root.release} build root",
                          detail="\n".join((res.stdout + res.stderr).strip().splitlines()[-15:]))
    return res


# ---------------------------------------------------------------- configure

def kconfig_symbols(src: Path) -> dict[str, list[str]]:
    """Every symbol the source's Kconfig files define -> its ``depends on`` lines."""
    syms: dict[str, list[str]] = {}
    cfg_re = re.compile(r"^\s*(?:menu)?config\s+([A-Za-z0-9_]+)\s*$")
    dep_re = re.compile(r"^\s*depends\s+on\s+(.*)$")
    for path in src.rglob("Kconfig*"):
        if not path.is_file():
            continue
        current = None
        text = re.sub(r"\\\n\s*", " ", path.read_text(errors="replace"))  # continued lines
        for line in text.splitlines():
            m = cfg_re.match(line)
            if m:
                current = syms.setdefault(m.group(1), [])
                continue
            if current is None:
                continue
            d = dep_re.match(line)
            if d:
                current.append(d.group(1).strip())
            elif re.match(r"^\s*(?:choice|endchoice|menu|endmenu|if|endif|source|comment)\b", line):
                current = None
    return syms


def depends_on(sym: str, symbols: dict[str, list[str]]) -> set[str]:
    """Every symbol *sym* depends on, directly or through others."""
    seen: set[str] = set()
    todo = [sym]
    while todo:
        for line in symbols.get(todo.pop(), []):
            for dep in re.findall(r"\b[A-Z][A-Z0-9_]+\b", line):
                if dep not in seen and dep in symbols:
                    seen.add(dep)
                    todo.append(dep)
    return seen


def _satisfied(want: str, got: str | None) -> bool:
    if want == "n":
        return got in (None, "n")
    if want == "m":
        return got in ("m", "y")   # forced built-in by a select: still there
    return got == want


def dropped_options(requested: dict[str, str], final: dict[str, str],
                    symbols: dict[str, list[str]] | None) -> list[str]:
    """Human lines for every requested option the final config does not have."""
    out = []
    for name, want in requested.items():
        got = final.get(name)
        if _satisfied(want, got):
            continue
        sym = name[len("CONFIG_"):]
        if symbols is not None and sym not in symbols:
            out.append(f"{name}={want}: no such option in this kernel source")
            continue
        deps = "; ".join(symbols.get(sym, [])) if symbols else ""
        out.append(f"{name}={want}: now {got or 'not set'}" + (f" (depends on {deps})" if deps else ""))
    return out


def configure(src: Path, out: Path, p: Plan, progress=None, symbols=None) -> Path:
    """allnoconfig + kit base + user fragment + LOCALVERSION, olddefconfig, verified.

    Raises KernelError listing every option a fragment asked for that Kconfig
    dropped (unknown symbols of the kit's base are tolerated: it serves 6.1 and
    6.12, whose option sets differ)."""
    out.mkdir(parents=True, exist_ok=True)
    frags = out.parent / "fragments"
    frags.mkdir(exist_ok=True)
    (frags / "base.config").write_text(p.base)
    (frags / "user.config").write_text(p.fragment)
    (frags / "release.config").write_text(
        f'CONFIG_LOCALVERSION="-nflab-{p.key}"\n# CONFIG_LOCALVERSION_AUTO is not set\n')
    make = ["make", "-s", "-C", src, f"O={out}", f"ARCH={ARCH}"]
    root = toolchain(p, progress)
    if progress:
        progress(f"configuring {p.release}: allnoconfig + kit base + fragment, olddefconfig "
                 f"(in the {root.release} build root)")
    work = [out.parent]      # the build tree may live outside the cache (tests do)
    _in_root(root, make + ["allnoconfig"], rw=work)
    _in_root(root, [src / "scripts/kconfig/merge_config.sh", "-m", "-O", out, out / ".config",
                    frags / "base.config", frags / "user.config", frags / "release.config"],
             cwd=src, rw=work)
    _in_root(root, make + ["olddefconfig"], rw=work)
    given_up = check_survivors(p, kconfig.read(out / ".config"),
                               symbols if symbols is not None else kconfig_symbols(src), out)
    if given_up and progress:
        progress(f"{p.release}: {len(given_up)} option(s) of the kit's base go with what "
                 "the fragment turns off: " + ", ".join(l.split(":")[0] for l in given_up))
    return out / ".config"


def check_survivors(p: Plan, final: dict[str, str], symbols: dict[str, list[str]],
                    out: Path) -> list[str]:
    """Raise KernelError naming every requested option Kconfig dropped.

    The user's fragment wins over the base for the symbols it names; the base's
    other options must survive, except those depending on an option the user
    turned off on purpose (a kernel without legacy xtables loses the
    iptables-legacy tables the base asks for): those are returned, named."""
    user = kconfig.parse(p.fragment)
    off = {k[len("CONFIG_"):] for k, v in user.items() if v == "n"}
    base = {k: v for k, v in kconfig.parse(p.base).items()
            if k[len("CONFIG_"):] in symbols and k not in user}
    waived = {k: v for k, v in base.items() if depends_on(k[len("CONFIG_"):], symbols) & off}
    lost_user = dropped_options(user, final, symbols)
    lost_base = dropped_options({k: v for k, v in base.items() if k not in waived}, final, symbols)
    given_up = dropped_options(waived, final, symbols)
    if not (lost_user or lost_base):
        return given_up
    detail = []
    for label, lines in (("your fragment:", lost_user),
                         (f"the kit's {BASE_FRAGMENT.name}:", lost_base),
                         (f"the kit's {BASE_FRAGMENT.name}, going with what your fragment "
                          "turns off (not an error):", given_up)):
        if lines:
            detail += [label] + [f"  {l}" for l in lines]
    raise KernelError(
        f"Kconfig dropped {len(lost_user) + len(lost_base)} requested option(s) for {p.release} "
        f"(linux-source-{p.line} {p.version})",
        hint="add the options they depend on to the fragment, or remove them; "
             f"the resulting config is {out / '.config'}",
        detail="\n".join(detail))


# ---------------------------------------------------------------- build

def _make_logged(cmd: list, log: Path, what: str, progress=None, root=None) -> float:
    """Run a long make, output to *log*; progress every 60 s; KernelError with the tail."""
    t0 = time.monotonic()
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(map(str, cmd))}\n")
        fh.flush()
        argv = root.command(cmd, rw=[kernels_dir()], env=BUILD_ENV)
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
        try:
            last = t0
            while proc.poll() is None:
                time.sleep(2)
                if progress and time.monotonic() - last >= 60:
                    last = time.monotonic()
                    progress(f"{what}: {int(last - t0)} s (log: {log})")
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()
        errors = [l for l in tail if ": error:" in l or "Error " in l][-15:]
        raise KernelError(f"{what} failed (exit {proc.returncode})", hint=f"full log: {log}",
                          detail="\n".join(errors or tail[-25:]))
    return time.monotonic() - t0


def build(p: Plan, tmp: Path, src: Path, progress=None, jobs: int | None = None) -> dict:
    """Configure and compile into *tmp*/build, install into *tmp*/root; seconds per step."""
    out = tmp / "build"
    log = tmp / "build.log"
    times = {}
    t0 = time.monotonic()
    configure(src, out, p, progress)
    times["configure"] = round(time.monotonic() - t0, 1)
    jobs = jobs or os.cpu_count() or 2
    make = ["nice", "-n", "19", "make", "-C", src, f"O={out}", f"ARCH={ARCH}", f"-j{jobs}"]
    tools = toolchain(p, progress)
    if progress:
        progress(f"compiling {p.release} with {jobs} job(s) under nice -n 19 in the "
                 f"{tools.release} build root (log: {log})")
    times["compile"] = round(_make_logged(make + ["bzImage", "modules"], log,
                                          f"building {p.release}", progress, tools), 1)
    root = tmp / "root"
    t1 = time.monotonic()
    _make_logged(make + ["modules_install", f"INSTALL_MOD_PATH={root}", "INSTALL_MOD_STRIP=1",
                         "DEPMOD=/sbin/depmod"], log, f"modules_install of {p.release}", progress, tools)
    rel = (out / "include/config/kernel.release").read_text().strip()
    if rel != p.release:
        raise KernelError(f"the build produced release {rel!r}, expected {p.release!r}",
                          hint=f"check CONFIG_LOCALVERSION in {out / '.config'}")
    moddir = root / "lib/modules" / rel
    for link in ("build", "source"):
        if (moddir / link).is_symlink():
            (moddir / link).unlink()
    run(["depmod", "-b", root, rel], timeout=300)
    boot = root / "boot"
    boot.mkdir(parents=True, exist_ok=True)
    shutil.copy2(out / "arch/x86/boot/bzImage", boot / f"vmlinuz-{rel}")
    shutil.copy2(out / ".config", boot / f"config-{rel}")
    shutil.copy2(out / "System.map", boot / f"System.map-{rel}")
    for needed in ("Module.symvers", "scripts/module.lds", "include/generated/autoconf.h"):
        if not (out / needed).is_file():
            raise KernelError(f"the build tree of {rel} lacks {needed}: out-of-tree modules "
                              "cannot be built against it", hint=f"see {log}")
    times["install"] = round(time.monotonic() - t1, 1)
    return times


def retarget_output_makefile(out: Path, final: Path):
    """Point the ``O=`` tree's generated Makefile at where the tree will live.

    From 7.x Kbuild writes ``export KBUILD_OUTPUT = <abs O= dir>`` into it, so a
    tree renamed from ``.build-<release>`` into the entry would send every
    ``make -C build M=...`` to a directory that is gone."""
    makefile = out / "Makefile"
    text = makefile.read_text()
    fixed = re.sub(rf"^(export KBUILD_OUTPUT\s*:?=\s*){re.escape(str(out))}\s*$",
                   lambda m: m.group(1) + str(final), text, flags=re.M)
    if fixed != text:
        makefile.write_text(fixed)


def _write_manifest(p: Plan, tmp: Path, entry: Path, times: dict):
    final = entry / "root"
    rel = p.release
    kernel = Kernel(
        abi=p.upstream, flavour=f"{FLAVOUR_PREFIX}{p.key}", release=rel, root=str(final),
        vmlinuz=str(final / "boot" / f"vmlinuz-{rel}"), headers=str(entry / "build"),
        config=str(final / "boot" / f"config-{rel}"), modules=str(final / "lib/modules" / rel),
        system_map=str(final / "boot" / f"System.map-{rel}"),
        # the build's time: a --force rebuild of the same release gets a fresh boot cache
        packages={p.package: p.version, "nflab-config": p.key, "nflab-build": f"{time.time():.0f}"},
        suite=p.suite, toolchain=p.debian_release, extra={"compiler": "gcc"})
    (tmp / SOURCE_INFO).write_text(json.dumps({**asdict(p), "seconds": times,
                                               "built_at": time.time()}, indent=2) + "\n")
    record_integrity(tmp, kernel)     # the same records as a Debian entry
    (tmp / MANIFEST).write_text(kernel.manifest())


def _load_checked(entry: Path, spec: str, listing: bool = True):
    """Kernel.load of a complete entry, after the integrity check Debian entries get."""
    problem = check_entry(entry, listing=listing)
    if problem:
        raise KernelError(f"the cache entry {entry} is damaged: {problem}",
                          hint=f"rebuild it: `invoke fetch-kernel --kernel={spec} --force`")
    return Kernel.load(entry)


def fetch(spec: str, *, progress=None, force: bool = False, jobs: int | None = None,
          listing: bool = True):
    """The cached kernel for a ``source:`` spec or release, built first when missing
    (*listing*: see ``check_entry``)."""
    if RELEASE_RE.match(spec.strip()):
        entry = kernels_dir() / spec.strip()
        if (entry / MANIFEST).is_file() and not force:
            return _load_checked(entry, spec.strip(), listing)
    p = plan(spec, prefer_cached=not force)
    base = kernels_dir()
    entry = base / p.release
    if not force and (entry / MANIFEST).is_file():
        return _load_checked(entry, p.spec, listing)
    base.mkdir(parents=True, exist_ok=True)
    store_fragment(p.fragment)
    with file_lock(base / f".{p.release}.lock"):
        if not force and (entry / MANIFEST).is_file():
            return _load_checked(entry, p.spec)
        src = source_tree(p, progress)
        # a fixed work directory, not a random one: an interrupted or failed build is
        # resumed by the next fetch (make is incremental); it has no manifest, so it
        # never looks complete, and it becomes the entry only by the final rename
        work = base / f".build-{p.release}"
        if progress:
            progress(f"{'resuming' if work.exists() else 'building'} {p.release} from "
                     f"{p.package} {p.version} (fragment {p.fragment_hash}; this takes minutes)")
        work.mkdir(exist_ok=True)
        for stale in (MANIFEST, SOURCE_INFO, "root"):
            path = work / stale
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        try:
            times = build(p, work, src, progress, jobs)
        except KernelError as exc:
            exc.hint = (exc.hint + "; " if exc.hint else "") + \
                f"the next fetch resumes the build in {work} (delete it to start over)"
            raise
        _write_manifest(p, work, entry, times)
        retarget_output_makefile(work / "build", entry / "build")
        replace_entry(work, entry, progress)
    return _load_checked(entry, p.spec)


def replace_entry(work: Path, entry: Path, progress=None):
    """Rename the finished *work* tree to *entry*. An old entry is renamed aside
    first and removed after: a kill leaves the old entry, the new one, or none (the
    next fetch resumes in *work*), never a half-removed entry that looks whole."""
    old = entry.with_name(f".old-{entry.name}")
    shutil.rmtree(old, ignore_errors=True)      # left by a replacement that was killed
    if entry.exists():
        if progress:
            progress(f"replacing {entry}")
        entry.rename(old)
    work.rename(entry)
    shutil.rmtree(old, ignore_errors=True)


def get(spec: str, *, fetch_missing: bool = True, progress=None, listing: bool = True):
    if fetch_missing:
        return fetch(spec, progress=progress, listing=listing)
    p = plan(spec)
    entry = kernels_dir() / p.release
    if not (entry / MANIFEST).is_file():
        raise KernelError(f"custom kernel {p.release} is not in the cache",
                          hint=f"build it: `invoke fetch-kernel --kernel={p.spec}`")
    return _load_checked(entry, p.spec, listing)


def info(release: str) -> dict | None:
    """The source info of a cached build (None for Debian kernels)."""
    path = kernels_dir() / release / SOURCE_INFO
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
