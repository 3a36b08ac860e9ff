"""Run iptables' ``extensions/*.t`` rule-syntax files against a guest.

The format is upstream iptables' own (``iptables-test.py``)::

    :INPUT,FORWARD,OUTPUT         chains the following rules are added to
    *mangle                       table for the following rules (default filter)
    RULE;SAVED;RESULT             RESULT is OK or FAIL; SAVED "=" means RULE itself

``libxt_*.t`` and ``libipt_*.t`` run with iptables, ``libip6t_*.t`` with
ip6tables; every file runs once per backend the kernel serves (legacy and
nft; nft only where the kernel has no legacy xtables, ``vm/xtables.py``:
``tests/suites/test_rules_t.py`` skips the legacy half then). Beyond the
format, every accepted rule must be found again by the text iptables-save
prints for it: the script deletes each one by its saved line (``-D``), as
``iptables-save | iptables -D`` scripts and ``iptables -C`` in provisioning
tools do, so a rule with two encodings (an option given at its default
recorded as given) fails its case. All rules of a
file run as one shell script inside a throwaway network namespace in the
guest, so the host's (and the guest's main) rule set is never touched and a
file costs one SSH round trip (two when the fast path disagrees, see
:func:`script`).
"""

from __future__ import annotations

import base64
import shlex
from dataclasses import dataclass
from pathlib import Path

from ground.errors import VMError
from vm import remote

NETNS_HINT = "the rule tests need CONFIG_NET_NS; boot a Debian kernel or enable it in a source: build"

BACKENDS = ("legacy", "nft")
_BEGIN, _END, _SAVE = "@@NFLAB-T", "@@NFLAB-T-END", "@@NFLAB-T-SAVE"
_NS, _FALLBACK, _JOB = "@@NFLAB-T-NETNS", "@@NFLAB-T-SLOW", "@@NFLAB-T-JOB"
_DEL, _UNDELETABLE = "@@NFLAB-T-DEL", "undeletable "
MAX_COMMAND = 128 * 1024   # MAX_ARG_STRLEN: the longest single argv string Linux takes
# delete_saved TABLE: delete each rule of $tmp.save by its saved line, all in
# one restore, or one restore per rule when that is refused, printing
# "undeletable LINE" and iptables' own words for each rule its line leaves.
# Lines go through printf '%s' and iptables-restore's quoting, never echo or
# eval: saved patterns hold backslashes, quotes and $.
_DELETE_SAVED = r"""delete_saved() {
    { echo "*$1"
      while IFS= read -r l; do case "$l" in "-A "*) printf -- '-D %s\n' "${l#-A }";; esac; done < $tmp.save
      echo COMMIT; } > $tmp.del
    RESTORE < $tmp.del 2>/dev/null && return
    while IFS= read -r l; do
        case "$l" in "-A "*)
            { echo "*$1"; printf -- '-D %s\n' "${l#-A }"; echo COMMIT; } > $tmp.del
            RESTORE < $tmp.del 2>$tmp.err || { printf 'undeletable %s\n' "$l"; err; } ;;
        esac
    done < $tmp.save
}"""


@dataclass
class RuleCase:
    file: str
    lineno: int
    table: str
    chain: str
    rule: str
    saved: str | None   # expected iptables-save text after "-A CHAIN", None when FAIL
    ok: bool

    @property
    def id(self) -> str:
        return f"{Path(self.file).name}:{self.lineno}:{self.table}/{self.chain}"


@dataclass
class RuleResult:
    case: RuleCase
    backend: str
    exit_code: int
    saved_lines: list
    stderr: str
    undeletable: str = ""   # why iptables -D by its saved line left it in place

    @property
    def passed(self) -> bool:
        return not self.problem

    @property
    def problem(self) -> str:
        c = self.case
        if not c.ok:
            if self.exit_code == 0:
                return f"expected FAIL, but the rule was accepted (saved as {self.saved_lines})"
            return ""
        if self.exit_code != 0:
            return f"expected OK, iptables exited {self.exit_code}: {self.stderr.strip()}"
        want = f"-A {c.chain} {c.saved}".strip()
        if want not in self.saved_lines:
            return f"iptables-save printed {self.saved_lines}, expected {want!r}"
        return self.undeletable


class TFormatError(ValueError):
    pass


def family_of(path: Path) -> str:
    name = Path(path).name
    if name.startswith("libip6t_"):
        return "ipv6"
    if name.startswith(("libxt_", "libipt_")):
        return "ipv4"
    raise TFormatError(f"{path}: name must start with libxt_, libipt_ or libip6t_")


