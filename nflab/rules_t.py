"""Run iptables' ``extensions/*.t`` rule-syntax files against a guest.

The format is upstream iptables' own (``iptables-test.py``)::

    :INPUT,FORWARD,OUTPUT         chains the following rules are added to
    *mangle                       table for the following rules (default filter);
                                  the chains of the last : line stay
    RULE;SAVED;RESULT             RESULT is OK, FAIL or NOMATCH; SAVED "=" means RULE itself
    RULE;SAVED;RESULT;VARIANT[;OTHER]
                                  RESULT holds for VARIANT (LEGACY or NFT) only; the
                                  other backend expects OTHER, or else the inverse
                                  (OK <-> FAIL, NOMATCH -> OK)
    @COMMAND, %COMMAND            run as is (a leading iptables, ip6tables, ebtables
                                  or arptables goes through the backend's
                                  xtables-*-multi); its exit status is not judged

NOMATCH: the rule is accepted, but iptables-save must not print it as SAVED
(a known-lossy option). The external commands are the file's fixtures (the
``nfct timeout`` a ``-j CT --timeout`` rule names, the RATEEST targets
``-m rateest`` rules need): a file with any runs one rule at a time in file
order with each command at its place, as upstream's runner does (which
also skips its fast mode for such files); a rule that then fails names the
commands that failed before it.

For the kit's catalog ``.t`` files, ``libxt_*.t`` and ``libipt_*.t`` run with
iptables, ``libip6t_*.t`` with ip6tables (the catalog keeps the IPv6 rules of
an extension in its own ``libip6t_`` file, :func:`family_of`). Upstream's
runner from iptables 1.8.11 on runs ``libxt_*.t`` with both (1.8.9 with
iptables only): :func:`families_of`, used by ``nflab.upstream_t`` as the
runner of the source at hand does. Every file runs once per backend the
kernel serves (legacy and nft; nft only where the kernel has no legacy
xtables, ``vm/xtables.py``: ``tests/suites/test_rules_t.py`` skips the legacy
half then). Beyond the format, every accepted rule must be found again by the
text iptables-save prints for it (for OK, not for NOMATCH): the script deletes
each one by its saved line (``-D``), as ``iptables-save | iptables -D``
scripts and ``iptables -C`` in provisioning tools do, so a rule with two
encodings (an option given at its default recorded as given) fails its case.
All rules of a file run as one shell script inside a throwaway network
namespace in the guest, so the host's (and the guest's main) rule set is never
touched and a file costs one SSH round trip (two when the fast path
disagrees, see :func:`script`).
"""

from __future__ import annotations

import base64
import shlex
from dataclasses import dataclass
from pathlib import Path

from ground.errors import NflabError, VMError
from vm import remote

NETNS_HINT = "the rule tests need CONFIG_NET_NS; boot a Debian kernel or enable it in a source: build"

BACKENDS = ("legacy", "nft")
_BEGIN, _END, _SAVE = "@@NFLAB-T", "@@NFLAB-T-END", "@@NFLAB-T-SAVE"
_NS, _FALLBACK, _JOB = "@@NFLAB-T-NETNS", "@@NFLAB-T-SLOW", "@@NFLAB-T-JOB"
_DEL, _UNDELETABLE = "@@NFLAB-T-DEL", "undeletable "
_EXT = "@@NFLAB-T-EXT"
RESULTS = ("OK", "FAIL", "NOMATCH")
VARIANTS = {"LEGACY": "legacy", "NFT": "nft"}   # upstream's variant column -> backend
_INVERSE = {"OK": "FAIL", "FAIL": "OK", "NOMATCH": "OK"}     # upstream's variant_res()
_XTABLES_TOOLS = ("iptables ", "ip6tables ", "ebtables ", "arptables ")
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
    # expected iptables-save text after "-A CHAIN"; None when FAIL, or when OK only
    # by inverting a variant's FAIL line that gives no text (then any text is taken)
    saved: str | None
    ok: bool                 # the rule must be accepted
    nomatch: bool = False    # accepted, but iptables-save must NOT print it as *saved*
    variant: str = ""        # "LEGACY" or "NFT": the line's result is scoped to that backend

    @property
    def id(self) -> str:
        return f"{Path(self.file).name}:{self.lineno}:{self.table}/{self.chain}"

    @property
    def expect(self) -> str:
        return "FAIL" if not self.ok else "NOMATCH" if self.nomatch else "OK"


@dataclass(frozen=True)
class External:
    """A ``@`` or ``%`` line of a .t file: a command its rules need run first."""
    lineno: int
    command: str

    def shell(self, backend: str) -> str:
        """The command as upstream's ``execute_cmd`` runs it with *backend*."""
        if self.command.startswith(_XTABLES_TOOLS):
            return f"xtables-{backend}-multi {self.command}"
        return self.command


