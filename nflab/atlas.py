"""The measured netfilter map ("atlas"): which hook points exist, which stock
tables sit where and at which priority, which paths packets take, and where the
user's own hook modules run — measured in a lab VM, then drawn.

Three layers, each usable alone:

* :func:`measure` (needs a running kit VM) → an :class:`Atlas`, a plain,
  JSON-serialisable data model (:meth:`Atlas.to_json` / :meth:`Atlas.from_json`);
* :func:`render_svg` → a handwritten SVG (the classic netfilter panorama: the
  six hook points in packet-flow order, each a stack of what runs there sorted
  by priority, ipv4/ipv6 badges per row), :func:`render_markdown` → tables;
* :func:`to_png` → PNG with whatever converter is installed
  (``rsvg-convert``, then ``cairosvg``, then ImageMagick).

How it measures (all in the guest, only with the VM's own tools; the host
only speaks scapy on the wires and never loads anything):

1. **attachment** — ``iptables-legacy``/``ip6tables-legacy`` (the kernel's xt
   tables; iptables-nft would measure nf_tables base chains instead, so the kit
   uses legacy wherever the kernel has it; on a kernel without legacy xtables,
   ``vm/xtables.py``, the tables are iptables-nft's base chains, and
   :attr:`Atlas.backend` and a note say so) get a counting rule matching the tracer's payload
   magic in every chain of raw, mangle, nat, filter and security. One tagged
   packet per path (forward: client wire → server wire; local delivery: TCP SYN
   to the guest, whose RST carries no payload; locally generated: UDP from the
   guest) and the counter deltas say at which hooks each table sees packets.
   The tracer log of the same packets gives the path (hook sequence).
2. **priority intervals** — for every measured (table, hook) one rule with an
   observable effect matches exactly one tagged packet: mangle ``MARK`` (the
   mark appears), nat ``DNAT``/``SNAT`` (dst/src change), raw/filter/security
   ``DROP`` (later points never see it). The tracer's bracketing points
   (-450 -250 -175 -125 -75 25 75 125 on every inet hook) show between which
   two points the effect appears: the table's priority lies strictly inside.
   Conntrack (ct none → new) and defrag (fragments → one datagram) are
   measured the same way.
3. **exact priorities** — where ``nfnetlink_hook`` exists (6.12 cloud: a
   module; 6.1: not built) ``nft list hooks`` names every registered hook
   function with module and priority. Each measured interval must contain
   exactly one stock hook there; that gives the exact value and is a
   cross-check (a failed one is reported in :attr:`Atlas.checks`).
4. **the user's modules** — every ``/proc/net/nflab_*`` lists its module's
   points (family hook priority), the tracer's own included.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from ground.errors import NflabError, VMError
from nflab import deploy, tracing
from vm import lab, topology, xtables
from vm.wire import Wire

HOOKS = ("INGRESS", "PRE_ROUTING", "LOCAL_IN", "FORWARD", "LOCAL_OUT", "POST_ROUTING")
FAMILIES = ("ipv4", "ipv6")
TABLES = ("raw", "mangle", "nat", "filter", "security")
CHAIN_HOOK = {"PREROUTING": "PRE_ROUTING", "INPUT": "LOCAL_IN", "FORWARD": "FORWARD",
              "OUTPUT": "LOCAL_OUT", "POSTROUTING": "POST_ROUTING"}
HOOK_CHAIN = {v: k for k, v in CHAIN_HOOK.items()}
PATHS = ("forward", "local-in", "local-out")
PATH_TITLE = {"forward": "forwarded", "local-in": "local delivery", "local-out": "locally generated"}
NFT_FAMILY = {"ip": "ipv4", "ip6": "ipv6", "netdev": "netdev"}
NFT_HOOK = {"prerouting": "PRE_ROUTING", "input": "LOCAL_IN", "forward": "FORWARD",
            "output": "LOCAL_OUT", "postrouting": "POST_ROUTING", "ingress": "INGRESS"}
BACKEND = "iptables-legacy"
COUNT_COMMENT = "nflab-atlas-count"
CT_COMMENT = "nflab-atlas-ct"
PROBE_COMMENT = "nflab-atlas-probe"
MARK = 0x4e4c
# documented priorities (NF_IP_PRI_* == NF_IP6_PRI_*; iptables-nft's security: 150):
# nflab.tracing holds them, for its labels and fate() too
DOCUMENTED = tracing.DOCUMENTED
DOCUMENTED_NFT = tracing.DOCUMENTED_NFT
NAT_DOCUMENTED = tracing.NAT_DOCUMENTED
# the device whose netdev hooks the atlas lists (the tracer's ingress_dev, the client wire)
INGRESS_DEV = "eth1"
# the tracer's bracketing points on every inet hook (kmods/catalog/tracer/ext.toml)
TRACER_POINTS = (-450, -250, -175, -125, -75, 25, 75, 125)

# how each kind of entry is drawn: fill, stroke
STYLE = {
    "raw": ("#f8c9d4", "#b03a5b"),
    "defrag": ("#e6e6e6", "#808080"),
    "conntrack": ("#d0d0d0", "#555555"),
    "mangle": ("#fde8a8", "#a8820b"),
    "nat": ("#c9ecc4", "#2f7d27"),
    "filter": ("#c7dcf7", "#2a5ea8"),
    "security": ("#e2d1f2", "#6b3fa0"),
    "tracer": ("#ffffff", "#b8b8b8"),
    "module": ("#ffd6a8", "#c15f00"),
    "other": ("#f4f4f4", "#909090"),
}


# ---------------------------------------------------------------- data model

@dataclass
class Entry:
    """One thing registered at one hook point of one family."""

    family: str                 # ipv4, ipv6, netdev
    hook: str                   # one of HOOKS
    name: str                   # raw, mangle, nat, filter, security, conntrack, defrag,
                                # conntrack confirm, nflab_tracer, nflab_<x>, or a function name
    kind: str                   # table, core, tracer, module, other
    priority: int | None = None          # exact: nft list hooks, or the module's own claim
    interval: list | None = None         # measured [lo, hi]: lo < priority < hi (None = open)
    source: str = ""                     # measured, nft, nft+measured, proc, proc+nft
    function: str = ""
    module: str = ""
    evidence: str = ""
    beyond: bool = False                 # seen at every tracer point: any drop is after the last
    device: str = ""                     # netdev: the device the hook is attached to

    @property
    def style(self) -> str:
        if self.kind == "table" or self.name in ("conntrack", "defrag"):
            return self.name if self.name in STYLE else "other"
        if self.name == "conntrack confirm":
            return "conntrack"
        return {"tracer": "tracer", "module": "module"}.get(self.kind, "other")

    @property
    def order(self) -> float:
        """Where the entry sorts in its hook: its priority, else its interval's middle."""
        if self.priority is not None:
            return float(self.priority)
        if self.interval:
            lo, hi = self.interval
            if lo is not None and hi is not None:
                return (lo + hi) / 2
            if lo is not None:
                return lo + 25.0
            if hi is not None:
                return hi - 25.0
        return math.inf

    def priority_text(self) -> str:
        """``-150``; ``-175 < p < -125`` when only measured; ``-150 ∈ (-175, -125)`` when both."""
        iv = self.interval_text()
        if self.priority is not None:
            return _prio(self.priority) + (f" ∈ {iv}" if iv else "")
        if iv:
            return iv
        return "?"

    def interval_text(self) -> str:
        if not self.interval:
            return ""
        lo, hi = self.interval
        return f"({'-∞' if lo is None else lo}, {'+∞' if hi is None else hi})"


