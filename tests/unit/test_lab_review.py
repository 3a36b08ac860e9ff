"""The lab's behaviour where a review of stop 33 found it wrong (each test failed
on the code before the fix): a stale KVM probe result, a stale or still-booting VM
state tearing down a live VM, KVM snapshot keys without the host CPU, matrix cell
releases of 5.10 and 7.x, private VM names from a truncated pid, a save timeout
reported as a status, and errors without a hint or with a raw traceback."""

import json
import subprocess
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import pytest

from ground.errors import VMError
from nflab import matrix, suites
from vm import install as vm_install
from vm import lab, qemu, snapshot
from tests.unit.conftest import fake_vm


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NFLAB_ACCEL", raising=False)
    return tmp_path / "cache"


def test_cached_kvm_is_probed_again_once_dev_kvm_is_unusable(cache, monkeypatch):
    cache.mkdir(parents=True)
    (cache / "accel.json").write_text(json.dumps(
        {"key": qemu._accel_key(), "accel": "kvm", "reason": "KVM probe boot succeeded"}))
    # now /dev/kvm is gone or not ours (a container sharing the cache and the host kernel,
    # kvm_intel unloaded, another CI runner restoring the cache, a group change)
    real_access = qemu.os.access
    monkeypatch.setattr(qemu.os, "access",
                        lambda p, m, **kw: False if str(p) == "/dev/kvm" else real_access(p, m, **kw))
    probes = []
    monkeypatch.setattr(qemu, "probe_kvm", lambda *a, **k: probes.append(a) or (False, "no kvm"))
    accel, reason = qemu.choose_accel(Path("vmlinuz"), Path("initrd"), progress=lambda m: None)
    assert (accel, len(probes)) == ("tcg", 1), "a cached kvm result outlived /dev/kvm"


def _state(vmdir, **kw):
    base = dict(name=vmdir.name, dir=str(vmdir), spec=None, release="r", ports={"ssh": 1},
                ssh_config=str(vmdir / "ssh_config"), host=f"nflab-{vmdir.name}",
                accel="tcg", machine="microvm")
    return lab.VMState(**base, **kw)


@pytest.fixture
def fake_qemu(cache):
    with fake_vm("rv-race") as running:
        yield running


def test_a_stale_state_never_tears_down_the_running_vm(fake_qemu):
    vmdir, new = fake_qemu
    dead = subprocess.Popen(["true"])
    dead.wait()
    old = _state(vmdir, pid=dead.pid, started_at=1.0, status="ready")   # held by a long lab.exec
    lab._save(_state(vmdir, pid=new.pid, started_at=2.0, status="ready"))  # vm-up --replace elsewhere
    (vmdir / "qmp.sock").touch()
    with pytest.raises(VMError):
        lab.check_health(old)          # what _watch/exec/require do with the state they hold
    assert lab.load("rv-race").pid == new.pid          # the running VM's vm.json stays,
    assert (vmdir / "qmp.sock").exists()               # and its QMP socket


def test_vm_down_stops_a_qemu_left_without_its_state(fake_qemu):
    vmdir, proc = fake_qemu
    (vmdir / "qemu.pid").write_text(f"{proc.pid}\n")
    with pytest.raises(VMError, match="still runs in its directory"):
        lab._refuse_orphan("rv-race", None)
    assert lab.down("rv-race") is True
    proc.wait(timeout=10)
    assert not (vmdir / "qemu.pid").exists()


def test_require_during_a_boot_says_starting_and_touches_nothing(fake_qemu):
    vmdir, _ = fake_qemu
    # _boot_once saved this to reserve ports; QEMU is being started (pid not recorded yet)
    lab._save(_state(vmdir, pid=0, started_at=3.0, status="booting"))
    (vmdir / "qmp.sock").touch()
    with pytest.raises(VMError, match="is still starting"):
        lab.require("rv-race")         # `invoke vm-exec --vm=rv-race` from another shell
    assert (vmdir / "qmp.sock").exists() and lab.load("rv-race").status == "booting"