def parse(text: str, filename: str = "<t>") -> list[RuleCase]:
    """Parse a .t file into one RuleCase per (rule, chain)."""
    table, chains, cases = "filter", [], []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            table = line[1:].strip()
            chains = []
            continue
        if line.startswith(":"):
            chains = [c.strip() for c in line[1:].split(",") if c.strip()]
            continue
        parts = line.split(";")
        if len(parts) != 3:
            raise TFormatError(f"{filename}:{lineno}: expected RULE;SAVED;RESULT, got {line!r}")
        rule, saved, result = (p.strip() for p in parts)
        if result not in ("OK", "FAIL"):
            raise TFormatError(f"{filename}:{lineno}: RESULT must be OK or FAIL, got {result!r}")
        if not chains:
            raise TFormatError(f"{filename}:{lineno}: rule before any :CHAIN line")
        for chain in chains:
            cases.append(RuleCase(filename, lineno, table, chain, rule,
                                  (rule if saved == "=" else saved) if result == "OK" else None,
                                  result == "OK"))
    return cases


def script(cases: list[RuleCase], family: str, backend: str, *, fast: bool = True) -> str:
    """A POSIX shell script that adds every case in a fresh network namespace.

    The script runs under ``unshare --net``: the namespace dies with it, so
    no rule can leak into the guest's own rule set and nothing is left to
    clean up. Every exec costs tens of milliseconds under TCG, so the script
    spends as few as it can:

    * *fast* (upstream ``iptables-test.py --fast``): a table's OK cases go in
      with one ``iptables-restore`` and only the FAIL cases run one by one; if
      the restore is refused, the script falls back to one ``iptables -A`` per
      case for that table. :func:`run_file` re-runs the whole file slowly when
      the fast run disagrees with the file anywhere, so the fast path can
      only save time, never change a verdict;
    * error output is prefixed with shell builtins, not ``sed``;
    * each table is saved once: rules are only ever appended, so the n-th rule
      accepted in a chain is the n-th ``-A CHAIN`` line iptables-save prints;
    * then every saved rule is deleted by its saved text, with one
      ``iptables-restore -n`` of ``-D`` lines per table; only when that is
      refused does each rule go on its own (``-D``), naming the ones left.
    """
    tool = {"ipv4": "iptables", "ipv6": "ip6tables"}[family] + f"-{backend}"
    # scratch files per shell ($$): run_many runs several scripts at once
    lines = ["#!/bin/sh", f"echo '{_NS}'", "tmp=/tmp/nflab-t.$$", "trap 'rm -f $tmp.err $tmp.rules $tmp.save $tmp.del' EXIT",
             "err() { while IFS= read -r l || [ -n \"$l\" ]; do printf 'err %s\\n' \"$l\"; done < $tmp.err; }",
             f"ipt() {{ {tool} -w \"$@\" 2>$tmp.err; echo \"rc $?\"; err; }}",
             _DELETE_SAVED.replace("RESTORE", f"{tool}-restore -w -n")]

    def one_by_one(i: int, c: RuleCase) -> list[str]:
        return [f"echo '{_BEGIN} {i}'",
                f"ipt -t {shlex.quote(c.table)} -A {shlex.quote(c.chain)} {c.rule}",
                f"echo '{_END}'"]

    tables = list(dict.fromkeys(c.table for c in cases))
    for table in tables:
        ok = [(i, c) for i, c in enumerate(cases) if c.table == table and c.ok]
        if fast and ok:
            body = [f"*{table}"] + [f"-A {c.chain} {c.rule}" for _, c in ok] + ["COMMIT"]
            lines += ["cat > $tmp.rules <<'@@NFLAB-T-EOF'", *body, "@@NFLAB-T-EOF",
                      f"if {tool}-restore -w -n < $tmp.rules 2>$tmp.err; then"]
            lines += [f"  echo '{_BEGIN} {i}'; echo 'rc 0'; echo '{_END}'" for i, _ in ok]
            lines += ["else", f"  echo '{_FALLBACK} {table}'; err"]
            lines += ["  " + ln for i, c in ok for ln in one_by_one(i, c)]
            lines += ["fi"]
        else:
            lines += [ln for i, c in ok for ln in one_by_one(i, c)]
        lines += [ln for i, c in enumerate(cases) if c.table == table and not c.ok
                  for ln in one_by_one(i, c)]
    for table in tables:
        lines += _save_and_delete(tool, table, any(c.ok for c in cases if c.table == table))
    return "\n".join(lines) + "\n"


