"""`new-module` scaffolding: validates everything first, writes a definition that loads."""

from __future__ import annotations

import tomllib

import pytest

from kmods import render, scaffold, spec
from ground.errors import SpecError
from nflab import rules_t


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("kind,name,hook,priority,family", [
    ("hook", "myhook", "PRE_ROUTING", "-175", "ipv4"),
    ("hook", "v6hook", "local_out", "300", "ipv6"),
    ("hook", "ingr", "INGRESS", "-500", "netdev"),
    ("match", "minlen", "PRE_ROUTING", "-175", "ipv4"),
    ("match", "sixonly", "PRE_ROUTING", "-175", "ipv6"),
    ("target", "SETMARK", "PRE_ROUTING", "-175", "ipv4"),
])
def test_new_module_writes_a_loadable_definition(tmp_catalog, kind, name, hook, priority, family):
    written = scaffold.new_module(kind, name, hook, priority, family, catalog=tmp_catalog)
    folder = tmp_catalog / name
    assert [p.parent for p in written] == [folder] * len(written)
    ext = spec.load_file(folder / "ext.toml")
    assert (ext.kind, ext.name) == (kind, name)
    assert written[1].name == f"{ext.module}.c.j2"
    if kind == "hook":
        assert [(h.family, h.hook, h.priority) for h in ext.hooks] == [
            (family, hook.upper(), int(priority))]
        assert isinstance(tomllib.loads(written[0].read_text())["hooks"][0]["priority"], int)
    else:
        assert ext.families == (["ipv4", "ipv6"] if family == "ipv4" else [family])
        assert len(ext.options) == 1
    files = render.render(ext)                       # the starter template renders
    assert f"{ext.module}.c" in files
    extra = [f"{name}/{ext.plugin}.t"] if kind != "hook" else []
    assert _tree(tmp_catalog) == sorted([name, f"{name}/ext.toml", f"{name}/{ext.module}.c.j2",
                                         f"{name}/test_{name}.py", *extra])
    suite = (folder / f"test_{name}.py").read_text()
    compile(suite, "suite", "exec")
    assert '@pytest.mark.xfail(strict=True, reason="placeholder: replace it' in suite
    assert "send_tagged(wire" in suite
    if kind != "hook":
        assert rules_t.parse((folder / f"{ext.plugin}.t").read_text())


def test_kit_catalog_suites_go_to_tests_suites(tmp_path, monkeypatch):
    """`invoke new-module --kind=match --name=myport` then `invoke test --name=myport`
    found no suite: the scaffold now writes tests/suites/test_myport.py and the .t file."""
    from nflab import suites
    monkeypatch.setattr(spec, "CATALOG", tmp_path / "catalog")
    monkeypatch.setattr(scaffold, "SUITES", tmp_path / "suites")
    monkeypatch.setattr(suites, "SUITES", tmp_path / "suites")
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "test_rules_t.py").write_text("")
    written = scaffold.new_module("match", "myport")
    assert tmp_path / "suites" / "test_myport.py" in written
    assert suites.suite_files(["myport"]) == [tmp_path / "suites" / "test_myport.py",
                                              tmp_path / "suites" / "test_rules_t.py"]
    with pytest.raises(SpecError, match="already exists"):
        scaffold.new_module("match", "myport")


@pytest.mark.parametrize("args,field", [
    (("hook", "../x", "PRE_ROUTING", "-175", "ipv4"), "--name"),
    (("hook", "a/b", "PRE_ROUTING", "-175", "ipv4"), "--name"),
    (("hook", "x;rm", "PRE_ROUTING", "-175", "ipv4"), "--name"),
    (("hook", "a" * 40, "PRE_ROUTING", "-175", "ipv4"), "--name"),
    (("hook", "myhook", "PREROUTING", "-175", "ipv4"), "--hook"),
    (("hook", "myhook", "INGRESS", "-175", "ipv4"), "--hook"),
    (("hook", "myhook", "PRE_ROUTING", "abc", "ipv4"), "--priority"),
    (("hook", "myhook", "PRE_ROUTING", "1.5", "ipv4"), "--priority"),
    (("hook", "myhook", "PRE_ROUTING", str(2**31), "ipv4"), "--priority"),
    (("hook", "myhook", "PRE_ROUTING", "-175", "ipx"), "--family"),
    (("match", "minlen", "PRE_ROUTING", "-175", "netdev"), "--family"),
    (("module", "myhook", "PRE_ROUTING", "-175", "ipv4"), "--kind"),
    (("match", "mark", "PRE_ROUTING", "-175", "ipv4"), "name"),       # in-tree xt_mark
    (("match", "MinLen", "PRE_ROUTING", "-175", "ipv4"), "name"),
])
def test_new_module_bad_input_writes_nothing(tmp_catalog, args, field):
    with pytest.raises(SpecError) as info:
        scaffold.new_module(*args, catalog=tmp_catalog)
    assert field in info.value.message
    assert info.value.hint and info.value.hint.startswith("valid")
    assert _tree(tmp_catalog) == []


def test_new_module_refuses_existing_folder(tmp_catalog):
    scaffold.new_module("match", "minlen", catalog=tmp_catalog)
    before = {p: p.read_bytes() for p in (tmp_catalog / "minlen").iterdir()}
    with pytest.raises(SpecError, match="already exists"):
        scaffold.new_module("match", "minlen", catalog=tmp_catalog)
    assert {p: p.read_bytes() for p in (tmp_catalog / "minlen").iterdir()} == before


def test_new_module_name_with_newline_is_spec_error(tmp_catalog):
    with pytest.raises(SpecError):
        scaffold.new_module("match", "minlen\n", catalog=tmp_catalog)
    assert _tree(tmp_catalog) == []
