"""Custom kernels from Debian's linux-source: specs, fragments, cache keys, dropped
options (pure parts; the real Kconfig runs are in tests/integration/test_source_kernels.py)."""

from __future__ import annotations

import json
import shutil

import pytest

from nflab import doctor, doctor_kit, matrix
from ground.errors import KernelError
from supply import kernels
from supply import source_kernels as sk


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    return tmp_path


def test_hashes_ignore_comments_and_blank_lines_but_not_values():
    a = "CONFIG_KASAN=y\nCONFIG_DEBUG_LIST=y\n"
    assert sk.fragment_hash(a) == sk.fragment_hash("# mine\n\n" + a + "\n# end\n")
    assert sk.fragment_hash(a) != sk.fragment_hash(a.replace("DEBUG_LIST=y", "DEBUG_LIST=n"))
    base = sk.BASE_FRAGMENT.read_text()
    k = sk.cache_key("6.12.117-1~deb12u1", base, a)
    assert len(k) == 8 and int(k, 16) >= 0
    # the key moves with the source version, the kit's base fragment and the user's fragment
    assert k != sk.cache_key("6.12.117-2~deb12u1", base, a)
    assert k != sk.cache_key("6.12.117-1~deb12u1", base + "CONFIG_VETH=y\n", a)
    assert k != sk.cache_key("6.12.117-1~deb12u1", base, a + "CONFIG_KMEMLEAK=y\n")
    assert k == sk.cache_key("6.12.117-1~deb12u1", base, "# x\n" + a)


def test_spec_forms():
    assert sk.parse_spec("source:6.12") == sk.SourceSpec("6.12")
    dbg = sk.parse_spec("source:6.1+debug")
    assert dbg.line == "6.1" and "CONFIG_KASAN=y" in dbg.fragment and dbg.canonical == "source:6.1+debug"
    for spec in ("source:6.12", "source:6.12+debug", "6.12.117-nflab-0123abcd"):
        assert sk.is_source_spec(spec) and kernels.source_kernels.is_source_spec(spec)
    for spec in ("6.12", "6.1.0-56", "6.12.117+deb12-cloud-amd64", None, ""):
        assert not sk.is_source_spec(spec)


def test_a_fragment_file_is_named_by_its_hash(tmp_path):
    frag = tmp_path / "nl.config"
    frag.write_text("CONFIG_NETFILTER_NETLINK_HOOK=y\n")
    s = sk.parse_spec(f"source:6.1+{frag}")
    assert s.fragment == frag.read_text() and s.canonical == f"source:6.1+{sk.fragment_hash(frag.read_text())}"
    assert sk.with_fragment_file("source:6.1", str(frag)) == f"source:6.1+{frag.resolve()}"


@pytest.mark.parametrize("spec,words", [
    ("source:6.12+nosuchname", "ships no fragment 'nosuchname'"),
    ("source:6.12+base", "ships no fragment 'base'"),
    ("source:6.12+/nonexistent/x.config", "does not exist"),
    ("source:6.12+deadbeef", "no fragment with hash deadbeef"),
    ("source:", "invalid custom kernel spec"),
    ("source:6.12+", "invalid custom kernel spec"),
])
def test_bad_source_specs_say_what_is_wrong(cache, spec, words):
    with pytest.raises(KernelError) as info:
        sk.parse_spec(spec)
    assert words in info.value.message and info.value.hint


def test_a_line_without_linux_source_is_refused_with_the_lines_that_have_one():
    with pytest.raises(KernelError) as info:
        sk.plan("source:4.19")
    assert "no linux-source-4.19" in info.value.message
    assert "6.12" in info.value.hint and "7.3" in info.value.hint


def test_config_fragment_needs_a_bare_source_spec():
    with pytest.raises(KernelError, match="needs a kernel built from source"):
        sk.with_fragment_file("6.12", "x.config")
    with pytest.raises(KernelError, match="already names a fragment"):
        sk.with_fragment_file("source:6.12+debug", "x.config")
    assert sk.with_fragment_file("6.12", None) == "6.12"


