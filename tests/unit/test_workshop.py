"""Workshop plumbing without a kernel: exercise lookup, grading from JUnit, the
pytest command, and the CLI's promises (help per option, new-module's next steps)."""

from __future__ import annotations

import pytest

from nflab import workshop as ws
from ground.errors import SpecError


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
