"""The kernel maintainers' static checks on a rendered extension (issue 17).

``invoke build-module --check`` runs, for one kernel:

* ``checkpatch.pl --strict`` (from the linux-source tree ``supply.source_kernels``
  unpacks, ``$NFLAB_CHECKPATCH_LINE``, default 6.12) on every rendered ``.c``/``.h``;
* a ``W=1`` build with ``sparse`` on every file (``make C=2``), in a build root of
  the kernel's release with its compiler plus sparse and coccinelle;
* coccinelle: ``make coccicheck MODE=report M=<dir>`` from that source tree.

Each finding is printed in the tool's own words. What may stay is listed, each
entry with its reason, in one file: ``kmods/static_checks.toml``; anything
else fails the check.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ground.errors import BuildError, SpecError
from ground.paths import build_dir, kernels_dir
from ground.proc import file_lock
from kmods import build, probes, spec
from supply import buildroot, source_kernels

IGNORES = Path(__file__).resolve().parent / "static_checks.toml"
TOOLS = ("checkpatch", "W=1", "sparse", "coccinelle")
# coccicheck calls which (debianutils), lscpu (util-linux), git (spatch finds files with it);
# spatch runs OCaml (ocaml) and Python (libpythonX.Y.so: libpython3-dev) rules
CHECK_PACKAGES = ("sparse", "coccinelle", "ocaml", "git", "perl", "python3", "libpython3-dev", "debianutils",
                  "util-linux")
LINE_ENV = "NFLAB_CHECKPATCH_LINE"
_CHECKPATCH_RE = re.compile(r"^(?P<file>[^:\s]+):(?P<line>\d+): (?P<sev>ERROR|WARNING|CHECK):"
                            r"(?P<type>[A-Z0-9_]+): (?P<msg>.*)$")
_CC_RE = re.compile(r"^(?P<file>[^:\s]+\.[ch]):(?P<line>\d+):(?:\d+:)? (?P<sev>warning|error): "
                    r"(?P<msg>.*)$")
_COCCI_RE = re.compile(r"^(?P<file>[^:\s]+\.[ch]):(?P<line>\d+):[\d-]+: (?P<msg>.*)$")


@dataclass(frozen=True)
class Finding:
    tool: str
    file: str        # <extension>/<rendered file>
    line: int
    kind: str        # checkpatch type, compiler/sparse severity, coccinelle's word
    message: str

    def __str__(self) -> str:
        return f"{self.tool}: {self.file}:{self.line}: {self.kind}: {self.message}"


def load_ignores(path: Path = IGNORES) -> list[dict]:
    """The allowed findings: tool, kind (a checkpatch type or severity), files (glob),
    optional match (regex on the message), and the reason; a reason is required."""
    entries = tomllib.loads(path.read_text()).get("ignore", [])
    for i, e in enumerate(entries):
        if e.get("tool") not in TOOLS or not e.get("kind") or not str(e.get("reason", "")).strip():
            raise SpecError(f"{path}: ignore[{i}] {e!r}",
                            hint=f"valid: tool = one of {', '.join(TOOLS)}, kind, files, reason")
    return entries


def ignored(f: Finding, entries: list[dict]) -> bool:
    return any(e["tool"] == f.tool and e["kind"] == f.kind
               and fnmatch.fnmatch(Path(f.file).name, e.get("files", "*"))
               and re.search(e.get("match", ""), f.message) for e in entries)


@functools.lru_cache(maxsize=4)
def _plan(line: str):
    return source_kernels.plan(f"source:{line}")


def _line() -> str:
    return os.environ.get(LINE_ENV, "6.12").strip()


def source_tree() -> Path:
    """The linux-source tree whose checkpatch.pl and coccinelle scripts are used,
    resolved once per process (finding the newest source package reads the
    archive's indexes)."""
    return source_kernels.source_tree(_plan(_line()))


def tools_root(progress=None):
    """The build root checkpatch and coccicheck run in: the Debian release of the
    source tree whose scripts they are (bullseye's spatch 1.1 segfaults on 6.12's
    device_attr_show.cocci for some inputs; the scripts and their spatch belong together)."""
    return buildroot.ensure(_plan(_line()).debian_release, extra=CHECK_PACKAGES, progress=progress)


def check_tree(exts: list, kernel) -> Path:
    """Every extension of *exts* rendered for *kernel* into ``.check/<name>/`` beside
    the builds, under one Kbuild that builds them all (the tree is made afresh)."""
    top = build_dir() / kernel.release / ".check"
    shutil.rmtree(top, ignore_errors=True)
    top.mkdir(parents=True)
    for ext in exts:
        out = top / ext.name
        build.render_into(ext, out)
        probes.prepare(ext, kernel, out)
        # warnings, not errors: a W=1 warning must not stop the build before sparse
        # has seen the file, and each is reported in gcc's own words anyway
        kbuild = out / "Kbuild"
        kbuild.write_text(kbuild.read_text().replace(" -Werror", ""))
    (top / "Kbuild").write_text("".join(f"obj-m += {ext.name}/\n" for ext in exts))
    return top


def sources(top: Path) -> list[Path]:
    return sorted(p for p in top.glob("*/*") if p.suffix in (".c", ".h")
                  and not p.name.endswith(".mod.c"))


def _parse(tool: str, text: str, regex, top: Path) -> list[Finding]:
    found = []
    for line in text.splitlines():
        m = regex.match(line.strip())
        if not m:
            continue
        path = Path(m.group("file"))
        path = path if path.is_absolute() else top / path
        if top not in path.parents:
            continue                     # a kernel header's own warning is not ours
        kind = m.groupdict().get("type") or m.groupdict().get("sev") or "report"
        found.append(Finding(tool, str(path.relative_to(top)), int(m.group("line")), kind,
                             m.group("msg").strip()))
    return found


def checkpatch(top: Path, tree: Path, root) -> list[Finding]:
    files = [str(p.relative_to(top)) for p in sources(top)]
    res = root.run(["perl", tree / "scripts" / "checkpatch.pl", "--strict", "--no-tree", "--terse",
                    "--show-types", "--no-summary", "-f", *files], rw=[top], ro=[kernels_dir()],
                   cwd=top)
    return _parse("checkpatch", res.stdout + (res.stderr or ""), _CHECKPATCH_RE, top)


def w1_sparse(top: Path, kernel, root) -> list[Finding]:
    """One W=1 build with sparse on every file (C=2). gcc ends its diagnostics
    with the option that enabled them (``[-Wunused-but-set-variable]``,
    ``[-Werror=...]``); sparse's carry none."""
    res = root.run(["make", "-C", kernel.headers, f"M={top}", "W=1", "C=2", "CHECK=sparse",
                    f"-j{os.cpu_count() or 2}", "modules"], rw=[top], ro=[kernels_dir()])
    log = res.stdout + (res.stderr or "")
    (top / "check-build.log").write_text(log)
    found = [Finding("W=1" if re.search(r"\[-W[\w=-]+\]$", f.message) else "sparse",
                     f.file, f.line, f.kind, f.message) for f in _parse("W=1", log, _CC_RE, top)]
    # Kbuild turns C=2 off when it finds the checker too old (or its own test
    # script missing from the headers): that is a finding, never a silent pass
    off = next((ln.strip() for ln in log.splitlines() if "specified, but" in ln and "not up to date" in ln), None)
    if off:
        found.append(Finding("sparse", "-", 0, "not run", off.split(": ", 1)[-1]))
    if res.returncode != 0 and not any(f.tool == "W=1" for f in found):
        raise BuildError(f"the W=1/sparse build in {top} failed", detail=log[-3000:],
                         hint=f"full log: {top / 'check-build.log'}")
    return found


def coccicheck(top: Path, tree: Path, root) -> list[Finding]:
    # J=1: with --jobs, spatch (parmap) writes files into its cwd, the read-only source tree
    # --python: spatch 1.1 (bullseye) cannot tell which python to embed without it
    res = root.run(["make", "-C", tree, "coccicheck", "MODE=report", f"M={top}", "J=1",
                    "SPFLAGS=--python python3"],
                   rw=[top], ro=[kernels_dir()])
    log = res.stdout + (res.stderr or "")
    (top / "coccicheck.log").write_text(log)
    if res.returncode != 0:
        raise BuildError(f"coccicheck in {top} failed", detail=log[-3000:],
                         hint=f"full log: {top / 'coccicheck.log'}")
    return _parse("coccinelle", log, _COCCI_RE, top)


def run(exts, kernel, *, progress=None) -> list[Finding]:
    """Every finding of the four tools on *exts* (names or Extensions) for *kernel*
    that static_checks.toml does not allow. One pass: one checkpatch run, one W=1
    build of every module, one coccicheck over all of them."""
    exts = [spec.load(e) if isinstance(e, str) else e for e in exts]
    entries = load_ignores()
    tree = source_tree()
    root = buildroot.for_kernel(kernel, extra=CHECK_PACKAGES, progress=progress)
    tools = tools_root(progress)
    with file_lock(build_dir() / kernel.release / ".check.lock"):
        top = check_tree(exts, kernel)
        if progress:
            progress(f"checkpatch, W=1 + sparse, coccicheck on {len(exts)} module(s) in {top}")
        found = checkpatch(top, tree, tools) + w1_sparse(top, kernel, root) + coccicheck(top, tree, tools)
    return [f for f in found if not ignored(f, entries)]
