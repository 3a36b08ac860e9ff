"""Rule syntax: every extension's iptables ``.t`` files, on both backends.

Each case adds a rule with iptables-legacy and iptables-nft (nft_compat) in a
throwaway netns in the guest (all files of the session in one round trip, two
at a time) and checks the exit status and what
``iptables-save`` prints back, so parse/print/save of the kit's plugin and
checkentry of its module are exercised together. On a kernel without legacy
xtables only the nft half runs; the legacy half is skipped with the reason
(``xtables`` in conftest.py).
"""

from __future__ import annotations

import pytest

from kmods.spec import definition_path
from nflab import rules_t

pytestmark = pytest.mark.vm


def _files(exts):
    for ext in exts:
        # the kit's catalog or a folder of $NFLAB_EXTRA_CATALOG (--extensions-dir)
        for path in sorted(definition_path(ext).parent.glob("lib*.t")):
            yield ext, path


def pytest_generate_tests(metafunc):
    if "t_file" in metafunc.fixturenames:
        exts = metafunc.config.getoption("--nflab-ext") or []
        params = [pytest.param((ext, path, backend), id=f"{path.name}-{backend}")
                  for ext, path in _files(exts) for backend in rules_t.BACKENDS]
        metafunc.parametrize("t_file", params or [pytest.param(None, marks=pytest.mark.skip(
            reason="no --nflab-ext with .t files given"))])


@pytest.fixture(scope="module")
def t_results(request, host, xtables):
    """Every (.t file, backend) pair of this session the kernel serves, run on
    *host* in one round trip, two at a time (both vCPUs); each test then reports
    its own pair."""
    exts = request.config.getoption("--nflab-ext") or []
    runs = [(path, backend) for _, path in _files(exts) for backend in rules_t.BACKENDS
            if backend in xtables.usable]
    return rules_t.run_many(host, runs, jobs=2)


def test_rule_syntax(host, t_results, t_file):
    ext, path, backend = t_file
    results = t_results[(path, backend)]
    if isinstance(results, Exception):
        raise results
    assert results, f"{path} has no rules"
    bad = [f"{r.case.id} [{backend}] {r.case.rule!r}: {r.problem}" for r in results if not r.passed]
    assert not bad, "\n".join(bad)