@dataclass
class Check:
    ok: bool
    what: str


@dataclass
class Atlas:
    """What :func:`measure` found on one kernel (JSON-serialisable)."""

    kernel: str
    spec: str | None = None
    backend: str = BACKEND
    exact: bool = False                   # nft list hooks was available
    entries: list = field(default_factory=list)
    # counts[family][table][hook][path] = packets the counting rule saw
    counts: dict = field(default_factory=dict)
    # paths[family][path] = hooks the tagged packet visited, in order
    paths: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    generated: str = ""

    # -- queries ---------------------------------------------------------
    def at(self, hook: str, family: str | None = None) -> list:
        """Entries at *hook* (of *family*), by priority."""
        return sorted((e for e in self.entries if e.hook == hook
                       and (family is None or e.family == family)), key=lambda e: (e.order, e.name))

    def find(self, family: str, hook: str, name: str) -> Entry | None:
        return next((e for e in self.entries if (e.family, e.hook, e.name) == (family, hook, name)), None)

    def attached(self, family: str, table: str) -> list:
        """Hooks where *table* counted packets, in HOOKS order."""
        per = self.counts.get(family, {}).get(table, {})
        return [h for h in HOOKS if sum(per.get(h, {}).values()) > 0]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    # -- (de)serialisation -----------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "Atlas":
        data = dict(data)
        data["entries"] = [Entry(**e) for e in data.get("entries", [])]
        data["checks"] = [Check(**c) for c in data.get("checks", [])]
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "Atlas":
        return cls.from_dict(json.loads(text))


INT_MAX = 2**31 - 1


def _prio(p: int) -> str:
    if p >= INT_MAX - 9:
        return "INT_MAX" + (f"-{INT_MAX - p}" if p != INT_MAX else "")
    if p <= -INT_MAX - 1 + 9:
        return "INT_MIN" + (f"+{p + INT_MAX + 1}" if p != -INT_MAX - 1 else "")
    return f"{p:+d}" if p else "0"


# ---------------------------------------------------------------- interval logic (pure)

def change_interval(seen: dict) -> tuple:
    """*seen*: tracer priority -> effect visible there (one hook, one packet).
    Returns ((lo, hi), problem): the effect first shows at hi, lo is the last point
    before without it; None bounds are open. problem is a string when the
    observations are not one clean step (or no effect at all)."""
    prios = sorted(seen)
    if not prios:
        return None, "the packet never reached this hook"
    first = next((p for p in prios if seen[p]), None)
    if first is None:
        return None, "no effect visible at any tracer point"
    before = [p for p in prios if p < first]
    after = [p for p in prios if p >= first]
    if not all(seen[p] for p in after):
        return None, "effect not monotonic: " + " ".join(f"{p}:{int(seen[p])}" for p in prios)
    return [before[-1] if before else None, first], None


def drop_interval(points: list, seen: set) -> tuple:
    """*points*: the tracer's priorities at the hook; *seen*: those that logged the
    packet. A drop between lo and hi: every point below hi saw it, none from hi on."""
    pts = sorted(points)
    if not seen:
        return [None, pts[0] if pts else None], None
    missing = [p for p in pts if p not in seen]
    if not missing:
        return None, "the packet was not dropped at this hook"
    hi = missing[0]
    if any(p > hi for p in seen):
        return None, f"points after {hi} still saw the packet: {sorted(seen)}"
    lo = max(p for p in seen if p < hi) if any(p < hi for p in seen) else None
    return [lo, hi], None


def drop_result(seen: set, reference: list, hook: str, visits: list) -> tuple:
    """A DROP rule's effect at *hook*: (interval, evidence, problem, beyond). A packet
    every tracer point saw was dropped after the last one when it never reached the
    hooks its path (*reference*, measured without the rule) goes on to; where the
    path ends at *hook* the tracer cannot tell (*beyond*: ``nft list hooks`` may)."""
    iv, problem = drop_interval(list(TRACER_POINTS), seen)
    if iv is not None:
        return iv, f"DROP: seen at {iv[0]}, gone from {iv[1]}", None, False
    last = max(TRACER_POINTS)
    if not set(TRACER_POINTS) <= seen:
        return None, "", problem, False
    later = reference[reference.index(hook) + 1:] if hook in reference else []
    if later and not any(h in visits for h in later):
        return [last, None], f"DROP: seen at {last}, gone before {later[0]}", None, False
    if later:
        return None, "", problem, False
    return None, "", (f"seen at every tracer point up to {last} and the path ends at this "
                      "hook: a drop above it is invisible to the tracer"), True


def nft_hook_rows(text: str, device: str | None = INGRESS_DEV) -> list:
    """``nft list hooks`` output as :class:`nflab.tracing.HookRow` rows (family, hook,
    priority, function, module; .device) with kit names (ipv4/ipv6/netdev,
    PRE_ROUTING...); parsing is nflab.tracing's (*device*: the netdev device the
    listing was asked for, for nftables 1.0.6, which does not print it)."""
    return [tracing.HookRow(NFT_FAMILY[r[0]], NFT_HOOK[r[1]], *r[2:], device=r.device)
            for r in tracing.nft_hook_lines(text, device) if r[0] in NFT_FAMILY and r[1] in NFT_HOOK]


def classify_nft(function: str, module: str, nft_tables: bool = False, family: str | None = None) -> tuple:
    """(name, kind) of an nft-listed hook function; ``(None, 'xt')`` for the shared
    ipt_do_table/ip6t_do_table whose table only the measurement can tell. An
    nf_tables base chain is a table of the map when the atlas measured through
    iptables-nft (*nft_tables*) and the chain is of iptables-nft's family: ip
    (ip6) where the row is *family* ipv4 (ipv6); any other chain (``chain inet
    filter input``, Debian's nftables.conf) is somebody else's nftables chain."""
    if module.startswith("nflab_"):
        return module, ("tracer" if module == "nflab_tracer" else "module")
    chain = function.split() if function.startswith(("chain ", "flowtable ")) else []
    if len(chain) == 4:                 # nf_tables: chain|flowtable <family> <table> <name>
        xt_family = chain[1] in ("ip", "ip6") if family is None else \
            chain[1] == {"ipv4": "ip", "ipv6": "ip6"}.get(family)
        if nft_tables and chain[0] == "chain" and xt_family and chain[2] in TABLES:
            return chain[2], "table"
        return f"nftables {' '.join(chain[1:]) if chain[0] == 'chain' else function}", "other"
    if not function:
        return f"(no function name){f' [{module}]' if module else ''}", "other"
    for t in TABLES:
        if module in (f"iptable_{t}", f"ip6table_{t}"):
            return t, "table"
    if module == "nf_nat" or function.startswith("nf_nat_"):
        return "nat", "table"
    if function in ("ipt_do_table", "ip6t_do_table") or module in ("ip_tables", "ip6_tables"):
        return None, "xt"
    if "confirm" in function:
        return "conntrack confirm", "core"
    if module == "nf_conntrack" or "conntrack" in function:
        return ("defrag", "core") if "defrag" in function else ("conntrack", "core")
    if module.startswith("nf_defrag") or "defrag" in function:
        return "defrag", "core"
    if module == "nf_tables" or function.startswith("nft_do_chain"):
        return f"nftables {function}", "other"
    return function + (f" [{module}]" if module else ""), "other"


