"""Progress output: reporting never stops the work."""

from __future__ import annotations

import subprocess
import sys

from ground.paths import REPO

# stderr is a pipe whose reader is gone (`invoke test 2>&1 | head -1` once the
# head has its line); the task goes on to its clean-up, which reports too
CHILD = """
import os, sys
from ground.output import Progress
r, w = os.pipe()
os.close(r)
os.dup2(w, 2)
p = Progress(quiet=True)
p("booting")
p("stopping VM x")
p.done()
print("error: a later line", file=sys.stderr, flush=True)
print("clean-up ran")
"""


def test_a_reader_that_went_away_does_not_stop_the_clean_up():
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "clean-up ran\n"
