"""Review fixes of the .t runner and upstream-t (no guest needed).

Each test names the upstream ``iptables-test.py`` behaviour it holds the kit to.
"""

import os
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from ground.errors import NflabError
from nflab import rules_t, upstream_t
from nflab.upstream_t import FileRun, Source


# ---- 1a: a *table line keeps the chains (upstream libxt_CT.t) -----------------

CT = """:PREROUTING,OUTPUT
*raw
-j CT --notrack;=;OK
-j CT --zone 65536;;FAIL
"""


def test_a_table_line_keeps_the_chains_of_the_last_chain_line():
    cases = rules_t.parse(CT, "libxt_CT.t")
    assert [(c.table, c.chain, c.ok) for c in cases] == [
        ("raw", "PREROUTING", True), ("raw", "OUTPUT", True),
        ("raw", "PREROUTING", False), ("raw", "OUTPUT", False)]


# ---- 1b: variant columns and NOMATCH (libxt_NFLOG.t, libxt_TCPMSS.t) -----------

NFLOG = """:INPUT
-j NFLOG --nflog-range 1;=;OK;LEGACY;NOMATCH
-p tcp -j TCPMSS --set-mss 42;=;FAIL;LEGACY
-p tcp -j TCPMSS --set-mss 43;;FAIL;LEGACY
-j NFLOG --nflog-prefix xx;-j NFLOG --nflog-prefix x;OK;LEGACY;=
-m x;=;OK;NFT
"""


@pytest.mark.parametrize("backend, want", [
    # (expect, saved) per line: the variant's backend takes column 3, the other the
    # fifth column or the inverse (OK <-> FAIL, NOMATCH -> OK), as upstream's variant_res
    ("legacy", [("OK", "-j NFLOG --nflog-range 1"), ("FAIL", None), ("FAIL", None),
                ("OK", "-j NFLOG --nflog-prefix x"), ("FAIL", None)]),
    ("nft", [("NOMATCH", "-j NFLOG --nflog-range 1"), ("OK", "-p tcp -j TCPMSS --set-mss 42"),
             ("OK", None), ("NOMATCH", "-j NFLOG --nflog-prefix x"), ("OK", "-m x")]),
])
def test_variant_columns_resolve_per_backend(backend, want):
    cases = rules_t.parse(NFLOG, "libxt_NFLOG.t", backend)
    assert [(c.expect, c.saved) for c in cases] == want


@pytest.mark.parametrize("bad", ["-m x;=;OK;BOTH", "-m x;=;OK;NFT;MAYBE", "-m x;=;OK;NFT;OK;x",
                                 "-m x;=;MAYBE"])
def test_malformed_variant_lines_are_format_errors(bad):
    with pytest.raises(rules_t.TFormatError):
        rules_t.parse(":INPUT\n" + bad + "\n", "libxt_x.t", "nft")


def _result(case, rc, saved):
    return rules_t.RuleResult(case, "nft", rc, saved, "")


def test_nomatch_passes_only_when_accepted_and_saved_otherwise():
    case = rules_t.parse(NFLOG, "libxt_NFLOG.t", "nft")[0]
    assert _result(case, 0, ["-A INPUT -j NFLOG"]).passed
    assert "expected NOMATCH" in _result(case, 0, ["-A INPUT -j NFLOG --nflog-range 1"]).problem
    assert "expected NOMATCH, iptables exited 2" in _result(case, 2, []).problem
    # a NOMATCH rule saves otherwise by definition: its saved text not deleting it is no fault
    r = _result(case, 0, ["-A INPUT -j NFLOG"])
    r.undeletable = "left in place"
    assert r.passed


def test_an_inverted_fail_line_without_saved_text_only_needs_acceptance():
    case = rules_t.parse(NFLOG, "libxt_TCPMSS.t", "nft")[2]
    assert case.ok and case.saved is None
    assert _result(case, 0, ["-A INPUT -p tcp -j TCPMSS --set-mss 43"]).passed
    assert not _result(case, 1, []).passed


