"""`invoke doctor`: what this machine has, what it lacks, and how to fix it."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ground import debarchive
from ground.errors import VMError
from ground.paths import cache_dir
from supply import buildroot, kernels
from vm import initramfs, lab, qemu, rootfs

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def _cmd(argv, timeout=10) -> tuple[int, str]:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return 127, ""
    except subprocess.TimeoutExpired:
        return 124, ""
    return res.returncode, (res.stdout + res.stderr).strip()


def check_tools() -> list[Check]:
    """Host tools the kit calls (compilers and libxtables come from the build roots)."""
    tools = {
        "bwrap": "apt-get install bubblewrap (compilers run inside per-release build roots)",
        "gpgv": "apt-get install gpgv (checks Debian's signed InRelease files)",
        "modinfo": "apt-get install kmod", "depmod": "apt-get install kmod",
        "cpio": "apt-get install cpio", "mke2fs": "apt-get install e2fsprogs",
        "debootstrap": "apt-get install debootstrap (the guest rootfs)",
        "qemu-system-x86_64": "apt-get install qemu-system-x86", "ssh": "apt-get install openssh-client",
        "xz": "apt-get install xz-utils", "zstd": "apt-get install zstd",
        "file": "apt-get install file (tells a static busybox from a dynamic one)",
    }
    out = []
    for tool, fix in tools.items():
        path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
        out.append(Check(f"tool {tool}", OK if path else FAIL, path or "not found", "" if path else fix))
    keyring = debarchive.default_keyring()
    out.append(Check("Debian archive keyring", OK if keyring.is_file() else FAIL, str(keyring),
                     "" if keyring.is_file() else "apt-get install debian-archive-keyring "
                     "(or set NFLAB_DEBIAN_KEYRING)"))
    try:        # the very lookup the initramfs makes: a static one in /bin or /usr/bin
        out.append(Check("tool busybox (static)", OK, str(initramfs._busybox())))
    except VMError as exc:
        out.append(Check("tool busybox (static)", FAIL, exc.message,
                         "apt-get install busybox-static (it replaces Debian's dynamically "
                         "linked busybox)"))
    return out


def check_python() -> list[Check]:
    out = []
    for mod, pkg in (("invoke", "invoke"), ("jinja2", "jinja2"), ("testinfra", "pytest-testinfra"),
                     ("scapy", "scapy"), ("rich", "rich"), ("pytest", "pytest"),
                     ("hypothesis", "hypothesis")):
        try:
            m = __import__(mod)
            out.append(Check(f"python {mod}", OK, getattr(m, "__version__", "installed")))
        except ImportError:
            out.append(Check(f"python {mod}", FAIL, "missing", f"pip install -e . (or pip install {pkg})"))
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
                                f"made at the first build (`invoke fetch-kernel --kernel={k.release}`)"))
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
    return [Check("accelerator", OK, "/dev/kvm present; probed (with a timeout) at first vm-up")]


def check_disk() -> list[Check]:
    base = cache_dir()
    probe = base
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 2**30
    status = OK if free >= 4 else (WARN if free >= 2 else FAIL)
    return [Check("disk space", status, f"{free:.1f} GiB free for {base}",
                  "" if status == OK else "the caches need ~3 GiB: free space or set NFLAB_CACHE")]


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


def run_all() -> list[Check]:
    return (check_tools() + check_python() + check_xtables() + check_compiler() + check_kvm()
            + check_disk() + check_cache())


def main() -> int:
    """`python3 -m nflab.doctor`: works before setup, when invoke is not installed yet."""
    checks = run_all()
    width = max(len(c.name) for c in checks)
    for c in checks:
        fix = f"  -> {c.fix}" if c.fix else ""
        print(f"{c.status:4}  {c.name:<{width}}  {c.detail}{fix}")
    failed = [c for c in checks if c.status == FAIL]
    if failed:
        print(f"{len(failed)} check(s) block the lab; `bash .ci/setup` installs everything")
        return 1
    print("doctor: the lab is ready")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
