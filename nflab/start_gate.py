"""The start gate between `invoke test` and the pytest it starts.

`invoke test` (:func:`nflab.suites.run`) starts pytest before the VM is up, so
pytest's imports and collection overlap the boot and the installs: the target
is known in advance (``--hosts=`` :func:`vm.lab.testinfra_spec_for`,
``--nflab-vm``), and pytest holds its first test at a gate file named by
``$NFLAB_START_GATE`` (:data:`ENV`):

* the parent :meth:`Gate.arm` s it (no word yet) and passes :meth:`Gate.env`;
* pytest (``nflab.pytest_plugin``) :func:`wait` s for a word;
* the parent writes ``go`` (:meth:`Gate.go`) once the VM is up and the
  extensions are installed: the tests run;
* or ``abort`` (:meth:`Gate.abort`: the boot or an install failed, the parent
  reports why): pytest ends before any test; so does a pytest whose parent is
  gone or that waited :data:`MAX_WAIT`;
* the parent :meth:`Gate.remove` s the file when the run ends.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "NFLAB_START_GATE"
MAX_WAIT = 1800.0     # seconds: a boot + installs never take this long
GO, ABORT = "go", "abort"


@dataclass
class Gate:
    """The parent's side of one pytest's gate file."""

    path: Path

    def arm(self):
        """Before pytest starts: no word yet."""
        self.path.unlink(missing_ok=True)

    def env(self) -> dict:
        """What pytest's environment needs to find the gate."""
        return {ENV: str(self.path)}

    def go(self):
        self.path.write_text(GO)

    def abort(self):
        """Stop a pytest that is still waiting (one that got ``go`` is stopped otherwise)."""
        if not self.path.exists():
            self.path.write_text(ABORT)

    def remove(self):
        self.path.unlink(missing_ok=True)


def wait(path: str, *, poll: float = 0.02) -> bool:
    """pytest's side: block until the gate at *path* says ``go`` (True); False on
    ``abort`` or any other word, when the parent process is gone, or after
    :data:`MAX_WAIT` seconds."""
    parent, deadline = os.getppid(), time.monotonic() + MAX_WAIT
    while True:
        try:
            word = Path(path).read_text().strip()
        except FileNotFoundError:
            word = ""
        if word == GO:
            return True
        if word or os.getppid() != parent or time.monotonic() > deadline:
            return False
        time.sleep(poll)
