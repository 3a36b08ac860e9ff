"""`invoke test`: boot (or reuse) a VM, install extensions, run their suites.

For each extension the suites are: ``tests/suites/test_<name>.py`` when it
exists (scapy + testinfra behaviour tests), the ``.t`` rule-syntax files in
its catalog folder (``tests/suites/test_rules_t.py``, both iptables
backends), and for the tracer the placement/priority suites. pytest runs in a
subprocess per kernel with ``--hosts`` set to the VM's testinfra spec, so the
same suites run against any real machine with ``pytest --hosts=...``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from ground.errors import BuildError, NflabError
from ground.paths import REPO, build_dir
from kmods import build, spec
from kmods.spec import definition_path
from nflab import deploy
from nflab.start_gate import Gate
from supply import kernels
from vm import lab

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
    backends: str = ""          # which iptables backends the suites tested (junit property)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.build_failures


def suite_files(names: list[str]) -> list[Path]:
    """The suites of *names*: tests/suites/test_<name>.py, or for an extension of
    another catalog folder the test_<name>.py beside its definition."""
    files = []
    for name in names:
        for own in (SUITES / f"test_{name}.py", definition_path(name).parent / f"test_{name}.py"):
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


XTABLES_PROPERTY = "nflab_xtables"   # tests/suites/conftest.py records it per pytest session


def junit_backends(path: Path) -> str:
    """Which iptables backends the suites of *path* tested (``legacy and nft``, or
    ``nft only (legacy skipped: ...)``); several shards' answers joined; "" if none ran."""
    if not path.is_file():
        return ""
    found = [p.get("value", "") for p in ET.parse(path).getroot().iter("property")
             if p.get("name") == XTABLES_PROPERTY]
    return "; ".join(dict.fromkeys(v for v in found if v))


def start_pytest(cmd: list, *, env: dict, quiet: bool = False, log: Path | None = None) -> subprocess.Popen:
    """Start pytest *cmd*; its output goes to the terminal, or to *log*, or nowhere (*quiet*)."""
    if log is not None:
        with open(log, "wb") as out:
            return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=out,
                                    stderr=subprocess.STDOUT)
    out = subprocess.DEVNULL if quiet else None
    return subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=out, stderr=out)


def watch_all(runs: list[tuple[subprocess.Popen, str]], *, poll: float = 0.5) -> list[int]:
    """Wait for the pytest subprocesses of *runs* ``(proc, vm)`` while watching their
    VMs: a kernel fault on a console (soft lockup, oops, panic...) or a dead QEMU
    ends the run at once with the console excerpt, instead of every remaining test
    waiting out its SSH timeouts. Returns their exit codes."""
    try:
        while True:
            codes = [proc.poll() for proc, _ in runs]
            if all(rc is not None for rc in codes):
                return codes
            for (proc, vm), rc in zip(runs, codes):
                if rc is None:
                    state = lab.load(vm)
                    if state is not None:
                        lab.check_health(state)      # raises VMError (and stops the VM) on a fault
            time.sleep(poll)
    finally:
        for proc, _ in runs:
            stop(proc)


def watch(proc: subprocess.Popen, vm: str, *, poll: float = 0.5) -> int:
    """:func:`watch_all` for one pytest subprocess."""
    return watch_all([(proc, vm)], poll=poll)[0]


def stop(proc: subprocess.Popen):
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


# ---------------------------------------------------------------- shards
#
# One VM runs one test at a time, and a TCG guest keeps about one host core
# busy, so on a 2-core host a long run (the whole catalog) is split by suite
# file over two VMs of the same kernel, each with its own pytest. Files are
# dealt longest first to the shard that will finish first (the second shard
# starts after the first one's boot and installs); durations come from the
# previous run on that kernel (``suite-seconds.json`` beside the reports), else
# from the seconds measured when the suites were written (BASELINE_DURATIONS:
# a fresh clone, as in CI, splits a whole-catalog run as well as a second run).

