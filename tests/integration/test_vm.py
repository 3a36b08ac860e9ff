"""The lab VM for real: boot 6.1 and 6.12, reach them with testinfra, install a
module, and make sure faults are reported and nothing is left running.

Run with ``NFLAB_CACHE=/var/cache/nflab python -m pytest tests/integration/test_vm.py``
(the kernels, rootfs and boot pieces come from that cache; the first run builds
the rootfs, about a minute). VM names start with ``it-`` so a developer's
``default`` VM is never touched.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import testinfra

from ground.errors import VMError
from ground.paths import REPO
from nflab import deploy
from vm import lab, rootfs

pytestmark = [pytest.mark.slow, pytest.mark.vm]

KERNELS = ("6.1", "6.12")


def qemu_pids_of(vmdir: Path) -> list[int]:
    """Live QEMU processes whose command line names *vmdir*."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if cmd.startswith(b"qemu-system") and str(vmdir).encode() + b"/" in cmd and state != "Z":
            pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="session")
def vms():
    """Boots VMs on demand (``vms(kernel, name)``) and stops every one at the end."""
    started: dict[str, object] = {}

    def boot(kernel: str, name: str):
        if name not in started:
            started[name] = lab.up(kernel, name, progress=lambda m: None)
        return started[name]

    yield boot
    for name in started:
        lab.down(name)
        assert not qemu_pids_of(lab.vm_dir(name)), f"QEMU of {name} still running"


@pytest.fixture(params=KERNELS, scope="session")
def booted(request, vms):
    kernel = request.param
    return vms(kernel, "it-" + kernel.replace(".", ""))


@pytest.fixture(scope="session")
def host_of():
    cache = {}

    def get(state):
        if state.name not in cache:
            cache[state.name] = testinfra.get_host(state.testinfra_spec)
        return cache[state.name]

    return get


def test_uname_matches_the_kernel(booted, host_of):
    host = host_of(booted)
    assert host.run("uname -r").stdout.strip() == booted.release
    assert booted.boot_seconds is not None and booted.boot_seconds < 60


def test_modules_disk_is_mounted(booted, host_of):
    host = host_of(booted)
    assert host.file(f"/lib/modules/{booted.release}/modules.dep").exists
    # /lib is a symlink to usr/lib (merged /usr): the mount shows up under /usr
    mount = host.mount_point(f"/usr/lib/modules/{booted.release}")
    assert mount.exists and mount.filesystem == "ext4" and "ro" in mount.options


def test_modprobe_stock_netfilter_module(booted, host_of):
    host = host_of(booted)
    host.run_test("modprobe iptable_filter")
    assert host.run("modprobe iptable_filter").rc == 0
    assert "iptable_filter" in host.check_output("lsmod")
    assert host.run("iptables-legacy -L INPUT -n").rc == 0
    assert host.run("iptables-nft -L INPUT -n").rc == 0
    # the modules image holds Debian's modules decompressed (vm/initramfs.py): the
    # same signed bytes, loaded without the guest kernel's own xz step, untainted
    path = host.check_output("modinfo -n iptable_filter")
    assert path.endswith("/iptable_filter.ko"), path
    assert host.check_output("modinfo -F signer iptable_filter"), "the module lost its signature"
    assert host.file("/sys/module/iptable_filter/taint").content_string.strip() == ""


def test_guest_userland_and_limits(booted, host_of):
    host = host_of(booted)
    assert host.check_output("nproc") == "2"
    # two guest CPUs on one host thread under TCG (vm.qemu.tcg_threading: text
    # patching is not coherent with a thread per vCPU in QEMU 7.2)
    argv = Path(f"/proc/{booted.pid}/cmdline").read_bytes().split(b"\0")
    accel = argv[argv.index(b"-accel") + 1].decode()
    assert accel == ("kvm" if booted.accel == "kvm" else f"tcg,thread={lab.qemu.tcg_threading()}")
    assert host.check_output("id -u") == "0"
    for pkg in ("iptables", "nftables", "python3-scapy", "python3-pytest", "tcpdump"):
        assert host.package(pkg).is_installed, pkg
    # the guest's libxtables is the one plugins are built against (the userland's build root)
    guest = host.package("libxtables12").version
    assert guest == rootfs.plugin_xtables_version()


