"""The .t parser and result checker (no guest needed)."""

import base64
import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from ground.errors import VMError
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
    out = []
    for i, c in enumerate(cases):
        out += [f"@@NFLAB-T {i}", f"rc {0 if c.ok else 2}", "@@NFLAB-T-END"]
    out += ["@@NFLAB-T-SAVE filter"]
    out += [f"-A {c.chain} {c.saved}" for c in cases if c.ok and c.table == "filter"]
    out += ["@@NFLAB-T-END", "@@NFLAB-T-SAVE mangle",
            "-A PREROUTING -m iprange --dst-range 10.0.0.0-10.0.0.1", "@@NFLAB-T-END"]
    res = rules_t.results(cases, "legacy", "\n".join(out))
    assert all(r.passed for r in res), [r.problem for r in res if not r.passed]


def test_truncated_output_is_reported():
    cases = rules_t.parse(SAMPLE, "libxt_x.t")
    with pytest.raises(VMError, match="stopped early"):
        rules_t.results(cases, "legacy", "@@NFLAB-T 0\nrc 0\n@@NFLAB-T-END\n")


def test_catalog_t_files_parse_and_name_a_family():
    files = sorted(CATALOG.glob("*/lib*.t"))
    assert files, "the catalog ships .t files"
    for path in files:
        assert rules_t.family_of(path) in ("ipv4", "ipv6")
        assert rules_t.parse(path.read_text(), str(path))


def test_script_runs_in_its_own_netns():
    cases = rules_t.parse(SAMPLE, "libxt_x.t")
    text = rules_t.script(cases, "ipv6", "legacy")
    assert "ip6tables-legacy -w" in text and "ip netns" not in text
    assert "unshare --net sh " in rules_t.remote_command(text)


def test_remote_command_runs_its_own_copy_and_keeps_the_status(tmp_path):
    """Each run writes its script to a file of its own (two runs against one guest
    do not overwrite each other's), passes on the script's status, removes the file."""
    (tmp_path / "unshare").write_text('#!/bin/sh\n[ "$1" = --net ] && shift\nexec "$@"\n')
    (tmp_path / "unshare").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "TMPDIR": str(tmp_path)}
    before = set(Path("/tmp").glob("nflab-t.*.sh"))
    res = subprocess.run(["dash", "-c", rules_t.remote_command('echo "ran $0"; exit 3')],
                         capture_output=True, text=True, env=env)
    assert (res.returncode, res.stdout.split()[0]) == (3, "ran"), res.stderr
    assert res.stdout.split()[1].startswith("/tmp/nflab-t.") and set(Path("/tmp").glob("nflab-t.*.sh")) == before


def test_fast_script_restores_ok_cases_and_runs_fail_cases_one_by_one():
    cases = rules_t.parse(SAMPLE, "libxt_x.t")
    text = rules_t.script(cases, "ipv4", "nft", fast=True)
    restore = text.split("<<'@@NFLAB-T-EOF'\n")[1].split("@@NFLAB-T-EOF")[0].splitlines()
    assert restore == ["*filter",
                       "-A INPUT -m iprange --src-range 1.1.1.1-1.1.1.10",
                       "-A FORWARD -m iprange --src-range 1.1.1.1-1.1.1.10",
                       "-A INPUT -m iprange --src-range 1.1.1.1",
                       "-A FORWARD -m iprange --src-range 1.1.1.1",
                       "COMMIT"]
    assert "iptables-nft-restore -w -n" in text
    # the FAIL case is never part of a restore, and a refused restore falls back
    assert text.count("-A INPUT -m iprange --src-range 1.1.1.10-1.1.1.1") == 1
    assert "@@NFLAB-T-SLOW filter" in text
    slow = rules_t.script(cases, "ipv4", "nft", fast=False)
    assert "@@NFLAB-T-EOF" not in slow and slow.count("ipt -t") == len(cases)


