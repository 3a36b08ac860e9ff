"""Kernel feature probes: what a kernel's headers offer, decided from the headers.

The probes are data (``kmods/probes.toml``): a header check reads the header a
declaration lives in (C comments stripped) for a regex, or that the header
exists; a compile probe builds a line of C through Kbuild with ``-Werror``
(all compile probes of a kernel in one ``make -k``, beside an empty control
object): 0 only when gcc blames the probe's own code; a run whose control does
not build, or a probe that fails without gcc blaming it (cc1 killed, a full
disk), is a BuildError and caches nothing. An "any" probe is 1 when one of the
probes it names is. The results become
``nflab_features.h`` (``#define NFLAB_HAVE_<NAME> 0|1``, each with a comment
saying how it was decided and what a version check would have said), which
``compat_nflab.h`` keys on instead of ``LINUX_VERSION_CODE``.

Results are computed once per kernel and kept in ``$NFLAB_CACHE/probes/<release>/``
(``<key>.json``, ``<key>.h``), shared by every build tree and worktree. The key
covers the probe table, this module, the kernel's release and packages, the
content of every header a probe reads or includes, the kernel's ``autoconf.h``
and the compiler: a changed header or probe table gets fresh results.

A probe without a fallback in ``compat_nflab.h`` names, in ``uses``, how an
extension's module source calls the API; on a kernel whose headers lack it the
extension is refused before Kbuild runs, with one line naming the feature.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import textwrap
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from ground.errors import BuildError, SpecError
from ground import paths
from ground.files import write_if_changed
from ground.proc import file_lock
from kmods.render import ccomment
from supply import buildroot

TABLE = Path(__file__).resolve().parent / "probes.toml"
FEATURES_H = "nflab_features.h"
KEEP = 8                           # cached results per kernel (probe tables, header versions)
SRCARCH = "x86"                    # the kit builds for x86_64 only
HOWS = ("header", "compile", "any")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_VERSION_RE = re.compile(r"^\d+\.\d+$")
_COMMENT_RE = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_ASCII_QUOTES = str.maketrans("\u2018\u2019", "''")   # gcc quotes by LANG (Kbuild unexports LC_ALL)
_DIAG_RE = re.compile(r"^(?P<file>\S[^:]*):\d+(?::\d+)?: "
                      r"(?P<kind>error|fatal error|note): (?P<text>.*)$")
_MISSING_HEADER_RE = re.compile(r"^[\w./+-]+\.h: ")          # gcc's words for a missing #include
CONTROL = "nflab_control"          # an empty object built beside the compile probes


class MissingFeature(BuildError):
    """The kernel lacks an API an extension calls, and compat_nflab.h has no fallback."""


@dataclass(frozen=True)
class Probe:
    """One row of the probe table."""

    name: str
    what: str
    how: str
    header: tuple[str, ...] = ()
    find: tuple[str, ...] = ()
    of: tuple[str, ...] = ()
    code: str = ""
    since: str = ""
    until: str = ""
    fallback: str = ""
    uses: str = ""

    @property
    def macro(self) -> str:
        return f"NFLAB_HAVE_{self.name.upper()}"


@dataclass
class Result:
    """What a probe found on one kernel."""

    name: str
    value: bool
    how: str
    evidence: str          # how it was decided, one line

    def as_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- the table

def _probe(row: dict, where: str) -> Probe:
    known = set(Probe.__dataclass_fields__)
    unknown = set(row) - known
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}",
                        hint=f"valid: {', '.join(sorted(known))}")
    listed = {k: tuple(row[k]) if isinstance(row.get(k), list) else (row[k],)
              for k in ("header", "find", "of") if k in row}
    probe = Probe(**{**row, **listed})
    if not _NAME_RE.match(probe.name):
        raise SpecError(f"{where}: name {probe.name!r} is not a lower-case C identifier")
    if probe.how not in HOWS:
        raise SpecError(f"{where}: how = {probe.how!r}", hint=f"valid: {', '.join(HOWS)}")
    if probe.how == "any":
        _check_any(probe, where)
    elif probe.of:
        raise SpecError(f"{where}: `of` is for how = \"any\"")
    elif not probe.header:
        raise SpecError(f"{where}: no header to look in or to include")
    if probe.how == "compile" and (not probe.code.strip() or probe.find):
        raise SpecError(f"{where}: a compile probe needs `code` and no `find`")
    if probe.how == "header" and probe.code:
        raise SpecError(f"{where}: a header check has no `code` (use how = \"compile\")")
    for v in (probe.since, probe.until):
        if v and not _VERSION_RE.match(v):
            raise SpecError(f"{where}: version {v!r} is not MAJOR.MINOR")
    for rx in probe.find + ((probe.uses,) if probe.uses else ()):
        try:
            re.compile(rx)
        except re.error as exc:
            raise SpecError(f"{where}: bad regex {rx!r}: {exc}") from None
    if probe.uses and probe.fallback:
        raise SpecError(f"{where}: `uses` is for probes without a fallback")
    return probe


def _check_any(probe: Probe, where: str):
    """An "any" probe names two or more probes and reads nothing itself."""
    if len(probe.of) < 2 or probe.header or probe.find or probe.code:
        raise SpecError(f"{where}: an \"any\" probe needs `of` (two or more probe names) "
                        f"and no `header`, `find` or `code`")


def _check_order(probes: tuple[Probe, ...], where: str):
    """Each "any" probe names probes of the table given before it."""
    seen: set[str] = set()
    for probe in probes:
        unknown = [n for n in probe.of if n not in seen]
        if unknown:
            raise SpecError(f"{where}: probe {probe.name} names {', '.join(unknown)}, "
                            f"not a probe given before it",
                            hint="an \"any\" probe goes after the probes it names")
        seen.add(probe.name)


def load_table(path: Path | None = None) -> tuple[Probe, ...]:
    """The probe table (default ``TABLE``), validated: names unique, fields well-formed."""
    path = path or TABLE
    rows = tomllib.loads(path.read_text()).get("probe", [])
    probes = tuple(_probe(row, f"{path.name} probe {i + 1}") for i, row in enumerate(rows))
    names = [p.name for p in probes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError(f"{path.name}: probe name(s) given twice: {', '.join(dupes)}")
    _check_order(probes, path.name)
    return probes


# ---------------------------------------------------------------- header trees

def source_roots(headers: Path) -> list[Path]:
    """Where a kernel's non-generated headers live, besides *headers* itself: a
    ``make O=`` build tree's ``source`` link, or the directories whose Makefile
    Debian's flavour headers include (``linux-headers-<abi>-common``)."""
    headers = Path(headers)
    if (headers / "source").is_dir():
        return [(headers / "source").resolve()]
    roots = []
    makefile = headers / "Makefile"
    if makefile.is_file():
        for m in re.finditer(r"^\s*include\s+(\S+)/Makefile\s*$", makefile.read_text(), re.M):
            if Path(m.group(1)).is_dir():
                roots.append(Path(m.group(1)))
    return roots or [headers]


