"""Rendering: layout of the shared struct, escaping of user text, kernel style.

The struct layout test compiles two tiny host programs (no kernel involved):
one against the stock uapi <linux/netfilter/xt_iprange.h>, one against the
rendered header, and compares sizes, offsets and flag values.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess

import jinja2
import pytest

from ground.errors import SpecError
from kmods import render, spec
from tests.conftest import HOOK_RAW, MATCH_RAW, TARGET_RAW

NASTY = 'q"uote \\back */ /* end\nnew\tline ??= %s %n \x7f é'


def _all_kinds():
    exts = [spec.load("iprange")]
    for raw in (MATCH_RAW, TARGET_RAW, HOOK_RAW):
        exts.append(spec.validate(copy.deepcopy(raw)))
    return exts


KINDS = _all_kinds()


@pytest.fixture(scope="module")
def iprange_files():
    return render.render(spec.load("iprange"))


def test_render_produces_every_source(iprange_files):
    assert set(iprange_files) == {"xt_iprange.c", "xt_iprange.h", "libxt_iprange.c", "Kbuild",
                                  "compat_nflab.h"}
    hook = render.render(spec.validate(copy.deepcopy(HOOK_RAW)))
    assert set(hook) == {"nflab_nflhook.c", "Kbuild", "compat_nflab.h"}


def test_iprange_uses_its_own_template(iprange_files):
    c = iprange_files["xt_iprange.c"]
    assert "m ^= !!(info->flags & IPRANGE_SRC_INV);" in c and "iprange_lt6(" in c
    assert '.name\t\t= "iprange",' in c and ".revision\t= 1," in c
    assert c.count("xt_register_matches(") == 1
    assert '#include "xt_iprange.h"' in c
    assert '#include "xt_iprange.h"' in iprange_files["libxt_iprange.c"]


def test_kbuild_builds_one_module_with_werror(iprange_files):
    kb = iprange_files["Kbuild"]
    assert "obj-m += xt_iprange.o" in kb
    assert re.search(r"^ccflags-y \+=.*-Werror", kb, re.M)


def test_iprange_header_declares_in_tree_layout(iprange_files):
    h = iprange_files["xt_iprange.h"]
    body = re.search(r"struct xt_iprange_mtinfo \{\n(.*?)\n\};", h, re.S).group(1)
    assert [line.strip() for line in body.splitlines()] == [
        "union nf_inet_addr src_min;", "union nf_inet_addr src_max;",
        "union nf_inet_addr dst_min;", "union nf_inet_addr dst_max;", "__u8 flags;",
        "__u8 __pad0[3];"]      # the in-tree struct leaves these 3 tail bytes unnamed: same layout
    assert "sizeof(struct xt_iprange_mtinfo) == 68" in h
    for const, value in (("IPRANGE_SRC", 0), ("IPRANGE_DST", 1), ("IPRANGE_SRC_INV", 4),
                         ("IPRANGE_DST_INV", 5)):
        assert re.search(rf"^\t{const} = 1 << {value},", h, re.M), const


_LAYOUT_PROG = r"""
#include <stdio.h>
#include <stddef.h>
#include HEADER_LINE
int main(void)
{
	printf("%zu %zu %zu %zu %zu %zu\n", sizeof(struct xt_iprange_mtinfo),
	       offsetof(struct xt_iprange_mtinfo, src_min), offsetof(struct xt_iprange_mtinfo, src_max),
	       offsetof(struct xt_iprange_mtinfo, dst_min), offsetof(struct xt_iprange_mtinfo, dst_max),
	       offsetof(struct xt_iprange_mtinfo, flags));
	printf("%#x %#x %#x %#x\n", IPRANGE_SRC, IPRANGE_DST, IPRANGE_SRC_INV, IPRANGE_DST_INV);
	return 0;
}
"""


def test_iprange_layout_equals_stock_uapi_header(tmp_path, iprange_files):
    # never skipped: .ci/setup installs gcc, libc6-dev and linux-libc-dev for it
    assert shutil.which("gcc"), "gcc is missing: run bash .ci/setup (gcc, libc6-dev, linux-libc-dev)"
    (tmp_path / "xt_iprange.h").write_text(iprange_files["xt_iprange.h"])
    out = {}
    for which, header in (("stock", "<linux/netfilter/xt_iprange.h>"), ("nflab", '"xt_iprange.h"')):
        exe, src = tmp_path / which, tmp_path / f"{which}.c"
        src.write_text(_LAYOUT_PROG.replace("HEADER_LINE", header))
        cc = subprocess.run(["gcc", "-Wall", "-Werror", f"-I{tmp_path}", "-o", exe, src],
                            capture_output=True, text=True)
        assert cc.returncode == 0, (f"gcc {which}.c failed (a header missing? run bash .ci/setup, "
                                    f"it installs libc6-dev and linux-libc-dev):\n{cc.stderr}")
        out[which] = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    assert out["nflab"] == out["stock"]
    assert out["nflab"].splitlines() == ["68 0 16 32 48 64", "0x1 0x2 0x10 0x20"]


# ---- StrictUndefined --------------------------------------------------------

def test_strict_undefined_catches_attribute_typo():
    env = render.environment()
    tmpl = env.from_string("static int {{ ext.nmae }}_x;")
    with pytest.raises(jinja2.UndefinedError):
        tmpl.render(ext=spec.load("iprange"))


def test_strict_undefined_catches_variable_typo_in_template_file(tmp_path):
    (tmp_path / "tiny.c.j2").write_text("{% import '_macros.j2' as m %}\n"
                                        "{{ m.banner(ext, 'x') }}\nint {{ extt.name }};\n")
    env = render.environment(tmp_path)
    with pytest.raises(jinja2.UndefinedError, match="extt"):
        env.get_template("tiny.c.j2").render(ext=spec.load("iprange"))
    # the same template without the typo renders through the shared macros
    (tmp_path / "ok.c.j2").write_text("{% import '_macros.j2' as m %}\n"
                                      "{{ m.banner(ext, 'x') }}\nint {{ ext.name }};\n")
    text = env.get_template("ok.c.j2").render(ext=spec.load("iprange"))
    assert text.startswith("// SPDX-License-Identifier: GPL-2.0\n") and "int iprange;" in text


def test_catalog_template_typo_fails_render(tmp_path):
    src = spec.CATALOG / "iprange"
    dest = tmp_path / "iprange"
    shutil.copytree(src, dest)
    tpl = dest / "xt_iprange.c.j2"
    text = tpl.read_text().replace("{% block match4 %}", "{% block match4 %}{{ ext.falmilies }}")
    tpl.write_text(text)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if "falmilies" in l)
    with pytest.raises(SpecError) as info:
        render.render(spec.load_file(dest / "ext.toml"))
    assert f"{tpl}:{line}: the template does not render" in info.value.message
    assert "falmilies" in info.value.message and info.value.hint
    assert info.value.exit_code == 2


def test_template_syntax_error_names_file_and_line(tmp_path):
    dest = tmp_path / "iprange"
    shutil.copytree(spec.CATALOG / "iprange", dest)
    tpl = dest / "xt_iprange.c.j2"
    lines = tpl.read_text().splitlines() + ["{% endblok %}"]
    tpl.write_text("\n".join(lines) + "\n")
    with pytest.raises(SpecError) as info:
        render.render(spec.load_file(dest / "ext.toml"))
    assert info.value.message.startswith(f"{tpl}:{len(lines)}: the template does not parse: ")
    assert "endblok" in info.value.message and "{% endblock %}" in info.value.hint


# ---- escaping ---------------------------------------------------------------

@pytest.mark.parametrize("value,literal", [
    ("plain", '"plain"'),
    ('a"b', r'"a\"b"'),
    ("a\\b", r'"a\\b"'),
    ("a\nb", r'"a\nb"'),
    ("a\tb", r'"a\tb"'),
    ("a\rb", r'"a\rb"'),
    ("??=", r'"\?\?="'),            # no trigraphs
    ("*/", '"*/"'),                  # harmless inside a string literal
    ("\x7f", r'"\177"'),
    ("é", r'"\303\251"'),
    ("\x00", r'"\000"'),
    ("", '""'),
    (42, '"42"'),
])
def test_cstr_table(value, literal):
    assert render.cstr(value) == literal


def test_cstr_output_is_one_printable_line():
    every = "".join(chr(i) for i in range(0, 0x250))
    lit = render.cstr(every)
    assert all(0x20 <= ord(c) < 0x7F for c in lit)
    assert re.fullmatch(r'"(?:[^"\\]|\\.)*"', lit)


@pytest.mark.parametrize("value,expected", [
    ("plain text", "plain text"),
    ("a */ b", "a * / b"),
    ("a /* b", "a / * b"),
    ("line\nbreak\tand  spaces", "line break and spaces"),
    ("/*/", "/ * /"),
    ("**/", "** /"),
])
def test_ccomment_table(value, expected):
    assert render.ccomment(value) == expected


@pytest.mark.parametrize("value", ["*/", "/*", "*//*", "/*/", "**//", "a*/*/b", "*\n/"])
def test_ccomment_never_contains_comment_tokens(value):
    out = render.ccomment(value)
    assert "*/" not in out and "/*" not in out and "\n" not in out


def _code_only(text: str) -> str:
    """C source without comments and with every literal emptied; asserts all are closed."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            assert end >= 0, "unterminated comment"
            i = end + 2
            out.append(" ")
        elif c in "\"'":
            j = i + 1
            while text[j] != c:
                assert text[j] != "\n", f"unterminated literal at {text[i:i + 40]!r}"
                j += 2 if text[j] == "\\" else 1
            out.append(c + c)
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _nasty_match():
    raw = copy.deepcopy(MATCH_RAW)
    raw["summary"] = NASTY
    raw["author"] = NASTY
    raw["options"][0].update(help=NASTY, label=NASTY)
    raw["options"].append({"name": "note", "type": "string", "length": 16, "help": NASTY, "label": NASTY})
    return spec.validate(raw)


