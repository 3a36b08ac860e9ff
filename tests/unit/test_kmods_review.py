"""Review mend of kmods/: the build stamp's inputs, locked builds, and what the spec
refuses (iptables' own option names, stock xtables names, an int ingress_dev, names
that collide with the kernel's C symbols or uapi macros, lists where a word is due)."""

from __future__ import annotations

import copy
import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from ground import files
from ground.errors import SpecError
from kmods import build, probes, scaffold, spec
from tests.conftest import HOOK_RAW, MATCH_RAW, TARGET_RAW

REPO = Path(__file__).resolve().parents[2]
DEFINITIONS = sorted((REPO / "kmods" / "catalog").glob("*/ext.toml")) + \
    sorted((REPO / "kmods" / "workshop").rglob("ext.toml"))


# ---- 1, 2: build.py --------------------------------------------------------------------

@dataclasses.dataclass
class FakeKernel:
    release: str
    headers: str
    modules: str
    packages: dict
    compiler: str = "gcc-14"


@pytest.fixture
def fake_kernel(tmp_path, monkeypatch):
    headers = tmp_path / "headers"
    (headers / "include" / "generated").mkdir(parents=True)
    (headers / "include" / "generated" / "autoconf.h").write_text("#define CONFIG_X 1\n")
    (headers / "Module.symvers").write_text("0x1\tsym\tvmlinux\tEXPORT_SYMBOL\t\n")
    moddir = tmp_path / "modules"
    moddir.mkdir()
    monkeypatch.setattr(probes, "compiler_id", lambda k: f"trixie:{k.compiler}")
    return FakeKernel("7.0.0-1-cloud-amd64", str(headers), str(moddir),
                      {"linux-headers-7.0.0-1-cloud-amd64": "7.0~rc1-1"})


def _tree(tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "xt_x.c").write_text("int x;\n")
    (out / "Kbuild").write_text("obj-m += xt_x.o\n")
    return out


def test_stamp_covers_packages_compiler_and_generated_headers(tmp_path, fake_kernel):
    """A refetched kernel of the same release (the next rc), another compiler, or other
    generated headers make the stamp stale."""
    out = _tree(tmp_path)
    base = build._inputs_hash(out, fake_kernel)
    rc2 = dataclasses.replace(fake_kernel, packages={n: "7.0~rc2-1" for n in fake_kernel.packages})
    assert build._inputs_hash(out, rc2) != base
    assert build._inputs_hash(out, dataclasses.replace(fake_kernel, compiler="gcc-15")) != base
    for rel in build.HEADER_INPUTS:
        path = Path(fake_kernel.headers) / rel
        old = path.read_text()
        path.write_text(old + "/* changed */\n")
        assert build._inputs_hash(out, fake_kernel) != base, rel
        path.write_text(old)
    assert build._inputs_hash(out, fake_kernel) == base


def test_writes_use_the_writers_own_temp_name(tmp_path, monkeypatch):
    """Two writers never share one temp file (the old X.tmp was the same for all);
    an unchanged file is left alone (its mtime is what make compares)."""
    names = []
    real = files.os.replace
    monkeypatch.setattr(files.os, "replace", lambda a, b: (names.append(Path(a).name), real(a, b)))
    assert files.write_if_changed(tmp_path / "a.c", "x\n")
    assert names and str(files.os.getpid()) in names[0] and str(files.threading.get_ident()) in names[0]
    assert not files.write_if_changed(tmp_path / "a.c", "x\n") and len(names) == 1
    assert [f.name for f in tmp_path.iterdir()] == ["a.c"]


