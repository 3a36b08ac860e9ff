"""`invoke test`: the extension suites on a kernel."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from invoke import task

from cli import (SNAPSHOT_HELP, FlagTask, catalog_selection, one_of, snapshot_flag,
                 whole_number)
from ground.output import Progress, friendly, table
from ground.errors import NflabError, SpecError
from supply import buildroot


EXT_DIR_HELP = ("another folder of extension definitions (<name>/ext.toml) beside the kit's "
                "catalog; same as NFLAB_EXTRA_CATALOG=DIR")


def _extra_catalog(folder):
    """Add *folder* to $NFLAB_EXTRA_CATALOG (this process and the ones it starts)."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from kmods import spec

    if not folder:
        return
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise NflabError(f"--extensions-dir: {folder!r} is not a directory",
                         hint="give a folder holding <name>/ext.toml (e.g. one made by "
                              "`invoke new-module`)")
    old = os.environ.get(spec.EXTRA_CATALOG_ENV, "")
    os.environ[spec.EXTRA_CATALOG_ENV] = os.pathsep.join(p for p in (str(path), old) if p)


@task(klass=FlagTask, shortflags={"jobs": "j", "junit": None, "html": None}, help={
    "name": "extension to test (default: the whole catalog)",
    "names": "several extensions, comma-separated",
    "kernel": "kernel spec: a line (5.10, 6.1, 6.12, 7.3), rc or an exact ABI (default 6.12)",
    "vm": "VM to use (default: `default` if it runs that kernel, else a per-kernel test VM)",
    "keep": "leave a VM this task booted running afterwards",
    "junit": "JUnit XML path (default build/reports/<release>/junit-<name>.xml)",
    "html": "also write an HTML report (needs pytest-html)",
    "pytest": "extra pytest arguments, e.g. \"-k fragment -x\"",
    "quiet": "no progress display",
    "extensions_dir": EXT_DIR_HELP,
    "jobs": "VMs of the kernel to split the suite files over (default auto: 2 on a 2-core host "
            "when the run is long and the kit boots its own VMs; 1: one VM; also $NFLAB_TEST_JOBS)",
    "userland": buildroot.USERLAND_HELP,
    "snapshot": SNAPSHOT_HELP,
})
@friendly
def test(c, name=None, names=None, kernel=None, vm=None, keep=False, junit=None, html=None, pytest=None,
         quiet=False, extensions_dir=None, jobs=None, userland=None, snapshot=True):
    """Build, restore/boot (or reuse) a VM, install, and run the extension's scapy/testinfra suites."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from nflab import suites

    buildroot.use_userland(userland)
    one_of(name=name, names=names)
    _check_jobs(suites, jobs)
    _extra_catalog(extensions_dir)

    with Progress(quiet) as progress:
        selected = [name] if name else ([n for n in names.split(",") if n] if names else None)
        outcome = suites.run(selected, kernel, vm=vm, keep=keep, junit=junit,
                             html=html, pytest_args=shlex.split(pytest or ""), jobs=jobs,
                             snapshot=snapshot_flag(snapshot), progress=progress)
    c_ = outcome.counts
    passed = c_["tests"] - c_["failures"] - c_["errors"] - c_["skipped"]
    table(["kernel", "passed", "failed", "errors", "skipped", "seconds", "junit"],
          [[outcome.release, passed, c_["failures"], c_["errors"], c_["skipped"],
            f"{outcome.seconds:.1f}", outcome.junit]])
    if outcome.backends:
        print(f"iptables backends tested: {outcome.backends}")
    for line in outcome.failures:
        print(f"FAILED {line}")
    for n, err in outcome.build_failures:
        print(f"BUILD FAILED {n}: {err}")
    if not outcome.ok:
        raise NflabError(f"suites failed on {outcome.release}",
                         hint="the pytest output above shows rules, tracer log and console")



def _check_jobs(suites, jobs):
    """A bad --jobs (or $NFLAB_TEST_JOBS) is bad input: exit 2 before anything is built."""
    try:
        suites.shard_count(jobs, [], {}, own_vms=True)
    except SpecError:
        raise
    except NflabError as exc:
        raise SpecError(exc.message, hint=exc.hint) from None


@task
@friendly
def doctor(c):
    """Check this machine for everything the lab needs; explain each fix."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from nflab import doctor as doc

    checks = doc.run_all()
    table(["check", "status", "detail", "fix"], [[k.name, k.status, k.detail, k.fix] for k in checks])
    failed = [k for k in checks if k.status == doc.FAIL]
    if failed:
        raise NflabError(f"{len(failed)} check(s) block the lab: " + ", ".join(k.name for k in failed),
                         hint="run `bash .ci/setup` to install everything")
    print("doctor: the lab is ready")



