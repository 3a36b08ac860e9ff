"""`invoke test` split over several VMs (nflab/suites.py): how many, which files
where, and the merged results."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from nflab import suites
from ground.errors import NflabError

F = [Path(f"/s/test_{c}.py") for c in "abcdef"]


def test_plan_deals_longest_first_to_the_shard_free_first():
    secs = {"test_a.py": 30, "test_b.py": 5, "test_c.py": 20, "test_d.py": 10, "test_e.py": 1, "test_f.py": 4}
    groups = suites.plan_shards(F, 2, secs)
    loads = [sum(secs[f.name] for f in g) for g in groups]
    assert sorted(loads) == [35, 35]
    assert sorted(f for g in groups for f in g) == sorted(F)
    # each group keeps the given order of the files
    for g in groups:
        assert g == sorted(g, key=F.index)


def test_plan_gives_the_late_shard_less():
    secs = {f.name: 10 for f in F}
    early, late = suites.plan_shards(F, 2, secs, start_delay=20)
    assert len(early) == 4 and len(late) == 2


def test_plan_unknown_files_cost_the_median_and_never_make_empty_shards():
    groups = suites.plan_shards(F[:1], 2, {})
    assert groups == [[F[0]]]
    secs = {"test_a.py": 100, "test_b.py": 1, "test_c.py": 2}
    groups = suites.plan_shards(F[:4], 2, secs)       # test_d unknown: costs 2 (the median)
    assert [F[0]] in groups


def test_shard_count_auto(monkeypatch):
    monkeypatch.delenv(suites.JOBS_ENV, raising=False)
    monkeypatch.setattr(suites.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(suites, "_available_gib", lambda: 20.0)
    long = {f.name: 30 for f in F}
    assert suites.shard_count(None, F, long, own_vms=True) == 2
    assert suites.shard_count(None, F, long, own_vms=False) == 1          # --vm / --keep / --html
    assert suites.shard_count(None, F[:2], {"test_a.py": 5, "test_b.py": 5}, own_vms=True) == 1
    assert suites.shard_count(None, F[:1], long, own_vms=True) == 1
    monkeypatch.setattr(suites, "_available_gib", lambda: 2.0)            # room for one VM
    assert suites.shard_count(None, F, long, own_vms=True) == 1
    monkeypatch.setattr(suites, "_available_gib", lambda: 20.0)
    monkeypatch.setattr(suites.os, "cpu_count", lambda: 1)
    assert suites.shard_count(None, F, long, own_vms=True) == 1


def test_shard_count_explicit(monkeypatch):
    monkeypatch.delenv(suites.JOBS_ENV, raising=False)
    assert suites.shard_count("3", F, {}, own_vms=True) == 3
    assert suites.shard_count(8, F[:2], {}, own_vms=True) == 2            # never more than files
    assert suites.shard_count(1, F, {}, own_vms=False) == 1
    monkeypatch.setenv(suites.JOBS_ENV, "2")
    assert suites.shard_count(None, F, {}, own_vms=True) == 2
    for bad in ("0", "two", -1):
        with pytest.raises(NflabError, match="not a number of VMs"):
            suites.shard_count(bad, F, {}, own_vms=True)
    with pytest.raises(NflabError) as exc:
        suites.shard_count(2, F, {}, own_vms=False)
    assert "--vm" in exc.value.hint
    # the variable is a preference: a run in a given VM (a matrix cell's --vm) takes one
    assert suites.shard_count(None, F, {}, own_vms=False) == 1
    monkeypatch.setenv(suites.JOBS_ENV, "two")
    with pytest.raises(NflabError, match=r"\$NFLAB_TEST_JOBS='two'"):
        suites.shard_count(None, F, {}, own_vms=True)


@pytest.mark.parametrize("codes, want", [([0, 0], 0), ([0, 5], 0), ([5, 5], 5), ([1, 0], 1),
                                         ([5, 2], 2), ([0, 1, 3], 1)])
def test_merged_exit(codes, want):
    assert suites.merged_exit(codes) == want


def _junit(path: Path, cases: list[tuple[str, str, float, bool]]):
    suite = ET.Element("testsuite", name="pytest", tests=str(len(cases)),
                       failures=str(sum(1 for c in cases if not c[3])), errors="0", skipped="0")
    for file, name, t, ok in cases:
        case = ET.SubElement(suite, "testcase", classname=f"tests.suites.{Path(file).stem}", name=name,
                             file=file, time=str(t))
        if not ok:
            ET.SubElement(case, "failure", message="boom\nmore")
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(path)


def test_merge_junit_and_record_durations(tmp_path, monkeypatch):
    monkeypatch.setattr(suites, "build_dir", lambda: tmp_path)
    monkeypatch.setattr(suites, "BASELINE_DURATIONS", tmp_path / "none.json")
    a, b = tmp_path / "a.xml", tmp_path / "b.xml"
    _junit(a, [("tests/suites/test_x.py", "t1", 1.5, True), ("tests/suites/test_x.py", "t2", 2.0, True)])
    _junit(b, [("tests/suites/test_y.py", "t3", 4.0, False)])
    out = tmp_path / "junit.xml"
    suites.merge_junit([a, b, tmp_path / "missing.xml"], out)
    counts, failures = suites.parse_junit(out)
    assert counts == {"tests": 3, "failures": 1, "errors": 0, "skipped": 0}
    assert failures == ["tests.suites.test_y::t3: boom"]
    suites.record_durations("6.1-x", out)
    assert suites.load_durations("6.1-x") == {"test_x.py": 3.5, "test_y.py": 4.0}
    _junit(a, [("tests/suites/test_x.py", "t1", 1.0, True)])
    suites.record_durations("6.1-x", a)                  # later runs update, others stay
    assert suites.load_durations("6.1-x") == {"test_x.py": 1.0, "test_y.py": 4.0}


def test_a_kernel_never_run_is_split_by_the_shipped_baseline(tmp_path, monkeypatch):
    """A fresh clone (CI) has no previous run: the seconds shipped with the suites
    deal layer7, the longest file, a VM of its own, as a second run would."""
    monkeypatch.setattr(suites, "build_dir", lambda: tmp_path)
    base = suites.load_durations("never-run")
    assert base == suites._read_durations(suites.BASELINE_DURATIONS) and base["test_layer7.py"] > 60
    files = sorted(suites.SUITES.glob("test_*.py"))
    assert {f.name for f in files} - {"test_placement.py", "test_tables.py"} <= set(base), \
        "a suite file has no baseline seconds: add it to tests/suites/suite-seconds.json"
    groups = suites.plan_shards(files, 2, base)
    alone = [g for g in groups if any(f.name == "test_layer7.py" for f in g)][0]
    assert len(alone) <= 2, alone
    out = tmp_path / "junit.xml"
    _junit(out, [("tests/suites/test_layer7.py", "t1", 5.0, True)])
    suites.record_durations("never-run", out)           # a run's own seconds win
    assert suites.load_durations("never-run")["test_layer7.py"] == 5.0
    assert suites._read_durations(suites.durations_path("never-run")) == {"test_layer7.py": 5.0}
