"""Install an extension into a running lab VM and prove it is the kit's build.

Order matters and every step is checked: build for the VM's exact kernel
release, compare vermagic with the guest's ``uname -r`` and the plugin's
recorded libxtables version with the guest's *before* anything is copied or
loaded, copy ``.ko`` and ``.so``, ``modprobe`` the stock dependencies, unload
an older or in-tree module of the same name, ``insmod``, put the plugin where
both ``iptables-legacy`` and ``iptables-nft`` look (the guest's xtables dir,
stock plugin kept as ``*.nflab-orig``), and finally read
``/sys/module/<mod>/{taint,srcversion}``: taint ``O`` (out of tree) and the
srcversion of the file we built.
"""

from __future__ import annotations

import importlib.util
import io
import shlex
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from ground.errors import NflabError, VMError

GUEST_DIR = "/root/nflab"
XTLIBDIR = "/usr/lib/x86_64-linux-gnu/xtables"
XTABLES_PKG = "libxtables12"


@dataclass
class Installed:
    name: str
    module: str
    release: str
    taint: str
    srcversion: str
    plugin: str | None


def check_plugin_xtables(so: Path, guest_version: str, where: str, *, name: str = "NAME"):
    """Refuse *so* if the libxtables it was built against is not *where*'s.

    *guest_version* is the guest's ``libxtables12`` package version (``-`` when it
    has none); the plugin's is the one its build recorded beside it."""
    from userspace_ext import plugin

    built = plugin.recorded_xtables_version(so)
    if guest_version in ("", "-"):
        raise NflabError(f"{where} has no {XTABLES_PKG} package: iptables there cannot load "
                         f"{so.name}; refusing to install it",
                         hint="install iptables in the guest (`invoke rootfs --rebuild`)")
    guest = plugin.upstream_version(guest_version)
    if built is None:
        raise NflabError(f"{so.name} has no recorded libxtables version "
                         f"({plugin.version_file(so).name} is missing); refusing to install it in "
                         f"{where}, which has libxtables {guest}",
                         hint=f"rebuild it: `invoke build-module --name={name}`")
    if built != guest:
        raise NflabError(f"{so.name} was built against libxtables {built} but {where} has "
                         f"libxtables {guest} ({XTABLES_PKG} {guest_version}); refusing to install it",
                         hint=f"build the plugin where libxtables is {guest} or give the guest the "
                              f"host's: `invoke rootfs --rebuild`, then `invoke vm-down` and `vm-up`")


def _sh(vm: str, cmd: str, what: str, timeout: float = 60):
    from vm import lab
    res = lab.exec(vm, cmd, timeout=timeout)
    if res.returncode != 0:
        raise VMError(f"{what} failed in VM {vm!r} (exit {res.returncode})",
                      detail=(res.stderr or res.stdout).strip()[-2000:])
    return res.stdout


_facts: dict = {}


def _guest_facts(vm: str, state) -> tuple[str, str]:
    """(kernel release, libxtables package version) of the running VM, asked once
    per VM boot: neither changes while it runs."""
    key = (vm, state.pid, state.started_at)
    if key not in _facts:
        out = _sh(vm, f"uname -r; dpkg-query -W -f='${{Version}}\\n' {XTABLES_PKG} 2>/dev/null || echo -",
                  "uname").split()
        _facts[key] = (out[0], out[1] if len(out) > 1 else "-")
    return _facts[key]


def guest_files(name: str) -> dict[str, bytes]:
    """Extra files an extension needs in the guest (e.g. geoip's database).

    A catalog folder may hold ``guest_files.py`` with ``files() -> {guest path: bytes}``."""
    from kmods.spec import definition_path

    hook = definition_path(name).parent / "guest_files.py"
    if not hook.is_file():
        return {}
    old, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec = importlib.util.spec_from_file_location(f"nflab_guest_files_{name}", hook)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.dont_write_bytecode = old
    out = mod.files()
    for path in out:
        if not path.startswith("/") or ".." in path.split("/"):
            raise NflabError(f"{hook}: guest path {path!r} must be absolute, without ..")
    return out


def _copy_files(vm: str, files: dict[str, bytes]):
    """Ship *files* in one tar stream over the SSH master."""
    from vm import lab

    buf = io.BytesIO()
    # gzip -1: a .ko with its debug info is ~0.5 MB; -9 took 2 s for the catalog's 14
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for path, data in sorted(files.items()):
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
    lab.exec(vm, "tar -xzf - -C /", input=buf.getvalue(), timeout=120, check=True)


