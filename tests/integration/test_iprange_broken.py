"""The iprange suite catches a broken iprange: a rendered variant whose upper
bound is exclusive (``<`` instead of ``<=``) is installed in a VM, and the very
suite that passes on the real module must fail on it — on the B boundary only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from kmods import spec
from ground.paths import REPO

pytestmark = [pytest.mark.slow, pytest.mark.vm]

KERNEL = "6.1"
VM = "it-iprange-bad"
EXCLUSIVE = {
    f"m |= ntohl(iph->{a}) > ntohl(info->{d}_max.ip);": f"m |= ntohl(iph->{a}) >= ntohl(info->{d}_max.ip);"
    for a, d in (("saddr", "src"), ("daddr", "dst"))
} | {
    f"m |= iprange_lt6(&info->{d}_max.in6, &iph->{a});": f"m |= !iprange_lt6(&iph->{a}, &info->{d}_max.in6);"
    for a, d in (("saddr", "src"), ("daddr", "dst"))
}


@pytest.fixture(scope="module")
def broken_iprange(tmp_path_factory):
    folder = tmp_path_factory.mktemp("catalog") / "iprange"
    shutil.copytree(spec.CATALOG / "iprange", folder)
    tpl = folder / "xt_iprange.c.j2"
    text = tpl.read_text()
    for good, bad in EXCLUSIVE.items():
        assert good in text, f"the iprange template changed: {good!r} not found"
        text = text.replace(good, bad)
    tpl.write_text(text)
    return spec.load_file(folder / "ext.toml")


def test_suite_fails_on_exclusive_upper_bound(broken_iprange, tmp_path):
    from nflab import deploy
    from vm import lab

    lab.down(VM)
    state = lab.up(KERNEL, VM, progress=lambda *_: None)
    try:
        installed = deploy.install(broken_iprange, VM)
        assert "O" in installed.taint
        junit = tmp_path / "junit.xml"
        res = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "nflab.pytest_plugin", "-q",
             f"--hosts={state.testinfra_spec}", f"--nflab-vm={VM}", f"--junitxml={junit}",
             "-k", "verdicts_on_the_wire", str(REPO / "tests/suites/test_iprange.py")],
            cwd=REPO, capture_output=True, text=True, timeout=900, env=dict(os.environ, NFLAB_VM=VM))
    finally:
        lab.down(VM)
    assert res.returncode == 1, res.stdout[-3000:]
    # every wire test fails, and the reason is the B boundary, nothing else
    assert "4 failed" in res.stdout, res.stdout[-3000:]
    wrong = [m.group(0) for m in re.finditer(r"--(?:src|dst)-range[^\n]*?: (?:arrived|dropped), expected[^\n]*",
                                            res.stdout)]
    assert wrong and all(" B " in w for w in wrong), "\n".join(wrong)
    assert any("src=192.0.2.20 " in w for w in wrong) and any("2001:db8:1::20" in w for w in wrong)
