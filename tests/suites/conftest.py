"""Fixtures of the testinfra suites: target host, wire, topology, tracer.

Target: ``--hosts`` if given; otherwise the running kit VM named by
``--nflab-vm`` / ``$NFLAB_VM`` (``default`` if unset), whose testinfra spec is
used as ``--hosts``. With neither, every suite test is skipped with the reason
(they never run against the local machine: nothing here loads modules or
changes rules on the host). ``wire`` exists only for kit VMs; against another
machine the tests that need it skip.

``xtables``: which iptables backends the target's kernel serves
(``vm/xtables.py``: legacy xtables, nft_compat or both). A test parametrized
with a backend the kernel lacks (``backend``, or the ``.t`` runner's
``t_file``) is skipped with the reason; a test that needs just one backend
uses ``xtables.primary`` (legacy where it exists). ``$NFLAB_BACKENDS=nft``
narrows the run to one backend on any kernel. The JUnit file records
which backends were tested (testsuite property ``nflab_xtables``) and the
terminal summary says it when one was skipped.

``tracer``: the kit's ``nflab_tracer`` in the guest (built for the VM's kernel
and inserted when missing or stale; its netdev INGRESS point attaches to the
``ingress_dev`` default its definition declares, eth1, the client wire), with
``read()``/``clear()``/``wait()`` (see ``tracing.Tracer``).
"""

from __future__ import annotations

import itertools
import os
import re
import time

import pytest

from nflab import tracing
from vm import remote, xtables as xt

SUITES_DIR = os.path.dirname(os.path.abspath(__file__))
_SPEC_VM = re.compile(r"^ssh://nflab-([A-Za-z0-9][A-Za-z0-9_-]*)\?")


def pytest_addoption(parser, pluginmanager):
    # the lead's plugin: --nflab-vm/--nflab-ext, wire, routed, failure context.
    # `invoke test` passes -p nflab.pytest_plugin; a plain pytest run gets it here.
    if not pluginmanager.has_plugin("nflab.pytest_plugin"):
        import nflab.pytest_plugin as plugin
        pluginmanager.register(plugin, "nflab.pytest_plugin")


def _kit_state(vm):
    try:
        from vm import lab
        st = lab.load(vm)
        if st is not None and lab.is_running(st) and st.status == "ready":
            return st
    except Exception:
        return None
    return None


def pytest_configure(config):
    config._nflab_skip = None
    hosts = config.getoption("hosts", None)
    vm = config.getoption("nflab_vm", None)
    if hosts:
        if not vm:                       # --hosts naming a kit VM: find its wire too
            m = _SPEC_VM.match(hosts.split(",")[0])
            if m and _kit_state(m.group(1)):
                config.option.nflab_vm = m.group(1)
        return
    vm = vm or "default"
    st = _kit_state(vm)
    if st is None:
        config._nflab_skip = (f"no target: pass --hosts=SPEC, or boot a kit VM "
                              f"(`invoke vm-up --vm={vm}`, NFLAB_VM={vm})")
        return
    config.option.hosts = st.testinfra_spec
    config.option.nflab_vm = vm


def pytest_collection_modifyitems(config, items):
    reason = getattr(config, "_nflab_skip", None)
    if not reason:
        return
    for item in items:
        if str(item.fspath).startswith(SUITES_DIR):
            item.add_marker(pytest.mark.skip(reason=reason))


# ---------------------------------------------------------------- helpers

_tags = itertools.count((int(time.time() * 1000) & 0x3fff) << 16)


@pytest.fixture
def tag():
    """A fresh tag per call: ``tag()`` -> int (tracer and wire filter on it)."""
    return lambda: next(_tags)


@pytest.fixture(scope="session")
def kit_vm(request):
    return request.config.getoption("nflab_vm", None)


@pytest.fixture(scope="session")
def topo(routed, wire):
    """Routed guest plus the host side of both wires."""
    return routed


@pytest.fixture(scope="session")
def xtables(request, guest, kit_vm, record_testsuite_property) -> xt.Backends:
    """The iptables backends the target's kernel serves: a kit VM's from its kernel
    cache entry, another machine's read in the guest."""
    found = xt.selected(xt.for_vm(kit_vm) if kit_vm else
                        xt.from_guest_output(guest.run(xt.GUEST_COMMAND).stdout))
    record_testsuite_property("nflab_xtables", found.describe())
    request.config._nflab_xtables = found
    return found