def test_saved_lines_follow_execution_order():
    """A FAIL case the guest wrongly accepts runs after the table's restore, so
    its saved line comes last: mapping must follow the order the guest ran."""
    cases = rules_t.parse(":INPUT\n-m x --a;=;OK\n-m x --bad;;FAIL\n-m x --b;=;OK\n", "libxt_x.t")
    out = ["@@NFLAB-T 0", "rc 0", "@@NFLAB-T-END", "@@NFLAB-T 2", "rc 0", "@@NFLAB-T-END",
           "@@NFLAB-T 1", "rc 0", "@@NFLAB-T-END", "@@NFLAB-T-SAVE filter",
           "-A INPUT -m x --a", "-A INPUT -m x --b", "-A INPUT -m x --bad", "@@NFLAB-T-END"]
    res = rules_t.results(cases, "legacy", "\n".join(out))
    assert res[0].passed and res[2].passed
    assert "expected FAIL" in res[1].problem and res[1].saved_lines == ["-A INPUT -m x --bad"]


def test_a_rule_its_saved_text_does_not_delete_fails_its_case():
    cases = rules_t.parse(":INPUT\n-m x --a;=;OK\n-m x --b 0;-m x;OK\n", "libxt_x.t")
    out = ["@@NFLAB-T 0", "rc 0", "@@NFLAB-T-END", "@@NFLAB-T 1", "rc 0", "@@NFLAB-T-END",
           "@@NFLAB-T-SAVE filter", "-A INPUT -m x --a", "-A INPUT -m x", "@@NFLAB-T-END",
           "@@NFLAB-T-DEL filter", "undeletable -A INPUT -m x", "err Bad rule", "@@NFLAB-T-END"]
    res = rules_t.results(cases, "nft", "\n".join(out))
    assert res[0].passed
    assert res[1].problem.startswith("iptables -D with the saved text '-A INPUT -m x' left 1 of the 1 "
                                     "rules saved as it in place (.t line(s) 3): Bad rule.")


class _Guest:
    """Plays back what a guest printed for each script it was sent."""

    def __init__(self, fast_out, slow_out):
        self.outs, self.sent = {True: fast_out, False: slow_out}, []

    def run(self, command):
        text = base64.b64decode(re.search(r"echo (\S+) \| base64 -d", command).group(1)).decode()
        fast = "@@NFLAB-T-EOF" in text
        self.sent.append(fast)
        return SimpleNamespace(rc=0, stdout=self.outs[fast], stderr="")


def test_run_file_reruns_slowly_when_the_fast_run_disagrees(tmp_path):
    path = tmp_path / "libxt_x.t"
    path.write_text(":INPUT\n-m x --a;=;OK\n")
    good = "@@NFLAB-T-NETNS\n@@NFLAB-T 0\nrc 0\n@@NFLAB-T-END\n" \
           "@@NFLAB-T-SAVE filter\n-A INPUT -m x --a\n@@NFLAB-T-END\n"
    guest = _Guest(good.replace("--a\n@@", "--A\n@@"), good)
    res = rules_t.run_file(guest, path, "legacy")
    assert guest.sent == [True, False] and all(r.passed for r in res)
    guest = _Guest(good, good)
    rules_t.run_file(guest, path, "legacy")
    assert guest.sent == [True]


def test_missing_netns_is_reported(tmp_path):
    path = tmp_path / "libxt_x.t"
    path.write_text(":INPUT\n-m x --a;=;OK\n")
    with pytest.raises(VMError, match="network namespace"):
        rules_t.run_file(_Guest("", ""), path, "legacy")


def test_a_batch_that_ends_early_is_reported_as_such(tmp_path):
    """A dropped SSH connection is not blamed on network namespaces."""
    path = tmp_path / "libxt_x.t"
    path.write_text(":INPUT\n-m x --a;=;OK\n")
    dropped = SimpleNamespace(run=lambda command: SimpleNamespace(
        rc=255, stdout="", stderr="Connection to 127.0.0.1 closed by remote host."))
    with pytest.raises(VMError, match=r"ended early \(status 255\): Connection to 127.0.0.1 closed"):
        rules_t.run_many(dropped, [(path, "legacy")])


