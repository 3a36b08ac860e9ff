"""pytest plugin for nflab suites: options, fixtures and failure context.

Loaded by ``tests/suites/conftest.py`` (``pytest_plugins``). Options:

* ``--nflab-vm=NAME``   the kit VM the suites run in (default: ``$NFLAB_VM``;
  unset when the suites run against a real machine given with ``--hosts``)
* ``--nflab-ext=NAME``  extensions installed for this run (repeatable)
* ``--nflab-test-timeout=SECONDS``  bound on each test's setup, call and
  teardown (default ``$NFLAB_TEST_TIMEOUT`` or 300; 0: none), ``nflab/watchdog.py``

When a test fails, its report gets the guest's rule set (``iptables-save``,
``ip6tables-save``, ``nft list ruleset``), the tracer log when the tracer is
loaded, and the tail of the VM console: what a person needs to see why.

With ``--html`` (pytest-html), every test's row also gets an HTML section
(``nflab/report.py``): each packet the host sent, the path it took through the
hooks as the packet-path tracer saw it (hook, priority, devices, mark, ct
state), its verdict (which wire it arrived on, or where it stopped), and the
rules with counters on both iptables backends plus ``nft list ruleset`` after
the test. In a kit VM the tracer is built and inserted before the first test
when it is not loaded (it records only tagged packets and accepts every
packet); after each test one guest command reads and clears its log and lists
the rules, so each test shows only its own packets. Without ``--html`` none
of this runs.
"""

from __future__ import annotations

import os
import threading

import pytest
import testinfra

from ground.errors import VMError
from nflab import report as rep
from nflab import start_gate, tracing
from nflab import watchdog
from vm import lab, topology
from vm import wire as vm_wire


def pytest_addoption(parser):
    group = parser.getgroup("nflab")
    group.addoption("--nflab-vm", default=os.environ.get("NFLAB_VM"),
                    help="kit VM the suites run in (default $NFLAB_VM)")
    group.addoption("--nflab-ext", action="append", default=[],
                    help="extension installed for this run (repeatable)")
    group.addoption("--nflab-test-timeout", default=None,
                    help=f"seconds each test phase may take (default ${watchdog.ENV} or "
                         f"{watchdog.DEFAULT:g}; 0: no bound)")


def pytest_configure(config):
    seconds = watchdog.bound_from(config.getoption("--nflab-test-timeout"))
    config.pluginmanager.register(watchdog.Watchdog(seconds), "nflab-watchdog")


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    """``invoke test`` starts pytest while the VM still boots (imports and
    collection overlap the boot) and holds the first test at the start gate
    (nflab/start_gate.py) until the extensions are installed; ``abort`` (the
    boot or an install failed: the parent reports why) ends the run before any
    test."""
    gate = os.environ.get(start_gate.ENV)
    if not gate or session.config.option.collectonly:
        return None
    # the suites' scapy import (~1 s) happens while the VM boots, not in the first test
    threading.Thread(target=vm_wire._scapy, name="nflab-scapy-import", daemon=True).start()
    if not start_gate.wait(gate):
        pytest.exit("nflab: no VM to test in (the run that started pytest says why)", returncode=3)
    return None


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
    # the other hook modules' state (pktlog's counters, limit and filter), as the report lists it
    ("hook modules", dict(tracing.REPORT_SOURCES)["nflab hook modules"].format(module=tracing.MODULE)),
    ("kernel log", "dmesg | tail -30"),
]


class _HtmlReport:
    """Per-session state of the --html packet report."""

    def __init__(self, config):
        self.config = config
        self.started = False
        self.tracer_note: str | None = None
        # the wire's frame numbers when the sent-frame journal was last taken: the
        # frames received since then are matched with the frames sent since then
        # (both include the fixtures' setup and the previous test's teardown)
        self.wire_mark: dict | None = None

    def vm(self):
        return self.config.getoption("--nflab-vm")

    def start(self, item):
        """Before the first test: the tracer in the kit VM (built and inserted when
        missing), its log cleared."""
        self.started = True
        vm = self.vm()
        try:
            if vm:
                self.tracer_note = tracing.ensure_loaded(vm)
            self.run(item, f"test -w /proc/net/{_tracer_module()} && "
                           f"echo clear > /proc/net/{_tracer_module()}")
        except Exception as exc:      # no tracer: the report still lists packets and rules
            self.tracer_note = f"the tracer could not be loaded: {str(exc)[:300]}"

    def run(self, item, cmd) -> tuple:
        vm = self.vm()
        if vm:
            res = lab.exec(vm, cmd, timeout=60)
            return res.returncode, res.stdout
        host = item.funcargs.get("host") or item.funcargs.get("guest")
        if host is None:
            raise VMError("no target host for this test",
                          hint="run it through invoke test, or give pytest --hosts=<vm-up's last line>")
        res = host.run(cmd)
        return res.rc, res.stdout


def _tracer_module():
    return tracing.MODULE


def _html_report(config):
    """The --html report state, or None when no HTML report was asked for."""
    state = getattr(config, "_nflab_html", None)
    if state is None:
        if not getattr(config.option, "htmlpath", None):
            return None
        state = config._nflab_html = _HtmlReport(config)
    return state


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    state = _html_report(item.config)
    if state is not None:
        if not state.started:
            state.start(item)
        wire = item.funcargs.get("wire")
        if wire is not None and hasattr(wire, "mark"):
            try:
                item._nflab_wire_mark = wire.mark()
            except Exception:
                item._nflab_wire_mark = None
    yield


def _html_section(item, state, sent) -> str:
    wire = item.funcargs.get("wire")
    received = []
    mark = state.wire_mark or getattr(item, "_nflab_wire_mark", None)
    if wire is not None and mark is not None and hasattr(wire, "received_since"):
        now = wire.mark()
        received = wire.received_since(mark)
        state.wire_mark = now
    try:
        _rc, out = state.run(item, tracing.report_command())
        collected = tracing.parse_report(out)
    except Exception as exc:            # the guest may be the thing that broke
        collected = {"tracer": (None, f"unavailable: {exc}")}
    note, state.tracer_note = state.tracer_note, None       # said once, in the first test
    return rep.section(sent, received, collected, tracer_note=note)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call":
        return
    wire = item.funcargs.get("wire")
    sent = []
    if wire is not None:
        sent = wire.take_sent()
    if sent:
        report.sections.append(("packets sent (scapy)", "\n".join(map(str, sent))))
    if report.failed:
        _failure_context(item, report)
    state = _html_report(item.config)
    if state is not None and state.started:
        # after the failure context: collecting clears the tracer log it shows
        try:
            from pytest_html import extras     # optional dependency: only with --html (pytest-html)
            html = _html_section(item, state, [s for s in sent if hasattr(s, "raw")])
            report.extras = list(getattr(report, "extras", [])) + [extras.html(html)]
        except Exception as exc:
            report.sections.append(("nflab html report", f"unavailable: {exc!r}"))


def _failure_context(item, report):
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
    w = vm_wire.Wire.for_vm(nflab_vm)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture(scope="session")
def guest(request):
    """A session-wide testinfra host for the target (fixtures that outlive a module)."""
    hosts = request.config.getoption("hosts", None)
    if not hosts:
        pytest.skip(getattr(request.config, "_nflab_skip", None) or "no --hosts")
    return testinfra.get_host(hosts.split(",")[0])


@pytest.fixture(scope="session")
def routed(guest):
    """The guest configured as a router between the client and server wires."""
    topology.setup(guest)
    return topology
