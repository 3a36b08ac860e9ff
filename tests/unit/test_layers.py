"""The kit's architecture, checked (README "Layout"): one-way layers and an
independent lab and build (import-linter, pyproject ``[tool.importlinter]``), no
import cycles, imports at the top of modules, functions a reader can follow.

Every import counts, function-local ones too."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import grimp

from ground.paths import REPO

PACKAGES = ("cli", "nflab", "vm", "kmods", "userspace_ext", "supply", "ground")

LOCAL_IMPORT_REASON = re.compile(r"#\s*(start-up cost|optional dependency)\b")
LONG_REASON = re.compile(r"^\s*# long: \S")
LONG, TOO_LONG = 60, 80


def _kit_files() -> list[Path]:
    files = [REPO / "tasks.py"]
    for pkg in PACKAGES:
        files += sorted((REPO / pkg).rglob("*.py"))
    return files


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_import_linter_contracts_are_kept():
    # the lint-imports of this interpreter's environment (the project's venv in CI)
    exe = Path(sys.executable).parent / "lint-imports"
    cmd = [str(exe)] if exe.is_file() else [
        sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]
    res = subprocess.run([*cmd, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    edges = {m: graph.find_modules_directly_imported_by(m) - {m} for m in graph.modules}
    problems = []
    for cycle in _cycles(edges):
        members = set(cycle)
        lines = [f"  {d['importer']}:{d['line_number']} {d['line_contents']}"
                 for a in cycle for b in sorted(edges[a] & members)
                 for d in graph.get_import_details(importer=a, imported=b)]
        problems.append("import cycle " + " <-> ".join(cycle) + ":\n" + "\n".join(lines))
    assert not problems, "\n".join(problems)


def _local_imports(tree: ast.AST):
    """Import statements inside functions."""
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node


def _has_reason(lines: list[str], lineno: int) -> bool:
    """A reason comment on the import's line or above the block of imports it is in."""
    i = lineno - 1
    if LOCAL_IMPORT_REASON.search(lines[i]):
        return True
    while i > 0 and re.match(r"\s*(import|from)\s", lines[i - 1]):
        i -= 1
        if LOCAL_IMPORT_REASON.search(lines[i]):
            return True
    above = lines[i - 1] if i > 0 else ""
    return bool(LOCAL_IMPORT_REASON.search(above)) and above.strip().startswith(("#", "try:"))


def test_imports_are_at_the_top_of_modules():
    unmarked = []
    for path in _kit_files():
        text = path.read_text()
        lines = text.splitlines()
        for node in _local_imports(ast.parse(text)):
            if not _has_reason(lines, node.lineno):
                unmarked.append(f"{_rel(path)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not unmarked, (
        "function-local imports without a reason (move them to the top of the module; keep one "
        "only for an optional dependency or a measured start-up cost, with a '# optional "
        "dependency: ...' or '# start-up cost: ...' comment):\n" + "\n".join(unmarked))


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def long_functions(path: Path) -> list[str]:
    """Functions of *path* over TOO_LONG lines, and over LONG without a
    ``# long: <reason>`` comment in the comment lines right above the def (or its
    decorators)."""
    lines = path.read_text().splitlines()
    out = []
    for fn in _functions(ast.parse("\n".join(lines))):
        n = fn.end_lineno - fn.lineno + 1
        above = min([fn.lineno] + [d.lineno for d in fn.decorator_list]) - 2
        comments = []
        while above >= 0 and lines[above].lstrip().startswith("#"):
            comments.append(lines[above])
            above -= 1
        reason = any(LONG_REASON.match(c) for c in comments)
        if n > TOO_LONG or (n > LONG and not reason):
            out.append(f"{_rel(path)}:{fn.lineno}: {fn.name} has {n} lines")
    return out


def test_the_length_check_sees_long_functions(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    body = "".join(f"    x{i} = {i}\n" for i in range(70))
    (tmp_path / "m.py").write_text(f"def plain():\n{body}\n\n# long: one table,\n# read top to bottom\n"
                                   f"def explained():\n{body}\n\n# not long: says nothing\n"
                                   f"def unexplained():\n{body}\n\ndef short():\n    pass\n")
    assert long_functions(tmp_path / "m.py") == ["m.py:1: plain has 71 lines",
                                                 "m.py:150: unexplained has 71 lines"]
    (tmp_path / "n.py").write_text("# long: no reason is enough past 80\ndef f():\n"
                                   + "".join(f"    x{i} = {i}\n" for i in range(85)))
    assert long_functions(tmp_path / "n.py") == ["n.py:2: f has 86 lines"]


def test_functions_are_short():
    files = _kit_files() + sorted((REPO / "tests").rglob("*.py"))
    problems = [p for path in files for p in long_functions(path)]
    assert not problems, (
        f"split these into named steps (at most {TOO_LONG} lines; over {LONG} only with a "
        "'# long: <why>' comment above the def):\n" + "\n".join(problems))