def test_an_uncached_release_is_refused_with_the_way_to_build_it(cache):
    with pytest.raises(KernelError, match="not in the cache") as info:
        kernels.get("6.12.117-nflab-0123abcd", fetch_missing=False)
    assert "source:6.12" in info.value.hint
    with pytest.raises(KernelError, match="not in the cache"):
        matrix.resolve_kernels("6.12.117-nflab-0123abcd")


def test_matrix_accepts_source_specs_without_building_them(cache):
    assert matrix.resolve_kernels("6.1,source:6.12+debug") == ["6.1", "source:6.12+debug"]
    with pytest.raises(KernelError):
        matrix.resolve_kernels("source:6.12+nosuchname")


def test_dropped_options_name_the_value_and_dependencies():
    requested = {"CONFIG_A": "y", "CONFIG_B": "m", "CONFIG_C": "n", "CONFIG_D": "y", "CONFIG_E": '"x"',
                 "CONFIG_F": "m", "CONFIG_NOPE": "y"}
    final = {"CONFIG_A": "y", "CONFIG_B": "y", "CONFIG_C": "n", "CONFIG_D": "m", "CONFIG_E": '"y"'}
    symbols = {"A": [], "B": [], "C": [], "D": ["BRIDGE && NETFILTER"], "E": [], "F": ["USB"]}
    lost = sk.dropped_options(requested, final, symbols)
    assert lost == ["CONFIG_D=y: now m (depends on BRIDGE && NETFILTER)",
                    'CONFIG_E="x": now "y"',
                    "CONFIG_F=m: now not set (depends on USB)",
                    "CONFIG_NOPE=y: no such option in this kernel source"]


def test_kconfig_symbols_reads_definitions_and_depends(tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "Kconfig").write_text(
        "menuconfig NETFILTER\n\tbool \"nf\"\n\nconfig BRIDGE_NETFILTER\n\ttristate \"br\"\n"
        "\tdepends on BRIDGE\n\tdepends on NETFILTER && INET\n\thelp\n\t  x\n"
        "if NETFILTER\nconfig X\n\tbool\nendif\n")
    syms = sk.kconfig_symbols(tmp_path)
    assert syms == {"NETFILTER": [], "BRIDGE_NETFILTER": ["BRIDGE", "NETFILTER && INET"], "X": []}


def test_cached_source_builds_are_found_and_debian_resolution_ignores_them(cache):
    entry = cache / "kernels" / "6.12.117-nflab-0123abcd"
    rel = entry.name
    for path in (f"root/boot/vmlinuz-{rel}", f"root/boot/config-{rel}", f"root/lib/modules/{rel}/modules.dep",
                 "build/Makefile", "build/.config", "build/Module.symvers",
                 "build/include/generated/utsrelease.h", "build/include/generated/autoconf.h"):
        (entry / path).parent.mkdir(parents=True, exist_ok=True)
        (entry / path).write_text(f"{path}\n")
    base = sk.BASE_FRAGMENT.read_text()
    plan = sk.Plan(line="6.12", package="linux-source-6.12", version="6.12.117-1~deb12u1",
                   upstream="6.12.117", key="0123abcd", fragment="", fragment_hash=sk.fragment_hash(""),
                   base=base, spec="source:6.12")
    sk._write_manifest(plan, entry, entry, {})
    assert kernels.get("source:6.12", fetch_missing=False).release == "6.12.117-nflab-0123abcd"
    assert kernels.get("6.12.117-nflab-0123abcd", fetch_missing=False).headers == str(entry / "build")
    assert kernels.resolve("source:6.12").release == "6.12.117-nflab-0123abcd"
    got = [k.release for k in kernels.cached_kernels()]
    assert got == ["6.12.117-nflab-0123abcd"]
    # a build's work directory holds its manifest for a moment before the rename
    work = entry.with_name(f".build-{rel}")
    shutil.copytree(entry, work)
    assert [k.release for k in kernels.cached_kernels()] == got
    shutil.rmtree(work)
    assert kernels.KernelRef("6.1.192", "nflab-0123abcd").line == "6.1"
    data = json.loads((entry / sk.SOURCE_INFO).read_text())
    assert data["version"] == "6.12.117-1~deb12u1" and data["key"] == "0123abcd"
    # the same integrity records as a Debian entry: a damaged one says what and how to fix it
    (entry / f"root/lib/modules/{rel}/modules.dep").unlink()
    with pytest.raises(KernelError, match="damaged: .*modules.dep is missing") as info:
        kernels.get("source:6.12", fetch_missing=False)
    assert "--force" in info.value.hint and "source:6.12" in info.value.hint


