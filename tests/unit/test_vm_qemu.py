"""The pure parts of the launcher: QEMU argv, kernel cmdline, ports, console faults."""

import socket
from pathlib import Path

import pytest

from ground import kconfig
from ground.errors import VMError
from vm import qemu

# the jitter-entropy and KDF lines of Debian's cloud kernels' boot/config-*
CONFIGS = {
    "5.10.0-46-cloud-amd64": "CONFIG_CRYPTO_JITTERENTROPY=m\n",
    "6.1.0-57-cloud-amd64": "CONFIG_CRYPTO_JITTERENTROPY=m\nCONFIG_CRYPTO_KDF800108_CTR=y\n",
    "6.12.118+deb13-cloud-amd64": "CONFIG_CRYPTO_JITTERENTROPY=y\nCONFIG_CRYPTO_KDF800108_CTR=y\n",
    "7.3.4+deb13-cloud-amd64": "CONFIG_CRYPTO_JITTERENTROPY=m\nCONFIG_CRYPTO_KDF800108_CTR=y\n",
}


def spec(**kw):
    ports = qemu.Ports(ssh=2222, wire={
        "eth1": qemu.Wire(guest=40001, host=40002, mac="52:54:00:00:01:01"),
        "eth2": qemu.Wire(guest=40003, host=40004, mac="52:54:00:00:02:01"),
    })
    base = dict(name="t", vmdir=Path("/v/t"), kernel=Path("/k/vmlinuz"), initrd=Path("/b/initrd"),
                rootfs=Path("/r/rootfs.img"), modules_img=Path("/b/modules.img"),
                ssh_pubkey="AAAAKEY", ports=ports)
    base.update(kw)
    return qemu.LaunchSpec(**base)


def opt_values(cmd, opt):
    return [cmd[i + 1] for i, c in enumerate(cmd) if c == opt]


def test_microvm_command_shape():
    cmd = qemu.build_command(spec(tsc_khz=2600000))
    assert cmd[0] == "qemu-system-x86_64"
    assert opt_values(cmd, "-M") == ["microvm,acpi=on,pic=off"]
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in cmd
    assert opt_values(cmd, "-accel") == ["tcg,thread=single"]
    assert opt_values(cmd, "-m") == ["1G"] and opt_values(cmd, "-smp") == ["2"]
    assert opt_values(cmd, "-kernel") == ["/k/vmlinuz"]
    assert opt_values(cmd, "-initrd") == ["/b/initrd"]
    assert opt_values(cmd, "-pidfile") == ["/v/t/qemu.pid"]
    assert opt_values(cmd, "-qmp") == ["unix:/v/t/qmp.sock,server=on,wait=off"]
    assert opt_values(cmd, "-chardev") == ["file,id=con,path=/v/t/console.log"]
    drives = opt_values(cmd, "-drive")
    assert "file=/r/rootfs.img,if=none,id=root,format=raw,readonly=on" in drives
    assert "file=/b/modules.img,if=none,id=mods,format=raw,readonly=on" in drives
    devices = opt_values(cmd, "-device")
    assert all(d.startswith("virtio-") and "-device," in d for d in devices)
    assert len(devices) == 5  # root, mods, eth0, eth1, eth2


def test_user_net_is_restricted_and_local():
    netdevs = opt_values(qemu.build_command(spec()), "-netdev")
    assert netdevs[0] == "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22"


def test_wires_are_dgram_on_loopback_with_recorded_ports():
    cmd = qemu.build_command(spec())
    netdevs = opt_values(cmd, "-netdev")
    assert netdevs[1] == ("dgram,id=n1,local.type=inet,local.host=127.0.0.1,local.port=40001,"
                          "remote.type=inet,remote.host=127.0.0.1,remote.port=40002")
    assert "local.port=40003" in netdevs[2] and "remote.port=40004" in netdevs[2]
    devices = opt_values(cmd, "-device")
    assert "virtio-net-device,netdev=n1,mac=52:54:00:00:01:01" in devices
    assert "virtio-net-device,netdev=n2,mac=52:54:00:00:02:01" in devices


