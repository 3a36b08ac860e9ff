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
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ground.errors import SpecError
from ground.paths import REPO, build_dir
from ground.proc import signal_quietly
from kmods import spec
from nflab.suites import junit_backends, parse_junit
from supply import debian_kernels, kernels, source_kernels
from vm import lab

VM_MEMORY_MIB = 1024
# a whole cell (fetch, build, boot, suites) past this is stopped: each test has its own
# watchdog and each boot its budget, but a kernel fetch or a build can hang too. A
# `source:` kernel builds in its cell (20-40 min on 2 cores under load), hence 2 h.
CELL_TIMEOUT = 7200.0
# the longest --cell-timeout: a wait past ~24 days overflows the OS's timers (OverflowError
# once the cell has started), and a cell longer than a week is a cell that hangs
CELL_TIMEOUT_MAX = 7 * 86400.0
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
    suites_passed: bool | None = None   # suites ran (a JUnit), >0 passed, none failed; None: no JUnit
    backends: str = ""                  # iptables backends the suites tested (legacy and nft, nft only...)
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """Exit 0, every build ok, and suites that ran and passed: a cell whose every
        test skipped or xfailed (a scaffolded suite not yet written) did not pass."""
        return (self.exit_code == 0 and all(v == "ok" for v in self.build.values())
                and self.suites_passed is True)


def resolve_kernels(text: str | None) -> list[str]:
    """Expand groups: ``lts``, ``stable``, ``rc``, ``supported`` (lts + stable + rc),
    ``latest`` (= supported), ``all-<line>`` (every ABI of a line), and lists; every
    Debian item is checked against the archive, so a bad one fails before any VM."""
    out = []
    for item in _items(text):
        fixed = _fixed_items(item)
        if fixed is not None:
            out += fixed
        elif item in debian_kernels.GROUPS:
            out += kernels.expand(item)
        else:
            out.append(item)            # checked when _one_cell_per_kernel resolves it
    return _one_cell_per_kernel(list(dict.fromkeys(out)))


def _items(text: str | None):
    """The items of a kernel list (the project's, else ``supported``); ``latest`` is
    ``supported``."""
    text = text or _project_kernels() or "supported"
    for item in (t.strip() for t in text.split(",") if t.strip()):
        yield "supported" if item == "latest" else item


def _fixed_items(item: str) -> list[str] | None:
    """What ``all-<line>`` (its ABIs of today) and a ``source:`` spec (checked, built
    by its cell) stand for, the same in a matrix and a CI workflow; None for others."""
    if item.startswith("all-"):
        return _all_of_line(item)
    if source_kernels.is_source_spec(item):
        source_kernels.check_spec(item)
        return [item]
    return None


def _one_cell_per_kernel(specs: list[str]) -> list[str]:
    """*specs* less those naming a kernel an earlier one names (``6.12`` and its
    newest ABI, from ``all-6.12``): two cells on one kernel would build in one
    tree at once. ``source:`` specs count by the release of a cached build they
    name, else by their line and fragment (built by their cells): ``source:6.12+debug``
    and ``source:6.12+vm/configs/debug.config`` are one kernel."""
    seen, out = set(), []
    for item in specs:
        key = _source_key(item) if source_kernels.is_source_spec(item) else kernels.resolve(item).release
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _source_key(spec: str) -> str:
    """What a ``source:`` spec builds, without building or asking the archive: a
    cached build's release (as ``plan`` would pick it), else line + fragment hash."""
    spec = spec.strip()
    if source_kernels.RELEASE_RE.match(spec):
        return spec
    want = source_kernels.parse_spec(spec)
    base = source_kernels.normalize(source_kernels.BASE_FRAGMENT.read_text(), str(source_kernels.BASE_FRAGMENT))
    for data in source_kernels.cached_builds():
        if data.get("line") == want.line and data.get("fragment_hash") == want.fragment_hash \
                and source_kernels.normalize(data.get("base", "")) == base:
            return Path(data["entry"]).name
    return f"{source_kernels.PREFIX}{want.line}+{want.fragment_hash}"


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
    cell.timed_out = timed_out
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
        except BaseException:       # never leave a started cell running untracked
            try:
                _stop(proc, vm)
            except BaseException:
                _kill(proc, vm)
            raise
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


# the hint of `invoke test`'s error when no extension built (nflab.suites._build_some)
NOTHING_BUILT = " (nothing built, so no suite ran"


def _note_builds(cell: Cell, names: list[str], output: str, tested: bool):
    """Each extension's build: its BUILD FAILED line (or its part of the error when
    none built), else ok once the suites ran, else not built (the cell stopped
    before: a kernel that did not fetch, say)."""
    for line in output.splitlines():
        if line.startswith("BUILD FAILED "):
            n, _, err = line[len("BUILD FAILED "):].partition(": ")
            cell.build[n] = err
        elif line.startswith("error: ") and NOTHING_BUILT in line and names:
            # "error: a: <compiler line> — ...; b: ... (nothing built, ...)"
            text = line[len("error: "):line.rindex(NOTHING_BUILT)]
            alt = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
            parts = re.split(rf"(?:^|; )({alt}): ", text)
            for n, err in zip(parts[1::2], parts[2::2]):
                cell.build[n] = err
    for n in names:
        cell.build.setdefault(n, "ok" if tested else "not built: the cell stopped first (see its log)")


