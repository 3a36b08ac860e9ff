"""Toolchain build roots: a minimal Debian tree per release, where Kbuild runs.

A kernel's headers name the compiler that built it (``.kernelvariables``:
``CC = $(CROSS_COMPILE)gcc-14``), and its ``linux-kbuild`` binaries (modpost,
fixdep) are linked against the C library of the Debian release that built it.
So the kit compiles for a kernel inside a root of *that* release (bullseye:
gcc-10, bookworm: gcc-12, trixie and its backports: gcc-14, sid and
experimental: gcc-16), and compiles iptables plugins inside the root of the
guest userland's release, against its libxtables. The host's own compiler and
libraries never matter.

A root is the dependency closure of a short package list, resolved over the
release's signed indexes by the kit's own archive client, every ``.deb``
sha256-checked and unpacked (no maintainer scripts; the few links they would
make are made here). It is made once per (release, package set), in a
temporary directory renamed into place under a lock, like the kernel entries:
``$NFLAB_CACHE/buildroots/<release>-<hash>/``.

Commands run in it under bubblewrap (``bwrap``): the root is ``/``, the kernel
cache and the build tree are bound at their own paths, the network is cut. As
root this always works; as another user it needs unprivileged user namespaces
(``sysctl kernel.unprivileged_userns_clone=1`` on Debian).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ground import deb, debarchive
from ground.errors import BuildError
from ground.paths import cache_dir
from ground.proc import file_lock

RECIPE_VERSION = 1
RELEASE_SUITES = {
    "bullseye": ("bullseye", "bullseye-security"),
    "bookworm": ("bookworm", "bookworm-updates", "bookworm-security"),
    "trixie": ("trixie", "trixie-security"),
    "sid": ("sid",),
}
# what Kbuild for an out-of-tree module and an iptables plugin need
PACKAGES = ("bash", "coreutils", "dash", "diffutils", "findutils", "grep", "sed", "tar",
            "gzip", "xz-utils", "mawk", "make", "binutils", "gcc", "libc6-dev", "libelf-dev",
            "bc", "flex", "bison", "dwarves", "pkg-config", "libxtables-dev", "kmod",
            "iptables")   # the userland's stock plugins: what the kit's are compared with
# what a whole kernel build (source: specs) needs on top
KERNEL_BUILD_PACKAGES = ("perl", "cpio", "python3", "libssl-dev", "openssl", "zstd", "rsync")
# links maintainer scripts or alternatives would have made: link -> target
LINKS = {"usr/bin/sh": "dash", "usr/bin/awk": "mawk", "usr/bin/cc": "gcc",
         "usr/bin/which": "which.debianutils",   # bookworm on; coccicheck calls `which spatch`
         "usr/bin/pkg-config": "pkgconf", "usr/bin/yacc": "bison.yacc", "usr/bin/lex": "flex"}
MERGED_USR = ("bin", "sbin", "lib", "lib64")
BWRAP_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: "
              "dnf install bubblewrap); `.ci/setup` installs it")


@dataclass(frozen=True)
class BuildRoot:
    """A made build root: ``path`` is what ``/`` is inside."""

    release: str
    path: Path
    packages: dict

    def has(self, program: str) -> bool:
        return any((self.path / d / program).exists() for d in ("usr/bin", "usr/sbin"))

    def run(self, cmd, *, rw=(), ro=(), cwd=None, env=None, timeout=None,
            capture=True, stdout=None) -> subprocess.CompletedProcess:
        """Run *cmd* inside the root; *rw*/*ro* paths are bound at their own place."""
        return subprocess.run(self.command(cmd, rw=rw, ro=ro, cwd=cwd, env=env),
                              capture_output=capture and stdout is None, stdout=stdout,
                              stderr=subprocess.STDOUT if stdout is not None else None,
                              text=True, timeout=timeout, check=False)

    def command(self, cmd, *, rw=(), ro=(), cwd=None, env=None) -> list[str]:
        """The bwrap command line that runs *cmd* inside the root."""
        bwrap = shutil.which("bwrap")
        if not bwrap:
            raise BuildError("bwrap (bubblewrap) is not installed: the kit runs compilers "
                             "inside a build root with it", hint=BWRAP_HINT)
        args = [bwrap, "--bind", str(self.path), "/", "--dev", "/dev", "--proc", "/proc",
                "--tmpfs", "/tmp", "--unshare-net", "--die-with-parent", "--clearenv"]
        for path in ro:                           # a path not made yet has nothing to see
            if os.path.exists(path):
                args += ["--ro-bind", str(path), str(path)]
        for path in rw:
            if os.path.exists(path):
                args += ["--bind", str(path), str(path)]
        base_env = {"PATH": "/usr/local/bin:/usr/bin:/usr/sbin:/bin:/sbin", "LC_ALL": "C",
                    "HOME": "/tmp", "TMPDIR": "/tmp"}
        for key, value in {**base_env, **(env or {})}.items():
            args += ["--setenv", key, str(value)]
        if cwd:
            args += ["--chdir", str(cwd)]
        return args + ["--", *map(str, cmd)]


def roots_dir() -> Path:
    return cache_dir() / "buildroots"


def recipe(release: str, extra=()) -> tuple[str, list[str]]:
    """(cache key, package list) of a root: the release and its package set."""
    if release not in RELEASE_SUITES:
        raise BuildError(f"no build root for Debian release {release!r}",
                         hint=f"known releases: {', '.join(RELEASE_SUITES)}")
    names = sorted(set(PACKAGES) | set(extra))
    digest = hashlib.sha256(json.dumps([RECIPE_VERSION, release, names]).encode()).hexdigest()
    return f"{release}-{digest[:12]}", names


def ensure(release: str, *, extra=(), progress=None) -> BuildRoot:
    """The build root of *release* with PACKAGES + *extra*, made once (locked, atomic)."""
    key, names = recipe(release, extra)
    entry = roots_dir() / key
    root = _load(entry, release)
    if root:
        return root
    roots_dir().mkdir(parents=True, exist_ok=True)
    with file_lock(roots_dir() / f".{key}.lock"):
        root = _load(entry, release)
        if root:
            return root
        for old in roots_dir().glob(f".tmp-{key}-*"):
            shutil.rmtree(old, ignore_errors=True)   # a killed make: the lock is ours
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=roots_dir()))
        try:
            _make(release, names, tmp, progress)
            tmp.rename(entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _load(entry, release)


def _load(entry: Path, release: str) -> BuildRoot | None:
    try:
        data = json.loads((entry / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not (entry / "root/usr/bin/make").exists():
        return None
    return BuildRoot(release, entry / "root", data.get("packages", {}))


def _make(release: str, names: list[str], tmp: Path, progress):
    archive = debarchive.Archive()
    indexes = [archive.packages(s) for s in RELEASE_SUITES[release]]
    pkgs = debarchive.closure(indexes, names)
    root = tmp / "root"
    (root / "usr").mkdir(parents=True)
    for name in MERGED_USR:
        (root / "usr" / name).mkdir()
        (root / name).symlink_to(f"usr/{name}")
    if progress:
        progress(f"build root {release}: unpacking {len(pkgs)} packages")
    for pkg in pkgs:
        deb.extract(archive.download(pkg), root)
    _fix_links(root)
    for d in ("tmp", "proc", "dev", "etc"):
        (root / d).mkdir(exist_ok=True)
    made = BuildRoot(release, root, {p.name: p.version for p in pkgs})
    _check(made)
    (tmp / "manifest.json").write_text(json.dumps(
        {"release": release, "recipe": names, "packages": made.packages}, indent=2) + "\n")


def _fix_links(root: Path):
    for link, target in LINKS.items():
        path = root / link
        if not os.path.lexists(path) and (path.parent / target).exists():
            path.symlink_to(target)


def _check(root: BuildRoot):
    """The root runs make and its gcc, or it is not kept."""
    for cmd in (["make", "--version"], ["gcc", "--version"], ["pkg-config", "--modversion", "xtables"]):
        res = root.run(cmd)
        if res.returncode != 0:
            raise BuildError(f"the new {root.release} build root cannot run `{' '.join(cmd)}`",
                             detail=(res.stdout or "") + (res.stderr or ""),
                             hint="report it: a package the root needs may be missing from "
                                  "supply/buildroot.py PACKAGES")


def for_kernel(kernel, *, extra=(), progress=None) -> BuildRoot:
    """The root that compiles modules for *kernel* (its release, its compiler): the
    release's plain root (plus *extra* packages) when its default gcc is the one,
    else one with that gcc added."""
    compiler = kernel.compiler
    root = ensure(kernel.build_release, extra=extra, progress=progress)
    if not root.has(compiler) and compiler.startswith("gcc-"):
        root = ensure(kernel.build_release, extra=[*extra, compiler], progress=progress)
    if not root.has(compiler):
        raise BuildError(f"the {root.release} build root has no {compiler}, which the headers "
                         f"of {kernel.release} ask for",
                         hint="that compiler is not in the release the kernel came from")
    return root


USERLANDS = {"bookworm": "iptables 1.8.9", "trixie": "iptables 1.8.11"}
DEFAULT_USERLAND = "bookworm"


def userland(name: str | None = None) -> str:
    """The guest userland's Debian release: *name*, else $NFLAB_USERLAND, else bookworm."""
    chosen = (name or os.environ.get("NFLAB_USERLAND") or DEFAULT_USERLAND).strip()
    if chosen not in USERLANDS:
        raise BuildError(f"unknown guest userland {chosen!r}",
                         hint="use " + " or ".join(f"{k} ({v})" for k, v in USERLANDS.items()))
    return chosen


USERLAND_HELP = ("guest userland: bookworm (iptables 1.8.9, default) or trixie (iptables 1.8.11); "
                 "also $NFLAB_USERLAND")


def use_userland(name: str | None) -> str:
    """Choose the guest userland for this process and its children (``--userland``)."""
    chosen = userland(name)
    os.environ["NFLAB_USERLAND"] = chosen
    return chosen
