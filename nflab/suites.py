"""`invoke test`: boot (or reuse) a VM, install extensions, run their suites.

For each extension the suites are: ``tests/suites/test_<name>.py`` when it
exists (scapy + testinfra behaviour tests), the ``.t`` rule-syntax files in
its catalog folder (``tests/suites/test_rules_t.py``, both iptables
backends), and for the tracer the placement/priority suites. pytest runs in a
subprocess per kernel with ``--hosts`` set to the VM's testinfra spec, so the
same suites run against any real machine with ``pytest --hosts=...``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from nflab.errors import NflabError
from nflab.paths import REPO, build_dir

SUITES = REPO / "tests" / "suites"
# suites that belong to an extension beyond tests/suites/test_<name>.py
EXTRA_SUITES = {"tracer": ["test_placement.py", "test_tables.py"]}


@dataclass
class SuiteOutcome:
    release: str
    vm: str
    junit: Path
    exit_code: int
    seconds: float
    counts: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)
    build_failures: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.build_failures


def suite_files(names: list[str]) -> list[Path]:
    files = []
    for name in names:
        own = SUITES / f"test_{name}.py"
        if own.is_file():
            files.append(own)
        for extra in EXTRA_SUITES.get(name, []):
            if (SUITES / extra).is_file():
                files.append(SUITES / extra)
    rules = SUITES / "test_rules_t.py"
    if rules.is_file() and any(_t_files(n) for n in names):
        files.append(rules)
    return list(dict.fromkeys(files))


def _t_files(name: str) -> list[Path]:
    from kmods.spec import definition_path
    return sorted(definition_path(name).parent.glob("lib*.t"))


def build_reason(exc: Exception) -> str:
    """One line for a failed build: the compiler's first error (``xt_x.c:12: error: ...``)
    first, then what failed and where the full log is."""
    detail = getattr(exc, "detail", None) or ""
    first = next((l.strip() for l in detail.splitlines() if ": error:" in l or ": fatal error:" in l), "")
    if first:
        path, sep, rest = first.partition(":")
        first = f"{Path(path).name}:{rest}" if sep else first
        return f"{first} — {exc}"
    return str(exc)


def vm_name_for(release: str) -> str:
    return "t-" + re.sub(r"[^A-Za-z0-9]+", "-", release.split("-cloud")[0])[:28].strip("-")


def parse_junit(path: Path) -> tuple[dict, list]:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failures = []
    if not path.is_file():
        return counts, failures
    root = ET.parse(path).getroot()
    for suite in root.iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                msg = (el.get("message") or "").splitlines()[0:1]
                failures.append(f"{case.get('classname')}::{case.get('name')}: {msg[0] if msg else tag}")
    return counts, failures


GATE_ENV = "NFLAB_START_GATE"   # pytest waits for "go" in this file before its first test


def start_pytest(cmd: list, *, env: dict, quiet: bool = False) -> subprocess.Popen:
    out = subprocess.DEVNULL if quiet else None
    return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=out, stderr=out)


def watch(proc: subprocess.Popen, vm: str, *, poll: float = 0.5) -> int:
    """Wait for the pytest subprocess *proc* while watching the VM: a kernel fault
    on the console (soft lockup, oops, panic...) or a dead QEMU ends the run at
    once with the console excerpt, instead of every remaining test waiting out
    its SSH timeouts."""
    from vm import lab

    try:
        while True:
            try:
                return proc.wait(timeout=poll)
            except subprocess.TimeoutExpired:
                pass
            state = lab.load(vm)
            if state is not None:
                lab.check_health(state)      # raises VMError (and stops the VM) on a fault
    finally:
        stop(proc)


def stop(proc: subprocess.Popen):
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_watched(cmd: list, vm: str, *, env: dict, poll: float = 0.5, quiet: bool = False) -> int:
    """Run the pytest subprocess *cmd* under :func:`watch`. With *quiet* pytest's
    output is discarded (the JUnit file is the result)."""
    return watch(start_pytest(cmd, env=env, quiet=quiet), vm, poll=poll)


def run(names: list[str] | None, kernel_spec: str | None, *, vm: str | None = None,
        keep: bool = False, junit: str | None = None, html: str | None = None,
        pytest_args: list | None = None, progress=print) -> SuiteOutcome:
    """Build, boot/reuse, install and run the suites of *names* on one kernel."""
    from kmods import build, spec
    from vm import kernels, lab
    from vm import install as vm_install

    names = names or spec.catalog_names()
    for n in names:
        spec.load(n)
    kernel = kernels.get(kernel_spec, progress=progress)
    t0 = time.monotonic()
    built, failed = build.build_many(names, kernel, progress=lambda n: progress(f"building {n}"))
    if vm is None:
        default = lab.load("default")
        if default is not None and lab.is_running(default) and default.release == kernel.release:
            vm = "default"
        elif keep:
            vm = vm_name_for(kernel.release)          # a fixed name the next run reuses
        else:
            # private to this process: concurrent runs never share (or stop) each other's VM
            vm = f"{vm_name_for(kernel.release)[:22]}-{os.getpid() % 100000}"
    booted_here = not (lab.load(vm) and lab.is_running(lab.load(vm)))
    files = suite_files([art.name for art in built])
    if not files:
        raise NflabError(f"no suites found for {', '.join(names)}",
                         hint="add tests/suites/test_<name>.py or a lib*.t file")
    reports = build_dir() / "reports" / kernel.release
    reports.mkdir(parents=True, exist_ok=True)
    junit_path = Path(junit) if junit else reports / f"junit-{'-'.join(names) if len(names) < 4 else 'catalog'}.xml"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "nflab.pytest_plugin", "-q", "-rfEs",
           f"--rootdir={REPO}", "-c", str(REPO / "pyproject.toml"),
           f"--hosts={lab.testinfra_spec_for(vm)}", f"--nflab-vm={vm}",
           f"--junitxml={junit_path}", *[f"--nflab-ext={art.name}" for art in built],
           *(["--html", html, "--self-contained-html"] if html else []),
           *map(str, files), *(pytest_args or [])]
    # pytest starts now: its imports and collection (~1 s) overlap the boot and the
    # installs, and it waits at the gate before its first test
    gate = reports / f".gate-{os.getpid()}"
    gate.unlink(missing_ok=True)
    proc = start_pytest(cmd, env=dict(os.environ, NFLAB_VM=vm, **{GATE_ENV: str(gate)}))
    try:
        state = lab.up(kernel_spec if kernel_spec else None, vm, progress=progress)
        if state.testinfra_spec != lab.testinfra_spec_for(vm):
            raise NflabError(f"VM {vm!r} answers at {state.testinfra_spec}, "
                             f"not {lab.testinfra_spec_for(vm)}", hint="run `invoke vm-down --vm={vm}`")
        for art in built:
            progress(f"installing {art.name} in VM {vm}")
            vm_install.install(art.name, vm)
        progress(f"running {len(files)} suite file(s) on {kernel.release}")
        gate.write_text("go")
        rc = watch(proc, vm)
        counts, failures = parse_junit(junit_path)
        return SuiteOutcome(kernel.release, vm, junit_path, rc, time.monotonic() - t0,
                            counts, failures, [(n, build_reason(e)) for n, e in failed])
    except BaseException:
        if not gate.exists():
            gate.write_text("abort")
        stop(proc)
        raise
    finally:
        gate.unlink(missing_ok=True)
        if booted_here and not keep:
            progress(f"stopping VM {vm}")
            lab.down(vm)
