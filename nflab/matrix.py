"""`invoke matrix`: extensions × kernels, one VM per kernel, several kernels at once.

Each kernel is one *cell group*: fetch, build every selected extension, boot
one VM, install, run the suites. A group runs as its own ``invoke test``
subprocess (own VM name, own ports, own JUnit file), up to ``-j`` at a time,
bounded by cores and memory. A failure in one group never stops the others.
The same ``invoke matrix --kernels=K`` is what one CI job runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ground.errors import SpecError
from ground.paths import REPO, build_dir
from ground.proc import signal_quietly
from nflab.suites import junit_backends, parse_junit
from supply import debian_kernels, kernels, source_kernels
from vm import lab

VM_MEMORY_MIB = 1024
# a whole cell (fetch, build, boot, suites) past this is stopped: each test has its own
# watchdog and each boot its budget, but a kernel fetch or a build can hang too. A
# `source:` kernel builds in its cell (20-40 min on 2 cores under load), hence 2 h.
CELL_TIMEOUT = 7200.0
# after SIGTERM, time a cell's `invoke test` has to stop its pytest and VMs
CELL_GRACE = 60.0
# the kernel release a cell's `invoke test` output names: any line (5.10.0-46-cloud-amd64,
# 6.12.118+deb13-rt-amd64, 7.3.4+deb13-cloud-amd64, 7.3-cloud-amd64) or a source build
RELEASE_RE = re.compile(r"\b(\d+\.\d+(?:\.\d+)?(?:[-+]\S*?)?-(?:cloud-|rt-)?amd64"
                        r"|\d+\.\d+\.\d+-nflab-[0-9a-f]{8})\b")


@dataclass
class Cell:
    kernel: str
    release: str = ""
    build: dict = field(default_factory=dict)   # name -> "ok" | first error line
    test: str = "not run"
    exit_code: int | None = None
    seconds: float = 0.0
    junit: str = ""
    failures: list = field(default_factory=list)
    log: str = ""
    suites_passed: bool | None = None   # every suite test that ran passed (builds aside)
    backends: str = ""                  # iptables backends the suites tested (legacy and nft, nft only...)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and all(v == "ok" for v in self.build.values())


def resolve_kernels(text: str | None) -> list[str]:
    """Expand groups: ``lts``, ``stable``, ``rc``, ``supported`` (lts + stable + rc),
    ``latest`` (= supported), ``all-<line>`` (every ABI of a line), and lists; every
    Debian item is checked against the archive, so a bad one fails before any VM."""
    text = text or _project_kernels() or "supported"
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item == "latest":
            item = "supported"
        if item.startswith("all-"):
            out += _all_of_line(item)
        elif source_kernels.is_source_spec(item):
            source_kernels.check_spec(item)     # built (minutes) by its cell, not here
            out.append(item)
        elif item in debian_kernels.GROUPS:
            out += kernels.expand(item)
        else:
            out.append(item)            # checked when _one_cell_per_kernel resolves it
    return _one_cell_per_kernel(list(dict.fromkeys(out)))


def _one_cell_per_kernel(specs: list[str]) -> list[str]:
    """*specs* less those naming a kernel an earlier one names (``6.12`` and its
    newest ABI, from ``all-6.12``): two cells on one kernel would build in one
    tree at once. ``source:`` specs count by their text (built by their cells)."""
    seen, out = set(), []
    for item in specs:
        key = item if source_kernels.is_source_spec(item) else kernels.resolve(item).release
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _all_of_line(item: str) -> list[str]:
    line = item[4:]
    offers = debian_kernels.offers()
    abis = [o.abi for o in offers if o.buildable and o.line == line and o.flavour == "cloud-amd64"]
    if not abis:
        raise SpecError(f"--kernels: no kernels found for {item}; lines: "
                        f"{', '.join(debian_kernels.lines(offers))}",
                        hint="groups: lts, stable, rc, supported, all-<line>")
    return list(dict.fromkeys(abis))


def _project_kernels() -> str | None:
    for path in (REPO / "nflab.toml",):
        if path.is_file():
            data = tomllib.loads(path.read_text())
            ks = data.get("matrix", {}).get("kernels")
            if ks:
                return ",".join(ks)
    return None


def max_parallel(requested: int) -> int:
    cpus = os.cpu_count() or 2
    try:
        avail = int(Path("/proc/meminfo").read_text().split("MemAvailable:")[1].split()[0]) // 1024
    except (OSError, IndexError, ValueError):
        avail = 4096
    return max(1, min(requested, cpus, avail // (VM_MEMORY_MIB + 512)))


def cell_vm(kernel: str) -> str:
    """The VM name of *kernel*'s cell: the spec made a name, cut to 28 characters; a
    longer one ends in a hash of the spec, so two long specs (``source:`` kernels
    with config fragments) never share a VM."""
    name = "m-" + re.sub(r"[^A-Za-z0-9]+", "-", kernel)
    if len(name) <= 28:
        return name
    return f"{name[:19]}-{hashlib.sha1(kernel.encode()).hexdigest()[:8]}"


def _run_cell(kernel: str, names: list[str], out_dir: Path, cells: _Cells | None = None,
              timeout: float | None = None) -> Cell:
    cell = Cell(kernel)
    vm = cell_vm(kernel)
    junit = out_dir / f"junit-{re.sub(r'[^A-Za-z0-9.]+', '_', kernel)}.xml"
    junit.unlink(missing_ok=True)       # an earlier run's results are not this cell's
    cmd = [sys.executable, "-m", "invoke", "test", f"--kernel={kernel}", f"--vm={vm}", f"--junit={junit}",
           "--quiet", f"--names={','.join(names)}"]
    t0 = time.monotonic()
    res, timed_out = (cells or _Cells()).run(cmd, vm, timeout)
    cell.seconds = time.monotonic() - t0
    cell.exit_code = res.returncode
    output = res.stdout + res.stderr
    cell.log = output[-6000:]
    (out_dir / f"log-{vm}.txt").write_text(output)
    cell.junit = str(junit)
    m = RELEASE_RE.search(output)
    cell.release = m.group(1) if m else kernel
    _note_builds(cell, names, output, tested=junit.is_file())
    _note_tests(cell, junit, res.stderr)
    if timed_out:
        cell.test = f"timed out after {timeout:.0f} s and stopped ({cell.test}); see its log"
    return cell


class _Cells:
    """The cells' ``invoke test`` processes, each in a session of its own: a cell
    past its timeout is stopped alone, and a Ctrl-C or SIGTERM to the matrix
    stops every running cell (and starts no more) before the matrix exits."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: dict[int, tuple[subprocess.Popen, str]] = {}
        self.stopping = False

    def run(self, cmd: list, vm: str, timeout: float | None) -> tuple[subprocess.CompletedProcess, bool]:
        """Run a cell's *cmd* (its VM *vm*): (its result, whether it timed out)."""
        proc = self._start(cmd, vm)
        try:
            out, err = proc.communicate(timeout=timeout)
            return subprocess.CompletedProcess(cmd, proc.returncode, out, err), False
        except subprocess.TimeoutExpired:
            out, err = _stop(proc, vm)
            return subprocess.CompletedProcess(cmd, proc.returncode, out, err), True
        finally:
            with self._lock:
                self._running.pop(proc.pid, None)

    def _start(self, cmd: list, vm: str) -> subprocess.Popen:
        with self._lock:
            if self.stopping:
                raise KeyboardInterrupt("the matrix is stopping")
            proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
            self._running[proc.pid] = (proc, vm)
            return proc

    def stop_all(self):
        """Start no more cells; SIGTERM every running one, which stops its VMs; after
        CELL_GRACE kill what is left of them, VMs included."""
        with self._lock:
            self.stopping = True
            running = list(self._running.values())
        for proc, _ in running:
            signal_quietly(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + CELL_GRACE
        try:        # a second Ctrl-C cuts the grace short, never the kill
            while any(proc.poll() is None for proc, _ in running) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            for proc, vm in running:
                if proc.poll() is None:
                    _kill(proc, vm)


def _stop(proc: subprocess.Popen, vm: str) -> tuple[str, str]:
    """Stop a cell past its timeout as CI's timeout would: SIGTERM to its ``invoke
    test`` (which stops its pytest and VMs), then after CELL_GRACE its whole process
    group and its VM by force. Returns the cell's output."""
    signal_quietly(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=CELL_GRACE)
    except subprocess.TimeoutExpired:
        _kill(proc, vm)
        return proc.communicate()


def _kill(proc: subprocess.Popen, vm: str):
    """A cell that outlived its grace: its whole process group, then its VM (QEMU
    runs in a session of its own)."""
    signal_quietly(proc.pid, signal.SIGKILL, group=True)
    lab.down(vm)


def _note_builds(cell: Cell, names: list[str], output: str, tested: bool):
    """Each extension's build: its BUILD FAILED line, else ok once the suites ran,
    else not built (the cell stopped before: a kernel that did not fetch, say)."""
    for line in output.splitlines():
        if line.startswith("BUILD FAILED "):
            n, _, err = line[len("BUILD FAILED "):].partition(": ")
            cell.build[n] = err
    for n in names:
        cell.build.setdefault(n, "ok" if tested else "not built: the cell stopped first (see its log)")


def _note_tests(cell: Cell, junit: Path, stderr: str):
    counts, failures = parse_junit(junit)
    cell.failures = failures
    cell.backends = junit_backends(junit)
    if counts["tests"]:
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        cell.test = f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
        cell.suites_passed = passed > 0 and counts["failures"] + counts["errors"] == 0
    else:
        err = [l for l in stderr.splitlines() if l.startswith("error:")]
        cell.test = err[-1] if err else "no results"


def _cell_or_error(kernel: str, names: list[str], out_dir: Path, cells: _Cells | None = None,
                   timeout: float | None = None) -> Cell:
    """The cell of *kernel*; a failure of the kit itself (not of the cell's run)
    is that cell's failure, so the other cells still run and the reports are written."""
    try:
        return _run_cell(kernel, names, out_dir, cells, timeout)
    except Exception as exc:     # any error is this cell's, reported in it
        return Cell(kernel, release=kernel, build={n: "?" for n in names}, exit_code=-1,
                    test=f"error: the matrix could not run this cell: {exc}"[:300], log=repr(exc))


def cell_timeout(requested: float | None = None) -> float | None:
    """Seconds a cell may take: *requested* (``--cell-timeout``), else
    ``NFLAB_CELL_TIMEOUT``, else CELL_TIMEOUT; 0 means no limit."""
    text = requested if requested is not None else os.environ.get("NFLAB_CELL_TIMEOUT", CELL_TIMEOUT)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise SpecError(f"cell timeout {text!r} is not a number of seconds",
                        hint="give --cell-timeout=SECONDS (or NFLAB_CELL_TIMEOUT), 0 for no limit")
    return value or None


def run(kernels_text: str | None, names: list[str], jobs: int = 2, progress=print,
        timeout: float | None = None) -> list[Cell]:
    """Every cell of *kernels_text* × *names*, *jobs* at a time; a Ctrl-C or SIGTERM
    stops the running cells (their VMs too) before it ends the matrix."""
    kernels = resolve_kernels(kernels_text)
    limit = cell_timeout(timeout)
    out_dir = build_dir() / "reports" / "matrix"
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = max_parallel(jobs)
    progress(f"matrix: {len(kernels)} kernel(s) × {len(names)} extension(s), {jobs} at a time")
    running = _Cells()
    with lab.signals_as_interrupt(), ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            cells = list(pool.map(lambda k: _cell_or_error(k, names, out_dir, running, limit), kernels))
        except BaseException:
            progress("matrix: stopping the running cells")
            pool.shutdown(wait=False, cancel_futures=True)
            running.stop_all()
            raise
    write_reports(cells, names, out_dir)
    return cells


def markdown(cells: list[Cell], names: list[str]) -> str:
    lines = ["| kernel | " + " | ".join(names) + " | suites | time |",
             "|---|" + "---|" * len(names) + "---|---|"]
    for c in cells:
        builds = ["✅ build" if c.build.get(n) == "ok" else f"❌ build: {c.build.get(n, '?')[:60]}" for n in names]
        # a failed build fails the cell (exit code), not the suites of what did build
        suites_ok = c.exit_code == 0 if c.suites_passed is None else c.suites_passed
        verdict = ("✅ " if suites_ok else "❌ ") + c.test
        if c.backends:
            verdict += f" (iptables {c.backends})"
        lines.append(f"| {c.release} | " + " | ".join(builds) + f" | {verdict} | {c.seconds:.0f}s |")
    for c in cells:
        for f in c.failures[:5]:
            lines.append(f"\n- `{c.release}`: {f}")
    return "\n".join(lines) + "\n"


def write_reports(cells: list[Cell], names: list[str], out_dir: Path):
    (out_dir / "summary.json").write_text(json.dumps(
        {"extensions": names, "cells": [dict(asdict(c), ok=c.ok) for c in cells]}, indent=2) + "\n")
    md = markdown(cells, names)
    (out_dir / "summary.md").write_text(md)
    step = os.environ.get("GITHUB_STEP_SUMMARY")
    if step:
        with open(step, "a") as fh:
            fh.write(md)


GITHUB_WORKFLOW = """\
# Generated by `invoke ci-config`; one job per kernel, each runs the unit any CI can fan out:
#   invoke matrix --kernels=<kernel>
# On the provider's stock Ubuntu runner, no Debian container: the kit fetches kernels and
# toolchain build roots from Debian's archive itself; KVM is used when the runner has it.
name: nflab matrix
on:
  push:
  pull_request:
  workflow_dispatch:
jobs:
  matrix:
    name: kernel ${{{{ matrix.kernel }}}}
    runs-on: ubuntu-latest
    strategy:
      fail-fast: false
      matrix:
        kernel: [{kernels}]
    env:
      NFLAB_CACHE: /home/runner/.cache/nflab
      NFLAB_SETUP_KERNELS: ${{{{ matrix.kernel }}}}
    steps:
      - uses: actions/checkout@v4
      - name: Let QEMU use KVM where the runner offers it
        run: |
          if [ -e /dev/kvm ]; then
            echo 'KERNEL=="kvm", GROUP="kvm", MODE="0666", OPTIONS+="static_node=kvm"' \\
              | sudo tee /etc/udev/rules.d/99-nflab-kvm.rules
            sudo udevadm control --reload-rules
            sudo udevadm trigger --name-match=kvm
          fi
      - name: Cache kernels, build roots and rootfs
        uses: actions/cache@v4
        with:
          path: /home/runner/.cache/nflab
          key: nflab-${{{{ matrix.kernel }}}}-${{{{ hashFiles('vm/rootfs.py', 'vm/guest/**', 'supply/buildroot.py') }}}}
      - name: Set up (host tools from apt, .venv, the kernel and its build root, the rootfs)
        run: sudo -E bash .ci/setup
      - name: Matrix cell
        run: sudo -E .venv/bin/python -m invoke matrix --kernels=${{{{ matrix.kernel }}}} --names={names}
      - name: Hand the cache and reports back to the runner user
        if: always()
        run: sudo chown -R "$(id -u):$(id -g)" /home/runner/.cache/nflab build || true
      - name: Upload reports
        if: always()
        uses: actions/upload-artifact@v4
        with:
          name: nflab-${{{{ matrix.kernel }}}}
          path: build/reports/
"""


def github_workflow(kernels: list[str], names: list[str]) -> str:
    return GITHUB_WORKFLOW.format(kernels=", ".join(json.dumps(k) for k in kernels),
                                  names=",".join(names))
