"""Catalog of issue 5: the `custom` option type, the plugin's helpers/fcheck
blocks, and that every catalog definition renders."""

from __future__ import annotations

import re

import pytest

from kmods import render, spec
from ground.errors import SpecError


PLUGIN = """{% extends "libxt.c.j2" %}
{% block helpers %}
static void cust_mt_parse_pat(struct xt_option_call *cb, struct xt_cust_mtinfo *info, uint8_t family)
{
}

static void cust_mt_print_pat(const struct xt_cust_mtinfo *info, uint8_t family, bool save)
{
}
{% endblock %}
"""
RAW = {"kind": "match", "name": "cust", "flags_type": "__u16"}


@pytest.fixture(autouse=True)
def cust_dir(tmp_path, monkeypatch):
    """cust/ with a plugin template defining the custom option's functions."""
    (tmp_path / "cust").mkdir()
    (tmp_path / "cust" / "libxt_cust.c.j2").write_text(PLUGIN)
    monkeypatch.setitem(_HOME, "dir", tmp_path / "cust")
    return tmp_path / "cust"


_HOME = {}


def _custom(**opt):
    return spec.validate({**RAW, "options": [{"name": "pat", "type": "custom", **opt}]},
                         _HOME["dir"] / "ext.toml")


@pytest.mark.parametrize("plugin,missing", [
    (None, "libxt_cust.c.j2 beside ext.toml does not define cust_mt_parse_pat(), cust_mt_print_pat()"),
    ("", "does not define cust_mt_parse_pat(), cust_mt_print_pat()"),
    (PLUGIN.replace("cust_mt_print_pat", "cust_mt_print_pattern"), "does not define cust_mt_print_pat()"),
])
def test_custom_option_without_its_plugin_functions_is_refused(cust_dir, plugin, missing):
    """A custom option whose plugin template lacks its parse/print functions was
    accepted and then failed to compile (the property test's seed found it)."""
    raw = {**RAW, "options": [{"name": "pat", "type": "custom", "length": 8}]}
    if plugin is None:
        with pytest.raises(SpecError, match=re.escape(missing)) as info:
            spec.validate(raw)
    else:
        (cust_dir / "libxt_cust.c.j2").write_text(plugin)
        with pytest.raises(SpecError, match=re.escape(missing)) as info:
            spec.validate(raw, cust_dir / "ext.toml")
    assert info.value.hint.startswith("valid: a libxt_cust.c.j2 (extends libxt.c.j2)")


def test_custom_option_printed_by_the_dump_block_needs_no_print_function(cust_dir):
    """string and time print stock's exact text from their own dump block."""
    dump = '\n{% block dump %}\n\tprintf(" pat");\n{% endblock %}\n'
    (cust_dir / "libxt_cust.c.j2").write_text(PLUGIN.replace("cust_mt_print_pat", "unused") + dump)
    assert [o.name for o in _custom(length=8).options] == ["pat"]
    (cust_dir / "libxt_cust.c.j2").write_text(PLUGIN.replace("cust_mt_parse_pat", "unused") + dump)
    with pytest.raises(SpecError, match=re.escape("does not define cust_mt_parse_pat()")):
        _custom(length=8)


def test_custom_with_length_owns_a_counted_buffer():
    ext = _custom(length=64)
    names = [(m.ctype, m.name, m.array) for m in ext.members]
    assert names[:2] == [("char", "pat", 64), ("__u8", "pat_len", 0)]
    assert ext.info_size == 68          # 64 + 1, padded to the __u16 flags, + 2


def test_custom_without_length_has_no_member():
    ext = _custom()
    assert [m.name for m in ext.members] == ["flags"]


@pytest.mark.parametrize("length", [1, 256, "8", True])
def test_custom_length_bounds(length):
    with pytest.raises(SpecError):
        _custom(length=length)


def test_custom_plugin_calls_extension_functions():
    files = render.render(spec.load("string"))
    c = files["libxt_string.c"]
    assert "string_mt_parse_hex_string(cb, info, family);" in c
    assert ".x6_fcheck\t= string_mt_fcheck," in c
    assert "static void string_mt_fcheck(struct xt_fcheck_call *cb)" in c
    # the generic dump calls a custom option's print function ...
    assert "geoip_mt_print_src_cc(info, family, save);" in render.render(spec.load("geoip"))["libxt_geoip.c"]


def test_plugin_dump_and_print_name_blocks():
    """... unless the extension replaces the dump (string prints stock
    libxt_string's text: no match name in -L, its own field order)."""
    c = render.render(spec.load("string"))["libxt_string.c"]
    assert "string_mt_print_pattern(info, hex);" in c
    assert "string_mt_print_string" not in c
    assert 'printf(" %s", "string");' not in c
    assert "#include <ctype.h>" in c
    assert 'printf(" %s", "geoip");' in render.render(spec.load("geoip"))["libxt_geoip.c"]


def test_no_fcheck_unless_filled():
    c = render.render(spec.load("quota"))["libxt_quota.c"]
    assert "fcheck" not in c
    c = render.render(spec.load("nth"))["libxt_nth.c"]
    assert "static void nth_mt_fcheck(struct xt_fcheck_call *cb)" in c and ".x6_fcheck\t= nth_mt_fcheck," in c


@pytest.mark.parametrize("name", spec.catalog_names(include_hidden=True))
def test_catalog_renders(name):
    files = render.render(spec.load(name))
    assert all(text.endswith("\n") for text in files.values())


@pytest.mark.parametrize("member,ctype", [("uint8", "__u8"), ("uint32", "__u32"), ("uint64", "__aligned_u64")])
def test_custom_with_integer_member(member, ctype):
    ext = _custom(member=member)
    assert (ext.members[0].ctype, ext.members[0].name) == (ctype, "pat")


@pytest.mark.parametrize("extra", [{"member": "int"}, {"member": "uint32", "length": 8}])
def test_custom_member_refused(extra):
    with pytest.raises(SpecError):
        _custom(**extra)


def test_string_checkentry_compares_the_offsets_the_match_uses():
    """The plugin refuses --from beyond --to, but a raw setsockopt or nft_compat
    caller can leave a flag clear: checkentry compares the values the match reads
    (info->from as it is, --to through string_to_value()), as in-tree xt_string
    compares from_offset and to_offset whatever was given."""
    c = render.render(spec.load("string"))["xt_string.c"]
    check = c[c.index("static int string_mt_check_options("):]
    assert "\tunsigned int to = string_to_value(info);\n" in check
    assert "\tif (info->from > to) {\n" in check
    assert "STRING_FROM && info->flags & STRING_TO" not in check
