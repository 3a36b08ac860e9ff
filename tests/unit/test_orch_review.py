"""Workshop, doctor, datapath and atlas behaviour where a review of stop 33 found
it wrong (each test failed on the code before the fix)."""

import shutil
import sys
from pathlib import Path

import pytest

from ground.errors import VMError
from nflab import atlas as at
from nflab import datapath, doctor, doctor_kit, suites
from nflab import workshop as ws
from vm import initramfs

PASSING = ('<?xml version="1.0"?><testsuites><testsuite tests="1" failures="0" errors="0" skipped="0">'
           '<testcase classname="tests.workshop.test_ex01_count" name="t"/></testsuite></testsuites>')


def test_workshop_relative_junit_is_read_where_pytest_wrote_it(tmp_path, monkeypatch):
    """pytest runs in the repository (start_pytest); --junit=out.xml given from
    another directory graded a passing exercise red."""
    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    repo.mkdir(), elsewhere.mkdir()
    monkeypatch.setattr(suites, "REPO", repo)
    monkeypatch.setenv("NFLAB_BUILD", str(tmp_path / "build"))
    monkeypatch.chdir(elsewhere)

    class St:
        release, testinfra_spec = "6.1.0-test", "ssh://x"
    monkeypatch.setattr(ws.lab, "require", lambda vm: St())
    monkeypatch.setattr(ws.lab, "load", lambda vm: None)
    monkeypatch.setattr(ws, "install", lambda *a, **k: [])

    def fake_cmd(exs, spec, vm, junit, *a, **k):   # a "pytest" that passes and writes --junitxml
        return [sys.executable, "-c", f"open({str(junit)!r}, 'w').write({PASSING!r})"]
    monkeypatch.setattr(ws, "suite_command", fake_cmd)

    out = ws.run_suites([ws.get(1)], "ro-none", junit=Path("out.xml"), progress=lambda *a: None,
                        capture=True)
    assert out.exit_code == 0 and out.verdicts == {1: "passed"} and out.ok, out.verdicts
    assert (elsewhere / "out.xml").is_file()


def test_doctor_refuses_the_busybox_the_initramfs_refuses(tmp_path, monkeypatch):
    if not shutil.which("file"):
        pytest.skip("the initramfs tells static from dynamic with file(1), which .ci/setup installs")
    fake = tmp_path / "busybox"
    shutil.copy("/bin/true", fake)                  # a dynamically linked executable
    monkeypatch.setattr(initramfs, "BUSYBOX_CANDIDATES", (str(fake),))
    initramfs._busybox.cache_clear()
    try:
        [check] = [c for c in doctor_kit.check_archive_and_busybox() if c.name == "tool busybox (static)"]
        with pytest.raises(VMError, match="no static busybox"):
            initramfs._busybox()
    finally:
        initramfs._busybox.cache_clear()
    assert check.status == doctor.FAIL and "busybox-static" in check.fix, check


def test_datapath_conntrack_half_runs_the_given_backend():
    script = datapath.pktgen_script(datapath.RULES["conntrack only"], datapath.FLOWS["one flow"],
                                    tool="iptables-nft")
    assert "iptables-legacy" not in script
    assert script.splitlines()[:2] == ["set -e", "iptables-nft -w -F FORWARD"]


def test_atlas_summary_check_only_when_every_point_was_found():
    a = at.Atlas(kernel="6.12-test")
    rows = [("ipv4", "PRE_ROUTING", -450, "nflab_tracer_hook", "nflab_tracer")]
    at.merge(a, rows, {"nflab_tracer": [("ipv4", "PRE_ROUTING", -450)],
                       "nflab_pktcount": [("ipv4", "LOCAL_IN", 10)]})      # not in nft list hooks
    assert any(not c.ok and "nflab_pktcount claims 10" in c.what for c in a.checks)
    assert not any(c.ok and "every /proc/net/nflab_* point" in c.what for c in a.checks)
    b = at.Atlas(kernel="6.12-test")
    at.merge(b, [], {"nflab_tracer": [("netdev", "INGRESS", 0)]})     # nothing to compare with
    assert [c for c in b.checks if c.ok] == []
    c = at.Atlas(kernel="6.12-test")
    at.merge(c, rows, {"nflab_tracer": [("ipv4", "PRE_ROUTING", -450)]})
    assert [x.ok for x in c.checks if "every /proc/net/nflab_* point" in x.what] == [True]


