"""The checks of `invoke doctor` that need the kit's own modules (the cache, the
build roots, the guest image, the accelerator probe). nflab/doctor.py runs them
when the kit's Python packages are installed, and says so when they are not."""

from __future__ import annotations

import os
from pathlib import Path

from ground import debarchive
from ground.errors import VMError
from nflab.doctor import FAIL, OK, WARN, Check
from supply import buildroot, kernels
from vm import initramfs, lab, qemu, rootfs


def run_all() -> list[Check]:
    return check_archive_and_busybox() + check_xtables() + check_compiler() + check_kvm() + check_cache()


def check_archive_and_busybox() -> list[Check]:
    keyring = debarchive.default_keyring()
    out = [Check("Debian archive keyring", OK if keyring.is_file() else FAIL, str(keyring),
                 "" if keyring.is_file() else "apt-get install debian-archive-keyring "
                 "(or set NFLAB_DEBIAN_KEYRING)")]
    try:        # the very lookup the initramfs makes: a static one in /bin or /usr/bin
        out.append(Check("tool busybox (static)", OK, str(initramfs._busybox())))
    except VMError as exc:
        out.append(Check("tool busybox (static)", FAIL, exc.message,
                         "apt-get install busybox-static (it replaces Debian's dynamically "
                         "linked busybox)"))
    return out


def _made_root(release: str, extra=()) -> "buildroot.BuildRoot | None":
    """A build root already in the cache (the doctor never makes one)."""
    key, _ = buildroot.recipe(release, extra)
    return buildroot._load(buildroot.roots_dir() / key, release)


def check_xtables() -> list[Check]:
    """Plugins are built against the guest userland's libxtables, in its build root;
    the guest image of today's recipe must have the same one."""
    userland = buildroot.userland()
    root = _made_root(userland)
    if root is None:
        return [Check("libxtables", WARN, f"the {userland} build root is not made yet",
                      "made at the first build (or run .ci/setup)"),
                Check("guest libxtables", WARN, "no build root and guest rootfs yet",
                      "invoke rootfs (vm-up builds it too)")]
    version = root.packages.get(rootfs.XTABLES_PKG, "?")
    checks = [Check("libxtables", OK, f"{version} in the {userland} build root")]
    guest = rootfs.guest_xtables_version()
    if guest is None:
        checks.append(Check("guest libxtables", WARN, f"no {userland} guest rootfs for it yet",
                            "invoke rootfs (vm-up builds it too)"))
    elif guest != version:
        checks.append(Check("guest libxtables", FAIL, f"guest has {guest}, build root {version}",
                            "rebuild the rootfs: invoke rootfs --rebuild"))
    else:
        checks.append(Check("guest libxtables", OK, f"{guest} (plugins built for it load there)"))
    return checks


def check_compiler() -> list[Check]:
    """Each cached kernel: the compiler its headers name, in its release's build root."""
    checks = []
    for k in kernels.cached_kernels():
        compiler = k.compiler
        root = _made_root(k.build_release)
        if root is not None and not root.has(compiler):
            root = _made_root(k.build_release, [compiler])
        if root is None:
            checks.append(Check(f"{compiler} for {k.release}", WARN,
                                f"the {k.build_release} build root is not made yet",
                                f"made at the first build (`invoke fetch-kernel --kernel={kernels.exact_spec(k)}`)"))
            continue
        checks.append(Check(f"{compiler} for {k.release}", OK,
                            f"in the {root.release} build root ({root.path.parent.name})"))
    return checks


def check_kvm() -> list[Check]:
    if not os.path.exists("/dev/kvm"):
        return [Check("accelerator", WARN, "/dev/kvm absent: TCG (software) only",
                      "fine for the lab; enable virtualisation for speed")]
    accel = qemu.cached_accel()
    if accel:
        return [Check("accelerator", OK if accel[0] == "kvm" else WARN, f"{accel[0]} ({accel[1]})",
                      "" if accel[0] == "kvm" else "KVM probe failed; the kit uses TCG")]
    if qemu.on_pvm():
        return [Check("accelerator", WARN, qemu.PVM_REASON,
                      "fine for the lab: the kit uses TCG here (NFLAB_ACCEL=kvm forces KVM)")]
    return [Check("accelerator", OK, "/dev/kvm present; probed (with a timeout) at first vm-up")]


def _refetch(k) -> str:
    """The command that replaces a cached kernel entry: a Debian kernel by its ABI and
    flavour (any flavour, rt included), a kernel built from source by its release."""
    return f"invoke fetch-kernel --kernel={kernels.exact_spec(k)} --force"


def check_cache() -> list[Check]:
    checks = []
    try:
        cached = kernels.cached_kernels()
        checks.append(Check("kernels cached", OK if cached else WARN,
                            ", ".join(k.release for k in cached) or "none",
                            "" if cached else "invoke fetch-kernel --kernel=6.12"))
        for k in cached:
            missing = [p for p in (k.vmlinuz, k.headers, k.config) if not os.path.exists(p)]
            if missing:
                checks.append(Check(f"kernel {k.release}", FAIL, f"missing {missing}", _refetch(k)))
            else:
                # the entry against what its fetch or build recorded (listing, vmlinuz
                # hash, the headers Makefile's references)
                problem = kernels.check_entry(Path(k.root).parent)
                if problem:
                    checks.append(Check(f"kernel {k.release}", FAIL, f"damaged: {problem}", _refetch(k)))
    except Exception as exc:
        checks.append(Check("kernels cached", WARN, f"cannot read cache: {exc}"))
    try:
        running = [s for s in lab.all_states() if lab.is_running(s)]
        checks.append(Check("running VMs", OK, ", ".join(f"{s.name} ({s.release}, ssh {s.ports.get('ssh') if isinstance(s.ports, dict) else ''})" for s in running) or "none"))
    except Exception:
        pass
    return checks
