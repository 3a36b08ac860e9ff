"""Traffic generated inside the guest on both vCPUs at once (stress tests of
per-rule and global match state: quota, nth, connlimit).

The lab VM runs with two vCPUs. :func:`parallel_script` starts one sender
process per CPU (``taskset -c 0`` / ``-c 1``; UDP datagrams or non-blocking
TCP connects), holds them at a barrier until both are ready, then lets them
send at the same time through the guest's OUTPUT chain to a ``dummy``
interface (:data:`DEV`), which discards every packet: nothing leaves the VM. Each process reports
the CPUs it was allowed to run on and how many sends succeeded; the tests
count what matched with rule counters (``iptables-save -c``), never with
clocks. Every wait in the guest is bounded.

Everything runs in one ``host.run`` per call (one SSH round trip).
"""

from __future__ import annotations

import re

import pytest

from tests.suites.catalog_helpers import BACKENDS, GUEST_DIR, TOOLS, send_tagged

DEV = "nflabd0"
LOCAL = {"ipv4": "10.99.0.1", "ipv6": "2001:db8:99::1"}
REMOTE = {"ipv4": "10.99.0.2", "ipv6": "2001:db8:99::2"}
HDR = {"ipv4": 20 + 8, "ipv6": 40 + 8}          # L3 + UDP header bytes: skb->len = HDR + payload
SCRIPT = "/tmp/nflab_sender.py"

# One sender. argv: mode (udp|tcp) family dst port size count barrier-dir (or -) index.
# udp: `count` datagrams of `size` payload bytes; tcp: `count` non-blocking
# connects (the SYN leaves inside connect(), on this CPU). Prints one line.
SENDER = r'''
import errno, os, socket, sys
mode, fam, dst, port, size, count, bdir, idx = sys.argv[1:9]
port, size, count = int(port), int(size), int(count)
af = socket.AF_INET6 if fam == "ipv6" else socket.AF_INET
socks, data, ok, err = [], b"n" * size, 0, {}
if mode == "udp":
    s = socket.socket(af, socket.SOCK_DGRAM)
if bdir != "-":   # barrier: say ready on one FIFO, block until the go byte on the other
    with open(os.path.join(bdir, "ready"), "wb", buffering=0) as f:
        f.write(b"r")
    with open(os.path.join(bdir, "go"), "rb", buffering=0) as f:
        if f.read(1) != b"g":
            sys.exit("barrier: no go")
for i in range(count):
    if mode == "udp":
        try:
            s.sendto(data, (dst, port))
            ok += 1
        except OSError as e:
            err[e.errno] = err.get(e.errno, 0) + 1
    else:
        c = socket.socket(af, socket.SOCK_STREAM)
        c.setblocking(False)
        rc = c.connect_ex((dst, port))
        ok += rc == errno.EINPROGRESS
        if rc != errno.EINPROGRESS:
            err[rc] = err.get(rc, 0) + 1
        socks.append(c)
cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
print(f"sender {idx} cpus={cpus} ok={ok} errors={err}")
'''


class Senders(list):
    """Per-process results: dicts with ``cpus`` (set) and ``ok`` (int)."""

    @property
    def ok(self) -> int:
        return sum(r["ok"] for r in self)


def setup_script() -> str:
    """Idempotent: the dummy interface with both families' addresses, and the sender."""
    return "\n".join([
        f"ip link show {DEV} >/dev/null 2>&1 || ip link add {DEV} type dummy",
        f"ip link set {DEV} up",
        f"sysctl -qw net.ipv6.conf.{DEV}.disable_ipv6=0 net.ipv6.conf.{DEV}.accept_dad=0",
        f"ip addr replace {LOCAL['ipv4']}/24 dev {DEV}",
        f"ip -6 addr replace {LOCAL['ipv6']}/64 dev {DEV} nodad",
        f"cat > {SCRIPT} <<'NFLAB_EOF'\n{SENDER}\nNFLAB_EOF",
    ])


@pytest.fixture(scope="session")
def sink(guest):
    """The guest's dummy sink interface and sender script; the number of CPUs."""
    res = guest.run("set -e\n" + setup_script() + "\nnproc")
    assert res.rc == 0, f"cannot set up {DEV}: {res.stderr}"
    cpus = int(res.stdout.split()[-1])
    if cpus < 2:
        pytest.fail(f"the guest has {cpus} CPU(s); the concurrency tests need 2 (the kit boots -smp 2)")
    return DEV


