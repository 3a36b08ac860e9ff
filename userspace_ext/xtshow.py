"""What an iptables plugin makes of a match's options, without a kernel.

``nflab-xtshow`` (``xtshow.c``) dlopens a plugin with libxtables, parses the
options as iptables' command parser does and prints the plugin's save and
print (``-L``) text and the userspace part of the match data (what
``iptables -C/-D`` compare). It is built and run in the build root of the
guest userland (``userspace_ext.plugin.root``), against the stock plugins of
that userland's iptables and the kit's, and shows byte for byte where the two
differ; no kernel is asked anything (the plugin is taken from libxtables'
pending list, never looked up by revision, which would query the kernel).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from ground.errors import BuildError
from ground.paths import cache_dir
from supply import buildroot
from userspace_ext import plugin

SOURCE = Path(__file__).resolve().parent / "xtshow.c"


@dataclass(frozen=True)
class Shown:
    rc: int          # 0: the plugin took the options; 2: it refused them (error says why)
    save: str        # the text after "-m NAME" in iptables-save
    listing: str     # the text iptables -L prints for the match
    data: str        # hex of the match data's userspace part
    error: str


def binary(cache: Path | None = None) -> Path:
    """Compile (once per userland and change of xtshow.c) ``nflab-xtshow`` into
    *cache* (default ``$NFLAB_CACHE/probe``; it must be under the cache or the build tree)."""
    cache = cache or cache_dir() / "probe"
    exe = cache / f"nflab-xtshow-{buildroot.userland()}"
    if exe.is_file() and exe.stat().st_mtime_ns >= SOURCE.stat().st_mtime_ns:
        return exe
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(exe) + ".tmp")
    cmd = ["gcc", "-O1", "-Wall", "-Werror", *shlex.split(plugin.pkgconfig("--cflags")),
           "-o", str(tmp), str(SOURCE), *shlex.split(plugin.pkgconfig("--libs")), "-ldl"]
    res = plugin.root().run(cmd, rw=plugin._binds(cache), ro=[SOURCE.parent])
    if res.returncode != 0:
        raise BuildError("cannot build nflab-xtshow", detail=res.stdout + res.stderr)
    tmp.rename(exe)
    return exe


def show(exe: Path, so: Path, name: str, revision: int, family: str, args: list[str]) -> Shown:
    """Parse *args* (the options after ``-m NAME``, ``!`` as its own word) with
    plugin *so* (a kit build, or ``plugin.stock_plugin(name)``: a path inside
    the root) for *family* (``ipv4``/``ipv6``)."""
    fam = {"ipv4": "4", "ipv6": "6"}[family]
    res = plugin.root().run([str(exe), str(so), name, str(revision), fam, *args],
                            ro=plugin._binds(exe.parent, so.parent), timeout=30)
    if res.returncode not in (0, 2):
        raise BuildError(f"nflab-xtshow cannot use {so} for {name} revision {revision}",
                         detail=(res.stderr or res.stdout).strip())
    fields = {}
    for line in res.stdout.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return Shown(res.returncode, fields.get("save", ""), fields.get("print", ""),
                 fields.get("data", ""), res.stderr.strip())
