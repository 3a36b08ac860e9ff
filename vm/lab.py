"""Lab VM lifecycle: boot a kernel, reach it over SSH, watch it for crashes.

Each VM has a directory ``vms_dir()/<vm>/`` holding

* ``vm.json``      its state (pid, kernel, ports, accel, ssh_config, ...);
* ``ssh_config``   a ``Host nflab-<vm>`` block, so ``ssh -F ssh_config nflab-<vm>``
  and testinfra's ``ssh://nflab-<vm>?ssh_config=<path>`` work; it multiplexes
  over one master connection (``ControlMaster auto``), so after the first
  login a command costs one round trip, not a key exchange under TCG;
* ``console.log``  the serial console (kept after the VM stops, for post-mortems);
* ``qemu.log``, ``qemu.pid``, ``qmp.sock``.

QEMU runs in its own session (process group), detached from the terminal, so
Ctrl-C in the shell never reaches it directly: ``up()`` catches the interrupt
(and SIGTERM/SIGHUP) and kills the group itself. Every function that touches a
VM first checks it is alive and its console shows no kernel fault; if it is
dead or faulted the VM is torn down and a ``VMError`` carries the console
excerpt. Commands run while QEMU and the console are polled, so a panic in the
middle of a command ends it at once instead of waiting for SSH to time out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from dataclasses import replace as dc_replace
from pathlib import Path

from ground import kconfig
from ground.errors import VMError
from ground.paths import cache_dir, vms_dir
from ground.proc import file_lock, run, try_lock

from supply import kernels

from . import initramfs, qemu, remote, rootfs
from . import snapshot as snapshot_mod

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
BOOT_BUDGET = {"tcg": 60.0, "kvm": 30.0}   # seconds from QEMU start to SSH ready
POLL = 0.01                                 # seconds between readiness / crash polls
CONTROL_PERSIST = 60
READY_LINE = "nflab-init: ready after"      # the guest init's console line once sshd runs
BANNER_PROBE_AFTER = 10.0                   # s after launch: probe sshd directly (no READY_LINE)
# the guest's progress lines ("nflab-init: ready after 1.47s"): the host notes when it
# first saw each on its own clock, since the guest's uptime runs ~0.3 s slow through
# early boot under TCG (jiffies timekeeping while the APIC timer is calibrated)
MARK_RE = re.compile(r"^(nflab-init(?:ramfs)?: .+?) after [\d.]+s$", re.M)
STATE = "vm.json"
# what a running QEMU and its SSH master leave in the VM's directory (console.log and
# qemu.log stay, for post-mortems)
RUN_FILES = ("qmp.sock", "qemu.pid", "ssh.ctl")
STALE_DAYS = 7      # a VM folder without a vm.json untouched this long is removed at vm-up
_children: dict[str, subprocess.Popen] = {}  # QEMUs this process started (to reap them)


@dataclass
class VMState:
    """What ``vm.json`` records about a VM."""

    name: str
    dir: str
    spec: str | None
    release: str
    pid: int
    ports: dict
    ssh_config: str
    host: str
    accel: str
    machine: str
    started_at: float
    boot_seconds: float | None = None
    status: str = "booting"
    cmd: list = field(default_factory=list)
    restored_from: str | None = None  # the saved state file a snapshot VM started from
    # cold boots: host seconds from QEMU's start until the console first showed each
    # guest progress line ("nflab-initramfs: modules loaded", ...), polled every POLL
    boot_marks: dict = field(default_factory=dict)
    # a traced boot (up(trace=True)): [host seconds since QEMU started, line] of
    # every console line, the kernel's own messages included
    boot_lines: list = field(default_factory=list)

    @property
    def vmdir(self) -> Path:
        return Path(self.dir)

    @property
    def console_log(self) -> Path:
        return self.vmdir / "console.log"

    @property
    def testinfra_spec(self) -> str:
        """Host spec for ``pytest --hosts=`` / ``testinfra.get_host``."""
        return f"ssh://{self.host}?ssh_config={self.ssh_config}"

    def ssh_argv(self, *options: str) -> list[str]:
        """``ssh -F <config> [options] nflab-<vm>``: append the remote command."""
        return ["ssh", "-F", self.ssh_config, *options, self.host]

    @property
    def wire(self) -> dict[str, qemu.Wire]:
        """Guest NIC name -> its UDP wire ports (for ``vm/wire.py``)."""
        return qemu.Ports.from_dict(self.ports).wire


# ---------------------------------------------------------------- paths, keys, state

def check_name(vm: str) -> str:
    if not NAME_RE.match(vm or ""):
        raise VMError(f"invalid VM name {vm!r}",
                      hint="use letters, digits, '-' and '_' (at most 32), e.g. --vm=k612")
    return vm


def vm_dir(vm: str) -> Path:
    return vms_dir() / check_name(vm)


def testinfra_spec_for(vm: str) -> str:
    """The testinfra spec VM *vm* will have once it is up (known before it boots)."""
    return f"ssh://nflab-{vm}?ssh_config={vm_dir(vm) / 'ssh_config'}"


# The lab's login key is RSA: the guest's sshd checks an RSA signature (e = 65537,
# a few modular multiplications in OpenSSL's assembly) ~0.05 s faster under TCG than
# an ed25519 one (OpenSSH's own portable C), and every fresh login pays that check:
# 0.19 s instead of 0.24 s for `ssh -o ControlPath=none ... true` on a warm 6.12 guest.
# 3072 bits: ssh-keygen's default size, and no slower to verify than 2048 there.
SSH_KEY_TYPE, SSH_KEY_BITS, SSH_KEY_FILE = "ssh-rsa", 3072, "id_rsa"


def ssh_key() -> tuple[Path, str]:
    """The per-lab login key in ``cache_dir()/ssh/`` (made on first use):
    (private key path, base64 blob of the public key)."""
    d = cache_dir() / "ssh"
    key = d / SSH_KEY_FILE
    with file_lock(cache_dir() / ".ssh.lock"):
        if not (key.is_file() and key.with_suffix(".pub").is_file()):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o700)
            key.unlink(missing_ok=True)
            key.with_suffix(".pub").unlink(missing_ok=True)
            run(["ssh-keygen", "-q", "-t", "rsa", "-b", str(SSH_KEY_BITS), "-N", "",
                 "-C", "nflab-lab", "-f", key])
        key.chmod(0o600)
    blob = key.with_suffix(".pub").read_text().split()
    if len(blob) < 2 or blob[0] != SSH_KEY_TYPE:
        raise VMError(f"{key}.pub is not an {SSH_KEY_TYPE} public key", hint=f"delete {d} and retry")
    return key, blob[1]


# a unix socket's path holds at most 107 bytes; ssh first binds the ControlPath
# with a 17-byte ".<16 random chars>" suffix and renames it (OpenSSH mux.c)
SUN_PATH_MAX = 107
SSH_MUX_SUFFIX = 17


def _control_path(vmdir: Path) -> str:
    path = vmdir / "ssh.ctl"
    if len(os.fsencode(path)) + SSH_MUX_SUFFIX <= SUN_PATH_MAX:
        return str(path)
    return f"/tmp/nflab-ssh-{hashlib.sha1(str(vmdir).encode()).hexdigest()[:16]}.ctl"


def write_ssh_config(vm: str, vmdir: Path, port: int, key: Path) -> Path:
    host = f"nflab-{vm}"
    text = f"""# generated by nflab for VM {vm!r}; testinfra: ssh://{host}?ssh_config={vmdir / 'ssh_config'}
