"""Build and inspect iptables plugins (``libxt_NAME.so``) against libxtables.

The plugin is compiled from the same build directory as the kernel module,
including the same shared header, inside the build root of the guest
userland's Debian release (``supply.buildroot``; ``NFLAB_USERLAND``, default
bookworm), with the flags that root's ``pkg-config xtables`` gives. So the
plugin is built against exactly the libxtables the guest's iptables loads, and
the host's libxtables never matters. The version it was built against is
recorded beside it (``libxt_NAME.xtables-version``); a change of userland
rebuilds it, and ``vm.install`` refuses it in a guest whose libxtables differs.
"""

from __future__ import annotations

import os
import re
import shlex
from functools import lru_cache
from pathlib import Path

from ground.compiler import failure
from ground.errors import BuildError
from ground.paths import build_dir, cache_dir
from supply import buildroot

HERE = Path(__file__).resolve().parent
SHARED_HEADER = HERE / "templates" / "nflab_xt.h"
PROBE_SOURCE = HERE / "probe.c"
CFLAGS = ["-O2", "-g", "-fPIC", "-shared", "-D_GNU_SOURCE", "-Wall", "-Wextra",
          "-Wno-unused-parameter", "-Werror"]


def root(progress=None) -> buildroot.BuildRoot:
    """The build root of the guest userland (made on first use)."""
    return buildroot.ensure(buildroot.userland(), progress=progress)


@lru_cache(maxsize=None)
def _pkgconfig(userland: str, *args: str) -> str:
    res = root().run(["pkg-config", *args, "xtables"])
    if res.returncode != 0:
        raise BuildError(f"pkg-config cannot find xtables in the {userland} build root",
                         detail=res.stdout + res.stderr,
                         hint="delete $NFLAB_CACHE/buildroots and build again")
    return res.stdout.strip()


def pkgconfig(*args: str) -> str:
    return _pkgconfig(buildroot.userland(), *args)


def xtables_version() -> str:
    """The libxtables version (upstream, ``1.8.9``) plugins are built against now."""
    return pkgconfig("--modversion")


def xtlibdir() -> str:
    return pkgconfig("--variable=xtlibdir")


def _binds(*paths: Path) -> list[Path]:
    """Paths the compiler inside the root must see: the build tree and the caches.
    A path elsewhere (``/usr/lib/.../xtables``) is the root's own, not the host's."""
    mine = (build_dir(), cache_dir())
    return sorted({build_dir(), *(p.resolve() for p in paths
                                  if any(p.resolve().is_relative_to(m) for m in mine))})


def stock_plugin(name: str) -> Path:
    """Where the userland's own iptables keeps ``libxt_NAME.so`` (inside its root)."""
    return Path(xtlibdir()) / f"libxt_{name}.so"


def has_stock_plugin(name: str) -> bool:
    return (root().path / stock_plugin(name).relative_to("/")).is_file()


def build(ext, out: Path, *, force: bool = False) -> Path:
    """Compile ``libxt_NAME.so`` in *out*; return its path."""
    src = out / f"{ext.plugin}.c"
    so = out / f"{ext.plugin}.so"
    deps = [src, out / ext.header, out / "nflab_xt.h"]
    if (not force and so.is_file() and all(so.stat().st_mtime_ns >= d.stat().st_mtime_ns for d in deps)
            and recorded_xtables_version(so) == xtables_version()):
        return so
    tmp = Path(str(so) + ".tmp")
    cmd = (["gcc", *CFLAGS, *shlex.split(pkgconfig("--cflags")), f"-I{out}", "-o", str(tmp),
            str(src), *shlex.split(pkgconfig("--libs"))])
    res = root().run(cmd, rw=[*_binds(), out.resolve()], cwd=out)   # out: wherever the build is
    (out / "plugin.log").write_text(" ".join(cmd) + "\n" + res.stdout + res.stderr)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        so.unlink(missing_ok=True)
        raise failure(f"iptables plugin {so.name}", res.stdout + res.stderr, out, out / "plugin.log",
                      dict(ext.c_names()), ext.name_prefixes())
    os.replace(tmp, so)
    version_file(so).write_text(xtables_version() + "\n")
    return so


def version_file(so: Path) -> Path:
    """Where the build records the libxtables version *so* was compiled against."""
    return so.with_suffix(".xtables-version")


def recorded_xtables_version(so: Path) -> str | None:
    """The libxtables version (upstream, e.g. ``1.8.9``) *so* was built against, if recorded."""
    try:
        return version_file(so).read_text().strip() or None
    except OSError:
        return None


def upstream_version(debian_version: str) -> str:
    """``1:1.8.9-2`` -> ``1.8.9``: a Debian package version without epoch and revision."""
    v = debian_version.strip().split(":", 1)[-1]
    return v.rsplit("-", 1)[0] if "-" in v else v


def probe_binary(cache: Path) -> Path:
    """Compile (once per userland) the probe that lists what a plugin registers."""
    exe = cache / f"nflab-xtprobe-{buildroot.userland()}"
    if exe.is_file() and exe.stat().st_mtime_ns >= PROBE_SOURCE.stat().st_mtime_ns:
        return exe
    cache.mkdir(parents=True, exist_ok=True)
    cmd = ["gcc", "-O1", "-Wall", "-Werror", *shlex.split(pkgconfig("--cflags")),
           "-o", str(exe), str(PROBE_SOURCE), *shlex.split(pkgconfig("--libs")), "-ldl"]
    res = root().run(cmd, rw=[*_binds(), cache.resolve()], ro=[HERE])
    if res.returncode != 0:
        raise BuildError("cannot build the plugin probe", detail=res.stdout + res.stderr)
    return exe


_PROBE_RE = re.compile(r"^(?P<kind>match|target) name=(?P<name>\S+) revision=(?P<rev>\d+) "
                       r"family=(?P<family>\d+) size=(?P<size>\d+) userspacesize=(?P<usize>\d+) "
                       r"options=(?P<opts>\S*)$")


def probe(so: Path, cache: Path | None = None) -> list[dict]:
    """What *so* registers when the userland's libxtables loads it (no kernel involved)."""
    cache = cache or cache_dir() / "probe"
    exe = probe_binary(cache)
    res = root().run([str(exe), str(so)], ro=[*_binds(so.parent), cache.resolve()], timeout=30)
    if res.returncode != 0:
        raise BuildError(f"plugin {so} does not load in libxtables {xtables_version()}",
                         detail=(res.stderr or res.stdout).strip())
    return [_registration(m.groupdict()) for m in map(_PROBE_RE.match, res.stdout.splitlines()) if m]


def _registration(d: dict) -> dict:
    return {"kind": d["kind"], "name": d["name"], "revision": int(d["rev"]),
            "family": int(d["family"]), "size": int(d["size"]),
            "userspacesize": int(d["usize"]),
            "options": [o for o in d["opts"].split(",") if o]}
