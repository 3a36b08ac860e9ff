"""`invoke bench`: which measurements a run covers and what it records when one cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from nflab import bench
from ground.errors import NflabError
from ground.paths import REPO
from ground.proc import run_group
from vm import lab


def test_groups_default_only_and_workshop():
    assert bench.groups_for(None) == ["build", "boot", "snapshot", "vng", "test"]
    assert bench.groups_for(None, workshop=True)[-1] == "workshop"
    assert bench.groups_for("workshop,vng") == ["vng", "workshop"]        # run in the fixed order
    assert bench.groups_for("vng", workshop=True) == ["vng", "workshop"]
    with pytest.raises(NflabError, match="unknown group.*nope"):
        bench.groups_for("vng,nope")


def test_datapath_is_a_group_of_its_own():
    assert bench.groups_for("datapath,boot") == ["boot", "datapath"]
    assert bench.groups_for("snapshot,boottrace,boot") == ["boot", "boottrace", "snapshot"]
    assert "boottrace" not in bench.groups_for(None)
    assert "datapath" not in bench.groups_for(None)


def test_datapath_script_and_rate():
    from nflab import datapath
    one = datapath.pktgen_script(datapath.RULES["conntrack only"], datapath.FLOWS["one flow"], 500)
    new = datapath.pktgen_script(datapath.RULES["with -m layer7 --l7proto http"],
                                 datapath.FLOWS["a new flow per packet"], 500)
    assert "echo 'count 500' > /proc/net/pktgen/eth0" in one and "UDPSRC_RND" not in one
    assert "UDPSRC_RND" in new and "-m layer7 --l7proto http" in new and "-m layer7" not in one
    assert new.index("-m layer7") < new.index("echo start")
    assert datapath.rate("...\nforwarded 15000 usec 1500000\n") == 10000.0
    with pytest.raises(ValueError):
        datapath.rate("pktgen: nothing")


def test_cli_rejects_an_unknown_group_before_anything_runs():
    res = subprocess.run([sys.executable, "-m", "invoke", "bench", "--only=boot,warp"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "unknown group(s) warp" in res.stdout + res.stderr
    assert "valid: build, boot, boottrace, snapshot, vng, test, datapath, workshop" in res.stdout + res.stderr


def test_vng_missing_is_a_skipped_row_with_the_reason(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")     # no pip-installed vng there
    if any(os.access(os.path.join(d, "vng"), os.X_OK) for d in os.environ["PATH"].split(":")):
        pytest.skip("a system-wide vng is installed")
    extra = {}
    rows = bench.vng_group(kern=None, runs=1, extra=extra)
    assert [r.name for r in rows] == [bench.VNG_ROW]
    assert rows[0].runs == [] and rows[0].note.startswith("skipped: virtme-ng is not installed")
    assert rows[0].row()[-1] == rows[0].note and extra["vng"] == rows[0].note


def test_vng_command_has_what_this_host_needs():
    argv = bench._vng_argv("vng", "/k/vmlinuz", "tcg")
    assert argv == ["vng", "--disable-kvm", "--force-9p", "--verbose", "--run", "/k/vmlinuz",
                    "--exec", "uname -r"]
    assert "--disable-kvm" not in bench._vng_argv("vng", "/k/vmlinuz", "kvm")


CONSOLE = ("[    0.303913] PCI: Fatal: No config space access function found\n"
           "nflab-initramfs: started after 0.77s\n"
           "nflab-initramfs: modules loaded after 0.95s\n"
           "nflab-init: starting sshd (OpenSSH) after 1.25s\n"
           "nflab-init: ready after 1.47s\n")


def test_boot_marks_are_the_host_time_each_progress_line_was_first_seen(monkeypatch):
    monkeypatch.setattr(lab.time, "monotonic", lambda: 100.0)
    marks = {}
    lab._note_marks(marks, CONSOLE[:CONSOLE.index("nflab-init: starting")], 98.8)
    lab._note_marks(marks, CONSOLE + "nflab-init: powering off\n", 98.1)
    assert list(marks) == ["nflab-initramfs: started", "nflab-initramfs: modules loaded",
                           "nflab-init: starting sshd (OpenSSH)", "nflab-init: ready"]
    # the first sighting stays; the guest's own "after" figures play no part
    assert marks["nflab-initramfs: started"] == 1.2
    assert marks["nflab-init: ready"] == 1.9


def test_phase_rows_in_boot_order_with_the_login_after_the_ready_line():
    boots = [SimpleNamespace(boot_seconds=2.20, boot_marks={
                 "nflab-initramfs: started": 1.17, "nflab-init: ready": 1.87}),
             SimpleNamespace(boot_seconds=2.30, boot_marks={
                 "nflab-initramfs: started": 1.19, "nflab-init: ready": 1.91})]
    rows = bench.phase_rows(boots)
    assert [r.name for r in rows] == ["  console: nflab-initramfs: started",
                                      "  console: nflab-init: ready",
                                      "  first SSH login after the ready line"]
    assert rows[0].runs == [1.17, 1.19] and rows[-1].runs == pytest.approx([0.33, 0.39])
    assert bench.phase_rows([SimpleNamespace(boot_seconds=0.6, boot_marks={})]) == []


def test_traced_console_lines_keep_when_the_host_first_saw_them():
    lines = []
    lab.note_lines(lines, "[    0.000000] Linux version 6.12\r\n[    0.1] half", 0.3)
    lab.note_lines(lines, "[    0.000000] Linux version 6.12\r\n[    0.1] half a line\nnext\n", 0.5)
    assert lines == [[0.3, "[    0.000000] Linux version 6.12"], [0.5, "[    0.1] half a line"],
                     [0.5, "next"]]


def test_kernel_messages_reach_the_console_only_when_traced():
    from vm import qemu
    spec = qemu.LaunchSpec(name="t", vmdir=REPO, kernel=REPO, initrd=REPO, rootfs=REPO, modules_img=REPO,
                           ssh_pubkey="AAAA", ports=qemu.Ports(ssh=1))
    assert " quiet " in f" {qemu.kernel_cmdline(spec)} "
    spec.verbose = True
    assert " quiet " not in f" {qemu.kernel_cmdline(spec)} " and "console=ttyS0" in qemu.kernel_cmdline(spec)


TRACE = [[0.27, "[    0.000000] Linux version 6.12.118"],
         [0.28, "[    0.169083] x86/fpu: x87 FPU will use FXSAVE"],
         [0.45, "[    0.169083] Freeing SMP alternatives memory: 40K"],
         [0.47, "[    0.222104] node 0 deferred pages initialised in 12ms"],
         [1.17, "[    0.697885] Run /init as init process"],
         [1.19, "nflab-initramfs: started after 0.73s"]]


def test_boot_trace_rows_name_the_longest_waits_by_the_line_that_ended_them():
    other = [list(x) for x in TRACE]
    other[2][0], other[3] = 0.48, [0.50, "[    0.222104] node 0 deferred pages initialised in 24ms"]
    waits = bench.trace_waits(TRACE)
    assert "Linux version 6.12.118" not in {w[1] for w in waits.values()}      # the console's start
    assert waits["Freeing SMP alternatives memory: #K"] == (0.17, "Freeing SMP alternatives memory: 40K",
                                                             "x86/fpu: x87 FPU will use FXSAVE")
    assert waits["nflab-initramfs: started"][0] == 0.02
    rows = bench.trace_rows([SimpleNamespace(boot_lines=TRACE), SimpleNamespace(boot_lines=other)])
    assert [r.name for r in rows[:4]] == [
        "  kernel console up (first line)", "  kernel: Run /init as init process",
        "  wait before: Run /init as init process",
        "  wait before: Freeing SMP alternatives memory: 40K"]
    assert rows[0].runs == [0.27, 0.27] and rows[1].runs == [1.17, 1.17]
    assert rows[3].runs == pytest.approx([0.17, 0.20]) and rows[3].note == "after: x86/fpu: x87 FPU will use FXSAVE"
    # numbers that differ from boot to boot do not split a line in two
    deferred = next(r for r in rows if "deferred" in r.name)
    assert len(deferred.runs) == 2
    assert len(rows) <= 2 + bench.TRACE_GAPS


def test_a_failed_vng_run_is_counted_and_the_series_goes_on():
    """vng's own failure (its guest oopsed once under TCG here) does not end its
    series; a kit failure ends the kit's, with the error on its row."""
    kit, vng = bench.Measurement("kit"), bench.Measurement("vng")
    vng_results = iter([5.7, RuntimeError("vng exit 255, no release line: Kernel panic"), 5.8])
    kit_results = iter([2.9, RuntimeError("did not answer SSH"), 3.0])

    def take(results):
        def once():
            got = next(results)
            if isinstance(got, Exception):
                raise got
            return got
        return once
    failed = bench._alternate(3, kit, take(kit_results), vng, take(vng_results))
    assert vng.runs == [5.7, 5.8] and failed == ["vng exit 255, no release line: Kernel panic"]
    assert kit.runs == [2.9] and kit.error == "did not answer SSH"


def test_a_run_past_its_timeout_is_killed_with_its_grandchildren(tmp_path):
    """vng starts QEMU as a grandchild: killing vng alone would leave it running."""
    pidfile = tmp_path / "pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run_group(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout=1)
    stat = Path(f"/proc/{pidfile.read_text().strip()}/stat")
    for _ in range(200):                    # killed; init reaps it
        if not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z":
            break
        time.sleep(0.01)
    else:
        pytest.fail(f"the grandchild still runs: {stat.read_text()}")
