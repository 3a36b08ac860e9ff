"""vm.lab.pid_alive against real processes: a zombie (exited, not yet reaped) is not
a running QEMU, a live process is; the VM directory guards against pid reuse."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vm import lab


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def zombie():
    """A child that has exited and is left unreaped (state Z) until the test ends."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while _state(pid) != "Z":
            assert time.monotonic() < deadline, f"child {pid} never became a zombie"
            time.sleep(0.01)
        yield pid
    finally:
        os.waitpid(pid, 0)


def test_zombie_is_not_alive(zombie):
    assert _state(zombie) == "Z"
    assert Path(f"/proc/{zombie}").exists()      # the pid is still taken ...
    assert not lab.pid_alive(zombie)              # ... but nothing runs under it
    assert _state(zombie) == "Z"                  # pid_alive did not reap it either


def test_live_process_is_alive_and_must_name_its_vm_dir(tmp_path):
    vmdir = tmp_path / "vms" / "ab"
    vmdir.mkdir(parents=True)
    # a stand-in for QEMU: its command line names a file inside the VM directory
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             f"{vmdir}/qmp.sock"])
    try:
        assert lab.pid_alive(proc.pid)
        assert lab.pid_alive(proc.pid, vmdir)
        # "…/vms/a/" is no prefix of "…/vms/ab/": VM ab's QEMU is not VM a's
        assert not lab.pid_alive(proc.pid, tmp_path / "vms" / "a")
    finally:
        proc.kill()
        proc.wait()
    assert not lab.pid_alive(proc.pid, vmdir)     # with vmdir: safe should the pid be reused
    assert not lab.pid_alive(None) and not lab.pid_alive(0)
