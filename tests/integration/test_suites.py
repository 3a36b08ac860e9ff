"""The main job, end to end: `invoke test` on real kernels.

Each run builds the extension for the kernel, boots (or reuses) a VM,
installs module and plugin, and runs the scapy/testinfra suites in a pytest
subprocess; this test asserts on that run's exit status and JUnit counts.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from ground.paths import REPO
from kmods import spec
from nflab.suites import SUITES, parse_junit, suite_files
from vm import lab
from tests.conftest import SUPPORTED_ENDS, run_stopping

pytestmark = [pytest.mark.slow, pytest.mark.vm]


# the whole catalog on the oldest and the newest supported line, the placement suites
# on those and on the release candidate. Every line in between (6.1, 6.12) and the
# catalog on rc are cells of `invoke matrix --kernels=supported` (README: the matrix
# table); CI's hour holds the ends, where the API changes bite first. 6.1 and 6.12
# still boot here: the VM, atlas, build and workshop tests run on them.
KERNELS = SUPPORTED_ENDS
CELLS = [("catalog", k) for k in KERNELS] + [("tracer", k) for k in KERNELS + ("rc",)]


@pytest.mark.parametrize("name,kernel", CELLS, ids=[f"{n}-{k}" for n, k in CELLS])
def test_invoke_test_passes(tmp_path, kernel, name):
    """`tracer`: the placement/priority suites; `catalog`: every catalog extension
    (iprange alone, the quickstart's main job, runs in test_matrix_run.py)."""
    junit = tmp_path / "junit.xml"
    which = [] if name == "catalog" else [f"--name={name}"]
    # a cell takes 5 min on an idle 2-core host, 20 at load 8; the bound catches a hang
    res = run_stopping([sys.executable, "-m", "invoke", "test", *which,
                        f"--kernel={kernel}", f"--junit={junit}", "--quiet"],
                       cwd=REPO, timeout=2700, env=dict(os.environ, CI="1"))
    counts, failures = parse_junit(junit)
    assert res.returncode == 0, (res.stdout[-6000:] + res.stderr[-4000:])
    assert counts["tests"] > 0 and not failures
    assert counts["failures"] == 0 and counts["errors"] == 0
    names = spec.catalog_names() if name == "catalog" else [name]
    expected = {f"tests.suites.{f.stem}" for f in suite_files(names) if f.parent == SUITES}
    ran = _files_that_ran(junit)
    # every suite file ran tests, not merely "some test somewhere": a file whose every
    # test skipped on this kernel (a wrong feature check, a missing tool) fails here
    assert expected and expected <= set(ran), f"ran nothing of {sorted(expected - set(ran))}"


def _files_that_ran(junit) -> dict[str, int]:
    """{suite module: tests of it that ran (not skipped)} in a JUnit file."""
    ran = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        m = re.match(r"tests\.suites\.test_\w+", case.get("classname", ""))
        if m and case.find("skipped") is None:
            ran[m.group(0)] = ran.get(m.group(0), 0) + 1
    return ran


def test_a_kernel_without_legacy_xtables_is_tested_through_nft_only(tmp_path):
    """Debian's rt flavour of the newest line has no legacy xtables (no ip_tables, no
    iptable_filter): the whole catalog passes through iptables-nft (nft_compat), the
    legacy half is skipped with that reason, and the run says which backend it tested
    (rules written through one backend are invisible to the other)."""
    junit = tmp_path / "junit.xml"
    res = run_stopping([sys.executable, "-m", "invoke", "test", "--kernel=7.3-rt-amd64",
                        f"--junit={junit}", "--quiet"],
                       cwd=REPO, timeout=2700, env=dict(os.environ, CI="1"))
    counts, failures = parse_junit(junit)
    assert res.returncode == 0, (res.stdout[-6000:] + res.stderr[-4000:])
    assert not failures and counts["failures"] == 0 and counts["errors"] == 0
    assert counts["tests"] - counts["skipped"] > 0 and counts["skipped"] > 0
    assert "iptables backends tested: nft only (legacy skipped:" in res.stdout, res.stdout[-3000:]


def test_sigterm_during_the_suites_stops_the_vms_it_booted():
    """CI's timeout (and `kill`) sends SIGTERM: the VMs `invoke test` booted stop, as
    with Ctrl-C (their QEMUs run in their own sessions and would outlive it)."""
    proc = subprocess.Popen([sys.executable, "-m", "invoke", "test", "--name=iprange", "--kernel=6.12",
                             "--jobs=1", "--quiet"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, CI="1"))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "running " in line and "suite file(s)" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    out = "".join(seen) + rest
    assert proc.returncode != 0, out
    vm = re.search(r"(?:booting|restoring) \S+ as VM '([^']+)'", out).group(1)
    assert f"stopping VM {vm}" in out, out
    state = lab.load(vm)
    assert state is None or not lab.is_running(state), out