def include_dirs(headers: Path) -> list[Path]:
    """Kbuild's LINUXINCLUDE order for an external module built against *headers*."""
    obj, out = Path(headers), []
    for src in source_roots(obj):
        out += [src / f"arch/{SRCARCH}/include", obj / f"arch/{SRCARCH}/include/generated",
                src / "include", obj / "include",
                src / f"arch/{SRCARCH}/include/uapi", obj / f"arch/{SRCARCH}/include/generated/uapi",
                src / "include/uapi", obj / "include/generated/uapi"]
    return list(dict.fromkeys(out))


def resolve(dirs: list[Path], name: str) -> Path | None:
    """The file ``#include <name>`` finds, or None."""
    for d in dirs:
        path = d / name
        if path.is_file():
            return path
    return None


def _uncommented(text: str) -> str:
    """*text* with C comments blanked (newlines kept, so line numbers hold)."""
    return _COMMENT_RE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def check_header(probe: Probe, dirs: list[Path]) -> Result:
    """Decide a header probe: every `find` regex in one of its headers (or the header exists)."""
    found = [(name, resolve(dirs, name)) for name in probe.header]
    present = [(name, path) for name, path in found if path]
    if not probe.find:
        if present:
            return Result(probe.name, True, "header", f"<{present[0][0]}> exists")
        return Result(probe.name, False, "header", f"no <{'>, <'.join(probe.header)}>")
    for name, path in present:
        text = _uncommented(path.read_text(errors="replace"))
        lines = []
        for rx in probe.find:
            m = re.search(rx, text)
            if not m:
                break
            lines.append(str(text.count("\n", 0, m.start()) + 1))
        else:
            return Result(probe.name, True, "header",
                          f"declared in <{name}> line {', '.join(lines)}")
    where = ", ".join(f"<{n}>" for n, _ in present) or "its headers (none exist)"
    return Result(probe.name, False, "header", f"not declared in {where}")