def test_build_holds_the_tree_lock_from_render_to_stamp(tmp_path, monkeypatch, fake_kernel):
    """Rendering, Kbuild and the stamp all happen under build/<release>/.<name>.lock."""
    monkeypatch.setenv("NFLAB_BUILD", str(tmp_path / "build"))
    held, seen = [], []

    class Lock:
        def __init__(self, path):
            self.path = path

        def __enter__(self):
            held.append(self.path)

        def __exit__(self, *exc):
            held.pop()

    def step(name, result=None):
        def run(*args, **kwargs):
            seen.append((name, list(held)))
            return result
        return run

    monkeypatch.setattr(build, "file_lock", Lock, raising=False)
    def render(ext, out):
        out.mkdir(parents=True)
        return step("render", True)()

    monkeypatch.setattr(build, "render_into", render)
    monkeypatch.setattr(build.probes, "prepare", step("probes", False))
    monkeypatch.setattr(build, "_make", step("kbuild"))
    monkeypatch.setattr(build, "module_info", lambda ko: {
        "vermagic": f"{fake_kernel.release} SMP mod_unload", "srcversion": "X", "depends": ""})
    monkeypatch.setattr(build, "atomic_write", step("stamp"))
    build.build_extension(spec.validate(copy.deepcopy(MATCH_RAW)), fake_kernel, with_plugin=False)
    lock = tmp_path / "build" / fake_kernel.release / ".nfltest.lock"
    assert seen == [(step_name, [lock]) for step_name in ("render", "probes", "kbuild", "stamp")], seen
    assert held == []


# ---- 3: iptables' own options -------------------------------------------------------------

@pytest.mark.parametrize("name", ["dst", "src", "source", "destination", "protocol", "match",
                                  "jump", "goto", "in-interface", "out-interface", "fragment",
                                  "fragments", "table", "wait", "verbose", "numeric", "exact",
                                  "line-numbers", "modprobe", "set-counters", "ipv4", "ipv6",
                                  "append", "policy", "new-chain", "help"])
def test_option_named_like_an_iptables_option_is_refused(name):
    raw = copy.deepcopy(MATCH_RAW)
    raw["options"] = [{"name": name, "type": "uint8"}]
    with pytest.raises(SpecError, match=f"--{name} is an option of iptables itself") as exc:
        spec.validate(raw)
    assert exc.value.hint.startswith("valid")


def test_iptables_option_refusal_suggests_a_name():
    raw = copy.deepcopy(MATCH_RAW)
    raw["options"] = [{"name": "dst", "type": "host"}]
    with pytest.raises(SpecError) as exc:
        spec.validate(raw)
    assert "dst-addr" in exc.value.hint


# ---- 4: xtables names the stock kernel serves ----------------------------------------------

@pytest.mark.parametrize("kind,name,families", [
    ("target", "TTL", ["ipv4"]), ("match", "ttl", ["ipv4"]), ("target", "REJECT", ["ipv4", "ipv6"]),
    ("match", "udp", ["ipv4", "ipv6"]), ("target", "ECN", ["ipv4"]), ("match", "eui64", ["ipv6"])])
def test_stock_xtables_name_needs_overrides_in_tree(kind, name, families):
    raw = {"kind": kind, "name": name, "families": families}
    with pytest.raises(SpecError, match="already serves"):
        spec.validate(copy.deepcopy(raw))
    assert spec.validate({**raw, "overrides_in_tree": True}).overrides_in_tree


def test_xtables_name_of_another_family_is_not_a_collision():
    assert spec.validate({"kind": "target", "name": "TTL", "families": ["ipv6"]}).name == "TTL"
    assert spec.validate({"kind": "match", "name": "frag", "families": ["ipv4"]}).name == "frag"


def test_known_kernel_aliases_are_checked(tmp_path):
    raw = {"kind": "match", "name": "nflnew", "families": ["ipv4"]}
    spec.validate(copy.deepcopy(raw))
    with pytest.raises(SpecError, match=r"ipt_nflnew"):
        spec.validate(copy.deepcopy(raw), kernel_modules={"ipt_nflnew"})


def test_stock_names_read_the_kernels_module_lists(tmp_path, fake_kernel):
    moddir = Path(fake_kernel.modules)
    (moddir / "modules.alias").write_text("alias ipt_TTL xt_HL\nalias ipt_udp xt_tcpudp\n")
    (moddir / "modules.order").write_text("kernel/net/ipv4/netfilter/ipt_REJECT.ko\n")
    (moddir / "modules.builtin").write_text("kernel/net/netfilter/xt_tcpudp.ko\n")
    (moddir / "modules.builtin.modinfo").write_bytes(b"xt_mark.alias=ipt_mark\0xt_mark.license=GPL\0")
    assert {"ipt_TTL", "ipt_udp", "ipt_REJECT", "xt_tcpudp", "ipt_mark"} <= build.stock_names(fake_kernel)


