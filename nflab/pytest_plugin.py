"""pytest plugin for nflab suites: options, fixtures and failure context.

Loaded by ``tests/suites/conftest.py`` (``pytest_plugins``). Options:

* ``--nflab-vm=NAME``   the kit VM the suites run in (default: ``$NFLAB_VM``;
  unset when the suites run against a real machine given with ``--hosts``)
* ``--nflab-ext=NAME``  extensions installed for this run (repeatable)

When a test fails, its report gets the guest's rule set (``iptables-save``,
``ip6tables-save``, ``nft list ruleset``), the tracer log when the tracer is
loaded, and the tail of the VM console: what a person needs to see why.
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("nflab")
    group.addoption("--nflab-vm", default=os.environ.get("NFLAB_VM"),
                    help="kit VM the suites run in (default $NFLAB_VM)")
    group.addoption("--nflab-ext", action="append", default=[],
                    help="extension installed for this run (repeatable)")


@pytest.fixture(scope="session")
def nflab_vm(request):
    """Name of the kit VM, or None against a machine that is not a kit VM."""
    return request.config.getoption("--nflab-vm")


@pytest.fixture(scope="session")
def nflab_exts(request):
    return list(request.config.getoption("--nflab-ext") or [])


_CONTEXT_CMDS = [
    ("iptables-save", "iptables-save -c 2>&1 | head -150"),
    ("ip6tables-save", "ip6tables-save -c 2>&1 | head -150"),
    ("nft ruleset", "nft list ruleset 2>&1 | head -150"),
    ("tracer log", "test -r /proc/net/nflab_tracer && tail -60 /proc/net/nflab_tracer"),
    ("kernel log", "dmesg | tail -30"),
]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call":
        return
    wire = item.funcargs.get("wire")
    if wire is not None and hasattr(wire, "take_journal"):
        sent = wire.take_journal()
        if sent:
            report.sections.append(("packets sent (scapy)", "\n".join(sent)))
    if not report.failed:
        return
    host = item.funcargs.get("host")
    if host is not None:
        for title, cmd in _CONTEXT_CMDS:
            try:
                out = host.run(cmd)
                if out.stdout.strip():
                    report.sections.append((f"guest {title}", out.stdout))
            except Exception as exc:   # the guest may be the thing that broke
                report.sections.append((f"guest {title}", f"unavailable: {exc}"))
    vm = item.config.getoption("--nflab-vm")
    if vm:
        try:
            from vm import lab
            state = lab.load(vm)
            if state is not None:
                text = lab.console_text(state)
                report.sections.append(("VM console (tail)", "\n".join(text.splitlines()[-40:])))
        except Exception as exc:
            report.sections.append(("VM console (tail)", f"unavailable: {exc}"))


@pytest.fixture(scope="session")
def wire(nflab_vm):
    """Host-side scapy L2 on the kit VM's client/server wires (skips on non-kit hosts)."""
    if not nflab_vm:
        pytest.skip("no kit VM (--nflab-vm/$NFLAB_VM): the packet wires exist only in kit VMs")
    from vm.wire import Wire
    w = Wire.for_vm(nflab_vm)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(scope="session")
def guest(request):
    """A session-wide testinfra host for the target (fixtures that outlive a module)."""
    import testinfra
    hosts = request.config.getoption("hosts", None)
    if not hosts:
        pytest.skip(getattr(request.config, "_nflab_skip", None) or "no --hosts")
    return testinfra.get_host(hosts.split(",")[0])


@pytest.fixture(scope="session")
def routed(guest):
    """The guest configured as a router between the client and server wires."""
    from vm import topology
    topology.setup(guest)
    return topology
