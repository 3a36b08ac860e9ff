"""A matrix cell past its timeout, and a matrix told to stop, with real processes:
each fake cell is a shell script in place of `invoke test`, which, like the real
one, stops its VMs (here: says so) when SIGTERM reaches it."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ground.errors import SpecError
from nflab import matrix

COOPERATIVE = """#!/bin/sh
touch "{dir}/started-$$"
echo "cell $$ started"
trap 'kill $! 2>/dev/null; echo "cell $$ stopped its VM"; exit 143' TERM
sleep 60 &
wait
"""

# ignores SIGTERM, and leaves a grandchild in its process group
STUBBORN = """#!/bin/sh
trap '' TERM
sleep 60 &
echo "grandchild $!"
wait
"""


def _script(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fake-invoke"
    path.write_text(text.format(dir=tmp_path))
    path.chmod(0o755)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_cell_past_its_timeout_is_stopped_as_ci_would(tmp_path):
    cmd = [str(_script(tmp_path, COOPERATIVE))]
    res, timed_out = matrix._Cells().run(cmd, "m-unit", timeout=1.0)
    assert timed_out and res.returncode == 143
    assert "stopped its VM" in res.stdout, res.stdout


def test_a_cell_that_ignores_sigterm_is_killed_with_its_whole_group(tmp_path, monkeypatch):
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(matrix, "CELL_GRACE", 1.0)
    downs = []
    monkeypatch.setattr(matrix.lab, "down", lambda vm: downs.append(vm))
    res, timed_out = matrix._Cells().run([str(_script(tmp_path, STUBBORN))], "m-unit", timeout=1.0)
    grandchild = int(res.stdout.split()[-1])
    assert timed_out and res.returncode == -signal.SIGKILL
    time.sleep(0.2)             # init reaps the orphaned sleep
    assert not _alive(grandchild) and downs == ["m-unit"]


def test_the_cell_report_says_it_timed_out(tmp_path, monkeypatch):
    script = _script(tmp_path, COOPERATIVE)
    monkeypatch.setattr(matrix.sys, "executable", str(script))
    cell = matrix._run_cell("6.12", ["iprange"], tmp_path, timeout=1.0)
    assert cell.test.startswith("timed out after 1 s and stopped") and not cell.ok
    assert "stopped its VM" in (tmp_path / "log-m-6-12.txt").read_text()


def test_sigterm_to_the_matrix_stops_every_running_cell_and_starts_no_more(tmp_path, monkeypatch):
    """`kill <matrix pid>` (not its process group: the cells run in sessions of
    their own) reaches each running cell as SIGTERM, so each stops its VM; the
    third kernel never starts; the matrix ends with KeyboardInterrupt."""
    monkeypatch.setenv("NFLAB_BUILD", str(tmp_path / "build"))
    monkeypatch.setattr(matrix, "resolve_kernels", lambda text: ["6.1", "6.12", "7.3"])
    monkeypatch.setattr(matrix, "max_parallel", lambda jobs: 2)
    monkeypatch.setattr(matrix.sys, "executable", str(_script(tmp_path, COOPERATIVE)))

    def kill_when_both_run():
        deadline = time.monotonic() + 30
        while len(list(tmp_path.glob("started-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=kill_when_both_run)
    killer.start()
    with pytest.raises(KeyboardInterrupt):
        matrix.run(None, ["iprange"], jobs=2, progress=lambda m: None, timeout=0)
    killer.join()
    started = sorted(p.name.split("-")[1] for p in tmp_path.glob("started-*"))
    logs = {p.name: p.read_text() for p in (tmp_path / "build" / "reports" / "matrix").glob("log-*.txt")}
    assert len(started) == 2 and sorted(logs) == ["log-m-6-1.txt", "log-m-6-12.txt"], logs
    assert all("stopped its VM" in text for text in logs.values()), logs


def test_cell_timeout_option_env_and_default(monkeypatch):
    monkeypatch.delenv("NFLAB_CELL_TIMEOUT", raising=False)
    assert matrix.cell_timeout() == matrix.CELL_TIMEOUT
    monkeypatch.setenv("NFLAB_CELL_TIMEOUT", "900")
    assert matrix.cell_timeout() == 900.0
    assert matrix.cell_timeout("0") is None            # the option wins; 0: no limit
    with pytest.raises(SpecError) as err:
        matrix.cell_timeout("an hour")
    assert "NFLAB_CELL_TIMEOUT" in err.value.hint


def test_a_second_ctrl_c_during_the_grace_still_kills_the_cells(tmp_path, monkeypatch):
    """The first Ctrl-C asked the cells to stop; a second one (here: raised in the
    grace's wait) ends the wait at once, and a cell that ignores SIGTERM is killed
    with its group and its VM, not left behind."""
    monkeypatch.setenv("NFLAB_CACHE", str(tmp_path / "cache"))
    downs = []
    monkeypatch.setattr(matrix.lab, "down", lambda vm: downs.append(vm))
    cells = matrix._Cells()
    proc = cells._start([str(_script(tmp_path, STUBBORN))], "m-unit")
    grandchild = int(proc.stdout.readline().split()[-1])

    def second_ctrl_c(seconds):
        raise KeyboardInterrupt("second Ctrl-C")

    # the matrix's own view of the time module only: subprocess's waits sleep too
    monkeypatch.setattr(matrix, "time", SimpleNamespace(monotonic=time.monotonic, sleep=second_ctrl_c))
    with pytest.raises(KeyboardInterrupt):
        cells.stop_all()
    monkeypatch.undo()
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL and downs == ["m-unit"]
    time.sleep(0.2)
    assert not _alive(grandchild)
