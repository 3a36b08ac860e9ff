"""Long commands to the guest (vm/remote.py) and the choice of SSH server."""

from __future__ import annotations

import subprocess

import pytest

from ground.errors import VMError
from vm import qemu, remote


def test_needs_stdin_counts_bytes_not_characters():
    assert not remote.needs_stdin("x" * remote.MAX_EXEC)
    assert remote.needs_stdin("x" * (remote.MAX_EXEC + 1))
    assert remote.needs_stdin("é" * (remote.MAX_EXEC // 2 + 1))   # 2 bytes each


def test_ssh_argv_carries_testinfras_options():
    import testinfra
    host = testinfra.get_host("ssh://alice@lab:2222?ssh_config=/tmp/cfg&ssh_identity_file=/tmp/k"
                              "&timeout=7")
    assert remote.ssh_argv(host.backend) == [
        "ssh", "-F", "/tmp/cfg", "-o", "User=alice", "-o", "Port=2222", "-i", "/tmp/k",
        "-o", "ConnectTimeout=7", "lab"]


class _Local:
    def __init__(self):
        self.ran = []

    def run(self, command):
        self.ran.append(command)
        return command


def test_hosts_without_an_ssh_backend_get_the_command_as_is():
    host = _Local()
    long = "echo " + "y" * 20_000
    assert remote.run(host, long) == long and host.ran == [long]


def test_long_command_goes_over_stdin_and_short_one_as_exec(monkeypatch):
    import testinfra
    host = testinfra.get_host("ssh://lab?ssh_config=/tmp/cfg")
    seen = {}

    def fake_run(argv, input=None, **kw):
        seen.update(argv=argv, input=input)
        return subprocess.CompletedProcess(argv, 3, b"out", b"err")

    monkeypatch.setattr(remote.subprocess, "run", fake_run)
    long = "echo " + "z" * 10_000
    res = remote.run(host, long)
    assert seen["argv"][-1] == remote.STDIN_RUNNER and seen["input"] == long.encode()
    assert (res.rc, res.stdout, res.stderr) == (3, "out", "err")


def test_stdin_runner_keeps_the_commands_meaning(tmp_path):
    """The runner, run by a real shell: status, output, and an empty stdin."""
    script = 'read -r x && echo "stdin: $x"; echo out; echo err >&2; exit 4'
    res = subprocess.run(["sh", "-c", remote.STDIN_RUNNER], input=script.encode(),
                         capture_output=True, env={"SHELL": "/bin/sh", "PATH": "/usr/bin:/bin",
                                                   "TMPDIR": str(tmp_path)})
    assert (res.returncode, res.stdout, res.stderr) == (4, b"out\n", b"err\n")
    assert list(tmp_path.iterdir()) == [], "the script file is removed"


@pytest.mark.parametrize("env, want", [(None, "openssh"), ("", "openssh"),
                                       ("openssh", "openssh"), (" dropbear ", "dropbear")])
def test_sshd_choice(monkeypatch, env, want):
    if env is None:
        monkeypatch.delenv("NFLAB_SSHD", raising=False)
    else:
        monkeypatch.setenv("NFLAB_SSHD", env)
    assert qemu.sshd_choice() == want
    assert qemu.sshd_cmdline(want) == (() if want == "dropbear" else ("nflab.sshd=openssh",))


def test_sshd_choice_refuses_unknown_servers():
    with pytest.raises(VMError) as exc:
        qemu.sshd_choice("tinysshd")
    assert "tinysshd" in exc.value.message and "openssh" in exc.value.hint


def test_exec_request_short_as_is_long_over_stdin():
    assert remote.exec_request("true") == ("true", None)
    long = "echo " + "x" * remote.MAX_EXEC
    assert remote.exec_request(long) == (remote.STDIN_RUNNER, long.encode())
