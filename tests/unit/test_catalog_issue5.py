"""Catalog of issue 5: the `custom` option type, the plugin's helpers/fcheck
blocks, and that every catalog definition renders."""

from __future__ import annotations

import pytest

from kmods import render, spec
from ground.errors import SpecError


def _custom(**opt):
    return spec.validate({"kind": "match", "name": "cust", "flags_type": "__u16",
                          "options": [{"name": "pat", "type": "custom", **opt}]})


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
    assert "string_mt_print_string(info, family, save);" in c
    assert ".x6_fcheck\t= string_mt_fcheck," in c
    assert "static void string_mt_fcheck(struct xt_fcheck_call *cb)" in c


def test_no_fcheck_unless_filled():
    c = render.render(spec.load("nth"))["libxt_nth.c"]
    assert "fcheck" not in c


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