Host {host}
    HostName 127.0.0.1
    Port {port}
    User root
    IdentityFile {key}
    IdentitiesOnly yes
    BatchMode yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    ConnectTimeout 5
    ServerAliveInterval 5
    ServerAliveCountMax 3
    ControlMaster auto
    ControlPath {_control_path(vmdir)}
    ControlPersist {CONTROL_PERSIST}
    KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org
    HostKeyAlgorithms ssh-ed25519
    Compression no
    GSSAPIAuthentication no
"""
    path = vmdir / "ssh_config"
    path.write_text(text)
    return path


def load(vm: str) -> VMState | None:
    """The recorded state of *vm*, or None."""
    try:
        data = json.loads((vm_dir(vm) / STATE).read_text())
        return VMState(**data)
    except (OSError, json.JSONDecodeError, TypeError):
        return None


def _save(state: VMState):
    path = state.vmdir / STATE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
    tmp.replace(path)


def all_states() -> list[VMState]:
    base = vms_dir()
    found = []
    if base.is_dir():
        for d in sorted(base.iterdir()):
            if d.is_dir() and NAME_RE.match(d.name):
                st = load(d.name)
                if st:
                    found.append(st)
    return found


# ---------------------------------------------------------------- process checks

def pid_alive(pid: int | None, vmdir: Path | None = None) -> bool:
    """True if *pid* is a live (non-zombie) QEMU of *vmdir* (guards against pid reuse)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        return False
    # the QEMU names files inside its VM directory: "…/vms/a/" is no prefix of "…/vms/ab/"
    return vmdir is None or f"{vmdir}/".encode() in cmdline


def is_running(state: VMState) -> bool:
    return pid_alive(state.pid, state.vmdir)


def console_text(state: VMState) -> str:
    return _read_console(state.console_log)


