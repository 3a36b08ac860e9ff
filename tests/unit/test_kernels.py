"""Kernel specs: parsing, resolution errors, and (slow) what a cache entry holds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ground.errors import KernelError
from supply import kernels
from supply.kernels import KernelRef


@pytest.mark.parametrize("spec,expected", [
    (None, ("6.12", "cloud-amd64")),
    ("", ("6.12", "cloud-amd64")),
    ("6.1", ("6.1", "cloud-amd64")),
    ("6.12", ("6.12", "cloud-amd64")),
    (" 6.12 ", ("6.12", "cloud-amd64")),
    ("6.1.0-56", ("6.1.0-56", "cloud-amd64")),
    ("6.12.117+deb12", ("6.12.117+deb12", "cloud-amd64")),
    ("6.1-amd64", ("6.1", "amd64")),
    ("6.12-cloud-amd64", ("6.12", "cloud-amd64")),
    ("6.12/cloud", ("6.12", "cloud-amd64")),
    ("6.1.0-56@amd64", ("6.1.0-56", "amd64")),
])
def test_parse_spec_valid(spec, expected):
    assert kernels.parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["9.99", "6", "6.2", "6.1.0", "6.12.117", "5.10", "../x", "6.1;id",
                                  "6.1.0-56-rt-amd64", "6.12-arm64", "latest", "6.1 6.12", "6.1\nx"])
def test_parse_spec_invalid_names_valid_forms(spec):
    with pytest.raises(KernelError) as info:
        kernels.parse_spec(spec)
    err = info.value
    assert "kernel spec" in err.message
    for form in ("6.1", "6.12", "6.1.0-56", "6.12.117+deb12", "cloud-amd64"):
        assert form in err.hint


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
    abis = ["6.1.0-9", "6.12.9+deb12", "6.1.0-56", "6.12.117+deb12", "6.1.0-100"]
    assert sorted(abis, key=kernels.abi_sort_key) == [
        "6.1.0-9", "6.1.0-56", "6.1.0-100", "6.12.9+deb12", "6.12.117+deb12"]


_ARCHIVE = kernels.archive_kernels()


def _archive_has(line):
    return any(r.line == line for r in _ARCHIVE)


@pytest.mark.skipif(not _archive_has("6.12"), reason="apt lists offer no 6.12 kernels")
def test_unknown_exact_612_abi_lists_nearest_612():
    with pytest.raises(KernelError) as info:
        kernels.resolve("6.12.999+deb12")
    nearest = info.value.hint.removeprefix("nearest valid: ").split(", ")
    assert nearest and all(n.startswith("6.12.") for n in nearest), nearest


@pytest.mark.skipif(not _archive_has("6.1"), reason="apt lists offer no 6.1 kernels")
def test_unknown_exact_61_abi_lists_nearest_61():
    with pytest.raises(KernelError) as info:
        kernels.resolve("6.1.0-9999")
    nearest = info.value.hint.removeprefix("nearest valid: ").split(", ")
    assert nearest and all(n.startswith("6.1.0-") for n in nearest), nearest


@pytest.mark.slow
def test_cached_kernel_entry_is_complete(kernel):
    """What `supply.kernels.get` hands the build: consistent release, usable headers."""
    assert re.fullmatch(r"6\.(1\.0-\d+|12\.\d+\+deb12)-(cloud-)?amd64", kernel.release)
    assert kernel.release == f"{kernel.abi}-{kernel.flavour}"
    headers = Path(kernel.headers)
    assert (headers / "Makefile").is_file()
    # the absolute include of the common headers now points into the cache
    mk = (headers / "Makefile").read_text()
    assert not re.search(r"(?<![\w/])/usr/src/linux-headers", mk), "unfixed absolute include"
    assert Path(kernel.root).resolve() in [p.resolve() for p in (headers / "Makefile").parents] or \
        str(Path(kernel.root)) in mk
    assert Path(kernel.vmlinuz).is_file() and Path(kernel.config).is_file()
    assert kernel.config_value("MODULES") == "y"
    assert kernel.config_value("NETFILTER_XTABLES") in ("y", "m")
    # the release the headers compile into vermagic matches the manifest
    utsrelease = headers / "include/generated/utsrelease.h"
    assert f'"{kernel.release}"' in utsrelease.read_text()
    # a second get is served from the cache and describes the same entry
    again = kernels.get(kernel.abi + "-" + kernel.flavour)
    assert again == kernel
