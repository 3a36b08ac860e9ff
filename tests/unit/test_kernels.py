"""Kernel specs and what Debian serves: parsing, choosing, refusals, both package
layouts (pure parts over synthetic indexes; the real archive in the slow tests)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from ground.errors import KernelError
from supply import debian_kernels as dk
from supply import kernels
from supply.debian_kernels import Offer
from supply.kernels import KernelRef
from tests.unit.debmirror import FakeIndex, FakePkg


@pytest.mark.parametrize("spec,expected", [
    (None, ("6.12", "cloud-amd64")),
    ("", ("6.12", "cloud-amd64")),
    ("5.10", ("5.10", "cloud-amd64")),
    ("6.1", ("6.1", "cloud-amd64")),
    (" 6.12 ", ("6.12", "cloud-amd64")),
    ("7.3", ("7.3", "cloud-amd64")),
    ("rc", ("rc", "cloud-amd64")),
    ("rc-amd64", ("rc", "amd64")),
    ("6.1.0-56", ("6.1.0-56", "cloud-amd64")),
    ("6.1.0-0.deb11.52", ("6.1.0-0.deb11.52", "cloud-amd64")),
    ("6.12.118+deb13", ("6.12.118+deb13", "cloud-amd64")),
    ("7.3.4+deb13-rt-amd64", ("7.3.4+deb13", "rt-amd64")),
    ("6.12.90+deb13.1-amd64", ("6.12.90+deb13.1", "amd64")),
    ("6.12-rt-amd64", ("6.12", "rt-amd64")),
    ("6.1-amd64", ("6.1", "amd64")),
    ("6.12/cloud", ("6.12", "cloud-amd64")),
    ("6.1.0-56@amd64", ("6.1.0-56", "amd64")),
])
def test_parse_spec_valid(spec, expected):
    assert kernels.parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["6", "../x", "6.1;id", "6.12-arm64", "latest", "6.1 6.12",
                                  "6.1\nx", "7.3.4+deb13-s390x"])
def test_parse_spec_invalid_names_valid_forms(spec):
    with pytest.raises(KernelError) as info:
        kernels.parse_spec(spec)
    assert "kernel spec" in info.value.message
    for form in ("5.10", "6.12", "7.3", "rc", "6.12.118+deb13", "-rt-amd64"):
        assert form in info.value.hint


def _o(abi, suite, version, flavour="cloud-amd64", buildable=True, compiler="gcc-12"):
    pkgs = ((f"linux-image-{abi}-{flavour}", version),) if buildable else ()
    return Offer(abi, flavour, suite, version, pkgs, compiler if buildable else "")


OFFERS = [
    _o("5.10.0-46", "bullseye-security", "5.10.262-1", compiler="gcc-10"),
    _o("5.10.0-32", "bullseye", "5.10.223-1", compiler="gcc-10"),
    _o("6.1.0-0.deb11.52", "bullseye-security", "6.1.180-1~deb11u1", compiler="gcc-10"),
    _o("6.1.0-57", "bookworm-security", "6.1.192-3"),
    _o("6.12.117+deb12", "bookworm-security", "6.12.117-1~deb12u1"),
    _o("6.12.118+deb13", "trixie-security", "6.12.118-1", compiler="gcc-14"),
    _o("6.12.118+deb13", "trixie-security", "6.12.118-1", "rt-amd64", compiler="gcc-14"),
    _o("6.18.15+deb13", "trixie-backports", "6.18.15-1~bpo13+1", buildable=False),
    _o("7.3.4+deb13", "trixie-backports", "7.3.4-1~bpo13+1", compiler="gcc-14"),
    _o("7.2.13+deb14", "sid", "7.2.13-1", compiler="gcc-16"),
    _o("7.3", "experimental", "7.3~rc7-1~exp1", compiler="gcc-16"),
]


@pytest.mark.parametrize("spec,release,suite", [
    ("5.10", "5.10.0-46-cloud-amd64", "bullseye-security"),
    # a line belongs to the newest Debian release carrying it: bookworm's 6.1, not
    # bullseye's backport of a newer 6.1 point release
    ("6.1", "6.1.0-57-cloud-amd64", "bookworm-security"),
    ("6.12", "6.12.118+deb13-cloud-amd64", "trixie-security"),
    ("6.12-rt-amd64", "6.12.118+deb13-rt-amd64", "trixie-security"),
    ("7.3", "7.3.4+deb13-cloud-amd64", "trixie-backports"),
    ("stable", "7.3.4+deb13-cloud-amd64", "trixie-backports"),
    ("rc", "7.3-cloud-amd64", "experimental"),
    ("6.12.117+deb12", "6.12.117+deb12-cloud-amd64", "bookworm-security"),
    ("6.1.0-0.deb11.52", "6.1.0-0.deb11.52-cloud-amd64", "bullseye-security"),
])
def test_choose(spec, release, suite):
    got = dk.choose(*dk.parse_spec(spec), OFFERS)
    assert (got.release, got.suite) == (release, suite)


def test_lines_and_groups():
    assert dk.lines(OFFERS) == ["5.10", "6.1", "6.12", "7.2", "7.3", "rc"]
    assert dk.group("lts", OFFERS) == ["5.10", "6.1", "6.12"]          # 6.18: no headers
    assert dk.group("stable", OFFERS) == ["7.3"]
    assert dk.group("supported", OFFERS) == ["5.10", "6.1", "6.12", "7.3", "rc"]
    assert dk.group("rc", OFFERS) == ["rc"]
    rc = dk.choose("rc", "cloud-amd64", OFFERS)
    assert rc.rc and rc.line == "rc" and rc.debian_release == "sid"


@pytest.mark.parametrize("line", ["4.19", "7.9"])
def test_an_unknown_line_is_one_line_listing_the_lines(line):
    with pytest.raises(KernelError) as info:
        dk.choose(line, "cloud-amd64", OFFERS)
    assert str(info.value) == (f"Debian's archive has no kernel line {line}; "
                               "lines: 5.10, 6.1, 6.12, 7.2, 7.3, rc")
    assert "\n" not in str(info.value)


def test_a_line_served_without_headers_says_so():
    with pytest.raises(KernelError, match=r"serves 6\.18 only as kernel images "
                                          r"\(6\.18\.15\+deb13 in trixie-backports\), without headers"):
        dk.choose("6.18", "cloud-amd64", OFFERS)


def test_unknown_exact_abi_lists_nearest_of_its_line():
    with pytest.raises(KernelError) as info:
        dk.choose("6.12.999+deb12", "cloud-amd64", OFFERS)
    nearest = info.value.hint.removeprefix("nearest valid: ").split(", ")
    assert nearest and all(n.startswith("6.12.") for n in nearest), nearest


def test_expand_groups_and_lists(monkeypatch):
    monkeypatch.setattr(dk, "offers", lambda **kw: OFFERS)
    assert kernels.expand("lts,7.3,rc,6.1") == ["5.10", "6.1", "6.12", "7.3", "rc"]
    assert kernels.expand("supported") == ["5.10", "6.1", "6.12", "7.3", "rc"]


# ---- offers from an index: both package layouts ---------------------------------



def _index(*pkgs):
    idx = FakeIndex()
    for p in pkgs:
        idx.setdefault(p.name, []).append(p)
    return idx


def test_offer_of_the_classic_layout():
    v = "6.1.192-3"
    idx = _index(
        FakePkg("linux-image-6.1.0-57-cloud-amd64", v, "kmod, linux-base (>= 4.3~), initramfs-tools"),
        FakePkg("linux-headers-6.1.0-57-cloud-amd64", v,
             f"linux-headers-6.1.0-57-common (= {v}), linux-kbuild-6.1 (>= {v}), "
             "linux-compiler-gcc-12-x86"),
        FakePkg("linux-headers-6.1.0-57-common", v), FakePkg("linux-kbuild-6.1", v),
        FakePkg("linux-image-6.1-cloud-amd64", "6.1.192-3",             # a meta package: not an offer
             "linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)"))
    offers = dk._suite_offers(_Archive(idx), "bookworm-security")
    assert [o.release for o in offers] == ["6.1.0-57-cloud-amd64"]
    assert offers[0].compiler == "gcc-12"
    assert [n for n, _ in offers[0].packages] == [
        "linux-image-6.1.0-57-cloud-amd64", "linux-headers-6.1.0-57-cloud-amd64",
        "linux-headers-6.1.0-57-common", "linux-kbuild-6.1"]


def test_offer_of_the_split_layout_from_6_19():
    v, abi = "7.3.4-1~bpo13+1", "7.3.4+deb13"
    idx = _index(
        FakePkg(f"linux-image-{abi}-cloud-amd64", v,
             f"dracut | initramfs-tools, linux-base-{abi}-cloud-amd64 (= {v}), "
             f"linux-binary-{abi}-cloud-amd64 (= {v}), linux-modules-{abi}-cloud-amd64 (= {v})"),
        FakePkg(f"linux-headers-{abi}-cloud-amd64", v,
             f"gcc-14-for-host, linux-base (>= 4.12~), linux-base-{abi}-cloud-amd64 (= {v}), "
             f"linux-headers-{abi}-common (= {v}), linux-kbuild-{abi}"),
        *(FakePkg(f"linux-{p}-{abi}-cloud-amd64", v) for p in ("base", "binary", "modules")),
        FakePkg(f"linux-headers-{abi}-common", v), FakePkg(f"linux-kbuild-{abi}", v),
        FakePkg("linux-image-6.18.15+deb13-cloud-amd64", "6.18.15-1~bpo13+1"))   # headers gone
    offers = {o.abi: o for o in dk._suite_offers(_Archive(idx), "trixie-backports")}
    assert offers[abi].compiler == "gcc-14" and offers[abi].buildable
    assert {n for n, _ in offers[abi].packages} == {
        f"linux-image-{abi}-cloud-amd64", f"linux-headers-{abi}-cloud-amd64",
        f"linux-base-{abi}-cloud-amd64", f"linux-binary-{abi}-cloud-amd64",
        f"linux-modules-{abi}-cloud-amd64", f"linux-headers-{abi}-common", f"linux-kbuild-{abi}"}
    assert not offers["6.18.15+deb13"].buildable


class _Archive:
    def __init__(self, idx):
        self.idx = idx

    def packages(self, suite):
        return self.idx


@pytest.mark.parametrize("layout", ["boot", "usr-lib-modules"])
def test_both_layouts_normalise_to_one_entry_shape(tmp_path, layout):
    rel = "7.3.4+deb13-cloud-amd64"
    for name in ("vmlinuz", "config", "System.map"):
        path = (tmp_path / "boot" / f"{name}-{rel}" if layout == "boot"
                else tmp_path / "usr/lib/modules" / rel / name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
    kernels._normalise_boot(tmp_path, rel)
    for name in ("vmlinuz", "config", "System.map"):
        assert (tmp_path / "boot" / f"{name}-{rel}").read_text() == name


def test_normalise_names_what_is_missing(tmp_path):
    with pytest.raises(KernelError, match="hold no vmlinuz"):
        kernels._normalise_boot(tmp_path, "7.3.4+deb13-cloud-amd64")


def test_resolve_refuses_a_malformed_source_spec():
    with pytest.raises(KernelError, match="invalid custom kernel spec") as info:
        kernels.resolve("source:/tmp/linux")
    assert "source:6.12" in info.value.hint and "+debug" in info.value.hint


def test_kernelref_names():
    r = KernelRef("6.1.0-56")
    assert (r.release, r.line, r.key) == ("6.1.0-56-cloud-amd64", "6.1", "6.1.0-56-cloud-amd64")
    r = KernelRef("6.12.117+deb12", "amd64")
    assert (r.release, r.line) == ("6.12.117+deb12-amd64", "6.12")


def test_abi_sort_key_orders_numerically():
    abis = ["6.1.0-9", "6.12.9+deb12", "6.1.0-56", "6.12.117+deb12", "6.1.0-100", "7.3.4+deb13",
            "5.10.0-46"]
    assert sorted(abis, key=kernels.abi_sort_key) == [
        "5.10.0-46", "6.1.0-9", "6.1.0-56", "6.1.0-100", "6.12.9+deb12", "6.12.117+deb12",
        "7.3.4+deb13"]


@pytest.mark.slow
def test_cached_kernel_entry_is_complete(kernel):
    """What `supply.kernels.get` hands the build: consistent release, usable headers."""
    assert kernel.release == f"{kernel.abi}-{kernel.flavour}"
    headers = Path(kernel.headers)
    assert (headers / "Makefile").is_file()
    mk = (headers / "Makefile").read_text()
    assert not re.search(r"(?<![\w/])/usr/src/linux-headers", mk), "unfixed absolute include"
    assert str(Path(kernel.root)) in mk
    assert Path(kernel.vmlinuz).is_file() and Path(kernel.config).is_file()
    assert kernel.config_value("MODULES") == "y"
    assert kernel.config_value("NETFILTER_XTABLES") in ("y", "m")
    assert kernel.compiler.startswith("gcc-") and kernel.build_release
    utsrelease = headers / "include/generated/utsrelease.h"
    assert f'"{kernel.release}"' in utsrelease.read_text()
    again = kernels.get(kernel.abi + "-" + kernel.flavour)
    assert again == kernel


def test_exact_spec_names_the_flavour_or_the_source_release():
    """What bench and doctor hand on to later commands: the very kernel, not its line
    or the default flavour (bench once dropped the flavour, and a source kernel
    became the Debian kernel of its version)."""
    generic = SimpleNamespace(abi="6.12.118+deb13", flavour="amd64", release="6.12.118+deb13-amd64")
    source = SimpleNamespace(abi="6.12.118", flavour="nflab-9c47e3dd", release="6.12.118-nflab-9c47e3dd")
    assert kernels.exact_spec(generic) == "6.12.118+deb13-amd64"
    assert kernels.exact_spec(source) == "6.12.118-nflab-9c47e3dd"
    assert dk.parse_spec(kernels.exact_spec(generic)) == ("6.12.118+deb13", "amd64")


def test_spec_hint_names_the_lines_with_headers(monkeypatch, tmp_path):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("NFLAB_DEBIAN_MIRROR", "http://deb.example/debian")
    archive = dk.debarchive.Archive()
    # nothing cached yet: the lines known to carry headers, never 6.18 (images only)
    assert "(5.10, 6.1, 6.12, 7.3: its newest ABI)" in dk.spec_hint()
    dk._write_offers(dk.kernels_dir() / dk.OFFERS_CACHE, [archive.mirror, archive.security_mirror],
                     "stamp", OFFERS)
    with pytest.raises(KernelError) as info:
        dk.parse_spec("6.1;id")
    assert "(5.10, 6.1, 6.12, 7.2, 7.3: its newest ABI)" in info.value.hint   # no 6.18