def test_the_kits_skipped_initcalls_were_skipped_and_tracing_works(booted, host_of):
    """Each initcall the kit skips that this kernel has built in (its symbol is in
    /proc/kallsyms, init text included) was skipped: the kernel logs "initcall X
    blacklisted" when it reaches X. Both tracing scans and the KDF self-test are
    built into 6.1 and 6.12. Where jitter-entropy is a module (6.1) the kit leaves
    its init alone, and the module loads. Tracing still works without the scans."""
    host = host_of(booted)
    skipped = lab.qemu.SKIPPED_INITCALLS
    cmdline = host.file("/proc/cmdline").content_string
    kallsyms = host.check_output("grep -wE '%s' /proc/kallsyms || true" % "|".join(skipped))
    built_in = {line.split()[2] for line in kallsyms.splitlines() if "[" not in line}
    assert built_in >= {"ftrace_check_for_weak_functions", "trace_eval_init", "crypto_kdf108_init"}, kallsyms
    dmesg = host.check_output("dmesg")
    for name in built_in:
        assert f"initcall {name} blacklisted" in dmesg, name
    if "jent_mod_init" not in built_in:
        assert "jent_mod_init" not in cmdline, cmdline
        host.run_test("modprobe jitterentropy_rng")
        assert "jitterentropy_rng" in host.file("/proc/crypto").content_string
    # tracefs and trace events work (only the enum rewrite of the `format` files is gone)
    host.run_test("mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing")
    fmt = host.check_output("cat /sys/kernel/tracing/events/sched/sched_switch/format")
    assert "prev_comm" in fmt
    # the KDF self-test was the first user of hmac(sha256): the kernel makes it on
    # first use instead, here through AF_ALG, and its digest is the right one
    assert host.check_output("python3 -c %s" % shlex.quote(HMAC_BY_AF_ALG)) == "ok"


HMAC_BY_AF_ALG = """
import hashlib, hmac, socket
with socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0) as alg:
    alg.bind(("hash", "hmac(sha256)"))
    alg.setsockopt(socket.SOL_ALG, socket.ALG_SET_KEY, b"nflab-key")
    op, _ = alg.accept()
    with op:
        op.sendall(b"netfilter")
        digest = op.recv(32)
want = hmac.new(b"nflab-key", b"netfilter", hashlib.sha256).digest()
print("ok" if digest == want else "hmac(sha256) by AF_ALG: %s, want %s" % (digest.hex(), want.hex()))
"""


def test_login_key_is_the_labs_rsa_key(booted, host_of):
    host = host_of(booted)
    keys = host.file("/root/.ssh/authorized_keys").content_string.split()
    assert keys[0] == lab.SSH_KEY_TYPE == "ssh-rsa"
    assert keys[1] == lab.ssh_key()[1]


def test_wire_nics_named_by_mac(booted, host_of):
    host = host_of(booted)
    for nic, mac in (("eth0", "52:54:00:00:00:01"), ("eth1", "52:54:00:00:01:01"),
                     ("eth2", "52:54:00:00:02:01")):
        assert host.file(f"/sys/class/net/{nic}/address").content_string.strip() == mac
    assert "10.0.2.15/24" in host.check_output("ip -4 -o addr show dev eth0")
    wire = booted.wire
    assert set(wire) == {"eth1", "eth2"}
    assert len({booted.ports["ssh"], *(p for w in wire.values() for p in (w.guest, w.host))}) == 5


def test_exec_exit_status_and_output(booted):
    res = lab.exec(booted.name, "echo out; echo err >&2; exit 7")
    assert (res.returncode, res.stdout, res.stderr) == (7, "out\n", "err\n")


def test_a_command_exiting_255_is_no_ssh_failure(booted):
    """Exit 255 of the command itself (the SSH master still up) costs no settle and
    fresh login: it was 2.7 s more than any other exit status."""
    t0 = time.monotonic()
    res = lab.exec(booted.name, "echo out; exit 255")
    took = time.monotonic() - t0
    assert (res.returncode, res.stdout) == (255, "out\n")
    assert took < 1.5, f"exit 255 took {took:.2f}s"
    assert lab.exec(booted.name, "true").returncode == 0