def test_kvm_snapshot_key_holds_the_host_cpu(tmp_path):
    files = []
    for n in ("k", "i", "r", "m"):
        (tmp_path / n).write_bytes(b"x")
        files.append(tmp_path / n)
    launch = qemu.LaunchSpec(name="a", vmdir=tmp_path, kernel=files[0], initrd=files[1],
                             rootfs=files[2], modules_img=files[3], ssh_pubkey="AAAA",
                             ports=qemu.Ports(ssh=0), accel="kvm")
    rec = snapshot.recipe(launch)
    assert "-cpu" in rec["command"] and "host" in rec["command"]
    text = json.dumps(rec)
    # nothing of the host CPU (model, flags) or host kernel enters the key of a -cpu host state
    assert rec["host"][0] and len(rec["host"][1]) == 16, rec.get("host")
    tcg = snapshot.recipe(replace(launch, accel="tcg"))
    assert "host" not in tcg, "TCG keys (qemu64 on every host) must not change"


@pytest.mark.parametrize("release,spec", [("5.10.0-46-cloud-amd64", "5.10"),
                                          ("7.3.4+deb13-cloud-amd64", "7.3")])
def test_matrix_cell_release_of_every_line(tmp_path, monkeypatch, release, spec):
    out = (f"kernel                  passed failed errors skipped seconds junit\n"
           f"{release}  9 0 0 0 7.1 {tmp_path}/j.xml\n")
    monkeypatch.setattr(matrix._Cells, "run",
                        lambda self, cmd, vm, timeout: (subprocess.CompletedProcess(cmd, 0, out, ""), False))
    cell = matrix._run_cell(spec, ["iprange"], tmp_path)
    assert cell.release == release


