"""Stock iptables' own rule-syntax tests against the kit's plugins and modules.

For every catalog extension that stock iptables also ships (its stock twin:
``extensions/lib{xt,ipt,ip6t}_<name>.t`` exists upstream), upstream's runner
``iptables-test.py`` runs upstream's ``.t`` files in a lab VM, once with
iptables-legacy (``-l``) and once with iptables-nft (``-n``), against the
guest's installed binaries (``-H``), whose xtables directory holds the kit's
plugins and whose kernel has the kit's modules loaded (``nflab.deploy``). The
files come from the iptables source of the guest userland's own release:
Debian's source package of the guest's ``iptables`` version, through the
kit's archive client (:mod:`ground.debarchive`), cached in
``$NFLAB_CACHE/sources/iptables-<version>/``.

Any difference from stock fails, with the ``.t`` line:

* a line upstream's runner reports (``ERROR: line N (...)``), or fewer lines
  passed than it ran;
* its fast mode (one ``iptables-restore`` of a file's OK rules, then the
  ``iptables-save`` output compared as one block) disagreeing, even when the
  one-rule-at-a-time re-run then passes: that re-run only looks for each
  expected text *inside* the saved output, so extra words after it (the
  ``--from 0 --to 65535`` of issue 21) go unseen;
* the same files through the kit's own ``.t`` runner (:mod:`nflab.rules_t`),
  which compares each saved line exactly; a ``libxt_`` file with iptables and
  ip6tables when the source's runner runs it with both (1.8.11 on, not 1.8.9:
  :func:`libxt_both`). A file that runner cannot parse is a problem of that
  file in the reports, not the end of the run.

Each run also records that the kit's build was what ran: the module's taint
(``O``) and srcversion, and the sha256 of the plugin iptables loads (the
kit's, not the stock one kept beside it as ``*.nflab-orig``).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shlex
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from ground import integrity
from ground.debarchive import Archive
from ground.errors import ArchiveError, NflabError
from ground.paths import build_dir, cache_dir
from ground.proc import file_lock
from kmods import build, spec
from nflab import deploy, rules_t
from supply import kernels
from vm import lab, remote, xtables
from vm.install import XTLIBDIR

PACKAGE = "iptables"
RUNNER = "iptables-test.py"
GUEST_DIR = "/root/nflab/upstream-t"
BACKEND_FLAG = {"legacy": "-l", "nft": "-n"}
RECORD = ".nflab-upstream-t.json"
_BEGIN, _RC, _OUT, _ERR, _LOG, _END = (f"@@NFLAB-UPT-{w}" for w in ("BEGIN", "RC", "OUT", "ERR", "LOG", "END"))
_PROOF = "@@NFLAB-UPT-PROOF"
_SUMMARY = re.compile(r"^(legacy|nft): (\d+) test files, (\d+) unit tests, (\d+) passed$")
_ERROR = re.compile(r"^(?P<file>\S+): ERROR: line (?P<line>\d+) \((?P<reason>.*)\)$")


@dataclass(frozen=True)
class Source:
    """An unpacked iptables source tree of one Debian version."""
    root: Path
    version: str          # Debian version, e.g. 1.8.9-2
    suite: str
    upstream_only: str = ""   # why Debian's patches are missing (the mirror lacks the .dsc), or ""

    @property
    def label(self) -> str:
        return f"{PACKAGE} {self.version} ({self.suite}{', upstream tarball only' if self.upstream_only else ''})"

    def t_files(self, name: str) -> list[Path]:
        """Upstream's .t files of extension *name* (the families' files too)."""
        return [p for pre in ("libxt_", "libipt_", "libip6t_")
                for p in sorted((self.root / "extensions").glob(f"{pre}{name}.t"))]


def _tree_files(root: Path) -> list[Path]:
    return [root / RUNNER, *sorted((root / "extensions").glob("*.t"))]


def _usable(entry: Path, version: str) -> bool:
    """*entry* is a complete tree of *version* whose runner and .t files are
    those recorded when it was fetched."""
    try:
        rec = json.loads((entry / RECORD).read_text())
    except (OSError, ValueError):
        return False
    files = rec.get("files", {})
    return (rec.get("version") == version and bool(files)
            and all(integrity.check(entry / rel, r) is None for rel, r in files.items()))


def source(version: str, suite: str, *, archive: Archive | None = None, progress=print) -> Source:
    """The iptables source of Debian *version* (the guest's ``iptables``) from
    the cache, else fetched from *suite* (the guest userland's release) with
    the kit's archive client (*archive*, default ``Archive()``)."""
    top = cache_dir() / "sources"
    entry = top / f"{PACKAGE}-{version}"
    top.mkdir(parents=True, exist_ok=True)
    with file_lock(top / f".{PACKAGE}.lock"):
        if not _usable(entry, version):
            _fetch(archive or Archive(), entry, version, suite, progress)
    rec = json.loads((entry / RECORD).read_text())
    return Source(entry, version, rec.get("suite", suite), rec.get("upstream_only", ""))


def _unpack(archive: Archive, suite: str, dest: Path, progress) -> tuple[Path, str]:
    """The source tree of *suite*'s iptables with Debian's patches, or, when the
    mirror cannot serve all of it (some lack the .dsc), the upstream tarball
    alone: (tree, why the patches are missing or "")."""
    try:
        return archive.fetch_source(suite, PACKAGE, dest), ""
    except ArchiveError as exc:
        progress(f"{exc}; using the upstream tarball alone")
        return archive.fetch_source(suite, PACKAGE, dest / "upstream", upstream_only=True), str(exc)


def _fetch(archive: Archive, entry: Path, version: str, suite: str, progress):
    progress(f"fetching the {PACKAGE} source of {suite} (the guest has {version})")
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=entry.parent))
    try:
        tree, why = _unpack(archive, suite, tmp, progress)
        got = json.loads((tree / ".nflab-source.json").read_text()).get("version")
        if got != version:
            raise NflabError(f"{suite}'s {PACKAGE} source is {got}, but the guest runs {PACKAGE} {version}",
                             hint="rebuild the guest root filesystem (`invoke rootfs --rebuild`) "
                                  "so its iptables is the suite's")
        if not (tree / RUNNER).is_file():
            raise NflabError(f"the {PACKAGE} {got} source has no {RUNNER}")
        files = {str(p.relative_to(tree)): integrity.record(p) for p in _tree_files(tree)}
        (tree / RECORD).write_text(json.dumps({"version": got, "suite": suite, "upstream_only": why,
                                               "files": files}, indent=1))
        shutil.rmtree(entry, ignore_errors=True)
        tree.rename(entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def twins(src: Source, names: list[str] | None = None) -> dict[str, list[Path]]:
    """{catalog extension: upstream .t files} for every extension (of *names*,
    default the catalog) that stock iptables ships too."""
    out = {}
    for name in names or spec.catalog_names():
        ext = spec.load(name)
        if ext.kind in ("match", "target") and src.t_files(ext.name):
            out[name] = src.t_files(ext.name)
    return out


@dataclass(frozen=True)
class KitBuild:
    """The kit's build of one extension, as the guest must show it."""
    module: str
    plugin: str
    srcversion: str
    plugin_sha256: str


@dataclass
class FileRun:
    """One upstream .t file on one backend."""
    ext: str
    file: str
    backend: str
    tests: int = 0
    passed: int = 0
    errors: list = field(default_factory=list)      # [(line, upstream's reason)]
    fast_failed: bool = False
    rc: int = -1
    log: str = ""
    strict: list = field(default_factory=list)      # exact-line problems (nflab.rules_t)

    @property
    def ok(self) -> bool:
        return not self.problems()

    def problems(self) -> list[str]:
        out = [f"{self.file}:{line}: {reason}" for line, reason in self.errors]
        if self.fast_failed:
            dumps = [ln for ln in self.log.splitlines() if ln.startswith(("expect:", "got:"))]
            out.append(f"{self.file}: fast mode failed (iptables-save differs from the file):\n  "
                       + "\n  ".join(dumps or ["(no dump in the runner's log)"]))
        if self.tests == 0:
            out.append(f"{self.file}: {RUNNER} ran no test (exit {self.rc})")
        elif self.passed != self.tests and not self.errors:
            out.append(f"{self.file}: {self.passed} of {self.tests} passed")
        elif self.rc != 0 and not out:
            out.append(f"{self.file}: {RUNNER} exited {self.rc}")
        return out + self.strict


def guest_script(src: Source, runs: list[tuple[str, Path, str]]) -> str:
    """Shell text for the guest: unpack the runner and the .t files of *runs*
    ((ext, file, backend)) and run each pair with upstream's runner."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in dict.fromkeys([src.root / RUNNER] + [f for _, f, _ in runs]):
            tar.add(path, arcname=str(path.relative_to(src.root)))
    blob = base64.b64encode(buf.getvalue()).decode()
    d = f"{GUEST_DIR}/{src.version}"
    lines = [f"rm -rf {d} && mkdir -p {d} && cd {d} || exit 90",
             f"echo {blob} | base64 -d | tar xzf - || exit 90"]
    for i, (_, path, backend) in enumerate(runs):
        rel = shlex.quote(str(path.relative_to(src.root)))
        lines += [f"echo '{_BEGIN} {i}'",
                  f"python3 {RUNNER} -H {BACKEND_FLAG[backend]} {rel} >out 2>err; echo \"{_RC} $?\"",
                  f"echo '{_OUT}'; cat out; echo '{_ERR}'; cat err",
                  f"echo '{_LOG}'; cat /tmp/iptables-test.log 2>/dev/null; echo '{_END}'"]
    return "\n".join(lines) + "\n"


def parse_runs(runs: list[tuple[str, Path, str]], output: str) -> list[FileRun]:
    """The FileRuns of *runs* from :func:`guest_script`'s output."""
    res = [FileRun(ext, path.name, backend) for ext, path, backend in runs]
    cur, part = None, None
    for line in output.splitlines():
        if line.startswith(_BEGIN + " "):
            cur, part = res[int(line.split()[1])], None
        elif cur is None:
            continue
        elif line.startswith(_RC + " "):
            cur.rc = int(line.split()[1])
        elif line in (_OUT, _ERR, _LOG):
            part = line
        elif line == _END:
            cur = None
        elif part == _OUT:
            m = _SUMMARY.match(line)
            if m and m.group(1) == cur.backend:
                cur.tests, cur.passed = int(m.group(3)), int(m.group(4))
            cur.fast_failed |= line.endswith("but fast mode failed!")
        elif part == _ERR and (m := _ERROR.match(line)):
            cur.errors.append((int(m.group("line")), m.group("reason")))
        elif part == _LOG:
            cur.log += line + "\n"
    return res


_LIBXT_BRANCH = re.compile(r"""["']libxt_["']\s+in\s+filename\s*:\s*\n\s*xtables\s*=\s*\[([^\]]*)\]""")
TOOL = {"ipv4": "iptables", "ipv6": "ip6tables"}


def libxt_both(src: Source) -> bool:
    """Whether *src*'s runner runs ``libxt_*.t`` with ip6tables as well as
    iptables (iptables-test.py from 1.8.11 on: ``xtables = [ IPTABLES,
    IP6TABLES ]``; 1.8.9 runs them with iptables alone)."""
    try:
        m = _LIBXT_BRANCH.search((src.root / RUNNER).read_text())
    except OSError:
        return False
    return bool(m and "IP6TABLES" in m.group(1))


def _strict(host, runs: list[tuple[str, Path, str]], results: list[FileRun], *, both: bool = False):
    """Add the kit runner's exact-line problems of the same files to *results*,
    each file with the families upstream's runner gives it (*both*: ``libxt_``
    files with iptables and ip6tables, :func:`libxt_both`). A file the kit's
    runner cannot read is a problem of that file; the others still run."""
    plans = []
    for _, path, backend in runs:
        try:
            plans.append((path, backend, rules_t.families_of(path, libxt_both=both), None))
        except rules_t.TFormatError as exc:
            plans.append((path, backend, (), exc))
    done = rules_t.run_many(host, [(path, backend, fam) for path, backend, fams, _ in plans for fam in fams])
    for (path, backend, fams, bad), fr in zip(plans, results):
        if bad is not None:
            fr.strict.append(f"{path.name}: the exact-line check could not run: {bad}")
        for fam in fams:
            label = f"{path.name}[{TOOL[fam]}]" if len(fams) > 1 else path.name
            got = done[(path, backend, fam)]
            if isinstance(got, Exception):
                fr.strict.append(f"{label}: the exact-line check could not run: {got}")
                continue
            fr.strict += [f"{label}:{r.case.lineno}: {r.case.chain} {r.case.rule!r}: {r.problem}"
                          for r in got if not r.passed]


def proof_script(built: dict[str, KitBuild]) -> str:
    """Shell text printing, per extension, its module's taint and srcversion and
    the sha256 of the plugin iptables loads and of the stock one kept beside it."""
    lines = []
    for name, b in built.items():
        so, mod = f"{XTLIBDIR}/{b.plugin}.so", b.module
        lines.append(f"echo \"{_PROOF} {name} {mod} $(cat /sys/module/{mod}/taint 2>/dev/null || echo -) "
                     f"$(cat /sys/module/{mod}/srcversion 2>/dev/null || echo -) "
                     f"$(sha256sum < {so} | cut -c1-64) $(sha256sum < {so}.nflab-orig 2>/dev/null | cut -c1-64)\"")
    return "\n".join(lines) + "\n"


def parse_proof(output: str) -> dict[str, dict]:
    out = {}
    for line in output.splitlines():
        w = line.split()
        if len(w) >= 6 and w[0] == _PROOF:
            out[w[1]] = {"module": w[2], "taint": w[3], "srcversion": w[4], "plugin_sha256": w[5],
                         "stock_plugin_sha256": w[6] if len(w) > 6 else ""}
    return out


def proof_problems(proof: dict[str, dict], built: dict[str, KitBuild]) -> list[str]:
    """What shows that an extension's module or plugin in the guest is not the
    kit's *built* one."""
    out = []
    for name, b in built.items():
        srcversion, sha = b.srcversion, b.plugin_sha256
        p = proof.get(name)
        if p is None:
            out.append(f"{name}: no evidence from the guest")
            continue
        if "O" not in p["taint"]:
            out.append(f"{name}: {p['module']} has taint {p['taint']!r}, not O: not the kit's module")
        if srcversion and p["srcversion"] != srcversion:
            out.append(f"{name}: {p['module']} srcversion {p['srcversion']}, the kit built {srcversion}")
        if p["plugin_sha256"] != sha:
            out.append(f"{name}: the plugin in {XTLIBDIR} is not the kit's build (sha256 {p['plugin_sha256'][:12]})")
        if p["stock_plugin_sha256"] in ("", sha):
            out.append(f"{name}: no stock plugin kept beside the kit's ({XTLIBDIR}/*.nflab-orig)")
    return out


def guest_version(host) -> tuple[str, str]:
    """(Debian version of the guest's iptables package, the guest's Debian release)."""
    res = remote.run(host, f". /etc/os-release && echo \"$VERSION_CODENAME\" && "
                           f"dpkg-query -W -f='${{Version}}\\n' {PACKAGE}")
    words = res.stdout.split()
    if res.rc != 0 or len(words) != 2:
        raise NflabError(f"cannot read the guest's release and {PACKAGE} version: "
                         f"{(res.stderr or res.stdout).strip()}")
    return words[1], words[0]


@dataclass
class Report:
    release: str
    source: dict                       # package, version, suite, files' sha256
    runs: list                         # [FileRun]
    proof: dict                        # {ext: evidence}
    proof_problems: list
    backends: dict = field(default_factory=dict)   # vm.xtables.Backends.as_dict() of the kernel

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.ok for r in self.runs) and not self.proof_problems

    def per_extension(self) -> dict[str, dict[str, dict]]:
        """{ext: {backend: {"tests", "passed" (as upstream's runner counts them),
        "ok" (no difference at all), "files"}}}"""
        out: dict = {}
        for r in self.runs:
            cell = out.setdefault(r.ext, {}).setdefault(
                r.backend, {"tests": 0, "passed": 0, "ok": True, "files": []})
            cell["tests"] += r.tests
            cell["passed"] += r.passed
            cell["ok"] &= r.ok
            cell["files"].append(r.file)
        return out