def test_build_checks_the_kernels_own_names(tmp_path, monkeypatch, fake_kernel):
    """At build time the kernel is known: its modules.alias decides."""
    (Path(fake_kernel.modules) / "modules.alias").write_text("alias ipt_nfltest xt_other\n")
    monkeypatch.setenv("NFLAB_BUILD", str(tmp_path / "build"))
    monkeypatch.setattr(build, "render_into", lambda *a: pytest.fail("built a colliding name"))
    with pytest.raises(SpecError, match="ipt_nfltest"):
        build.build_extension(spec.validate(copy.deepcopy(MATCH_RAW)), fake_kernel)


@pytest.mark.parametrize("path", DEFINITIONS, ids=lambda p: p.parent.name)
def test_catalog_definitions_still_validate(path):
    spec.load_file(path)


# ---- 5: ingress_dev ----------------------------------------------------------------------------

def _netdev_hook(**param):
    raw = copy.deepcopy(HOOK_RAW)
    raw["families"] = ["netdev"]
    raw["hooks"] = [{"family": "netdev", "hook": "INGRESS", "priority": 0}]
    raw["params"] = [{"name": "ingress_dev", **param}]
    return raw


def test_int_ingress_dev_on_a_netdev_hook_is_refused():
    with pytest.raises(SpecError, match="ingress_dev"):
        spec.validate(_netdev_hook(type="int", default=2))
    assert spec.validate(_netdev_hook(type="charp", default="eth1")).params


# ---- 6: names that collide with the kernel's ----------------------------------------------------

@pytest.mark.parametrize("name", ["nf", "xt", "net", "dev", "sock", "skb", "nf_foo", "nflab_x"])
def test_hook_named_like_a_kernel_namespace_is_refused(name):
    raw = copy.deepcopy(HOOK_RAW)
    raw["name"] = name
    with pytest.raises(SpecError, match=f"{name}_hook"):
        spec.validate(raw)


@pytest.mark.parametrize("fld", ["s6_addr", "s6_addr16", "s6_addr32", "errno", "sin_zero"])
def test_uapi_macro_names_are_refused_as_fields(fld):
    raw = copy.deepcopy(MATCH_RAW)
    raw["options"] = [{"name": fld.replace("_", "-"), "type": "uint8"}]
    with pytest.raises(SpecError, match="reserved"):
        spec.validate(raw)


def test_catalog_hooks_keep_their_symbols():
    """Refusing (not prefixing) keeps every catalog hook's symbols and /proc name."""
    for name in ("pktcount", "pktlog", "portdrop", "rh0drop", "tracer", "faulty"):
        ext = spec.load(name)
        assert (ext.prefix, ext.module) == (name, f"nflab_{name}")


# ---- 7: a list or table where a word is due ---------------------------------------------------

def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _leaves(value, path + (key,))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _leaves(value, path + (i,))
    else:
        yield path, obj


def _replaced(raw, path, value):
    raw = copy.deepcopy(raw)
    obj = raw
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value
    return raw


# [test] is the one free-form table: values for the extension's own suite, which the
# spec keeps as they are (ext.test); every other leaf is a value the spec checks.
FREE_FORM = ("test",)


def _checked_leaves(raw):
    return [(where, value) for where, value in _leaves(raw) if where[0] not in FREE_FORM]


def test_the_free_form_exclusion_is_only_the_test_table():
    """Nothing but [test] is left out below, and [test] really is passed through."""
    skipped = {where[0] for path in DEFINITIONS
               for where, _ in _leaves(tomllib.loads(path.read_text())) if where[0] in FREE_FORM}
    assert FREE_FORM == ("test",) and skipped == {"test"}
    ext = spec.validate({**MATCH_RAW, "test": {"a": [1, {"b": "c"}]}})
    assert ext.test == {"a": [1, {"b": "c"}]}


