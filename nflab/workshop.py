"""The workshop: graded exercises built, installed and tested like catalog extensions.

Each exercise is a folder ``kmods/workshop/exNN_<name>/`` (the attendee's
skeleton: ``ext.toml`` + ``<module>.c.j2`` with ``TODO(exN)`` markers; it
builds but its suite fails) and its reference solution apart in
``kmods/workshop/solutions/exNN_<name>/``. Both define the extension
``exNN_<name>``, so the suite ``tests/workshop/test_exNN_<name>.py`` checks
whichever is loaded. The handout is ``docs/workshop.md``.

:func:`run` builds the chosen variant of one or more exercises for one
kernel, boots (or reuses) a lab VM, installs them all (their module names
differ, so they coexist) and runs their suites in one pytest subprocess.
Skeleton and solution build in separate trees (``build/workshop-<variant>/``)
so switching between them does not rebuild.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from ground.errors import NflabError, SpecError
from ground.paths import REPO, build_dir
from kmods import spec
from kmods.build import build_extension
from nflab import deploy
from nflab.suites import parse_junit, run_watched
from supply import kernels
from vm import lab

WORKSHOP = REPO / "kmods" / "workshop"
SOLUTIONS = WORKSHOP / "solutions"
SUITES = REPO / "tests" / "workshop"
VARIANTS = ("skeleton", "solution")
BUILD_FAILED = "build/install failed"
_FOLDER_RE = re.compile(r"^ex(\d{2})_[a-z0-9_]+$")


@dataclass(frozen=True)
class Exercise:
    number: int
    name: str            # folder and extension name: ex01_count

    def folder(self, solution: bool = False) -> Path:
        return (SOLUTIONS if solution else WORKSHOP) / self.name

    def definition(self, solution: bool = False) -> Path:
        return self.folder(solution) / "ext.toml"

    @property
    def suite(self) -> Path:
        return SUITES / f"test_{self.name}.py"

    def load(self, solution: bool = False):
        """The validated Extension of the skeleton or the solution."""
        path = self.definition(solution)
        if not path.is_file():
            raise SpecError(f"exercise {self.number}: {path} is missing")
        return spec.load_file(path)


def exercises() -> list[Exercise]:
    """Every exercise with a skeleton folder, by number."""
    found = []
    if WORKSHOP.is_dir():
        for d in sorted(WORKSHOP.iterdir()):
            m = _FOLDER_RE.match(d.name)
            if m and (d / "ext.toml").is_file():
                found.append(Exercise(int(m.group(1)), d.name))
    return found


def get(exercise) -> Exercise:
    """An exercise by number (``3``, ``"03"``) or folder name (``ex03_ttl``)."""
    known = exercises()
    text = str(exercise).strip()
    for ex in known:
        if text == ex.name or (text.isdigit() and int(text) == ex.number):
            return ex
    raise SpecError(f"--exercise: no exercise {text!r}",
                    hint="valid: " + ", ".join(f"{e.number} ({e.name})" for e in known))


def select(spec_text: str | None) -> list[Exercise]:
    """``None``/``all`` -> every exercise; else a comma list of numbers or names."""
    if spec_text is None or str(spec_text).strip() in ("", "all"):
        return exercises()
    return list(dict.fromkeys(get(x) for x in str(spec_text).split(",") if x.strip()))


def variant(solution: bool) -> str:
    return VARIANTS[1] if solution else VARIANTS[0]


@contextlib.contextmanager
def build_tree(solution: bool):
    """Builds of one variant go to ``<build>/workshop-<variant>/<release>/<name>``."""
    old = os.environ.get("NFLAB_BUILD")
    os.environ["NFLAB_BUILD"] = str(build_dir() / f"workshop-{variant(solution)}")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("NFLAB_BUILD", None)
        else:
            os.environ["NFLAB_BUILD"] = old


def build(exs: list[Exercise], kernel, *, solution: bool = False, progress=None) -> list:
    """Build the chosen variant of *exs* for *kernel*; returns their Artifacts."""
    arts = []
    with build_tree(solution):
        for ex in exs:
            ext = ex.load(solution)
            if progress:
                progress(f"building exercise {ex.number} ({variant(solution)}) for {kernel.release}")
            arts.append(build_extension(ext, kernel))
    return arts


def install(exs: list[Exercise], vm: str, *, solution: bool = False, progress=None) -> list:
    """Build and load the chosen variant of *exs* in VM *vm* (replacing the other one)."""
    done = []
    with build_tree(solution):
        for ex in exs:
            if progress:
                progress(f"installing exercise {ex.number} ({variant(solution)}) in VM {vm}")
            done.append(deploy.install(ex.load(solution), vm))
    return done


@dataclass
class Outcome:
    release: str
    vm: str
    variant: str
    junit: Path
    exit_code: int
    seconds: float
    counts: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    # exercise number -> "passed" | "failed" | "build/install failed: ..."
    verdicts: dict = field(default_factory=dict)
    # exercise number -> what its failed build or install said (the compiler's
    # `file:line: error:` lines), for exercises whose suite did not run
    build_details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and all(v == "passed" for v in self.verdicts.values())

    @property
    def build_failed(self) -> list[int]:
        """The exercises that did not build or install (their suites did not run)."""
        return [n for n, v in self.verdicts.items() if v.startswith(BUILD_FAILED)]

    @property
    def suite_failed(self) -> list[int]:
        """The exercises whose suite ran and was red."""
        unbuilt = set(self.build_failed)
        return [n for n, v in self.verdicts.items() if v != "passed" and n not in unbuilt]


def suite_command(exs: list[Exercise], testinfra_spec: str, vm: str, junit: Path,
                  pytest_args=None, *, first_failure: bool = False) -> list[str]:
    """The pytest command line; *first_failure* stops each exercise's suite at its
    first failed test (enough to grade a skeleton red, and much faster)."""
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "nflab.pytest_plugin",
            "-q", "-rfEs", f"--rootdir={REPO}", "-c", str(REPO / "pyproject.toml"),
            f"--hosts={testinfra_spec}", f"--nflab-vm={vm}", f"--junitxml={junit}",
            *[f"--nflab-ext={ex.name}" for ex in exs], *[str(ex.suite) for ex in exs],
            *(["--nflab-first-failure"] if first_failure else []), *(pytest_args or [])]


def verdicts(exs: list[Exercise], junit: Path) -> dict:
    """Per exercise: ``passed`` when its suite ran tests and none failed, else ``failed``."""
    out = {ex.number: "failed" for ex in exs}
    if not junit.is_file():
        return out
    ran, bad = {}, set()
    for case in ET.parse(junit).getroot().iter("testcase"):
        modules = (case.get("classname") or "").split(".")   # tests.workshop.test_<name>[.Class]
        for ex in exs:
            if f"test_{ex.name}" in modules:
                if case.find("skipped") is None:
                    ran[ex.number] = ran.get(ex.number, 0) + 1
                if case.find("failure") is not None or case.find("error") is not None:
                    bad.add(ex.number)
    for ex in exs:
        out[ex.number] = "passed" if ran.get(ex.number) and ex.number not in bad else "failed"
    return out


def run_suites(exs: list[Exercise], vm: str, *, solution: bool = False, junit: Path | None = None,
               pytest_args=None, progress=print, capture: bool = False,
               first_failure: bool = False) -> Outcome:
    """Install the variant of *exs* in the running VM *vm* and run their suites."""
    state = lab.require(vm)
    t0 = time.monotonic()
    ok_exs, build_errors, details = _install_each(exs, vm, solution=solution, progress=progress)
    reports = build_dir() / "reports" / state.release
    reports.mkdir(parents=True, exist_ok=True)
    # absolute: pytest runs in the repository (nflab.suites.start_pytest), the caller anywhere
    junit = Path(junit).resolve() if junit else reports / f"junit-workshop-{variant(solution)}.xml"
    junit.unlink(missing_ok=True)
    code = 0
    if ok_exs:
        cmd = suite_command(ok_exs, state.testinfra_spec, vm, junit, pytest_args,
                            first_failure=first_failure)
        progress(f"running {len(ok_exs)} workshop suite(s) ({variant(solution)}) on {state.release}")
        code = run_watched(cmd, vm, env=dict(os.environ, NFLAB_VM=vm), quiet=capture)
    counts, failures = parse_junit(junit)
    result = verdicts(ok_exs, junit)
    result.update(build_errors)
    if build_errors and code == 0:
        code = 1
    return Outcome(state.release, vm, variant(solution), junit, code, time.monotonic() - t0,
                   counts, failures, dict(sorted(result.items())), details)


def _install_each(exs: list[Exercise], vm: str, *, solution: bool, progress):
    """Build and install each exercise on its own: one that fails is left out of the
    suite run. Returns (installed, {number: verdict}, {number: the error's detail})."""
    ok_exs, errors, details = [], {}, {}
    for ex in exs:
        try:
            install([ex], vm, solution=solution, progress=progress)
            ok_exs.append(ex)
        except NflabError as exc:
            lab.require(vm)                 # raises if the guest died: nothing else can run
            errors[ex.number] = f"{BUILD_FAILED}: {exc}"
            if exc.detail:
                details[ex.number] = exc.detail
            progress(f"exercise {ex.number} ({variant(solution)}): {exc}")
    return ok_exs, errors, details


def run(selection: str | None, kernel_spec: str | None, *, solution: bool = False,
        vm: str | None = None, keep: bool = False, junit: str | None = None,
        pytest_args=None, snapshot: bool | None = None, progress=print) -> Outcome:
    """Build, restore or boot (or reuse) a VM, install and test the chosen exercises on
    one kernel. A SIGTERM (CI's timeout, `kill`) stops the VM this run booted, as
    Ctrl-C does."""
    with lab.signals_as_interrupt():
        return _run(selection, kernel_spec, solution=solution, vm=vm, keep=keep, junit=junit,
                    pytest_args=pytest_args, snapshot=snapshot, progress=progress)


def vm_name(release: str) -> str:
    """The workshop's VM for a kernel release: ``ws-6-1-0-57`` for 6.1.0-57-cloud-amd64."""
    return "ws-" + re.sub(r"[^A-Za-z0-9]+", "-", release.split("-cloud")[0])[:24].strip("-")


def _run(selection: str | None, kernel_spec: str | None, *, solution: bool, vm: str | None,
         keep: bool, junit: str | None, pytest_args, snapshot: bool | None, progress) -> Outcome:
    exs = select(selection)
    for ex in exs:                       # the chosen variant and its suite, before anything slow
        ex.load(solution)
        if not ex.suite.is_file():
            raise NflabError(f"exercise {ex.number}: no suite {ex.suite}",
                             hint="the workshop tree is incomplete: git checkout -- tests/workshop")
    kernel = kernels.get(kernel_spec, progress=progress)
    vm = vm or vm_name(kernel.release)
    old = lab.load(vm)
    booted_here = not (old and lab.is_running(old))
    state = lab.up(kernel_spec, vm, snapshot=snapshot, progress=progress)
    try:
        return run_suites(exs, state.name, solution=solution, junit=Path(junit) if junit else None,
                          pytest_args=pytest_args, progress=progress)
    finally:
        if booted_here and not keep:
            progress(f"stopping VM {vm}")
            lab.down(vm)