def test_upstream_variant_nomatch_and_command_lines_are_taken():
    """libxt_NFLOG.t's five columns, libxt_TCPMSS.t's four, libxt_rateest.t's % and
    libxt_CT.t's @ lines, as written (no backend given: each line's own result)."""
    text = NFLOG + "@nfct timeout add test inet tcp ESTABLISHED 100\n" + RATEEST
    cases = rules_t.parse(text, "libxt_NFLOG.t")
    assert [c.lineno for c in cases] == [2, 3, 4, 5, 6, 10, 12]
    assert cases[0].nomatch is False and cases[0].ok and cases[1].ok is False


# ---- 1c: @ and % lines run as upstream runs them ---------------------------------

RATEEST = """:INPUT
%iptables -I INPUT -j RATEEST --rateest-name RE1
-m x --a;=;OK
@nfct helper add rpc inet tcp
-m x --bad;;FAIL
%iptables -D INPUT -j RATEEST --rateest-name RE1
"""


def test_external_command_lines_are_parsed_not_rejected():
    cases, commands = rules_t.parse_file(RATEEST, "libxt_rateest.t", "legacy")
    assert [c.lineno for c in cases] == [3, 5]
    assert [(x.lineno, x.shell("legacy")) for x in commands] == [
        (2, "xtables-legacy-multi iptables -I INPUT -j RATEEST --rateest-name RE1"),
        (4, "nfct helper add rpc inet tcp"),
        (6, "xtables-legacy-multi iptables -D INPUT -j RATEEST --rateest-name RE1")]
    assert rules_t.externals(RATEEST) == commands


def test_a_file_with_commands_runs_in_file_order_without_the_fast_path():
    cases, commands = rules_t.parse_file(RATEEST, "libxt_rateest.t", "nft")
    text = rules_t.script(cases, "ipv4", "nft", commands=commands)
    assert "@@NFLAB-T-EOF" not in text         # no restore: one rule at a time
    order = [text.index(s) for s in ("xtables-nft-multi iptables -I INPUT", "-A INPUT -m x --a",
                                     "nfct helper add rpc", "-A INPUT -m x --bad",
                                     "xtables-nft-multi iptables -D INPUT", "iptables-nft-save")]
    assert order == sorted(order)


def _fake_tools(bin_dir: Path, store: Path):
    """iptables-legacy{,-save,-restore}, xtables-legacy-multi and nfct stand-ins:
    a rule is the words it was given; ``-I`` puts it first, ``-D`` removes it."""
    tool = f"""#!/usr/bin/env python3
import os, sys
store = {str(store)!r}
rules = open(store).read().splitlines() if os.path.exists(store) else []
argv = sys.argv[1:]
if os.path.basename(sys.argv[0]) == "xtables-legacy-multi":
    argv = argv[1:]
args = [a for a in argv if a not in ("-w", "-n")]
if sys.argv[0].endswith("-save"):
    print("*filter"); [print("-A " + r) for r in rules]; print("COMMIT"); sys.exit()
if sys.argv[0].endswith("-restore"):
    sys.exit()
op = args[0] if args[0] in ("-A", "-I", "-D") else args[2]
words = " ".join(args[args.index(op) + 1:])
if "--bad" in words:
    sys.exit("Bad argument")
if op == "-A": rules.append(words)
if op == "-I": rules.insert(0, words)
if op == "-D": rules.remove(words)
open(store, "w").write("".join(r + "\\n" for r in rules))
"""
    for name in ("iptables-legacy", "iptables-legacy-save", "iptables-legacy-restore", "xtables-legacy-multi"):
        (bin_dir / name).write_text(tool)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "nfct").write_text("#!/bin/sh\necho 'nfct: no such helper' >&2\nexit 1\n")
    (bin_dir / "nfct").chmod(0o755)