def decide_any(probe: Probe, by_name: dict[str, Result]) -> Result:
    """An "any" probe: 1 with the first probe it names that is 1, whose evidence it cites."""
    for name in probe.of:
        if by_name[name].value:
            return Result(probe.name, True, "any", f"{name}: {by_name[name].evidence}")
    return Result(probe.name, False, "any", f"none of {', '.join(probe.of)}")


def derive(probes: tuple[Probe, ...], by_name: dict[str, Result]) -> list[Result]:
    """Every probe's result in table order: *by_name* (the header checks and compile
    probes) with each "any" probe decided from the probes before it."""
    by_name = dict(by_name)
    for probe in probes:
        if probe.how == "any":
            by_name[probe.name] = decide_any(probe, by_name)
    return [by_name[p.name] for p in probes]


# ---------------------------------------------------------------- compile probes

def kbuild_objects(kernel, work: Path, objects: list[str]) -> subprocess.CompletedProcess:
    """``make -k`` of single objects in *work* (an external module dir) against
    *kernel*'s headers, in the kernel's build root (its own gcc), as the build does."""
    cmd = ["make", "-C", str(kernel.headers), f"M={work}", "-k",
           f"-j{os.cpu_count() or 2}", *objects]
    return buildroot.for_kernel(kernel).run(cmd, rw=[work], ro=[paths.kernels_dir()])


def compiler_id(kernel) -> str:
    """What compiles the probes for *kernel*: its build root and compiler (part of the key)."""
    return f"{buildroot.for_kernel(kernel).path.name}:{kernel.compiler}"


def probe_source(probe: Probe) -> str:
    includes = "".join(f"#include <{h}>\n" for h in ("linux/module.h",) + probe.header)
    return (f"// SPDX-License-Identifier: GPL-2.0\n/* nflab compile probe: "
            f"{ccomment(probe.what)} */\n{includes}\n{probe.code.strip()}\n")


def control_source() -> str:
    return ("// SPDX-License-Identifier: GPL-2.0\n/* nflab compile probe control: "
            "builds wherever Kbuild and the compiler work */\n#include <linux/module.h>\n")


def _diagnostic(line: str) -> tuple[str, str, str] | None:
    """(file, kind, text) of a gcc diagnostic that blames code: an error or a note
    at a line of a file, or a header that file includes missing. Not a fatal
    error gcc puts at a line without blaming it (``error closing /tmp/cc….s: No
    space left on device``), nor the driver's (``Killed signal terminated program cc1``)."""
    m = _DIAG_RE.match(line)
    if not m or (m["kind"] == "fatal error" and not _MISSING_HEADER_RE.match(m["text"])):
        return None
    return m["file"], m["kind"], " ".join(m["text"].split()).translate(_ASCII_QUOTES)


def _own_error(output: str, source: str) -> str | None:
    """The error gcc found in *source*'s own code: on one of its lines, in a header
    its line reaches through a macro (the note naming that line), or a header it
    includes missing. None when gcc never blamed its code."""
    last = None
    for line in output.splitlines():
        diag = _diagnostic(line)
        if not diag:
            continue
        where, kind, text = diag
        last = text if kind != "note" else last
        if last and (where == source or where.endswith(f"/{source}")):
            return last
    return None


def _complaint(output: str) -> str:
    """The first line of *output* that says why gcc or Kbuild failed, gcc's words first."""
    lines = [" ".join(line.split()) for line in output.splitlines()
             if re.search(r"(?i)\berror\b|\*\*\*", line) and not _diagnostic(line)]
    lines.sort(key=lambda line: line.startswith("make"))
    return lines[0] if lines else "nothing said why"


def _built(work: Path, name: str) -> bool:
    return (work / f"{name}.o").is_file() and (work / f".{name}.o.cmd").is_file()


def _verdict(work: Path, output: str, name: str) -> tuple[bool, str] | None:
    """A probe's value and evidence; None when it failed with no error in its own code."""
    if _built(work, name):
        return True, "builds with -Werror"
    error = _own_error(output, f"{name}.c")
    return (False, f"does not build: {error}") if error else None


