"""Fixtures of the workshop suites: the same target, wire and routed guest as
``tests/suites`` (imported from its conftest, not copied), plus helpers.

Run them with ``invoke workshop --exercise=N`` (builds, boots, installs the
exercise, runs its suite), or against a running VM with
``pytest tests/workshop/test_exNN_*.py --nflab-vm=NAME`` after installing it.
Without a target every test here is skipped with the reason.
"""

from __future__ import annotations

import os

import pytest

# target selection (--hosts / --nflab-vm / $NFLAB_VM) and the session fixtures of the
# catalog suites; the nflab pytest plugin brings guest, routed, wire and failure context
from tests.suites.conftest import (  # noqa: F401
    kit_vm,
    pytest_configure,
    rules,
    tag,
    topo,
    xtables,
)
from tests.suites.conftest import pytest_addoption as _suites_addoption

WORKSHOP_DIR = os.path.dirname(os.path.abspath(__file__))
_red_files: set = set()


def pytest_addoption(parser, pluginmanager):
    _suites_addoption(parser, pluginmanager)
    parser.getgroup("nflab").addoption(
        "--nflab-first-failure", action="store_true", default=False,
        help="skip the rest of an exercise's suite once one of its tests failed "
             "(grading a skeleton: red is red)")


def pytest_collection_modifyitems(config, items):
    reason = getattr(config, "_nflab_skip", None)
    if not reason:
        return
    for item in items:
        if str(item.fspath).startswith(WORKSHOP_DIR):
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_setup(item):
    if item.config.getoption("nflab_first_failure", False) and str(item.fspath) in _red_files:
        pytest.skip("this exercise is already red (--nflab-first-failure)")


def pytest_runtest_logreport(report):
    if report.failed and report.when in ("setup", "call"):
        _red_files.add(os.path.join(WORKSHOP_DIR, os.path.basename(report.fspath)))


@pytest.fixture(scope="session")
def forwarding(guest, routed):
    """The routed guest with empty FORWARD chains and policy ACCEPT (both
    families and backends), set once in one round trip; tests remove the
    rules they add (``rules``)."""
    script = "; ".join(f"{tool}-{backend} -w -F FORWARD; {tool}-{backend} -w -P FORWARD ACCEPT"
                       for tool in ("iptables", "ip6tables") for backend in ("legacy", "nft"))
    guest.run(script)
    return routed


def module_param(host, module, name) -> int:
    """An integer module parameter as the guest's sysfs shows it."""
    f = host.file(f"/sys/module/{module}/parameters/{name}")
    assert f.exists, f"{module} has no parameter {name} (is it loaded?)"
    return int(f.content_string.strip())


def proc_points(host, module) -> dict:
    """``point`` lines of /proc/net/<module>: {(family, hook): (priority, registered, packets)}."""
    from tests.suites.catalog_helpers import proc_lines
    return {(w[1], w[2]): (int(w[3]), int(w[4]), int(w[5])) for w in proc_lines(host, module, "point")}