SHARD_MIN_SECONDS = 40.0     # expected suite time below which one VM is quicker
VM_MEMORY_GIB = 1.5          # what one more VM may take of the host's memory
DEFAULT_FILE_SECONDS = 10.0  # a suite file never timed before
JOBS_ENV = "NFLAB_TEST_JOBS"


def durations_path(release: str) -> Path:
    return build_dir() / "reports" / release / "suite-seconds.json"


BASELINE_DURATIONS = SUITES / "suite-seconds.json"


def _read_durations(path: Path) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def load_durations(release: str) -> dict[str, float]:
    """Seconds per suite file: the last run on *release*, over the shipped baseline."""
    return {**_read_durations(BASELINE_DURATIONS), **_read_durations(durations_path(release))}


def record_durations(release: str, junit: Path):
    """Add the per-file seconds of *junit* to the kernel's durations file."""
    times: dict[str, float] = {}
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            f = case.get("file")
            if f:
                times[Path(f).name] = times.get(Path(f).name, 0.0) + float(case.get("time") or 0)
    if times:
        path = durations_path(release)
        data = {**_read_durations(path), **{k: round(v, 2) for k, v in times.items()}}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def _available_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return 0.0


def shard_count(jobs, files: list[Path], seconds: dict[str, float], *, own_vms: bool) -> int:
    """How many VMs run *files*: *jobs* if given (``--jobs``, ``$NFLAB_TEST_JOBS``),
    else 2 when the kit boots its own VMs, the host has 2 cores and the memory,
    and the files are expected to take over ``SHARD_MIN_SECONDS``. The variable is
    a preference for runs that boot their own VMs: a run in a given VM takes one."""
    from_env = jobs is None
    if from_env:
        jobs = os.environ.get(JOBS_ENV) or None
    if jobs is not None and str(jobs) != "auto":
        try:
            n = int(jobs)
        except ValueError:
            n = 0
        if n < 1:
            raise NflabError(f"{'$' + JOBS_ENV if from_env else '--jobs'}={jobs!r} is not a number of VMs",
                             hint="use 1, 2, ... or auto")
        if n > 1 and not own_vms:
            if from_env:
                return 1
            raise NflabError(f"--jobs={n} runs the suites in {n} VMs the kit boots itself",
                             hint="drop --vm, --keep and --html, or use --jobs=1")
        return max(1, min(n, len(files)))
    if not own_vms or len(files) < 2:
        return 1
    expected = sum(seconds.get(f.name, DEFAULT_FILE_SECONDS) for f in files)
    if expected < SHARD_MIN_SECONDS:
        return 1
    return max(1, min(2, os.cpu_count() or 1, int(_available_gib() // VM_MEMORY_GIB), len(files)))


def plan_shards(files: list[Path], n: int, seconds: dict[str, float],
                start_delay: float = 0.0) -> list[list[Path]]:
    """*files* in *n* groups: longest first to the group that is free first, shard
    i starting *start_delay* × i late; each group keeps the files' given order."""
    known = sorted(seconds.values())
    default = known[len(known) // 2] if known else DEFAULT_FILE_SECONDS
    cost = {f: seconds.get(f.name, default) for f in files}
    loads = [i * start_delay for i in range(n)]
    groups: list[list[Path]] = [[] for _ in range(n)]
    for f in sorted(files, key=lambda f: -cost[f]):
        i = min(range(n), key=lambda i: loads[i])
        groups[i].append(f)
        loads[i] += cost[f]
    order = {f: k for k, f in enumerate(files)}
    return [sorted(g, key=order.__getitem__) for g in groups if g]


def merge_junit(parts: list[Path], out: Path):
    """One JUnit file with every ``<testsuite>`` of *parts* (missing ones skipped)."""
    root = ET.Element("testsuites")
    for part in parts:
        if part.is_file():
            top = ET.parse(part).getroot()
            root.extend([top] if top.tag == "testsuite" else list(top.iter("testsuite")))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
    tmp.replace(out)        # whole: a concurrent run or reader never sees half a file


def merged_exit(codes: list[int]) -> int:
    """pytest's exit code for the shards together: 5 (nothing collected) only if no
    shard ran anything, else the first code that is neither 0 nor 5."""
    bad = [c for c in codes if c not in (0, 5)]
    if bad:
        return bad[0]
    return 5 if codes and all(c == 5 for c in codes) else 0


@dataclass
class _Shard:
    vm: str
    files: list[Path]
    junit: Path
    gate: Gate
    log: Path | None = None
    proc: subprocess.Popen | None = None
    booted_here: bool = False
    private: bool = False       # a VM named for this run alone: its folder goes with it


def run(names: list[str] | None, kernel_spec: str | None, **kw) -> SuiteOutcome:
    """Build, boot/reuse, install and run the suites of *names* on one kernel, in
    one VM or (see :func:`shard_count`) split over several. A SIGTERM (CI's
    timeout, `kill`) stops the VMs this run booted, as Ctrl-C does."""
    with lab.signals_as_interrupt(), ExitStack() as claim:
        return _run(names, kernel_spec, claim=claim, **kw)


def _run(names: list[str] | None, kernel_spec: str | None, *, claim: ExitStack, vm: str | None = None,
         keep: bool = False, junit: str | None = None, html: str | None = None,
         pytest_args: list | None = None, jobs=None, snapshot: bool | None = None,
         progress=print) -> SuiteOutcome:
    names = names or spec.catalog_names()
    for n in names:
        spec.load(n)
    kernel = kernels.get(kernel_spec, progress=progress)
    t0 = time.monotonic()
    built, failed = _build_some(names, kernel, progress)
    files = _suite_files_of(built, failed)
    if vm is None:
        vm = _running_default(kernel, claim)
    else:
        _claim(vm, claim)
    if vm is None and keep:
        _claim(vm_name_for(kernel.release), claim)     # the kept VM's fixed name
    seconds = load_durations(kernel.release)
    n = shard_count(jobs, files, seconds, own_vms=vm is None and not keep and not html)
    groups = plan_shards(files, n, seconds, start_delay=3.0 + 0.1 * len(built)) if n > 1 else [files]
    junit_path, shards = _shards(names, kernel, groups, n, vm=vm, keep=keep, junit=junit)
    ended = False       # pytest ran to its end (tests passed or failed): nothing to post-mortem
    try:
        codes = _run_shards(shards, n, kernel, kernel_spec, built, html, pytest_args,
                            snapshot=snapshot, progress=progress)
        # this run's report, read before it replaces the shared one: a concurrent run
        # of the same suites may replace that file in turn the moment after
        mine = _merge_shards(shards, junit_path)
        if not pytest_args and not html:      # only plain, whole runs plan the next split
            record_durations(kernel.release, mine)
        counts, failures = parse_junit(mine)
        backends = junit_backends(mine)
        mine.replace(junit_path)
        ended = merged_exit(codes) in (0, 1)
        return SuiteOutcome(kernel.release, ",".join(sh.vm for sh in shards), junit_path, merged_exit(codes),
                            time.monotonic() - t0, counts, failures,
                            [(n_, build_reason(e)) for n_, e in failed], backends)
    except BaseException:
        for sh in shards:
            sh.gate.abort()
            if sh.proc is not None:
                stop(sh.proc)
            if sh.log is not None and sh.log.is_file():
                progress(f"pytest output of VM {sh.vm}: {sh.log}")
        raise
    finally:
        _clean_up(shards, junit_path, keep=keep, forget=ended, progress=progress)


def _build_some(names: list[str], kernel, progress) -> tuple[list, list]:
    """Build *names* for *kernel*: (built artifacts, [(name, error)]); raise if none built."""
    built, failed = build.build_many(names, kernel, progress=lambda n: progress(f"building {n}"))
    if failed and not built:
        raise BuildError("; ".join(f"{n_}: {build_reason(e)}" for n_, e in failed),
                         detail="\n".join(getattr(e, "detail", None) or "" for _, e in failed).strip(),
                         hint="nothing built, so no suite ran: fix the first compiler error above, "
                              "then `invoke build-module --name=NAME` until it builds")
    return built, failed


def _suite_files_of(built: list, failed: list) -> list:
    """The suite files of the built extensions; raise if they have none."""
    files = suite_files([art.name for art in built])
    if not files:
        broken = "".join(f"; {n_} did not build: {build_reason(e)}" for n_, e in failed)
        raise NflabError(f"no suites found for {', '.join(art.name for art in built)}{broken}",
                         hint="add tests/suites/test_<name>.py or a lib*.t file")
    return files


def _run_shards(shards: list, n: int, kernel, kernel_spec: str | None, built: list, html: str | None,
                pytest_args: list | None, *, snapshot: bool | None, progress) -> list:
    """Start each shard's pytest, bring up and install its VM, open its gate;
    return the pytest exit codes."""
    # pytest starts now: its imports and collection (~1 s) overlap the boots and
    # the installs, and each waits at its start gate before its first test
    for sh in shards:
        sh.gate.arm()
        sh.proc = start_pytest(_pytest_command(sh, built, html, pytest_args), log=sh.log,
                               env=dict(os.environ, NFLAB_VM=sh.vm, **sh.gate.env()))
    for i, sh in enumerate(shards):
        _up_and_install(sh, kernel_spec, built, progress, snapshot=snapshot)
        where = f" (VM {i + 1} of {n}: {sh.vm})" if n > 1 else ""
        progress(f"running {len(sh.files)} suite file(s) on {kernel.release}{where}")
        sh.gate.go()
    return watch_all([(sh.proc, sh.vm) for sh in shards])


def _running_default(kernel, claim: ExitStack) -> str | None:
    """``default`` when the default VM runs *kernel* and no other run uses it (the
    suites reuse it, its run lock held in *claim* until the run ends), else None:
    two runs in one VM would race on its installs and wire ports."""
    default = lab.load("default")
    if default is not None and lab.is_running(default) and default.release == kernel.release \
            and claim.enter_context(lab.claimed("default")):
        return "default"
    return None


def _claim(vm: str, claim: ExitStack):
    """Hold VM *vm*'s run lock until the run ends: two runs in one VM race on its
    installs and wire ports, so a second one stops here."""
    if not claim.enter_context(lab.claimed(vm)):
        raise NflabError(f"VM {vm!r} is in use by another `invoke test` run",
                         hint=f"wait for that run to end, or give this one another --vm (or none: "
                              "a run without --vm and --keep boots VMs of its own)")


def _shards(names: list[str], kernel, groups: list[list[Path]], n: int, *, vm: str | None,
            keep: bool, junit: str | None) -> tuple[Path, list[_Shard]]:
    """The run's JUnit path and one shard per group of suite files: its VM name,
    JUnit part, start gate and (when sharded) pytest log."""
    base = vm_name_for(kernel.release)
    if vm is not None:
        vms = [vm]
    elif keep:
        vms = [base]                        # a fixed name the next run reuses
    else:
        # private to this process: concurrent runs never share (or stop) each other's VM;
        # the whole pid (pid_max is 4194304 on 64-bit hosts: 7 digits, the name stays
        # within lab.NAME_RE's 32 characters), not pid % 100000, which two live pids share
        tag = f"{base[:20 if n > 1 else 22]}-{os.getpid()}"
        vms = [tag] if n == 1 else [f"{tag}-{i}" for i in range(n)]
    reports = build_dir() / "reports" / kernel.release
    reports.mkdir(parents=True, exist_ok=True)
    # absolute: pytest runs in the repository (start_pytest), the caller anywhere
    junit_path = Path(junit).resolve() if junit else reports / f"junit-{'-'.join(names) if len(names) < 4 else 'catalog'}.xml"
    junit_path.unlink(missing_ok=True)     # an earlier run's results are never read as this run's
    # each shard's JUnit part, gate and log carry the pid: a concurrent run of the same
    # suites on the same kernel has its own, and the report is written whole at the end
    run = f"{os.getpid()}-"
    shards = [
        _Shard(vm=v, files=g, junit=reports / f".junit-{run}{i}.xml",
               gate=Gate(reports / f".gate-{run}{i}"),
               log=None if n == 1 else reports / f"pytest-{run}{i + 1}-of-{n}.log",
               private=vm is None and not keep)
        for i, (v, g) in enumerate(zip(vms, groups))]
    return junit_path, shards


def _pytest_command(sh: _Shard, built: list, html: str | None, pytest_args: list | None) -> list:
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "nflab.pytest_plugin",
            "-q", "-rfEs", f"--rootdir={REPO}", "-c", str(REPO / "pyproject.toml"),
            f"--hosts={lab.testinfra_spec_for(sh.vm)}", f"--nflab-vm={sh.vm}",
            f"--junitxml={sh.junit}", *[f"--nflab-ext={art.name}" for art in built],
            *(["--html", html, "--self-contained-html"] if html else []),
            *map(str, sh.files), *(pytest_args or [])]


def _up_and_install(sh: _Shard, kernel_spec: str | None, built: list, progress,
                    snapshot: bool | None = None):
    """Boot or restore (or reuse) the shard's VM and install every built extension in it."""
    old = lab.load(sh.vm)
    sh.booted_here = not (old and lab.is_running(old))
    state = lab.up(kernel_spec if kernel_spec else None, sh.vm, snapshot=snapshot, progress=progress)
    if state.testinfra_spec != lab.testinfra_spec_for(sh.vm):
        raise NflabError(f"VM {sh.vm!r} answers at {state.testinfra_spec}, "
                         f"not {lab.testinfra_spec_for(sh.vm)}", hint=f"run `invoke vm-down --vm={sh.vm}`")
    progress(f"installing {len(built)} extension(s) in VM {sh.vm}")
    deploy.install_many([art.name for art in built], sh.vm)


def _private(junit_path: Path) -> Path:
    """Where this process merges its report before it replaces *junit_path*."""
    return junit_path.with_name(f".{junit_path.name}.{os.getpid()}")


def _merge_shards(shards: list[_Shard], junit_path: Path) -> Path:
    """The run's one JUnit file, beside *junit_path* under a name of this process's
    own; each shard's pytest output (when it went to a log), one after the other."""
    mine = _private(junit_path)
    merge_junit([sh.junit for sh in shards], mine)
    for sh in shards:
        if sh.log is not None:
            print(f"==== pytest in VM {sh.vm}: {' '.join(f.name for f in sh.files)}", flush=True)
            print(sh.log.read_text(errors="replace").rstrip(), flush=True)
            sh.log.unlink()
    return mine


def _clean_up(shards: list[_Shard], junit_path: Path, *, keep: bool, forget: bool, progress):
    """Gate files and JUnit parts go; a VM this run booted stops unless *keep*, and
    its folder goes too when it was the run's own and *forget* (the run ended
    normally: a failed boot or a crash keeps the console its error points at)."""
    for sh in shards:
        sh.gate.remove()
        sh.junit.unlink(missing_ok=True)
    _private(junit_path).unlink(missing_ok=True)   # a merged report the run did not hand over
    for sh in shards:
        if sh.booted_here and not keep:
            progress(f"stopping VM {sh.vm}")
            lab.down(sh.vm)
            if sh.private and not (forget and lab.forget(sh.vm)):
                progress(f"kept {lab.vm_dir(sh.vm)} (console.log, qemu.log) for a look; "
                         f"`invoke vm-up` removes such folders after {lab.STALE_DAYS} days")
