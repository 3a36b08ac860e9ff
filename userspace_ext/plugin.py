"""Build and inspect iptables plugins (``libxt_NAME.so``) against libxtables.

The plugin is compiled from the same build directory as the kernel module,
including the same shared header, with the flags ``pkg-config xtables`` gives.
The libxtables version it was built against is recorded beside it
(``libxt_NAME.xtables-version``); a host whose libxtables changed rebuilds it,
and ``vm.install`` refuses it in a guest whose libxtables differs.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from functools import lru_cache
from pathlib import Path

from ground.errors import BuildError

HERE = Path(__file__).resolve().parent
SHARED_HEADER = HERE / "templates" / "nflab_xt.h"
PROBE_SOURCE = HERE / "probe.c"
CFLAGS = ["-O2", "-g", "-fPIC", "-shared", "-D_GNU_SOURCE", "-Wall", "-Wextra",
          "-Wno-unused-parameter", "-Werror"]


@lru_cache(maxsize=None)
def pkgconfig(*args: str) -> str:
    try:
        res = subprocess.run(["pkg-config", *args, "xtables"], capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise BuildError("pkg-config is not installed",
                         hint="apt-get install pkg-config libxtables-dev") from exc
    if res.returncode != 0:
        raise BuildError("pkg-config cannot find xtables",
                         hint="apt-get install libxtables-dev")
    return res.stdout.strip()


def xtables_version() -> str:
    return pkgconfig("--modversion")


def xtlibdir() -> str:
    return pkgconfig("--variable=xtlibdir")


def build(ext, out: Path, *, force: bool = False) -> Path:
    """Compile ``libxt_NAME.so`` in *out*; return its path."""
    src = out / f"{ext.plugin}.c"
    so = out / f"{ext.plugin}.so"
    deps = [src, out / ext.header, out / "nflab_xt.h"]
    if (not force and so.is_file() and all(so.stat().st_mtime_ns >= d.stat().st_mtime_ns for d in deps)
            and recorded_xtables_version(so) == xtables_version()):
        return so
    cmd = (["gcc", *CFLAGS, *shlex.split(pkgconfig("--cflags")), f"-I{out}", "-o", str(so) + ".tmp",
            str(src), *shlex.split(pkgconfig("--libs"))])
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, LC_ALL="C"))
    (out / "plugin.log").write_text(" ".join(cmd) + "\n" + res.stdout + res.stderr)
    if res.returncode != 0:
        Path(str(so) + ".tmp").unlink(missing_ok=True)
        so.unlink(missing_ok=True)
        from kmods.build import diagnostics
        diags = diagnostics(res.stderr, out)
        raise BuildError(f"iptables plugin {so.name} failed to build",
                         hint=f"full log: {out / 'plugin.log'}",
                         detail="\n".join(diags or res.stderr.strip().splitlines()[-20:]))
    os.replace(str(so) + ".tmp", so)
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
    """Compile (once) the probe that lists what a plugin registers with libxtables."""
    exe = cache / "nflab-xtprobe"
    if exe.is_file() and exe.stat().st_mtime_ns >= PROBE_SOURCE.stat().st_mtime_ns:
        return exe
    cache.mkdir(parents=True, exist_ok=True)
    cmd = ["gcc", "-O1", "-Wall", "-Werror", *shlex.split(pkgconfig("--cflags")),
           "-o", str(exe), str(PROBE_SOURCE), *shlex.split(pkgconfig("--libs")), "-ldl"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise BuildError("cannot build the plugin probe", detail=res.stderr)
    return exe


_PROBE_RE = re.compile(r"^(?P<kind>match|target) name=(?P<name>\S+) revision=(?P<rev>\d+) "
                       r"family=(?P<family>\d+) size=(?P<size>\d+) userspacesize=(?P<usize>\d+) "
                       r"options=(?P<opts>\S*)$")


def probe(so: Path, cache: Path) -> list[dict]:
    """What *so* registers when libxtables loads it (no kernel involved)."""
    exe = probe_binary(cache)
    res = subprocess.run([str(exe), str(so)], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise BuildError(f"plugin {so} does not load in libxtables {xtables_version()}",
                         detail=(res.stderr or res.stdout).strip())
    regs = []
    for line in res.stdout.splitlines():
        m = _PROBE_RE.match(line)
        if m:
            d = m.groupdict()
            regs.append({"kind": d["kind"], "name": d["name"], "revision": int(d["rev"]),
                         "family": int(d["family"]), "size": int(d["size"]),
                         "userspacesize": int(d["usize"]),
                         "options": [o for o in d["opts"].split(",") if o]})
    return regs
