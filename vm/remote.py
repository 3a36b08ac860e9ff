"""Shell commands of any length for a lab VM's SSH server.

The guest's SSH server is OpenSSH's sshd by default, which takes an exec
request up to the kernel's limit for one argument (``sh -c`` gets the command:
128 KiB); with ``NFLAB_SSHD=dropbear`` (``vm/guest/init.sh``: it starts in
0.05 s under TCG where sshd takes 0.28 s) it refuses any longer than 9000
bytes (its ``MAX_CMD_LEN``), and ssh then exits 255 without a word. So the
kit's own long commands go over stdin instead: the exec request is a short
reader (``STDIN_RUNNER``) that saves stdin to a file and runs that with the
login shell, so the command means what it would mean sent whole (its own
stdin is empty, as testinfra's is).

Batches that can grow past the limit (the ``.t`` runner, rule batches) call
:func:`run` with their testinfra host; :func:`vm.lab.exec` does the same on
its own. Hosts that are not SSH (``local://``, docker) get the command as it is.
"""

from __future__ import annotations

import subprocess

MAX_EXEC = 8192   # bytes of one exec request: under dropbear's 9000, with room


def via_file(fill: str, runner: str, template: str = "") -> str:
    """Shell that makes a file of its own (``mktemp [template]``), writes the
    script into it (*fill*, a command writing to ``"$f"``), runs it with *runner*,
    removes it and exits with the script's status."""
    make = f"mktemp {template}" if template else "mktemp"
    return (f'f=$({make}) && {fill} && '
            f'{{ {runner} "$f"; rc=$?; rm -f "$f"; exit $rc; }}')


STDIN_RUNNER = via_file('cat > "$f"', '"${SHELL:-/bin/sh}"')


def needs_stdin(command: str) -> bool:
    """True if *command* is too long for one exec request to the guest."""
    return len(command.encode()) > MAX_EXEC


def exec_request(command: str) -> tuple[str, bytes | None]:
    """(what the exec request carries, what goes on stdin) for *command*: the
    command itself, or past the limit the stdin reader and the command as its input."""
    if needs_stdin(command):
        return STDIN_RUNNER, command.encode()
    return command, None


def ssh_argv(backend) -> list[str]:
    """``ssh`` argv (without the remote command) for a testinfra SSH *backend*,
    with the options testinfra itself would pass."""
    argv = ["ssh"]
    if backend.ssh_config:
        argv += ["-F", backend.ssh_config]
    if backend.host.user:
        argv += ["-o", f"User={backend.host.user}"]
    if backend.host.port:
        argv += ["-o", f"Port={backend.host.port}"]
    if backend.ssh_identity_file:
        argv += ["-i", backend.ssh_identity_file]
    argv += ["-o", f"ConnectTimeout={backend.timeout}"]
    return argv + [backend.host.name]


def run(host, command: str, timeout: float | None = None):
    """``host.run(command)`` for a testinfra *host*, for commands of any length:
    a testinfra ``CommandResult``. *timeout* bounds the stdin path's ssh; a
    command short enough for one exec request runs as testinfra runs it."""
    backend = getattr(host, "backend", None)
    if not needs_stdin(command) or backend is None or backend.get_connection_type() != "ssh":
        return host.run(command)
    request, data = exec_request(command)
    res = subprocess.run(ssh_argv(backend) + [request], input=data, capture_output=True,
                         timeout=timeout, check=False)
    return backend.result(res.returncode, command.encode(), res.stdout, res.stderr)