def test_user_text_never_reaches_c_raw():
    files = render.render(_nasty_match())
    benign = render.render(spec.validate({**copy.deepcopy(MATCH_RAW),
                                          "options": [{**MATCH_RAW["options"][0]},
                                                      {"name": "note", "type": "string", "length": 16}]}))
    for name, text in files.items():
        code = _code_only(text)
        for piece in ('q"uote', "\\back", "end\nnew", "\x7f", "é", "??=", "/* end"):
            assert piece not in code, f"{piece!r} pasted raw into C code of {name}"
        # user text changes only the insides of literals and comments, never the code
        assert code == _code_only(benign[name]), f"{name}: user text changed the C tokens"
    plugin = files["libxt_nfltest.c"]
    escaped = render.cstr(NASTY)[1:-1]
    assert escaped in plugin                                  # help text, escaped
    assert render.cstr(NASTY) in plugin                        # label, escaped
    assert render.cstr("nflab: " + NASTY) in files["xt_nfltest.c"]   # MODULE_DESCRIPTION
    assert "MODULE_AUTHOR(" + render.cstr(NASTY) + ");" in files["xt_nfltest.c"]
    assert render.ccomment(NASTY) in files["xt_nfltest.c"]    # banner comment, defused


# ---- style --------------------------------------------------------------------

