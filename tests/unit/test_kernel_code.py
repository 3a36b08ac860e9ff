"""The rendered kernel C as a netfilter maintainer reads it (issue 17): every
module of the catalog, the tracer and the workshop (skeletons and solutions).

* statements are indented by their brace depth (one template block included at
  two depths once left pktcount's error path misindented);
* no seq_file formatting while a spinlock is held (the tracer once printed its
  whole log under spin_lock_bh);
* hook modules count in per-CPU u64_stats counters, not in shared atomics.
"""

from __future__ import annotations

import re

import pytest

from kmods import render, spec
from nflab import workshop

CONTROL = re.compile(r"^(if|else if|for|while|\w*for_each\w*)\b|^(else|do)$")
CONTINUES = ("=", "&&", "||", "?", "+", "-", "|", "&", "*", "/")


def _modules():
    exts = [spec.load(n) for n in spec.catalog_names(include_hidden=True)]
    for ex in workshop.exercises():
        exts += [ex.load(solution=False), ex.load(solution=True)]
    return exts


MODULES = _modules()
IDS = [f"{e.path.parent.parent.name}/{e.name}" for e in MODULES]


def _blank(src: str) -> str:
    """*src* with comments and string/char literals blanked, line structure kept."""
    code = re.sub(r"/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m.group(0)), src, flags=re.S)
    code = re.sub(r'"(\\.|[^"\\])*"', lambda m: '"' + " " * (len(m.group(0)) - 2) + '"', code)
    code = re.sub(r"'(\\.|[^'\\])*'", "' '", code)
    return re.sub(r"//[^\n]*", "", code)


def _code_lines(src: str) -> list[tuple[int, str, str]]:
    """(line number, raw line, code with comments and literals blanked)."""
    return [(i + 1, raw, c) for i, (raw, c) in enumerate(zip(src.splitlines(), _blank(src).splitlines()))]


def misindented(src: str) -> list[str]:
    """Lines whose leading tabs differ from what their brace depth asks for.
    Continuation lines (open parentheses, a trailing operator, a macro's
    backslash, an initializer opened inside a line) are free; a brace-less
    if/for/while/else body is one deeper; case labels sit at their switch's
    depth, goto labels in column 0."""
    wrong, depth, parens, inline, pending, ctl = [], 0, 0, 0, 0, False
    prev = ""
    for no, raw, code in _code_lines(src):
        text = code.strip()
        if not text:
            continue
        cont = (parens > 0 or inline > 0 or prev.endswith(CONTINUES) or prev.endswith("\\")
                or prev.startswith("#"))
        if not cont and not text.startswith("#") and not re.fullmatch(r"[A-Za-z_]\w*:", text):
            want = depth - (1 if text.startswith("}") or re.match(r"(case\b.*|default):$", text) else 0)
            want += pending if not text.startswith("{") else 0
            tabs = len(raw) - len(raw.lstrip("\t"))
            if tabs != want:
                wrong.append(f"{no}: {tabs} tabs, depth asks {want}: {raw.strip()}")
            pending = pending if CONTROL.match(text) else 0
            ctl = bool(CONTROL.match(text))
        opens, closes = text.count("{"), text.count("}")
        depth += opens - closes
        parens += text.count("(") - text.count(")")
        if opens > closes and not text.endswith("{"):
            inline += opens - closes            # an initializer continued on the next lines
        elif closes > opens and inline:
            inline = max(0, inline - (closes - opens))
        if ctl and parens == 0:                 # the controlling expression is complete
            pending += 0 if text.endswith(("{", ";")) else 1
            ctl = False
        prev = text
    return wrong


def _functions(src: str):
    """(name, body) of every function definition of the rendered file."""
    for m in re.finditer(r"^(?:static |)[^\n;=]*?\b(\w+)\([^;{]*?\)\n\{\n(.*?)^\}\n", _blank(src), re.M | re.S):
        yield m.group(1), m.group(2)


def seq_under_spinlock(src: str) -> list[str]:
    """seq_* calls made between a spin_lock*() and its spin_unlock*()."""
    found = []
    for name, body in _functions(src):
        held = 0
        for line in body.splitlines():
            held += len(re.findall(r"\bspin_lock(?:_bh|_irq|_irqsave)?\(", line))
            held -= len(re.findall(r"\bspin_unlock(?:_bh|_irq|_irqrestore)?\(", line))
            if held and re.search(r"\bseq_\w+\(", line):
                found.append(f"{name}: {line.strip()}")
    return found


@pytest.mark.parametrize("ext", MODULES, ids=IDS)
def test_statements_indented_by_depth(ext):
    for name, text in render.render(ext).items():
        if name.endswith((".c", ".h")) and not name.startswith("lib"):
            assert not misindented(text), f"{name}:\n" + "\n".join(misindented(text))


@pytest.mark.parametrize("ext", MODULES, ids=IDS)
def test_no_seq_file_output_under_a_spinlock(ext):
    src = render.render(ext)[f"{ext.module}.c"]
    assert not seq_under_spinlock(src), "\n".join(seq_under_spinlock(src))


@pytest.mark.parametrize("ext", [e for e in MODULES if e.kind == "hook"],
                         ids=[i for e, i in zip(MODULES, IDS) if e.kind == "hook"])
def test_hook_counters_are_per_cpu_u64_stats(ext):
    src = render.render(ext)[f"{ext.module}.c"]
    assert "atomic64_t" not in src and "atomic_t" not in src, "a shared atomic counter"
    assert "alloc_percpu(struct" in src and "u64_stats_update_begin(&st->syncp)" in src
    # a clear writes only this CPU's counters (the sums subtracted), serialised
    fns = dict(_functions(src))
    clear, subtract = fns[f"{ext.prefix}_clear"], fns[f"{ext.prefix}_subtract"]
    assert f"{ext.prefix}_subtract(pn, sum);" in clear and "mutex_lock(" in clear
    assert "this_cpu_ptr(pn->stats)" in subtract and "per_cpu_ptr" not in subtract


def test_checker_sees_a_block_included_at_the_wrong_depth():
    src = "static int f(void)\n{\n\tif (x) {\n\t\ta();\n\tb();\n\t\treturn 1;\n\t}\n\treturn 0;\n}\n"
    assert misindented(src) == ["5: 1 tabs, depth asks 2: b();"]
    assert not misindented(src.replace("\n\tb();", "\n\t\tb();"))


def test_checker_sees_seq_printf_under_a_lock():
    src = ("static int f(struct seq_file *s)\n{\n\tspin_lock_bh(&l);\n\tseq_printf(s, \"x\");\n"
           "\tspin_unlock_bh(&l);\n\treturn 0;\n}\n")
    assert seq_under_spinlock(src) == ['f: seq_printf(s, " ");']   # literals blanked
