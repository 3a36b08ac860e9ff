"""The lab where a second review found it wrong (each test failed on the code
before the fix): vm-exec tearing down a VM that was still booting or being
saved, every guest exit 255 paying a settle and a fresh login, a pid-0 teardown
leaving its QEMU running, two suite runs sharing the default VM, a timed-out KVM
probe cached for good, one saved state kept per kernel, and run-private VM
folders left behind forever."""

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from ground.errors import NflabError, VMError
from nflab import suites
from nflab.start_gate import Gate
from vm import lab, qemu, snapshot
from ground.proc import file_lock, try_lock
from tests.unit.conftest import fake_qemu_process, fake_vm

PANIC = "[ 9.1] sysrq: Trigger a crash\n[ 9.1] Kernel panic - not syncing: sysrq triggered crash\n"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NFLAB_ACCEL", raising=False)
    return tmp_path / "cache"


def _state(vmdir, **kw):
    base = dict(name=vmdir.name, dir=str(vmdir), spec=None, release="r", ports={"ssh": 1},
                ssh_config=str(vmdir / "ssh_config"), host=f"nflab-{vmdir.name}",
                accel="tcg", machine="microvm", started_at=5.0)
    base.update(kw)
    return lab.VMState(**base)


@pytest.fixture
def vm(cache):
    with fake_vm("rv2") as running:
        yield running


# ---------------------------------------------------------------- 1: not ready, left alone

@pytest.mark.parametrize("status, said", [("booting", "is still starting"),
                                          ("saving", "is paused while the first vm-up")])
def test_require_refuses_a_vm_that_is_not_ready(vm, status, said):
    vmdir, proc = vm
    # QEMU started (pid recorded) and the guest still boots, or the first vm-up of the
    # kernel has paused it to save its state
    lab._save(_state(vmdir, pid=proc.pid, status=status))
    with pytest.raises(VMError, match=said) as err:
        lab.require("rv2")
    assert "vm-down" in err.value.hint
    assert proc.poll() is None and lab.load("rv2").status == status


FAKE_SSH = """#!/bin/sh
# ssh -O check: $FAKE_MASTER; a fresh login (ControlPath=none ... true): $FAKE_PROBE;
# a command: run $FAKE_HOOK, then exit $FAKE_RC
case " $* " in
  *" -O check "*) exit "$FAKE_MASTER" ;;
  *"ControlPath=none"*) exit "$FAKE_PROBE" ;;
esac
[ -n "$FAKE_HOOK" ] && sh -c "$FAKE_HOOK"
exit "$FAKE_RC"
"""


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH)
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    env = dict(FAKE_MASTER="255", FAKE_PROBE="255", FAKE_HOOK="", FAKE_RC="255")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return monkeypatch


def test_exec_never_tears_down_a_vm_that_went_to_be_saved(vm, fake_ssh):
    vmdir, proc = vm
    lab._save(_state(vmdir, pid=proc.pid, status="ready"))
    # the guest stops answering because vm-up paused it to save it (status "saving")
    fake_ssh.setenv("FAKE_HOOK", f"sed -i 's/\"ready\"/\"saving\"/' {vmdir}/vm.json")
    with pytest.raises(VMError, match="left alone"):
        lab.exec("rv2", "uname -r")
    assert proc.poll() is None, "exec killed the QEMU that vm-up is saving"
    assert lab.load("rv2").status == "saving"


def test_a_ready_vm_that_stopped_answering_is_still_torn_down(vm, fake_ssh):
    vmdir, proc = vm
    lab._save(_state(vmdir, pid=proc.pid, status="ready"))
    with pytest.raises(VMError, match="stopped answering SSH"):
        lab.exec("rv2", "uname -r")
    assert proc.wait(timeout=10) is not None and lab.load("rv2") is None


# ---------------------------------------------------------------- 6: exit 255 of the command

def test_a_command_that_exits_255_costs_no_settle(vm, fake_ssh):
    vmdir, proc = vm
    lab._save(_state(vmdir, pid=proc.pid, status="ready"))
    fake_ssh.setenv("FAKE_MASTER", "0")          # the master is up: the command itself said 255
    t0 = time.monotonic()
    res = lab.exec("rv2", "exit 255")
    assert res.returncode == 255 and time.monotonic() - t0 < 1.5, time.monotonic() - t0
    assert proc.poll() is None


# ---------------------------------------------------------------- 7: a pid-0 teardown

def test_down_stops_the_qemu_of_a_start_killed_before_it_saved_the_pid(vm):
    vmdir, proc = vm
    (vmdir / "qemu.pid").write_text(f"{proc.pid}\n")      # QEMU's own -pidfile
    lab._save(_state(vmdir, pid=0, status="booting"))
    lab.down("rv2")
    assert proc.wait(timeout=10) is not None, "the QEMU outlived vm-down"
    assert not (vmdir / "qemu.pid").exists() and lab.load("rv2") is None


# ---------------------------------------------------------------- 2: one run per default VM

