"""Tasks of the lab VM: kernels, rootfs, vm-up/exec/ssh/status/down, install."""

from __future__ import annotations

import sys

from invoke import Exit, task

from cli import SNAPSHOT_HELP, one_of, snapshot_flag
from ground.errors import SpecError
from ground.output import Progress, friendly, table
from supply import buildroot

VM_HELP = "VM name (default `default`); several named VMs can run at once"


@task(help={"all": "every ABI Debian serves, not only the newest of each line",
            "refresh": "ask the mirror again even if the cached index is fresh"})
@friendly
def kernels(c, all=False, refresh=False):
    """List kernels: line, ABI, suite, compiler, flavours, what is cached; newest first."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from supply import debian_kernels as dk
    from supply import kernels as k

    if refresh:
        dk.offers(refresh=True)
    rows = [[r["line"], r["abi"], r["suite"], r["compiler"], " ".join(r["flavours"]),
             " ".join(r["cached"])] for r in k.table_rows(every=all)]
    table(["line", "abi", "suite", "compiler", "flavours", "cached"], rows)
    print(f"groups: lts = {', '.join(dk.group('lts', dk.offers()))}; stable = "
          f"{dk.group('stable', dk.offers())[0]}; supported = lts + stable + rc")


@task(help={"kernel": "a line Debian serves with headers (5.10, 6.1, 6.12, 7.3; `invoke kernels` "
                      "lists them), rc, an exact ABI (6.12.118+deb13), optionally -amd64/-rt-amd64 "
                      "(default 6.12); source:LINE[+debug|+FILE] builds one from Debian's linux-source",
            "kernels": "several: a comma list of specs and groups (lts, stable, rc, supported)",
            "config_fragment": "with --kernel=source:LINE: a Kconfig fragment merged over the kit's "
                               "base config (e.g. vm/configs/debug.config)",
            "force": "re-download (or rebuild) even if cached", "quiet": "no progress display"})
@friendly
def fetch_kernel(c, kernel=None, kernels=None, config_fragment=None, force=False, quiet=False):
    """Download and unpack a Debian kernel (image, headers, kbuild) and make its toolchain
    build root, or build one from linux-source with a config fragment, into the cache."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from supply import kernels as k
    from supply import source_kernels as sk

    one_of(kernel=kernel, kernels=kernels)
    specs = k.expand(kernels) if kernels else [sk.with_fragment_file(kernel, config_fragment)]
    with Progress(quiet) as progress:
        for spec in specs:
            kern = k.fetch(spec, progress=progress, force=force)
            root = buildroot.for_kernel(kern, progress=progress)
            print(f"{kern.release}: vmlinuz {kern.vmlinuz}")
            print(f"{kern.release}: headers {kern.headers} ({kern.compiler} in the "
                  f"{root.release} build root)")
            built = sk.info(kern.release)
            if built:
                print(f"{kern.release}: from {built['package']} {built['version']}, fragment "
                      f"{built['fragment_hash']}; use --kernel={built['spec']} or "
                      f"--kernel={kern.release}")


@task(help={"rebuild": "rebuild even if the cached image matches the recipe", "quiet": "no progress display",
            "userland": buildroot.USERLAND_HELP})
@friendly
def rootfs(c, rebuild=False, quiet=False, userland=None):
    """Build (once) the guest root filesystem image: Debian minbase + lab tools."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from vm import rootfs as r

    buildroot.use_userland(userland)

    with Progress(quiet) as progress:
        img = r.ensure(rebuild=rebuild, progress=progress)
    print(img)


@task(help={"kernel": "kernel spec (default 6.12)", "vm": VM_HELP,
            "replace": "stop a running VM of that name with another kernel first",
            "snapshot": SNAPSHOT_HELP,
            "userland": buildroot.USERLAND_HELP})
@friendly
def vm_up(c, kernel=None, vm="default", replace=False, snapshot=True, userland=None):
    """Restore (or boot) a kernel's guest in QEMU; returns when SSH answers; last line: testinfra host spec."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from vm import lab

    buildroot.use_userland(userland)

    state = lab.up(kernel, vm, replace=replace, snapshot=snapshot_flag(snapshot),
                   progress=lambda m: print(m, file=sys.stderr))
    if state.boot_seconds:
        how = "restored" if state.restored_from else "booted"
        print(f"VM {vm} {how} and ready in {state.boot_seconds:.2f}s "
              f"({state.accel}, {state.machine})", file=sys.stderr)
    print(state.testinfra_spec)


@task(help={"cmd": "shell command to run in the guest", "vm": VM_HELP,
            "timeout": "seconds before the command is abandoned"})
@friendly
def vm_exec(c, cmd, vm="default", timeout=None):
    """Run a command in the guest; exit with its status."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from vm import lab

    try:
        seconds = float(timeout) if timeout else None
    except ValueError:
        raise SpecError(f"--timeout={timeout!r} is not a number of seconds",
                        hint="e.g. --timeout=30") from None
    res = lab.exec(vm, cmd, timeout=seconds, capture=False)
    if res.returncode != 0:
        raise Exit(code=res.returncode)


@task(help={"vm": VM_HELP})
@friendly
def vm_ssh(c, vm="default"):
    """Open an interactive shell in the guest."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from vm import lab

    raise Exit(code=lab.ssh_interactive(vm))


@task(help={"vm": VM_HELP})
@friendly
def vm_down(c, vm="default"):
    """Stop a VM (no QEMU is left running)."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from vm import lab

    print(f"VM {vm}: {'stopped' if lab.down(vm) else 'was not running'}")


@task(help={"vm": "only this VM"})
@friendly
def vm_status(c, vm=None):
    """Show the kit's VMs: kernel, state, ports, accelerator."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from vm import lab

    rows = lab.status(vm)
    if not rows:
        print("no VMs")
        return
    keys = list(rows[0].keys())
    table(keys, [[r.get(k, "") for k in keys] for r in rows])


@task(help={"name": "extension to install", "vm": VM_HELP,
            "kernel": "boot this kernel first if the VM is not running (it is then left running)"})
@friendly
def install(c, name, vm="default", kernel=None):
    """Copy the extension's .ko and .so into the VM (booted first if it is not running),
    load it, prove it is the kit's."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from kmods import spec
    from nflab import deploy
    from vm import lab

    spec.load(name)                     # a wrong --name fails before any VM boots
    state = lab.load(vm)
    if state is None or not lab.is_running(state):
        lab.up(kernel, vm, progress=lambda m: print(m, file=sys.stderr))
    done = deploy.install(name, vm, progress=lambda m: print(m, file=sys.stderr))
    print(f"{done.module} loaded in VM {vm} ({done.release}): taint {done.taint}, "
          f"srcversion {done.srcversion}" + (f"; iptables plugin libxt_{done.plugin}.so installed"
                                              if done.plugin else ""))


TASKS = [kernels, fetch_kernel, rootfs, vm_up, vm_exec, vm_ssh, vm_down, vm_status, install]
