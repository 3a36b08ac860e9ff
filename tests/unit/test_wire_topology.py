"""vm/topology.py: the setup script and the checker, against a fake runner."""

from __future__ import annotations

import pytest

from ground.errors import VMError
from vm import topology


def test_script_is_idempotent_commands_only():
    text = topology.script()
    in_batch = False
    for line in text.splitlines()[1:]:
        if line == "EOF" or line.startswith("ip -batch - <<"):
            in_batch = line != "EOF"
            continue
        if in_batch:      # ip's own commands, one per line
            assert line.startswith(("link set", "addr replace", "neigh replace")), line
        else:             # sysctls written by the shell, no exec
            assert line.startswith("echo ") and " > /proc/sys/net/" in line, line
    assert text.count("ip -batch") == 2, "two ip execs in all"
    assert "2001:db8:1::1/64 dev eth1 nodad" in text
    assert "198.51.100.2 lladdr 52:54:00:00:02:02 dev eth2 nud permanent" in text
    assert "echo 1 > /proc/sys/net/ipv4/ip_forward" in text
    assert "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding" in text
    assert "echo 0 > /proc/sys/net/ipv4/conf/all/rp_filter" in text
    # accept_dad/accept_ra are set before any address exists
    assert text.index("accept_dad") < text.index("addr replace")


def _good_state():
    sysctl = "".join(f"{k}={v}\n" for k, v in topology.sysctls().items())
    addrs = ""
    neigh = ""
    for i, s in enumerate(topology.SIDES.values(), 3):
        addrs += f"{i}: {s.dev}    inet {s.guest4}/24 scope global {s.dev}\\  valid_lft forever\n"
        addrs += f"{i}: {s.dev}    inet6 {s.guest6}/64 scope global nodad \\  valid_lft forever\n"
        neigh += f"{s.peer4} dev {s.dev} lladdr {s.peer_mac} PERMANENT\n"
        neigh += f"{s.peer6} dev {s.dev} lladdr {s.peer_mac} PERMANENT\n"
    return sysctl + "---\n" + addrs + "---\n" + neigh


def test_check_passes_on_the_configured_state():
    assert topology.check(lambda cmd: (0, _good_state(), "")) == []


def test_check_names_what_is_missing():
    state = _good_state().replace("net.ipv4.ip_forward=1", "net.ipv4.ip_forward=0")
    state = state.replace("198.51.100.2 dev eth2", "198.51.100.9 dev eth2")
    problems = topology.check(lambda cmd: (0, state, ""))
    assert any("ip_forward" in p for p in problems)
    assert any("198.51.100.2" in p for p in problems)


def test_setup_runs_one_script_then_checks():
    calls = []

    def run(cmd):
        calls.append(cmd)
        return (0, "" if len(calls) == 1 else _good_state(), "")
    topology.setup(run)
    assert len(calls) == 2 and calls[0].startswith("sh -c ")


def test_setup_failure_is_a_vm_error():
    with pytest.raises(VMError, match="topology setup failed"):
        topology.setup(lambda cmd: (1, "", "RTNETLINK answers: No such device"))


def test_runner_accepts_a_testinfra_like_host():
    class Res:
        rc, stdout, stderr = 0, _good_state(), ""

    class Host:
        def run(self, cmd):
            return Res()
    assert topology.check(Host()) == []


def test_unknown_side():
    with pytest.raises(ValueError, match="unknown wire side"):
        topology.side("middle")