def test_private_vm_names_keep_the_whole_pid(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_BUILD", str(tmp_path))
    kernel = type("K", (), {"release": "6.12.118+deb13-cloud-amd64"})()
    names = []
    for pid in (123456, 223456):          # pid_max is 4194304 on 64-bit hosts
        monkeypatch.setattr(suites.os, "getpid", lambda pid=pid: pid)
        _, shards = suites._shards(["iprange"], kernel, [[Path("t.py")]], 1, vm=None, keep=False, junit=None)
        names.append(shards[0].vm)
    assert names[0] != names[1] and all(lab.NAME_RE.fullmatch(n) for n in names), names


def test_save_timeout_says_it_timed_out(tmp_path, monkeypatch):
    monkeypatch.setattr(snapshot.initramfs, "boot_dir", lambda r: tmp_path)
    monkeypatch.setattr(snapshot, "SAVE_TIMEOUT", 0.0)
    monkeypatch.setattr(snapshot, "qmp", lambda sock, *c, **k: [{"status": "active"}])
    with pytest.raises(VMError) as err:
        snapshot.save(tmp_path / "qmp.sock", "r", "k", {}, progress=lambda m: None)
    assert "timed out" in err.value.message and "active" in err.value.message, err.value.message


def test_a_failed_insmod_points_at_dmesg(monkeypatch):
    res = subprocess.CompletedProcess([], 1, "@@NFLAB-INSTALL-FAILED xt_x\n",
                                      "insmod: ERROR: could not insert module: Unknown symbol in module")
    monkeypatch.setattr(vm_install.lab, "exec", lambda *a, **k: res)
    art = type("A", (), {"module": "xt_x"})()
    plan = vm_install.Plan(art, {}, 0, [":"])
    with pytest.raises(VMError) as err:
        vm_install._run_loads([plan], "rv", 60)
    assert "dmesg" in err.value.hint, err.value.hint


@pytest.fixture
def kvm_accessible(monkeypatch, tmp_path):
    """/dev/kvm opens and is kvm_intel's (the probe starts its QEMU; the fake QEMU
    decides the rest)."""
    real_access = qemu.os.access
    monkeypatch.setattr(qemu.os, "access",
                        lambda p, m, **kw: True if str(p) == "/dev/kvm" else real_access(p, m, **kw))
    (tmp_path / "module" / "kvm_intel").mkdir(parents=True)
    monkeypatch.setattr(qemu, "SYS_MODULE", tmp_path / "module")
    return tmp_path / "module"


def test_a_pvm_host_is_not_probed_and_says_why(tmp_path, monkeypatch, kvm_accessible):
    """/dev/kvm of kvm_pvm runs stock kernels by emulation: TCG, without a probe boot
    (QEMU is a path that does not exist: starting it would raise), and a cached answer
    made before the module changed is not believed."""
    monkeypatch.setattr(qemu, "QEMU", str(tmp_path / "no-qemu"))
    intel_key = qemu._accel_key()
    (kvm_accessible / "kvm_pvm").mkdir()
    ok, reason = qemu.probe_kvm(tmp_path / "vmlinuz", tmp_path / "initrd")
    assert not ok and reason == qemu.PVM_REASON and qemu.HANGS not in reason
    assert qemu._accel_key() != intel_key


def test_probe_kvm_of_a_qemu_that_fails_early_reports_it(tmp_path, monkeypatch, kvm_accessible):
    # QEMU that fails before it opens the console chardev (an option it does not know)
    fake = tmp_path / "qemu"
    fake.write_text("#!/bin/sh\necho 'qemu: -M microvm: Property not found' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(qemu, "QEMU", str(fake))
    ok, reason = qemu.probe_kvm(tmp_path / "vmlinuz", tmp_path / "initrd")
    assert not ok and "Property not found" in reason, reason


FAKE_KVM_GUEST = """#!/bin/sh
# a QEMU whose guest writes $1 to its console, waits $2 seconds, then writes $3 and powers off
for a; do case "$a" in file,id=con,path=*) con="${a#file,id=con,path=}" ;; esac; done
printf '%s' "$FAKE_FIRST" > "$con"; sleep "$FAKE_WAIT"; printf '%s' "$FAKE_LAST" >> "$con"
"""


@pytest.mark.parametrize("first, wait, ok", [
    ("", 60, False),                                    # silent: hung after the timeout
    ("Linux version 6.12\n", 1, True),                 # printing on a busy host: given more time
    ("Linux version 6.12\n", 60, False),               # printing, then stuck: hung after slow
])
def test_a_kvm_probe_waits_longer_for_a_guest_that_prints(tmp_path, monkeypatch, kvm_accessible,
                                                         first, wait, ok):
    fake = tmp_path / "qemu"
    fake.write_text(FAKE_KVM_GUEST)
    fake.chmod(0o755)
    monkeypatch.setattr(qemu, "QEMU", str(fake))
    monkeypatch.setenv("FAKE_FIRST", first)
    monkeypatch.setenv("FAKE_WAIT", str(wait))
    monkeypatch.setenv("FAKE_LAST", "nflab-probe-ok\n")
    got, reason = qemu.probe_kvm(tmp_path / "vmlinuz", tmp_path / "initrd", timeout=0.5, slow=3.0)
    assert got is ok, reason
    assert ok or "hangs" in reason, reason


def test_bad_numbers_in_the_environment_are_errors_with_a_hint(monkeypatch):
    monkeypatch.setenv("NFLAB_BOOT_TIMEOUT", "2m")
    with pytest.raises(VMError, match="NFLAB_BOOT_TIMEOUT") as err:
        lab._boot_budget("tcg")
    assert "NFLAB_BOOT_TIMEOUT=120" in err.value.hint
    monkeypatch.setenv("NFLAB_TSC_KHZ", "2.6GHz")
    with pytest.raises(VMError, match="NFLAB_TSC_KHZ") as err:
        qemu.host_tsc_khz()
    assert "2600000" in err.value.hint
    monkeypatch.setenv("NFLAB_BOOT_TIMEOUT", "90")
    assert lab._boot_budget("tcg") == 90.0


def test_a_relative_junit_is_made_absolute(tmp_path, monkeypatch):
    """pytest runs in the repository (start_pytest): `invoke test --junit=out.xml`
    from another directory must name the file where the caller reads it."""
    monkeypatch.setenv("NFLAB_BUILD", str(tmp_path / "build"))
    monkeypatch.chdir(tmp_path)
    kernel = type("K", (), {"release": "6.12.118+deb13-cloud-amd64"})()
    junit, _ = suites._shards(["iprange"], kernel, [[Path("t.py")]], 1, vm=None, keep=False, junit="out.xml")
    assert junit == tmp_path / "out.xml"


def test_a_run_starts_without_the_last_runs_junit_files(tmp_path, monkeypatch):
    """A run whose pytest never writes its JUnit (a usage error, a crash before
    the first test) must report no results, not the previous run's."""
    monkeypatch.setenv("NFLAB_BUILD", str(tmp_path / "build"))
    kernel = type("K", (), {"release": "6.12.118+deb13-cloud-amd64"})()
    old = tmp_path / "out.xml"
    old.write_text('<testsuites><testsuite tests="57"/></testsuites>')
    _, shards = suites._shards(["iprange"], kernel, [[Path("a.py")], [Path("b.py")]], 2, vm=None,
                               keep=False, junit=str(old))
    assert not old.exists() and not any(sh.junit.exists() for sh in shards)
    assert suites.parse_junit(old)[0]["tests"] == 0


def test_two_concurrent_runs_of_the_same_suites_write_their_own_parts(tmp_path, monkeypatch):
    """Two `invoke test --names=iprange --kernel=6.12` at once (their VMs and gates
    were per pid already): each pytest writes its own JUnit part and log, so
    neither reads or clobbers the other's; the report is replaced whole at the end."""
    monkeypatch.setenv("NFLAB_BUILD", str(tmp_path / "build"))
    kernel = type("K", (), {"release": "6.12.118+deb13-cloud-amd64"})()
    runs = []
    for pid, n in ((4101, 1), (4102, 1), (4103, 2), (4104, 2)):
        monkeypatch.setattr(suites.os, "getpid", lambda pid=pid: pid)
        groups = [[Path("a.py")], [Path("b.py")]][:n]
        runs.append(suites._shards(["iprange"], kernel, groups, n, vm=None, keep=False, junit=None))
    paths = [p for _, shards in runs for sh in shards for p in (sh.junit, sh.log, sh.gate.path) if p]
    assert len(paths) == len(set(paths)), paths
    assert len({junit for junit, _ in runs}) == 1     # the report users read stays where it was


def test_the_report_is_the_parts_merged_and_replaced_whole(tmp_path):
    parts = [tmp_path / f".junit-7-{i}.xml" for i in range(2)]
    parts[0].write_text('<testsuites><testsuite name="a" tests="3" failures="1">'
                        '<testcase classname="c" name="t"><failure message="boom"/></testcase>'
                        '</testsuite></testsuites>')
    out = tmp_path / "junit-iprange.xml"
    out.write_text("<testsuites><testsuite tests='99'/></testsuites>")
    suites.merge_junit(parts, out)         # the second part is missing: a shard that never ran
    counts, failures = suites.parse_junit(out)
    assert counts["tests"] == 3 and failures == ["c::t: boom"]
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".junit-iprange")] == []


