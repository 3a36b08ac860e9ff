"""Extension folders beside the kit's catalog ($NFLAB_EXTRA_CATALOG / --extensions-dir)."""

from __future__ import annotations

import pytest

from kmods import scaffold, spec
from nflab import matrix, suites
from ground.errors import BuildError, SpecError


@pytest.fixture
def extra(tmp_path, monkeypatch):
    scaffold.new_module("match", "nflabextra", catalog=tmp_path)
    monkeypatch.setenv(spec.EXTRA_CATALOG_ENV, str(tmp_path))
    return tmp_path


def test_extra_folder_adds_its_extensions(extra):
    assert spec.definition_path("nflabextra") == extra / "nflabextra" / "ext.toml"
    assert spec.load("nflabextra").name == "nflabextra"
    names = spec.catalog_names()
    assert "nflabextra" in names and "iprange" in names
    assert spec.definition_path("iprange").parent.parent == spec.CATALOG


def test_without_the_variable_the_extension_is_unknown(extra, monkeypatch):
    monkeypatch.delenv(spec.EXTRA_CATALOG_ENV)
    with pytest.raises(SpecError, match="no extension 'nflabextra'"):
        spec.load("nflabextra")


def test_a_name_defined_twice_is_refused(extra):
    scaffold.new_module("match", "iprange2", catalog=extra)
    (extra / "iprange2").rename(extra / "iprange")
    with pytest.raises(SpecError, match="defined twice") as info:
        spec.definition_path("iprange")
    assert str(extra / "iprange" / "ext.toml") in str(info.value)


def test_a_missing_folder_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv(spec.EXTRA_CATALOG_ENV, str(tmp_path / "nope"))
    with pytest.raises(SpecError, match="nope.*is not a directory"):
        spec.catalog_names()


def test_build_reason_puts_the_compiler_line_first():
    exc = BuildError("kernel module xt_x failed to build for 6.12.1", hint="full log: /b/build.log",
                     detail="/b/6.12.1/x/xt_x.c:14:33: error: 'struct xt_x_info' has no member named 'y'\n"
                            "/b/6.12.1/x/xt_x.c:20: error: second")
    reason = suites.build_reason(exc)
    assert reason.startswith("xt_x.c:14:33: error: 'struct xt_x_info' has no member named 'y'")
    assert "failed to build for 6.12.1" in reason and "second" not in reason
    assert suites.build_reason(BuildError("plain")) == "plain"


def test_matrix_row_of_a_failed_build_keeps_the_passing_suites_green():
    cell = matrix.Cell("6.12", release="6.12.117+deb12-cloud-amd64",
                       build={"iprange": "ok", "nflabbroken": "xt_nflabbroken.c:14: error: no member"},
                       test="9 passed, 0 failed, 0 skipped", exit_code=1, seconds=50, suites_passed=True)
    md = matrix.markdown([cell], ["iprange", "nflabbroken"])
    assert "✅ build | ❌ build: xt_nflabbroken.c:14: error: no member | ✅ 9 passed" in md
    assert not cell.ok
