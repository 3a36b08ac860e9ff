"""Pure parts of the boot pieces and VM bookkeeping: modules.dep ordering, the cpio
writer, the rootfs recipe hash, ssh_config and state files."""

import gzip
import io
import lzma
import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import zstandard

from ground.errors import VMError
from vm import initramfs, lab, rootfs
from vm.qemu import probe_pvh_entry

DEP_61 = """\
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/netfilter/x_tables.ko:
"""

DEP_612 = """\
kernel/drivers/virtio/virtio_mmio.ko.xz:
kernel/drivers/block/virtio_blk.ko.xz:
kernel/net/core/failover.ko.xz:
kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz
kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz
"""


def test_module_name():
    assert initramfs.module_name("kernel/drivers/virtio/virtio_pci.ko.xz") == "virtio_pci"
    assert initramfs.module_name("kernel/drivers/char/hw_random/virtio-rng.ko") == "virtio_rng"


def assert_deps_first(order, dep):
    for i, name in enumerate(order):
        for d in dep[name][1]:
            assert initramfs.module_name(d) in order[:i], f"{d} must load before {name}"


def test_load_order_61_dependencies_first_each_once():
    dep = initramfs.parse_modules_dep(DEP_61)
    order = initramfs.load_order(dep)
    assert len(order) == len(set(order))
    assert_deps_first(order, dep)
    assert {"virtio_mmio", "virtio_pci", "virtio_blk", "virtio_net"} <= set(order)
    assert "x_tables" not in order


def test_load_order_612_skips_builtins():
    dep = initramfs.parse_modules_dep(DEP_612)
    order = initramfs.load_order(dep)
    # virtio, virtio_ring and virtio_pci are built into 6.12: nothing to load
    assert order == ["virtio_mmio", "virtio_blk", "failover", "net_failover", "virtio_net"]


def test_load_order_detects_loops():
    dep = initramfs.parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(VMError, match="loop"):
        initramfs.load_order(dep, wanted=("a",))