def parallel_script(mode: str, family: str, port: int, size: int, count: int,
                    cpus=(0, 1), after: str = "") -> str:
    """Shell: run one sender per CPU of *cpus*, released together; then *after*.

    The barrier is two FIFOs the shell holds open read-write: each sender
    writes a byte to ``ready`` and blocks reading ``go``; the shell reads one
    ready byte per sender (bounded by ``timeout``), then writes one go byte
    per sender. Nothing polls."""
    bdir = "/tmp/nflab_barrier"
    args = f"{mode} {family} {REMOTE[family]} {port} {size} {count} {bdir}"
    n = len(cpus)
    lines = [f"rm -rf {bdir}; mkdir -p {bdir} && mkfifo {bdir}/ready {bdir}/go",
             f"exec 3<>{bdir}/ready 4<>{bdir}/go"]
    for i, cpu in enumerate(cpus):
        lines.append(f"taskset -c {cpu} python3 {SCRIPT} {args} {i} > {bdir}/out.{i} 2>&1 &")
    lines += [
        f"timeout 60 head -c {n} <&3 >/dev/null",
        f"printf '{'g' * n}' >&4",
        "wait",
        "exec 3>&- 4>&-",
        f"cat {bdir}/out.*",
    ]
    if after:
        lines.append(after)
    return "\n".join(lines)


def parse_senders(text: str, cpus=(0, 1)) -> Senders:
    res = Senders()
    for m in re.finditer(r"^sender (\d+) cpus=([\d,]+) ok=(\d+) errors=(.*)$", text, re.M):
        res.append({"idx": int(m.group(1)), "cpus": {int(c) for c in m.group(2).split(",")},
                    "ok": int(m.group(3)), "errors": m.group(4)})
    assert len(res) == len(cpus), f"expected {len(cpus)} sender reports, got:\n{text}"
    got = sorted((r["idx"], r["cpus"]) for r in res)
    want = [(i, {c}) for i, c in enumerate(cpus)]
    assert got == want, f"senders ran on {got}, wanted one pinned to each of {cpus}"
    return res


def save_rules(text: str, chain: str):
    """[(packets, bytes, rule text)] of *chain* from ``iptables-save -c`` output, in order."""
    out = []
    for line in text.splitlines():
        m = re.match(rf"\[(\d+):(\d+)\] -A {chain} (.*)$", line)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), m.group(3)))
    return out


def flush_script(chains=("FORWARD", "OUTPUT"), families=tuple(TOOLS), backends=BACKENDS) -> str:
    """Flush *chains* of the filter table (policy ACCEPT) for *families* x
    *backends* (default: all): one restore per tool, all in one round trip."""
    text = "*filter\\n" + "".join(f":{c} ACCEPT [0:0]\\n-F {c}\\n" for c in chains) + "COMMIT\\n"
    return "; ".join(f"printf '{text}' | {TOOLS[f]}-{b}-restore -w --noflush"
                     for f in families for b in backends)


def param_scope(request) -> dict:
    """The family/backend a parametrized test uses (all of them when it does not say)."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    return {"families": [params["family"]] if "family" in params else list(TOOLS),
            "backends": [params["backend"]] if "backend" in params else list(BACKENDS)}


@pytest.fixture
def clean_filter(request, host, routed, sink):
    """FORWARD and OUTPUT of the filter table empty before and after the test,
    for the family and backend it is parametrized with (each test cleans up
    its own; suites that use other tables clean theirs)."""
    script = flush_script(**param_scope(request))
    host.run(script)
    yield
    host.run(script)


def reload_script(module: str, tries: int = 100, params: str = "") -> str:
    """rmmod + insmod the kit's *module* (fresh global state), with module
    *params* (``name=value ...``). nf_tables releases deleted rules'
    expressions from a work queue, so rmmod may need a few tries."""
    return (f"for i in $(seq {tries}); do rmmod {module} 2>/dev/null && break; sleep 0.05; done; "
            f"test ! -e /sys/module/{module} && insmod {GUEST_DIR}/{module}.ko {params} && "
            f"grep -q O /sys/module/{module}/taint")



def positions_batch(wire, tag, make, sentinel_make):
    """``batch(n)``: send n packets ``make(tag)`` from the client wire, then a
    sentinel ``sentinel_make(tag)`` that no rule drops (frames keep their
    order, so once it is out every verdict is in); the 1-based positions of
    the n packets that arrived."""
    def batch(n):
        ts = [tag() for _ in range(n)]
        sentinel = tag()
        got = send_tagged(wire, {t: make(t) for t in ts}, sentinel=(sentinel, sentinel_make(sentinel)))
        return [ts.index(t) + 1 for t in ts if t in got]
    return batch


REPLACEMENTS = ("fresh rule", "after adding another rule to the table",
                "after -R of the rule", "after -Z")


def replacement_steps(host, tool, rule, other_rule, batch, sizes) -> dict:
    """The rule-replacement walk of the stateful suites, rule 1 of FORWARD being
    *rule*: ``batch(n)`` fresh, after *other_rule* is appended (iptables-legacy
    replaces the whole table, nft adds one rule), after ``-R`` of rule 1 and
    after ``-Z`` (legacy: a table replacement; nft: each rule replaced); *sizes*
    gives n per step. Returns {step name (REPLACEMENTS): positions that arrived}."""
    steps = {REPLACEMENTS[0]: batch(sizes[0])}
    for name, cmd, n in zip(REPLACEMENTS[1:], (f"-A FORWARD {other_rule}", f"-R FORWARD 1 {rule}",
                                               "-Z FORWARD"), sizes[1:]):
        host.run_test(f"{tool} {cmd}")
        steps[name] = batch(n)
    return steps
