"""Real builds against real Debian 6.1 and 6.12 headers, checked from the outside.

Nothing is loaded: the .ko is inspected with modinfo/nm/objcopy, the plugin is
dlopen()ed by nflab's libxtables probe (no kernel involved).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kmods import build, scaffold, spec
from ground.errors import BuildError
from tests.conftest import KERNEL_LINES, get_kernel
from userspace_ext import plugin
from supply import kernels

pytestmark = pytest.mark.slow

NFPROTO = {"ipv4": 2, "ipv6": 10}


def xt_align(n: int) -> int:
    return (n + 7) // 8 * 8


def modinfo(ko: Path, fld: str) -> str:
    return subprocess.run(["modinfo", "-F", fld, str(ko)], check=True, capture_output=True,
                          text=True).stdout.strip()


def undefined_symbols(ko: Path) -> set:
    out = subprocess.run(["nm", "-u", str(ko)], check=True, capture_output=True, text=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def defined_symbols(ko: Path) -> dict:
    out = subprocess.run(["nm", "--defined-only", str(ko)], check=True, capture_output=True,
                         text=True).stdout
    return {parts[2]: parts[1] for parts in (line.split() for line in out.splitlines()) if len(parts) == 3}


def modinfo_section(ko: Path, tmp_path: Path) -> list:
    dump = tmp_path / f"{ko.stem}.modinfo"
    subprocess.run(["objcopy", "-O", "binary", "--only-section=.modinfo", str(ko), str(dump)],
                   check=True, capture_output=True)
    return [e.decode() for e in dump.read_bytes().split(b"\0") if e]


def check_ko(art, kernel, tmp_path, *, register: str):
    ko = art.ko
    assert ko.is_file() and ko.name == f"{art.module}.ko"
    assert ko.parent == Path(os.environ["NFLAB_BUILD"]) / kernel.release / art.name
    vermagic = modinfo(ko, "vermagic")
    assert vermagic.split()[0] == kernel.release
    assert art.vermagic == vermagic
    assert modinfo(ko, "name") == art.module
    assert modinfo(ko, "license") == "GPL"
    entries = modinfo_section(ko, tmp_path)
    assert "license=GPL" in entries
    assert f"name={art.module}" in entries
    assert any(e.startswith("srcversion=") for e in entries)
    undef = undefined_symbols(ko)
    assert register in undef, sorted(undef)
    assert register.replace("register", "unregister") in undef
    defined = defined_symbols(ko)
    assert "__this_module" in defined
    assert {"init_module", "cleanup_module"} <= set(defined)
    assert not [s for s in defined if s.startswith("__ksymtab")], "module exports symbols"
    return undef


def check_plugin(art, ext, probe_cache, *, kind: str):
    assert art.so is not None and art.so.is_file() and art.so.name == f"libxt_{ext.name}.so"
    regs = plugin.probe(art.so, probe_cache)
    expected = sorted(NFPROTO[f] for f in ext.families)
    if kind == "target":
        # libxtables drops targets of other families at registration ("ignore not
        # interested target") and the probe initialises NFPROTO_IPV4 only
        expected = [f for f in expected if f == NFPROTO["ipv4"]]
    assert sorted(r["family"] for r in regs) == expected
    for r in regs:
        assert (r["kind"], r["name"], r["revision"]) == (kind, ext.name, ext.revision)
        assert r["size"] == xt_align(ext.info_size)
        assert r["options"] == [o.name for o in ext.options]
    return regs


# ---- iprange ------------------------------------------------------------------

@pytest.fixture(scope="session")
def iprange_builds(build_root):
    return {}


def _iprange(kernel, iprange_builds):
    if kernel.release not in iprange_builds:
        iprange_builds[kernel.release] = build.build_extension("iprange", kernel)
    return iprange_builds[kernel.release]


def test_iprange_module(kernel, iprange_builds, tmp_path):
    art = _iprange(kernel, iprange_builds)
    undef = check_ko(art, kernel, tmp_path, register="xt_register_matches")
    assert "nf_register_net_hook" not in undef
    assert modinfo(art.ko, "depends") == "x_tables"
    aliases = modinfo(art.ko, "alias").split()
    assert {"ipt_iprange", "ip6t_iprange"} <= set(aliases)


def test_iprange_plugin_matches_stock_revision_1(kernel, iprange_builds, probe_cache):
    art = _iprange(kernel, iprange_builds)
    ext = spec.load("iprange")
    regs = check_plugin(art, ext, probe_cache, kind="match")
    assert {r["size"] for r in regs} == {72}
    assert {r["userspacesize"] for r in regs} == {72}
    # the stock plugin of the same userland (its build root has the iptables package)
    assert plugin.has_stock_plugin("iprange")
    stock = [r for r in plugin.probe(plugin.stock_plugin("iprange"), probe_cache) if r["revision"] == 1]
    key = lambda r: r["family"]  # noqa: E731
    assert sorted(regs, key=key) == sorted(stock, key=key)


def test_second_build_is_served_from_cache(kernel, iprange_builds):
    first = _iprange(kernel, iprange_builds)
    ko_mtime, so_mtime = first.ko.stat().st_mtime_ns, first.so.stat().st_mtime_ns
    again = build.build_extension("iprange", kernel)
    assert again.rebuilt is False
    assert (again.ko, again.so, again.vermagic, again.srcversion) == (
        first.ko, first.so, first.vermagic, first.srcversion)
    assert first.ko.stat().st_mtime_ns == ko_mtime and first.so.stat().st_mtime_ns == so_mtime


# ---- new-module: one hook, one match, one target --------------------------------

NEW = [
    ("hook", "nfltmphook", dict(hook="LOCAL_IN", priority="-175", family="ipv4"), "nf_register_net_hook"),
    ("match", "nfltmpmatch", dict(family="ipv4"), "xt_register_matches"),
    ("target", "NFLTMPTG", dict(family="ipv4"), "xt_register_targets"),
]


@pytest.mark.parametrize("kind,name,kw,register", NEW, ids=[n[0] for n in NEW])
def test_new_module_builds(kernel, build_root, tmp_catalog, probe_cache, tmp_path, kind, name, kw, register):
    written = scaffold.new_module(kind, name, catalog=tmp_catalog, **kw)
    ext = spec.load_file(written[0])
    art = build.build_extension(ext, kernel)
    assert art.rebuilt is True
    undef = check_ko(art, kernel, tmp_path, register=register)
    if kind == "hook":
        assert art.so is None
        assert not undef & {"xt_register_matches", "xt_register_targets"}
    else:
        assert "nf_register_net_hook" not in undef
        check_plugin(art, ext, probe_cache, kind=kind)


# ---- failures -------------------------------------------------------------------

def _break(template: Path, block: str) -> None:
    text = template.read_text()
    marker = "{% block " + block + " %}\n"
    assert marker in text
    template.write_text(text.replace(marker, marker + "\tint nflab_broken = ;\n", 1))


def test_compile_error_reports_file_line_and_leaves_no_ko(kernel_612, fresh_build, iprange_copy):
    kernel = kernel_612
    ext = spec.load_file(iprange_copy / "ext.toml")
    good = build.build_extension(ext, kernel)            # a good .ko first ...
    assert good.ko.is_file()
    _break(iprange_copy / "xt_iprange.c.j2", "match4")  # ... then a C syntax error
    ext = spec.load_file(iprange_copy / "ext.toml")
    with pytest.raises(BuildError) as info:
        build.build_extension(ext, kernel)
    err = info.value
    assert "xt_iprange" in err.message and kernel.release in err.message
    src = good.dir / "xt_iprange.c"
    m = re.search(rf"^{re.escape(str(src))}:(\d+): error:", err.detail, re.M)
    assert m, err.detail
    line = src.read_text().splitlines()[int(m.group(1)) - 1]
    assert "nflab_broken" in line, line               # file:line points at the broken line
    assert not good.ko.exists(), "a stale .ko survived a failed build"
    assert not (good.dir / ".nflab-build.json").exists()
    with pytest.raises(BuildError):                    # and it stays failed, not "cached"
        build.build_extension(ext, kernel)
    assert not good.ko.exists()


def test_plugin_compile_error_reports_file_line(kernel_612, fresh_build, tmp_catalog):
    written = scaffold.new_module("match", "nflbadplug", catalog=tmp_catalog)
    folder = written[0].parent
    base = (Path(plugin.__file__).parent / "templates" / "libxt.c.j2").read_text()
    (folder / "libxt_nflbadplug.c.j2").write_text(
        base.replace("{% block parse_extra %}{% endblock %}",
                     "{% block parse_extra %}\tnflab_no_such_function(cb);\n{% endblock %}"))
    ext = spec.load_file(written[0])
    with pytest.raises(BuildError) as info:
        build.build_extension(ext, kernel_612)
    so = fresh_build / kernel_612.release / "nflbadplug" / "libxt_nflbadplug.so"
    assert "libxt_nflbadplug.so" in info.value.message
    assert re.search(r"libxt_nflbadplug\.c:\d+: error:.*nflab_no_such_function", info.value.detail)
    assert not so.exists()


# a definition whose generated C names are already the headers' (real clashes):
# IP_TTL is <linux/in.h>'s macro, TCP_ESTABLISHED <net/tcp_states.h>'s enumerator,
# tcp_v4_init() <net/tcp.h>'s function, EXIT_FAILURE glibc's <stdlib.h> macro
CLASHES = [
    ("ip", "--ttl", "IP_TTL", "kernel module xt_ip", r"include/uapi/linux/in\.h:\d+", False),
    ("tcp", "--established", "TCP_ESTABLISHED", "kernel module xt_tcp",
     r"include/net/tcp_states\.h:\d+", True),     # ipt_tcp: the stock xt_tcpudp serves it
    ("exit", "--failure", "EXIT_FAILURE", "iptables plugin libxt_exit.so", "a header it includes", False),
]


def _match_with_option(catalog: Path, name: str, option: str, stock: bool) -> spec.Extension:
    folder = catalog / name
    folder.mkdir()
    (folder / "ext.toml").write_text(
        f'kind = "match"\nname = "{name}"\nsummary = "a clash"\nfamilies = ["ipv4"]\n'
        f"overrides_in_tree = {str(stock).lower()}\n\n[[options]]\n"
        f'name = "{option[2:]}"\ntype = "flag"\nhelp = "clashes"\n')
    return spec.load_file(folder / "ext.toml")


@pytest.mark.parametrize("name, option, cname, what, where, stock", CLASHES, ids=[c[2] for c in CLASHES])
def test_a_generated_name_the_headers_have_is_named(kernel_612, fresh_build, tmp_catalog,
                                                    name, option, cname, what, where, stock):
    """gcc says "expected identifier before numeric constant" at <linux/in.h>; the
    kit says which option made which name, where the headers have it, and the fix."""
    ext = _match_with_option(tmp_catalog, name, option, stock)
    with pytest.raises(BuildError) as info:
        build.build_extension(ext, kernel_612)
    err = info.value
    assert re.search(rf"^{re.escape(what)} failed to build( for {re.escape(kernel_612.release)})?: "
                     rf"{option} generates the C name "
                     rf"{cname}, which {where} already uses$", err.message), err.message
    assert "`field`" in err.hint, err.hint


def test_a_hook_name_the_headers_have_is_named(kernel_612, fresh_build, tmp_catalog):
    """A hook module named tcp_v4 defines tcp_v4_init(), which <net/tcp.h> declares."""
    ext = spec.load_file(scaffold.new_module("hook", "tcp_v4", catalog=tmp_catalog)[0])
    with pytest.raises(BuildError) as info:
        build.build_extension(ext, kernel_612)
    assert re.search(r"the name 'tcp_v4' generates the C name tcp_v4_\w+, which "
                     r"include/net/tcp\.h:\d+ already uses$", info.value.message), info.value.message
    assert "another name for the extension" in info.value.hint


# ---- API drift guard: every template on every cached kernel ----------------------

def _drift_definitions(catalog: Path) -> list:
    exts = [spec.load(n) for n in spec.catalog_names(include_hidden=True)]
    for kind, name, kw in (
        ("hook", "nfldrifthook", dict(hook="POST_ROUTING", priority="100", family="ipv6")),
        ("hook", "nfldriftingr", dict(hook="INGRESS", priority="-500", family="netdev")),
        ("match", "nfldriftmatch", dict(family="ipv6")),
        ("target", "NFLDRIFTTG", dict(family="ipv4")),
    ):
        exts.append(spec.load_file(scaffold.new_module(kind, name, catalog=catalog, **kw)[0]))
    return exts


def test_every_template_compiles_on_every_cached_kernel(tmp_catalog, fresh_build, probe_cache):
    """Guards the compat header: a kernel bump that breaks any template fails here."""
    wanted = {get_kernel(line).release for line in KERNEL_LINES}   # fetched when missing
    # a damaged entry is doctor's and fetch's business (both name it); build against the whole
    cached = [k for k in kernels.cached_kernels() if kernels.check_entry(Path(k.root).parent) is None]
    assert wanted <= {k.release for k in cached}
    failures = []
    for kern in cached:
        for ext in _drift_definitions(tmp_catalog / kern.release):
            try:
                art = build.build_extension(ext, kern)
            except BuildError as exc:
                failures.append(f"{ext.name} on {kern.release}: {exc}\n{exc.detail}")
                continue
            assert modinfo(art.ko, "vermagic").split()[0] == kern.release
            if art.so:
                assert plugin.probe(art.so, probe_cache)
    assert not failures, "\n".join(failures)


def test_invoke_test_of_a_broken_extension_prints_the_compiler_error(kernel_612, fresh_build, tmp_catalog):
    """Every build fails: `invoke test` names the compiler's first error (it once
    said only "no suites found", and the error was lost)."""
    from tests.conftest import run_invoke
    written = scaffold.new_module("match", "nflabbroken", catalog=tmp_catalog)
    tpl = next(p for p in written if p.name.endswith(".c.j2"))
    tpl.write_text(tpl.read_text().replace("info->min_len", "info->nflab_no_such_field"))
    res = run_invoke(["test", "--name=nflabbroken", f"--kernel={kernel_612.release}",
                      f"--extensions-dir={tmp_catalog}", "--quiet"],
                     env_extra={"NFLAB_BUILD": str(fresh_build)})
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "no suites found" not in out, out
    assert re.search(r"xt_nflabbroken\.c:\d+: error: .*nflab_no_such_field", out), out
