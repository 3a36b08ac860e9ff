"""`invoke doctor`: what this machine has, what it lacks, and how to fix it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from nflab.paths import cache_dir
from vm import qemu, rootfs

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
    tools = {
        "gcc": "apt-get install gcc", "make": "apt-get install make",
        "pkg-config": "apt-get install pkg-config", "modinfo": "apt-get install kmod",
        "depmod": "apt-get install kmod", "cpio": "apt-get install cpio",
        "mke2fs": "apt-get install e2fsprogs", "debootstrap": "apt-get install debootstrap",
        "qemu-system-x86_64": "apt-get install qemu-system-x86", "ssh": "apt-get install openssh-client",
        "pahole": "apt-get install dwarves (BTF for 6.12 modules)",
        "apt-get": "nflab fetches kernels with apt-get: use Debian 12",
        "dpkg": "nflab unpacks kernels with dpkg -x: use Debian 12",
    }
    out = []
    for tool, fix in tools.items():
        path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
        out.append(Check(f"tool {tool}", OK if path else FAIL, path or "not found", "" if path else fix))
    if not os.path.exists("/bin/busybox") and not shutil.which("busybox"):
        out.append(Check("tool busybox (static)", FAIL, "not found", "apt-get install busybox-static"))
    else:
        out.append(Check("tool busybox (static)", OK, shutil.which("busybox") or "/bin/busybox"))
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


def check_xtables() -> list[Check]:
    rc, version = _cmd(["pkg-config", "--modversion", "xtables"])
    if rc != 0:
        return [Check("libxtables", FAIL, "pkg-config cannot find xtables",
                      "apt-get install libxtables-dev pkg-config")]
    _, libdir = _cmd(["pkg-config", "--variable=xtlibdir", "xtables"])
    checks = [Check("libxtables", OK, f"{version}, xtlibdir {libdir}")]
    guest = rootfs.guest_xtables_version()
    if guest is None:
        checks.append(Check("guest libxtables", WARN, "no guest rootfs for this host's libxtables yet",
                            "invoke rootfs (vm-up builds it too)"))
    elif guest != rootfs.host_xtables_version():
        checks.append(Check("guest libxtables", FAIL, f"guest has {guest}, host {rootfs.host_xtables_version()}",
                            "rebuild the rootfs: invoke rootfs --rebuild"))
    else:
        checks.append(Check("guest libxtables", OK, f"{guest} (plugins built here load there)"))
    return checks


def check_compiler() -> list[Check]:
    rc, out = _cmd(["gcc", "--version"])
    if rc != 0:
        return []
    host = out.splitlines()[0]
    checks = []
    try:
        from vm import kernels
        cached = kernels.cached_kernels()
    except Exception:
        cached = []
    for k in cached:
        want = k.config_value("CC_VERSION_TEXT") or ""
        same = re.search(r"\d+\.\d+\.\d+", want) and re.search(r"\d+\.\d+\.\d+", host) and \
            re.search(r"\d+\.\d+", want).group() == re.search(r"\d+\.\d+", host).group()
        checks.append(Check(f"gcc vs {k.release}", OK if same else WARN,
                            f"host: {host}; kernel built with: {want}",
                            "" if same else "install the gcc version the kernel was built with "
                            "(modules built by another major version may fail to load)"))
    if not cached:
        checks.append(Check("gcc", OK, host))
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


def check_cache() -> list[Check]:
    checks = []
    try:
        from vm import kernels
        cached = kernels.cached_kernels()
        checks.append(Check("kernels cached", OK if cached else WARN,
                            ", ".join(k.release for k in cached) or "none",
                            "" if cached else "invoke fetch-kernel --kernel=6.12"))
        for k in cached:
            missing = [p for p in (k.vmlinuz, k.headers, k.config) if not os.path.exists(p)]
            if missing:
                # a Debian kernel is refetched by its ABI, a custom one by its release
                again = k.abi if k.flavour in kernels.FLAVOURS else k.release
                checks.append(Check(f"kernel {k.release}", FAIL, f"missing {missing}",
                                    f"invoke fetch-kernel --kernel={again} --force"))
            elif k.flavour in kernels.FLAVOURS:
                # a Debian entry against what its fetch recorded (listing, vmlinuz hash)
                problem = kernels.check_entry(Path(k.root).parent)
                if problem:
                    checks.append(Check(f"kernel {k.release}", FAIL, f"damaged: {problem}",
                                        f"invoke fetch-kernel --kernel={k.abi}-{k.flavour}"))
    except Exception as exc:
        checks.append(Check("kernels cached", WARN, f"cannot read cache: {exc}"))
    try:
        from vm import lab
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
