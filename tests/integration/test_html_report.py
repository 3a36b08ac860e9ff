"""`invoke test --html`: the report shows, per test, each packet's path through
the hooks as the tracer saw it, its verdict, and the rules with their counters.

One real run (iprange on 6.1: build, boot, install, the suites with the
tracer loaded for the report) and the HTML it wrote, read the way a person's
browser reads it: pytest-html keeps every test's row in a JSON blob, the
nflab section is that row's HTML extra.
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys

import pytest

from ground.paths import REPO
from nflab.suites import parse_junit

pytestmark = [pytest.mark.slow, pytest.mark.vm]

FORWARDED = re.compile(r"INGRESS/0 → PRE_ROUTING/-450 → .*PRE_ROUTING/125 → FORWARD/-450 → .*"
                       r"FORWARD/125 → POST_ROUTING/-450 → .*POST_ROUTING/125$")


def _sections(report) -> dict:
    """{test node id: its nflab HTML section}, from pytest-html's data blob."""
    page = report.read_text()
    m = re.search(r'data-jsonblob="([^"]*)"', page)
    assert m, "no pytest-html data blob in the report"
    blob = json.loads(html.unescape(m.group(1)))
    return {nodeid: "".join(x.get("content", "") for r in runs for x in r.get("extras", [])
                            if x.get("format_type") == "html")
            for nodeid, runs in blob["tests"].items()}


def _text(fragment: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def _packets(section: str) -> list[dict]:
    """Each packet block: what was sent, its walks' paths, their verdicts."""
    out = []
    for block in section.split('<div class="nflab-packet')[1:]:
        out.append({
            "sent": [_text(s) for s in re.findall(r"<code>(.*?)</code>", block)],
            "paths": [_text(p) for p in re.findall(r'<div class="nflab-path">(.*?)</div>', block)],
            "verdicts": [_text(v).removeprefix("verdict: ") for v in
                         re.findall(r'<div class="nflab-fate">(.*?)</div>', block)],
        })
    return out


def _rules(section: str) -> dict:
    return {_text(name).split(" (exit")[0]: _text(body) for name, body in
            re.findall(r'<summary>([^<]*)</summary><pre class="nflab-rules">([^<]*)</pre>', section)}


def test_html_report_has_paths_verdicts_and_counters(tmp_path):
    report, junit = tmp_path / "report.html", tmp_path / "junit.xml"
    res = subprocess.run([sys.executable, "-m", "invoke", "test", "--name=iprange", "--kernel=6.1",
                          f"--html={report}", f"--junit={junit}", "--quiet"],
                         cwd=REPO, capture_output=True, text=True, timeout=1500,
                         env=dict(os.environ, CI="1"))
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-3000:]
    check_report(report, junit)


def check_report(report, junit):
    counts, _ = parse_junit(junit)
    sections = _sections(report)
    assert len(sections) == counts["tests"] > 0
    assert all("Rules and counters after the test" in s for s in sections.values()), \
        [k for k, s in sections.items() if "Rules and counters" not in s]

    wire_tests = {k: s for k, s in sections.items() if "verdicts_on_the_wire" in k}
    assert wire_tests, f"no iprange wire test in {list(sections)}"
    for nodeid, section in wire_tests.items():
        packets = _packets(section)
        assert packets and all(p["sent"] for p in packets), nodeid
        # a forwarded packet: every tracer point of PRE_ROUTING, FORWARD, POST_ROUTING in
        # order, and the server wire got it
        arrived = [p for p in packets if p["verdicts"] == ["arrived on the server wire"]]
        assert arrived, f"{nodeid}: no packet arrived: {packets[:2]}"
        assert all(len(p["paths"]) == 1 and FORWARDED.search(p["paths"][0]) for p in arrived), \
            f"{nodeid}: {arrived[0]}"
        # a packet an iprange rule in filter FORWARD dropped: the path ends before filter (0)
        dropped = [p for p in packets if p["verdicts"] and
                   p["verdicts"][0].startswith("stopped after FORWARD/-75: dropped")]
        assert dropped and all("between them: filter 0" in p["verdicts"][0] for p in dropped), \
            f"{nodeid}: {[p['verdicts'] for p in packets]}"
        assert all(p["paths"][0].endswith("FORWARD/-75") for p in dropped)
        assert len(arrived) + len(dropped) == len(packets), [p["verdicts"] for p in packets]

        # the rules with their counters after the test, on the backend the test used
        rules = _rules(section)
        family = "ipv6" if "ipv6" in nodeid else "ipv4"
        backend = "legacy" if "legacy" in nodeid else "nft"
        tool = "ip6tables" if family == "ipv6" else "iptables"
        listing = rules[f"{tool}-{backend}-save -c"]
        hits = [int(n) for n in re.findall(r"^\[(\d+):\d+\] -A FORWARD .*-m iprange", listing, re.M)]
        assert len(hits) == 4 and sum(hits) == len(dropped), (nodeid, hits, len(dropped), listing)
        if backend == "nft":       # the same counters as nftables prints them (nft_compat)
            nft = [int(n) for n in re.findall(r"xt match \"?iprange\"? counter packets (\d+)",
                                              rules["nft list ruleset"])]
            assert nft == hits, rules["nft list ruleset"]
