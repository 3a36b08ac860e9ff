"""Compiler output, read the way a person reads it: the errors, as ``file:line``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ground.errors import BuildError

# every located line of gcc's output, notes included
_LOC_RE = re.compile(r"^(?P<file>[^\s:]+\.(?:c|h)):(?P<line>\d+):(?:(?P<col>\d+):)?\s*"
                     r"(?P<sev>error|warning|fatal error|note):\s*(?P<msg>.*)$")
# gcc quotes a name with ASCII quotes or, by LANG, with U+2018/U+2019
_QUOTED = r"['\u2018](?:struct |union |enum )?(?P<name>\w+)['\u2019]"
_MACRO_RE = re.compile(r"in (?P<how>definition|expansion) of macro " + _QUOTED)
# an error about a name declared twice: gcc's words for it, whatever the kind
_TWICE_RE = re.compile(r"redeclaration|redeclared|redefinition|conflicting|follows")
_HEADERS_RE = re.compile(r"^.*/linux-headers-[^/]+/")
_IDENT_RE = re.compile(r"\w+")


@dataclass(frozen=True)
class Clash:
    """A name of ours that the compile found defined elsewhere first."""

    name: str
    origin: str      # what of the definition the name comes from
    where: str       # file:line of the other definition, "" when gcc did not say


@dataclass(frozen=True)
class _Loc:
    file: str
    line: int
    col: int
    sev: str
    msg: str

    @property
    def where(self) -> str:
        return f"{_HEADERS_RE.sub('', self.file)}:{self.line}"

    def token(self) -> str:
        """The identifier the location points at in its file ("" if unreadable)."""
        try:   # gcc counts columns as displayed: a tab to the next multiple of 8
            text = Path(self.file).read_text(errors="replace").splitlines()[self.line - 1].expandtabs(8)
        except (OSError, IndexError):
            return ""
        m = _IDENT_RE.match(text, max(self.col - 1, 0))
        return m.group(0) if m else ""


def _located(output: str) -> list[_Loc]:
    found = []
    for line in output.splitlines():
        m = _LOC_RE.match(line.strip())
        if m:
            found.append(_Loc(m.group("file"), int(m.group("line")), int(m.group("col") or 0),
                              m.group("sev"), m.group("msg")))
    return found


def diagnostics(output: str, src_dir: Path) -> list[str]:
    """Compiler errors as ``file:line: message`` lines, paths relative to the build dir."""
    found = []
    for loc in _located(output):
        if loc.sev in ("error", "fatal error"):
            path = loc.file
            try:
                path = str(Path(path).resolve().relative_to(src_dir.resolve()))
            except ValueError:
                pass
            found.append(f"{src_dir / path}:{loc.line}: {loc.sev}: {loc.msg}")
    return found


def _origin(name: str, names: dict[str, str], prefixes: dict[str, str]) -> str | None:
    if name in names:
        return names[name]
    return next((origin for p, origin in prefixes.items() if name.startswith(p)), None)


def _macro_site(locs: list[_Loc], i: int, how: str) -> _Loc | None:
    """Where the macro of the note at *i* is defined: the note itself for "in
    definition of", else the nearest diagnostic before it in another file."""
    if how == "definition":
        return locs[i]
    return next((loc for loc in reversed(locs[:i]) if loc.file != locs[i].file), None)


def _clash_at(locs: list[_Loc], i: int) -> tuple[str, _Loc | None] | None:
    """(name, where else it is defined, if gcc says) when the diagnostic at *i* shows
    a name clash: a macro's expansion noted, a name declared twice, or (a macro of
    a system header, which gcc does not note) a number where our identifier stands."""
    loc = locs[i]
    if loc.sev == "note":
        m = _MACRO_RE.search(loc.msg)
        return (m.group("name"), _macro_site(locs, i, m.group("how"))) if m else None
    if loc.sev != "error":
        return None
    if _TWICE_RE.search(loc.msg) and (m := re.search(_QUOTED, loc.msg)):
        nxt = locs[i + 1] if i + 1 < len(locs) else None
        return m.group("name"), (nxt if nxt and nxt.sev == "note" else None)
    if loc.msg.startswith("expected identifier") and (name := loc.token()):
        return name, None
    return None


def _within(loc: _Loc | None, folder: Path | None) -> bool:
    return bool(loc and folder) and Path(loc.file).resolve().is_relative_to(folder.resolve())


def clashes(output: str, names: dict[str, str], prefixes: dict[str, str] | None = None,
            ours: Path | None = None) -> list[Clash]:
    """The names of *names* (name -> what it comes from) that gcc's *output* shows
    clashing with a definition elsewhere: a header's macro expanded where we define
    the name, or an enumerator, function, variable or tag declared twice. A name
    starting with a key of *prefixes* counts too, with that key's origin. A name
    defined twice within folder *ours* (the sources' own mistake) is no clash."""
    locs, found = _located(output), {}
    for i in range(len(locs)):
        hit = _clash_at(locs, i)
        origin = _origin(hit[0], names, prefixes or {}) if hit else None
        if origin and hit[0] not in found and not _within(hit[1], ours):
            found[hit[0]] = Clash(hit[0], origin, hit[1].where if hit[1] else "")
    return list(found.values())


FIELD_HINT = "another `field` for that option in ext.toml renames its flag, constants and value function"
NAME_HINT = "another name for the extension renames every C name it generates"


def failure(what: str, output: str, src_dir: Path, log: Path, names: dict[str, str] | None = None,
            prefixes: dict[str, str] | None = None, *, target: str = "") -> BuildError:
    """The error for a failed compile of *what* (for *target*, " for 6.12..."): the
    compiler's errors as file:line, led by the first of *names* or *prefixes* (see
    clashes) found taken already."""
    names = names or {}
    diags = diagnostics(output, src_dir)
    detail = "\n".join(diags or output.strip().splitlines()[-20:])
    found = clashes(output, names, prefixes, ours=src_dir)
    if not found:
        return BuildError(f"{what} failed to build{target}", hint=f"full log: {log}", detail=detail)
    c = found[0]
    fix = FIELD_HINT if c.name in names else NAME_HINT
    return BuildError(f"{what} failed to build{target}: {c.origin} generates the C name {c.name}, "
                      f"which {c.where or 'a header it includes'} already uses",
                      hint=f"{fix}; full log: {log}", detail=detail)