@dataclass
class RuleResult:
    case: RuleCase
    backend: str
    exit_code: int
    saved_lines: list
    stderr: str
    undeletable: str = ""   # why iptables -D by its saved line left it in place
    fixtures: str = ""      # the file's external commands that failed before this rule

    @property
    def passed(self) -> bool:
        return not self.problem

    @property
    def problem(self) -> str:
        text = self._problem()
        return f"{text} [after {self.fixtures}]" if text and self.fixtures else text

    def _problem(self) -> str:
        c = self.case
        if not c.ok:
            if self.exit_code == 0:
                return f"expected FAIL, but the rule was accepted (saved as {self.saved_lines})"
            return ""
        if self.exit_code != 0:
            return f"expected {c.expect}, iptables exited {self.exit_code}: {self.stderr.strip()}"
        if c.saved is None:          # OK without an expected text: accepted is all
            return self.undeletable
        want = f"-A {c.chain} {c.saved}".strip()
        if c.nomatch:
            # upstream: "should not match"; the rule is known to save otherwise, so
            # its saved text is not expected to delete it either
            if want in self.saved_lines:
                return f"expected NOMATCH, but iptables-save printed {want!r} as the file gives it"
            return ""
        if want not in self.saved_lines:
            return f"iptables-save printed {self.saved_lines}, expected {want!r}"
        return self.undeletable


class TFormatError(NflabError):
    """A .t file that is not in iptables-test.py's format."""

    def __init__(self, message, *, hint=None, detail=None):
        super().__init__(message, hint=hint or (
            "lines are RULE;SAVED;RESULT[;LEGACY|NFT[;RESULT]] with RESULT OK, FAIL or NOMATCH, "
            "after a :CHAIN[,CHAIN] line; *TABLE, @COMMAND, %COMMAND and # lines besides "
            "(the format of iptables' iptables-test.py)"), detail=detail)


def family_of(path: Path) -> str:
    """The family of a kit catalog .t file: ``libip6t_`` IPv6, ``libxt_`` and
    ``libipt_`` IPv4 (a catalog extension keeps its IPv6 rules in its own
    ``libip6t_`` file)."""
    name = Path(path).name
    if name.startswith("libip6t_"):
        return "ipv6"
    if name.startswith(("libxt_", "libipt_")):
        return "ipv4"
    raise TFormatError(f"{path}: name must start with libxt_, libipt_ or libip6t_",
                       hint="the name says which of iptables and ip6tables runs the file")


def families_of(path: Path, *, libxt_both: bool) -> tuple[str, ...]:
    """The families upstream's runner runs *path* with: ``libxt_`` files with
    iptables and ip6tables when *libxt_both* (iptables-test.py from 1.8.11 on),
    else as :func:`family_of`."""
    if libxt_both and Path(path).name.startswith("libxt_"):
        return ("ipv4", "ipv6")
    return (family_of(path),)


def resolve(result: str, variant: str, other: str | None, backend: str | None) -> str:
    """The result a line expects with *backend* (upstream's ``variant_res``):
    *result* on the *variant*'s own backend (or when *backend* is None), else
    *other* when given, else the inverse of *result*."""
    if not variant or backend is None or VARIANTS[variant] == backend:
        return result
    return other if other is not None else _INVERSE[result]


def parse(text: str, filename: str = "<t>", backend: str | None = None) -> list[RuleCase]:
    """Parse a .t file into one RuleCase per (rule, chain), with each line's
    result for *backend* (None: as written, for the variant's own backend)."""
    return parse_file(text, filename, backend)[0]


def externals(text: str, filename: str = "<t>") -> list[External]:
    """The ``@``/``%`` command lines of a .t file."""
    return parse_file(text, filename)[1]