def test_two_runs_never_share_the_default_vm(cache):
    kernel = type("K", (), {"release": "r"})()
    proc = fake_qemu_process(lab.vm_dir("default"))
    try:
        lab._save(_state(lab.vm_dir("default"), pid=proc.pid, status="ready"))
        with ExitStack() as a, ExitStack() as b:
            assert suites._running_default(kernel, a) == "default"
            assert suites._running_default(kernel, b) is None, "a second run took the default VM too"
        # the run lock is a flock: another process holding it counts too, and goes with it
        holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, sys, time
fd = os.open({str(lab.vms_dir() / '.default.run.lock')!r}, os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX); print("held", flush=True); time.sleep(60)"""],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        with ExitStack() as c:
            assert suites._running_default(kernel, c) is None
        holder.kill()
        holder.wait()
        with ExitStack() as d:
            assert suites._running_default(kernel, d) == "default"
    finally:
        proc.kill()
        proc.wait()


def test_a_second_run_naming_a_vm_in_use_stops_with_one_line(cache):
    """`invoke test --vm=X` (or two --keep runs of a kernel, one fixed name) while
    another run uses X: the second stops before it installs anything."""
    with ExitStack() as a, ExitStack() as b:
        suites._claim("it-x", a)
        with pytest.raises(NflabError, match="in use by another `invoke test` run") as info:
            suites._claim("it-x", b)
        assert "--vm" in info.value.hint
    with ExitStack() as c:      # the first run ended: its lock went with it
        suites._claim("it-x", c)


# ---------------------------------------------------------------- 3: a KVM probe that hung

def _accel_cache(cache, reason, age):
    cache.mkdir(parents=True, exist_ok=True)
    (cache / qemu.ACCEL_CACHE).write_text(json.dumps(
        {"key": qemu._accel_key(), "accel": "tcg", "reason": reason, "probed_at": time.time() - age}))


HUNG = "a KVM guest printed nothing within 6s of its probe boot (hangs)"   # what probe_kvm says


@pytest.mark.parametrize("reason, ttls, probes", [
    (HUNG, 0.01, 0),                                 # a recent timeout is believed
    (HUNG, 1.1, 1),                                  # an older one is probed again
    ("/dev/kvm is missing or not accessible", 10, 0),   # a real answer stays
])
def test_a_timed_out_kvm_probe_is_cached_for_a_while_only(cache, monkeypatch, reason, ttls, probes):
    _accel_cache(cache, reason, ttls * getattr(qemu, "HANG_TTL", 3600))
    seen = []
    monkeypatch.setattr(qemu, "probe_kvm", lambda *a, **k: seen.append(a) or (True, "KVM probe boot succeeded"))
    accel, why = qemu.choose_accel(Path("vmlinuz"), Path("initrd"), progress=lambda m: None)
    assert len(seen) == probes, why
    assert (reason == HUNG and not probes) == ("NFLAB_ACCEL=kvm" in why), why


def test_a_fresh_hung_probe_says_how_to_get_kvm_back(cache, monkeypatch):
    monkeypatch.setattr(qemu, "probe_kvm", lambda *a, **k: (False, HUNG))
    accel, why = qemu.choose_accel(Path("vmlinuz"), Path("initrd"), progress=lambda m: None)
    assert accel == "tcg" and "NFLAB_ACCEL=kvm" in why and "accel.json" in why, why


# ---------------------------------------------------------------- 4: saved states per kernel

def _saved(tmp_path, k: str, saved_at: float, files: list[Path]):
    state, manifest = snapshot.paths("r", k)
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_bytes(b"QEVM")
    rec = {"files": [snapshot._identity(f) for f in files], "qemu": snapshot._qemu_identity()}
    manifest.write_text(json.dumps({"key": k, "size": 4, "recipe": rec, "saved_at": saved_at}))
    return state


@pytest.fixture
def boot_files(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot.initramfs, "boot_dir", lambda r: tmp_path / "boot")
    files = [tmp_path / n for n in ("vmlinux", "rootfs-bookworm.img", "rootfs-trixie.img")]
    for f in files:
        f.write_bytes(f.name.encode())
    return files


def test_prune_keeps_the_newest_states_whose_inputs_are_current(tmp_path, boot_files):
    vmlinux, bookworm, trixie = boot_files
    for i in range(5):      # five variants (userland, sshd, ...) saved one after the other
        _saved(tmp_path, f"k{i}", 100.0 + i, [vmlinux, bookworm if i % 2 else trixie])
    snapshot.prune("r", saved="k4")
    left = sorted(p.stem for p in snapshot.snapshot_dir("r").glob("*.state"))
    assert left == ["k2", "k3", "k4"], left
    trixie.write_bytes(b"rebuilt trixie rootfs")     # k2 and k4 were made from the old one
    _saved(tmp_path, "k5", 200.0, [vmlinux, trixie])
    snapshot.prune("r", saved="k5")
    assert sorted(p.stem for p in snapshot.snapshot_dir("r").glob("*.state")) == ["k3", "k5"]


def test_prune_removes_what_a_killed_save_left_half_written(tmp_path, boot_files):
    state = _saved(tmp_path, "k0", 100.0, boot_files[:1])
    dead = state.with_name(".k1.4242.tmp")          # a save SIGKILLed mid-migration
    live = state.with_name(".k2.4243.tmp")          # a save under way now
    for f in (dead, live):
        f.write_bytes(b"QEVM half")
    old = time.time() - snapshot.SAVE_TIMEOUT - 60
    os.utime(dead, (old, old))
    snapshot.prune("r", saved="k0")
    assert not dead.exists() and live.exists() and state.exists()


def test_prune_leaves_a_state_a_restore_reads(tmp_path, boot_files):
    for i in range(4):
        _saved(tmp_path, f"k{i}", 100.0 + i, boot_files[:1])
    with snapshot.reading("r", "k0") as held:      # the oldest, being restored
        assert held
        snapshot.prune("r", saved="k3")
        assert snapshot.paths("r", "k0")[0].is_file()
    snapshot.prune("r", saved="k3")
    assert not snapshot.paths("r", "k0")[0].exists()


def test_a_restore_waits_for_a_prune_and_sees_the_state_gone(tmp_path, boot_files):
    _saved(tmp_path, "k0", 100.0, boot_files[:1])
    seen = []

    def restore():
        with snapshot.reading("r", "k0") as held:
            seen.append(held)

    with try_lock(snapshot.lock_path("r", "k0")) as pruning:
        assert pruning
        reader = threading.Thread(target=restore)
        reader.start()
        time.sleep(0.2)
        assert seen == [], "a restore read a state while a prune held it"
        snapshot.discard("r", "k0")
    reader.join(5)
    assert seen == [False], "a restore would read a state a prune deleted"


def test_a_restore_right_after_a_save_is_not_turned_away(tmp_path, boot_files):
    """The saver's own restore follows its save; another vm-up re-checking under the
    save lock in between must not make it think the state was removed (1 in 20 did)."""
    _saved(tmp_path, "k0", 100.0, boot_files[:1])
    with file_lock(snapshot.lock_path("r", "k0")):     # another vm-up re-checks ...
        seen = []

        def restore():
            with snapshot.reading("r", "k0") as held:
                seen.append(held)

        reader = threading.Thread(target=restore)
        reader.start()
        time.sleep(0.2)
    reader.join(5)                                       # ... and the restore waits for it
    assert seen == [True]


# ---------------------------------------------------------------- 5: run-private VM folders

def test_a_run_private_vm_leaves_no_folder_unless_it_faulted(cache, tmp_path):
    gone, faulted = lab.vm_dir("r-1-0"), lab.vm_dir("r-1-1")
    for d, console in ((gone, "nflab-init: ready after 1.0s\n"), (faulted, PANIC)):
        d.mkdir(parents=True)
        (d / "console.log").write_text(console)
        (lab.vms_dir() / f".{d.name}.lock").touch()
    shards = [suites._Shard(vm=d.name, files=[], junit=tmp_path / f"{d.name}.xml",
                            gate=Gate(tmp_path / f"gate-{d.name}"), booted_here=True, private=True)
              for d in (gone, faulted)]
    suites._clean_up(shards, tmp_path / "junit.xml", keep=False, forget=True, progress=lambda m: None)
    assert not gone.exists() and not (lab.vms_dir() / ".r-1-0.lock").exists()
    assert (faulted / "console.log").is_file(), "the console of a crashed VM is its post-mortem"


def test_a_run_that_did_not_end_keeps_the_console_its_error_names(cache, tmp_path):
    """A boot that timed out shows no fault, and its error's hint names console.log."""
    d = lab.vm_dir("r-2-0")
    d.mkdir(parents=True)
    (d / "console.log").write_text("[    0.000000] Linux version 6.12\n")
    shard = suites._Shard(vm=d.name, files=[], junit=tmp_path / "r.xml", gate=Gate(tmp_path / "g"),
                          booted_here=True, private=True)
    said = []
    suites._clean_up([shard], tmp_path / "junit.xml", keep=False, forget=False, progress=said.append)
    assert (d / "console.log").is_file()
    assert any(str(d) in m for m in said), said


def _aged(d: Path, days: float):
    t = time.time() - days * 86400
    for p in (*d.iterdir(), d):
        os.utime(p, (t, t))


def test_vm_up_prunes_old_folders_without_a_state(cache, vm):
    running, _ = vm
    lab._save(_state(running, pid=vm[1].pid, status="ready"))
    old, recent, busy = (lab.vm_dir(n) for n in ("old", "recent", "busy"))
    for d in (old, recent, busy):
        d.mkdir(parents=True)
        (d / "console.log").write_text("x\n")
        (lab.vms_dir() / f".{d.name}.lock").touch()
    for d in (old, busy, running):
        _aged(d, lab.STALE_DAYS + 1)
    with try_lock(lab.vms_dir() / ".busy.lock") as held:     # a vm-up of "busy" runs
        assert held
        lab.prune_stale()
    assert not old.exists() and not (lab.vms_dir() / ".old.lock").exists()
    assert recent.is_dir() and busy.is_dir() and (running / "vm.json").is_file()
