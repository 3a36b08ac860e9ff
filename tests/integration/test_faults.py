"""Guest faults end the running task: non-zero, console excerpt, no QEMU left.

The catalog-only `faulty` hook module oopses, BUGs or spins on demand (a
write to /proc/net/nflab_faulty) or never finishes its init. Each case runs
in a fresh VM and must end within its time budget with a VMError naming the
fault and carrying the console lines that show it.
"""

from __future__ import annotations

import subprocess

import pytest

from ground.errors import NflabError, VMError
from nflab import deploy
from vm import lab

pytestmark = [pytest.mark.slow, pytest.mark.vm]

KERNEL = "6.1"
VM = "it-fault"


def _qemu_of(vm: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", f"qemu-system.*-name nflab-{vm}( |,)"],
                         capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.strip()]


@pytest.fixture
def faulty_vm():
    lab.down(VM)
    lab.up(KERNEL, VM, progress=lambda *_: None)
    deploy.install("faulty", VM)
    yield VM
    lab.down(VM)
    assert not _qemu_of(VM), "QEMU of the fault VM survived"


@pytest.mark.parametrize("fault,console", [("oops", "NULL pointer dereference"),
                                           ("bug", "kernel BUG at")])
def test_oops_and_bug_end_the_command_with_the_console_excerpt(faulty_vm, fault, console):
    # the console's oops/BUG report (not the 120 s timeout) ends the command
    with pytest.raises(VMError) as info:
        lab.exec(faulty_vm, f"echo {fault} > /proc/net/nflab_faulty", timeout=120)
    text = f"{info.value}\n{info.value.detail or ''}"
    assert console in text, text
    assert "timed out" not in str(info.value), text
    assert not _qemu_of(faulty_vm), "the crashed VM's QEMU is still running"
    with pytest.raises(VMError):
        lab.exec(faulty_vm, "true", timeout=10)


def test_module_hanging_in_init_ends_install_within_its_budget():
    lab.down(VM)
    lab.up(KERNEL, VM, progress=lambda *_: None)
    try:
        with pytest.raises(NflabError) as info:
            deploy.install("faulty", VM, params={"hang_in_init": True}, timeout=20)
        assert "timed out" in str(info.value) or "answer" in str(info.value), str(info.value)
    finally:
        lab.down(VM)
    assert not _qemu_of(VM)


def test_a_module_the_guest_refuses_is_named_with_insmods_reason():
    """A failed insmod (a value its bool parameter refuses) ends the install naming
    the module, with insmod's own message; the load script stops there (it once
    went on and blamed the module's taint: "not the kit's module")."""
    lab.down(VM)
    lab.up(KERNEL, VM, progress=lambda *_: None)
    try:
        with pytest.raises(VMError) as info:
            deploy.install("faulty", VM, params={"hang_in_init": "maybe"}, timeout=20)
        err = info.value
        assert "loading" in err.message and "faulty failed" in err.message, err.message
        assert "Invalid parameters" in err.detail and "not the kit's" not in err.message, err.detail
        assert "dmesg" in err.hint
        assert lab.exec(VM, "test -d /sys/module/nflab_faulty").returncode != 0
    finally:
        lab.down(VM)
    assert not _qemu_of(VM)