def test_batches_keep_each_command_under_the_argv_limit():
    scripts = ["x" * 30000] * 9 + ["y" * 10]
    groups = rules_t._batches(scripts)
    assert [s for g in groups for s in g] == scripts          # all of them, in order
    assert len(groups) > 1
    for g in groups:
        assert len(rules_t.batch_command(g)) < rules_t.MAX_COMMAND


def test_batch_output_splits_per_job_in_order():
    out = "\n".join(["@@NFLAB-T-JOB 0", "@@NFLAB-T-NETNS", "a", "@@NFLAB-T-JOB 1", "b", "c",
                     "@@NFLAB-T-JOB 2"])
    assert rules_t.split_jobs(out, 3) == ["@@NFLAB-T-NETNS\na", "b\nc", ""]
    cmd = rules_t.batch_command(["echo 1", "echo 2"], jobs=2)
    text = base64.b64decode(cmd.split()[1]).decode()
    assert "xargs -P 2" in text and "unshare --net" in text and "seq 0 1" in text


# A stand-in for iptables-legacy{,-save,-restore} in a scratch directory: it
# keeps each rule as the words it was given (its "encoding") and saves it
# without "--b 0" (the default), quoting as iptables-save does; -D finds a
# rule only by the same words. So a rule added with "--b 0" has two
# encodings, which only the delete step of the script can notice.
FAKE_IPTABLES = r"""#!/usr/bin/env python3
import os, shlex, sys
store = os.environ["FAKE_STORE"]
rules = [tuple(line.split("\0")) for line in open(store).read().splitlines()] if os.path.exists(store) else []
def quote(w):
    return '"' + w.replace("\\", "\\\\").replace('"', '\\"') + '"' if (" " in w or "\\" in w) else w
def save(words):
    out = list(words)
    while "--b" in out and out[out.index("--b") + 1] == "0":
        del out[out.index("--b"):out.index("--b") + 2]
    return " ".join(quote(w) for w in out)
def write(rs):
    open(store, "w").write("".join("\0".join(r) + "\n" for r in rs))
tool, args = os.path.basename(sys.argv[0]), [a for a in sys.argv[1:] if a not in ("-w", "-n")]
if tool.endswith("-save"):
    print("*filter")
    for r in rules:
        print("-A " + save(r))
    print("COMMIT")
elif tool.endswith("-restore"):
    for line in sys.stdin.read().splitlines():
        words = shlex.split(line)
        if words and words[0] == "-A":
            rules.append(tuple(words[1:]))
        elif words and words[0] == "-D":
            if tuple(words[1:]) not in rules:
                sys.exit("Bad rule (does a matching rule exist in that chain?)")
            rules.remove(tuple(words[1:]))
    write(rules)
else:
    if "--bad" in args:
        print("Bad argument", file=sys.stderr)
        sys.exit(2)
    rules.append(tuple(args[args.index("-A") + 1:]))
    write(rules)
"""


@pytest.mark.parametrize("fast", [True, False])
def test_script_deletes_each_rule_by_its_saved_text(tmp_path, fast):
    """The generated shell, run by dash against the stand-in above: a pattern
    with a backslash and a quote survives the round trip; the rule given at
    its default is reported with the other rule saved as the same text (the
    text cannot tell which one of the two is at fault) and iptables' words."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("iptables-legacy", "iptables-legacy-save", "iptables-legacy-restore"):
        (bin_dir / name).write_text(FAKE_IPTABLES)
        (bin_dir / name).chmod(0o755)
    text = (":INPUT\n-m x --s \"ends in \\\\\";=;OK\n-m x --s \"say \\\"hi\\\"\";=;OK\n"
            "-m x;=;OK\n-m x --b 0;-m x;OK\n-m x --bad;;FAIL\n")
    cases = rules_t.parse(text, "libxt_x.t")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_STORE": str(tmp_path / "rules")}
    out = subprocess.run(["dash", "-c", rules_t.script(cases, "ipv4", "legacy", fast=fast)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout
    res = rules_t.results(cases, "legacy", out)
    assert [r.passed for r in res] == [True, True, False, False, True], [r.problem for r in res]
    assert res[2].problem == res[3].problem
    assert "left 1 of the 2 rules saved as it in place (.t line(s) 4, 5): Bad rule (does a" in res[3].problem
