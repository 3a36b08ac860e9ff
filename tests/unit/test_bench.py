"""`invoke bench`: which measurements a run covers and what it records when one cannot run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nflab import bench
from ground.errors import NflabError
from ground.paths import REPO


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