def _save_and_delete(tool: str, table: str, has_rules: bool) -> list[str]:
    """Shell lines that print *table*'s saved rules, then (when the file has
    OK cases there) delete each by its saved line (``delete_saved``)."""
    lines = [f"{tool}-save -t {shlex.quote(table)} > $tmp.save", f"echo '{_SAVE} {table}'",
             "while IFS= read -r l; do printf '%s\\n' \"$l\"; done < $tmp.save", f"echo '{_END}'"]
    if has_rules:
        lines += [f"echo '{_DEL} {table}'", f"delete_saved {shlex.quote(table)}", f"echo '{_END}'"]
    return lines


def remote_command(text: str) -> str:
    """A one-line command that ships *text* to the guest and runs it with sh
    in a network namespace of its own."""
    b64 = base64.b64encode(text.encode()).decode()
    # a file of its own: two runs against one guest (upstream-t beside test) never
    # overwrite each other's script
    return remote.via_file(f'echo {b64} | base64 -d > "$f"', "unshare --net sh",
                           template="/tmp/nflab-t.XXXXXX.sh")


def results(cases: list[RuleCase], backend: str, output: str) -> list[RuleResult]:
    by_index: dict[int, RuleResult] = {}
    order: list[int] = []            # cases in the order the guest ran them
    saved: dict[tuple[str, str], list[str]] = {}
    undeletable: dict[tuple[str, str], list[str]] = {}   # (table, saved line) -> iptables' words, one per rule left
    current, table, deleting, left = None, None, None, None
    for line in output.splitlines():
        if line.startswith(_BEGIN + " "):
            idx = int(line.split()[1])
            current = by_index[idx] = RuleResult(cases[idx], backend, -1, [], "")
            order.append(idx)
        elif line.startswith(_SAVE + " "):
            table, current = line.split()[1], None
        elif line.startswith(_DEL + " "):
            deleting, current = line.split()[1], None
        elif line == _END:
            current, table, deleting = None, None, None
        elif deleting is not None and line.startswith(_UNDELETABLE):
            left = (deleting, line[len(_UNDELETABLE):].strip())
            undeletable.setdefault(left, []).append("")
        elif deleting is not None and line.startswith("err ") and left is not None:
            undeletable[left][-1] += line[4:].strip() + " "
        elif current is not None:
            if line.startswith("rc "):
                current.exit_code = int(line[3:])
            elif line.startswith("err "):
                current.stderr += line[4:] + "\n"
        elif table is not None and line.startswith("-A "):
            chain = line.split()[1]
            saved.setdefault((table, chain), []).append(line.strip())
    missing = [c.id for i, c in enumerate(cases) if i not in by_index]
    if missing:
        raise VMError(f"the guest's rule script stopped early: no result for {missing[:3]}...",
                      hint="see the guest console (invoke vm-exec --cmd=dmesg) for a crash or OOM kill")
    # the n-th rule accepted in a chain is its n-th saved line
    for key in {(c.table, c.chain) for c in cases}:
        accepted = [by_index[i] for i in order
                    if (cases[i].table, cases[i].chain) == key and by_index[i].exit_code == 0]
        lines = saved.get(key, [])
        for n, r in enumerate(accepted):
            r.saved_lines = [lines[n]] if n < len(lines) else []
    _blame_undeletable(by_index, undeletable)
    return [by_index[i] for i in range(len(cases))]


def _blame_undeletable(by_index: dict, undeletable: dict):
    """Say on each case saved as a line that ``-D`` with it left rules in
    place how many of the rules saved so it left, and the other cases'
    lines: which spelling has the other encoding, the text cannot tell."""
    for (table, text), words in undeletable.items():
        same = [r for r in by_index.values() if r.case.table == table and r.saved_lines == [text]]
        lines = ", ".join(sorted({str(r.case.lineno) for r in same}))
        said = "; ".join(sorted({w.strip() for w in words if w.strip()}))
        for r in same:
            r.undeletable = (f"iptables -D with the saved text {text!r} left {len(words)} of the "
                             f"{len(same)} rules saved as it in place (.t line(s) {lines})"
                             f"{': ' + said if said else ''}. The saved text gives another encoding "
                             "than one of those rules has (an option given at its default and "
                             "recorded? an option's `default` in the definition folds it away)")


def _run(host, cases, family, backend, fast):
    out = remote.run(host, remote_command(script(cases, family, backend, fast=fast)))
    if _NS not in out.stdout:
        raise VMError(f"cannot create a network namespace in the guest "
                      f"(unshare --net exited {out.rc}): {out.stderr.strip()}",
                      hint=NETNS_HINT)
    return results(cases, backend, out.stdout)