def parse_file(text: str, filename: str = "<t>",
               backend: str | None = None) -> tuple[list[RuleCase], list[External]]:
    """(cases, external commands) of a .t file, as :func:`parse`."""
    table, chains, cases, commands = "filter", [], [], []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line[0] in "@%":
            # upstream runs these before its checks for a table or a chain
            commands.append(External(lineno, line[1:].strip()))
            continue
        if line.startswith("*"):
            table = line[1:].strip()     # the chains of the last : line stay
            continue
        if line.startswith(":"):
            chains = [c.strip() for c in line[1:].split(",") if c.strip()]
            continue
        parts = [p.strip() for p in line.split(";")]
        if not 3 <= len(parts) <= 5:
            raise TFormatError(f"{filename}:{lineno}: expected RULE;SAVED;RESULT[;VARIANT[;RESULT]], "
                               f"got {line!r}")
        rule, saved, result = parts[:3]
        variant = parts[3] if len(parts) > 3 else ""
        # upstream's runner treats any result but OK and FAIL as NOMATCH; libxt_NFLOG.t
        # (1.8.11) gives "=" as the other backend's result so
        other = ("NOMATCH" if parts[4] == "=" else parts[4]) if len(parts) > 4 else None
        if result not in RESULTS:
            raise TFormatError(f"{filename}:{lineno}: RESULT must be OK, FAIL or NOMATCH, got {result!r}")
        if len(parts) > 3 and variant not in VARIANTS:
            raise TFormatError(f"{filename}:{lineno}: VARIANT must be LEGACY or NFT, got {variant!r}")
        if other is not None and other not in RESULTS:
            raise TFormatError(f"{filename}:{lineno}: the other backend's RESULT must be OK, FAIL, "
                               f"NOMATCH or =, got {parts[4]!r}")
        if not chains:
            raise TFormatError(f"{filename}:{lineno}: rule before any :CHAIN line")
        expect = resolve(result, variant, other, backend)
        text_saved = rule if saved == "=" else saved
        if expect == "FAIL":
            text_saved = None
        elif not saved and result == "FAIL":
            # a FAIL line without SAVED text that the other backend accepts (1.8.9's
            # libxt_TCPMSS.t "…;;FAIL;LEGACY"): the file gives no text to expect
            text_saved = None
        for chain in chains:
            cases.append(RuleCase(filename, lineno, table, chain, rule, text_saved,
                                  expect != "FAIL", expect == "NOMATCH", variant))
    return cases, commands