@pytest.mark.parametrize("ext", KINDS, ids=lambda e: f"{e.kind}-{e.name}")
def test_rendered_files_are_kernel_style(ext):
    for name, text in render.render(ext).items():
        lines = text.split("\n")
        first = lines[0]
        assert "SPDX-License-Identifier: GPL-2.0" in first, f"{name}: SPDX not on line 1"
        assert first.startswith("// " if name.endswith(".c") else ("# " if name == "Kbuild" else "/* "))
        assert text.endswith("\n") and not text.endswith("\n\n"), name
        assert "\n\n\n" not in text, f"{name}: run of blank lines"
        assert "{{" not in text and "{%" not in text and "{#" not in text, f"{name}: template leftovers"
        for no, line in enumerate(lines, 1):
            assert line == line.rstrip(), f"{name}:{no}: trailing whitespace"
            indent = re.match(r"^[ \t]*", line).group(0)
            # tabs first, then fewer than 8 spaces of alignment (or a comment continuation)
            assert re.fullmatch(r"\t* {0,7}", indent), f"{name}:{no}: indent {indent!r}"
            if indent.startswith(" ") and not name == "Kbuild":
                assert line.lstrip().startswith("*") or line.lstrip().startswith(")"), \
                    f"{name}:{no}: space indentation {line!r}"


def test_compiled_templates_are_shared_but_never_mixed_up(tmp_path):
    """Every extension folder has its own environment; the compiled kit templates
    are shared between them, a folder's own template of the same name is not."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d, word in ((a, "alpha"), (b, "beta")):
        d.mkdir()
        (d / "Kbuild.j2").write_text(f"# {word}\n")
    assert render.environment(a).get_template("Kbuild.j2").render() == "# alpha\n"
    assert render.environment(b).get_template("Kbuild.j2").render() == "# beta\n"
    # a template file that changes is compiled again, by the same cached environment
    # (Jinja's auto_reload: it compares the file's mtime, moved on here so that a
    # rewrite within the filesystem's timestamp granularity still counts)
    env = render.environment(a)
    before = (a / "Kbuild.j2").stat().st_mtime_ns
    (a / "Kbuild.j2").write_text("# gamma, a longer text\n")
    os.utime(a / "Kbuild.j2", ns=(before + 10**10, before + 10**10))
    assert render.environment(a) is env
    assert env.get_template("Kbuild.j2").render() == "# gamma, a longer text\n"
    # the kit's own template, compiled once, renders the same from any folder
    base = render.environment(None).get_template("shared_header.h.j2")
    assert render.environment(a).get_template("shared_header.h.j2").filename == base.filename
