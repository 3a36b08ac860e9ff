"""The .t parser and result checker (no guest needed)."""

import pytest

from kmods.spec import CATALOG
from nflab import rules_t

SAMPLE = """# comment
:INPUT,FORWARD
-m iprange --src-range 1.1.1.1-1.1.1.10;=;OK
-m iprange --src-range 1.1.1.1;-m iprange --src-range 1.1.1.1-1.1.1.1;OK
-m iprange --src-range 1.1.1.10-1.1.1.1;;FAIL
*mangle
:PREROUTING
-m iprange --dst-range 10.0.0.0-10.0.0.1;=;OK
"""


def test_parse_expands_chains_and_tables():
    cases = rules_t.parse(SAMPLE, "libxt_x.t")
    assert [(c.table, c.chain) for c in cases] == [
        ("filter", "INPUT"), ("filter", "FORWARD"), ("filter", "INPUT"), ("filter", "FORWARD"),
        ("filter", "INPUT"), ("filter", "FORWARD"), ("mangle", "PREROUTING")]
    assert cases[0].saved == cases[0].rule
    assert cases[2].saved == "-m iprange --src-range 1.1.1.1-1.1.1.1"
    assert cases[4].ok is False and cases[4].saved is None


@pytest.mark.parametrize("bad", ["-m x;=;MAYBE", "-m x;=", ":INPUT\n-m x;=;OK;extra"])
def test_parse_rejects_malformed_lines(bad):
    text = bad if bad.startswith(":") else ":INPUT\n" + bad
    with pytest.raises(rules_t.TFormatError):
        rules_t.parse(text)


def test_rule_before_chain_is_an_error():
    with pytest.raises(rules_t.TFormatError, match="before any :CHAIN"):
        rules_t.parse("-m x;=;OK\n")


def test_results_judge_exit_codes_and_saved_lines():
    cases = rules_t.parse(SAMPLE, "libxt_x.t")[:1] + rules_t.parse(SAMPLE, "libxt_x.t")[4:5]
    out = "\n".join([
        "@@NFLAB-T 0", "rc 0", "@@NFLAB-T-END",
        "@@NFLAB-T 1", "rc 2", "err iptables v1.8.9: --src-range: range start", "@@NFLAB-T-END",
        "@@NFLAB-T-SAVE filter", "*filter", ":INPUT ACCEPT [0:0]",
        "-A INPUT -m iprange --src-range 1.1.1.1-1.1.1.10", "COMMIT", "@@NFLAB-T-END"])
    res = rules_t.results(cases, "nft", out)
    assert all(r.passed for r in res), [r.problem for r in res]
    wrong = out.replace("1.1.1.1-1.1.1.10", "1.1.1.1-1.1.1.9").replace("rc 2", "rc 0")
    res = rules_t.results(cases, "nft", wrong)
    assert "expected" in res[0].problem and "expected FAIL" in res[1].problem


def test_saved_lines_map_to_accepted_rules_in_order():
    cases = rules_t.parse(SAMPLE, "libxt_x.t")
    inputs = [i for i, c in enumerate(cases) if c.chain == "INPUT" and c.ok]
    out = []
    for i, c in enumerate(cases):
        out += [f"@@NFLAB-T {i}", f"rc {0 if c.ok else 2}", "@@NFLAB-T-END"]
    out += ["@@NFLAB-T-SAVE filter"]
    out += [f"-A {c.chain} {c.saved}" for c in cases if c.ok and c.table == "filter"]
    out += ["@@NFLAB-T-END", "@@NFLAB-T-SAVE mangle",
            "-A PREROUTING -m iprange --dst-range 10.0.0.0-10.0.0.1", "@@NFLAB-T-END"]
    res = rules_t.results(cases, "legacy", "\n".join(out))
    assert all(r.passed for r in res), [r.problem for r in res if not r.passed]
    assert len(inputs) == 2


def test_truncated_output_is_reported():
    cases = rules_t.parse(SAMPLE, "libxt_x.t")
    with pytest.raises(RuntimeError, match="stopped early"):
        rules_t.results(cases, "legacy", "@@NFLAB-T 0\nrc 0\n@@NFLAB-T-END\n")


def test_catalog_t_files_parse_and_name_a_family():
    files = sorted(CATALOG.glob("*/lib*.t"))
    assert files, "the catalog ships .t files"
    for path in files:
        assert rules_t.family_of(path) in ("ipv4", "ipv6")
        assert rules_t.parse(path.read_text(), str(path))


def test_script_isolates_in_a_netns_and_quotes_table():
    cases = rules_t.parse(SAMPLE, "libxt_x.t")
    text = rules_t.script(cases, "ipv6", "legacy")
    assert "ip6tables-legacy" in text and "ip netns add" in text and "trap" in text
    assert rules_t.remote_command(text).startswith("echo ")
