"""Parsed Packages and Sources indexes, cached compactly.

A suite's index is scanned once into rows of the fields the kit uses plus the
byte span of each stanza; the rows are stored with :mod:`marshal` beside the
uncompressed index text, both named by the sha256 the signed Release gives for
the compressed index. Loading an index is then one ``marshal.load`` (about
0.1 s for a whole suite); the other fields of a package are read from the
text when first asked for (``Package.fields``)."""

from __future__ import annotations

import functools
import gc
import marshal
import os
import re
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from ground import deb822, debversion
from ground.errors import ArchiveError
from ground.files import atomic_write

FORMAT = 1
PKG_KEYS = ("Package", "Version", "Filename", "SHA256", "Size", "Depends", "Pre-Depends",
            "Provides", "Source", "Architecture", "Priority", "Essential")
_PKG_KEYSET = frozenset(PKG_KEYS)


@dataclass(eq=False)
class Package:
    """One binary package of an index. ``depends``, ``pre_depends`` and
    ``provides`` are the raw field values (see :func:`deb822.relations`);
    ``source`` is the source package's name; ``fields`` has every field."""

    name: str
    version: str
    filename: str
    sha256: str
    size: int
    depends: str
    pre_depends: str
    provides: str
    source: str
    architecture: str
    suite: str
    priority: str = ""
    essential: bool = False
    _stanza: Callable[[], str] | None = None

    @functools.cached_property
    def fields(self) -> dict[str, str]:
        return deb822.parse(self._stanza()) if self._stanza else {}

    @property
    def basename(self) -> str:
        return self.filename.rsplit("/", 1)[-1]

    def __repr__(self):
        return f"Package({self.name} {self.version} {self.architecture} from {self.suite})"


@dataclass(eq=False)
class SourcePackage:
    """One source package: where its files are and their ``(sha256, size, name)``."""

    name: str
    version: str
    directory: str
    files: list[tuple[str, int, str]]
    suite: str
    _stanza: Callable[[], str] | None = None

    @functools.cached_property
    def fields(self) -> dict[str, str]:
        return deb822.parse(self._stanza()) if self._stanza else {}

    def __repr__(self):
        return f"SourcePackage({self.name} {self.version} from {self.suite})"


def _package_row(f: dict[str, str]) -> tuple:
    name = f.get("Package", "")
    source = f.get("Source", "").split(" ", 1)[0] or name
    return (name, f.get("Version", ""), f.get("Filename", ""), f.get("SHA256", ""),
            int(f.get("Size") or 0), f.get("Depends", ""), f.get("Pre-Depends", ""),
            f.get("Provides", ""), source, f.get("Architecture", ""), f.get("Priority", ""),
            f.get("Essential", "").lower() == "yes")


def _source_row(f: dict[str, str]) -> tuple:
    files = tuple(deb822.checksums(f.get("Checksums-Sha256", "")))
    return (f.get("Package", ""), f.get("Version", ""), f.get("Directory", ""), files)


def scan_packages(data: bytes) -> list[tuple]:
    """Rows (see :func:`_package_row`) + ``(offset, length)`` of a Packages file."""
    return [_package_row(deb822.pick(data[s:e].decode("utf-8", "replace"), _PKG_KEYSET))
            + (s, e - s) for s, e in deb822.spans(data)]


def scan_sources(data: bytes) -> list[tuple]:
    return [_source_row(deb822.parse(data[s:e].decode("utf-8", "replace"))) + (s, e - s)
            for s, e in deb822.spans(data)]