@pytest.mark.skipif(not shutil.which("cpio"), reason="needs cpio")
def test_cpio_writer_output_is_read_by_gnu_cpio(tmp_path):
    buf = io.BytesIO()
    w = initramfs.CpioWriter(buf)
    w.dir("bin")
    w.chardev("dev/console", 5, 1)
    w.file("init", b"#!/bin/sh\necho hi\n", 0o755)
    w.symlink("bin/sh", "busybox")
    w.file("odd", b"x" * 3)
    w.close()
    data = buf.getvalue()
    assert len(data) % 512 == 0
    res = subprocess.run(["cpio", "-itv"], input=data, capture_output=True, check=True)
    listing = res.stdout.decode()
    assert "init" in listing and "dev/console" in listing and "bin/sh -> busybox" in listing
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "init", "odd"], input=data, cwd=out, check=True)
    assert (out / "init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.access(out / "init", os.X_OK)
    assert (out / "odd").read_bytes() == b"xxx"


def test_pvh_note_detection_rejects_non_elf():
    assert not initramfs._has_pvh_note(b"MZ" + b"\0" * 100)


def test_rootfs_recipe_hash_follows_recipe(monkeypatch):
    monkeypatch.setattr(rootfs, "plugin_xtables_version", lambda: "1.8.9-2")
    base = rootfs.recipe()
    assert rootfs.recipe_hash(base) == rootfs.recipe_hash(rootfs.recipe())
    more = dict(base, packages=sorted(base["packages"] + ["strace"]))
    assert rootfs.recipe_hash(more) != rootfs.recipe_hash(base)
    other_host = dict(base, xtables="1.8.10-1")
    assert rootfs.recipe_hash(other_host) != rootfs.recipe_hash(base)


def test_rootfs_recipe_hash_follows_guest_file_contents(monkeypatch, tmp_path):
    """An edit to any guest file the image holds (init.sh, sshd.conf, ...) names a new
    cache entry, so the cached rootfs is rebuilt with it."""
    monkeypatch.setattr(rootfs, "plugin_xtables_version", lambda: "1.8.9-2")
    guest = tmp_path / "guest"
    shutil.copytree(rootfs.GUEST_DIR, guest)
    monkeypatch.setattr(rootfs, "GUEST_DIR", guest)
    base = rootfs.recipe_hash()
    assert rootfs.recipe_hash() == base
    for name in rootfs.GUEST_FILES:
        path = guest / name
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        assert rootfs.recipe_hash() != base, f"an edit to {name} keeps the rootfs cache entry"
        path.write_bytes(original)
        assert rootfs.recipe_hash() == base


def test_rootfs_guest_files_are_the_guest_dir():
    """Every file in vm/guest/ goes into the rootfs image (and so into its recipe hash),
    except the initramfs's /init: it is in the initramfs, whose own recipe hashes it."""
    in_initramfs = {initramfs.INIT_SCRIPT.name}
    assert in_initramfs == {"initramfs-init.sh"}
    on_disk = {p.name for p in rootfs.GUEST_DIR.iterdir() if p.is_file()}
    assert set(rootfs.GUEST_FILES) == on_disk - in_initramfs


def test_rootfs_mirror_from_host_apt_sources(monkeypatch, tmp_path):
    monkeypatch.delenv("NFLAB_MIRROR", raising=False)
    monkeypatch.delenv("NFLAB_DEBIAN_MIRROR", raising=False)
    monkeypatch.delenv("NFLAB_USERLAND", raising=False)
    deb822 = tmp_path / "debian.sources"
    deb822.write_text("Types: deb\nURIs: http://other.example/x\nSuites: trixie\n\n"
                      "Types: deb\nURIs: http://mirror.example/debian\n"
                      "Suites: bookworm bookworm-updates\nComponents: main\n")
    assert rootfs.mirror([deb822]) == "http://mirror.example/debian"
    one_line = tmp_path / "sources.list"
    one_line.write_text("# x\ndeb [arch=amd64] http://line.example/debian bookworm main\n")
    assert rootfs.mirror([one_line, deb822]) == "http://line.example/debian"
    assert rootfs.mirror([tmp_path / "missing"]) is None
    monkeypatch.setenv("NFLAB_MIRROR", "http://env.example/debian")
    assert rootfs.mirror([deb822]) == "http://env.example/debian"


@pytest.mark.parametrize("name", ["default", "k6-12", "a_b", "X1"])
def test_vm_names_ok(name):
    assert lab.check_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "a b", "-x", "x" * 33, "a/b"])
def test_vm_names_rejected(name):
    with pytest.raises(VMError):
        lab.check_name(name)


def test_lab_ssh_key_is_rsa_made_once(monkeypatch, tmp_path):
    """The login key is made on first use (RSA: cheaper for the guest's sshd to verify
    under TCG than ed25519), kept private, and reused."""
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    key, blob = lab.ssh_key()
    assert key == tmp_path / "ssh" / "id_rsa" and (key.stat().st_mode & 0o777) == 0o600
    assert blob.startswith("AAAAB3NzaC1yc2E")   # what the initramfs /init tells ssh-rsa by
    bits = subprocess.run(["ssh-keygen", "-l", "-f", str(key)], capture_output=True, text=True,
                          check=True).stdout.split()[0]
    assert bits == str(lab.SSH_KEY_BITS) == "3072"
    assert lab.ssh_key() == (key, blob)
    key.with_suffix(".pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA x\n")
    with pytest.raises(VMError, match="not an ssh-rsa public key"):
        lab.ssh_key()