def merge(atlas: Atlas, nft_rows: list | None, proc_points: dict) -> None:
    """Combine measured entries (already in *atlas*), ``nft list hooks`` rows and the
    ``/proc/net/nflab_*`` points into the final entries and cross-checks."""
    rows = list(nft_rows or [])
    claimed: set = set()
    _check_documented(atlas)
    if nft_rows is not None:
        _match_measured(atlas, rows, claimed)
    _beyond_points(atlas, rows, claimed)
    _add_proc_points(atlas, proc_points, rows if nft_rows is not None else None, claimed)
    _add_unclaimed(atlas, rows, claimed)


def _check_documented(atlas: Atlas):
    """Every measured interval against the priority the kernel headers document."""
    documented = DOCUMENTED_NFT if atlas.backend == "iptables-nft" else DOCUMENTED
    for e in atlas.entries:
        doc = NAT_DOCUMENTED.get(e.hook) if e.name == "nat" else documented.get(e.name)
        if e.interval and doc is not None:
            ok = (e.interval[0] is None or e.interval[0] < doc) and (e.interval[1] is None or doc < e.interval[1])
            atlas.checks.append(Check(ok, f"{e.family} {e.hook} {e.name}: documented priority {_prio(doc)} "
                                          f"{'inside' if ok else 'NOT inside'} the measured interval "
                                          f"{e.interval_text()}"))


def _candidates(e: Entry, rows: list, claimed: set, nft_tables: bool) -> list:
    """Indexes of the unclaimed nft rows that can be measured entry *e*: same family
    and hook, priority inside its interval, the same name (or an xt table)."""
    lo, hi = e.interval
    cands = []
    for i, (fam, hook, prio, fn, mod) in enumerate(rows):
        if (fam, hook) != (e.family, e.hook) or i in claimed:
            continue
        if (lo is not None and prio <= lo) or (hi is not None and prio >= hi):
            continue
        name, kind = classify_nft(fn, mod, nft_tables, fam)
        if name == e.name or (kind == "xt" and e.kind == "table" and e.name != "nat"):
            cands.append(i)
    return cands


def _match_measured(atlas: Atlas, rows: list, claimed: set):
    """Measured tables and core entries: the one nft row inside each interval gives
    the exact priority."""
    for e in atlas.entries:
        if e.kind not in ("table", "core") or not e.interval:
            continue
        cands = _candidates(e, rows, claimed, atlas.backend == "iptables-nft")
        where = f"{e.family} {e.hook} {e.name}"
        # iptables-nft's nat chains run inside nf_nat's hook at the same priority: one place
        if cands and len({rows[i][2] for i in cands}) == 1:
            i = cands[0]
            claimed.update(cands)
            e.priority, e.function, e.module = rows[i][2], rows[i][3], rows[i][4]
            e.source = "nft+measured"
            atlas.checks.append(Check(True, f"{where}: nft list hooks {_prio(e.priority)} ({e.function}) "
                                            f"inside the measured interval {e.interval_text()}"))
        else:
            found = [f"{rows[i][2]} {rows[i][3]}" for i in cands]
            atlas.checks.append(Check(False, f"{where}: measured interval {e.interval_text()} holds "
                                             f"{len(cands)} matching nft hooks {found or ''}".rstrip()))


def _beyond_points(atlas: Atlas, rows: list, claimed: set):
    """Entries whose drop lay beyond the last tracer point (:func:`drop_result`): an
    ``nft list hooks`` row of that table above it settles where they are."""
    last = max(TRACER_POINTS)
    nft_tables = atlas.backend == "iptables-nft"
    for e in atlas.entries:
        if not e.beyond or e.priority is not None:
            continue
        cands = [i for i, (fam, hook, prio, fn, mod) in enumerate(rows)
                 if i not in claimed and (fam, hook) == (e.family, e.hook) and prio > last
                 and classify_nft(fn, mod, nft_tables, fam)[0] == e.name]
        where = f"{e.family} {e.hook} {e.name}"
        if len(cands) != 1:
            atlas.checks.append(Check(False, f"{where}: {e.evidence}"))
            continue
        claimed.add(cands[0])
        e.priority, e.function, e.module = rows[cands[0]][2:5]
        e.source = "nft+measured"
        atlas.checks.append(Check(True, f"{where}: nft list hooks {_prio(e.priority)} ({e.function}) "
                                        f"above the last tracer point {last}, where the DROP went "
                                        "unseen"))


def _dev(row) -> str:
    """The netdev device of an nft row ("" when unknown or not netdev)."""
    return getattr(row, "device", "") if row[0] == "netdev" else ""


def _add_proc_points(atlas: Atlas, proc_points: dict, rows: list | None, claimed: set):
    """The user's modules (and the tracer) from their own proc files, each point
    checked against the nft rows when there are any (*rows* None: no nft); the
    summary check only when every checkable point was found."""
    found, missing, unlisted = 0, 0, 0
    for module, points in sorted(proc_points.items()):
        for fam, hook, prio in points:
            kind = "tracer" if module == "nflab_tracer" else "module"
            e = Entry(fam, hook, module, kind, priority=prio, source="proc")
            if rows is not None:
                # a netdev point is the one on the device the atlas lists (the tracer's)
                idx = next((i for i, r in enumerate(rows) if i not in claimed
                            and r[:3] == (fam, hook, prio) and r[4] == module
                            and _dev(r) in ("", INGRESS_DEV)), None)
                if idx is not None:
                    claimed.add(idx)
                    found += 1
                    e.source, e.function, e.module = "proc+nft", rows[idx][3], module
                    e.device = _dev(rows[idx])
                elif fam == "netdev" and not any(r[0] == "netdev" for r in rows):
                    unlisted += 1
                    e.evidence = "nft list hooks shows no netdev hooks here"
                else:
                    missing += 1
                    on = f" on {INGRESS_DEV}" if fam == "netdev" else " there"
                    atlas.checks.append(Check(False, f"{fam} {hook}: {module} claims {prio}, "
                                                     f"nft list hooks does not show it{on}"))
            atlas.entries.append(e)
    if found and not missing:
        atlas.checks.append(Check(True, f"every /proc/net/nflab_* point nft list hooks can show is "
                                        f"there ({found})" + (f"; {unlisted} netdev point(s) it "
                                                              "does not list" if unlisted else "")))


def _add_unclaimed(atlas: Atlas, rows: list, claimed: set):
    """Whatever else the kernel lists: conntrack/defrag not measured, confirm, LSMs, ..."""
    for i, (fam, hook, prio, fn, mod) in enumerate(rows):
        if i in claimed:
            continue
        dev = _dev(rows[i])
        name, kind = classify_nft(fn, mod, atlas.backend == "iptables-nft", fam)
        if kind == "xt":
            atlas.checks.append(Check(False, f"{fam} {hook}: {fn} at {prio} belongs to no table the "
                                             "counters saw there"))
            name, kind = f"{fn} (unmeasured)", "other"
        elif kind == "table":
            atlas.checks.append(Check(False, f"{fam} {hook}: {name} at {prio} ({fn}) but the counters "
                                             "saw no packet of that table there"))
        elif kind in ("tracer", "module"):
            kind = "module"
        existing = atlas.find(fam, hook, name) if kind == "core" else None
        if existing is not None and existing.priority is None:
            existing.priority, existing.function, existing.module = prio, fn, mod
            existing.source = "nft"
            continue
        atlas.entries.append(Entry(fam, hook, name, kind, priority=prio, source="nft",
                                   function=fn, module=mod, device=dev))


# ---------------------------------------------------------------- SVG

BOX_W = 300
ROW_H = 18
HEAD_H = 44
GAP_X = 70
GAP_Y = 90
MARGIN = 24
TITLE_H = 74
DASH = ' stroke-dasharray="3 2"'
BOLD = ' font-weight="bold"'