def test_commands_run_at_their_place_and_a_failed_one_is_named(tmp_path):
    """The generated shell under dash: the RATEEST rule the first command
    inserts is gone again by the save (the last command deletes it), and the
    rule after the failed nfct says so when it fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_tools(bin_dir, tmp_path / "rules")
    text = RATEEST.replace("-m x --bad;;FAIL", "-m x --bad;=;OK")
    cases, commands = rules_t.parse_file(text, "libxt_rateest.t", "legacy")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = subprocess.run(["dash", "-c", rules_t.script(cases, "ipv4", "legacy", commands=commands)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout
    res = rules_t.results(cases, "legacy", out)
    assert res[0].passed, res[0].problem
    assert res[0].saved_lines == ["-A INPUT -m x --a"]
    assert res[1].problem.endswith("[after line 4's command, which exited 1: nfct: no such helper]")


UPSTREAM_T = Path(__file__).resolve().parent / "data" / "vendor" / "iptables-t"


@pytest.mark.parametrize("tag,least", [("v1.8.9", 129), ("v1.8.11", 144)])
def test_upstream_files_of_both_releases_parse_for_both_backends(tag, least):
    """Every upstream .t file of iptables 1.8.9 and 1.8.11 (vendored from the
    tags: tests/unit/data/vendor/iptables-t/README.md)."""
    files = sorted((UPSTREAM_T / tag).glob("*.t"))
    assert len(files) >= least, f"{UPSTREAM_T / tag}: {len(files)} .t files, expected {least}"
    for path in files:
        text = path.read_text()
        for backend in rules_t.BACKENDS:
            rules_t.parse_file(text, path.name, backend)


# ---- 2: a bad file is that file's problem, not the run's -------------------------

def test_format_errors_are_nflab_errors_with_a_hint():
    with pytest.raises(NflabError) as exc:
        rules_t.parse("-m x;=;OK\n", "libxt_x.t")
    assert isinstance(exc.value, rules_t.TFormatError) and exc.value.hint


class _NoGuest:
    def run(self, command):
        raise AssertionError("no guest should be contacted for an unparsable file")


def test_run_many_reports_a_bad_file_against_that_file(tmp_path):
    bad = tmp_path / "libxt_bad.t"
    bad.write_text(":INPUT\n-m x;=;MAYBE\n")
    done = rules_t.run_many(_NoGuest(), [(bad, "legacy")])
    assert isinstance(done[(bad, "legacy")], rules_t.TFormatError)


def test_upstream_t_strict_check_of_a_bad_file_is_a_problem_of_that_file(tmp_path):
    bad = tmp_path / "libxt_comment.t"
    bad.write_text(":INPUT\n-m comment --comment x;=;MAYBE\n")
    runs = [("comment", bad, "nft")]
    results = [FileRun("comment", bad.name, "nft", tests=1, passed=1, rc=0)]
    upstream_t._strict(_NoGuest(), runs, results)
    assert len(results[0].strict) == 1 and "RESULT must be OK, FAIL or NOMATCH" in results[0].strict[0]
    assert not results[0].ok


# ---- 3: SIGTERM/SIGHUP during upstream-t stops the VM it booted -------------------

def test_upstream_t_turns_sigterm_into_an_interrupt_and_stops_its_vm(monkeypatch, tmp_path):
    from nflab.upstream_t import lab
    downs = []
    monkeypatch.setattr(upstream_t.kernels, "get", lambda spec, progress: SimpleNamespace(release="6.12.0-test"))
    monkeypatch.setattr(lab, "load", lambda name: None)
    monkeypatch.setattr(lab, "down", lambda name: downs.append(name))

    def up(spec, name, progress):
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler), "no SIGTERM handler while the VM runs: a kill leaves QEMU running"
        handler(signal.SIGTERM, None)        # as the kernel would deliver it

    monkeypatch.setattr(lab, "up", up)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        upstream_t.run_on_kernel("6.12", ["comment"], vm="ut-x", progress=lambda m: None)
    assert downs == ["ut-x"]
    assert signal.getsignal(signal.SIGTERM) == before      # put back afterwards


# ---- 4: libxt_ upstream files run with both families where the runner does -------

RUNNER_1_8_9 = '''    if "libipt_" in filename:
        iptables = IPTABLES
    elif "libip6t_" in filename:
        iptables = IP6TABLES
    elif "libxt_"  in filename:
        iptables = IPTABLES
'''
RUNNER_1_8_11 = '''    if "libipt_" in filename:
        xtables = [ IPTABLES ]
    elif "libip6t_" in filename:
        xtables = [ IP6TABLES ]
    elif "libxt_"  in filename:
        xtables = [ IPTABLES, IP6TABLES ]
'''


@pytest.mark.parametrize("runner, both", [(RUNNER_1_8_9, False), (RUNNER_1_8_11, True)])
def test_libxt_families_follow_the_sources_runner(tmp_path, runner, both):
    (tmp_path / upstream_t.RUNNER).write_text(runner)
    assert upstream_t.libxt_both(Source(tmp_path, "1", "s")) is both


def test_families_of_upstream_and_catalog_files():
    assert rules_t.families_of(Path("libxt_quota.t"), libxt_both=True) == ("ipv4", "ipv6")
    assert rules_t.families_of(Path("libxt_quota.t"), libxt_both=False) == ("ipv4",)
    assert rules_t.families_of(Path("libipt_x.t"), libxt_both=True) == ("ipv4",)
    assert rules_t.families_of(Path("libip6t_x.t"), libxt_both=True) == ("ipv6",)
    # the kit's catalog keeps its convention: libxt_ files hold IPv4 rules (IPv6 in libip6t_)
    assert rules_t.family_of(Path("libxt_iprange.t")) == "ipv4"


class _Recorder:
    """A guest whose every .t script accepts and saves nothing (and that prints
    nothing for anything else); records the tools the scripts use."""

    def __init__(self):
        self.tools = []

    def run(self, command):
        import base64
        import re
        m = re.fullmatch(r"echo (\S+) \| base64 -d \| sh", command)
        if not m:
            return SimpleNamespace(rc=0, stdout="", stderr="")
        outer = base64.b64decode(m.group(1)).decode()
        outs = []
        for k, blob in enumerate(re.findall(r"echo (\S+) \| base64 -d > \$d/", outer)):
            text = base64.b64decode(blob).decode()
            self.tools.append(re.search(r"ipt\(\) \{ (\S+) -w", text).group(1))
            outs.append(f"@@NFLAB-T-JOB {k}\n@@NFLAB-T-NETNS")
        return SimpleNamespace(rc=0, stdout="\n".join(outs), stderr="")


def test_upstream_strict_check_runs_libxt_files_with_ip6tables_too(tmp_path):
    f = tmp_path / "libxt_comment.t"
    f.write_text(":INPUT\n-m comment --comment x;=;OK\n")
    runs = [("comment", f, "nft")]
    guest = _Recorder()
    results = [FileRun("comment", f.name, "nft")]
    upstream_t._strict(guest, runs, results, both=True)
    assert guest.tools == ["iptables-nft", "ip6tables-nft"]
    # the guest ran nothing: each family's problem is labelled with its tool
    assert any(p.startswith("libxt_comment.t[ip6tables]: the exact-line check could not run")
               for p in results[0].strict), results[0].strict
    guest = _Recorder()
    upstream_t._strict(guest, runs, [FileRun("comment", f.name, "nft")], both=False)
    assert guest.tools == ["iptables-nft"]


def test_upstream_run_gives_libxt_files_to_ip6tables_where_the_sources_runner_does(tmp_path):
    """Through upstream_t.run: iptables 1.8.11's runner runs libxt_ files with both
    families, so the kit's exact-line check does too; 1.8.9's with iptables alone."""
    import json
    from nflab.upstream_t import KitBuild
    from vm import xtables
    for runner, want in ((RUNNER_1_8_11, ["iptables-legacy", "ip6tables-legacy", "iptables-nft", "ip6tables-nft"]),
                         (RUNNER_1_8_9, ["iptables-legacy", "iptables-nft"])):
        root = tmp_path / str(len(want))
        (root / "extensions").mkdir(parents=True)
        (root / upstream_t.RUNNER).write_text(runner)
        (root / "extensions" / "libxt_comment.t").write_text(":INPUT\n-m comment --comment x;=;OK\n")
        files = {rel: {"sha256": "0" * 64} for rel in (upstream_t.RUNNER, "extensions/libxt_comment.t")}
        (root / upstream_t.RECORD).write_text(json.dumps({"files": files}))
        guest = _Recorder()
        report = upstream_t.run(guest, Source(root, "1", "s"), "6.12.0-test",
                                {"comment": KitBuild("xt_comment", "libxt_comment", "", "a" * 64)},
                                xtables.Backends())
        assert guest.tools == want
        assert len(report.runs) == 2           # upstream's runner: one run per (file, backend)
