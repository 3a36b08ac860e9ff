"""A plugin built against another libxtables version is refused before it is copied.

A real ``libxt_iprange.so`` is compiled in the guest userland's build root,
against its libxtables (never the host's); its build records that version. The check `vm.install` runs against the
guest's ``libxtables12`` package version is exercised here with the recorded
version altered (the VM side is in tests/integration/test_install_xtables.py).
"""

from __future__ import annotations

import re

import pytest

from ground.errors import NflabError
from kmods import build, spec
from nflab.deploy import check_plugin_xtables
from userspace_ext import plugin


def _root_pkg_version() -> str:
    """The Debian version of libxtables12 in the userland's build root."""
    return plugin.root().packages["libxtables12"]


@pytest.fixture(scope="module")
def built_plugin(tmp_path_factory):
    out = tmp_path_factory.mktemp("xtver")
    ext = spec.load("iprange")
    build.render_into(ext, out)
    so = plugin.build(ext, out)
    return ext, out, so


def test_build_records_the_build_roots_libxtables_version(built_plugin):
    _, _, so = built_plugin
    assert so.is_file()
    assert plugin.recorded_xtables_version(so) == plugin.xtables_version()
    assert plugin.upstream_version(_root_pkg_version()) == plugin.xtables_version()


@pytest.mark.parametrize("debian,upstream", [("1.8.9-2", "1.8.9"), ("1:1.8.9-2", "1.8.9"),
                                             ("1.8.10-1~bpo12+1", "1.8.10"), ("1.8.9", "1.8.9")])
def test_upstream_version(debian, upstream):
    assert plugin.upstream_version(debian) == upstream


def test_matching_guest_is_accepted(built_plugin):
    _, _, so = built_plugin
    check_plugin_xtables(so, _root_pkg_version(), "VM 'x'")


def test_plugin_built_against_another_libxtables_is_refused(built_plugin):
    ext, out, so = built_plugin
    vf = plugin.version_file(so)
    vf.write_text("1.8.7\n")
    try:
        with pytest.raises(NflabError) as info:
            check_plugin_xtables(so, _root_pkg_version(), "VM 'lab'", name="iprange")
        text = str(info.value)
        assert "\n" not in text
        assert "libxt_iprange.so was built against libxtables 1.8.7" in text
        assert f"VM 'lab' has libxtables {plugin.xtables_version()}" in text
        assert "refusing to install" in text and "invoke rootfs --rebuild" in info.value.hint
        # the host build notices the recorded version is not the host's and rebuilds
        before = so.stat().st_mtime_ns
        again = plugin.build(ext, out)
        assert again == so and so.stat().st_mtime_ns != before
        assert plugin.recorded_xtables_version(so) == plugin.xtables_version()
    finally:
        vf.write_text(plugin.xtables_version() + "\n")


def test_guest_with_another_libxtables_is_refused(built_plugin):
    _, _, so = built_plugin
    host = re.escape(plugin.xtables_version())
    with pytest.raises(NflabError, match=rf"built against libxtables {host} but VM 'g' has "
                                         r"libxtables 9\.9\.9 \(libxtables12 1:9\.9\.9-1\)"):
        check_plugin_xtables(so, "1:9.9.9-1", "VM 'g'")


def test_unrecorded_version_and_guest_without_libxtables_are_refused(built_plugin):
    _, _, so = built_plugin
    vf = plugin.version_file(so)
    saved = vf.read_text()
    vf.unlink()
    try:
        with pytest.raises(NflabError, match="no recorded libxtables version"):
            check_plugin_xtables(so, _root_pkg_version(), "VM 'x'", name="iprange")
    finally:
        vf.write_text(saved)
    with pytest.raises(NflabError, match="has no libxtables12 package"):
        check_plugin_xtables(so, "-", "VM 'x'")