def _read_console(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _kill(pid: int, vmdir: Path, grace: float = 2.0):
    """Stop QEMU *pid*: SIGTERM to its process group, SIGKILL after *grace* seconds;
    then reap it if this process started it (also when it had exited already)."""
    if pid_alive(pid, vmdir):
        _signal_until_gone(pid, vmdir, grace)
    for name, child in list(_children.items()):
        if child.pid == pid:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            _children.pop(name, None)


def _signal_until_gone(pid: int, vmdir: Path, grace: float):
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            child = next((p for p in _children.values() if p.pid == pid), None)
            if child is not None:
                child.poll()
            if not pid_alive(pid, vmdir):
                return
            time.sleep(0.02)


def _qmp(sock_path: Path, command: str, timeout: float = 1.0) -> bool:
    """Send one QMP *command* (``quit``, ``stop``, ...); True if QEMU accepted it."""
    try:
        snapshot_mod.qmp(sock_path, (command, None), timeout=timeout)
    except VMError:
        return False
    return True


def _qmp_status(state: VMState) -> str | None:
    """QEMU's run state (``running``, ``inmigrate``, ``paused``, ...) or None."""
    try:
        return snapshot_mod.qmp(state.vmdir / "qmp.sock", ("query-status", None),
                                timeout=1.0)[0].get("status")
    except (VMError, AttributeError, IndexError):
        return None


def _stop_master(state: VMState):
    if Path(state.ssh_config).is_file():
        subprocess.run(state.ssh_argv("-O", "exit"), stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=5,
                       check=False)


def _is_current(state: VMState) -> bool:
    """True unless ``vm.json`` now records another launch of the VM (a newer QEMU of
    the same name, started by another kit process since *state* was read)."""
    now = load(state.name)
    return now is None or now.started_at == state.started_at


def _orphan_pid(vm: str) -> int | None:
    """The pid of a QEMU still running in VM *vm*'s directory that no ``vm.json``
    describes (QEMU holds a lock on its pid file: no new QEMU starts there)."""
    try:
        pid = int((vm_dir(vm) / "qemu.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid, vm_dir(vm)) else None


def _teardown(state: VMState, *, graceful: bool = False):
    """Make sure the VM's QEMU and SSH master are gone and forget its state. A
    *state* that is no longer the VM's current one (read before another process
    replaced the VM) touches nothing: its QEMU is gone, the files are the new VM's."""
    if not _is_current(state):
        return
    if graceful and is_running(state) and _qmp(state.vmdir / "qmp.sock", "quit"):
        deadline = time.monotonic() + 2.0
        while is_running(state) and time.monotonic() < deadline:
            if state.name in _children:
                _children[state.name].poll()
            time.sleep(0.02)
    try:
        # pid 0: the start was killed between launching QEMU and recording its pid,
        # which only QEMU's own pid file still knows
        _kill(state.pid or _orphan_pid(state.name) or 0, state.vmdir)
    finally:
        try:
            _stop_master(state)
        except (OSError, subprocess.SubprocessError):
            pass
    _remove_run_files(state.vmdir, STATE)


def _remove_run_files(vmdir: Path, *extra: str):
    for leftover in (*extra, *RUN_FILES):
        (vmdir / leftover).unlink(missing_ok=True)


def crash_error(state: VMState, what: str, *, fault: qemu.Fault | None = None,
                extra: str = "") -> VMError:
    """A VMError that names the fault and carries the console excerpt."""
    text = console_text(state)
    fault = fault or qemu.find_fault(text)
    if fault:
        msg = f"VM {state.name!r} ({state.release}) {what}: {fault.summary()}"
        detail = fault.excerpt
    else:
        msg = f"VM {state.name!r} ({state.release}) {what}"
        detail = qemu.tail(text) or "(console is empty)"
    if extra:
        detail = f"{extra}\n{detail}"
    return VMError(msg, hint=f"full console: {state.console_log}; the VM was stopped, "
                             f"run `invoke vm-up --vm={state.name}` for a fresh one",
                   detail=detail)


def check_health(state: VMState) -> None:
    """Raise VMError (and tear the VM down) if QEMU is gone or the console shows a fault."""
    fault = qemu.find_fault(console_text(state))
    if fault:
        _teardown(state)
        raise crash_error(state, "crashed", fault=fault)
    if not is_running(state):
        _teardown(state)
        raise crash_error(state, "is gone (QEMU exited)")


def require(vm: str) -> VMState:
    """The state of a running, healthy VM, or a VMError saying what to do."""
    state = load(vm)
    if state is None:
        raise VMError(f"VM {vm!r} is not running", hint=f"run `invoke vm-up --vm={vm}` first")
    if state.status != "ready":
        # _boot_once reserved the ports and starts QEMU (or that start was killed), the
        # guest still boots, or the first vm-up of a kernel saves its state (paused)
        raise VMError(f"VM {vm!r} is {_NOT_READY.get(state.status, state.status)}",
                      hint=_owner_hint(vm))
    check_health(state)
    return state


# ---------------------------------------------------------------- boot

@contextmanager
def signals_as_interrupt():
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt (while booting, or a whole suite
    run), so the cleanup that stops QEMU runs."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    else:
        yield


def _ssh_banner(port: int, timeout: float = 0.5) -> bool:
    """True once sshd in the guest answers on the forwarded port (slirp accepts the
    host connection even when nothing listens in the guest, then closes it)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def _used_ports(exclude_vm: str) -> set[int]:
    used = set()
    for st in all_states():
        if st.name != exclude_vm:
            used |= qemu.Ports.from_dict(st.ports).all()
    return used


def _ready_command(smp: int, clock: float | None = None) -> str:
    """Guest side of readiness, shell builtins only (every exec costs under TCG): all
    vCPUs online (they come up at boot; waits at most 5 s for a late one), then
    print the kernel release. With *clock* (a restored snapshot, whose
    clock stopped when it was saved), first set the guest's wall clock to it."""
    online = "0" if smp <= 1 else f"0-{smp - 1}"
    cmd = ""
    if clock is not None:
        cmd += f"date -u -s @{clock:.3f} >/dev/null; "
    return cmd + (f'i=0; while read -r c < /sys/devices/system/cpu/online; '
                  f'[ "$c" != {online} ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done; '
                  'read -r r < /proc/sys/kernel/osrelease; echo "$r"')


def _wait_ready(state: VMState, proc: subprocess.Popen, budget: float, t0: float, smp: int,
                restored: bool = False, trace: bool = False):
    """Poll until the ready command works over SSH; raise on QEMU exit, console fault
    or budget. *trace*: note when each console line first showed (``boot_lines``)."""
    deadline = t0 + budget
    running = False
    while True:
        text = _boot_progress(state, proc, budget, t0, trace)
        # when to try a login: a restored guest's sshd is listening already, a booting
        # guest says so on its console; the banner probe is the fallback (each probe
        # costs the guest's sshd a fork)
        if restored:
            # ssh only once the state is loaded and the guest runs: a connection made
            # while QEMU is still loading stalls for seconds (its SYN reaches a guest
            # that is not running, and slirp retries late)
            running = running or _qmp_status(state) == "running"
            ready = running
        else:
            # the banner probe blocks while slirp's SYN to a guest without a network
            # goes unanswered: it must never delay noticing the console line
            ready = READY_LINE in text or (time.monotonic() - t0 > BANNER_PROBE_AFTER
                                           and _ssh_banner(state.ports["ssh"], timeout=0.2))
        if ready and _login(state, smp, deadline, clock=time.time() if restored else None):
            return
        time.sleep(POLL)


def _boot_progress(state: VMState, proc: subprocess.Popen, budget: float, t0: float,
                   trace: bool) -> str:
    """The console so far, its marks noted; raise if QEMU exited, the guest
    faulted or the boot budget is spent."""
    if proc.poll() is not None:
        qlog = (state.vmdir / "qemu.log").read_text(errors="replace").strip()
        raise crash_error(state, f"died while booting (QEMU exit {proc.returncode})",
                          extra=f"qemu: {qlog[-1500:]}" if qlog else "")
    text = console_text(state)
    _note_marks(state.boot_marks, text, t0)
    if trace:
        note_lines(state.boot_lines, text, round(time.monotonic() - t0, 3))
    fault = qemu.find_fault(text)
    if fault:
        raise crash_error(state, "crashed while booting", fault=fault)
    if time.monotonic() > t0 + budget:
        raise crash_error(state, f"did not answer SSH within its {budget:g}s boot budget")
    return text


def _login(state: VMState, smp: int, deadline: float, clock: float | None) -> bool:
    """Run the ready command; True once the guest answered with its release, False
    while its sshd does not answer yet (ssh's exit 255) or the login outlasts the
    budget (the caller then says the budget ran out). The first login becomes the
    ControlMaster that later commands reuse."""
    try:
        res = subprocess.run(state.ssh_argv() + [_ready_command(smp, clock)],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=max(5.0, deadline - time.monotonic()), check=False)
    except subprocess.TimeoutExpired:
        return False        # a guest that took the connection and stalled: the budget decides
    if res.returncode == 255:
        return False
    if res.returncode != 0:
        raise VMError(f"ssh login to VM {state.name!r} failed: {res.stderr.strip()}",
                      hint="the guest's sshd refused the lab key: see the console for nflab-initramfs "
                           "lines, or remove the cache's ssh/ folder to make a new key")
    got = res.stdout.strip()
    if got != state.release:
        raise VMError(f"VM {state.name!r} booted {got!r}, expected {state.release!r}",
                      hint="its boot files are stale: run invoke fetch-kernel --kernel=SPEC again")
    return True


def note_lines(lines: list, text: str, now: float):
    """Append [*now*, line] for each complete line of console *text* past those
    *lines* holds (the console only grows while a VM boots)."""
    done = text.split("\n")[:-1]
    lines += [[now, line.rstrip("\r")] for line in done[len(lines):]]


def _note_marks(marks: dict, text: str, t0: float):
    now = round(time.monotonic() - t0, 3)
    for m in MARK_RE.finditer(text):
        marks.setdefault(m.group(1), now)


def _launch(state: VMState, spec: qemu.LaunchSpec) -> subprocess.Popen:
    with ExitStack() as stack:
        if spec.incoming is not None and not qemu.reads_state_files():
            # QEMU < 8.2 reads the saved state from this descriptor (-incoming fd:N)
            fd = os.open(spec.incoming, os.O_RDONLY | os.O_CLOEXEC)
            stack.callback(os.close, fd)
            spec = dc_replace(spec, incoming_fd=fd)
        cmd = qemu.build_command(spec)
        state.cmd = cmd
        qlog = stack.enter_context(open(state.vmdir / "qemu.log", "wb"))
        proc = qemu.start(cmd, stdout=qlog, stderr=subprocess.STDOUT, cwd=state.vmdir,
                          pass_fds=_fds(spec))
    _children[state.name] = proc
    return proc


def _fds(spec: qemu.LaunchSpec) -> tuple[int, ...]:
    return () if spec.incoming_fd is None else (spec.incoming_fd,)


@dataclass
class _BootPlan:
    """What every launch of one ``up()`` shares."""

    vm: str
    vmdir: Path
    spec: str | None
    release: str
    boot: initramfs.BootFiles
    image: Path
    key: Path
    pub: str
    accel: str
    machine: str
    progress: object
    sshd: str = "openssh"
    tcg_thread: str = "single"
    skip_initcalls: tuple[str, ...] = qemu.SKIPPED_INITCALLS
    trace: bool = False

    def launch_spec(self, ports: qemu.Ports, incoming: Path | None = None) -> qemu.LaunchSpec:
        return qemu.LaunchSpec(
            name=self.vm, vmdir=self.vmdir, kernel=self.boot.kernel, initrd=self.boot.initrd,
            rootfs=self.image, modules_img=self.boot.modules_img, ssh_pubkey=self.pub,
            ports=ports, accel=self.accel, tcg_thread=self.tcg_thread, machine=self.machine,
            incoming=incoming, verbose=self.trace,
            extra_cmdline=qemu.sshd_cmdline(self.sshd), skip_initcalls=self.skip_initcalls,
            tsc_khz=qemu.host_tsc_khz() if self.accel == "tcg" and self.machine == "microvm"
            else None)


def _boot_once(plan: _BootPlan, budget: float, incoming: Path | None = None) -> VMState | None:
    """One launch (a cold boot, or a restore of the saved state *incoming*): the ready
    VM, or None if QEMU could not bind its ports (retry). Whatever goes wrong,
    including Ctrl-C, the QEMU is gone before this returns."""
    vm, vmdir = plan.vm, plan.vmdir
    state = None
    try:
        with file_lock(vms_dir() / ".ports.lock"):
            ports = qemu.allocate_ports(_used_ports(vm))
            state = VMState(
                name=vm, dir=str(vmdir), spec=plan.spec, release=plan.release, pid=0,
                ports=ports.to_dict(),
                ssh_config=str(write_ssh_config(vm, vmdir, ports.ssh, plan.key)),
                host=f"nflab-{vm}", accel=plan.accel, machine=plan.machine,
                started_at=time.time(), restored_from=str(incoming) if incoming else None)
            _save(state)  # reserves the ports for concurrent `up`s
        launch = plan.launch_spec(ports, incoming)
        launch.console_log.unlink(missing_ok=True)
        t0 = time.monotonic()
        proc = _launch(state, launch)
        state.pid = proc.pid
        _save(state)
        try:
            _wait_ready(state, proc, budget, t0, launch.smp, restored=incoming is not None,
                        trace=plan.trace)
        except VMError:
            qlog = (vmdir / "qemu.log").read_text(errors="replace")
            if proc.poll() is not None and ("Could not set up host forwarding" in qlog
                                            or "Address already in use" in qlog):
                plan.progress(f"port clash ({qlog.strip()[-120:]}), retrying with new ports")
                _teardown(state)
                return None
            raise
        state.boot_seconds = round(time.monotonic() - t0, 2)
        state.status = "ready"
        _save(state)
        return state
    except BaseException:
        if state is not None:
            child = _children.get(vm)
            if child is not None and not state.pid:
                state.pid = child.pid
            _teardown(state)
        raise


def _boot(plan: _BootPlan, budget: float, incoming: Path | None = None) -> VMState:
    for _attempt in range(3):
        with signals_as_interrupt():
            state = _boot_once(plan, budget, incoming)
        if state is not None:
            return state
    raise VMError(f"could not find free ports for VM {plan.vm!r} after 3 tries",
                  hint="another program keeps taking the ports QEMU was given on 127.0.0.1: "
                       "see `ss -lntup`, stop unused VMs (invoke vm-down --vm=NAME) and retry")


def _save_snapshot(plan: _BootPlan, k: str, rec: dict, budget: float) -> Path | None:
    """Cold-boot *plan*'s VM, save its ready state as snapshot *k*, stop it; the state
    file, or None (said why) if saving failed."""
    state = _boot(plan, budget)
    state.status = "saving"     # paused while it is saved: no vm-exec may take it for dead
    _save(state)
    with signals_as_interrupt():
        try:
            # no SSH connection may be open in the saved state: a restored guest would
            # keep a session whose peer never existed in its QEMU
            _stop_master(state)
            time.sleep(0.2)
            return snapshot_mod.save(state.vmdir / "qmp.sock", plan.release, k, rec,
                                 progress=plan.progress)
        except (VMError, OSError, subprocess.SubprocessError) as exc:
            plan.progress(f"could not save the VM state ({exc}); booting cold instead")
            return None
        finally:
            _teardown(state, graceful=True)


def _up_from_snapshot(plan: _BootPlan, budget: float) -> VMState | None:
    """Restore the saved ready state of this kernel (saving it first if there is
    none); None, after saying why, if that did not work (the caller boots cold)."""
    probe = plan.launch_spec(qemu.Ports(ssh=0))  # ports do not enter the key
    k, rec, path = snapshot_mod.lookup(plan.release, probe)
    if path is None:
        with file_lock(snapshot_mod.lock_path(plan.release, k)):
            k, rec, path = snapshot_mod.lookup(plan.release, probe)
            if path is None:
                plan.progress(f"no saved state of a ready {plan.release} VM yet: "
                              "booting once to save one")
                path = _save_snapshot(plan, k, rec, budget)
                if path is None:
                    return None
    with snapshot_mod.reading(plan.release, k) as held:
        if not held:
            plan.progress(f"the saved state {path.name} was just removed by another vm-up "
                          f"(it keeps the newest {snapshot_mod.KEEP} per kernel); booting cold instead")
            return None
        return _restore(plan, budget, k, path)


def _restore(plan: _BootPlan, budget: float, k: str, path: Path) -> VMState | None:
    """The VM restored from saved state *path*; None, after saying why, if that failed
    (a bad state is discarded)."""
    restore_budget = snapshot_mod.RESTORE_BUDGET.get(plan.accel, budget)
    try:
        return _boot(plan, min(budget, restore_budget), incoming=path)
    except VMError as exc:
        # a state that crashes, or does not answer within the restore budget, is
        # bad; one that merely missed a caller's tighter budget is kept
        bad = budget >= restore_budget or "budget" not in exc.message
        plan.progress(f"restoring {path.name} failed ({exc.message}); "
                      f"{'discarding it, ' if bad else ''}booting cold instead")
        if bad:
            snapshot_mod.discard(plan.release, k)
        return None


def _kernel_for_boot(spec: str | None, progress):
    """The cached kernel of *spec*. Its entry is walked file by file (0.05 s of every
    restore) only when its boot files must be built from it: current boot files
    carry their own records."""
    kernel = kernels.get(spec, progress=progress, listing=False)
    if initramfs.current(kernel):
        return kernel
    return kernels.get(spec, progress=progress)


def _plan(kernel, vm: str, spec: str | None, trace: bool, progress) -> tuple[_BootPlan, str]:
    """What every launch of VM *vm* with *kernel* shares (its boot files, rootfs and
    key made if missing), and why it runs on the accelerator it does."""
    image = rootfs.ensure(progress=progress)
    boot = initramfs.ensure(kernel, progress=progress)
    accel, reason = qemu.choose_accel(boot.kernel, boot.initrd, progress=progress)
    key, pub = ssh_key()
    vmdir = _vm_dir_with_room(vm)
    plan = _BootPlan(vm=vm, vmdir=vmdir, spec=spec, release=kernel.release, boot=boot,
                     image=image, key=key, pub=pub, accel=accel,
                     machine=qemu.env_choice("NFLAB_MACHINE", qemu.MACHINES, "a machine type the kit boots"),
                     progress=progress,
                     sshd=qemu.sshd_choice(), tcg_thread=qemu.tcg_threading(), trace=trace,
                     skip_initcalls=qemu.skipped_initcalls(config=kconfig.read(kernel.config)))
    return plan, reason


def _vm_dir_with_room(vm: str) -> Path:
    """VM *vm*'s folder, made; an error if QEMU's QMP socket in it would not fit a
    unix socket's path (QEMU would refuse to start)."""
    vmdir = vm_dir(vm)
    sock = vmdir / "qmp.sock"
    if len(os.fsencode(sock)) > SUN_PATH_MAX:
        raise VMError(f"VM {vm!r}'s QMP socket {sock} is {len(os.fsencode(sock))} bytes long, "
                      f"more than a unix socket's {SUN_PATH_MAX}",
                      hint="point NFLAB_CACHE at a shorter directory, or give the VM a shorter name")
    vmdir.mkdir(parents=True, exist_ok=True)
    return vmdir


def _boot_budget(accel: str) -> float:
    """``$NFLAB_BOOT_TIMEOUT`` seconds, else the accelerator's ``BOOT_BUDGET``."""
    value = os.environ.get("NFLAB_BOOT_TIMEOUT", "").strip()
    try:
        return float(value) if value else BOOT_BUDGET[accel]
    except ValueError:
        raise VMError(f"NFLAB_BOOT_TIMEOUT={value!r} is not a number of seconds",
                      hint=f"e.g. NFLAB_BOOT_TIMEOUT=120, or unset it for {BOOT_BUDGET[accel]:g}s "
                           f"under {accel.upper()}") from None


def up(spec: str | None = None, vm: str = "default", *, replace: bool = False,
       budget: float | None = None, snapshot: bool | None = None, trace: bool = False,
       progress=print) -> VMState:
    """Boot *spec*'s kernel as VM *vm* and return once SSH answers.

    By default (*snapshot* None, unless ``$NFLAB_SNAPSHOT=0``) the VM is restored
    from the saved state of a freshly booted one (see ``vm/snapshot.py``; the
    first use of a kernel saves it), falling back to a cold boot, with a message,
    if that fails; ``snapshot=False`` always boots cold.

    A running VM with the same kernel is reused; one with a different kernel is
    an error unless *replace*. On any failure, Ctrl-C or SIGTERM the QEMU is
    killed before the exception propagates.

    *trace*: a cold boot with the kernel's messages on the console (no ``quiet``),
    each console line noted with when the host first saw it (``boot_lines``), for
    ``invoke bench --only=boottrace``."""
    check_name(vm)
    vms_dir().mkdir(parents=True, exist_ok=True)
    prune_stale()
    with file_lock(vms_dir() / f".{vm}.lock"):
        old = load(vm)
        _refuse_orphan(vm, old)
        healthy = old is not None and is_running(old) and old.status == "ready" \
            and not qemu.find_fault(console_text(old))
        if healthy and trace:
            raise VMError(f"VM {vm!r} already runs {old.release}: a traced boot needs a fresh one",
                          hint=f"run `invoke vm-down --vm={vm}` first, or trace another --vm name")
        if healthy and spec in (old.spec, old.release):
            # same request as the running VM: no need to ask apt what "6.12" means now
            progress(f"VM {vm!r} already runs {old.release}; reusing it")
            return old
        kernel = _kernel_for_boot(spec, progress)
        if old is not None:
            if healthy and _keeps(old, kernel, replace):
                progress(f"VM {vm!r} already runs {old.release}; reusing it")
                return old
            _teardown(old, graceful=True)
        return _start(kernel, vm, spec, budget=budget, snapshot=snapshot, trace=trace,
                      progress=progress)


def _keeps(old: VMState, kernel, replace: bool) -> bool:
    """True when the healthy VM *old* runs *kernel* already; an error when it runs
    another one and *replace* was not asked for."""
    if old.release == kernel.release:
        return True
    if not replace:
        raise VMError(f"VM {old.name!r} runs {old.release}, not {kernel.release}",
                      hint=f"run `invoke vm-down --vm={old.name}` first, pass --replace, "
                           "or use another --vm name")
    return False


def _start(kernel, vm: str, spec: str | None, *, budget: float | None, snapshot: bool | None,
           trace: bool, progress) -> VMState:
    """Restore or boot a new VM *vm* of *kernel* (its slot is free)."""
    with signals_as_interrupt():     # the KVM probe's QEMU is stopped on SIGTERM too
        plan, reason = _plan(kernel, vm, spec, trace, progress)
    budget = budget or _boot_budget(plan.accel)
    use_snapshot = snapshot_mod.enabled(snapshot) and not trace
    threads = f", {plan.tcg_thread}-threaded" if plan.accel == "tcg" else ""
    progress(f"{'restoring' if use_snapshot else 'booting'} {kernel.release} as VM {vm!r} "
             f"with {plan.accel.upper()} ({reason}{threads}), -M {plan.machine}")
    if use_snapshot:
        state = _up_from_snapshot(plan, budget)
        if state is not None:
            return state
    return _boot(plan, budget)


def _refuse_orphan(vm: str, old: VMState | None):
    """A QEMU without a ``vm.json`` in the VM's directory holds its pid file: a new one
    would die at once. Say so instead of booting into that."""
    pid = _orphan_pid(vm) if old is None else None
    if pid:
        raise VMError(f"VM {vm!r}: a QEMU (pid {pid}) still runs in its directory without a vm.json",
                      hint=f"run `invoke vm-down --vm={vm}` to stop it, then retry")


def down(vm: str = "default") -> bool:
    """Stop VM *vm* (QMP quit, then SIGTERM/SIGKILL); True if it was running. A QEMU
    left in the VM's directory without a ``vm.json`` is stopped too."""
    check_name(vm)
    with file_lock(vms_dir() / f".{vm}.lock"):
        state = load(vm)
        if state is None:
            pid = _orphan_pid(vm)
            if pid:
                _kill(pid, vm_dir(vm))
                _remove_run_files(vm_dir(vm))
            return pid is not None
        was = is_running(state)
        _teardown(state, graceful=True)
        return was


def claimed(vm: str):
    """Context manager: True while this process holds VM *vm*'s run lock (a suite
    run using a VM it did not start holds it for the whole run), False if another
    process holds it. Waits for nothing."""
    return try_lock(vms_dir() / f".{check_name(vm)}.run.lock")


def forget(vm: str) -> bool:
    """Remove the folder and lock files of stopped VM *vm* (a suite run's private VM,
    after its ``down``); True if it did. A VM with a ``vm.json`` or a QEMU is left
    alone, and so is one whose console shows a kernel fault (for the post-mortem)."""
    with file_lock(vms_dir() / f".{check_name(vm)}.lock"):
        d = vm_dir(vm)
        if load(vm) is not None or _orphan_pid(vm) or qemu.find_fault(_read_console(d / "console.log")):
            return False
        _remove_vm(vm)
    return True


def prune_stale(days: float = STALE_DAYS):
    """Remove VM folders without a ``vm.json`` (and their lock files) that nothing
    touched for *days*: what runs killed before they cleaned up left behind. A
    folder whose lock another process holds, or where a QEMU runs, stays."""
    base = vms_dir()
    cutoff = time.time() - days * 86400
    for d in base.iterdir() if base.is_dir() else ():
        if not (d.is_dir() and NAME_RE.match(d.name)) or (d / STATE).exists() or _touched(d) > cutoff:
            continue
        with try_lock(base / f".{d.name}.lock") as mine:
            if mine and not (d / STATE).exists() and not _orphan_pid(d.name):
                _remove_vm(d.name)


def _touched(d: Path) -> float:
    """When folder *d* or a file in it last changed."""
    try:
        return max(p.stat().st_mtime for p in (d, *d.iterdir()))
    except OSError:
        return time.time()


def _remove_vm(vm: str):
    """VM *vm*'s folder and lock files (the caller holds its ``.<vm>.lock``: a VM name
    nobody else uses any more, so none waits on that lock file)."""
    shutil.rmtree(vm_dir(vm), ignore_errors=True)
    for lock in (f".{vm}.run.lock", f".{vm}.lock"):
        (vms_dir() / lock).unlink(missing_ok=True)


def status(vm: str | None = None) -> list[dict]:
    """One row per known VM (or just *vm*): name, state, kernel, ports, pid, uptime."""
    states = [s for s in all_states() if vm is None or s.name == vm]
    rows = []
    for st in states:
        alive = is_running(st)
        fault = qemu.find_fault(console_text(st)) if alive else None
        rows.append({
            "vm": st.name,
            "state": ("crashed" if fault else st.status) if alive else "dead",
            "kernel": st.release, "accel": st.accel, "pid": st.pid if alive else None,
            "ssh_port": st.ports.get("ssh"),
            "wire": {k: f"{w['guest']}/{w['host']}" for k, w in st.ports.get("wire", {}).items()},
            "uptime": round(time.time() - st.started_at) if alive else None,
            "boot_seconds": st.boot_seconds,
            "spec": st.testinfra_spec,
        })
    return rows


# ---------------------------------------------------------------- commands

def _probe_answers(state: VMState, timeout: float = 8.0) -> bool:
    """True if a *fresh* SSH login works (not through the master, which may be stuck)."""
    try:
        res = subprocess.run(state.ssh_argv("-o", "ConnectTimeout=3", "-o", "ControlPath=none")
                             + ["true"],
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                             check=False)
        return res.returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _pump(proc: subprocess.Popen, input_data: bytes | None, capture: bool):
    """Threads that feed stdin and drain stdout/stderr of *proc*, so the caller's thread
    is free to watch the VM. (Retrying ``communicate(timeout=...)`` would stop writing
    pending input: CPython re-registers stdin only when input is passed again.)"""
    out: list[bytes] = []
    err: list[bytes] = []

    def feed():
        try:
            proc.stdin.write(input_data)
        except OSError:
            pass
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass

    def drain(stream, sink):
        for chunk in iter(lambda: stream.read1(65536), b""):
            sink.append(chunk)

    threads = []
    if proc.stdin is not None:
        threads.append(threading.Thread(target=feed, daemon=True))
    if capture:
        threads += [threading.Thread(target=drain, args=(proc.stdout, out), daemon=True),
                    threading.Thread(target=drain, args=(proc.stderr, err), daemon=True)]
    for t in threads:
        t.start()
    return threads, out, err


def _watch(state: VMState, proc: subprocess.Popen, timeout: float | None, capture: bool,
           input_data: bytes | None):
    """Wait for ssh *proc* while watching QEMU and the console; returns (rc, out, err)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    threads, out, err = _pump(proc, input_data, capture)

    def stop():
        proc.kill()
        proc.wait()
        for t in threads:
            t.join(timeout=2)

    while True:
        try:
            proc.wait(timeout=0.1)
            for t in threads:
                t.join(timeout=5)
            return proc.returncode, b"".join(out), b"".join(err)
        except subprocess.TimeoutExpired:
            pass
        fault = qemu.find_fault(console_text(state))
        if fault or not is_running(state):
            stop()
            _teardown(state)
            raise crash_error(state, "crashed" if fault else "is gone (QEMU exited)", fault=fault)
        if deadline is not None and time.monotonic() > deadline:
            stop()
            if _probe_answers(state):
                raise VMError(f"command timed out after {timeout:g}s in VM {state.name!r}",
                              hint="the VM still answers; raise --timeout or check the command")
            _refuse_unless_ready(state, f"did not answer within {timeout:g}s")
            _teardown(state)
            raise crash_error(state, f"stopped answering (command timed out after {timeout:g}s)")


def exec(vm: str, cmd: str | list[str], timeout: float | None = None, *, capture: bool = True,
         input: bytes | str | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run *cmd* (a shell string, or an argv that is quoted for you) in VM *vm* as root.

    With ``capture`` the output is returned (text), else it streams to our stdout/stderr.
    Raises VMError if the VM is gone, crashes meanwhile, or stops answering;
    with *check*, also if the command exits non-zero."""
    state = require(vm)
    command = cmd if isinstance(cmd, str) else shlex.join(cmd)
    data = input.encode() if isinstance(input, str) else input
    # over the guest SSH server's exec limit the command itself goes over stdin
    request, as_input = remote.exec_request(command)
    if as_input is not None:
        if data is not None:
            raise VMError(f"a {len(command.encode())}-byte command cannot also take stdin "
                          f"(commands over {remote.MAX_EXEC} bytes are sent over it)",
                          hint="put the command in a file (copy_to) and run that")
        data = as_input
    argv = state.ssh_argv() + [request]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.PIPE if capture else None)
    rc, out, err = _watch(state, proc, timeout, capture, data)
    if rc == 255 and not _master_alive(state):
        _check_transport(state, err)
    res = subprocess.CompletedProcess(argv, rc, out.decode(errors="replace"),
                                      err.decode(errors="replace"))
    if check and rc != 0:
        raise VMError(f"`{command}` failed in VM {vm!r} with exit {rc}",
                      detail=(res.stderr or res.stdout).strip()[-2000:],
                      hint=f"its output is above; try it by hand: invoke vm-ssh --vm={vm}")
    return res


_NOT_READY = {"booting": "still starting",
              "saving": "paused while the first vm-up of its kernel saves its state"}


def _owner_hint(vm: str) -> str:
    return (f"wait for the `invoke vm-up --vm={vm}` that handles it; if none runs (an "
            f"interrupted start or save), run `invoke vm-down --vm={vm}`")


def _refuse_unless_ready(state: VMState, what: str, detail: str = ""):
    """Before tearing down a VM that stopped answering: a VMError, the VM left alone,
    unless ``vm.json`` still records *state*'s launch as ready. A VM booting again or
    paused while its state is saved belongs to the ``vm-up`` doing that."""
    now = load(state.name)
    if now is None:
        raise VMError(f"VM {state.name!r} {what}; it is gone now (stopped elsewhere)",
                      hint=f"run `invoke vm-up --vm={state.name}` for a new one", detail=detail)
    if now.started_at != state.started_at or now.status != "ready":
        status = _NOT_READY.get(now.status, now.status) if now.status != "ready" else "started again"
        raise VMError(f"VM {state.name!r} {what}; it is {status} now, so it was left alone",
                      hint=_owner_hint(state.name), detail=detail)


def _master_alive(state: VMState) -> bool:
    """True if the SSH master still holds its connection to the guest: a command that
    exited 255 through it did so itself (ssh's own failures take the master down)."""
    try:
        return subprocess.run(state.ssh_argv("-O", "check"), stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=5, check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _check_transport(state: VMState, err: bytes):
    """After ssh itself failed: raise if the guest crashed (a fault may still be on its
    way to the console) or stopped answering; return if a fresh login works. A VM
    that is not (or no longer) ready, one being saved or booted again, is not
    torn down: its ``vm-up`` owns it."""
    settle = time.monotonic() + 2.5
    while time.monotonic() < settle:
        check_health(state)
        time.sleep(0.05)
    if _probe_answers(state):
        return
    _refuse_unless_ready(state, "did not answer SSH", err.decode(errors="replace"))
    _teardown(state)
    raise crash_error(state, "stopped answering SSH", extra=err.decode(errors="replace"))


def copy_to(vm: str, src: str | Path, dst: str, *, mode: int | None = None) -> None:
    """Copy host file *src* to *dst* in VM *vm* (over the SSH master, no scp/sftp)."""
    src = Path(src)
    if not src.is_file():
        raise VMError(f"cannot copy {src} into VM {vm!r}: no such file on the host",
                      hint="give the path of an existing host file")
    mode = mode if mode is not None else src.stat().st_mode & 0o777
    q = shlex.quote(dst)
    exec(vm, f"cat > {q}.nflab-tmp && chmod {mode:o} {q}.nflab-tmp && mv -f {q}.nflab-tmp {q}",
         timeout=120, input=src.read_bytes(), check=True)


def ssh_interactive(vm: str) -> int:
    """Open an interactive shell in VM *vm*; returns ssh's exit status."""
    state = require(vm)
    return subprocess.call(state.ssh_argv("-t"))


def host_spec(vm: str = "default") -> str:
    """testinfra host spec of running VM *vm*."""
    return require(vm).testinfra_spec