def test_a_finished_build_tree_points_at_its_entry_not_at_the_work_directory(cache):
    """7.x writes ``export KBUILD_OUTPUT = <O= dir>`` into the tree's Makefile: after
    the rename from ``.build-<release>`` it must name the entry (CI failed on this)."""
    work = cache / "kernels" / ".build-7.3.4-nflab-0123abcd" / "build"
    work.mkdir(parents=True)
    final = cache / "kernels" / "7.3.4-nflab-0123abcd" / "build"
    src = "/cache/kernels/.src/7.3.4-1~bpo13+1/linux-source-7.3/Makefile"
    (work / "Makefile").write_text(f"# Automatically generated by {src}: don't edit\n"
                                   f"export KBUILD_OUTPUT = {work}\ninclude {src}\n")
    sk.retarget_output_makefile(work, final)
    assert (work / "Makefile").read_text().splitlines()[1:] == [
        f"export KBUILD_OUTPUT = {final}", f"include {src}"]
    (work / "Makefile").write_text(f"include {src}\n")        # 6.x: nothing to change
    sk.retarget_output_makefile(work, final)
    assert (work / "Makefile").read_text() == f"include {src}\n"


def test_an_entry_whose_makefile_names_a_missing_tree_is_damaged(cache):
    entry = cache / "kernels" / "7.3.4-nflab-0123abcd"
    rel = entry.name
    for path in (f"root/boot/vmlinuz-{rel}", f"root/boot/config-{rel}", f"root/lib/modules/{rel}/modules.dep",
                 "build/.config", "build/Module.symvers",
                 "build/include/generated/utsrelease.h", "build/include/generated/autoconf.h"):
        (entry / path).parent.mkdir(parents=True, exist_ok=True)
        (entry / path).write_text(f"{path}\n")
    gone = cache / "kernels" / f".build-{rel}" / "build"
    (entry / "build/Makefile").write_text(f"export KBUILD_OUTPUT = {gone}\ninclude {entry}/build/.config\n")
    plan = sk.Plan(line="7.3", package="linux-source-7.3", version="7.3.4-1~bpo13+1",
                   upstream="7.3.4", key="0123abcd", fragment="", fragment_hash=sk.fragment_hash(""),
                   base=sk.BASE_FRAGMENT.read_text(), spec="source:7.3")
    sk._write_manifest(plan, entry, entry, {})
    assert kernels.check_entry(entry) == f"build/Makefile refers to {gone}, which does not exist"
    fails = [c for c in doctor_kit.check_cache() if c.status == doctor.FAIL]
    assert [(c.name, c.fix) for c in fails] == [
        (f"kernel {rel}", f"invoke fetch-kernel --kernel={rel} --force")], fails
    gone.mkdir(parents=True)
    assert kernels.check_entry(entry) is None
    assert not [c for c in doctor_kit.check_cache() if c.status == doctor.FAIL]


def test_lockdep_splats_are_faults_but_a_plain_warning_is_not():
    from vm import qemu

    splat = ("[   12.1] \n[   12.1] ======================================================\n"
             "[   12.1] WARNING: possible circular locking dependency detected\n"
             "[   12.1] 6.12.117-nflab-0123abcd #1 Tainted: G           O\n"
             "[   12.1] insmod/231 is trying to acquire lock:\n")
    fault = qemu.find_fault(splat)
    assert fault.kind == "lockdep" and "circular locking" in fault.summary()
    assert qemu.find_fault("[ 3.2] WARNING: suspicious RCU usage\n").kind == "lockdep"
    assert qemu.find_fault("[ 3.2] WARNING: CPU: 0 PID: 1 at net/x.c:12 f+0x1/0x2\n") is None
