"""Subprocess helpers with errors that name the command."""

import fcntl
import os
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

from ground.errors import NflabError


def run(cmd, *, cwd=None, env=None, check=True, capture=True, timeout=None, input=None):
    """Run *cmd* (a list); on failure raise NflabError with its stderr tail."""
    try:
        res = subprocess.run(
            [str(c) for c in cmd], cwd=cwd, env=env, input=input,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise NflabError(f"command not found: {cmd[0]}",
                         hint="run `invoke doctor` to see what is missing") from exc
    except subprocess.TimeoutExpired as exc:
        raise NflabError(f"command timed out after {timeout}s: {' '.join(map(str, cmd))}") from exc
    if check and res.returncode != 0:
        tail = (res.stderr or res.stdout or "").strip().splitlines()[-15:]
        raise NflabError(f"`{' '.join(map(str, cmd))}` failed with exit {res.returncode}",
                         detail="\n".join(tail))
    return res


def run_group(cmd: list, *, timeout: float, cwd=None) -> subprocess.CompletedProcess:
    """Run *cmd* in a session of its own, stdin empty and its output captured as
    text; on timeout (or Ctrl-C) kill the whole process group, so no grandchild
    (a QEMU that a wrapper started) outlives it, then raise."""
    with subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            signal_quietly(proc.pid, signal.SIGKILL, group=True)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def signal_quietly(pid: int, sig: int, *, group: bool = False):
    """Send *sig* to process *pid* (its process group with *group*); one that is
    already gone is no error."""
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except ProcessLookupError:
        pass


@contextmanager
def file_lock(path: Path, *, shared: bool = False):
    """An exclusive advisory lock, so two nflab processes never race on a cache entry
    (*shared*: one that only an exclusive holder waits for, and waits for one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextmanager
def try_lock(path: Path, *, shared: bool = False):
    """An advisory lock that does not wait: yield True while this process holds it
    on *path* (made if missing), False (holding nothing) if another process holds a
    conflicting one. A shared lock conflicts only with an exclusive one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
