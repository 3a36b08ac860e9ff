"""What an iptables plugin makes of a match's options, without a kernel.

``nflab-xtshow`` (``xtshow.c``) dlopens a plugin with libxtables, parses the
options as iptables' command parser does and prints the plugin's save and
print (``-L``) text and the userspace part of the match data (what
``iptables -C/-D`` compare). Run on the host against the stock plugin and the
kit's, it shows byte for byte where the two differ; no kernel is asked
anything (the plugin is taken from libxtables' pending list, never looked up
by revision, which would query the kernel).
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ground.errors import BuildError
from userspace_ext import plugin

SOURCE = Path(__file__).resolve().parent / "xtshow.c"


@dataclass(frozen=True)
class Shown:
    rc: int          # 0: the plugin took the options; 2: it refused them (error says why)
    save: str        # the text after "-m NAME" in iptables-save
    listing: str     # the text iptables -L prints for the match
    data: str        # hex of the match data's userspace part
    error: str


def binary(cache: Path) -> Path:
    """Compile (once per change of xtshow.c) ``nflab-xtshow`` into *cache*."""
    exe = cache / "nflab-xtshow"
    if exe.is_file() and exe.stat().st_mtime_ns >= SOURCE.stat().st_mtime_ns:
        return exe
    cache.mkdir(parents=True, exist_ok=True)
    cmd = ["gcc", "-O1", "-Wall", "-Werror", *shlex.split(plugin.pkgconfig("--cflags")),
           "-o", str(exe) + ".tmp", str(SOURCE), *shlex.split(plugin.pkgconfig("--libs")), "-ldl"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise BuildError("cannot build nflab-xtshow", detail=res.stderr)
    Path(str(exe) + ".tmp").rename(exe)
    return exe


def stock_plugin(name: str) -> Path:
    """The host's stock plugin of match *name* (``libxt_`` first, then the family ones)."""
    base = Path(plugin.xtlibdir())
    for prefix in ("libxt_", "libipt_", "libip6t_"):
        so = base / f"{prefix}{name}.so"
        if so.is_file():
            return so
    raise BuildError(f"the host has no stock iptables plugin for {name!r} in {base}",
                     hint="apt-get install iptables")


def show(exe: Path, so: Path, name: str, revision: int, family: str, args: list[str]) -> Shown:
    """Parse *args* (the options after ``-m NAME``, ``!`` as its own word) with
    plugin *so* for *family* (``ipv4``/``ipv6``)."""
    fam = {"ipv4": "4", "ipv6": "6"}[family]
    res = subprocess.run([str(exe), str(so), name, str(revision), fam, *args],
                         capture_output=True, text=True, timeout=30)
    if res.returncode not in (0, 2):
        raise BuildError(f"nflab-xtshow cannot use {so} for {name} revision {revision}",
                         detail=(res.stderr or res.stdout).strip())
    fields = {}
    for line in res.stdout.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return Shown(res.returncode, fields.get("save", ""), fields.get("print", ""),
                 fields.get("data", ""), res.stderr.strip())