def test_copy_to(booted, tmp_path):
    src = tmp_path / "blob"
    src.write_bytes(os.urandom(100_000))
    lab.copy_to(booted.name, src, "/tmp/blob", mode=0o600)
    out = lab.exec(booted.name, "sha256sum /tmp/blob; stat -c %a /tmp/blob", check=True).stdout
    import hashlib
    assert hashlib.sha256(src.read_bytes()).hexdigest() in out
    assert out.split()[-1] == "600"


def test_stock_testinfra_runs_long_commands(booted, host_of):
    """Users' suites run unchanged: testinfra's own host.run() of a 12 KB argument
    and of a 20 KB script (the guest's default server is OpenSSH's sshd; dropbear
    refused exec requests over 9000 bytes and ssh exited 255)."""
    host = host_of(booted)
    # the guest's server, asked of the guest (a restored guest's console has no boot lines)
    assert host.run("pgrep -x sshd").rc == 0 and host.run("pgrep -x dropbear").rc == 1
    arg = "x" * 12_000
    res = host.run(f"printf %s {arg} | wc -c")
    assert (res.rc, res.stdout.strip()) == (0, "12000"), res.stderr
    script = "".join(f"echo line{i}\n" for i in range(2000)) + "echo $((6 * 7)) >&2; exit 5"
    assert len(script) > 20_000
    res = host.run(script)
    assert (res.rc, res.stderr) == (5, "42\n") and len(res.stdout.splitlines()) == 2000


def test_commands_over_the_ssh_servers_exec_limit(booted, host_of):
    """Past one exec request's limit (dropbear's 9000 bytes; the kernel's 128 KiB
    for the one argument sshd hands the shell) lab.exec and vm.remote.run send
    the command over stdin with the same meaning (status, output)."""
    from vm import remote
    body = "".join(f"echo line{i}\n" for i in range(15000))  # ~160 KB of shell
    command = f"{body}echo $((6 * 7)) >&2; exit 5"
    assert remote.needs_stdin(command)
    res = lab.exec(booted.name, command)
    assert res.returncode == 5 and res.stderr == "42\n"
    assert res.stdout.splitlines() == [f"line{i}" for i in range(15000)]
    out = remote.run(host_of(booted), command)
    assert (out.rc, out.stderr) == (5, "42\n") and len(out.stdout.splitlines()) == 15000
    with pytest.raises(VMError, match="cannot also take stdin"):
        lab.exec(booted.name, command, input="x")