def _rows(atlas: Atlas, hook: str) -> list:
    """Rows of one hook box: entries merged across families when name and priority
    (or interval) agree, by priority; netdev entries of different devices stay
    apart. Each row: (name, priority-text, families, entry)."""
    merged: dict = {}
    for e in atlas.at(hook):
        key = (e.name, e.priority, tuple(e.interval) if e.interval else None, e.device)
        if key in merged:
            merged[key][2].append(e.family)
        else:
            merged[key] = [e.name, e.priority_text(), [e.family], e]
    return sorted(merged.values(), key=lambda r: (r[3].order, r[0]))


def _layout(atlas: Atlas) -> dict:
    """hook -> (x, y, w, h) of its box."""
    rows = {h: len(_rows(atlas, h)) for h in HOOKS}
    hgt = {h: HEAD_H + max(rows[h], 1) * ROW_H + 10 for h in HOOKS}
    top = MARGIN + TITLE_H
    col = [MARGIN + 40 + i * (BOX_W + GAP_X) for i in range(4)]
    top_h = max(hgt[h] for h in ("INGRESS", "PRE_ROUTING", "FORWARD", "POST_ROUTING"))
    low = top + top_h + GAP_Y
    return {
        "INGRESS": (col[0], top, BOX_W, hgt["INGRESS"]),
        "PRE_ROUTING": (col[1], top, BOX_W, hgt["PRE_ROUTING"]),
        "FORWARD": (col[2], top, BOX_W, hgt["FORWARD"]),
        "POST_ROUTING": (col[3], top, BOX_W, hgt["POST_ROUTING"]),
        "LOCAL_IN": (col[1], low, BOX_W, hgt["LOCAL_IN"]),
        "LOCAL_OUT": (col[3], low, BOX_W, hgt["LOCAL_OUT"]),
        "_process": (col[2] + 40, low, BOX_W - 80, 70),
    }


def _arrow(x1, y1, x2, y2, label="", cls="flow"):
    out = [f'<line class="{cls}" x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" '
           f'stroke="#444" stroke-width="2" marker-end="url(#arrow)"/>']
    if label:
        out.append(f'<text x="{(x1 + x2) / 2}" y="{(y1 + y2) / 2 - 6}" font-size="11" '
                   f'text-anchor="middle" fill="#444">{escape(label)}</text>')
    return out


def _path_label(atlas: Atlas, path: str) -> str:
    fams = [f for f in FAMILIES if atlas.paths.get(f, {}).get(path)]
    return f"{PATH_TITLE[path]} ({', '.join(fams) or 'not measured'})"


def render_svg(atlas: Atlas) -> str:
    """The panorama as a standalone SVG document (no external resources).

    Every row is a ``<g class="entry">`` with ``data-hook``, ``data-name``,
    ``data-priority`` (exact or empty), ``data-interval`` and ``data-families``;
    rows of one hook box are drawn top to bottom in priority order."""
    box = _layout(atlas)
    width = box["POST_ROUTING"][0] + BOX_W + MARGIN + 40
    bottom = max(y + h for (x, y, w, h) in box.values())
    legend_y = bottom + 40
    bad = [c for c in atlas.checks if not c.ok]
    out = _svg_head(atlas, width, legend_y + 150, bad)
    out += _svg_flow(box)          # flow arrows (drawn first, boxes on top)
    for hook in HOOKS:
        out += _svg_hook(atlas, hook, box[hook])
    out += _svg_legend(atlas, legend_y, bad)
    out.append('</svg>')
    return "\n".join(out) + "\n"


def _svg_head(atlas: Atlas, width, height, bad: list) -> list:
    """The document's opening, background and title lines."""
    sub = ("priorities: exact, from `nft list hooks` (nfnetlink_hook), each cross-checked against "
           "the interval measured between tracer points" if atlas.exact else
           "priorities: measured intervals between tracer points (lo, hi) — this kernel has no "
           "nfnetlink_hook, so no exact values")
    return [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" '
        f'data-kernel="{escape(atlas.kernel)}" data-exact="{int(atlas.exact)}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#444"/>'
        '</marker></defs>',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{MARGIN}" y="{MARGIN + 14}" font-size="20" font-weight="bold">'
        f'netfilter panorama — measured on {escape(atlas.kernel)}</text>',
        f'<text x="{MARGIN}" y="{MARGIN + 36}" font-size="12" fill="#333">{escape(sub)}</text>',
        f'<text x="{MARGIN}" y="{MARGIN + 54}" font-size="12" fill="#333">'
        f'{escape(f"tables: {atlas.backend}; attachment by per-table counters on tagged packets; ")}'
        f'{escape(f"cross-checks: {len(atlas.checks) - len(bad)} ok, {len(bad)} failed")}'
        f'{escape("; generated " + atlas.generated if atlas.generated else "")}</text>',
    ]


def _svg_flow(box: dict) -> list:
    """The packet-flow arrows between the hook boxes and the local process."""
    ix, iy, iw, ih = box["INGRESS"]
    px, py, pw, ph = box["PRE_ROUTING"]
    fx, fy, fw, fh = box["FORWARD"]
    ox, oy, ow, oh = box["POST_ROUTING"]
    lx, ly, lw, lh = box["LOCAL_IN"]
    tx, ty, tw, th = box["LOCAL_OUT"]
    sx, sy, sw, shh = box["_process"]
    out = _arrow(MARGIN, iy + 22, ix, iy + 22)
    out.append(f'<text x="{MARGIN}" y="{iy + 12}" font-size="11" fill="#444">in</text>')
    out += _arrow(ix + iw, iy + 22, px, py + 22)
    out += _arrow(px + pw, py + 22, fx, fy + 22, "routing")
    out += _arrow(fx + fw, fy + 22, ox, oy + 22)
    out += _arrow(ox + ow, oy + 22, ox + ow + 38, oy + 22)
    out += _arrow(px + pw / 2, py + ph, lx + lw / 2, ly)
    out.append(f'<text x="{px + pw / 2 + 8}" y="{(py + ph + ly) / 2}" font-size="11" fill="#444">'
               'routing: for this host</text>')
    out += _arrow(lx + lw, ly + 22, sx, sy + 22)
    out += _arrow(sx + sw, sy + 22, tx, ty + 22)
    out += _arrow(tx + tw / 2, ty, ox + ow / 2, oy + oh)
    out.append(f'<rect x="{sx}" y="{sy}" width="{sw}" height="{shh}" rx="10" fill="#fafafa" '
               'stroke="#888" stroke-dasharray="4 3"/>')
    out.append(f'<text x="{sx + sw / 2}" y="{sy + 30}" font-size="13" text-anchor="middle">'
               'local process</text>')
    out.append(f'<text x="{sx + sw / 2}" y="{sy + 48}" font-size="10" text-anchor="middle" '
               'fill="#555">(sockets)</text>')
    return out


def _svg_hook(atlas: Atlas, hook: str, where: tuple) -> list:
    """One hook box: its heading and a row per entry, in priority order."""
    x, y, w, h = where
    fams = "netdev (eth1)" if hook == "INGRESS" else "ipv4 | ipv6"
    out = [f'<g class="hook" data-hook="{hook}">',
           f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="8" fill="#fbfbfb" '
           'stroke="#333" stroke-width="1.5"/>',
           f'<text x="{x + 10}" y="{y + 19}" font-size="15" font-weight="bold">'
           f'{"NF_NETDEV_" if hook == "INGRESS" else "NF_INET_"}{hook}</text>',
           f'<text x="{x + w - 10}" y="{y + 19}" font-size="10" text-anchor="end" '
           f'fill="#666">{fams}</text>',
           f'<text x="{x + 10}" y="{y + 36}" font-size="9" fill="#777">'
           'what runs here, in priority order (top first)</text>']
    rows = _rows(atlas, hook)
    if not rows:
        out.append(f'<text x="{x + 10}" y="{y + HEAD_H + 12}" font-size="11" fill="#999">'
                   '(nothing registered)</text>')
    for i, row in enumerate(rows):
        out += _svg_row(hook, x, w, y + HEAD_H + i * ROW_H, *row)
    out.append('</g>')
    return out