class Index(Mapping):
    """name -> list of entries (newest version first), over cached rows."""

    def __init__(self, rows: list[tuple], text: Path, suite: str):
        self.suite = suite
        self._rows = rows
        # kept open: a newer index may replace the file while this one is used
        self._fd = os.open(text, os.O_RDONLY)
        self.close = weakref.finalize(self, os.close, self._fd)
        self._by_name: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            self._by_name.setdefault(row[0], []).append(i)
        self._made: dict[str, list] = {}

    def _make(self, row: tuple):
        raise NotImplementedError

    def _stanza(self, offset: int, length: int) -> Callable[[], str]:
        return lambda: os.pread(self._fd, length, offset).decode("utf-8", "replace")

    def __getitem__(self, name: str) -> list:
        if name not in self._made:
            made = [self._make(self._rows[i]) for i in self._by_name[name]]
            self._made[name] = sorted(made, key=lambda p: debversion.key(p.version), reverse=True)
        return self._made[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def newest(self, name: str):
        """The newest version of *name*, or None."""
        return self[name][0] if name in self._by_name else None

    def search(self, pattern: str | re.Pattern) -> list[str]:
        """Sorted names that *pattern* matches at their start (``re.match``):
        ``search(r"linux-headers-")`` lists every linux-headers package."""
        rx = re.compile(pattern)
        return sorted(n for n in self._by_name if rx.match(n))


class PackageIndex(Index):
    """A suite's ``Packages``: name -> list of :class:`Package`."""

    def _make(self, row: tuple) -> Package:
        return Package(*row[:10], suite=self.suite, priority=row[10], essential=row[11],
                       _stanza=self._stanza(row[12], row[13]))

    @functools.cached_property
    def _provided(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for row in self._rows:
            for group in deb822.relations(row[7]) if row[7] else ():
                out.setdefault(group[0].name, []).append(row[0])
        return out

    def providers(self, name: str) -> list[Package]:
        """Packages whose Provides names *name* (newest version of each)."""
        return [self.newest(n) for n in sorted(set(self._provided.get(name, ())))]


class SourceIndex(Index):
    """A suite's ``Sources``: name -> list of :class:`SourcePackage`."""

    def _make(self, row: tuple) -> SourcePackage:
        return SourcePackage(row[0], row[1], row[2], [tuple(f) for f in row[3]],
                             suite=self.suite, _stanza=self._stanza(row[4], row[5]))


def store(rows: list[tuple], data: bytes, idx: Path, text: Path):
    """Write the text, then the rows (each via a temp file and os.replace)."""
    atomic_write(text, data)
    atomic_write(idx, marshal.dumps({"format": FORMAT, "size": len(data), "rows": rows}))


def load(idx: Path, text: Path) -> list[tuple] | None:
    """The stored rows, or None when missing, damaged, of another format or
    when the text beside them changed size."""
    try:
        blob = _unmarshal(idx.read_bytes())
        ok = blob.get("format") == FORMAT and text.stat().st_size == blob.get("size")
    except (OSError, EOFError, ValueError, TypeError, AttributeError):
        return None
    return blob["rows"] if ok else None


def _unmarshal(data: bytes):
    """marshal.loads without the cyclic GC running over the fresh tuples (it
    would triple the load time; tuples of strings hold no cycles)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return marshal.loads(data)
    finally:
        if enabled:
            gc.enable()


_RANK = {"required": 0, "important": 1, "standard": 2, "optional": 3, "extra": 4}


def closure(indexes: list[PackageIndex], names, exclude=(), skip_required: bool = False
            ) -> list[Package]:
    """*names* and everything they need (Pre-Depends and Depends), over the
    *indexes* together: for each group of alternatives, one already chosen (or
    provided, or in *exclude*) satisfies it, else the first alternative that
    exists as a package or is provided by one (a provider also named in the
    group first, then by priority). The newest version is taken
    unless a versioned relation needs an older one; a versioned relation that
    no version satisfies is unmet. With *skip_required*,
    Essential and priority-required packages count as present and are left
    out. Unresolvable dependencies raise ArchiveError."""
    state = _Closure(indexes, frozenset(exclude), skip_required)
    for name in names:
        pkg = state.real(deb822.Relation(name)) or state.provider(name)
        if pkg is None:
            raise ArchiveError(f"no package {name} in {state.suites()}")
        state.take(pkg, requested=True)
    state.run()
    return list(state.chosen.values())


def _relation(rel) -> str:
    """``libfoo (>= 2.0)``, or ``libfoo`` for an unversioned relation."""
    return f"{rel.name} ({rel.op} {rel.version})" if rel.op else rel.name


class _Closure:
    def __init__(self, indexes, exclude, skip_required):
        self.indexes, self.exclude, self.skip_required = indexes, exclude, skip_required
        self.chosen: dict[str, Package] = {}
        self.provided: set[str] = set()
        self.todo: deque[Package] = deque()
        self.unmet: list[str] = []

    def suites(self) -> str:
        return ", ".join(ix.suite for ix in self.indexes)

    def run(self):
        while self.todo:
            pkg = self.todo.popleft()
            for group in deb822.relations(pkg.pre_depends) + deb822.relations(pkg.depends):
                if not self.add_group(group):
                    self.unmet.append(f"{pkg.name} needs {' | '.join(map(_relation, group))}")
        if self.unmet:
            raise ArchiveError(f"cannot resolve dependencies in {self.suites()}: "
                               + "; ".join(self.unmet[:5]))

    def add_group(self, group) -> bool:
        """Satisfy one group of alternatives; False when nothing can."""
        if any(r.name in self.chosen or r.name in self.provided or r.name in self.exclude
               for r in group):
            return True
        named = {r.name for r in group}
        for rel in group:
            pkg = self.real(rel) or self.provider(rel.name, named)
            if pkg is not None:
                self.take(pkg)
                return True
        return False

    def real(self, rel) -> Package | None:
        found = [p for ix in self.indexes if rel.name in ix for p in ix[rel.name]]
        found.sort(key=lambda p: debversion.key(p.version), reverse=True)
        good = [p for p in found if debversion.satisfies(p.version, rel.op, rel.version)]
        return good[0] if good else None      # libfoo (>= 2.0) with only 1.0: unmet

    def provider(self, name: str, named=frozenset()) -> Package | None:
        """A package providing *name*: one also named in the group, else the
        one of highest priority (then by name)."""
        found = [p for ix in self.indexes for p in ix.providers(name) if p.name not in self.exclude]
        found.sort(key=lambda p: (p.name not in named, _RANK.get(p.priority, 5), p.name))
        return found[0] if found else None

    def take(self, pkg: Package, requested: bool = False):
        if pkg.name in self.chosen:
            return
        if not requested and self.skip_required and (pkg.essential or pkg.priority == "required"):
            self.provided.add(pkg.name)
            return
        self.chosen[pkg.name] = pkg
        self.provided.update(g[0].name for g in deb822.relations(pkg.provides))
        self.todo.append(pkg)