def run_compile(kernel, probes: list[Probe], work: Path) -> list[Result]:
    """Build every compile probe and an empty control object in one Kbuild run; a
    probe is 1 when its object builds, 0 when gcc blames its own code. A run whose
    control does not build, or a probe that failed with no error in its own code
    (cc1 killed for memory, a full disk), decides nothing: BuildError."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    names = [f"nflab_probe_{p.name}" for p in probes]
    (work / "Kbuild").write_text("".join(f"obj-m += {n}.o\n" for n in names + [CONTROL]) +
                                 "ccflags-y += -Werror\n")
    for probe, n in zip(probes, names):
        (work / f"{n}.c").write_text(probe_source(probe))
    (work / f"{CONTROL}.c").write_text(control_source())
    res = kbuild_objects(kernel, work, [f"{n}.o" for n in names + [CONTROL]])
    out = res.stdout + res.stderr
    if not _built(work, CONTROL):
        raise BuildError(f"compile probes for {kernel.release}: Kbuild did not build even an "
                         f"empty object ({_complaint(out)})", detail=out.strip()[-2000:],
                         hint="the run failed, not a probe; nothing was cached: run again once "
                              "the host has memory and disk to spare, or the build root works")
    verdicts = {p.name: _verdict(work, out, n) for p, n in zip(probes, names)}
    unknown = [name for name, v in verdicts.items() if v is None]
    if unknown:
        raise BuildError(f"compile probes for {kernel.release}: {', '.join(unknown)} did not "
                         f"build, with no error in their own code ({_complaint(out)})",
                         detail=out.strip()[-2000:],
                         hint="gcc failed for another reason (killed for memory, a full disk?); "
                              "nothing was cached: run again once the host has memory and "
                              "disk to spare")
    return [Result(name, ok, "compile", evidence) for name, (ok, evidence) in verdicts.items()]


# ---------------------------------------------------------------- versions

def headers_version(headers: Path) -> tuple[int, int, int] | None:
    """The headers' own version (``include/generated/uapi/linux/version.h``)."""
    path = Path(headers) / "include/generated/uapi/linux/version.h"
    try:
        text = path.read_text()
    except OSError:
        return None
    parts = [re.search(rf"#define LINUX_VERSION_{f}\s+(\d+)", text)
             for f in ("MAJOR", "PATCHLEVEL", "SUBLEVEL")]
    if all(parts):
        return tuple(int(m.group(1)) for m in parts)
    m = re.search(r"#define LINUX_VERSION_CODE\s+(\d+)", text)
    if not m:
        return None
    code = int(m.group(1))
    return code >> 16, (code >> 8) & 0xff, code & 0xff


def version_says(probe: Probe, version: tuple[int, int, int] | None) -> bool | None:
    """What a LINUX_VERSION_CODE check on the probe's mainline release would say."""
    if version is None or not (probe.since or probe.until):
        return None
    mm = version[:2]
    if probe.since:
        return mm >= tuple(int(x) for x in probe.since.split("."))
    return mm < tuple(int(x) for x in probe.until.split("."))


# ---------------------------------------------------------------- per kernel, cached

def run_all(kernel, probes: tuple[Probe, ...], work: Path) -> list[Result]:
    """Every probe on *kernel*, in table order."""
    dirs = include_dirs(Path(kernel.headers))
    by_name = {p.name: check_header(p, dirs) for p in probes if p.how == "header"}
    compiled = [p for p in probes if p.how == "compile"]
    if compiled:
        by_name.update((r.name, r) for r in run_compile(kernel, compiled, work))
    return derive(probes, by_name)


def cache_key(kernel, probes: tuple[Probe, ...]) -> str:
    """Changes with the probe table or this module, the kernel (release, packages),
    any header a header check reads, the kernel's Kconfig and the compiler."""
    h = hashlib.sha256()
    for part in (TABLE.read_bytes(), Path(__file__).read_bytes(), kernel.release.encode(),
                 json.dumps(getattr(kernel, "packages", {}), sort_keys=True).encode(),
                 compiler_id(kernel).encode()):
        h.update(part + b"\0")
    dirs = include_dirs(Path(kernel.headers))
    names = sorted({n for p in probes for n in p.header}) + ["generated/autoconf.h"]
    for name in names:
        path = resolve(dirs, name)
        h.update(f"{name}\0".encode() + (path.read_bytes() if path else b"-") + b"\0")
    return h.hexdigest()


def cache_dir(kernel) -> Path:
    return paths.cache_dir() / "probes" / kernel.release