def run(host, src: Source, release: str, built: dict[str, KitBuild],
        backends: xtables.Backends | None = None) -> Report:
    """Run upstream's .t files of every extension in *built* on *host*, with
    each backend its kernel serves (*backends*, default legacy and nft); *built*
    must be installed there (``nflab.deploy``)."""
    backends = backends or xtables.Backends()
    files = twins(src, list(built))
    runs = [(name, path, backend) for name, paths in files.items() for path in paths
            for backend in backends.usable]
    if not runs:
        raise NflabError(f"no stock twin among {', '.join(built)} in {src.label}")
    out = remote.run(host, guest_script(src, runs) + proof_script({n: built[n] for n in files}))
    if out.rc == 90:
        raise NflabError(f"cannot unpack the upstream tests in the guest: {out.stderr.strip()}")
    results = parse_runs(runs, out.stdout)
    _strict(host, runs, results, both=libxt_both(src))
    proof = parse_proof(out.stdout)
    record = json.loads((src.root / RECORD).read_text())
    used = {f"{RUNNER}": record["files"][RUNNER]["sha256"],
            **{f"extensions/{p.name}": record["files"][f"extensions/{p.name}"]["sha256"]
               for ps in files.values() for p in ps}}
    return Report(release, {"package": PACKAGE, "version": src.version, "suite": src.suite,
                            "upstream_only": src.upstream_only, "files": used},
                  results, proof, proof_problems(proof, {n: built[n] for n in files}), backends.as_dict())