def _xfailed(junit: Path) -> int:
    """Tests of *junit* that xfailed (pytest writes them as skipped, type pytest.xfail)."""
    if not junit.is_file():
        return 0
    return sum(1 for el in ET.parse(junit).getroot().iter("skipped") if el.get("type") == "pytest.xfail")


def _note_tests(cell: Cell, junit: Path, stderr: str):
    counts, failures = parse_junit(junit)
    cell.failures = failures
    cell.backends = junit_backends(junit)
    if junit.is_file():     # suites ran: they pass only if some test passed and none failed
        cell.suites_passed = False
    if counts["tests"]:
        xfailed = _xfailed(junit)
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        failed = counts["failures"] + counts["errors"]
        cell.test = f"{passed} passed, {failed} failed, {counts['skipped'] - xfailed} skipped" \
            + (f", {xfailed} xfailed" if xfailed else "")
        cell.suites_passed = passed > 0 and failed == 0
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
    hint = (f"give --cell-timeout=SECONDS (or NFLAB_CELL_TIMEOUT), at most {CELL_TIMEOUT_MAX:.0f} "
            "(7 days), 0 for no limit")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:       # inf, nan, 1e309
        raise SpecError(f"cell timeout {text!r} is not a number of seconds", hint=hint)
    if value > CELL_TIMEOUT_MAX:
        raise SpecError(f"cell timeout {text!r} is more than 7 days", hint=hint)
    return value or None


def run(kernels_text: str | None, names: list[str], jobs: int = 2, progress=print,
        timeout: float | None = None) -> list[Cell]:
    """Every cell of *kernels_text* × *names*, *jobs* at a time; a Ctrl-C or SIGTERM
    stops the running cells (their VMs too) before it ends the matrix."""
    limit = cell_timeout(timeout)      # a bad value fails before the archive is asked
    kernels = resolve_kernels(kernels_text)
    out_dir = build_dir() / "reports" / "matrix"
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("junit-*.xml"), *out_dir.glob("log-*.txt")]:
        old.unlink(missing_ok=True)     # an earlier run's cells are not this run's
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
        # a failed build fails the cell (its build column says so), not the suites of what
        # did build; any other failure (exit code, timeout, no results) is the suites'
        builds_failed = any(v != "ok" for v in c.build.values())
        suites_ok = c.ok or (builds_failed and c.suites_passed is True and not c.timed_out)
        verdict = ("✅ " if suites_ok else "❌ ") + c.test
        if not suites_ok and c.suites_passed and not c.timed_out:
            verdict += f" (exit {c.exit_code}: see its log)"
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
# Kernel words are read when the job runs: a line (6.1) is its newest ABI that day, `stable`
# the newest released line, `rc` the release candidate (a day without one: no cell). Without
# --names, each job tests the whole catalog of its commit.
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
{timeout}    strategy:
      fail-fast: false
      matrix:
        include:
{include}
    env:
      NFLAB_CACHE: /home/runner/.cache/nflab
      NFLAB_SETUP_KERNELS: ${{{{ matrix.kernel }}}}
{extra_env}    steps:
      - uses: actions/checkout@v4
      - name: Let QEMU use KVM where the runner offers it
        run: |
          if [ -e /dev/kvm ]; then
            echo 'KERNEL=="kvm", GROUP="kvm", MODE="0666", OPTIONS+="static_node=kvm"' \\
              | sudo tee /etc/udev/rules.d/99-nflab-kvm.rules
            sudo udevadm control --reload-rules
            sudo udevadm trigger --name-match=kvm
          fi
      - name: Hash the code that makes kernels, build roots and rootfs
        id: code
        run: echo "hash=${{{{ hashFiles('supply/**', 'vm/**') }}}}" >> "$GITHUB_OUTPUT"
      # the newest cache of this kernel word: of this code if any, else of older code;
      # setup then fetches what moved (a new ABI) and the cache is saved under the release
      - name: Restore kernels, build roots and rootfs
        id: restore
        uses: actions/cache/restore@v4
        with:
          path: /home/runner/.cache/nflab
          key: nflab/${{{{ matrix.id }}}}/${{{{ steps.code.outputs.hash }}}}/
          restore-keys: |
            nflab/${{{{ matrix.id }}}}/
      - name: Set up (host tools from apt, .venv, the kernel and its build root, the rootfs)
        run: sudo -E bash .ci/setup
      - name: Name the kernel release this job tests
        id: release
        env:
          KERNEL: ${{{{ matrix.kernel }}}}
        run: |
          release=$(sudo -E .venv/bin/python -c 'import sys; from supply import kernels; print(kernels.resolve(sys.argv[1]).release)' "$KERNEL" || echo none)
          echo "release=$release" >> "$GITHUB_OUTPUT"
      - name: Hand the cache to the runner user
        run: sudo chown -R "$(id -u):$(id -g)" /home/runner/.cache/nflab
      - name: Save kernels, build roots and rootfs under the release
        if: steps.restore.outputs.cache-matched-key != format('nflab/{{0}}/{{1}}/{{2}}', matrix.id, steps.code.outputs.hash, steps.release.outputs.release)
        uses: actions/cache/save@v4
        with:
          path: /home/runner/.cache/nflab
          key: nflab/${{{{ matrix.id }}}}/${{{{ steps.code.outputs.hash }}}}/${{{{ steps.release.outputs.release }}}}
      - name: Matrix cell
        env:
          KERNEL: ${{{{ matrix.kernel }}}}
        run: sudo -E .venv/bin/python -m invoke matrix --kernels="$KERNEL"{options}
      - name: Hand the cache and reports back to the runner user
        if: always()
        run: sudo chown -R "$(id -u):$(id -g)" /home/runner/.cache/nflab build || true
      - name: Upload reports
        if: always()
        uses: actions/upload-artifact@v4
        with:
          name: nflab-${{{{ matrix.id }}}}
          path: build/reports/