def _prune(where: Path, keep: int = KEEP):
    """Results of older probe tables or headers: the newest *keep* stay."""
    old = sorted(where.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)[keep:]
    for path in old:
        path.unlink(missing_ok=True)
        path.with_suffix(".h").unlink(missing_ok=True)


def features(kernel, *, probes: tuple[Probe, ...] | None = None) -> tuple[list[Result], Path]:
    """The probe results for *kernel* and its ``nflab_features.h``: from the cache
    when its key still holds, else probed now (header checks, then one Kbuild
    run) and cached for every build tree and worktree."""
    probes = probes or load_table()
    where = cache_dir(kernel)
    key = cache_key(kernel, probes)[:16]
    found, header = where / f"{key}.json", where / f"{key}.h"
    with file_lock(where / ".lock"):
        try:
            data = json.loads(found.read_text())
            if data.get("release") == kernel.release and header.is_file():
                return [Result(**r) for r in data["results"]], header
        except (OSError, ValueError, TypeError, KeyError):
            pass
        work = where / f".work-{os.getpid()}"
        try:
            results = run_all(kernel, probes, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        write_if_changed(header, render_header(kernel, probes, results))
        write_if_changed(found, json.dumps({"release": kernel.release,
                                  "results": [r.as_dict() for r in results]}, indent=2) + "\n")
        _prune(where)
    return results, header


def render_header(kernel, probes: tuple[Probe, ...], results: list[Result]) -> str:
    """``nflab_features.h``: one commented ``#define`` per probe."""
    version = headers_version(Path(kernel.headers))
    vtext = ".".join(map(str, version)) if version else "unknown"
    out = ["/* SPDX-License-Identifier: GPL-2.0 */", "/*",
           f" * nflab_features.h: what the headers of {ccomment(kernel.release)} offer",
           f" * (LINUX_VERSION_CODE {vtext}), decided by kmods/probes.py from the",
           " * table kmods/probes.toml, never by version: a header check reads the header",
           " * a declaration lives in, a compile probe builds a line of C through Kbuild",
           " * with -Werror. Generated; compat_nflab.h keys on these.", " */",
           "#ifndef _NFLAB_FEATURES_H", "#define _NFLAB_FEATURES_H", ""]
    for probe, res in zip(probes, results):
        notes = [probe.what, f"{res.how} {'check' if res.how == 'header' else 'probe'}: "
                             f"{res.evidence}"]
        said = version_says(probe, version)
        if said is not None:
            release = f"since {probe.since}" if probe.since else f"until {probe.until}"
            verdict = "as here" if said == res.value else "WRONG here"
            notes.append(f"mainline {release}: a version check says {int(said)}, {verdict}")
        if not res.value:
            notes.append(f"without it: {probe.fallback}" if probe.fallback else
                         "no fallback: extensions calling it are refused on this kernel")
        out.append("/*")
        for note in notes:
            out += [f" * {line}" for line in textwrap.wrap(ccomment(note), 90,
                                                           subsequent_indent="   ")]
        out += [" */", f"#define {probe.macro} {int(res.value)}", ""]
    out += ["#endif /* _NFLAB_FEATURES_H */", ""]
    return "\n".join(out)


# ---------------------------------------------------------------- extensions

def missing_for(source: str, probes: tuple[Probe, ...], results: list[Result]) -> list[tuple[Probe, Result]]:
    """Probes without a fallback that *source* (a module's C) uses and the kernel lacks."""
    code = _uncommented(source)
    return [(p, r) for p, r in zip(probes, results)
            if p.uses and not r.value and re.search(p.uses, code)]


def prepare(ext, kernel, out: Path) -> bool:
    """The build hook: write ``nflab_features.h`` for *kernel* into *out* (True when
    it changed) and refuse *ext* before Kbuild when its module calls an API the
    kernel lacks and compat_nflab.h cannot replace."""
    probes = load_table()
    results, header = features(kernel, probes=probes)
    changed = write_if_changed(out / FEATURES_H, header.read_text())
    source = out / f"{ext.module}.c"
    missing = missing_for(source.read_text() if source.is_file() else "", probes, results)
    if missing:
        probe, res = missing[0]
        raise MissingFeature(
            f"{ext.name} cannot be built for {kernel.release}: the kernel lacks "
            f"{probe.name} ({res.evidence}), which {source.name} calls and compat_nflab.h "
            f"has no fallback for",
            hint=f"probe results: {out / FEATURES_H}")
    return changed
