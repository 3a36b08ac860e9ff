"""Load built extensions into a running lab VM and prove they are the kit's build.

The lab does not build: :mod:`nflab.deploy` builds each extension for the VM's
exact kernel release, checks it against the guest (:func:`guest_facts`:
``uname -r`` and the ``libxtables12`` version) *before* anything is copied,
and passes the result in as plain data (:class:`Built`; the build's
``kmods.build.Artifacts`` is one). Here: copy ``.ko`` and ``.so``, ``modprobe``
the stock dependencies, unload an older or in-tree module of the same name,
``insmod``, put the plugin where both ``iptables-legacy`` and ``iptables-nft``
look (the guest's xtables dir, stock plugin kept as ``*.nflab-orig``), and
finally read ``/sys/module/<mod>/{taint,srcversion}``: taint ``O`` (out of
tree) and the srcversion of the file that was built.
"""

from __future__ import annotations

import io
import shlex
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ground.errors import SpecError, VMError
from vm import lab
from vm.rootfs import XTABLES_PKG

GUEST_DIR = "/root/nflab"
XTLIBDIR = "/usr/lib/x86_64-linux-gnu/xtables"


class Built(Protocol):
    """What the lab needs of one built extension: the one interface between the
    build and the lab. ``kmods.build.Artifacts`` satisfies it; the lab never
    imports the build, the orchestration (nflab.deploy) passes it in."""

    name: str                # extension name
    module: str              # kernel module name (/sys/module/<module>)
    ko: Path
    so: Path | None          # the iptables plugin, if the extension has one
    plugin: str | None
    deps: list               # stock modules to modprobe first
    srcversion: str          # what /sys/module/<module>/srcversion must say


@dataclass
class Installed:
    name: str
    module: str
    release: str
    taint: str
    srcversion: str
    plugin: str | None


def _sh(vm: str, cmd: str, what: str, timeout: float = 60):
    res = lab.exec(vm, cmd, timeout=timeout)
    if res.returncode != 0:
        raise VMError(f"{what} failed in VM {vm!r} (exit {res.returncode})",
                      detail=(res.stderr or res.stdout).strip()[-2000:],
                      hint=f"the guest's output is above; run it by hand: invoke vm-exec --vm={vm} "
                           f"--cmd={shlex.quote(cmd)}")
    return res.stdout


_facts: dict = {}


def guest_facts(vm: str, state) -> tuple[str, str]:
    """(kernel release, libxtables package version) of the running VM, asked once
    per VM boot: neither changes while it runs."""
    key = (vm, state.pid, state.started_at)
    if key not in _facts:
        out = _sh(vm, f"uname -r; dpkg-query -W -f='${{Version}}\\n' {XTABLES_PKG} 2>/dev/null || echo -",
                  "uname").split()
        _facts[key] = (out[0], out[1] if len(out) > 1 else "-")
    return _facts[key]


def _copy_files(vm: str, files: dict):
    """Ship *files* ({guest path: bytes or (bytes, mode)}) in one tar stream over
    the SSH master."""
    buf = io.BytesIO()
    # gzip -1: a .ko with its debug info is ~0.5 MB; -9 took 2 s for the catalog's 14
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for path, value in sorted(files.items()):
            data, mode = value if isinstance(value, tuple) else (value, 0o644)
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    lab.exec(vm, "tar -xzf - -C /", input=buf.getvalue(), timeout=120, check=True)


def _params(params: dict | None) -> str:
    """insmod's name=value words; values are quoted for the guest shell."""
    words = []
    for key, value in (params or {}).items():
        if not key.isidentifier():
            raise SpecError(f"module parameter {key!r} is not a C identifier",
                            hint="name a parameter the module declares (modinfo -p <module>)")
        if isinstance(value, bool):
            value = int(value)
        words.append(f"{key}={shlex.quote(str(value))}")
    return " ".join(words)


_DONE = "@@NFLAB-INSTALLED"
_FAILED = "@@NFLAB-INSTALL-FAILED"


@dataclass
class Plan:
    """One extension's part of an install: what to copy and the guest script."""

    art: Built
    files: dict
    extra: int
    script: list