@task(help={
    "kernel": "kernel to measure (default 6.12)",
    "runs": "runs per measurement (median, min, max reported; default 3)",
    "json": "write the results as JSON to this file",
    "cold": "also measure cold kernel fetch and cold rootfs build (slow, downloads)",
    "catalog": "also time `invoke test` over the whole catalog and `invoke matrix --kernels=6.1,6.12 -j 2`",
    "workshop": "also time every workshop exercise's reference solution on 6.1 and 6.12 (per exercise and total)",
    "only": "comma list of groups to run: build, boot, boottrace, snapshot, vng, test, datapath, workshop "
            "(default: all but boottrace, datapath and workshop)",
    "vm": "name of the VM the datapath group boots and measures in (default: bench)",
})
@friendly
def bench(c, kernel=None, runs=None, json=None, cold=False, catalog=False, workshop=False, only=None, vm=None):
    """Benchmark build, boot, command, test and workshop cycles (reports, never asserts)."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from nflab import bench as b

    b.groups_for(only, workshop)        # an unknown group or count fails before anything runs
    runs = b.runs_count(3 if runs is None else runs)
    with Progress(False) as progress:
        data = b.run(kernel, runs, cold=cold, matrix=catalog, progress=progress, only=only,
                     workshop=workshop, vm=vm or "bench")
    table(["measurement", "median s", "min s", "max s", "runs", "note"], data["rows"],
          title=f"nflab bench on {data['info']['kernel']}")
    ratios = data["info"].get("datapath_ratios")
    if ratios:
        table(ratios["header"], ratios["rows"],
              title=f"datapath: the kit's matches against their in-tree twins on {data['info']['kernel']}")
    for k, v in data["info"].items():
        if k != "datapath_ratios":
            print(f"{k}: {v}")
    if json:
        b.write_json(data, json)
        print(f"wrote {json}")



@task(help={
    "kernels": "comma list of specs or groups: lts, stable, rc, supported (= latest), all-6.1, "
               "all-6.12, source:... (default: nflab.toml's [matrix] kernels, else supported)",
    "names": "comma list of extensions (default: the whole catalog)",
    "j": "kernels in parallel (default 2; bounded by cores and memory)",
    "extensions_dir": EXT_DIR_HELP,
    "cell_timeout": "seconds one kernel's cell may take before it is stopped (default 7200, "
                    "or NFLAB_CELL_TIMEOUT; 0: no limit)",
})
@friendly
def matrix(c, kernels=None, names=None, j=None, extensions_dir=None, cell_timeout=None):
    """Run the suites on several kernels in parallel: table, JUnit, JSON and Markdown summaries."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from kmods import spec
    from nflab import matrix as mx

    jobs = whole_number("j", j, 2)
    _extra_catalog(extensions_dir)

    selected = catalog_selection("names", names) or spec.catalog_names()
    with Progress(False) as progress:
        cells = mx.run(kernels, selected, jobs, progress=progress, timeout=cell_timeout)
    rows = [[c_.release, *[c_.build.get(n, "?")[:40] for n in selected], c_.test, f"{c_.seconds:.0f}"]
            for c_ in cells]
    table(["kernel", *[f"build {n}" for n in selected], "suites", "s"], rows)
    print("reports: build/reports/matrix/ (summary.md, summary.json, junit-*.xml, log-*.txt)")
    bad = [c_ for c_ in cells if not c_.ok]
    if bad:
        raise NflabError(f"{len(bad)} of {len(cells)} kernel cell(s) failed: "
                         + ", ".join(c_.release for c_ in bad),
                         hint="each cell's junit and log are in build/reports/matrix/")