def source_label(src: dict) -> str:
    """Where the files came from, for reports: ``iptables 1.8.9-2 (bookworm source package)``."""
    why = src.get("upstream_only")
    return (f"{PACKAGE} {src['version']} ({src['suite']} source package"
            + (f"; upstream tarball only, without Debian's patches: {why})" if why else ")"))


def markdown(report: Report) -> str:
    src = report.source
    lines = [f"upstream iptables tests on {report.release}: files from {source_label(src)}", "",
             "| extension | legacy | nft | files |", "|---|---|---|---|"]
    for ext, cells in report.per_extension().items():
        row = [(f"{cells[b]['passed']}/{cells[b]['tests']}" + ("" if cells[b]["ok"] else " ❌"))
               if b in cells else "-" for b in rules_t.BACKENDS]
        files = ", ".join(dict.fromkeys(f for c in cells.values() for f in c["files"]))
        lines.append(f"| {ext} | " + " | ".join(row) + f" | {files} |")
    lines += [f"\n- iptables-{b} not tested: {why}" for b, why in report.backends.get("missing", {}).items()]
    lines += [f"\n- {p}" for r in report.runs for p in r.problems()]
    lines += [f"\n- {p}" for p in report.proof_problems]
    return "\n".join(lines) + "\n"


def junit(report: Report) -> str:
    """JUnit XML: one case per (file, backend); the source version in the
    suite's properties and every case's name."""
    version = f"{PACKAGE} {report.source['version']}"
    source = quoteattr(f"{version} {report.source['suite']}")
    fails = sum(not r.ok for r in report.runs) + bool(report.proof_problems)
    cases = []
    for r in report.runs:
        problems = r.problems()
        body = (f"<failure message={quoteattr(problems[0][:200])}>{escape(chr(10).join(problems))}"
                "</failure>" if problems else "")
        name = quoteattr(f"{r.file}[{r.backend}] ({version})")
        out = escape(f"{r.passed} of {r.tests} passed")
        cases.append(f'  <testcase classname="upstream_t.{r.ext}" name={name}>'
                     f"<system-out>{out}</system-out>{body}</testcase>")
    proof = ("<failure message=\"not the kit's build\">"
             + escape("\n".join(report.proof_problems)) + "</failure>") if report.proof_problems else ""
    cases.append(f'  <testcase classname="upstream_t" name="kit modules and plugins loaded">{proof}</testcase>')
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<testsuites><testsuite name="upstream-t" '
            f'tests="{len(cases)}" failures="{fails}" errors="0" skipped="0">\n'
            f'  <properties><property name="kernel" value={quoteattr(report.release)}/>'
            f'<property name="iptables_source" value={source}/>'
            "</properties>\n" + "\n".join(cases) + "\n</testsuite></testsuites>\n")


