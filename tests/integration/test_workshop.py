"""The workshop's exercises, graded in CI: on 6.1 every reference solution passes
its suite and every unsolved skeleton fails it.

One VM (``it-workshop``) serves all exercises: their module names differ, so
the six solutions are installed side by side and their suites run in one
pytest subprocess; then the six skeletons replace them (``install`` unloads a
module of the same name first) and the same suites run again, each stopping
at its first failure (``--nflab-first-failure``: red is red). Builds go to
the session's isolated ``$NFLAB_BUILD``. Without a VM: the exercises are
complete (skeleton, solution, suite) and both variants build on 6.12 too.
"""

from __future__ import annotations

import time

import pytest

from nflab import workshop as ws

pytestmark = [pytest.mark.slow]

EXERCISES = ws.exercises()
KERNEL = "6.1"
VM = "it-workshop"


def test_six_exercises_complete():
    assert [e.number for e in EXERCISES] == [1, 2, 3, 4, 5, 6]
    for ex in EXERCISES:
        skel, sol = ex.load(solution=False), ex.load(solution=True)
        assert skel.name == sol.name == ex.name and skel.kind == sol.kind
        assert ex.suite.is_file(), f"{ex.suite} is missing"
        own = [p for p in ex.folder().iterdir() if p.suffix == ".j2"]
        assert own and any(f"TODO(ex{ex.number})" in p.read_text()
                           for p in [ex.definition(), *own]), f"{ex.name}: skeleton has no TODO(ex{ex.number})"
        assert not any("TODO" in p.read_text() for p in ex.folder(True).iterdir()), \
            f"{ex.name}: the solution still has a TODO"


@pytest.mark.parametrize("solution", [False, True], ids=["skeleton", "solution"])
def test_both_variants_build_on_612(build_root, kernel_612, solution):
    arts = ws.build(EXERCISES, kernel_612, solution=solution)
    assert [a.name for a in arts] == [e.name for e in EXERCISES]
    assert all(a.ko.is_file() and a.vermagic.startswith(kernel_612.release) for a in arts)


@pytest.fixture(scope="module")
def graded(build_root, tmp_path_factory):
    """{"solution"|"skeleton": Outcome} from one VM boot; the VM is stopped after."""
    from vm import lab

    reports = tmp_path_factory.mktemp("workshop")
    timings = {}
    started = time.monotonic()
    lab.up(KERNEL, VM, progress=lambda m: None)
    timings["boot"] = time.monotonic() - started
    try:
        out = {}
        for solution in (True, False):
            t0 = time.monotonic()
            out[ws.variant(solution)] = ws.run_suites(
                EXERCISES, VM, solution=solution, junit=reports / f"junit-{ws.variant(solution)}.xml",
                progress=lambda m: None, capture=True, first_failure=not solution)
            timings[ws.variant(solution)] = time.monotonic() - t0
    finally:
        lab.down(VM)
    print(f"workshop grading on {KERNEL}: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return out


def _explain(outcome) -> str:
    return "\n".join(outcome.failures) or "(no failure recorded; see the JUnit file)"


@pytest.mark.vm
@pytest.mark.parametrize("number", [e.number for e in EXERCISES])
def test_solution_passes(graded, number):
    out = graded["solution"]
    assert out.verdicts[number] == "passed", f"exercise {number} solution: {out.verdicts[number]}\n{_explain(out)}"


@pytest.mark.vm
@pytest.mark.parametrize("number", [e.number for e in EXERCISES])
def test_skeleton_fails(graded, number):
    out = graded["skeleton"]
    # "failed" by its suite: a skeleton that no longer builds or loads is no proof either
    assert out.verdicts[number] == "failed", \
        f"exercise {number}: the unsolved skeleton is {out.verdicts[number]!r} on {out.release}, " \
        "not failed by its suite: the suite proves nothing"
    assert out.counts["tests"] > 0