def test_kernel_cmdline():
    line = qemu.kernel_cmdline(spec(tsc_khz=2600000))
    words = line.split()
    for w in ("console=ttyS0", "panic=-1", "oops=panic", "nflab.key=AAAAKEY", "pci=off",
              "tsc_early_khz=2600000", "lpj=10400000", "norandmaps"):
        assert w in words
    # all vCPUs boot at once (maxcpus=1 + onlining later was slower, see kernel_cmdline)
    assert not any(w.startswith("maxcpus=") for w in words)
    assert ("nflab.nics=eth0/52:54:00:00:00:01,eth1/52:54:00:00:01:01,"
            "eth2/52:54:00:00:02:01") in words
    assert "-append" in qemu.build_command(spec())


def test_kernel_cmdline_skips_the_kits_initcalls_unless_told_otherwise():
    words = qemu.kernel_cmdline(spec()).split()
    assert ("initcall_blacklist=jent_mod_init,ftrace_check_for_weak_functions,trace_eval_init,"
            "crypto_kdf108_init") in words
    assert [w for w in words if w.startswith("initcall_blacklist=")] == [
        "initcall_blacklist=" + ",".join(qemu.SKIPPED_INITCALLS)]
    words = qemu.kernel_cmdline(spec(skip_initcalls=())).split()
    assert not any(w.startswith("initcall_blacklist") for w in words)
    words = qemu.kernel_cmdline(spec(skip_initcalls=("jent_mod_init",))).split()
    assert "initcall_blacklist=jent_mod_init" in words


def test_skipped_initcalls_from_the_environment(monkeypatch):
    monkeypatch.delenv("NFLAB_SKIP_INITCALLS", raising=False)
    assert qemu.skipped_initcalls() == qemu.SKIPPED_INITCALLS
    assert qemu.skipped_initcalls("") == ()
    assert qemu.skipped_initcalls(" jent_mod_init , trace_eval_init,") == ("jent_mod_init", "trace_eval_init")
    monkeypatch.setenv("NFLAB_SKIP_INITCALLS", "")
    assert qemu.skipped_initcalls() == ()
    with pytest.raises(VMError) as exc:
        qemu.skipped_initcalls("jent_mod_init trace_eval_init")
    assert "NFLAB_SKIP_INITCALLS" in str(exc.value) and "commas" in exc.value.hint
    with pytest.raises(VMError):
        qemu.skipped_initcalls("x;reboot")


@pytest.mark.parametrize("release", ["5.10.0-46-cloud-amd64", "6.1.0-57-cloud-amd64",
                                     "6.12.118+deb13-cloud-amd64", "7.3.4+deb13-cloud-amd64"])
def test_a_skipped_initcall_built_as_a_module_is_not_skipped(monkeypatch, release):
    """The kernel also refuses a module whose init is a skipped name: where
    jitter-entropy is a module (5.10, 6.1, 7.3) its init is left alone, so
    jitterentropy_rng still loads; built in (6.12) it is skipped. The configs are
    lines of the kernels' own configs (boot/config-*, as the packages ship them)."""
    monkeypatch.delenv("NFLAB_SKIP_INITCALLS", raising=False)
    config = kconfig.parse(CONFIGS[release])
    got = qemu.skipped_initcalls(config=config)
    modular = {n for n, sym in qemu.MODULAR_INITCALLS.items() if config.get(f"CONFIG_{sym}") == "m"}
    assert set(got) == set(qemu.SKIPPED_INITCALLS) - modular
    assert ("jent_mod_init" in got) == release.startswith("6.12")
    assert "crypto_kdf108_init" in got and "trace_eval_init" in got
    # what the user names is taken as given
    assert qemu.skipped_initcalls("jent_mod_init", config=config) == ("jent_mod_init",)


def test_kvm_uses_host_cpu_and_all_vcpus():
    cmd = qemu.build_command(spec(accel="kvm"))
    assert opt_values(cmd, "-accel") == ["kvm"]
    assert opt_values(cmd, "-cpu") == ["host"]
    assert "maxcpus=1" not in qemu.kernel_cmdline(spec(accel="kvm"))


def test_pc_machine_uses_pci_devices_without_roms():
    cmd = qemu.build_command(spec(machine="pc"))
    assert opt_values(cmd, "-M")[0].startswith("pc,")
    devices = opt_values(cmd, "-device")
    assert all("-pci," in d for d in devices)
    assert all(d.endswith("romfile=") for d in devices if d.startswith("virtio-net"))
    assert "pci=off" not in qemu.kernel_cmdline(spec(machine="pc"))