def run_file(host, path: Path, backend: str) -> list[RuleResult]:
    """Run one .t file on a testinfra *host* with *backend* (legacy or nft).

    Fast first; if anything in the fast run disagrees with the file, the file
    runs again one rule at a time and those results are the verdict (as
    upstream's ``--fast`` mode does)."""
    path = Path(path)
    cases = parse(path.read_text(), str(path))
    family = family_of(path)
    res = _run(host, cases, family, backend, fast=True)
    if all(r.passed for r in res):
        return res
    return _run(host, cases, family, backend, fast=False)


def batch_command(scripts: list[str], jobs: int = 2) -> str:
    """One command that runs every script in its own ``unshare --net``, at most
    *jobs* at a time, and prints each one's output after an ``@@NFLAB-T-JOB k``
    line, in order. One SSH round trip for a whole catalog's .t files, and
    both vCPUs busy (each namespace has its own tables; iptables-legacy's
    ``-w`` serialises on the xtables lock only while it commits)."""
    files = "".join(f"{i}\n" for i in range(len(scripts)))
    blob = "".join(f"echo {base64.b64encode(t.encode()).decode()} | base64 -d > $d/{i}.sh\n"
                   for i, t in enumerate(scripts))
    text = (f"d=$(mktemp -d /tmp/nflab-t.XXXXXX) || exit 91\n{blob}"
            f"printf '{files}' | xargs -P {max(1, jobs)} -I@ sh -c "
            f"'unshare --net sh $0/@.sh > $0/@.out 2>&1' $d\n"
            f"for i in $(seq 0 {len(scripts) - 1}); do echo \"{_JOB} $i\"; cat $d/$i.out; done\n"
            "rm -rf $d\n")
    return f"echo {base64.b64encode(text.encode()).decode()} | base64 -d | sh"


def _batches(scripts: list[str], limit: int = MAX_COMMAND // 2) -> list[list[str]]:
    """*scripts* in consecutive groups whose batch command stays under *limit*
    bytes (a command line is one argv string: Linux caps those at 128 KiB)."""
    groups: list[list[str]] = [[]]
    size = 0
    for text in scripts:
        cost = len(text) * 4 // 3 + 64
        if groups[-1] and size + cost > limit:
            groups.append([])
            size = 0
        groups[-1].append(text)
        size += cost
    return [g for g in groups if g]


def split_jobs(output: str, n: int) -> list[str]:
    """The per-script outputs of :func:`batch_command`'s *output*."""
    outs: list[list[str]] = [[] for _ in range(n)]
    current = None
    for line in output.splitlines():
        if line.startswith(_JOB + " "):
            current = int(line.split()[1])
        elif current is not None:
            outs[current].append(line)
    return ["\n".join(o) for o in outs]


def run_many(host, runs: list[tuple[Path, str]], jobs: int = 2) -> dict:
    """Run several (.t file, backend) pairs in one round trip, *jobs* at a time.

    Returns {(path, backend): [RuleResult] or an Exception}; a pair whose fast
    run disagrees with its file is re-run alone and slowly, like
    :func:`run_file`."""
    plans = []
    for path, backend in runs:
        path = Path(path)
        cases = parse(path.read_text(), str(path))
        plans.append((path, backend, cases, family_of(path)))
    texts = []
    for batch in _batches([script(c, fam, b) for _, b, c, fam in plans]):
        # ~80 KiB: over the guest SSH server's exec limit, so it goes over stdin
        out = remote.run(host, batch_command(batch, jobs))
        if out.rc == 91:
            raise VMError(f"cannot create a scratch directory in the guest: {out.stderr.strip()}",
                          hint="the guest's /tmp is its tmpfs overlay: check free memory (invoke vm-exec --cmd='df -h /tmp')")
        if out.rc != 0:
            # the batch ends with its clean-up: any other status means it did not run
            # to the end (the SSH connection dropped, the guest killed its shell)
            raise VMError(f"the guest's batch of .t runs ended early (status {out.rc}): "
                          f"{out.stderr.strip()[-300:] or '(nothing on stderr)'}",
                          hint="see whether the VM still answers (invoke vm-exec --cmd=true) and "
                               "its console.log for a fault, then run again")
        texts += split_jobs(out.stdout, len(batch))
    done: dict = {}
    for (path, backend, cases, fam), text in zip(plans, texts):
        try:
            if _NS not in text:
                raise VMError(f"cannot create a network namespace in the guest: {text.strip()[:300]}",
                              hint=NETNS_HINT)
            res = results(cases, backend, text)
            if not all(r.passed for r in res):
                res = _run(host, cases, fam, backend, fast=False)
            done[(path, backend)] = res
        except Exception as exc:        # reported by the test of that pair
            done[(path, backend)] = exc
    return done