def _params(params: dict | None) -> str:
    """insmod's name=value words; values are quoted for the guest shell."""
    words = []
    for key, value in (params or {}).items():
        if not key.isidentifier():
            raise NflabError(f"module parameter {key!r} is not a C identifier")
        if isinstance(value, bool):
            value = int(value)
        words.append(f"{key}={shlex.quote(str(value))}")
    return " ".join(words)


_DONE = "@@NFLAB-INSTALLED"
_FAILED = "@@NFLAB-INSTALL-FAILED"


@dataclass
class _Plan:
    """One extension's part of an install: what to copy and the guest script."""

    art: object
    files: dict
    extra: int
    script: list


def _key(name) -> str:
    """The name an extension (catalog name or kmods.spec.Extension) goes by in *params*."""
    return name if isinstance(name, str) else getattr(name, "name", name)


def _plan(name, vm: str, kernel, guest_release: str, guest_xtables: str, params: dict | None,
          kernel_spec: str) -> _Plan:
    """Build *name* for *kernel* and check it against the guest before anything is
    copied: vermagic against ``uname -r``, the plugin's libxtables against the guest's."""
    from kmods.build import build_extension

    art = build_extension(name, kernel)
    magic = art.vermagic.split()[0] if art.vermagic else ""
    if magic != guest_release:
        raise NflabError(f"{art.ko.name} was built for {magic!r} but VM {vm!r} runs {guest_release!r}; "
                         "refusing to insmod", hint=f"invoke build-module --name={art.name} --kernel={kernel_spec}")
    if art.so:
        check_plugin_xtables(art.so, guest_xtables, f"VM {vm!r}", name=art.name)
    files = {f"{GUEST_DIR}/{art.ko.name}": art.ko.read_bytes()}
    if art.so:
        files[f"{GUEST_DIR}/{art.so.name}"] = art.so.read_bytes()
    extra = guest_files(art.name) if isinstance(name, str) else {}
    files.update(extra)
    mod = art.module
    deps = " ".join(shlex.quote(d) for d in art.deps)
    script = [
        f"for d in {deps}; do modprobe $d; done" if deps else ":",
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
    return _Plan(art, files, len(extra), script)


def install_many(names: list, vm: str = "default", *, params: dict | None = None, progress=None,
                 timeout: float = 60) -> list[Installed]:
    """Build the extensions *names* (catalog names or kmods.spec.Extension objects,
    e.g. workshop exercises) for VM *vm*'s kernel, load them there in order and
    prove each is the kit's build; *params* maps a name to its module parameters.

    Every extension is built and checked before anything is copied; then all
    files go in one tar stream and all loads in one script: two SSH round trips
    however many extensions. The first load that fails stops the rest and is
    named in the error."""
    from supply import kernels
    from vm import lab

    state = lab.require(vm)
    kernel = kernels.get(state.release)
    guest_release, guest_xtables = _guest_facts(vm, state)
    plans = [_plan(name, vm, kernel, guest_release, guest_xtables, (params or {}).get(_key(name)),
                   state.spec or guest_release) for name in names]
    files = {k: v for p in plans for k, v in p.files.items()}
    if progress:
        what = ", ".join(p.art.ko.name + (f" + {p.art.so.name}" if p.art.so else "") for p in plans)
        extra = sum(p.extra for p in plans)
        progress(f"copying {what}{f' and {extra} file(s) they need' if extra else ''} into VM {vm}")
    _copy_files(vm, files)
    script = ["( set -e\n" + "\n".join(p.script) + f"\n) || {{ echo '{_FAILED} {p.art.module}'; exit 1; }}"
              for p in plans]
    res = lab.exec(vm, "\n".join(script), timeout=timeout * len(plans))
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
                      detail=(res.stderr or res.stdout).strip()[-2000:])
    out = []
    for p in plans:
        art, mod = p.art, p.art.module
        taint, srcversion = done.get(mod, ("", ""))
        if "O" not in taint:
            raise VMError(f"{mod} in VM {vm!r} has taint {taint!r} without O: not the kit's module",
                          hint="an in-tree module may be built in; check `modinfo` in the guest")
        if art.srcversion and srcversion != art.srcversion:
            raise VMError(f"{mod} in VM {vm!r} has srcversion {srcversion}, the build has {art.srcversion}")
        out.append(Installed(art.name, mod, guest_release, taint, srcversion, art.plugin))
    return out


def install(name, vm: str = "default", *, params: dict | None = None, progress=None,
            timeout: float = 60) -> Installed:
    """Build *name* (a catalog name or a kmods.spec.Extension, e.g. a workshop
    exercise) for VM *vm*'s kernel, load it there (with module *params*), prove it."""
    return install_many([name], vm, params={_key(name): params} if params else None,
                        progress=progress, timeout=timeout)[0]