def test_tcg_threading_is_single_unless_asked(monkeypatch):
    monkeypatch.delenv("NFLAB_TCG_THREAD", raising=False)
    assert qemu.tcg_threading() == "single"
    monkeypatch.setenv("NFLAB_TCG_THREAD", " multi ")
    assert qemu.tcg_threading() == "multi"
    cmd = qemu.build_command(spec(tcg_thread=qemu.tcg_threading()))
    assert opt_values(cmd, "-accel") == ["tcg,thread=multi"]
    assert opt_values(qemu.build_command(spec(accel="kvm", tcg_thread="multi")), "-accel") == ["kvm"]


def test_tcg_threading_refuses_unknown_modes():
    with pytest.raises(VMError) as exc:
        qemu.tcg_threading("mttcg")
    assert "NFLAB_TCG_THREAD='mttcg'" in exc.value.message and "single, multi" in exc.value.hint


@pytest.mark.parametrize("kw", [{"machine": "q35"}, {"accel": "hvf"}, {"tcg_thread": "two"}])
def test_bad_machine_or_accel(kw):
    with pytest.raises(VMError):
        qemu.build_command(spec(**kw))


def test_ports_distinct_free_and_excluded():
    taken = {qemu.free_port("tcp") for _ in range(5)}
    ports = qemu.allocate_ports(exclude=taken)
    everything = [ports.ssh] + [p for w in ports.wire.values() for p in (w.guest, w.host)]
    assert len(set(everything)) == 5
    assert not set(everything) & taken
    assert set(ports.wire) == {"eth1", "eth2"}
    # each one can really be bound right now
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.ssh))
    for w in ports.wire.values():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", w.host))


def test_ports_roundtrip_through_json_dict():
    ports = qemu.allocate_ports()
    again = qemu.Ports.from_dict(ports.to_dict())
    assert again == ports
    assert again.all() == ports.all()


PANIC = """\
[    0.630411] PCI: Fatal: No config space access function found
nflab-init: ready after 1.52s
[   34.917141] sysrq: Trigger a crash
[   34.917538] Kernel panic - not syncing: sysrq triggered crash
[   34.917712] CPU: 0 PID: 177 Comm: bash Not tainted 6.1.0-56-cloud-amd64 #1  Debian 6.1.192-2
[   34.917969] Call Trace:
[   34.918456]  <TASK>
[   34.918631]  dump_stack_lvl+0x44/0x5c
[   34.918887]  panic+0x118/0x2f4
"""

OOPS = """\
nflab-init: ready after 1.40s
[   12.000001] xt_broken: loading out-of-tree module taints kernel.
[   12.100000] BUG: kernel NULL pointer dereference, address: 0000000000000008
[   12.100100] #PF: supervisor read access in kernel mode
[   12.100200] Oops: 0000 [#1] PREEMPT SMP NOPTI
[   12.100300] CPU: 1 PID: 0 Comm: swapper/1 Tainted: G           OE      6.12.117+deb12-cloud-amd64
[   12.100400] RIP: 0010:broken_mt+0x12/0x40 [xt_broken]
""" + "".join(f"[   12.1{i:05d}]  frame{i}+0x1/0x2\n" for i in range(60)) + """\
[   12.300000] Kernel panic - not syncing: Fatal exception in interrupt
[   12.300100] Kernel Offset: disabled
"""

KASAN = """\
[    5.0] ==================================================================
[    5.1] BUG: KASAN: slab-out-of-bounds in xt_foo_mt+0x2a/0x50 [xt_foo]
[    5.2] Read of size 4 at addr ffff888003c1a2b8 by task ping/201
"""

GPF = "[    3.3] general protection fault, probably for non-canonical address 0xdead: 0000 [#1]\n"


def test_clean_console_has_no_fault():
    assert qemu.find_fault("[ 0.1] Linux version 6.1\nnflab-init: ready after 1.2s\n") is None
    assert qemu.find_fault("") is None


def test_sysrq_panic():
    fault = qemu.find_fault(PANIC)
    assert fault.kind == "sysrq crash"
    assert "Kernel panic - not syncing: sysrq triggered crash" in fault.excerpt
    assert "sysrq" in fault.summary()


