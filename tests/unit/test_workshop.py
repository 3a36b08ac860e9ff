"""Workshop plumbing without a kernel: exercise lookup, grading from JUnit, the
pytest command, and the CLI's promises (help per option, new-module's next steps)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cli import workshop as cli_workshop
from nflab import workshop as ws
from ground.errors import BuildError, NflabError, SpecError


def test_exercises_found_by_number_and_name():
    exs = ws.exercises()
    assert [e.number for e in exs] == [1, 2, 3, 4, 5, 6]
    assert ws.get(3).name == ws.get("03").name == ws.get("ex03_ttl").name == "ex03_ttl"
    assert [e.number for e in ws.select("1,ex06_v6range,1")] == [1, 6]
    assert ws.select("all") == ws.select(None) == exs


def test_unknown_exercise_names_the_valid_ones():
    with pytest.raises(SpecError) as err:
        ws.get(9)
    assert "1 (ex01_count)" in str(err.value)


@pytest.mark.parametrize("ex", ws.exercises(), ids=lambda e: e.name)
def test_skeleton_and_solution_define_the_same_extension(ex):
    skel, sol = ex.load(), ex.load(solution=True)
    assert skel.name == sol.name == ex.name and skel.module == sol.module
    assert ex.folder(True).parent == ws.SOLUTIONS and ex.suite.is_file()


def test_verdicts_from_junit(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text("""<testsuites><testsuite tests="4">
      <testcase classname="tests.workshop.test_ex01_count" name="a"/>
      <testcase classname="tests.workshop.test_ex02_prio" name="a"><failure message="x"/></testcase>
      <testcase classname="tests.workshop.test_ex02_prio" name="b"><skipped/></testcase>
      <testcase classname="tests.workshop.test_ex03_ttl" name="a"><skipped/></testcase>
    </testsuite></testsuites>""")
    got = ws.verdicts(ws.select("1,2,3,4"), junit)
    # all skipped or absent is not green
    assert got == {1: "passed", 2: "failed", 3: "failed", 4: "failed"}


def test_suite_command_targets_the_vm_and_the_suites(tmp_path):
    cmd = ws.suite_command(ws.select("2"), "ssh://nflab-x?ssh_config=/c", "x", tmp_path / "j.xml",
                           ["-k", "mark"], first_failure=True)
    assert "--hosts=ssh://nflab-x?ssh_config=/c" in cmd and "--nflab-vm=x" in cmd
    assert str(ws.get(2).suite) in cmd and "--nflab-first-failure" in cmd
    assert cmd[-2:] == ["-k", "mark"]


def test_variant_build_trees_are_apart(monkeypatch, tmp_path):
    import os
    monkeypatch.setenv("NFLAB_BUILD", str(tmp_path))
    with ws.build_tree(solution=True):
        assert os.environ["NFLAB_BUILD"] == str(tmp_path / "workshop-solution")
    assert os.environ["NFLAB_BUILD"] == str(tmp_path)


def test_every_task_has_a_summary_and_documented_options():
    import copy
    import inspect

    import tasks
    for name, t in tasks.ns.tasks.items():
        doc = inspect.getdoc(t.body) or ""
        assert doc.splitlines() and doc.splitlines()[0].strip(), f"{name}: no one-line help"
        probe = copy.copy(t)                  # get_arguments() pops help from the task
        probe.help = dict(t.help or {})
        undocumented = [a.name for a in probe.get_arguments() if not a.help]
        assert not undocumented, f"invoke {name}: options without help: {undocumented}"


def test_new_module_prints_the_next_three_commands(monkeypatch, tmp_path, capsys):
    from cli import build as cli
    from kmods import scaffold, spec
    monkeypatch.setattr(spec, "CATALOG", tmp_path)
    monkeypatch.setattr(scaffold, "SUITES", tmp_path)
    cli.new_module.body(None, kind="hook", name="nextsteps")
    out = capsys.readouterr().out.splitlines()
    nxt = out[out.index("next:") + 1:]
    assert [line.split()[:2] for line in nxt] == [["invoke", "build-module"], ["invoke", "install"],
                                                   ["invoke", "test"]]
    assert all("--name=nextsteps" in line for line in nxt)


def _outcome(verdicts, details=None):
    return ws.Outcome("6.1.0-57-cloud-amd64", "ws-6-1-0-57", "skeleton", Path("j.xml"), 1, 1.0,
                      verdicts=verdicts, build_details=details or {})


def test_a_failed_build_keeps_the_compiler_errors(monkeypatch):
    err = BuildError("kernel module xt_ex03_ttl failed to build", hint="full log: /b/build.log",
                     detail="xt_ex03_ttl.c:40:9: error: 'infoo' undeclared")

    def install(exs, vm, **kw):
        if exs[0].number == 3:
            raise err
    monkeypatch.setattr(ws, "install", install)
    monkeypatch.setattr(ws.lab, "require", lambda vm: None)
    ok, errors, details = ws._install_each([ws.get(1), ws.get(3)], "v", solution=False,
                                           progress=lambda m: None)
    assert [e.number for e in ok] == [1]
    assert errors == {3: f"build/install failed: {err}"}
    assert details == {3: err.detail}


def test_workshop_prints_the_compiler_errors_and_a_build_hint(capsys):
    out = _outcome({3: "build/install failed: kernel module xt_ex03_ttl failed to build"},
                   {3: "xt_ex03_ttl.c:40:9: error: 'infoo' undeclared"})
    with pytest.raises(NflabError) as info:
        cli_workshop._report(out, ws.exercises(), keep=False)
    assert "exercise 3: xt_ex03_ttl.c:40:9: error: 'infoo' undeclared" in capsys.readouterr().err
    assert "file:line: errors are above" in info.value.hint
    assert "pytest" not in info.value.hint


def test_workshop_red_suite_points_at_pytest(capsys):
    with pytest.raises(NflabError) as info:
        cli_workshop._report(_outcome({1: "failed"}), ws.exercises(), keep=False)
    assert "for exercise(s) 1 the pytest output above" in info.value.hint
    assert "file:line" not in info.value.hint


def test_workshop_keep_names_the_vm_left_running(capsys):
    out = _outcome({1: "passed"})
    out.exit_code = 0
    cli_workshop._report(out, ws.exercises(), keep=True)
    assert ("VM ws-6-1-0-57 left running (invoke vm-down --vm=ws-6-1-0-57)"
            in capsys.readouterr().out)


def test_handout_names_vms_and_paths_that_exist():
    text = (ws.REPO / "docs" / "workshop.md").read_text()
    examples = set(re.findall(r"`(ws-\d[\w-]*)` for ([\w.+-]+)\)", text))
    assert examples and all(ws.vm_name(release) == name for name, release in examples)
    assert set(re.findall(r"ws-\d[\w-]*", text)) == {name for name, _ in examples}, \
        "name workshop VMs ws-<release> in the handout, with one worked example"
    assert "$NFLAB_CACHE/" not in text, "NFLAB_CACHE is unset by default: ${NFLAB_CACHE:-...}"