@task(name="upstream-t", help={
    "kernel": "kernel spec: 6.1, 6.12 or an exact ABI (default 6.12)",
    "names": "comma list of extensions (default: every catalog extension stock iptables also ships)",
    "vm": "VM to use (default: upt-<release>, booted for this run)",
    "keep": "leave a VM this task booted running afterwards",
    "out": "report folder (default build/reports/<release>/upstream-t/)",
    "userland": buildroot.USERLAND_HELP,
})
@friendly
def upstream_t(c, kernel=None, names=None, vm=None, keep=False, out=None, userland=None):
    """Run stock iptables' iptables-test.py and .t files against the kit's plugins and modules."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from nflab import upstream_t as upt

    buildroot.use_userland(userland)
    selected = catalog_selection("names", names) or None
    with Progress(False) as progress:
        report, paths = upt.run_on_kernel(kernel, selected, vm=vm, keep=keep,
                                          out_dir=Path(out) if out else None, progress=progress)
    rows = [[ext, *[f"{cells[b]['passed']}/{cells[b]['tests']}" + ("" if cells[b]["ok"] else " FAILED")
                    if b in cells else "-" for b in ("legacy", "nft")]]
            for ext, cells in report.per_extension().items()]
    print(f"files from {upt.source_label(report.source)}")
    table(["extension", "legacy", "nft"], rows)
    for r in report.runs:
        for p in r.problems():
            print(f"FAILED [{r.backend}] {p}")
    for p in report.proof_problems:
        print(f"FAILED {p}")
    print(f"reports: {paths['md'].parent}/ (summary.md, summary.json, junit.xml)")
    if not report.ok:
        raise NflabError(f"the kit differs from stock iptables {report.source['version']} on {report.release}",
                         hint="each FAILED line names the upstream .t file and line")


@task(help={
    "provider": "CI service (github)",
    "kernels": "kernel list or groups (as for matrix); stable, rc and lines are read when each "
               "job runs",
    "names": "extensions (default: the whole catalog of the commit each job runs on)",
    "out": "file to write (default: print)",
    "extensions_dir": EXT_DIR_HELP + "; must be inside the repository (the job's checkout)",
    "cell_timeout": "seconds each job's cell may take (default 7200; 0: no limit); sets the "
                    "job's timeout-minutes",
})
@friendly
def ci_config(c, provider="github", kernels=None, names=None, out=None, extensions_dir=None,
              cell_timeout=None):
    """Emit a CI workflow whose job matrix is the kernel list."""
    # start-up cost: the kit loads when a task runs, not for every command (cli/__init__.py)
    from nflab import matrix as mx

    if provider != "github":
        raise NflabError(f"--provider: unknown provider {provider!r}", hint="valid: github")
    _extra_catalog(extensions_dir)
    extra = mx.ci_extra_catalog()
    limit = mx.cell_timeout(cell_timeout) if cell_timeout is not None else mx.CELL_TIMEOUT
    selected = catalog_selection("names", names) or None
    text = mx.github_workflow(mx.ci_kernels(kernels), selected, cell_timeout=limit,
                              timeout_given=cell_timeout is not None, extra_catalog=extra)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"wrote {out}")
    else:
        print(text, end="")


TASKS = [test, doctor, bench, matrix, upstream_t, ci_config]