def write_reports(report: Report, out_dir: Path) -> dict[str, Path]:
    """summary.json, summary.md and junit.xml in *out_dir*."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"kernel": report.release, "iptables_source": report.source, "ok": report.ok,
            "backends": report.backends,
            "extensions": report.per_extension(), "proof": report.proof,
            "proof_problems": report.proof_problems,
            "runs": [dict(asdict(r), ok=r.ok, problems=r.problems()) for r in report.runs]}
    paths = {"json": out_dir / "summary.json", "md": out_dir / "summary.md", "junit": out_dir / "junit.xml"}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    paths["md"].write_text(markdown(report))
    paths["junit"].write_text(junit(report))
    return paths


def built_for(arts) -> dict[str, KitBuild]:
    """{name: KitBuild} of kmods.build artifacts."""
    return {a.name: KitBuild(a.module, a.so.stem, a.srcversion, integrity.sha256_file(a.so))
            for a in arts if a.so is not None}


def run_on_kernel(kernel_spec: str | None, names: list[str] | None = None, *, vm: str | None = None,
                  keep: bool = False, out_dir: Path | None = None, progress=print) -> tuple[Report, dict]:
    """Build the stock twins among *names* (default: the whole catalog) for the
    kernel, boot (or reuse) a VM, install them, run upstream's .t files with
    each backend the kernel serves (``vm.xtables``) and write the reports
    (default ``build/reports/<release>/upstream-t/``). Returns the report and
    the paths written. A SIGTERM or SIGHUP (CI's timeout, ``kill``) stops the VM
    this run booted, as Ctrl-C does."""
    with lab.signals_as_interrupt():
        return _run_on_kernel(kernel_spec, names, vm=vm, keep=keep, out_dir=out_dir, progress=progress)


def _run_on_kernel(kernel_spec, names, *, vm, keep, out_dir, progress) -> tuple[Report, dict]:
    # start-up cost: testinfra's import takes ~0.3 s and only this function needs it
    import testinfra

    kernel = kernels.get(kernel_spec, progress=progress)
    name = vm or "upt-" + re.sub(r"[^A-Za-z0-9]+", "-", kernel.release)[:24].strip("-")
    old = lab.load(name)
    booted_here = not (old and lab.is_running(old))
    try:
        state = lab.up(kernel_spec, name, progress=progress)
        host = testinfra.get_host(state.testinfra_spec)
        version, suite = guest_version(host)
        src = source(version, suite, progress=progress)
        wanted = twins(src, names)
        if not wanted:
            raise NflabError(f"no stock twin among {', '.join(names or ['the catalog'])} in {src.label}")
        progress(f"building {', '.join(wanted)}")
        arts = [build.build_extension(n, kernel) for n in wanted]
        progress(f"installing {', '.join(wanted)} in VM {name}")
        deploy.install_many(list(wanted), name)
        backends = xtables.selected(xtables.for_vm(name))
        progress(f"running {src.label}'s {RUNNER} on {len(wanted)} extension(s), {backends.describe()}")
        report = run(host, src, kernel.release, built_for(arts), backends)
    finally:
        if booted_here and not keep:
            lab.down(name)
    paths = write_reports(report, out_dir or build_dir() / "reports" / kernel.release / "upstream-t")
    return report, paths
