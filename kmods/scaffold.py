"""`invoke new-module`: write a definition, a starter template, a starter suite and
(matches, targets) a rule-syntax ``.t`` file, which build and run at once.

The suite sends a real packet through the lab's router and checks that the
extension saw it; its second test is a placeholder marked ``xfail(strict=True)``
that the author replaces with what the extension must do (a placeholder that
starts to pass fails the run), as the workshop skeletons are red until done.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from kmods import spec
from ground.errors import SpecError
from ground.paths import REPO

SUITES = REPO / "tests" / "suites"
PORT = 40900        # the starter suites' UDP port (no catalog suite uses it)
NFT_HOOKS = {"PRE_ROUTING": "prerouting", "LOCAL_IN": "input", "FORWARD": "forward",
             "LOCAL_OUT": "output", "POST_ROUTING": "postrouting"}

_MATCH_BODY = """{% extends "match.c.j2" %}
{# A starter match: packets at least --min-len bytes long. Edit freely. #}
{% block match4 %}
	return (skb->len >= info->min_len) ^ !!(info->flags & {{ ext.inv_const(ext.options[0]) }});
{% endblock %}
{% block match6 %}
	return (skb->len >= info->min_len) ^ !!(info->flags & {{ ext.inv_const(ext.options[0]) }});
{% endblock %}
"""

_TARGET_BODY = """{% extends "target.c.j2" %}
{# A starter target: set the packet mark, then continue. Edit freely. #}
{% block target4 %}
	if (info->flags & {{ ext.flag_const(ext.options[0]) }})
		skb->mark = info->set_mark;
	return XT_CONTINUE;
{% endblock %}
{% block target6 %}
	if (info->flags & {{ ext.flag_const(ext.options[0]) }})
		skb->mark = info->set_mark;
	return XT_CONTINUE;
{% endblock %}
"""

_HOOK_BODY = """{% extends "hook.c.j2" %}
{# A starter hook: the base template counts packets per hook point in
   /proc/net/{{ ext.module }}; add your logic before the verdict. #}
{% block hook_body %}
	return NF_ACCEPT;
{% endblock %}
"""


_SUITE_HEAD = '''"""{name}: starter suite written by `invoke new-module` (edit it).

{what}
test_replace_me is a placeholder marked xfail(strict=True): replace it with
the test that proves what {name} must do and remove the mark (while it is
there, a placeholder that starts to pass fails the run).

Run: invoke test --name={name}
"""

from __future__ import annotations

import re

import pytest

from tests.suites.catalog_helpers import (CLIENT4, CLIENT6, SERVER4, SERVER6,  # noqa: F401
                                          add_rules, assert_kit_module, clean_forward, flush_chains,
                                          l3, proc_lines, rule_counters, send_tagged, sentinel)
from tests.suites.conftest import tag  # noqa: F401

pytestmark = pytest.mark.vm
MODULE = "{module}"
PORT = {port}
FAMILY = "{family}"


@pytest.fixture(scope="module")
def loaded(host):
    assert_kit_module(host, MODULE)


def _packet(t):
    from scapy.all import UDP
    from nflab.tracing import payload
    src, dst = (CLIENT6, SERVER6) if FAMILY == "ipv6" else (CLIENT4, SERVER4)
    return l3(FAMILY)(src=src, dst=dst) / UDP(sport=33000, dport=PORT) / payload(t, 48)

'''

_SUITE_XT = '''
@pytest.fixture
def clean_chain(host, routed):
    flush_chains(host, (("{table}", "FORWARD"),))
    yield
    flush_chains(host, (("{table}", "FORWARD"),))


def test_forwarded_packet_meets_the_rule(host, wire, loaded, clean_chain, tag):
    tool = "ip6tables" if FAMILY == "ipv6" else "iptables"
    add_rules(host, [f"{{tool}}-legacy -w {rule}"])
    t = tag()
    arrived = send_tagged(wire, {{t: _packet(t)}}, sentinel=sentinel(FAMILY, tag()))
    assert arrived == {{t}}, "the packet did not come out on the server wire"
    counts = rule_counters(host, tool, "legacy", table="{table}")
    assert counts.get(str(PORT)) == 1, f"the rule counted {{counts.get(str(PORT))}} packets, not 1"

'''

_SUITE_HOOK = '''
HOOK = "{hook}"
POINT = ("{family}", HOOK)     # the point of /proc/net/<module> the test reads
LOCAL = HOOK in ("LOCAL_IN", "LOCAL_OUT")
N = 5
# An nft chain beside the point counts every packet that crosses it but the test's
# (SSH to the guest, the sentinel, anything else): the module's count less nft's is
# what it counted of the test's packets. The two cannot be read at one instant, so
# a snapshot reads the module, nft, the module again, and the test's number must
# lie between the bounds those give (as tests/suites/test_pktcount.py does).
STRAY_TABLE = "{stray_table}"
SNAPSHOT = (f"cat /proc/net/{{MODULE}}; echo @@; nft list table {{STRAY_TABLE}}; echo @@; "
            f"cat /proc/net/{{MODULE}}")
'''

_SUITE_HOOK_TESTS = '''

@pytest.fixture
def strays(host):
    host.run_test(" && ".join(STRAY_RULES))
    yield
    host.run(f"nft delete table {STRAY_TABLE}")


def _count(text: str) -> int:
    for w in (ln.split() for ln in text.splitlines()):
        if w[:3] == ["point", *POINT]:          # point family hook prio registered packets
            return int(w[5])
    raise AssertionError(f"no point {POINT} in /proc/net/{MODULE}:\\n{text}")


def _snapshot(host) -> tuple[int, int]:
    """The least and the most the module can have counted of the test's packets so far."""
    first, nft, last = host.check_output(SNAPSHOT).split("@@")
    stray = int(re.search(r"counter packets (\\d+)", nft).group(1))
    return _count(first) - stray, _count(last) - stray


def _send(host, wire, tag) -> int:
    """The test's packets across the point; returns how many it must count."""
    if LOCAL:       # forwarded packets do not cross it: pings over the loopback do
        host.run_test(f"ping {'-6 ' if FAMILY == 'ipv6' else ''}-c {N} -i 0.2 -W 1 "
                      f"{'::1' if FAMILY == 'ipv6' else '127.0.0.1'} >/dev/null")
        return 2 * N            # each echo request and its reply
    pkts = {}
    for _ in range(N):
        t = tag()
        pkts[t] = _packet(t)
    assert send_tagged(wire, pkts, sentinel=sentinel(FAMILY, tag())) == set(pkts)
    return N


def test_packets_counted_at_the_point(host, wire, loaded, clean_forward, strays, tag):
    before = _snapshot(host)
    want = _send(host, wire, tag)
    after = _snapshot(host)
    lo, hi = after[0] - before[1], after[1] - before[0]
    assert lo <= want <= hi, f"{POINT} counted {lo}..{hi} of the test's packets, not {want}"

'''


def _stray_rules(ext: spec.Extension) -> tuple[str, list[str]]:
    """The nft table and commands that count every packet at the module's first
    point but the starter test's own."""
    h = ext.hooks[0]
    if h.family == "netdev":
        dev = next((p.get("default", "eth0") for p in ext.params if p["name"] == "ingress_dev"), "eth0")
        table, hook, count = "netdev nflabstray", f"ingress device {dev}", "counter"
    else:
        table, hook, count = "inet nflabstray", NFT_HOOKS[h.hook], f"meta nfproto {h.family} counter"
    if h.hook in ("LOCAL_IN", "LOCAL_OUT"):
        own = ("ip6 daddr ::1 icmpv6 type { echo-request, echo-reply }" if h.family == "ipv6"
               else "ip daddr 127.0.0.1 icmp type { echo-request, echo-reply }")
    else:
        own = f"udp dport {PORT}"
    chain = f"nft add chain {table} c '{{ type filter hook {hook} priority {h.priority}; }}'"
    return table, [f"nft add table {table}", chain, f"nft add rule {table} c {own} return",
                   f"nft add rule {table} c {count}"]


def _hook_suite(ext: spec.Extension) -> str:
    table, rules = _stray_rules(ext)
    h = ext.hooks[0]
    head = _SUITE_HOOK.format(family=h.family, hook=h.hook, stray_table=table)
    return head + "STRAY_RULES = [\n" + "".join(f"    {r!r},\n" for r in rules) + "]\n" + _SUITE_HOOK_TESTS


_SUITE_TAIL = '''
@pytest.mark.xfail(strict=True, reason="placeholder: replace it with what {name} must do")
def test_replace_me(host, loaded):
    pytest.fail("write the test that proves what {name} does, then remove this placeholder")
'''

_T_FILES = {
    "match": """# Rule syntax of the {name} match, iptables' *.t format (written by new-module)
:INPUT,FORWARD,OUTPUT
-m {name} --min-len 64;=;OK
-m {name} ! --min-len 64;=;OK
-m {name} --min-len 65536;;FAIL
-m {name};=;OK
""",
    "target": """# Rule syntax of the {name} target, iptables' *.t format (written by new-module)
*mangle
:PREROUTING,INPUT,FORWARD,OUTPUT,POSTROUTING
-j {name} --set-mark 7;=;OK
-j {name} --set-mark 4294967296;;FAIL
""",
}


def suite_text(ext: spec.Extension) -> str:
    """The starter suite of *ext*: a real packet through the router, then the placeholder."""
    family = ext.families[0] if ext.families[0] != "netdev" else "ipv4"
    if ext.kind == "hook":
        h = ext.hooks[0]
        what = (f"test_packets_counted_at_the_point sends {{family}} packets across the {h.family}\n"
                f"{h.hook} point (forwarded from the client wire, or pings over the guest's\n"
                f"loopback for LOCAL_IN and LOCAL_OUT) and checks that /proc/net/{ext.module}\n"
                "counted each exactly once, less what an nft counter beside it saw of other traffic.")
        body = _hook_suite(ext)
    else:
        table = "mangle" if ext.kind == "target" else "filter"
        rule = (f"-t mangle -A FORWARD -p udp --dport {{PORT}} -j {ext.name} --set-mark 7"
                if ext.kind == "target" else
                f"-A FORWARD -p udp --dport {{PORT}} -m {ext.name} --min-len 0 -j ACCEPT")
        what = (f"test_forwarded_packet_meets_the_rule adds a FORWARD rule with {ext.name}, sends\n"
                "a UDP packet from the client wire through the router and checks that it\n"
                "arrived on the server wire and that the rule counted it.")
        body = _SUITE_XT.format(rule=rule, table=table)
    head = _SUITE_HEAD.format(name=ext.name, module=ext.module, port=PORT, family=family,
                              what=what.replace("{{family}}", family))
    return head + body + _SUITE_TAIL.format(name=ext.name)


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def definition_text(kind: str, name: str, hook: str, priority, family: str) -> str:
    lines = [f"# {name}: created by `invoke new-module`; see docs/definitions.md",
             f"kind = {_toml_str(kind)}", f"name = {_toml_str(name)}",
             f"summary = {_toml_str(f'{name} {kind} (nflab starter)')}"]
    if kind == "hook":
        lines += [f"families = [{_toml_str(family)}]", "", "[[hooks]]",
                  f"family = {_toml_str(family)}", f"hook = {_toml_str(hook)}",
                  f"priority = {priority}"]
        if family == "netdev":      # the lab's client wire, where the starter suite sends
            lines += ["", "[[params]]", 'name = "ingress_dev"', 'type = "charp"', 'default = "eth1"',
                      'help = "device whose netdev INGRESS hook point attaches to, per netns"']
    elif kind == "match":
        fams = '["ipv4", "ipv6"]' if family == "ipv4" else f"[{_toml_str(family)}]"
        lines += [f"families = {fams}", "", "[[options]]", 'name = "min-len"', 'type = "uint16"',
                  'invert = true', 'help = "match packets of at least this many bytes"']
    else:
        fams = '["ipv4", "ipv6"]' if family == "ipv4" else f"[{_toml_str(family)}]"
        lines += [f"families = {fams}", 'verdict = "XT_CONTINUE"', "", "[[options]]",
                  'name = "set-mark"', 'type = "uint32"', 'help = "mark to set on the packet"']
    return "\n".join(lines) + "\n"


def new_module(kind: str, name: str, hook: str = "PRE_ROUTING", priority="-175",
               family: str = "ipv4", catalog: Path | None = None) -> list[Path]:
    """Validate everything first, then write ext.toml and a starter template."""
    if kind not in spec.KINDS:
        raise SpecError(f"--kind: unknown kind {kind!r}", hint="valid: " + ", ".join(spec.KINDS))
    spec.check_name(name, "--name")
    prio = spec.check_priority(priority, "--priority")
    fam = spec.check_family(family, spec.FAMILIES if kind == "hook" else spec.XT_FAMILIES, "--family")
    hk = spec.check_hook(hook, fam, "--hook") if kind == "hook" else hook
    text = definition_text(kind, name, hk, prio, fam)
    ext = spec.validate(tomllib.loads(text), Path(f"{name}/ext.toml"))
    catalog = catalog or spec.CATALOG
    folder = catalog / name
    if folder.exists():
        raise SpecError(f"--name: {folder} already exists", hint="pick another name or edit it")
    # the kit's catalog keeps its suites in tests/suites; another catalog beside the definition
    suite = (SUITES if catalog == spec.CATALOG else folder) / f"test_{name}.py"
    if suite.exists():
        raise SpecError(f"--name: {suite} already exists", hint="pick another name")
    body = {"hook": _HOOK_BODY, "match": _MATCH_BODY, "target": _TARGET_BODY}[kind]
    folder.mkdir(parents=True)
    written = [folder / "ext.toml", folder / f"{ext.module}.c.j2"]
    written[0].write_text(text)
    written[1].write_text(body)
    if kind in _T_FILES:
        written.append(folder / f"{ext.plugin}.t")
        written[-1].write_text(_T_FILES[kind].format(name=name))
    suite.write_text(suite_text(ext))
    written.append(suite)
    return written
