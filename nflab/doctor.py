"""`invoke doctor`: what this machine has, what it lacks, and how to fix it.

This module needs nothing but Python's standard library and the kit's ground
layer, so `python3 -m nflab.doctor` runs on a fresh machine before setup; the
checks that need the kit's packages live in nflab/doctor_kit.py."""

from __future__ import annotations

import importlib
import os
import shutil
from dataclasses import dataclass

from ground.paths import cache_dir

OK, WARN, FAIL = "ok", "warn", "FAIL"
SBIN = "/usr/sbin:/sbin"     # where Debian puts depmod, mke2fs, debootstrap: on root's PATH only


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


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
    return [_tool(tool, fix) for tool, fix in tools.items()]


def _tool(tool: str, fix: str) -> Check:
    """The kit runs *tool* by name: found on PATH is ok; only in an sbin directory
    (a normal user's PATH on Debian) is not, since the kit would not find it."""
    path = shutil.which(tool)
    if path:
        return Check(f"tool {tool}", OK, path)
    sbin = shutil.which(tool, path=SBIN)
    if sbin:
        return Check(f"tool {tool}", FAIL, f"{sbin} is not on PATH",
                     "run the kit as root (the quickstart does), or add /usr/sbin:/sbin to PATH")
    return Check(f"tool {tool}", FAIL, "not found", fix)


def check_python() -> list[Check]:
    out = []
    for mod, pkg in (("invoke", "invoke"), ("jinja2", "jinja2"), ("testinfra", "pytest-testinfra"),
                     ("scapy", "scapy"), ("rich", "rich"), ("pytest", "pytest"),
                     ("hypothesis", "hypothesis")):
        try:
            m = __import__(mod)
            out.append(Check(f"python {mod}", OK, getattr(m, "__version__", "installed")))
        except ImportError:
            out.append(Check(f"python {mod}", FAIL, "missing",
                             f"bash .ci/setup (the project venv .venv with {pkg} and the rest), "
                             "then run the kit with .venv/bin/invoke"))
    return out


def check_disk() -> list[Check]:
    base = cache_dir()
    probe = base
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 2**30
    status = OK if free >= 4 else (WARN if free >= 2 else FAIL)
    return [Check("disk space", status, f"{free:.1f} GiB free for {base}",
                  "" if status == OK else "the caches need ~3 GiB: free space or set NFLAB_CACHE")]


def check_kit() -> list[Check]:
    """The checks that need the kit's packages; one failed check when they are
    missing (before setup, `python3 -m nflab.doctor` with the system Python)."""
    try:        # imported here, not at the top: this module must load without them
        kit = importlib.import_module("nflab.doctor_kit")
    except ImportError as exc:
        return [Check("kit modules", FAIL, f"cannot load them: {exc}",
                      "bash .ci/setup (then .venv/bin/invoke doctor checks the cache, build roots and guest)")]
    return kit.run_all()


def run_all() -> list[Check]:
    return check_tools() + check_python() + check_disk() + check_kit()


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
