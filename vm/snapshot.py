"""Post-boot snapshots: a saved VM state from which a clean guest is ready in
well under the time of a cold boot.

A snapshot is the state of a lab VM right after it became ready (sshd up, all
vCPUs online, no SSH connection open), written by QEMU's migration to a file
(``migrate "exec:cat > FILE"``). The guest is stopped first, as ``virsh save``
and Firecracker's snapshots do: the file is then one consistent copy of a VM
that does not run, with no live pre-copy whose dirty-page tracking must catch
every write of a running vCPU (a suspected, unproven cause of one corrupted
restored guest in CI, README "Fixed in stop 34"). Every lab QEMU runs with
``-global migration.store-global-state=off``: the stream then carries no run
state, and the destination starts the guest as soon as it is loaded, as it
would after a live migration. A later VM is a new QEMU with the *same device
layout* started with ``-incoming`` on that file (``qemu._incoming``). What may
differ per VM is host-side only: the user-net ``hostfwd`` port and the dgram
wire ports are QEMU command-line properties, not migrated state (libslirp
saves only guestfwd sockets), and the console/QMP/pid paths. The root image is
never written (readonly=on, the guest keeps its writes in a tmpfs overlay), so
the saved page cache stays consistent with the disk.

After a restore the guest's clocks continue from the moment of the save (TCG
migrates the TSC offset), so ``vm/lab.py`` sets the guest's wall clock from the
host in its readiness command. All guests restored from one file share the
kernel's RNG state and sshd's host keys; for a lab VM that is accepted.

Files, per kernel in ``boot_dir(release)/snapshots/`` (so rebuilding the boot
pieces of that kernel removes them):

* ``<key>.state``  the migration stream;
* ``<key>.json``   what the key covers, written last: its presence marks the
  state complete.

The key hashes the canonical QEMU command (machine, CPU, memory, devices, kernel
command line with the lab key, file paths), the identity (size, mtime) of the
kernel, initramfs, rootfs and modules images, the QEMU binary and
``SNAPSHOT_VERSION``; any change selects another file. Saving one prunes the
others of that kernel whose inputs changed and keeps the newest ``KEEP``, so a
lab that switches userland or SSH server (``NFLAB_USERLAND``, ``NFLAB_SSHD``)
restores each; a restore holds a shared lock on its ``.<key>.lock`` while QEMU
reads the state, and a prune leaves a state so held alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ground.errors import VMError
from ground.proc import file_lock, try_lock

from . import initramfs, qemu

# 2: saved from a stopped guest (1 was a live pre-copy of a running one)
SNAPSHOT_VERSION = 2
SAVE_TIMEOUT = 120.0
SAVE_FD = "nflab-state"    # the name QMP's getfd gives the state file's descriptor
# a restore that is not ready within this many seconds falls back to a cold boot
RESTORE_BUDGET = {"tcg": 30.0, "kvm": 20.0}
KEEP = 3    # saved states kept per kernel (~90 MB each): variants a lab alternates between


QMP_HINT = ("QEMU stopped or its control socket went away: see qemu.log and console.log in the VM's "
            "directory; NFLAB_SNAPSHOT=0 (or --no-snapshot) boots cold without saved states")

def enabled(flag: bool | None) -> bool:
    """*flag* if given, else ``$NFLAB_SNAPSHOT`` (``0``/``no``/``off``/``false`` turn
    restores off), else on.

    Restores were opt-in while one whole-catalog run on a restored 6.1 guest had
    stalled (RCU "kthread timer wakeup didn't happen", soft lockups). That run
    used multi-threaded TCG, which lets a vCPU run a stale translation of the
    code the other one re-patches (the tracer's netdev ingress static key); the
    soak test reproduces the same console on a restored guest and on a cold one
    with ``NFLAB_TCG_THREAD=multi``, and passes on both single-threaded, the
    kit's default since (README, "Post-boot snapshot")."""
    if flag is not None:
        return flag
    value = os.environ.get("NFLAB_SNAPSHOT", "1").strip().lower()
    return value not in ("0", "no", "off", "false")


def _identity(path: Path) -> list:
    st = Path(path).stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _qemu_identity() -> list:
    exe = shutil.which(qemu.QEMU) or qemu.QEMU
    try:
        return _identity(Path(exe))
    except OSError:
        return [exe]


# what a -cpu host (KVM) guest saw of the host CPU at boot: QEMU restores such a state
# only on a host with the same CPU, microcode and KVM (the host kernel decides which
# CPUID bits KVM offers); a state saved elsewhere (a shared or CI-restored cache) or
# before a host kernel update is another snapshot
_HOST_CPU_FIELDS = ("vendor_id", "cpu family", "model", "model name", "stepping", "microcode", "flags")


def _host_cpu() -> list:
    seen = "\n".join(l for l in qemu.first_cpu_info().splitlines() if l.split(":", 1)[0].strip() in _HOST_CPU_FIELDS)
    return [os.uname().release, hashlib.sha256(seen.encode()).hexdigest()[:16]]


def recipe(launch: qemu.LaunchSpec) -> dict:
    """What a saved state depends on (the per-VM parts of *launch* normalised away;
    under KVM also the host CPU and kernel, see ``_host_cpu``)."""
    canon = replace(
        launch, name="snapshot", vmdir=Path("/nflab-snapshot"), incoming=None,
        ports=qemu.Ports(ssh=1, wire={n.name: qemu.Wire(guest=2, host=3, mac=n.mac)
                                      for n in qemu.WIRE_NICS}))
    rec = {
        "version": SNAPSHOT_VERSION,
        "command": qemu.build_command(canon),
        "files": [_identity(p) for p in (launch.kernel, launch.initrd, launch.rootfs,
                                         launch.modules_img)],
        "qemu": _qemu_identity(),
    }
    if launch.accel == "kvm":     # TCG's qemu64 CPU is the same on every host: keys unchanged
        rec["host"] = _host_cpu()
    return rec


def key(rec: dict) -> str:
    return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()[:16]


def snapshot_dir(release: str) -> Path:
    return initramfs.boot_dir(release) / "snapshots"


def paths(release: str, k: str) -> tuple[Path, Path]:
    """(state file, manifest) of snapshot *k* of kernel *release*."""
    d = snapshot_dir(release)
    return d / f"{k}.state", d / f"{k}.json"


def lock_path(release: str, k: str) -> Path:
    """Held exclusively while snapshot *k* is saved or pruned, shared while it is restored."""
    return snapshot_dir(release) / f".{k}.lock"


@contextmanager
def reading(release: str, k: str):
    """Hold snapshot *k* for a restore: no prune removes it meanwhile. Waits for a save
    or prune of it under way; yields whether its state file is (still) there."""
    with file_lock(lock_path(release, k), shared=True):
        yield paths(release, k)[0].is_file()


def lookup(release: str, launch: qemu.LaunchSpec) -> tuple[str, dict, Path | None]:
    """(key, recipe, state file if a complete one is cached else None)."""
    rec = recipe(launch)
    k = key(rec)
    state, manifest = paths(release, k)
    try:
        data = json.loads(manifest.read_text())
        ok = data.get("key") == k and state.is_file() and state.stat().st_size == data.get("size")
    except (OSError, json.JSONDecodeError):
        ok = False
    return k, rec, state if ok else None


def discard(release: str, k: str):
    for p in paths(release, k):
        p.unlink(missing_ok=True)


def prune(release: str, saved: str, keep: int = KEEP):
    """After saving state *saved* of *release*: keep it and the newest others whose
    inputs are unchanged, *keep* in all; remove the rest, those whose inputs
    changed (a rebuilt rootfs, another QEMU) and state files a save that died
    left without a manifest or half-written. One a restore is reading stays."""
    d = snapshot_dir(release)
    if not d.is_dir():
        return
    kept = 1
    for manifest in sorted(d.glob("*.json"), key=_saved_at, reverse=True):
        if manifest.stem == saved:
            continue
        if kept < keep and _inputs_current(manifest):
            kept += 1
        else:
            _discard_unused(release, manifest.stem)
    for state in d.glob("*.state"):
        if state.stem != saved and not state.with_suffix(".json").exists() and _age(state) > SAVE_TIMEOUT:
            _discard_unused(release, state.stem)
    for tmp in d.glob(".*.*.tmp"):      # a save killed (SIGKILL, OOM) before it could clean up
        if _age(tmp) > SAVE_TIMEOUT:
            tmp.unlink(missing_ok=True)


def _saved_at(manifest: Path) -> float:
    try:
        return float(json.loads(manifest.read_text())["saved_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _inputs_current(manifest: Path) -> bool:
    """True if the boot files, QEMU (and under KVM the host CPU) the saved state of
    *manifest* was made from are still those a boot would use."""
    try:
        rec = json.loads(manifest.read_text())["recipe"]
        return (all(_identity(Path(f[0])) == f for f in rec["files"])
                and rec["qemu"] == _qemu_identity()
                and ("host" not in rec or rec["host"] == _host_cpu()))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def _discard_unused(release: str, k: str):
    with try_lock(lock_path(release, k)) as free:
        if free:    # the lock file stays: a saver waiting on it must find the same file
            discard(release, k)


# ---------------------------------------------------------------- QMP

def qmp(sock_path: Path, *commands: tuple[str, dict | None], timeout: float = 5.0,
        fds: dict[str, int] | None = None) -> list:
    """Run QMP *commands* (name, arguments) in one session; their ``return`` values.
    *fds*: a descriptor sent (SCM_RIGHTS) with the command of that name, as
    ``getfd`` wants. Raises VMError on a QMP error reply or a dead socket."""
    out = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock_path))
            f = s.makefile("rwb")
            f.readline()  # greeting
            for name, args in (("qmp_capabilities", None), *commands):
                msg = {"execute": name}
                if args:
                    msg["arguments"] = args
                _send(s, f, json.dumps(msg).encode() + b"\n", (fds or {}).get(name))
                while True:  # skip asynchronous events
                    line = f.readline()
                    if not line:
                        raise VMError(f"QMP closed the connection during {name}", hint=QMP_HINT)
                    reply = json.loads(line)
                    if "event" not in reply:
                        break
                if "error" in reply:
                    raise VMError(f"QMP {name} failed: {reply['error'].get('desc', reply['error'])}",
                                  hint=QMP_HINT)
                if name != "qmp_capabilities":
                    out.append(reply.get("return"))
    except (OSError, ValueError) as exc:
        raise VMError(f"QMP on {sock_path} failed: {exc}", hint=QMP_HINT) from exc
    return out


def _send(s: socket.socket, f, data: bytes, fd: int | None):
    if fd is None:
        f.write(data)
        f.flush()
    else:
        socket.send_fds(s, [data], [fd])


def save(qmp_socket: Path, release: str, k: str, rec: dict, *, progress=print) -> Path:
    """Write the state of the running VM behind *qmp_socket* as snapshot *k*. The VM
    ends paused (the caller stops it). Returns the state file."""
    state, manifest = paths(release, k)
    state.parent.mkdir(parents=True, exist_ok=True)
    tmp = state.with_name(f".{k}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    t0 = time.monotonic()
    try:
        _migrate_to(qmp_socket, tmp)
        deadline = time.monotonic() + SAVE_TIMEOUT
        while True:
            info = qmp(qmp_socket, ("query-migrate", None))[0] or {}
            status = info.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise VMError(f"saving the VM state {status}: "
                              f"{info.get('error-desc', '')}".rstrip(": "), hint=QMP_HINT)
            if time.monotonic() > deadline:
                raise VMError(f"saving the VM state timed out after {SAVE_TIMEOUT:g}s "
                              f"(migration {status or 'not started'})", hint=QMP_HINT)
            time.sleep(0.05)
        size = tmp.stat().st_size
        tmp.rename(state)
        manifest.write_text(json.dumps({"key": k, "size": size, "recipe": rec,
                                        "saved_at": time.time(),
                                        "save_seconds": round(time.monotonic() - t0, 2)},
                                       indent=2) + "\n")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    prune(release, saved=k)
    progress(f"saved the ready VM state ({size >> 20} MiB) to {state} "
             f"in {time.monotonic() - t0:.1f}s")
    return state


def _migrate_to(qmp_socket: Path, path: Path):
    """Stop the VM and start QEMU writing its state into *path*, through a descriptor
    passed over QMP (``fd:``): QEMU's own writes, so the file is whole when the
    migration reports ``completed`` (with ``exec:cat``, QEMU says so before it
    closes the pipe and waits for the ``cat``, which may still be writing)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        qmp(qmp_socket,
            ("stop", None),
            # default bandwidth cap is 32 MiB/s: lift it, the target is a local file
            ("migrate-set-parameters", {"max-bandwidth": 64 << 30}),
            ("getfd", {"fdname": SAVE_FD}),
            ("migrate", {"uri": f"fd:{SAVE_FD}"}),
            fds={"getfd": fd})
    finally:
        os.close(fd)