"""
# a job's setup (apt, .venv, the kernel: a source: kernel builds here, build roots, rootfs)
# beside its cell's timeout; GitHub's hosted runners stop any job at 360 minutes
SETUP_MINUTES = 60
JOB_MINUTES_MAX = 360


def ci_kernels(text: str | None) -> list[str]:
    """The kernel words of a CI workflow's jobs, read when each job runs, not now:
    ``stable`` and ``rc`` stay words, ``lts`` is the LTS lines Debian serves today (a
    line word is its newest ABI when the job runs), ``supported`` (``latest``) lts +
    stable + rc; ``all-<line>`` the ABIs of today; anything else as given, checked."""
    out = []
    for item in _items(text):
        fixed = _fixed_items(item)
        if fixed is not None:
            out += fixed
        elif item in ("stable", "rc"):
            out.append(item)
        elif item in ("lts", "supported"):
            out += debian_kernels.group("lts", debian_kernels.offers())
            out += ["stable", "rc"] if item == "supported" else []
        else:
            kernels.resolve(item)       # a bad spec fails here, not in CI
            out.append(item)
    seen, unique = set(), []
    for item in out:
        key = _source_key(item) if source_kernels.is_source_spec(item) else item
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique


def ci_id(kernel: str) -> str:
    """A name for *kernel* fit for artifact names and cache keys (no ``:`` or ``/``);
    a spec that had to change ends in a hash of itself, so two never share one."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", kernel)
    return name if name == kernel else f"{name}-{hashlib.sha1(kernel.encode()).hexdigest()[:8]}"


def ci_extra_catalog() -> list[str]:
    """The extra catalog folders ($NFLAB_EXTRA_CATALOG, --extensions-dir) as paths
    relative to the repository, the only files a CI job has; one outside is refused."""
    out = []
    for folder in spec.catalog_dirs()[1:]:
        try:
            out.append(folder.relative_to(REPO.resolve()).as_posix())
        except ValueError:
            raise SpecError(f"--extensions-dir: {folder} is outside the repository, so a CI job "
                            "(which checks out only the repository) cannot find its extensions",
                            hint="move the folder into the repository, or unset "
                                 "NFLAB_EXTRA_CATALOG for a workflow of the kit's catalog") from None
    return out


def github_workflow(kernels: list[str], names: list[str] | None = None, *,
                    cell_timeout: float | None = None, timeout_given: bool = False,
                    extra_catalog: list[str] | None = None) -> str:
    """The workflow of *kernels* (words, see ``ci_kernels``); *names*: None tests the
    catalog of the job's commit; *cell_timeout* (seconds, None: no limit) sets the
    job's timeout-minutes, and is passed on when *timeout_given*."""
    include = "\n".join(f"          - kernel: {json.dumps(k)}\n            id: {json.dumps(ci_id(k))}"
                        for k in kernels)
    options = (f" --names={','.join(names)}" if names else "") \
        + (f" --cell-timeout={cell_timeout or 0:g}" if timeout_given else "")
    timeout = ""
    if cell_timeout:
        timeout = f"    timeout-minutes: {min(JOB_MINUTES_MAX, math.ceil(cell_timeout / 60) + SETUP_MINUTES)}\n"
    extra_env = f"      NFLAB_EXTRA_CATALOG: {json.dumps(':'.join(extra_catalog))}\n" if extra_catalog else ""
    return GITHUB_WORKFLOW.format(include=include, options=options, timeout=timeout, extra_env=extra_env)
