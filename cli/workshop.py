"""`invoke workshop`: build an exercise (skeleton or solution), install it in a VM, run its suite."""

from __future__ import annotations

import shlex
import sys

from invoke import task

from cli import SNAPSHOT_HELP, snapshot_flag
from ground.output import Progress, friendly, table
from ground.errors import NflabError


@task(help={
    "exercise": "exercise number or folder name (1, ex03_ttl), a comma list, or `all` (default: all)",
    "solution": "use the reference solution (kmods/workshop/solutions/) instead of your skeleton",
    "kernel": "kernel spec: 6.1, 6.12 or an exact ABI (default 6.12)",
    "vm": "VM to use (default ws-<kernel>; booted if not running, then stopped again)",
    "keep": "leave a VM this task booted running (faster next round)",
    "junit": "JUnit XML path (default build/reports/<release>/junit-workshop-<variant>.xml)",
    "pytest": "extra pytest arguments, e.g. \"-x -k mark\"",
    "list": "only list the exercises and their files",
    "quiet": "no progress display",
    "snapshot": SNAPSHOT_HELP,
})
@friendly
def workshop(c, exercise=None, solution=False, kernel=None, vm=None, keep=False, junit=None,
             pytest=None, list=False, quiet=False, snapshot=True):
    """Workshop exercises (docs/workshop.md): build, install in a restored VM, run the suite; green or red."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from nflab import workshop as ws

    if list:
        table(["#", "exercise", "kind", "module", "definition", "suite"],
              [[e.number, e.name, e.load().kind, e.load().module,
                e.definition().relative_to(ws.REPO), e.suite.relative_to(ws.REPO)]
               for e in ws.select(exercise)])
        return
    with Progress(quiet) as progress:
        out = ws.run(exercise, kernel, solution=solution, vm=vm, keep=keep, junit=junit,
                     pytest_args=shlex.split(pytest or ""), snapshot=snapshot_flag(snapshot),
                     progress=progress)
    _report(out, ws.exercises(), keep)


def _report(out, exercises, keep: bool):
    """The compiler's errors of what did not build, the table, the kept VM, the verdict."""
    for n, detail in out.build_details.items():
        print(f"exercise {n}: {detail}", file=sys.stderr)
    names = {e.number: e.name for e in exercises}
    table(["#", "exercise", "variant", "kernel", "result"],
          [[n, names.get(n, "?"), out.variant, out.release, v] for n, v in out.verdicts.items()])
    print(f"{out.seconds:.1f}s, junit: {out.junit}")
    if keep:
        print(f"VM {out.vm} left running (invoke vm-down --vm={out.vm})")
    if not out.ok:
        red = [str(n) for n, v in out.verdicts.items() if v != "passed"]
        raise NflabError(f"exercise(s) {', '.join(red)} not green yet on {out.release}",
                         hint=_red_hint(out))
    print("all green")


def _red_hint(out) -> str:
    """What to read: the compiler's errors for what did not build, pytest's for red suites."""
    parts = []
    if out.build_failed:
        parts.append(f"exercise(s) {', '.join(map(str, out.build_failed))} did not build or "
                     "install: the compiler's file:line: errors are above and the full build "
                     "log is named in the result column; fix the template and run again")
    if out.suite_failed:
        parts.append(f"for exercise(s) {', '.join(map(str, out.suite_failed))} the pytest "
                     "output above says what the suite saw")
    return "; ".join(parts + ["hints in docs/workshop.md"])


TASKS = [workshop]