def test_twin_ratio_leaves_out_a_kit_run_lost_in_the_noise():
    r = datapath.twin_ratio([100000, 100000, 100000], [50000, 50000, 50000], [40000, 101000, 45000])
    assert r.run_ratios and min(r.run_ratios) > 0, r.run_ratios
    assert datapath.twin_ratio([100000], [50000], [101000]).best_ratio is None


def test_workshop_verdicts_match_a_suite_module_whole(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text('<testsuites><testsuite tests="1">'
                     '<testcase classname="tests.workshop.test_ex01_count_v6" name="a"/>'
                     '</testsuite></testsuites>')
    assert ws.verdicts(ws.select("1"), junit) == {1: "failed"}, "another suite's test counted for ex01"


def test_bench_runs_must_be_a_count(monkeypatch):
    from ground.errors import SpecError
    from nflab import bench
    assert bench.runs_count("5") == 5
    for bad in ("0", "-1", "three", None):
        with pytest.raises(SpecError, match="--runs"):
            bench.runs_count(bad)


def test_a_vng_that_ran_and_failed_is_not_skipped():
    from nflab import bench
    kit, vng = bench.Measurement("kit", runs=[2.0]), bench.Measurement(bench.VNG_ROW, error="oops")
    extra = {"vng_failures": "3 of 3 vng runs failed; the first: oops"}
    bench._vng_notes(kit, vng, [], extra)
    assert vng.note.startswith("failed: oops"), vng.note
    never = bench.Measurement(bench.VNG_ROW, error="vng is not installed")
    bench._vng_notes(kit, never, [], {})
    assert never.note.startswith("skipped: "), never.note


def test_bench_workshop_group_rows_and_its_build_dir(monkeypatch, tmp_path):
    """Each exercise in one kept VM with a fresh $NFLAB_BUILD, restored afterwards;
    a failed exercise is named in the total."""
    import os
    from nflab import bench
    monkeypatch.setenv("NFLAB_BUILD", str(tmp_path / "mine"))
    seen, calls = [], []
    monkeypatch.setattr(bench.kernels, "get", lambda spec, progress=None: type("K", (), {"release": f"{spec}-r"})())
    monkeypatch.setattr(bench.lab, "up", lambda *a, **k: calls.append("up"))
    monkeypatch.setattr(bench.lab, "down", lambda vm: calls.append("down"))

    def run_suites(exs, vm, **kw):
        seen.append(os.environ["NFLAB_BUILD"])
        ok = exs[0].number != 2
        return type("O", (), {"verdicts": {exs[0].number: "passed" if ok else "failed"},
                              "counts": {"tests": 3, "failures": 0 if ok else 1, "errors": 0, "skipped": 0}})()
    monkeypatch.setattr(bench.ws, "run_suites", run_suites)
    extra = {}
    rows = bench.workshop_group(("6.1",), extra, progress=lambda *a: None)
    n = len(bench.ws.exercises())
    assert len(rows) == n + 1 and "FAILED: ex02_prio" in rows[-1].note, rows[-1].note
    assert len(set(seen)) == 1 and seen[0] != str(tmp_path / "mine") and not os.path.exists(seen[0])
    assert os.environ["NFLAB_BUILD"] == str(tmp_path / "mine")
    assert calls == ["down", "up", "down"] and extra["workshop_6.1"]["failed"] == ["ex02_prio"]