def _svg_row(hook: str, x, w, ry, name: str, ptxt: str, families: list, e: Entry) -> list:
    """One entry of a hook box: coloured bar, name, priority text, family badges."""
    fill, stroke = STYLE[e.style]
    tracer = e.kind == "tracer"
    iv = "" if not e.interval else ",".join("" if v is None else str(v) for v in e.interval)
    fam_txt = " ".join(sorted(set(families)))
    label = name if len(name) <= 26 else name[:25] + "…"
    badges = ("4" if "ipv4" in families else "·") + " " + ("6" if "ipv6" in families else "·")
    if hook == "INGRESS":
        badges = "dev"
    return [f'<g class="entry" data-hook="{hook}" data-name="{escape(name)}" '
            f'data-kind="{e.kind}" data-priority="{"" if e.priority is None else e.priority}" '
            f'data-interval="{iv}" data-families="{fam_txt}" data-y="{ry}">',
            f'<rect x="{x + 6}" y="{ry}" width="{w - 12}" height="{ROW_H - 2}" rx="3" '
            f'fill="{fill}" stroke="{stroke}"'
            f'{DASH if tracer else ""}/>',
            f'<text x="{x + 12}" y="{ry + 12}" font-size="{10 if tracer else 11}" '
            f'fill="{"#888" if tracer else "#111"}"'
            f'{"" if tracer else BOLD}>{escape(label)}</text>',
            f'<text x="{x + w - 48}" y="{ry + 12}" font-size="10" text-anchor="end" '
            f'fill="{"#888" if tracer else "#222"}">{escape(ptxt)}</text>',
            f'<text x="{x + w - 12}" y="{ry + 12}" font-size="10" text-anchor="end" '
            f'fill="#555" font-family="DejaVu Sans Mono, monospace">{badges}</text>',
            '</g>']


def _svg_legend(atlas: Atlas, ly0, bad: list) -> list:
    """Legend: the colours, how priorities read, the measured paths, failed checks."""
    out = [f'<text x="{MARGIN}" y="{ly0}" font-size="13" font-weight="bold">legend</text>']
    for i, key in enumerate(("raw", "defrag", "conntrack", "mangle", "nat", "filter", "security",
                             "module", "tracer", "other")):
        x = MARGIN + i * 112
        fill, stroke = STYLE[key]
        text = {"module": "your modules", "tracer": "nflab_tracer", "other": "other hooks"}.get(key, key)
        out.append(f'<rect x="{x}" y="{ly0 + 10}" width="16" height="12" fill="{fill}" stroke="{stroke}"/>')
        out.append(f'<text x="{x + 22}" y="{ly0 + 20}" font-size="11">{escape(text)}</text>')
    out.append(f'<text x="{MARGIN}" y="{ly0 + 44}" font-size="11" fill="#333">'
               '4 6 = present for ipv4 / ipv6;  -150 ∈ (-175, -125) = exact priority and the '
               'interval the tracer measured;  (lo, hi) = measured only</text>')
    for i, path in enumerate(PATHS):
        hooks_by_fam = {f: atlas.paths.get(f, {}).get(path) for f in FAMILIES}
        seq = next((v for v in hooks_by_fam.values() if v), None)
        text = (f"{PATH_TITLE[path]}: " + (" → ".join(seq) if seq else "not measured")
                + f"   [{', '.join(f for f, v in hooks_by_fam.items() if v) or '-'}]")
        out.append(f'<text class="path" data-path="{path}" x="{MARGIN}" y="{ly0 + 66 + i * 18}" '
                   f'font-size="11">{escape(text)}</text>')
    if bad:
        out.append(f'<text x="{MARGIN}" y="{ly0 + 130}" font-size="11" fill="#b00000">'
                   f'{escape("FAILED cross-checks: " + "; ".join(c.what for c in bad[:3]))}</text>')
    return out


# ---------------------------------------------------------------- Markdown

def render_markdown(atlas: Atlas) -> str:
    exact = atlas.exact
    lines = [f"# netfilter atlas — {atlas.kernel}", ""]
    lines.append(f"Measured in a lab VM with `invoke atlas` ({atlas.backend}; tracer points "
                 f"{' '.join(str(p) for p in TRACER_POINTS)} on every inet hook, 0 on netdev ingress).")
    lines.append("Priorities: " + ("exact values from `nft list hooks`, each inside the interval "
                                   "measured between tracer points." if exact else
                                   "measured intervals `(lo, hi)` between tracer points; this kernel "
                                   "has no nfnetlink_hook, so `nft list hooks` cannot give exact values."))
    lines.append("")
    lines += _md_hook_points(atlas)
    lines += _md_counts(atlas)
    lines += ["## Paths (as the tracer saw the tagged packets)", "", "| path | family | hooks |", "|---|---|---|"]
    for path in PATHS:
        for fam in FAMILIES:
            seq = atlas.paths.get(fam, {}).get(path)
            lines.append(f"| {PATH_TITLE[path]} | {fam} | {' → '.join(seq) if seq else 'not measured'} |")
    lines += ["", "## Cross-checks", ""]
    for c in atlas.checks:
        lines.append(f"- {'ok' if c.ok else '**FAILED**'}: {c.what}")
    if not atlas.checks:
        lines.append("- (none)")
    if atlas.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in atlas.notes]
    return "\n".join(lines) + "\n"


def _md_hook_points(atlas: Atlas) -> list:
    """The hook-point table: one row per entry, the tracer's points in one row per hook."""
    lines = ["## Hook points", "",
             "| hook | family | what | priority | measured interval | source | function [module] | evidence |",
             "|---|---|---|---|---|---|---|---|"]
    for hook in HOOKS:
        for fam in ("netdev",) + FAMILIES:
            entries = atlas.at(hook, fam)
            tracer = [e for e in entries if e.kind == "tracer"]
            for e in entries:
                if e.kind == "tracer":
                    if e is not tracer[0]:
                        continue
                    lines.append(f"| {hook} | {fam} | nflab_tracer (the kit's tracer) | "
                                 f"{' '.join(_prio(t.priority) for t in tracer)} |  | {e.source} | "
                                 f"{e.function}{f' [{e.module}]' if e.module else ''} | bracketing points |")
                    continue
                fn = e.function + (f" [{e.module}]" if e.module else "")
                lines.append(f"| {hook} | {fam} | {e.name} | "
                             f"{'' if e.priority is None else _prio(e.priority)} | {e.interval_text()} | "
                             f"{e.source} | {fn} | {e.evidence} |")
    return lines


def _md_counts(atlas: Atlas) -> list:
    """Per family: the packets each table's counting rule saw per hook and path."""
    lines = ["", "## Tables per hook (counters on tagged packets)", "",
             "Packets the counting rule of each table chain saw per path: forward / local-in / local-out "
             "(`-` = the table has no such chain).", ""]
    for fam in FAMILIES:
        if fam not in atlas.counts:
            continue
        lines += [f"### {fam}", "", "| table | " + " | ".join(HOOKS[1:]) + " | attached at |",
                  "|---|" + "---|" * (len(HOOKS) - 1) + "---|"]
        for table in TABLES:
            per = atlas.counts[fam].get(table, {})
            cells = []
            for hook in HOOKS[1:]:
                if hook not in per:
                    cells.append("-")
                else:
                    cells.append(" / ".join(str(per[hook].get(p, 0)) for p in PATHS))
            lines.append(f"| {table} | " + " | ".join(cells) + " | "
                         + (", ".join(atlas.attached(fam, table)) or "none") + " |")
        lines.append("")
    return lines


