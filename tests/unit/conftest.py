"""Fixtures the unit tests of the Debian archive code share: a throwaway GnuPG
home and a fake signed mirror on 127.0.0.1 (tests/unit/debmirror.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

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


def fake_qemu_process(vmdir: Path) -> subprocess.Popen:
    """A process whose argv names a file in *vmdir*, as a QEMU's does (what
    ``vm.lab.pid_alive`` checks), returned once it has exec'd: until then its argv
    is still the test's own, and pid_alive would say no."""
    from vm import lab

    vmdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             f"{vmdir}/console.log"], start_new_session=True)
    deadline = time.monotonic() + 10
    while not lab.pid_alive(proc.pid, vmdir) and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc


@contextmanager
def fake_vm(name: str):
    """(VM folder, fake QEMU) for VM *name*, the process killed afterwards."""
    from vm import lab

    vmdir = lab.vm_dir(name)
    proc = fake_qemu_process(vmdir)
    try:
        yield vmdir, proc
    finally:
        proc.kill()
        proc.wait()