def test_ssh_config_has_what_testinfra_needs(tmp_path):
    path = lab.write_ssh_config("k1", tmp_path, 40022, Path("/c/ssh/id_ed25519"))
    text = path.read_text()
    for line in ("Host nflab-k1", "HostName 127.0.0.1", "Port 40022", "User root",
                 "IdentityFile /c/ssh/id_ed25519", "StrictHostKeyChecking no",
                 "UserKnownHostsFile /dev/null", "LogLevel ERROR", "ControlMaster auto",
                 f"ControlPath {tmp_path}/ssh.ctl", "ControlPersist 60", "BatchMode yes"):
        assert line in text
    # ssh itself accepts the file
    res = subprocess.run(["ssh", "-G", "-F", str(path), "nflab-k1"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "port 40022" in res.stdout


def test_control_path_stays_short(tmp_path):
    deep = tmp_path / ("d" * 120)
    assert len(lab._control_path(deep)) + 17 <= 107
    assert lab._control_path(Path("/c/vms/x")) == "/c/vms/x/ssh.ctl"
    # ssh binds "<ControlPath>.<16 random chars>" first: 90 bytes is the longest that fits
    at_limit = Path("/" + "c" * (90 - len("/ssh.ctl") - 1))
    assert lab._control_path(at_limit) == f"{at_limit}/ssh.ctl"
    assert lab._control_path(Path(f"{at_limit}x")).startswith("/tmp/nflab-ssh-")


def test_pid_alive_checks_the_vm_dir(tmp_path):
    assert lab.pid_alive(os.getpid())
    assert not lab.pid_alive(os.getpid(), tmp_path / "not-my-vm")
    assert not lab.pid_alive(0)
    assert not lab.pid_alive(2 ** 22 + 12345)


def test_pid_alive_names_a_vm_dir_whole_not_as_a_prefix(tmp_path):
    """QEMU of VM "ab" is not VM "a"'s: its command line names files inside ab/."""
    # sh stays the process (a command follows the sleep), its argv names ab/console.log
    proc = subprocess.Popen(["sh", "-c", "sleep 30; :", f"{tmp_path}/ab/console.log"])
    try:
        deadline = time.monotonic() + 10
        while b"console.log" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the child never ran sh"
            time.sleep(0.01)
        assert lab.pid_alive(proc.pid, tmp_path / "ab")
        assert not lab.pid_alive(proc.pid, tmp_path / "a")
    finally:
        proc.kill()
        proc.wait()


ELF = b"\x7fELF" + bytes(range(256)) * 40
PACKERS = {".ko": bytes, ".ko.xz": lzma.compress, ".ko.gz": gzip.compress,
           # a streamed frame records no content size, as zstd's own CLI writes it
           ".ko.zst": lambda b: (lambda c: c.compress(b) + c.flush())(
               zstandard.ZstdCompressor().compressobj())}


def test_modules_are_read_whatever_their_compression(tmp_path):
    for suffix, pack in PACKERS.items():
        path = tmp_path / f"m{suffix}"
        path.write_bytes(pack(ELF))
        assert initramfs.read_module(path) == ELF, suffix
    with pytest.raises(VMError, match="unknown module compression"):
        (tmp_path / "m.ko.bz2").write_bytes(b"x")
        initramfs.read_module(tmp_path / "m.ko.bz2")


def test_the_modules_image_tree_holds_every_module_decompressed(tmp_path):
    src, stage = tmp_path / "src", tmp_path / "stage"
    for i, (suffix, pack) in enumerate(PACKERS.items()):
        d = src / "kernel" / f"d{i}"
        d.mkdir(parents=True)
        (d / f"m{i}{suffix}").write_bytes(pack(ELF + bytes([i])))
    (src / "modules.order").write_text("kernel/d0/m0.ko\n")
    (src / "build").symlink_to("/usr/src/linux-headers-x")     # dangling on the host
    (src / "kernel/d1/link").symlink_to("../d0")
    initramfs._stage_modules(src, stage)
    files = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file() and not p.is_symlink())
    assert files == ["kernel/d0/m0.ko", "kernel/d1/m1.ko", "kernel/d2/m2.ko", "kernel/d3/m3.ko",
                     "modules.order"]
    for i in range(4):
        assert (stage / f"kernel/d{i}/m{i}.ko").read_bytes() == ELF + bytes([i])
    assert os.readlink(stage / "build") == "/usr/src/linux-headers-x"
    assert os.readlink(stage / "kernel/d1/link") == "../d0"
    assert (stage / "modules.order").read_text() == "kernel/d0/m0.ko\n"
    # a plain module is linked; what depmod rewrites in the stage is a copy of its own
    assert (stage / "kernel/d0/m0.ko").stat().st_ino == (src / "kernel/d0/m0.ko").stat().st_ino
    assert (stage / "modules.order").stat().st_ino != (src / "modules.order").stat().st_ino


def test_state_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    d = lab.vm_dir("s1")
    d.mkdir(parents=True)
    st = lab.VMState(name="s1", dir=str(d), spec="6.1", release="6.1.0-56-cloud-amd64", pid=1,
                     ports={"ssh": 1, "wire": {"eth1": {"guest": 2, "host": 3, "mac": "m"}}},
                     ssh_config=str(d / "ssh_config"), host="nflab-s1", accel="tcg",
                     machine="microvm", started_at=0.0)
    lab._save(st)
    again = lab.load("s1")
    assert again == st
    assert again.wire["eth1"].host == 3
    assert again.testinfra_spec == f"ssh://nflab-s1?ssh_config={d}/ssh_config"
    assert [s.name for s in lab.all_states()] == ["s1"]


def test_require_unknown_vm_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    with pytest.raises(VMError, match="not running") as exc:
        lab.require("nope")
    assert "vm-up --vm=nope" in exc.value.hint


def test_a_vmlinux_that_does_not_boot_at_its_pvh_entry_is_refused(tmp_path):
    """The PVH probe runs the real QEMU: a file that is no kernel never prints."""
    bogus = tmp_path / "vmlinux"
    bogus.write_bytes(b"\x7fELF" + bytes(60))
    ok, reason = probe_pvh_entry(bogus, timeout=5)
    assert not ok and ("PVH entry" in reason), reason


@pytest.mark.parametrize("current,walks", [(True, [False]), (False, [False, True])])
def test_a_boot_walks_the_kernel_entry_only_to_build_boot_files_from_it(monkeypatch, current, walks):
    """The walk of every file of a kernel entry (0.05 s) is left out of a boot whose
    boot files are current; boot files about to be built from the entry get it."""
    seen = []
    def get(spec, *, progress=None, listing=True):
        seen.append(listing)
        return f"kernel of {spec}"
    monkeypatch.setattr(lab.kernels, "get", get)
    monkeypatch.setattr(lab.initramfs, "current", lambda kernel: current)
    assert lab._kernel_for_boot("6.12", print) == "kernel of 6.12"
    assert seen == walks


def test_the_initramfs_links_every_applet_its_busybox_has_and_its_init_parses():
    busybox = initramfs._busybox()
    names = initramfs.applets(busybox)
    # what the initramfs /init runs, linked at build time (no --install at boot)
    assert {"sh", "mount", "insmod", "switch_root", "ip", "findfs", "usleep"} <= set(names)
    assert "busybox" not in names and len(names) == len(set(names))
    res = subprocess.run([str(busybox), "sh", "-n", str(initramfs.INIT_SCRIPT)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def test_a_login_that_stalls_past_its_timeout_is_not_ready_yet(monkeypatch):
    """A guest whose sshd took the connection and stalled: the login is retried
    until the boot budget says why it failed, not a raw TimeoutExpired."""
    def stalls(argv, **kw):
        raise subprocess.TimeoutExpired(argv, kw["timeout"])

    monkeypatch.setattr(lab.subprocess, "run", stalls)
    state = SimpleNamespace(name="x", release="r", ssh_argv=lambda: ["ssh", "nflab-x"])
    assert lab._login(state, 1, time.monotonic() + 1, clock=None) is False


def test_kill_reaps_a_qemu_that_exited_by_itself(tmp_path):
    proc = subprocess.Popen(["true"])
    stat = Path(f"/proc/{proc.pid}/stat")
    while stat.read_text().split(")")[1].split()[0] != "Z":     # exited, not reaped
        time.sleep(0.01)
    lab._children["exited"] = proc
    lab._kill(proc.pid, tmp_path)
    assert "exited" not in lab._children and proc.returncode == 0
    assert not stat.exists()