# ---------------------------------------------------------------- PNG

def png_converters() -> list:
    """Available SVG→PNG converters, best first: (name, callable(svg_path, png_path))."""
    found = []
    if shutil.which("rsvg-convert"):
        found.append(("rsvg-convert", lambda s, p: subprocess.run(
            ["rsvg-convert", "-b", "white", "-o", str(p), str(s)], check=True, capture_output=True,
            timeout=120)))
    try:
        import cairosvg  # noqa: F401  # optional dependency: one of the SVG -> PNG converters
        found.append(("cairosvg", lambda s, p: __import__("cairosvg").svg2png(
            url=str(s), write_to=str(p))))
    except Exception:
        pass
    for tool in ("magick", "/usr/bin/convert"):
        if shutil.which(tool):
            found.append((tool, lambda s, p, t=tool: subprocess.run(
                [t, str(s), str(p)], check=True, capture_output=True, timeout=120)))
            break
    return found


def to_png(svg_path, png_path) -> str | None:
    """Convert with the first converter that works; returns its name, or None."""
    for name, conv in png_converters():
        try:
            conv(svg_path, png_path)
        except Exception:
            continue
        if Path(png_path).is_file() and Path(png_path).stat().st_size > 0:
            return name
    return None


def write(atlas: Atlas, out: str | Path) -> dict:
    """Write ``<out>.svg``, ``.png`` (when a converter exists), ``.md`` and ``.json``;
    returns {kind: path or None}."""
    out = Path(out)
    # atlas-6.12.svg (or .png, .md, .json) -> atlas-6.12: never map.png.svg
    stem = out.stem if out.suffix in (".svg", ".png", ".md", ".json") else out.name
    out.parent.mkdir(parents=True, exist_ok=True)
    svg, md, js, png = (out.parent / (stem + ext) for ext in (".svg", ".md", ".json", ".png"))
    svg.write_text(render_svg(atlas))
    md.write_text(render_markdown(atlas).replace(
        f"# netfilter atlas — {atlas.kernel}\n",
        f"# netfilter atlas — {atlas.kernel}\n\n![netfilter atlas]({svg.name})\n", 1))
    js.write_text(atlas.to_json())
    conv = to_png(svg, png)
    return {"svg": svg, "png": png if conv else None, "md": md, "json": js, "converter": conv}


# ---------------------------------------------------------------- measurement (in a lab VM)

class _Guest:
    """Shell in the VM: ``run(cmd) -> (rc, out, err)`` (tracing.Tracer's protocol)."""

    def __init__(self, vm: str):
        self.vm = vm

    def run(self, cmd: str, timeout: float = 90):
        res = lab.exec(self.vm, cmd, timeout=timeout)
        return res.returncode, res.stdout, res.stderr

    def sh(self, cmd: str, what: str = "", timeout: float = 90) -> str:
        rc, out, err = self.run(cmd, timeout)
        if rc != 0:     # a command failed; a dead or crashed VM raises VMError in lab.exec
            raise NflabError(f"{what or cmd[:60]} failed in VM {self.vm!r} (exit {rc})",
                          detail=(err or out).strip()[-2000:])
        return out


class _Rules:
    """iptables rules the atlas adds (through *tools*: family -> ``iptables-legacy``...);
    every one is removed again (nobody else's)."""

    def __init__(self, guest: _Guest, tools: dict):
        self.guest = guest
        self.tools = tools
        self.added: list = []

    def cmd(self, op, family, table, chain, spec):
        return f"{self.tools[family]} -w -t {table} {op} {chain} {spec}"

    def add_many(self, rules: list, what: str = "adding rules"):
        if not rules:
            return
        script = " && ".join(self.cmd("-A", *r) for r in rules)
        try:
            self.guest.sh(script, what)
        finally:
            # record what exists now, so a half-applied batch is still cleaned up
            self.added += rules

    def remove(self, rules: list):
        if not rules:
            return
        script = "; ".join(self.cmd("-D", *r) + " 2>/dev/null" for r in reversed(rules))
        self.guest.run(script + "; true")
        self.added = [r for r in self.added if r not in rules]

    def remove_all(self):
        self.remove(list(self.added))


def _hexmatch(tag: int) -> str:
    unit = tracing.magic() + int(tag).to_bytes(4, "big")
    return f"-m string --algo bm --hex-string '|{unit.hex()}|'"


def _counters(guest: _Guest, tool: str) -> dict:
    """(table, hook) -> packets of the atlas' counting rules (``<tool>-save -c``)."""
    out = guest.sh(f"{tool}-save -c", "reading counters")
    counts, table = {}, None
    for line in out.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        m = re.match(r"\[(\d+):\d+\] -A (\S+) .*" + COUNT_COMMENT, line)
        if m and m.group(2) in CHAIN_HOOK:
            key = (table, CHAIN_HOOK[m.group(2)])
            counts[key] = counts.get(key, 0) + int(m.group(1))
    return counts


def _chains(guest: _Guest, tool: str) -> dict:
    """table -> its built-in chains (loads the table modules as a side effect)."""
    out = {}
    for table in TABLES:
        rc, text, _ = guest.run(f"{tool} -w -t {table} -S")
        if rc != 0:
            continue
        out[table] = [line.split()[1] for line in text.splitlines()
                      if line.startswith("-P ") and line.split()[1] in CHAIN_HOOK]
    return out