def test_a_missing_qemu_says_what_to_install(tmp_path):
    """Every QEMU the kit starts (a VM, the KVM probe, the PVH probe) goes through
    qemu.start: a missing binary is a VMError naming the package, not a traceback."""
    with pytest.raises(VMError) as err:
        qemu.start([str(tmp_path / "qemu-system-x86_64")], stdout=subprocess.DEVNULL)
    assert "not found" in err.value.message and "qemu-system-x86" in err.value.hint


def test_a_run_reports_its_own_results_though_another_replaces_the_shared_file(tmp_path, monkeypatch):
    """Another run of the same suites on the same kernel may replace the shared
    junit-<names>.xml at any moment: this run's counts, failures and backends come
    from its own merged report, which then replaces the shared file whole."""
    monkeypatch.setenv("NFLAB_BUILD", str(tmp_path / "build"))
    kernel = type("K", (), {"release": "6.12.118+deb13-cloud-amd64"})()
    art = type("A", (), {"name": "iprange"})()
    monkeypatch.setattr(suites.spec, "load", lambda n: None)
    monkeypatch.setattr(suites.kernels, "get", lambda spec_, progress: kernel)
    monkeypatch.setattr(suites, "_build_some", lambda names, k, progress: ([art], []))
    monkeypatch.setattr(suites, "_running_default", lambda k, claim: None)
    monkeypatch.setattr(suites.lab, "down", lambda vm: None)
    shared = tmp_path / "build" / "reports" / kernel.release / "junit-iprange.xml"

    def run_shards(shards, *a, **kw):
        for sh in shards:
            sh.junit.write_text('<testsuites><testsuite tests="9"><testcase classname="c" name="mine">'
                                '<failure message="mine failed"/></testcase></testsuite></testsuites>')
        return [1]

    def other_run_finishes(release, junit):     # in this run's window, before it reads
        shared.write_text('<testsuites><testsuite tests="57"/></testsuites>')

    monkeypatch.setattr(suites, "_run_shards", run_shards)
    monkeypatch.setattr(suites, "record_durations", other_run_finishes)
    out = suites._run(["iprange"], "6.12", claim=ExitStack(), jobs=1, progress=lambda m: None)
    assert out.junit == shared
    assert out.counts["tests"] == 9 and out.failures == ["c::mine: mine failed"], out
    assert suites.parse_junit(shared)[0]["tests"] == 9          # this run replaced it last
    assert [f.name for f in shared.parent.iterdir()] == [shared.name]
