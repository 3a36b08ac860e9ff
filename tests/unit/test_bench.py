"""`invoke bench`: which measurements a run covers and what it records when one cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from nflab import bench
from ground.errors import NflabError
from ground.paths import REPO
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
    assert "valid: build, boot, snapshot, vng, test, datapath, workshop" in res.stdout + res.stderr


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
