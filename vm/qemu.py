"""The QEMU command line, built explicitly as a list (like virtme-ng), plus the
helpers around it that need no running VM: port allocation, the accelerator
probe and the console fault parser.

Machine: ``-M microvm`` by default (no PCI, no firmware tables beyond ACPI,
virtio-mmio devices which the kernel finds through ACPI since the cloud kernels
lack ``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES``); ``NFLAB_MACHINE=pc`` switches to a
trimmed ``-M pc`` with virtio-pci devices and no option ROMs.

Devices, in order (the guest renames NICs by MAC, see ``NICS``):

* virtio-blk ``root``: the rootfs image, ``readonly=on``: the guest mounts it
  read-only under an overlayfs whose upper layer is a tmpfs (every boot starts
  clean, writes live in guest RAM, several VMs share the image, and the disk is
  never written, so a saved VM state stays consistent with it, see
  ``vm/snapshot.py``);
* virtio-blk ``mods``: the kernel's modules image, ``readonly=on``;
* virtio-net ``eth0``: user networking, ``restrict=on`` (the guest cannot reach
  anything but the host's forwarded port), ``hostfwd`` 127.0.0.1:<ssh> -> :22;
* virtio-net ``eth1``/``eth2``: the packet wires, ``-netdev dgram`` UDP sockets on
  127.0.0.1. QEMU listens on ``Wire.guest`` and sends the guest's frames to
  ``Wire.host``; ``vm/wire.py`` binds ``Wire.host`` and sends to ``Wire.guest``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ground.errors import VMError
from ground.paths import cache_dir
from ground.proc import file_lock

QEMU = "qemu-system-x86_64"
MACHINES = ("microvm", "pc")
# -M microvm as the kit runs it: ACPI (the cloud kernels find the virtio-mmio
# devices through it) and no legacy 8259 PIC; the PIT's interrupt goes through
# the IOAPIC. With the PIC, QEMU 10.0 (Debian 13) under TCG delivers an interrupt
# as vector 0 the moment start_kernel first enables interrupts: "Oops: divide
# error" in start_kernel, then QEMU exits 0 with -no-reboot (the kit's cold
# boots failed 6 of 8 there, 0 of 20 without the PIC; QEMU 7.2 boots either way).
MICROVM = "microvm,acpi=on,pic=off"


@dataclass(frozen=True)
class Nic:
    """A guest NIC: its name in the guest, QEMU netdev id and MAC (the guest init
    renames interfaces by MAC, so names do not depend on probe order)."""

    name: str
    netdev: str
    mac: str


SSH_NIC = Nic("eth0", "n0", "52:54:00:00:00:01")
WIRE_NICS = (Nic("eth1", "n1", "52:54:00:00:01:01"), Nic("eth2", "n2", "52:54:00:00:02:01"))
NICS = (SSH_NIC, *WIRE_NICS)
GUEST_ADDR = "10.0.2.15"  # slirp's default guest address, set statically by the guest init


@dataclass
class Wire:
    """The two UDP ports of one packet wire on 127.0.0.1."""

    guest: int  # QEMU binds it: frames sent here come out of the guest NIC
    host: int   # the host side binds it: frames the guest sends arrive here
    mac: str = ""


@dataclass
class Ports:
    ssh: int
    wire: dict[str, Wire] = field(default_factory=dict)  # guest NIC name -> Wire

    def all(self) -> set[int]:
        return {self.ssh} | {p for w in self.wire.values() for p in (w.guest, w.host)}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Ports":
        return cls(ssh=data["ssh"], wire={k: Wire(**v) for k, v in data.get("wire", {}).items()})


# Built-in initcalls the guest kernel skips (initcall_blacklist=), each a start-up
# job no lab guest needs that costs a TCG boot tens of milliseconds of guest CPU.
# Single-threaded TCG runs every vCPU on one host thread, so work a kernel hands
# to a worker "in the background" still delays the boot by all it costs. The kernel
# matches the names against module init functions too, so a name whose code a
# kernel builds as a module (MODULAR_INITCALLS) is not skipped there: the module
# costs nothing at boot unless something loads it, and skipped it would never load.
SKIPPED_INITCALLS = (
    # the jitter-entropy RNG's self-test times memory accesses (~0.06 s); nothing in
    # a lab guest asks for that RNG (the DRBG goes on without it outside FIPS mode,
    # and random.trust_cpu=on seeds the pool from RDRAND)
    "jent_mod_init",
    # ftrace's scan of its ~42 600 call sites for ones left in discarded weak
    # functions (a kallsyms lookup each, ~0.17 s of a 6.12 boot; kernels from 5.19 on):
    # without it, function tracing of a function that holds such a stale site
    # reports an ftrace bug instead of skipping that site
    "ftrace_check_for_weak_functions",
    # rewriting every trace event's format file with the values of the enums it
    # names (~0.19 s): without it the `format` files keep enum names (the kernel's
    # own `trace` output is unaffected; perf and trace-cmd show raw numbers there)
    "trace_eval_init",
    # the SP800-108 key-derivation self-test (~0.02 s): it runs at every boot,
    # since it ignores cryptomgr.notests, and only instantiates hmac(sha256) to
    # check one test vector (a failure would only warn outside FIPS mode)
    "crypto_kdf108_init",
)


# the skipped initcalls whose code may be a module, and the Kconfig symbol that says
# so (=m: jitter-entropy on 5.10, 6.1 and 7.3; the others are bool or built in)
MODULAR_INITCALLS = {
    "jent_mod_init": "CRYPTO_JITTERENTROPY",
    "crypto_kdf108_init": "CRYPTO_KDF800108_CTR",
}


def _modular(name: str, config: dict[str, str]) -> bool:
    """True if *config* ({CONFIG_X: value}) builds the code of initcall *name* as a module."""
    symbol = MODULAR_INITCALLS.get(name)
    return symbol is not None and config.get(f"CONFIG_{symbol}") == "m"


def skipped_initcalls(env: str | None = None, config: dict[str, str] | None = None) -> tuple[str, ...]:
    """``$NFLAB_SKIP_INITCALLS`` (comma-separated; empty: skip none; taken as given),
    else ``SKIPPED_INITCALLS`` less the names whose code *config* (the kernel's
    .config as {CONFIG_X: value}) builds as a module."""
    value = os.environ.get("NFLAB_SKIP_INITCALLS") if env is None else env
    if value is None:
        return tuple(n for n in SKIPPED_INITCALLS if not _modular(n, config or {}))
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    bad = [n for n in names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
    if bad:
        raise VMError(f"NFLAB_SKIP_INITCALLS names {', '.join(map(repr, bad))}, not initcall functions",
                      hint="give C function names separated by commas, e.g. "
                           "NFLAB_SKIP_INITCALLS=jent_mod_init, or an empty value to skip none")
    return names


@dataclass
class LaunchSpec:
    """Everything the QEMU command depends on."""

    name: str
    vmdir: Path
    kernel: Path              # vmlinux (PVH) or vmlinuz
    initrd: Path
    rootfs: Path
    modules_img: Path
    ssh_pubkey: str           # base64 blob of the lab's login public key (lab.ssh_key)
    ports: Ports
    accel: str = "tcg"        # "tcg" or "kvm"
    tcg_thread: str = "single"  # TCG: "single" (one host thread for all vCPUs) or "multi"
    machine: str = "microvm"  # "microvm" or "pc"
    memory: str = "1G"
    smp: int = 2
    tsc_khz: int | None = None  # TCG: the host's TSC rate, see host_tsc_khz()
    extra_cmdline: tuple[str, ...] = ()
    skip_initcalls: tuple[str, ...] = SKIPPED_INITCALLS  # see skipped_initcalls()
    incoming: Path | None = None  # restore this saved VM state instead of booting
    incoming_fd: int | None = None  # ... from this open descriptor (QEMU < 8.2, see _incoming)
    verbose: bool = False     # the kernel's own boot messages on the console (no "quiet")

    @property
    def console_log(self) -> Path:
        return self.vmdir / "console.log"

    @property
    def pidfile(self) -> Path:
        return self.vmdir / "qemu.pid"

    @property
    def qmp_socket(self) -> Path:
        return self.vmdir / "qmp.sock"


# panic=-1: reboot at once on panic, and -no-reboot turns that reboot into a
# QEMU exit, so a dead kernel ends the VM instead of hanging. oops=panic: an
# oops leaves the kernel in an unknown state (held locks, half-done hooks); the
# trace is on the console before the panic, and the kit reports it.
BASE_CMDLINE = (
    "console=ttyS0", "quiet", "panic=-1", "oops=panic", "rdinit=/init",
    # less boot work under TCG: one UART, no PS/2 probing, no crypto self-tests;
    # no speculation mitigations (retpolines, barriers: a lab VM is no security
    # boundary, and they cost ~5% of the guest's CPU time to ready under TCG)
    "8250.nr_uarts=1", "i8042.noaux", "i8042.nomux", "i8042.nopnp", "i8042.dumbkbd",
    "cryptomgr.notests", "mitigations=off", "tsc=reliable", "no_timer_check", "random.trust_cpu=on",
    # no address-space randomisation: TCG caches translated code by virtual address,
    # so with ASLR every exec maps the same libraries elsewhere and translates them
    # all again; without it a process's second start reuses the first one's
    # translations (an exec-heavy loop of iptables/nft/python runs 2x faster)
    "norandmaps",
)


KERNEL_HZ = 250


def kernel_cmdline(spec: LaunchSpec) -> str:
    nics = ",".join(f"{n.name}/{n.mac}" for n in NICS)
    base = [p for p in BASE_CMDLINE if not (spec.verbose and p == "quiet")]
    parts = [*base, f"nflab.key={spec.ssh_pubkey}", f"nflab.nics={nics}"]
    if spec.skip_initcalls:
        parts.append("initcall_blacklist=" + ",".join(spec.skip_initcalls))
    if spec.machine == "microvm":
        parts.append("pci=off")
    # every vCPU comes up at boot: booting on one (maxcpus=1) and onlining the
    # other later was 0.27 s slower to ready on 6.1 and 6.12 under TCG, since the
    # kernel then patches its lock prefixes to UP code at boot and back to SMP
    # code when the second CPU comes online ("SMP alternatives"), each a text
    # patch that throws away translated code
    if spec.tsc_khz:
        parts.append(f"tsc_early_khz={spec.tsc_khz}")
        # loops per jiffy preset from the TSC rate: the secondary CPUs skip their
        # delay-loop calibration, which fails under TCG and then falls back to a
        # slow converging loop (Debian's kernels have HZ=250)
        parts.append(f"lpj={spec.tsc_khz * 1000 // KERNEL_HZ}")
    parts += spec.extra_cmdline
    return " ".join(parts)


def env_choice(var: str, choices: tuple[str, ...], what: str, env: str | None = None) -> str:
    """``$var`` (or *env* when given), stripped, one of *choices*; unset or empty
    means the first. Anything else is an error naming the variable and the choices."""
    value = (os.environ.get(var, "") if env is None else env).strip() or choices[0]
    if value not in choices:
        raise VMError(f"{var}={value!r} is not {what}",
                      hint=f"use one of {', '.join(choices)} (or leave it unset for {choices[0]})")
    return value


SSHDS = ("openssh", "dropbear")


def sshd_choice(env: str | None = None) -> str:
    """The guest's SSH server: ``$NFLAB_SSHD``. ``openssh``, the default, takes
    whatever stock OpenSSH clients send (testinfra's ``host.run`` of a 20 KB
    script); ``dropbear`` starts ~0.2 s faster under TCG but refuses exec
    requests over 9000 bytes (the kit's own commands get around that, see
    ``vm.remote``; a user's suite would not)."""
    return env_choice("NFLAB_SSHD", SSHDS, "an SSH server the guest has", env)


def sshd_cmdline(sshd: str) -> tuple[str, ...]:
    """Kernel command line words that make the guest init start *sshd* (its
    init starts dropbear unless told ``nflab.sshd=openssh``)."""
    return () if sshd == "dropbear" else (f"nflab.sshd={sshd}",)


def first_cpu_info() -> str:
    """The first CPU's block of the host's /proc/cpuinfo ("" if it cannot be read)."""
    try:
        return Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        return ""


def host_tsc_khz(cpuinfo: str | None = None) -> int | None:
    """The host's TSC rate in kHz, which is also the guest's under TCG (QEMU's rdtsc
    reads the host TSC).

    microvm has no HPET or ACPI PM timer, so the guest kernel calibrates its TSC
    against the PIT alone; when the host is busy, the vCPU threads are preempted,
    calibration fails ("tsc: Unable to calibrate against PIT") and the boot hangs.
    ``tsc_early_khz=`` skips that calibration. Source: ``$NFLAB_TSC_KHZ``, else the
    nominal "@ 2.60GHz" of the CPU model name, else "cpu MHz" of /proc/cpuinfo when
    the TSC is constant and the CPU has no APERF/MPERF (in a VM, where "cpu MHz" is
    the TSC rate; on bare metal with APERF/MPERF it is the clock of the moment)."""
    env = os.environ.get("NFLAB_TSC_KHZ")
    if env:
        if not env.strip().isdigit():
            raise VMError(f"NFLAB_TSC_KHZ={env!r} is not a rate in kHz",
                          hint="give whole kHz, e.g. NFLAB_TSC_KHZ=2600000 for 2.6 GHz, or unset it")
        return int(env)
    first = first_cpu_info() if cpuinfo is None else cpuinfo.split("\n\n", 1)[0]
    m = re.search(r"^model name\s*:.*@\s*([\d.]+)\s*GHz", first, re.M)
    if m:
        return int(float(m.group(1)) * 1_000_000)
    flags = re.search(r"^flags\s*:(.*)$", first, re.M)
    mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", first, re.M)
    cpu_flags = set(flags.group(1).split()) if flags else set()
    if mhz and "constant_tsc" in cpu_flags and "aperfmperf" not in cpu_flags:
        return int(float(mhz.group(1)) * 1000)
    return None


def _device(machine: str, kind: str) -> str:
    """virtio-blk-device (mmio, microvm) or virtio-blk-pci (pc)."""
    return f"virtio-{kind}-device" if machine == "microvm" else f"virtio-{kind}-pci"


def _pci_opts(machine: str) -> str:
    # no option ROMs (iPXE) on pc: nothing boots from the network
    return ",romfile=" if machine == "pc" else ""


# TCG runs every vCPU on one host thread by default. With one thread per vCPU
# ("multi", QEMU's default) QEMU 7.2 does not keep cross-modifying code coherent:
# when the kernel flips a static key (a netfilter hook registered or removed:
# nf_hooks_needed, ingress_needed_key) it patches the branch with an int3 and
# IPIs, and a vCPU executing that branch meanwhile later runs a stale
# translation of the int3 ("Oops: int3" on 6.12) or spins in it (soft lockup on
# 6.1). tests/integration/test_soak.py flips those keys 200 times under traffic:
# with "multi" 6.12 oopses within 5 s and 6.1 locks up within 40 s, with
# "single" all 200 cycles pass on both; a CI run saw the same oops while 6.12
# booted. "single" still gives the guest two CPUs (SMP code, per-CPU data,
# races between CPUs at time-slice granularity); it costs ~0.07 s of boot and
# ~1 s of a one-VM iprange cycle, and a run split over two VMs is faster with it
# (2 host threads on 2 cores instead of 4).
TCG_THREADS = ("single", "multi")


def tcg_threading(env: str | None = None) -> str:
    """TCG threading: ``$NFLAB_TCG_THREAD`` (``single``, the default; ``multi`` is
    faster for one VM's CPU-bound work but crashes guests that patch kernel text
    while running, see above)."""
    return env_choice("NFLAB_TCG_THREAD", TCG_THREADS, "a TCG threading mode", env)


def build_command(spec: LaunchSpec, qemu: str = QEMU) -> list[str]:
    """The full QEMU argv for *spec*; a pure function (no I/O)."""
    _check_launch(spec)
    cmd = [
        qemu, "-name", f"nflab-{spec.name}",
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-M", MICROVM if spec.machine == "microvm" else
        "pc,hpet=off,usb=off,vmport=off,smbus=off,sata=off",
        "-accel", "kvm" if spec.accel == "kvm" else f"tcg,thread={spec.tcg_thread}",
        # TCG: the plain qemu64 model (+rdrand so the guest's RNG is ready at once,
        # sshd does not wait for entropy) boots faster than "max", whose AVX paths
        # in glibc and the kernel are slower to emulate
        "-cpu", "host" if spec.accel == "kvm" else "qemu64,+rdrand",
        "-m", spec.memory, "-smp", str(spec.smp),
        "-kernel", str(spec.kernel), "-initrd", str(spec.initrd),
        "-append", kernel_cmdline(spec),
        "-chardev", f"file,id=con,path={spec.console_log}", "-serial", "chardev:con",
        *_disk_args(spec), *_nic_args(spec),
        "-no-reboot",
        # a saved state carries no run state, so a restore starts the guest although
        # it was saved stopped (vm/snapshot.py)
        "-global", "migration.store-global-state=off",
        "-pidfile", str(spec.pidfile),
        "-qmp", f"unix:{spec.qmp_socket},server=on,wait=off",
    ]
    if spec.incoming is not None:
        cmd += ["-incoming", _incoming(spec)]
    return cmd


def _check_launch(spec: LaunchSpec):
    if spec.machine not in MACHINES:
        raise VMError(f"unknown machine type {spec.machine!r}", hint=f"use one of {MACHINES}")
    if spec.accel not in ("tcg", "kvm"):
        raise VMError(f"unknown accelerator {spec.accel!r}", hint="use tcg or kvm")
    if spec.tcg_thread not in TCG_THREADS:
        raise VMError(f"unknown TCG threading {spec.tcg_thread!r}", hint=f"use one of {TCG_THREADS}")


def _disk_args(spec: LaunchSpec) -> list[str]:
    """The read-only root image and the kernel's modules image, in that order."""
    blk = _device(spec.machine, "blk")
    return ["-drive", f"file={spec.rootfs},if=none,id=root,format=raw,readonly=on",
            "-device", f"{blk},drive=root",
            "-drive", f"file={spec.modules_img},if=none,id=mods,format=raw,readonly=on",
            "-device", f"{blk},drive=mods"]


def _nic_args(spec: LaunchSpec) -> list[str]:
    """The SSH NIC (user networking, one forward on 127.0.0.1), then each wire NIC:
    a UDP socket pair on 127.0.0.1 to the host's end of that wire."""
    args = ["-netdev", f"user,id={SSH_NIC.netdev},restrict=on,"
                       f"hostfwd=tcp:127.0.0.1:{spec.ports.ssh}-:22",
            "-device", _nic_device(spec.machine, SSH_NIC)]
    for nic in WIRE_NICS:
        wire = spec.ports.wire[nic.name]
        args += ["-netdev", f"dgram,id={nic.netdev},"
                            f"local.type=inet,local.host=127.0.0.1,local.port={wire.guest},"
                            f"remote.type=inet,remote.host=127.0.0.1,remote.port={wire.host}",
                 "-device", _nic_device(spec.machine, nic)]
    return args


def _nic_device(machine: str, nic: Nic) -> str:
    """The guest NIC of *nic*'s netdev, with its fixed MAC."""
    return f"{_device(machine, 'net')},netdev={nic.netdev},mac={nic.mac}{_pci_opts(machine)}"


def _incoming(spec: LaunchSpec) -> str:
    """A saved state of a VM with this very device layout (ports may differ: the
    user-net forwards and dgram sockets are host-side properties, not state), read
    by QEMU itself: ``file:PATH`` (QEMU 8.2 and later), else ``fd:N`` from a
    descriptor the launcher opened and passed on (QEMU 9.1 deprecates ``fd:`` for
    files). Either way the state runs 0.05 s sooner than through ``exec:cat``: no
    shell, no cat, no pipe for ~90 MB."""
    if spec.incoming_fd is not None:
        return f"fd:{spec.incoming_fd}"
    if "," in str(spec.incoming):
        raise VMError(f"saved state path {spec.incoming} has a comma, which ends a file: URI",
                      hint="set NFLAB_CACHE to a directory without commas")
    return f"file:{spec.incoming}"


FILE_MIGRATION = (8, 2)     # the first QEMU with the file: migration URI


@functools.lru_cache(maxsize=None)
def version(qemu: str = QEMU) -> tuple[int, int]:
    """(major, minor) of *qemu*, from ``--version``; (0, 0) if it cannot say."""
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return (0, 0)
    m = re.search(r"version (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def reads_state_files(qemu: str = QEMU) -> bool:
    """Can *qemu* restore from ``-incoming file:PATH``?"""
    return version(qemu) >= FILE_MIGRATION


# ---------------------------------------------------------------- ports

def free_port(kind: str = "tcp", exclude: set[int] = frozenset()) -> int:
    """A port on 127.0.0.1 that is free now (the kernel picks it) and not in *exclude*."""
    stype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    for _ in range(100):
        with socket.socket(socket.AF_INET, stype) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port
    raise VMError("no free port on 127.0.0.1",
                  hint="too many sockets are open on this host: stop unused VMs (invoke vm-down --vm=NAME)")


def allocate_ports(exclude: set[int] = frozenset()) -> Ports:
    """An SSH port and two UDP port pairs, distinct from each other and *exclude*."""
    taken = set(exclude)
    ssh = free_port("tcp", taken)
    taken.add(ssh)
    wires = {}
    for nic in WIRE_NICS:
        guest = free_port("udp", taken)
        taken.add(guest)
        host = free_port("udp", taken)
        taken.add(host)
        wires[nic.name] = Wire(guest=guest, host=host, mac=nic.mac)
    return Ports(ssh=ssh, wire=wires)


# ---------------------------------------------------------------- console faults

# (kind, regex) in the order they are looked for; the first hit's line anchors
# the excerpt. "Kernel panic" comes last so an oops that led to the panic is
# reported as the oops, with its trace.
FAULT_PATTERNS = (
    ("KASAN", re.compile(r"BUG: KASAN: .*|KASAN: .*")),
    # lockdep (debug kernels built from source, vm/configs/debug.config): its splats
    # are WARNINGs, but each is a real locking bug; a plain WARN_ON is not a fault
    ("lockdep", re.compile(r"WARNING: (?:possible circular locking dependency detected|possible "
                           r"recursive locking detected|inconsistent lock state|suspicious RCU usage"
                           r"|bad unlock balance detected!|held lock freed!|lock held when returning "
                           r"to user space!|possible irq lock inversion dependency detected"
                           r"|\S+-safe -> \S+-unsafe lock order detected).*")),
    ("BUG", re.compile(r"\bBUG: .*|kernel BUG at .*")),
    ("Oops", re.compile(r"\bOops: .*|general protection fault.*|invalid opcode: .*")),
    ("sysrq crash", re.compile(r"sysrq: Trigger a crash.*")),
    ("Kernel panic", re.compile(r"Kernel panic - not syncing.*")),
    ("initramfs failure", re.compile(r"nflab-initramfs: FAILED.*")),
)


@dataclass
class Fault:
    kind: str
    line: str
    excerpt: str

    def summary(self) -> str:
        return f"{self.kind}: {self.line.strip()}"


def strip_timestamp(line: str) -> str:
    """A console line without the kernel's ``[   1.234567]`` stamp."""
    return re.sub(r"^\[\s*\d+\.\d+\]\s?", "", line)


def find_fault(text: str, *, before: int = 3, after: int = 30, max_chars: int = 4000) -> Fault | None:
    """The first kernel fault in console *text*, with an excerpt around it, or None."""
    lines = text.splitlines()
    hits = []
    for rank, (kind, rx) in enumerate(FAULT_PATTERNS):
        for i, line in enumerate(lines):
            m = rx.search(line)
            if m:
                hits.append((i, rank, kind, m.group(0)))
                break
    if not hits:
        return None
    # report the earliest fault in the log (the cause), keep the panic line in view;
    # on the same line the more specific pattern (earlier in FAULT_PATTERNS) wins
    i, _, kind, matched = min(hits)
    start = max(0, i - before)
    end = min(len(lines), i + after)
    panic = [j for j, _, k, _ in hits if k == "Kernel panic"]
    if panic and panic[0] >= end:
        chunk = lines[start:end] + ["..."] + lines[panic[0]:panic[0] + 3]
    else:
        chunk = lines[start:end]
    excerpt = "\n".join(chunk)
    if len(excerpt) > max_chars:
        excerpt = excerpt[:max_chars] + "\n..."
    return Fault(kind, strip_timestamp(matched), excerpt)


def tail(text: str, n: int = 25) -> str:
    return "\n".join(text.splitlines()[-n:])


# ---------------------------------------------------------------- accelerator

ACCEL_CACHE = "accel.json"
KVM_PROBE_SLOW = 30.0      # more seconds for a probe guest whose kernel is printing
HANGS = "(hangs)"          # ends the reason of a probe that timed out, maybe on a busy host
HANG_TTL = 3600.0          # seconds a timed-out probe is believed before the next vm-up probes again
SYS_MODULE = Path("/sys/module")   # a loaded (or built-in) module's folder: which one serves /dev/kvm
# PVM (Alibaba's pagetable-based KVM, kvm_pvm) runs guests in ring 3 and is fast only for
# kernels built as PVM guests; a stock kernel's privileged instructions are emulated one by
# one. Measured on a Firecracker host with nested_pvm=1: a Debian 6.12 kernel had not
# finished its memory setup 60 s after QEMU started, a point TCG passes within 0.4 s.
PVM_REASON = ("/dev/kvm is served by kvm_pvm (PVM), which runs only kernels built as PVM "
              "guests at speed; Debian's kernels boot there far slower than under TCG")


def _accel_key() -> str:
    qemu = shutil.which(QEMU) or QEMU
    try:
        qemu_id = f"{qemu}:{os.stat(qemu).st_mtime_ns}"
    except OSError:
        qemu_id = qemu
    # whether this process may open /dev/kvm is part of what the probe found: a cache shared
    # with a container (same host kernel, no /dev/kvm), restored on another CI runner, or
    # kept across an unloaded kvm module or a group change must not say "kvm" any more
    kvm = "kvm-rw" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "no-kvm"
    if on_pvm():
        kvm += "-pvm"
    return f"{os.uname().release}|{qemu_id}|{kvm}"


def on_pvm() -> bool:
    """Is /dev/kvm PVM's (``kvm_pvm``), on which stock guest kernels crawl?"""
    return (SYS_MODULE / "kvm_pvm").is_dir()


def start(cmd: list, **popen) -> subprocess.Popen:
    """Start the QEMU command line *cmd* in a session of its own, stdin empty; a
    missing QEMU is an error that says what to install."""
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, **popen)
    except FileNotFoundError as exc:
        raise VMError(f"{cmd[0]} not found", hint="apt-get install qemu-system-x86") from exc


def probe_kvm(vmlinuz: Path, initrd: Path, *, timeout: float = 6.0,
              slow: float = KVM_PROBE_SLOW) -> tuple[bool, str]:
    """Boot *vmlinuz* under KVM into the initramfs's probe mode (``nflab.probe``:
    load the virtio modules, print ``nflab-probe-ok``, power off); no boot on a PVM
    host, whose KVM serves stock kernels slower than TCG. KVM counts as
    working only if that happens: a guest silent for *timeout* seconds hangs; one
    whose kernel is printing (a busy host) gets *slow* seconds more before it counts
    as hung. A hung guest is killed."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    if on_pvm():
        return False, PVM_REASON
    with tempfile.TemporaryDirectory(prefix="nflab-kvm-probe-") as tmp:
        log = Path(tmp) / "console.log"
        log.touch()          # QEMU creates it only once it has parsed its options
        cmd = [QEMU, "-nodefaults", "-no-user-config", "-display", "none",
               "-M", MICROVM, "-accel", "kvm", "-cpu", "host",
               "-m", "256M", "-kernel", str(vmlinuz), "-initrd", str(initrd),
               "-append", "console=ttyS0 panic=-1 rdinit=/init nflab.probe",
               "-chardev", f"file,id=con,path={log}", "-serial", "chardev:con", "-no-reboot"]
        proc = start(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            err, hung = _probe_finish(proc, log, timeout, slow)
        finally:
            # a hung guest, or Ctrl-C / SIGTERM while it probes: no QEMU outlives the probe
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if hung:
            return False, hung
        if "nflab-probe-ok" in log.read_text(errors="replace"):
            return True, "KVM probe boot succeeded"
        return False, f"KVM probe boot failed: {err.decode(errors='replace').strip()[-200:]}"


def _probe_finish(proc: subprocess.Popen, log: Path, timeout: float,
                  slow: float) -> tuple[bytes, str]:
    """(QEMU's stderr, "") once the probe guest powered off; (b"", why) if it hangs:
    silent on its console after *timeout*, or printing but not done *slow* seconds later."""
    try:
        return proc.communicate(timeout=timeout)[1], ""
    except subprocess.TimeoutExpired:
        if not log.read_text(errors="replace").strip():
            return b"", f"a KVM guest printed nothing within {timeout:g}s of its probe boot {HANGS}"
    try:
        return proc.communicate(timeout=slow)[1], ""
    except subprocess.TimeoutExpired:
        return b"", (f"a KVM guest's kernel printed, but its probe boot did not finish within "
                     f"{timeout + slow:g}s {HANGS}")


def probe_pvh_entry(vmlinux: Path, *, timeout: float = 20.0) -> tuple[bool, str]:
    """Does *vmlinux*'s PVH entry reach the kernel's first message under TCG?

    QEMU jumps to the PVH entry point with the page tables the kernel sets up
    itself; a kernel whose early C code faults there (seen with KASAN on a
    6.12.118 debug build) triple-faults before any console and QEMU exits with
    status 0 (``-no-reboot``). Booted without an initramfs: success is the
    ``Linux version`` line on the serial port, then the QEMU is killed."""
    with tempfile.TemporaryDirectory(prefix="nflab-pvh-probe-") as tmp:
        log = Path(tmp) / "console.log"
        log.touch()          # QEMU creates it only once it has started
        cmd = [QEMU, "-nodefaults", "-no-user-config", "-display", "none",
               "-M", MICROVM, "-accel", "tcg", "-cpu", "qemu64", "-m", "512M",
               "-kernel", str(vmlinux), "-append",
               "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 pci=off",
               "-chardev", f"file,id=con,path={log}", "-serial", "chardev:con", "-no-reboot"]
        proc = start(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if "Linux version" in log.read_text(errors="replace"):
                    return True, "the PVH entry boots"
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace").strip()[-200:]
                    return False, ("the kernel died at its PVH entry before printing anything "
                                   f"(QEMU exit {proc.returncode}{': ' + err if err else ''})")
                time.sleep(0.05)
            return False, f"the PVH entry printed nothing within {timeout:g}s"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stderr.close()


def cached_accel() -> tuple[str, str] | None:
    """``(accel, reason)`` of the KVM probe cached for this host kernel and QEMU
    build, or None when there is none (the next ``vm-up`` probes). A probe that
    timed out (a busy host, maybe) counts for ``HANG_TTL`` seconds only."""
    try:
        data = json.loads((cache_dir() / ACCEL_CACHE).read_text())
        fresh = not data["reason"].endswith(HANGS) or time.time() - data["probed_at"] < HANG_TTL
        if data.get("key") == _accel_key() and fresh:
            return data["accel"], data["reason"] + " (cached probe)" + _hang_hint(data["reason"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        pass
    return None


def _hang_hint(reason: str) -> str:
    if not reason.endswith(HANGS):
        return ""
    return (f"; if KVM works here, set NFLAB_ACCEL=kvm, or delete {cache_dir() / ACCEL_CACHE} "
            "to probe again")


def choose_accel(vmlinuz: Path, initrd: Path, *, progress=print) -> tuple[str, str]:
    """``("kvm"|"tcg", reason)``: ``$NFLAB_ACCEL`` if set, else a cached KVM probe."""
    forced = os.environ.get("NFLAB_ACCEL")
    if forced:
        if forced not in ("kvm", "tcg"):
            raise VMError(f"NFLAB_ACCEL={forced!r} is not kvm or tcg",
                          hint="set it to kvm or tcg, or unset it to let the kit probe KVM")
        return forced, "set by NFLAB_ACCEL"
    with file_lock(cache_dir() / ".accel.lock"):
        cached = cached_accel()
        if cached:
            return cached
        if not on_pvm():
            progress("probing KVM (once per host kernel and QEMU build)")
        ok, reason = probe_kvm(vmlinuz, initrd)
        accel = "kvm" if ok else "tcg"
        (cache_dir() / ACCEL_CACHE).write_text(json.dumps({"key": _accel_key(), "accel": accel, "reason": reason,
                                    "probed_at": time.time()}) + "\n")
    return accel, reason + _hang_hint(reason)