@pytest.mark.parametrize("path", DEFINITIONS, ids=lambda p: p.parent.name)
def test_a_list_or_table_for_any_value_is_a_spec_error(path):
    raw = tomllib.loads(path.read_text())
    spec.validate(copy.deepcopy(raw), path)     # the definition itself is valid
    leaves = _checked_leaves(raw)
    assert leaves
    for where, value in leaves:
        for wrong in ([value], {"k": value}):
            with pytest.raises(SpecError):
                spec.validate(_replaced(raw, where, wrong), path)
                pytest.fail(f"{path}: {'.'.join(map(str, where))} = {wrong!r} was accepted")


@pytest.mark.parametrize("raw", [MATCH_RAW, HOOK_RAW, TARGET_RAW], ids=["match", "hook", "target"])
@pytest.mark.parametrize("key", ["catalog_only", "overrides_in_tree"])
@pytest.mark.parametrize("given", ["no", "false", "true", 0, 1, [False], {"k": False}])
def test_a_boolean_key_must_be_true_or_false(raw, key, given):
    """A word or list read as a boolean would be true ("no" is truthy): refused."""
    with pytest.raises(SpecError, match=rf"{key}: {re.escape(repr(given))} is not a boolean") as err:
        spec.validate({**copy.deepcopy(raw), key: given})
    assert "true or false" in str(err.value)


@pytest.mark.parametrize("key", ["invert", "mandatory"])
@pytest.mark.parametrize("given", ["no", 0, [False], {"k": False}])
def test_an_option_boolean_must_be_true_or_false(key, given):
    raw = {**MATCH_RAW, "options": [{"name": "x", "type": "uint8", key: given}]}
    with pytest.raises(SpecError, match=rf"option --x: {key}: {re.escape(repr(given))} is not a boolean"):
        spec.validate(copy.deepcopy(raw))


@pytest.mark.parametrize("key,given,field", [
    ("info_name", False, "info_name"), ("info_name", 0, "info_name"),
    ("test", "x", "test"), ("test", [], "test"), ("hooks", False, "hooks"), ("hooks", [], "hooks")])
def test_falsy_values_are_not_read_as_absent(key, given, field):
    with pytest.raises(SpecError, match=field):
        spec.validate({**copy.deepcopy(MATCH_RAW), key: given})


def test_a_catalog_only_word_is_listed_so_loading_it_names_the_error(tmp_path, monkeypatch):
    folder = tmp_path / "zzword"
    folder.mkdir()
    (folder / "ext.toml").write_text('kind = "match"\nname = "zzword"\ncatalog_only = "no"\n')
    monkeypatch.setenv(spec.EXTRA_CATALOG_ENV, str(tmp_path))
    assert "zzword" in spec.catalog_names()
    with pytest.raises(SpecError, match=r"catalog_only: 'no' is not a boolean"):
        spec.load("zzword")


@pytest.mark.parametrize("raw,field", [
    ({**MATCH_RAW, "options": [{"name": "x", "type": ["flag"]}]}, "type"),
    ({**MATCH_RAW, "private": [{"name": "n", "type": ["u32"]}]}, "private"),
    ({**HOOK_RAW, "events": [{"name": "p", "type": "u8", "source": ["l4proto"]}]}, "source")])
def test_list_for_a_word_names_the_field(raw, field):
    with pytest.raises(SpecError, match=field):
        spec.validate(copy.deepcopy(raw))


# ---- 8: the scaffolded hook suite ---------------------------------------------------------------

@pytest.mark.parametrize("family,hook", [("ipv4", "PRE_ROUTING"), ("ipv6", "FORWARD"),
                                         ("ipv4", "LOCAL_IN"), ("netdev", "INGRESS")])
def test_starter_hook_suite_counts_exactly(family, hook):
    text = scaffold.definition_text("hook", "zzhook", hook, 0, family)
    ext = spec.validate(tomllib.loads(text))
    suite = scaffold.suite_text(ext)
    compile(suite, "test_zzhook.py", "exec")
    assert "> before[point]" not in suite
    assert "nflabstray" in suite and f'HOOK = "{hook}"' in suite