def plan(art: Built, extra: dict, params: dict | None) -> Plan:
    """What loading *art* (with module *params*) takes: its files (plus the *extra*
    guest files it needs) and its part of the load script."""
    files = {f"{GUEST_DIR}/{art.ko.name}": art.ko.read_bytes()}
    if art.so:
        files[f"{GUEST_DIR}/{art.so.name}"] = art.so.read_bytes()
    files.update(extra)
    mod = art.module
    deps = " ".join(shlex.quote(d) for d in art.deps)
    script = [
        f"for d in {deps}; do modprobe $d || exit 1; done" if deps else ":",
        # an in-tree or older kit module of the same name must go first
        f"if [ -d /sys/module/{mod} ]; then rmmod {mod}; fi",
        f"insmod {GUEST_DIR}/{art.ko.name} {_params(params)}".rstrip(),
        f'echo "{_DONE} {mod} $(cat /sys/module/{mod}/taint) '
        f'$(cat /sys/module/{mod}/srcversion 2>/dev/null || echo -)"',
    ]
    if art.so:
        so = f"{XTLIBDIR}/{art.so.name}"
        script[:0] = [f"if [ -f {so} ] && [ ! -f {so}.nflab-orig ]; then cp -p {so} {so}.nflab-orig; fi",
                      f"install -m 0644 {GUEST_DIR}/{art.so.name} {so}"]
    return Plan(art, files, len(extra), script)


def load_script(plans: list[Plan]) -> str:
    """One shell script running every plan's lines in order, each plan in a subshell
    that a failing line leaves (``|| exit 1``: ``set -e`` would be ignored in a
    subshell on the left of ``||``); the first plan that fails is named and stops
    the rest."""
    return "\n".join("(\n" + "\n".join(f"{line} || exit 1" for line in p.script)
                     + f"\n) || {{ echo '{_FAILED} {p.art.module}'; exit 1; }}" for p in plans)


def _run_loads(plans: list[Plan], vm: str, timeout: float) -> dict:
    """Run :func:`load_script` in one guest command; {module: (taint, srcversion)}
    of those loaded. The first that fails stops the rest and is named in the error."""
    res = lab.exec(vm, load_script(plans), timeout=timeout * len(plans))
    done = {}
    failed = None
    for line in res.stdout.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == _DONE:
            done[words[1]] = (words[2], words[3] if len(words) > 3 else "-")
        elif len(words) == 2 and words[0] == _FAILED:
            failed = words[1]
    if res.returncode != 0:
        failed = failed or next((p.art.module for p in plans if p.art.module not in done), "?")
        raise VMError(f"loading {failed} failed in VM {vm!r} (exit {res.returncode})",
                      detail=(res.stderr or res.stdout).strip()[-2000:],
                      hint=f"the guest's kernel log says why (an unknown symbol, a refused parameter, "
                           f"a module in use): invoke vm-exec --vm={vm} --cmd='dmesg | tail -30'")
    return done


def _prove(art: Built, vm: str, release: str, taint: str, srcversion: str) -> Installed:
    """*art* as loaded in the guest: taint O (out of tree) and the built srcversion."""
    mod = art.module
    if "O" not in taint:
        raise VMError(f"{mod} in VM {vm!r} has taint {taint!r} without O: not the kit's module",
                      hint="an in-tree module may be built in; check `modinfo` in the guest")
    if art.srcversion and srcversion != art.srcversion:
        raise VMError(f"{mod} in VM {vm!r} has srcversion {srcversion}, the build has {art.srcversion}",
                      hint=f"an older build of {mod} stayed loaded (in use?): `rmmod {mod}` in the guest, "
                           "or start a fresh guest (invoke vm-down, then run again)")
    return Installed(art.name, mod, release, taint, srcversion, art.plugin)


def load(plans: list[Plan], vm: str, release: str, *, progress=None, timeout: float = 60) -> list[Installed]:
    """Copy every plan's files into VM *vm* (kernel *release*) in one tar stream,
    load them in order in one script, and prove each module is the one built."""
    files = {k: v for p in plans for k, v in p.files.items()}
    if progress:
        what = ", ".join(p.art.ko.name + (f" + {p.art.so.name}" if p.art.so else "") for p in plans)
        extra = sum(p.extra for p in plans)
        progress(f"copying {what}{f' and {extra} file(s) they need' if extra else ''} into VM {vm}")
    _copy_files(vm, files)
    done = _run_loads(plans, vm, timeout)
    return [_prove(p.art, vm, release, *done.get(p.art.module, ("", ""))) for p in plans]
