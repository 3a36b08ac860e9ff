"""Fixtures the unit tests of the Debian archive code share: a throwaway GnuPG
home and a fake signed mirror on 127.0.0.1 (tests/unit/debmirror.py)."""

from __future__ import annotations

import pytest

from tests.unit.debmirror import FakeMirror, Gpg, have_gpg


@pytest.fixture(scope="module")
def gpg(tmp_path_factory):
    if not have_gpg():
        pytest.skip("gpg, gpgv or gpgconf is not installed")
    g = Gpg(tmp_path_factory.mktemp("gnupg"))
    yield g
    g.close()


@pytest.fixture
def mirror(tmp_path, gpg):
    m = FakeMirror(tmp_path / "mirror", gpg)
    yield m
    m.close()