def _addr_eq(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def _effect(family: str, table: str, hook: str):
    """(iptables target, kind 'change'|'drop', detector(entry) -> bool, description)."""
    v6 = family == "ipv6"
    if table == "mangle":
        return (f"-j MARK --set-mark {MARK:#x}", "change", lambda e: e.mark == MARK,
                f"MARK {MARK:#x} visible")
    if table == "nat" and hook in ("PRE_ROUTING", "LOCAL_OUT"):
        to = "2001:db8:2::99" if v6 else "198.51.100.99"
        return (f"-j DNAT --to-destination {to}", "change", lambda e: _addr_eq(e.dst, to),
                f"DNAT: dst {to} visible")
    if table == "nat":
        to = ("2001:db8:1::99" if v6 else "192.0.2.99") if hook == "LOCAL_IN" else \
             ("2001:db8:2::1" if v6 else "198.51.100.1")
        return (f"-j SNAT --to-source {to}", "change", lambda e: _addr_eq(e.src, to),
                f"SNAT: src {to} visible")
    return ("-j DROP", "drop", None, "DROP: packet gone")


class _Sender:
    """Sends one tagged packet along a path; returns the IP protocol to filter on."""

    def __init__(self, guest: _Guest, wire):
        self.guest, self.wire = guest, wire

    def send(self, family: str, path: str, tag: int) -> int:
        a = tracing.addrs(family)
        if path == "forward":
            self.wire.send("client", tracing.packet(family, "tcp", a["client"], a["server"], tag))
            return 6
        if path == "local-in":
            # a SYN with data to a closed port: the guest's RST carries no payload (no tag)
            self.wire.send("client", tracing.packet(family, "tcp", a["client"], a["guest_client"], tag, dport=9))
            return 6
        self.guest.run(tracing.bash_udp(a["server"], tag) + " 2>/dev/null; true")
        return 17


def _visits(entries) -> list:
    seq = []
    for e in sorted(entries, key=lambda e: e.seq):
        if not seq or seq[-1] != e.hook:
            seq.append(e.hook)
    return seq


def _tags():
    n = (int(time.time() * 1000) & 0x3fff) << 16 | 0x100
    while True:
        n += 1
        yield n


@dataclass
class _Session:
    """One measurement in a VM: the guest, its tracer, the rules the atlas added,
    the wire to the client and server peers, and the atlas being filled in."""

    guest: _Guest
    tracer: tracing.Tracer
    rules: _Rules
    wire: Wire
    atlas: Atlas
    say: Callable
    settle: float
    timeout: float
    tags: Iterator = field(default_factory=_tags)

    def clear(self, setup: str = ""):
        """Clear the tracer log (after the guest command *setup*, if any)."""
        self.guest.sh((setup + " && " if setup else "") + f"echo clear > {self.tracer.proc}",
                      "clearing the tracer")

    def trace(self, family: str, path: str, tag: int, setup: str = "") -> tuple:
        """Clear the log (after *setup*), send, wait for the log to settle: (log, entries)."""
        self.clear(setup)
        proto = _Sender(self.guest, self.wire).send(family, path, tag)
        log = self.tracer.wait(tag, 1, timeout=self.timeout, settle=self.settle)
        return log, [e for e in log.tagged(tag) if e.proto == proto or e.family == "netdev"]


def measure(vm: str = "atlas", *, spec: str | None = None, families=FAMILIES, modules=(),
            progress=None, settle: float = 0.6, timeout: float = 8.0) -> Atlas:
    """Measure the netfilter map of running kit VM *vm* (see the module doc).

    *modules*: catalog hook modules to install first (they appear as "your
    modules"); any ``nflab_*`` hook module already loaded appears too. Every rule
    the measurement adds is removed again; the tracer stays loaded."""
    say = progress or (lambda m: None)
    st = lab.require(vm)
    guest = _Guest(vm)
    release = guest.sh("uname -r", "uname").strip()
    backends = xtables.selected(xtables.for_vm(vm))
    atlas = _new_atlas(release, spec or st.spec, backends)
    _prepare(vm, modules, say)
    rules = _Rules(guest, {fam: backends.tool(fam) for fam in FAMILIES})
    try:
        counting = _add_counting_rules(guest, rules, families, say)
        with Wire.for_vm(vm) as wire:
            s = _Session(guest, tracing.Tracer(guest.run), rules, wire, atlas, say, settle, timeout)
            _measure_rules(s, families, *counting)
        nft_rows = _nft_hooks(guest, atlas, say)         # while conntrack is still held
    finally:
        rules.remove_all()
    _add_hook_modules(guest, atlas, nft_rows, families, say)
    return atlas


def _new_atlas(release: str, spec: str | None, backends) -> Atlas:
    """An empty atlas of kernel *release*, noting a missing iptables-legacy."""
    atlas = Atlas(kernel=release, spec=spec, backend=f"iptables-{backends.primary}",
                  generated=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    if not backends.legacy:
        atlas.notes.append(f"iptables-legacy not used ({backends.missing['legacy']}): the tables are "
                           "iptables-nft's nf_tables base chains (nft_compat), at the kernel tables' "
                           "priorities except security, which iptables-nft registers at 150 "
                           "(the kernel's security table: 50)")
    return atlas


def _measure_rules(s: _Session, families, chains: dict, count_rules) -> None:
    """Where each table is attached (its counting *chains*, then defrag), then,
    *count_rules* removed, each table's priority interval (one effect rule per
    table and hook)."""
    for fam in families:
        _measure_attachment(s, fam, chains[fam])
        _locate_defrag(s, fam)
    s.rules.remove(count_rules)
    for fam in families:
        for table in TABLES:
            for hook in s.atlas.attached(fam, table):
                _locate_table(s, fam, table, hook)


def _add_hook_modules(guest: _Guest, atlas: Atlas, nft_rows, families, say) -> None:
    """Merge the hook modules' and the tracer's own points into *atlas*, with notes."""
    say("reading /proc/net/nflab_* (your hook modules and the tracer)")
    proc_points, genl = _proc_points(guest)
    for module, family in sorted(genl.items()):
        atlas.notes.append(f"{module} reports the packets it sees to userspace: generic netlink "
                           f"family {family.get('family', '?')}, multicast group {family.get('group', '?')}")
    atlas.notes.append("tracer points: " + " ".join(str(p) for p in TRACER_POINTS)
                       + " on every inet hook, 0 on netdev ingress (eth1)")
    merge(atlas, nft_rows, proc_points)
    for fam in families:
        for table in TABLES:
            hooks = atlas.attached(fam, table)
            atlas.notes.append(f"{fam} {table}: counted at {', '.join(hooks) or 'no hook'}")


def _prepare(vm: str, modules, say):
    """Route between the wires, install the user's *modules* and the tracer."""
    say(f"VM {vm}: routing between the client and server wires")
    topology.setup(vm)
    for name in modules:
        say(f"installing {name}")
        deploy.install(name, vm)
    say("loading nflab_tracer (ingress_dev=eth1)")
    deploy.install("tracer", vm, params={"ingress_dev": "eth1"})


def _add_counting_rules(guest: _Guest, rules: _Rules, families, say) -> tuple:
    """Hold conntrack (an INVALID match in mangle PREROUTING) and add a rule counting
    tagged packets in every built-in chain of every table: (chains, counting rules)."""
    chains = {}
    for fam in families:
        say(f"{fam}: loading the {rules.tools[fam]} tables, adding counting rules")
        chains[fam] = _chains(guest, rules.tools[fam])
        ct_rule = [(fam, "mangle", "PREROUTING",
                    f"-m conntrack --ctstate INVALID -m comment --comment {CT_COMMENT}")]
        rules.add_many(ct_rule, "holding conntrack")
    count_rules = [(fam, table, chain,
                    f"-m string --algo bm --hex-string '|{tracing.magic().hex()}|' "
                    f"-m comment --comment {COUNT_COMMENT}")
                   for fam in families for table, cs in chains[fam].items() for chain in cs]
    rules.add_many(count_rules, "adding counting rules")
    return chains, count_rules


def _measure_attachment(s: _Session, fam: str, chains: dict):
    """One tagged packet per path through the counting rules: which table counted
    it at which hook, the hooks it visited, and where conntrack took it."""
    atlas = s.atlas
    atlas.counts[fam] = {t: {CHAIN_HOOK[c]: {p: 0 for p in PATHS} for c in cs} for t, cs in chains.items()}
    atlas.paths[fam] = {}
    for path in PATHS:
        s.say(f"{fam}: {PATH_TITLE[path]} packet through the counters")
        tag = next(s.tags)
        before = _counters(s.guest, s.rules.tools[fam])
        _, entries = s.trace(fam, path, tag)
        after = _counters(s.guest, s.rules.tools[fam])
        for (table, hook), n in after.items():
            delta = n - before.get((table, hook), 0)
            if table in atlas.counts[fam] and hook in atlas.counts[fam][table]:
                atlas.counts[fam][table][hook][path] = delta
        visits = _visits(entries)
        atlas.paths[fam][path] = visits
        if not visits:
            atlas.checks.append(Check(False, f"{fam} {path}: the tracer never saw the packet"))
            continue
        _locate_conntrack(atlas, fam, visits, entries)


def _locate_conntrack(atlas: Atlas, fam: str, visits: list, entries: list):
    """Conntrack: ct none -> new at the first inet hook of the path."""
    first = next((h for h in visits if h != "INGRESS"), None)
    at_first = [e for e in entries if e.hook == first and e.family == fam]
    if first and not atlas.find(fam, first, "conntrack"):
        seen = {e.priority: e.ct != "none" for e in at_first}
        iv, problem = change_interval(seen)
        if iv:
            atlas.entries.append(Entry(fam, first, "conntrack", "core", interval=iv,
                                       source="measured", evidence=f"ct none → new from {iv[1]}"))
        else:
            atlas.notes.append(f"{fam} {first}: conntrack not located: {problem}")


def _locate_defrag(s: _Session, fam: str):
    """Defrag: fragments at -450, one datagram after defrag."""
    s.say(f"{fam}: fragments through defrag")
    a = tracing.addrs(fam)
    tag = next(s.tags)
    s.clear()
    frags, _ = tracing.fragments(fam, a["client"], a["server"], tag)
    s.wire.send("client", frags)
    log = s.tracer.wait(tag, 1, timeout=s.timeout, settle=s.settle)
    pre = [e for e in log.tagged(tag) if e.family == fam and e.hook == "PRE_ROUTING"]
    seen: dict = {}
    for e in pre:
        seen[e.priority] = seen.get(e.priority, True) and not e.frag
    iv, problem = change_interval(seen)
    if iv:
        s.atlas.entries.append(Entry(fam, "PRE_ROUTING", "defrag", "core", interval=iv, source="measured",
                                     evidence=f"{len(frags)} fragments → one datagram from {iv[1]}"))
    else:
        s.atlas.notes.append(f"{fam} PRE_ROUTING: defrag not located: {problem}")


def _locate_table(s: _Session, fam: str, table: str, hook: str):
    """Where *table* runs at *hook*: a rule with an observable effect on one tagged
    packet, and the tracer points that do and do not see the effect."""
    atlas = s.atlas
    path = next(p for p in PATHS if atlas.counts[fam][table][hook][p] > 0)
    target, kind, detect, what = _effect(fam, table, hook)
    tag = next(s.tags)
    s.say(f"{fam}: {table} at {hook}: {target.split()[1]} on a {PATH_TITLE[path]} packet")
    rule = (fam, table, HOOK_CHAIN[hook], f"{_hexmatch(tag)} -m comment --comment {PROBE_COMMENT} {target}")
    s.rules.added.append(rule)
    try:
        log, entries = s.trace(fam, path, tag, s.rules.cmd("-A", *rule))
    except NflabError as exc:
        if isinstance(exc, VMError):
            raise
        atlas.checks.append(Check(False, f"{fam} {hook} {table}: {target}: {exc}"))
        return
    finally:
        s.rules.remove([rule])
    here = [e for e in entries if e.family == fam and e.hook == hook]
    beyond = False
    if kind == "drop":
        iv, ev, problem, beyond = drop_result({e.priority for e in here}, atlas.paths[fam][path],
                                              hook, _visits(entries))
    else:
        iv, problem, ev = _effect_interval(here, detect, what)
    if iv is None:
        if not beyond:              # else nft list hooks decides (merge)
            atlas.checks.append(Check(False, f"{fam} {hook} {table}: {target} had no clean effect: "
                                             f"{problem}"))
        atlas.entries.append(Entry(fam, hook, table, "table", source="measured",
                                   evidence=f"{target}: {problem}", beyond=beyond))
    else:
        atlas.entries.append(Entry(fam, hook, table, "table", interval=iv, source="measured", evidence=ev))


def _effect_interval(here: list, detect, what: str) -> tuple:
    """(interval, problem, evidence) of a change rule (MARK, DNAT, SNAT) from the tracer
    entries *here* (one hook): between the last point without the change and the
    first with it (a DROP: :func:`drop_result`)."""
    seen: dict = {}
    for e in here:
        seen[e.priority] = seen.get(e.priority, True) and detect(e)
    iv, problem = change_interval(seen)
    ev = f"{what} from {iv[1]}" + (f", not at {iv[0]}" if iv and iv[0] is not None else "") \
        if iv else ""
    return iv, problem, ev


def _nft_hooks(guest: _Guest, atlas: Atlas, say) -> list | None:
    """Exact priorities from ``nft list hooks`` (nfnetlink_hook); None, with a note,
    where the kernel cannot list them."""
    say("nft list hooks (nfnetlink_hook)")
    # the ip and ip6 hooks, then netdev's on the tracer's device: the same with
    # nftables 1.0.6 and 1.1.x (tracing.nft_hooks_command); a plain `nft list hooks`
    # of 1.1.x lists every interface's netdev hooks, which the INGRESS box (eth1)
    # must not merge
    rc, out, err = guest.run("modprobe nfnetlink_hook 2>/dev/null; nft list hooks ip; nft list hooks ip6")
    if rc == 0 and out.strip():
        rc2, out2, _ = guest.run(f"nft list hooks netdev device {INGRESS_DEV}")
        text = out + ("\n" + out2 if rc2 == 0 else "")
        atlas.exact = True
        return nft_hook_rows(text, INGRESS_DEV)
    atlas.notes.append("`nft list hooks` is not available on this kernel "
                       f"({(err or out).strip().splitlines()[-1][:120] if (err or out).strip() else 'no output'}): "
                       "priorities are the measured intervals only")
    return None


def _proc_points(guest: _Guest) -> tuple[dict, dict]:
    """module -> [(family, hook, priority)] of every loaded nflab hook module, and
    module -> {family, group, ...} of those that report to a generic netlink
    family (their ``genl family=... group=...`` line, e.g. nflab_pktlog)."""
    rc, out, _ = guest.run('for f in /proc/net/nflab_*; do [ -e "$f" ] || continue; '
                           'echo "=== ${f##*/}"; grep -E "^(point|genl) " "$f"; done')
    return parse_proc_points(out)


def parse_proc_points(out: str) -> tuple[dict, dict]:
    """The output of :func:`_proc_points`' guest command, parsed."""
    sections: dict = {}
    current = None
    for line in out.splitlines():
        if line.startswith("=== "):
            current = line[4:].strip()
            sections[current] = []
        elif current:
            sections[current].append(line)
    result, genl = {}, {}
    for module, lines in sections.items():
        pts = [p for p in tracing.parse("\n".join(lines)).points if p.registered]
        if pts:
            result[module] = [(p.family, p.hook, p.priority) for p in pts]
        for line in lines:
            if line.startswith("genl "):
                genl[module] = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
    return result, genl


def run(kernel: str | None = None, vm: str = "atlas", *, out: str = "atlas.svg", keep: bool = False,
        modules=(), progress=None) -> tuple:
    """Boot (or reuse) *vm* on *kernel*, measure, write the files; (atlas, written).
    A VM this call booted is stopped again unless *keep*, on a SIGTERM (CI's
    timeout, `kill`) as on Ctrl-C."""
    with lab.signals_as_interrupt():
        return _run(kernel, vm, out=out, keep=keep, modules=modules, progress=progress)


def _run(kernel: str | None, vm: str, *, out: str, keep: bool, modules, progress) -> tuple:
    say = progress or (lambda m: None)
    st = lab.load(vm)
    running = st is not None and lab.is_running(st)
    booted = False
    if not running:
        lab.up(kernel, vm, progress=say)
        booted = True
    else:
        lab.up(kernel, vm, progress=say)     # reuses it, or says it runs another kernel
    try:
        atlas = measure(vm, spec=kernel, modules=modules, progress=say)
    finally:
        if booted and not keep:
            say(f"stopping VM {vm}")
            lab.down(vm)
    return atlas, write(atlas, out)