def backend_of(item) -> str | None:
    """The iptables backend a collected test is parametrized with, if any."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "backend" in params:
        return params["backend"]
    t_file = params.get("t_file")
    return t_file[2] if isinstance(t_file, tuple) else None


@pytest.fixture(autouse=True)
def _backend_gate(request):
    """Skip a test of a backend the kernel does not serve, saying why."""
    backend = backend_of(request.node)
    if backend is not None:
        reason = request.getfixturevalue("xtables").skip_reason(backend)
        if reason:
            pytest.skip(reason)


def pytest_terminal_summary(terminalreporter, config):
    found = getattr(config, "_nflab_xtables", None)
    if found is not None and found.missing:
        terminalreporter.write_line(f"nflab: iptables backends tested: {found.describe()}")


@pytest.fixture(scope="session")
def conntrack_on(guest):
    """Conntrack (and with it defrag at -400) active in the guest's netns for
    IPv4 and IPv6: an nftables ``ct`` expression in an inet chain at priority
    300, after every tracer point, that never changes a verdict."""
    table = "nflab_ct"
    script = (f"nft delete table inet {table} 2>/dev/null; "
              f"nft add table inet {table} && "
              f"nft add chain inet {table} pre '{{ type filter hook prerouting priority 300; }}' && "
              f"nft add rule inet {table} pre ct state invalid counter")
    res = guest.run(script)
    assert res.rc == 0, f"cannot enable conntrack: {res.stderr}"
    yield
    guest.run(f"nft delete table inet {table}")


def tracer_ingress_dev(ext=None) -> str:
    """The ``ingress_dev`` default the tracer definition declares (``[[params]]``)."""
    from kmods import spec
    ext = ext or spec.load("tracer")
    for p in ext.params:
        if p["name"] == "ingress_dev":
            return p["default"]
    raise AssertionError(f"{ext.name}: the definition declares no ingress_dev parameter")


def _install_tracer(guest, vm, *, module="nflab_tracer", ext=None):
    """Build *ext* (default: the catalog's tracer) for the VM's kernel and insert it
    without parameters: the definition's defaults apply (checked after loading)."""
    from kmods import build, spec
    from supply import kernels
    from vm import lab

    st = lab.require(vm)
    ext = ext or spec.load("tracer")
    want_dev = tracer_ingress_dev(ext)
    art = build.build_extension(ext, kernels.by_release(st.release), with_plugin=False)
    dest = f"/root/{module}.ko"
    show = f"cat /sys/module/{module}/srcversion /sys/module/{module}/parameters/ingress_dev"
    loaded = guest.run(show)
    if loaded.rc == 0 and loaded.stdout.split() == [art.srcversion, want_dev] \
            and guest.file(dest).exists:
        return art
    lab.copy_to(vm, art.ko, dest, mode=0o644)
    res = guest.run(f"rmmod {module} 2>/dev/null; insmod {dest}")
    assert res.rc == 0, f"insmod {module}: {res.stderr}"
    loaded = guest.run(show)
    assert loaded.stdout.split() == [art.srcversion, want_dev], \
        f"{module} loaded as {loaded.stdout.split()}, want srcversion {art.srcversion}, " \
        f"ingress_dev {want_dev} (the definition's default)"
    return art


@pytest.fixture(scope="session")
def tracer(guest, kit_vm, topo, conntrack_on):
    """The tracer in the guest, cleared; skips where it is missing and cannot be loaded."""
    if kit_vm:
        _install_tracer(guest, kit_vm)
    elif not guest.file(f"/proc/net/{tracing.MODULE}").exists:
        pytest.skip(f"{tracing.MODULE} is not loaded on the target and it is not a kit VM")
    t = tracing.Tracer(tracing.host_runner(guest))
    t.clear()
    return t


@pytest.fixture
def trace(tracer):
    """The tracer, cleared before the test."""
    tracer.clear()
    return tracer


class Rules:
    """iptables rules a test adds; removed again at teardown (nobody else's are
    touched). Each call is one SSH round trip, however many rules it adds."""

    def __init__(self, host, backend="legacy"):
        self.host = host
        self.backend = backend          # the default: the kernel's primary backend
        self.added = []

    @staticmethod
    def _tool(family, backend):
        return {"ipv4": "iptables", "ipv6": "ip6tables"}[family] + f"-{backend}"

    def add(self, family, table, chain, spec, backend=None):
        self.add_many(family, [(table, chain, spec)], backend)

    def add_many(self, family, specs, backend=None):
        """Append every (table, chain, spec) in order; the first that fails fails the test."""
        tool = self._tool(family, backend or self.backend)
        cmds = [f"{tool} -w -t {table} -A {chain} {spec}" for table, chain, spec in specs]
        # print the index of each rule added, so a failure names its rule
        script = "; ".join(f"{c} || {{ echo \"failed {i}\"; exit 1; }}" for i, c in enumerate(cmds))
        res = remote.run(self.host, script)
        done = len(cmds) if res.rc == 0 else int(res.stdout.split()[-1]) if "failed" in res.stdout else 0
        self.added += [(tool, *s) for s in specs[:done]]
        assert res.rc == 0, f"`{cmds[done] if done < len(cmds) else script}`: {res.stderr.strip()}"

    def remove_all(self):
        if self.added:
            remote.run(self.host, "; ".join(f"{tool} -w -t {table} -D {chain} {spec}"
                                            for tool, table, chain, spec in reversed(self.added)))
        self.added = []


@pytest.fixture
def rules(guest, xtables):
    r = Rules(guest, xtables.primary)
    yield r
    r.remove_all()


@pytest.fixture(scope="session")
def kernel_release(guest):
    return guest.run("uname -r").stdout.strip()