def test_ssh_server_serves_scp_sftp_and_a_pty(booted, tmp_path):
    """What users do with `ssh -F ssh_config`: scp (sftp protocol) both ways, a pty."""
    src = tmp_path / "up"
    src.write_bytes(os.urandom(50_000))
    ssh_config, host = booted.ssh_config, booted.host
    subprocess.run(["scp", "-q", "-F", ssh_config, str(src), f"{host}:/tmp/up"], check=True, timeout=60)
    subprocess.run(["scp", "-q", "-F", ssh_config, f"{host}:/tmp/up", str(tmp_path / "down")],
                   check=True, timeout=60)
    assert (tmp_path / "down").read_bytes() == src.read_bytes()
    res = subprocess.run(["ssh", "-F", ssh_config, "-tt", host, "tty; test -t 0 && echo pty"],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "/dev/pts/" in res.stdout and "pty" in res.stdout


def test_dropbear_on_request(monkeypatch):
    """NFLAB_SSHD=dropbear: the guest starts dropbear (faster to start under TCG),
    which refuses a long exec request; the kit's own commands still get through."""
    monkeypatch.setenv("NFLAB_SSHD", "dropbear")
    name = "it-dropbear"
    try:
        st = lab.up("6.1", name, snapshot=False, progress=lambda m: None)
        assert "starting sshd (dropbear)" in (st.vmdir / "console.log").read_text()
        ps = lab.exec(name, "ps -eo comm", check=True).stdout.split()
        assert "dropbear" in ps and "sshd" not in ps
        long = "true " + "x" * 20_000
        res = subprocess.run(st.ssh_argv() + [long], capture_output=True, timeout=60)
        assert res.returncode == 255, "dropbear took an exec request over its 9000 bytes"
        assert lab.exec(name, long).returncode == 0
    finally:
        lab.down(name)
    assert not qemu_pids_of(lab.vm_dir(name))


def test_pytest_hosts_accepts_the_spec(booted, tmp_path):
    (tmp_path / "test_trivial.py").write_text(textwrap.dedent(f"""
        def test_kernel(host):
            assert host.run("uname -r").stdout.strip() == {booted.release!r}
    """))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          f"--hosts={booted.testinfra_spec}", "test_trivial.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout


def test_up_again_reuses_same_kernel_and_refuses_another(booted):
    again = lab.up(booted.spec, booted.name, progress=lambda m: None)
    assert again.pid == booted.pid
    other = "6.12" if booted.spec == "6.1" else "6.1"
    with pytest.raises(VMError, match="vm-down"):
        lab.up(other, booted.name, progress=lambda m: None)
    assert lab.is_running(lab.load(booted.name))


def test_two_vms_at_once_have_distinct_ports_and_dirs(vms):
    a, b = vms("6.1", "it-61"), vms("6.12", "it-612")
    assert lab.is_running(lab.load(a.name)) and lab.is_running(lab.load(b.name))
    assert a.dir != b.dir and a.ssh_config != b.ssh_config
    ports = lambda s: {s.ports["ssh"], *(p for w in s.wire.values() for p in (w.guest, w.host))}
    assert not ports(a) & ports(b)
    assert {r["vm"] for r in lab.status()} >= {a.name, b.name}


def test_install_iprange_is_the_kits_module(booted):
    done = deploy.install("iprange", booted.name)
    assert "O" in done.taint
    taint = lab.exec(booted.name, f"cat /sys/module/{done.module}/taint", check=True).stdout
    assert "O" in taint
    # both iptables backends find the kit's plugin
    for ipt in ("iptables-legacy", "iptables-nft"):
        res = lab.exec(booted.name, f"{ipt} -m iprange --help")
        assert res.returncode == 0, res.stderr


def test_panic_is_reported_and_vm_cleaned_up(vms):
    st = vms("6.12", "it-crash")
    vmdir = st.vmdir
    # the panic's own report (not the command's 60 s timeout) ends the command
    with pytest.raises(VMError) as exc:
        lab.exec(st.name, "echo c > /proc/sysrq-trigger", timeout=60)
    text = f"{exc.value}\n{exc.value.detail}"
    assert "sysrq" in text and "Kernel panic" in text
    assert "timed out" not in str(exc.value)
    assert exc.value.exit_code == 3
    assert not qemu_pids_of(vmdir)
    assert lab.load(st.name) is None
    assert (vmdir / "console.log").is_file()  # kept for the post-mortem
    with pytest.raises(VMError, match="not running"):
        lab.exec(st.name, "true")


def test_frozen_guest_is_reported_as_not_answering(vms):
    st = vms("6.1", "it-frozen")
    assert lab._qmp(st.vmdir / "qmp.sock", "stop")
    with pytest.raises(VMError, match="stopped answering"):
        lab.exec(st.name, "true", timeout=3)
    assert not qemu_pids_of(st.vmdir)


def test_boot_budget_exceeded_cleans_up():
    with pytest.raises(VMError, match="boot budget"):
        # cold: a restore may well be ready within 0.3 s of its launch
        lab.up("6.1", "it-budget", budget=0.3, snapshot=False, progress=lambda m: None)
    assert not qemu_pids_of(lab.vm_dir("it-budget"))
    assert lab.load("it-budget") is None


def test_ctrl_c_during_vm_up_leaves_no_qemu():
    name = "it-sigint"
    vmdir = lab.vm_dir(name)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # as from a terminal: a shell without job control (CI started in the background)
    # hands its children SIGINT ignored, and Python keeps it so; reset it to the
    # default before exec, so Python's KeyboardInterrupt handler is in place
    argv = [sys.executable, "-m", "invoke", "vm-up", "--kernel=6.1", f"--vm={name}"]
    reset = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); " \
            "os.execv(sys.argv[1], sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", reset, *argv],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not qemu_pids_of(vmdir):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "QEMU never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        lab.down(name)
    assert proc.returncode != 0
    assert b"interrupted" in err
    assert not qemu_pids_of(vmdir)
    assert lab.load(name) is None


def test_vm_exec_leaves_a_booting_vm_alone():
    """`vm-exec` while `vm-up` boots (the guest paused, as on a loaded host) says the
    VM is still starting; it used to tear the boot down as "stopped answering"."""
    name = "it-booting"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    up = subprocess.Popen([sys.executable, "-m", "invoke", "vm-up", "--kernel=6.1", f"--vm={name}",
                           "--no-snapshot"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ((st := lab.load(name)) and st.pid and (st.vmdir / "qmp.sock").exists()):
            assert up.poll() is None and time.monotonic() < deadline, up.communicate()
            time.sleep(0.02)
        while not lab._qmp(st.vmdir / "qmp.sock", "stop"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(VMError, match="still starting"):
            lab.exec(name, "uname -r")
        assert lab._qmp(st.vmdir / "qmp.sock", "cont")
        out, err = up.communicate(timeout=120)
        assert up.returncode == 0, err[-2000:]
        assert lab.exec(name, "true").returncode == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        lab.down(name)
    assert not qemu_pids_of(lab.vm_dir(name))


def _vm_up(*args, env=None):
    """`invoke vm-up --kernel=6.1 ARGS` as a user runs it; asserts it succeeded."""
    env = dict(os.environ if env is None else env, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "invoke", "vm-up", "--kernel=6.1", *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def test_vm_exec_cli_exit_status_and_spec_is_last_line(vms):
    st = vms("6.1", "it-61")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    up = _vm_up(f"--vm={st.name}")
    assert up.stdout.strip().splitlines()[-1] == st.testinfra_spec
    res = subprocess.run([sys.executable, "-m", "invoke", "vm-exec", f"--vm={st.name}",
                          "--cmd=echo hello; exit 5"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 5
    assert "hello" in res.stdout


# ---------------------------------------------------------------- post-boot snapshots

def test_cold_boot_without_snapshot():
    name = "it-cold"
    try:
        st = lab.up("6.1", name, snapshot=False, progress=lambda m: None)
        assert st.restored_from is None
        assert "nflab-init: ready after" in (st.vmdir / "console.log").read_text()
        assert lab.exec(name, "findmnt -n -o FSTYPE /", check=True).stdout.strip() == "overlay"
    finally:
        lab.down(name)
    assert not qemu_pids_of(lab.vm_dir(name))


def test_vm_up_restores_by_default_and_no_snapshot_boots_cold():
    name = "it-default"
    env = {k: v for k, v in os.environ.items() if k != "NFLAB_SNAPSHOT"}
    try:
        res = _vm_up(f"--vm={name}", env=env)
        assert f"VM {name} restored and ready" in res.stderr, res.stderr[-2000:]
        assert lab.load(name).restored_from
        assert res.stdout.strip().splitlines()[-1] == lab.testinfra_spec_for(name)
        subprocess.run([sys.executable, "-m", "invoke", "vm-down", f"--vm={name}"], cwd=REPO,
                       check=True, capture_output=True, timeout=60)
        for how, extra in (("--no-snapshot", {}), ("", {"NFLAB_SNAPSHOT": "0"})):
            res = _vm_up(f"--vm={name}", *([how] if how else []), env=dict(env, **extra))
            assert f"VM {name} booted and ready" in res.stderr, (how, extra, res.stderr[-2000:])
            assert lab.load(name).restored_from is None
            lab.down(name)
    finally:
        lab.down(name)
    assert not qemu_pids_of(lab.vm_dir(name))


@pytest.mark.parametrize("kernel", KERNELS)
def test_snapshot_restores_a_clean_guest(kernel):
    name = "it-snap" + kernel.replace(".", "")
    try:
        first = lab.up(kernel, name, snapshot=True, progress=lambda m: None)
        assert first.restored_from and Path(first.restored_from).is_file()
        lab.exec(name, "echo dirty > /root/mark", check=True)
        lab.down(name)
        again = lab.up(kernel, name, snapshot=True, progress=lambda m: None)
        assert again.restored_from == first.restored_from
        out = lab.exec(name, "cat /root/mark 2>/dev/null; nproc; date +%s; uname -r").stdout.split()
        assert out[0] == "2", "a restored guest must not see the previous guest's writes"
        assert abs(int(out[1]) - time.time()) < 5, "guest clock not re-synced after restore"
        assert out[2] == again.release
    finally:
        lab.down(name)
    assert not qemu_pids_of(lab.vm_dir(name))


def test_bad_snapshot_falls_back_to_cold_boot():
    import json
    name = "it-snapbad"
    lab.up("6.1", name, snapshot=True, progress=lambda m: None)
    state_file = Path(lab.load(name).restored_from)
    lab.down(name)
    state_file.write_bytes(b"not a migration stream")
    manifest = state_file.with_suffix(".json")
    data = json.loads(manifest.read_text())
    data["size"] = state_file.stat().st_size
    manifest.write_text(json.dumps(data))
    said = []
    try:
        st = lab.up("6.1", name, snapshot=True, progress=said.append)
        assert st.restored_from is None
        assert any("booting cold" in m for m in said), said
        assert lab.exec(name, "true").returncode == 0
    finally:
        lab.down(name)
    assert not state_file.exists(), "a state that failed to restore must be discarded"
    assert not qemu_pids_of(lab.vm_dir(name))


def test_a_traced_boot_times_the_kernels_own_lines():
    """``up(trace=True)`` (``invoke bench --only=boottrace``): a cold boot whose
    console carries the kernel's messages, each line with when the host saw it,
    in boot order; the guest's own progress lines are among them."""
    from nflab import bench
    st = lab.up("6.12", "it-trace", trace=True, progress=lambda m: None)
    try:
        assert st.restored_from is None and "quiet" not in " ".join(st.cmd).split()
        times = [t for t, _ in st.boot_lines]
        texts = [line for _, line in st.boot_lines]
        assert times == sorted(times) and 0 < times[0] < times[-1] <= st.boot_seconds
        assert texts[0].startswith("[    0.000000] Linux version 6.12")
        for line in ("Run /init as init process", "nflab-initramfs: started", "nflab-init: ready"):
            assert any(line in t for t in texts), f"no {line!r} in the traced console"
        rows = bench.trace_rows([st])
        assert rows[1].runs and 0 < rows[1].runs[0] < st.boot_seconds     # Run /init
        assert len(rows) == 2 + bench.TRACE_GAPS
    finally:
        lab.down("it-trace")
    assert not qemu_pids_of(lab.vm_dir("it-trace"))


def test_kernel_warnings_reach_the_console_and_lockdep_splats_are_faults(vms):
    """The boot is quiet (errors only), but from the initramfs's end on the
    kernel's warnings reach the console, where the host looks for faults:
    lockdep's splats are warnings. A plain warning leaves the VM usable."""
    st = vms("6.12", "it-warn")

    def console_shows(text: str) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if text in lab.console_text(st):
                return True
            time.sleep(0.05)
        return False
    lab.exec(st.name, "echo '<4>nflab-it: a plain warning' > /dev/kmsg", check=True)
    assert console_shows("nflab-it: a plain warning")
    lab.require(st.name)                     # not a fault
    lab.exec(st.name, "echo '<6>nflab-it: an info line' > /dev/kmsg; "
                      "echo '<4>WARNING: possible circular locking dependency detected' > /dev/kmsg",
             check=True)
    assert console_shows("WARNING: possible circular locking")
    assert "nflab-it: an info line" not in lab.console_text(st)
    with pytest.raises(VMError, match="lockdep: WARNING: possible circular locking"):
        lab.require(st.name)
    assert not qemu_pids_of(st.vmdir)