def test_oops_reported_as_cause_with_panic_line_kept():
    fault = qemu.find_fault(OOPS)
    # the NULL dereference "BUG:" line comes first and is the cause
    assert fault.kind == "BUG"
    assert "NULL pointer dereference" in fault.line
    assert "Oops: 0000" in fault.excerpt
    assert "RIP: 0010:broken_mt" in fault.excerpt
    # the panic is far below the excerpt window but still shown after "..."
    assert "Kernel panic - not syncing: Fatal exception" in fault.excerpt
    assert "\n...\n" in fault.excerpt
    assert not fault.line.startswith("[")


def test_kasan_and_gpf():
    assert qemu.find_fault(KASAN).kind == "KASAN"
    assert "slab-out-of-bounds" in qemu.find_fault(KASAN).summary()
    assert qemu.find_fault(GPF).kind == "Oops"


def test_initramfs_failure_is_a_fault():
    fault = qemu.find_fault("nflab-initramfs: FAILED: no disk labelled nflab-root\n")
    assert fault.kind == "initramfs failure"


def test_excerpt_is_bounded():
    fault = qemu.find_fault("x" * 10000 + "\nKernel panic - not syncing: boom\n" + "y" * 10000)
    assert len(fault.excerpt) <= 4100


CPUINFO_NOMINAL = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) CPU E5-2690 v4 @ 2.60GHz\ncpu MHz\t\t: 1200.000\n"
CPUINFO_VM = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\ncpu MHz\t\t: 2600.000\n"
              "flags\t\t: fpu tsc constant_tsc nonstop_tsc\n")
CPUINFO_UNKNOWN = "processor\t: 0\nmodel name\t: Some CPU\ncpu MHz\t\t: 2600.000\nflags\t\t: fpu tsc\n"
# bare metal, no GHz in the name (AMD): "cpu MHz" is the clock of the moment
CPUINFO_METAL = ("processor\t: 0\nmodel name\t: AMD Ryzen 7 5800X 8-Core Processor\ncpu MHz\t\t: 3412.771\n"
                 "flags\t\t: fpu tsc constant_tsc nonstop_tsc aperfmperf\n")


def test_host_tsc_khz(monkeypatch):
    monkeypatch.delenv("NFLAB_TSC_KHZ", raising=False)
    assert qemu.host_tsc_khz(CPUINFO_NOMINAL) == 2600000  # nominal, not the scaled MHz
    assert qemu.host_tsc_khz(CPUINFO_VM) == 2600000
    assert qemu.host_tsc_khz(CPUINFO_UNKNOWN) is None
    assert qemu.host_tsc_khz(CPUINFO_METAL) is None
    monkeypatch.setenv("NFLAB_TSC_KHZ", "3000000")
    assert qemu.host_tsc_khz(CPUINFO_UNKNOWN) == 3000000


def test_root_image_is_read_only_and_lpj_preset():
    cmd = qemu.build_command(spec(tsc_khz=2600000))
    assert "file=/r/rootfs.img,if=none,id=root,format=raw,readonly=on" in opt_values(cmd, "-drive")
    append = opt_values(cmd, "-append")[0].split()
    # HZ=250: loops per jiffy = TSC rate / HZ, so onlined CPUs skip calibration
    assert "lpj=10400000" in append and "tsc_early_khz=2600000" in append
    assert "-incoming" not in cmd


def test_incoming_restores_a_saved_state_qemu_reads_itself():
    cmd = qemu.build_command(spec(incoming=Path("/s/a b.state")))
    assert opt_values(cmd, "-incoming") == ["file:/s/a b.state"]
    with pytest.raises(VMError, match="comma"):
        qemu.build_command(spec(incoming=Path("/s/a,b.state")))


def test_incoming_reads_the_launchers_descriptor_when_it_has_one():
    cmd = qemu.build_command(spec(incoming=Path("/s/a b.state"), incoming_fd=7))
    assert opt_values(cmd, "-incoming") == ["fd:7"]


def test_qemu_version_decides_how_a_state_is_read():
    major, minor = qemu.version()
    assert major >= 7, "qemu-system-x86_64 --version did not parse"
    assert qemu.reads_state_files() == ((major, minor) >= (8, 2))
    assert qemu.version("/nonexistent/qemu") == (0, 0)
    assert not qemu.reads_state_files("/nonexistent/qemu")
