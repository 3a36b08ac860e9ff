"""The pure parts of post-boot snapshots: what the key covers, the cache files,
the opt-out, and the readiness command a restored guest runs."""

import json
import os
from pathlib import Path

import pytest

from vm import lab, qemu, snapshot


def launch(tmp_path, **kw):
    files = {}
    for name in ("vmlinux", "initrd", "rootfs.img", "modules.img"):
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode())
    ports = qemu.Ports(ssh=kw.pop("ssh", 2222), wire={
        "eth1": qemu.Wire(guest=40001, host=40002, mac="52:54:00:00:01:01"),
        "eth2": qemu.Wire(guest=40003, host=40004, mac="52:54:00:00:02:01")})
    base = dict(name="a", vmdir=tmp_path / "vms/a", kernel=files["vmlinux"],
                initrd=files["initrd"], rootfs=files["rootfs.img"],
                modules_img=files["modules.img"], ssh_pubkey="AAAAKEY", ports=ports,
                tsc_khz=2600000)
    base.update(kw)
    return qemu.LaunchSpec(**base)


def test_key_ignores_what_differs_per_vm(tmp_path):
    a = launch(tmp_path)
    b = launch(tmp_path, name="b", vmdir=tmp_path / "vms/b", ssh=3333,
               incoming=tmp_path / "x.state")
    assert snapshot.key(snapshot.recipe(a)) == snapshot.key(snapshot.recipe(b))


@pytest.mark.parametrize("change", [
    dict(memory="2G"), dict(smp=1), dict(machine="pc"), dict(ssh_pubkey="OTHERKEY"),
    dict(extra_cmdline=("debug",)), dict(tsc_khz=3000000)])
def test_key_follows_the_device_layout_and_cmdline(tmp_path, change):
    assert snapshot.key(snapshot.recipe(launch(tmp_path))) != \
        snapshot.key(snapshot.recipe(launch(tmp_path, **change)))


@pytest.mark.parametrize("name", ["vmlinux", "initrd", "rootfs.img", "modules.img"])
def test_key_follows_the_boot_files(tmp_path, name):
    before = snapshot.key(snapshot.recipe(launch(tmp_path)))
    spec = launch(tmp_path)
    (tmp_path / name).write_bytes(b"rebuilt, another size")
    assert snapshot.key(snapshot.recipe(spec)) != before


def test_lookup_needs_a_complete_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path / "cache"))
    spec = launch(tmp_path)
    k, rec, path = snapshot.lookup("6.1.0-1-cloud-amd64", spec)
    assert path is None
    state, manifest = snapshot.paths("6.1.0-1-cloud-amd64", k)
    state.parent.mkdir(parents=True)
    state.write_bytes(b"QEVM" + b"\0" * 60)
    assert snapshot.lookup("6.1.0-1-cloud-amd64", spec)[2] is None  # no manifest yet
    manifest.write_text(json.dumps({"key": k, "size": 3}))
    assert snapshot.lookup("6.1.0-1-cloud-amd64", spec)[2] is None  # truncated state
    manifest.write_text(json.dumps({"key": k, "size": 64}))
    assert snapshot.lookup("6.1.0-1-cloud-amd64", spec)[2] == state
    other = state.with_name("0123456789abcdef.state")
    other.write_bytes(b"old")          # left by a save that died (no manifest) long ago
    os.utime(other, (0, 0))
    snapshot.prune("6.1.0-1-cloud-amd64", saved=k)
    assert state.exists() and not other.exists()
    snapshot.discard("6.1.0-1-cloud-amd64", k)
    assert not state.exists() and not manifest.exists()


@pytest.mark.parametrize("env,flag,want", [
    (None, None, True), ("0", None, False), ("off", None, False), ("false", None, False),
    ("no", None, False), ("1", None, True), ("on", None, True), ("", None, True),
    ("0", True, True), ("1", False, False), (None, False, False)])
def test_enabled_default_on_env_opt_out(monkeypatch, env, flag, want):
    if env is None:
        monkeypatch.delenv("NFLAB_SNAPSHOT", raising=False)
    else:
        monkeypatch.setenv("NFLAB_SNAPSHOT", env)
    assert snapshot.enabled(flag) is want


def test_ready_command_uses_builtins_and_sets_the_clock_after_restore():
    cold = lab._ready_command(2)
    assert "0-1" in cold and "/proc/sys/kernel/osrelease" in cold
    assert "uname" not in cold and "nproc" not in cold and "date" not in cold
    assert '"$c" != 0 ]' in lab._ready_command(1)
    warm = lab._ready_command(2, clock=1700000000.25)
    assert warm.startswith("date -u -s @1700000000.250 >/dev/null; ")


def test_ssh_config_pins_cheap_algorithms(tmp_path):
    text = lab.write_ssh_config("k1", tmp_path, 40022, Path("/c/ssh/id_ed25519")).read_text()
    # the default sntrup761x25519 key exchange costs ~0.3 s more per login under TCG
    assert "KexAlgorithms curve25519-sha256" in text
    assert "HostKeyAlgorithms ssh-ed25519" in text


@pytest.mark.parametrize("task_name", ["vm-up", "test", "workshop"])
def test_tasks_restore_by_default_and_take_no_snapshot(task_name):
    import copy

    import tasks
    from cli import snapshot_flag
    t = copy.copy(tasks.ns.tasks[task_name])
    t.help = dict(t.help or {})
    arg = {a.name: a for a in t.get_arguments()}["snapshot"]
    assert arg.default is True and arg.kind is bool     # invoke adds --no-snapshot for it
    assert "--no-snapshot" in arg.help
    assert snapshot_flag(True) is None                  # lab.up decides: on unless NFLAB_SNAPSHOT=0
    assert snapshot_flag(False) is False                # always a cold boot


def test_save_stops_the_guest_before_copying_it(tmp_path, monkeypatch):
    """The state is the copy of a stopped VM (no live pre-copy racing a running vCPU's
    stores), and every VM's QEMU drops the run state from the stream, so a restore
    of that stopped state still starts the guest."""
    sent = []

    def fake_qmp(sock, *commands, fds=None, **kw):
        for name, args in commands:
            sent.append(name)
            if name == "getfd":       # QEMU keeps its own copy of the descriptor
                held = os.dup(fds["getfd"])
            if name == "migrate":     # what QEMU writes through it
                assert args["uri"] == f"fd:{snapshot.SAVE_FD}"
                os.write(held, b"state")
                os.close(held)
        return [{"status": "completed"}] * len(commands)

    monkeypatch.setattr(snapshot.initramfs, "boot_dir", lambda r: tmp_path)
    monkeypatch.setattr(snapshot, "qmp", fake_qmp)
    state = snapshot.save(tmp_path / "qmp.sock", "r", "k", {}, progress=lambda m: None)
    assert state.read_bytes() == b"state"
    assert sent.index("stop") < sent.index("migrate"), sent
    cmd = qemu.build_command(launch(tmp_path))
    assert cmd[cmd.index("migration.store-global-state=off") - 1] == "-global"