def script(cases: list[RuleCase], family: str, backend: str, *, fast: bool = True,
           commands: list[External] = ()) -> str:
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

    A file with external *commands* (``@``/``%`` lines) runs one rule at a
    time in file order, each command at its place (upstream's runner has no
    fast mode for such files either).
    """
    tool = {"ipv4": "iptables", "ipv6": "ip6tables"}[family] + f"-{backend}"
    # scratch files per shell ($$): run_many runs several scripts at once
    lines = ["#!/bin/sh", f"echo '{_NS}'", "tmp=/tmp/nflab-t.$$", "trap 'rm -f $tmp.err $tmp.rules $tmp.save $tmp.del' EXIT",
             "err() { while IFS= read -r l || [ -n \"$l\" ]; do printf 'err %s\\n' \"$l\"; done < $tmp.err; }",
             f"ipt() {{ {tool} -w \"$@\" 2>$tmp.err; echo \"rc $?\"; err; }}",
             _DELETE_SAVED.replace("RESTORE", f"{tool}-restore -w -n")]

    tables = list(dict.fromkeys(c.table for c in cases))
    if commands:
        lines += _in_file_order(cases, commands, backend)
        tables = []      # saved below, as in the per-table path
    for table in tables:
        ok = [(i, c) for i, c in enumerate(cases) if c.table == table and c.ok]
        if fast and ok:
            body = [f"*{table}"] + [f"-A {c.chain} {c.rule}" for _, c in ok] + ["COMMIT"]
            lines += ["cat > $tmp.rules <<'@@NFLAB-T-EOF'", *body, "@@NFLAB-T-EOF",
                      f"if {tool}-restore -w -n < $tmp.rules 2>$tmp.err; then"]
            lines += [f"  echo '{_BEGIN} {i}'; echo 'rc 0'; echo '{_END}'" for i, _ in ok]
            lines += ["else", f"  echo '{_FALLBACK} {table}'; err"]
            lines += ["  " + ln for i, c in ok for ln in _one_by_one(i, c)]
            lines += ["fi"]
        else:
            lines += [ln for i, c in ok for ln in _one_by_one(i, c)]
        lines += [ln for i, c in enumerate(cases) if c.table == table and not c.ok
                  for ln in _one_by_one(i, c)]
    for table in dict.fromkeys(c.table for c in cases):
        lines += _save_and_delete(tool, table, any(c.ok for c in cases if c.table == table))
    return "\n".join(lines) + "\n"


def _one_by_one(i: int, c: RuleCase) -> list[str]:
    return [f"echo '{_BEGIN} {i}'",
            f"ipt -t {shlex.quote(c.table)} -A {shlex.quote(c.chain)} {c.rule}",
            f"echo '{_END}'"]


def _in_file_order(cases: list[RuleCase], commands: list[External], backend: str) -> list[str]:
    """Shell lines that add each case alone and run each external command, in
    file order: a command runs after the rules above it, before those below
    (upstream's runner ignores its status; the script reports it). A command
    that leaves a rule of its own in a chain the cases use would shift their
    saved lines; upstream's (libxt_rateest.t) delete what they add."""
    steps = sorted([(c.lineno, 0, i) for i, c in enumerate(cases)] +
                   [(x.lineno, 1, k) for k, x in enumerate(commands)])
    lines = []
    for _, kind, k in steps:
        if kind == 0:
            lines += _one_by_one(k, cases[k])
        else:
            lines += [f"echo '{_EXT} {commands[k].lineno}'",
                      f"( {commands[k].shell(backend)}\n) </dev/null >$tmp.err 2>&1; echo \"rc $?\"; err",
                      f"echo '{_END}'"]
    return lines


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
    failed_commands: list[tuple[int, str]] = []    # (.t line, what it said) of each command that failed
    current, table, deleting, left, command = None, None, None, None, None
    for line in output.splitlines():
        if line.startswith(_BEGIN + " "):
            idx = int(line.split()[1])
            current = by_index[idx] = RuleResult(cases[idx], backend, -1, [], "")
            order.append(idx)
        elif line.startswith(_EXT + " "):
            command, current = [int(line.split()[1]), -1, ""], None
        elif command is not None and line != _END:
            if line.startswith("rc "):
                command[1] = int(line[3:])
            elif line.startswith("err "):
                command[2] += line[4:].strip() + " "
        elif line.startswith(_SAVE + " "):
            table, current = line.split()[1], None
        elif line.startswith(_DEL + " "):
            deleting, current = line.split()[1], None
        elif line == _END:
            if command is not None and command[1] != 0:
                failed_commands.append((command[0], f"exited {command[1]}: {command[2].strip()[:200]}"))
            current, table, deleting, command = None, None, None, None
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
    for r in by_index.values():
        before = [f"line {n}'s command, which {said}" for n, said in failed_commands if n < r.case.lineno]
        r.fixtures = "; ".join(before)
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


def _run(host, cases, family, backend, fast, commands=()):
    out = remote.run(host, remote_command(script(cases, family, backend, fast=fast, commands=commands)))
    if _NS not in out.stdout:
        raise VMError(f"cannot create a network namespace in the guest "
                      f"(unshare --net exited {out.rc}): {out.stderr.strip()}",
                      hint=NETNS_HINT)
    return results(cases, backend, out.stdout)


def run_file(host, path: Path, backend: str, family: str | None = None) -> list[RuleResult]:
    """Run one .t file on a testinfra *host* with *backend* (legacy or nft) and
    *family* (default: :func:`family_of`).

    Fast first; if anything in the fast run disagrees with the file, the file
    runs again one rule at a time and those results are the verdict (as
    upstream's ``--fast`` mode does)."""
    path = Path(path)
    cases, commands = parse_file(path.read_text(), str(path), backend)
    family = family or family_of(path)
    res = _run(host, cases, family, backend, fast=not commands, commands=commands)
    if commands or all(r.passed for r in res):
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


def run_many(host, runs: list[tuple], jobs: int = 2) -> dict:
    """Run several (.t file, backend) pairs, or (.t file, backend, family)
    triples (default family: :func:`family_of`), in one round trip, *jobs* at a
    time.

    Returns {run as given: [RuleResult] or an Exception}: a file that cannot be
    read or parsed is that run's exception, the others still run. A run whose
    fast run disagrees with its file is re-run alone and slowly, like
    :func:`run_file`."""
    plans, done = [], {}
    keys = [(Path(run[0]), *run[1:]) for run in runs]
    for run in keys:
        path, backend = run[0], run[1]
        try:
            cases, commands = parse_file(path.read_text(), str(path), backend)
            fam = run[2] if len(run) > 2 else family_of(path)
        except (NflabError, OSError, UnicodeDecodeError) as exc:    # reported by that run's test
            done[run] = exc if isinstance(exc, NflabError) else TFormatError(
                f"cannot read {path}: {exc}", hint="the .t file must be a readable UTF-8 text file")
            continue
        plans.append((run, backend, cases, fam, commands))
    texts = []
    for batch in _batches([script(c, fam, b, fast=not x, commands=x) for _, b, c, fam, x in plans]):
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
    for (key, backend, cases, fam, commands), text in zip(plans, texts):
        try:
            if _NS not in text:
                raise VMError(f"cannot create a network namespace in the guest: {text.strip()[:300]}",
                              hint=NETNS_HINT)
            res = results(cases, backend, text)
            if not commands and not all(r.passed for r in res):
                res = _run(host, cases, fam, backend, fast=False)
            done[key] = res
        except Exception as exc:        # reported by the test of that pair
            done[key] = exc
    return {run: done[run] for run in keys}
