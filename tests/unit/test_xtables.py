"""Kernels without legacy xtables: detection (vm/xtables.py), the suites' skip
reason, and what the reports say (JUnit property, matrix summary).

Configs are what Kconfig writes: since 6.17 ``CONFIG_NETFILTER_XTABLES_LEGACY``
is a visible bool (``# ... is not set`` when off) that the legacy tables depend
on; before, the option does not exist and ``CONFIG_IP_NF_FILTER`` alone says.
The slow test derives a kernel without legacy xtables from a real cached
config the way Kconfig would.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from ground.errors import SpecError
from nflab import matrix, suites
from tests.suites.conftest import backend_of
from vm import xtables

NFT = "CONFIG_NF_TABLES=m\nCONFIG_NFT_COMPAT=m\n"
LEGACY_612 = ("CONFIG_IP_NF_IPTABLES_LEGACY=m\nCONFIG_IP_NF_IPTABLES=m\nCONFIG_IP_NF_FILTER=m\n"
              "CONFIG_IP6_NF_IPTABLES_LEGACY=m\nCONFIG_IP6_NF_IPTABLES=m\nCONFIG_IP6_NF_FILTER=m\n")
LEGACY_61 = "CONFIG_IP_NF_IPTABLES=m\nCONFIG_IP_NF_FILTER=m\nCONFIG_IP6_NF_IPTABLES=m\nCONFIG_IP6_NF_FILTER=y\n"
NO_LEGACY_617 = "# CONFIG_NETFILTER_XTABLES_LEGACY is not set\nCONFIG_IP_NF_IPTABLES=m\n"
MODULES = textwrap.dedent("""\
    kernel/net/netfilter/x_tables.ko.xz:
    kernel/net/ipv4/netfilter/ip_tables.ko.xz: kernel/net/netfilter/x_tables.ko.xz
    kernel/net/ipv4/netfilter/iptable_filter.ko.xz: kernel/net/ipv4/netfilter/ip_tables.ko.xz
    kernel/net/ipv6/netfilter/ip6_tables.ko.zst:
    kernel/net/netfilter/nf_tables.ko:
    kernel/net/netfilter/nft_compat.ko.gz: kernel/net/netfilter/nf_tables.ko
    """) + "kernel/net/ipv6/netfilter/ip6table_filter.ko\n"      # a modules.builtin line


def test_both_backends_before_and_after_the_legacy_option():
    for config in (LEGACY_61 + NFT, "CONFIG_NETFILTER_XTABLES_LEGACY=y\n" + LEGACY_612 + NFT):
        found = xtables.decide(config, MODULES, source="test")
        assert found.usable == ("legacy", "nft") and found.legacy and found.primary == "legacy"
        assert found.skip_reason("legacy") is None and found.describe() == "legacy and nft"


def test_legacy_option_unset_leaves_nft_only_and_says_why():
    found = xtables.decide(NO_LEGACY_617 + NFT, MODULES, source="kernel config of 7.3.0-rt")
    assert found.usable == ("nft",) and not found.legacy and found.primary == "nft"
    assert found.tool("ipv6") == "ip6tables-nft"
    reason = found.skip_reason("legacy")
    assert "CONFIG_NETFILTER_XTABLES_LEGACY is not set" in reason
    assert "kernel config of 7.3.0-rt" in reason and "nft only" in reason
    assert found.skip_reason("nft") is None
    assert found.describe() == "nft only (legacy skipped: CONFIG_NETFILTER_XTABLES_LEGACY is not set)"


@pytest.mark.parametrize("config, reason", [
    (LEGACY_61.replace("CONFIG_IP_NF_FILTER=m\n", "# CONFIG_IP_NF_FILTER is not set\n"),
     "CONFIG_IP_NF_FILTER is not set (no iptable_filter)"),
    (LEGACY_612.replace("CONFIG_IP6_NF_IPTABLES_LEGACY=m", "# CONFIG_IP6_NF_IPTABLES_LEGACY is not set"),
     "CONFIG_IP6_NF_IPTABLES_LEGACY is not set (no ip6_tables)"),
    (LEGACY_61.replace("CONFIG_IP6_NF_FILTER=y\n", ""), "CONFIG_IP6_NF_FILTER is not set"),
])
def test_missing_legacy_table_options(config, reason):
    found = xtables.decide(config + NFT, None, source="test")
    assert found.usable == ("nft",) and found.missing["legacy"].startswith(reason)


def test_module_list_overrides_a_config_that_promises_a_module():
    mods = MODULES.replace("kernel/net/ipv4/netfilter/iptable_filter.ko.xz: "
                           "kernel/net/ipv4/netfilter/ip_tables.ko.xz\n", "")
    found = xtables.decide(LEGACY_61 + NFT, mods, source="test")
    assert found.missing == {"legacy": "CONFIG_IP_NF_FILTER=m but iptable_filter is not among "
                                       "the kernel's modules"}


def test_no_nft_compat_means_legacy_only():
    found = xtables.decide(LEGACY_61 + "CONFIG_NF_TABLES=m\n", None, source="test")
    assert found.usable == ("legacy",) and "CONFIG_NFT_COMPAT is not set" in found.skip_reason("nft")


def test_without_config_the_module_list_decides_and_without_both_both_are_assumed():
    no_legacy = "\n".join(l for l in MODULES.splitlines() if "table" not in l or "nf_tables" in l)
    found = xtables.decide("", no_legacy, source="guest")
    assert found.usable == ("nft",) and "iptable_filter" in found.missing["legacy"]
    unknown = xtables.decide(None, None, source="guest")
    assert unknown.usable == ("legacy", "nft") and "both assumed" in unknown.source


def test_parse_modules_any_compression_and_builtin():
    assert xtables.parse_modules(MODULES) == {"x_tables", "ip_tables", "iptable_filter", "ip6_tables",
                                              "nf_tables", "nft_compat", "ip6table_filter"}


def test_guest_output_is_parsed_by_section():
    out = (f"@@release 7.3.0-1-rt-amd64\n@@config\n{NO_LEGACY_617}{NFT}@@modules\n"
           + "\n".join(line.split(":")[0] for line in MODULES.splitlines()) + "\n")
    found = xtables.from_guest_output(out)
    assert found.usable == ("nft",) and found.source == "the guest's config of 7.3.0-1-rt-amd64"


def test_suite_items_name_their_backend():
    item = lambda **p: SimpleNamespace(callspec=SimpleNamespace(params=p))   # noqa: E731
    assert backend_of(item(backend="legacy", family="ipv4")) == "legacy"
    assert backend_of(item(t_file=("iprange", Path("libxt_iprange.t"), "nft"))) == "nft"
    assert backend_of(item(family="ipv6")) is None
    assert backend_of(SimpleNamespace()) is None


def test_junit_property_reaches_the_outcome(tmp_path):
    """A pytest session that records the property (as the suites' ``xtables`` fixture
    does, JUnit family xunit1 as configured) -> suites.junit_backends reads it back."""
    said = "nft only (legacy skipped: CONFIG_NETFILTER_XTABLES_LEGACY is not set)"
    (tmp_path / "test_x.py").write_text(textwrap.dedent(f"""\
        import pytest

        @pytest.fixture(scope="session")
        def xt(record_testsuite_property):
            record_testsuite_property("{suites.XTABLES_PROPERTY}", {said!r})

        def test_one(xt):
            pass
        """))
    junit = tmp_path / "junit.xml"
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-o", "junit_family=xunit1", f"--junitxml={junit}", str(tmp_path / "test_x.py")],
                         cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert suites.junit_backends(junit) == said
    assert suites.junit_backends(tmp_path / "missing.xml") == ""


def test_matrix_summary_says_which_backend_was_tested():
    cell = matrix.Cell("7.3-rt", release="7.3.0-1-rt-amd64", build={"iprange": "ok"}, exit_code=0,
                       test="9 passed, 0 failed, 4 skipped", suites_passed=True,
                       backends="nft only (legacy skipped: CONFIG_NETFILTER_XTABLES_LEGACY is not set)")
    md = matrix.markdown([cell], ["iprange"])
    assert "(iptables nft only (legacy skipped: CONFIG_NETFILTER_XTABLES_LEGACY is not set))" in md


@pytest.mark.slow
def test_cached_kernels_and_a_derived_kernel_without_legacy_xtables(tmp_path):
    """Every cached kernel serves both backends except the rt flavour of the newest
    lines (no legacy xtables: nft only); the 7.3 config with the legacy option off
    (as Debian's rt flavour has it, and the legacy tables gone with it, as Kconfig
    drops what depends on it) serves nft only."""
    from supply import kernels
    cached = kernels.cached_kernels()
    assert cached
    for k in cached:
        legacy = "CONFIG_IP_NF_FILTER=" in Path(k.config).read_text()
        want = ("legacy", "nft") if legacy else ("nft",)
        assert xtables.for_kernel(k).usable == want, k.release
        if k.flavour == "rt-amd64" and k.abi.startswith("7."):
            assert not legacy, f"{k.release}: Debian's rt flavour of the newest line has legacy xtables"
    newest = next((k for k in cached if "CONFIG_NETFILTER_XTABLES_LEGACY=y" in Path(k.config).read_text()), None)
    if newest is None:
        pytest.skip("no cached kernel with CONFIG_NETFILTER_XTABLES_LEGACY (6.17 or newer)")
    lines = []
    for line in Path(newest.config).read_text().splitlines():
        if line == "CONFIG_NETFILTER_XTABLES_LEGACY=y":
            lines.append("# CONFIG_NETFILTER_XTABLES_LEGACY is not set")
        elif not line.startswith(("CONFIG_IP_NF_", "CONFIG_IP6_NF_")):
            lines.append(line)
    found = xtables.decide("\n".join(lines), None, source=f"derived from {newest.release}")
    assert found.usable == ("nft",)
    assert found.missing["legacy"] == "CONFIG_NETFILTER_XTABLES_LEGACY is not set"


def test_selection_narrows_the_backends_and_says_so(monkeypatch):
    both = xtables.decide(LEGACY_61 + NFT, None, source="test")
    monkeypatch.setenv(xtables.SELECT_ENV, "nft")
    only = xtables.selected(both)
    assert only.usable == ("nft",) and only.primary == "nft"
    assert only.missing == {"legacy": "not selected (NFLAB_BACKENDS=nft)"}
    monkeypatch.delenv(xtables.SELECT_ENV)
    assert xtables.selected(both) == both
    # a kernel's own reason is kept over "not selected"
    no_legacy = xtables.decide(NO_LEGACY_617 + NFT, None, source="test")
    assert xtables.selected(no_legacy, "nft").missing == no_legacy.missing
    with pytest.raises(SpecError, match="unknown backend"):
        xtables.selected(both, "iptables")
