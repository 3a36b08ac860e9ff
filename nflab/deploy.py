"""Install an extension into a running lab VM: build it for the VM's kernel,
check the build against the guest, and hand it to the lab to load and prove.

The build (kmods/, userspace_ext/) and the lab (vm/) never import each other;
this module joins them. It builds each extension for the VM's exact kernel
release and checks it against the guest *before* anything is copied: vermagic
against the guest's ``uname -r``, the plugin's recorded libxtables version
against the guest's ``libxtables12``. The lab (:mod:`vm.install`) then copies
and loads what it is given (the build's :class:`kmods.build.Artifacts`, which
satisfy :class:`vm.install.Built`) and proves each module is the kit's build.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ground.errors import NflabError
from kmods.build import build_extension
from kmods.spec import definition_path
from supply import kernels
from userspace_ext import plugin
from vm import install as lab_install
from vm import lab
from vm.install import XTABLES_PKG, Installed


def check_plugin_xtables(so: Path, guest_version: str, where: str, *, name: str = "NAME"):
    """Refuse *so* if the libxtables it was built against is not *where*'s.

    *guest_version* is the guest's ``libxtables12`` package version (``-`` when it
    has none); the plugin's is the one its build recorded beside it."""
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


def guest_files(name: str) -> dict:
    """Extra files an extension needs in the guest (e.g. geoip's database).

    A catalog folder may hold ``guest_files.py`` with ``files() -> {guest path:
    bytes}``; a value may also be ``(bytes, mode)`` (pktlog's listener: 0o755)."""
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
    for path, value in out.items():
        if not path.startswith("/") or ".." in path.split("/"):
            raise NflabError(f"{hook}: guest path {path!r} must be absolute, without ..",
                             hint="return paths like /etc/nflab/<file> from files()")
        if isinstance(value, tuple) and not (len(value) == 2 and isinstance(value[1], int)
                                             and 0 <= value[1] <= 0o777):
            raise NflabError(f"{hook}: {path}: a tuple must be (bytes, mode 0..0o777)",
                             hint="give the file as bytes, or as (bytes, 0o755) for a script")
    return out


def _key(name) -> str:
    """The name an extension (catalog name or kmods.spec.Extension) goes by in *params*."""
    return name if isinstance(name, str) else getattr(name, "name", name)


def _plan(name, vm: str, kernel, guest_release: str, guest_xtables: str, params: dict | None,
          kernel_spec: str) -> lab_install.Plan:
    """Build *name* for *kernel* and check it against the guest before anything is
    copied: vermagic against ``uname -r``, the plugin's libxtables against the guest's."""
    art = build_extension(name, kernel)
    magic = art.vermagic.split()[0] if art.vermagic else ""
    if magic != guest_release:
        raise NflabError(f"{art.ko.name} was built for {magic!r} but VM {vm!r} runs {guest_release!r}; "
                         "refusing to insmod", hint=f"invoke build-module --name={art.name} --kernel={kernel_spec}")
    if art.so:
        check_plugin_xtables(art.so, guest_xtables, f"VM {vm!r}", name=art.name)
    return lab_install.plan(art, guest_files(art.name) if isinstance(name, str) else {}, params)


def install_many(names: list, vm: str = "default", *, params: dict | None = None, progress=None,
                 timeout: float = 60) -> list[Installed]:
    """Build the extensions *names* (catalog names or kmods.spec.Extension objects,
    e.g. workshop exercises) for VM *vm*'s kernel, load them there in order and
    prove each is the kit's build; *params* maps a name to its module parameters.

    Every extension is built and checked before anything is copied; then all
    files go in one tar stream and all loads in one script: two SSH round trips
    however many extensions. The first load that fails stops the rest and is
    named in the error."""
    state = lab.require(vm)
    kernel = kernels.by_release(state.release)
    guest_release, guest_xtables = lab_install.guest_facts(vm, state)
    plans = [_plan(name, vm, kernel, guest_release, guest_xtables, (params or {}).get(_key(name)),
                   state.spec or guest_release) for name in names]
    return lab_install.load(plans, vm, guest_release, progress=progress, timeout=timeout)


def install(name, vm: str = "default", *, params: dict | None = None, progress=None,
            timeout: float = 60) -> Installed:
    """Build *name* (a catalog name or a kmods.spec.Extension, e.g. a workshop
    exercise) for VM *vm*'s kernel, load it there (with module *params*), prove it."""
    return install_many([name], vm, params={_key(name): params} if params else None,
                        progress=progress, timeout=timeout)[0]
