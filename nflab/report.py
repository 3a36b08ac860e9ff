"""The per-test packet report of ``invoke test --html``.

For each test the pytest plugin (``nflab/pytest_plugin.py``) hands this module
what it collected: the frames the host sent on the wires (``vm.wire.Sent``),
the frames that came back on them, the guest's tracer log and its rules with
counters (one SSH round trip, ``nflab.tracing.report_command``). This module maps
the tracer's entries to the packets by their tag, splits them into walks (one
packet's visits through the hooks, ``nflab.tracing.walks``), says what became of
each walk (``nflab.tracing.fate``) and renders an HTML fragment for pytest-html.
Nothing here talks to a guest: it is plain data in, HTML out.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from kmods import spec
from nflab import tracing

MAX_PACKETS = 120        # packet blocks per test; the rest are counted
MAX_RULE_LINES = 400     # lines per rules listing


@dataclass
class Walk:
    entries: list
    fate: str


@dataclass
class PacketView:
    tag: int | None
    sent: list = field(default_factory=list)     # summaries of the frames the host sent
    walks: list = field(default_factory=list)    # [Walk]
    origin: str = "wire"                         # "wire" | "guest" (tracer only)


def build(sent, log, received, *, magic_bytes: bytes | None = None) -> list[PacketView]:
    """Map the tracer's entries to the sent packets by tag.

    *sent*: ``vm.wire.Sent`` records (side, summary, raw) in send order;
    *log*: a ``tracing.Log`` or None (no tracer); *received*: (side, raw frame)
    that arrived on the wires during the test. Packets are listed in the order
    they were sent; tagged packets the tracer saw but the host did not send
    (the guest's own: ping, a reply, an ICMP error) follow."""
    views, untagged = _views_by_tag(sent, log, magic_bytes)
    arrivals = _arrivals(received, magic_bytes)
    for t, view in views.items():
        view.walks.extend(_walks_of(t, arrivals.get(t, []), log))
    out = list(views.values())
    if untagged.sent:
        untagged.walks.append(Walk([], "untagged: the tracer records only packets that carry the "
                                       "test magic and a tag (nflab.tracing.payload)"))
        out.append(untagged)
    return out


def _views_by_tag(sent, log, magic_bytes) -> tuple[dict, PacketView]:
    """One view per tag, the host's packets in send order, then the guest's own
    (tags only the tracer saw); plus the view holding the untagged packets."""
    views: dict = {}
    untagged = PacketView(None)
    for s in sent:
        t = tracing.tag_of(s.raw, magic_bytes)
        if t is None:
            untagged.sent.append(str(s))
        else:
            views.setdefault(t, PacketView(t)).sent.append(str(s))
    for e in log.entries if log is not None else ():
        if e.tag not in views:
            views[e.tag] = PacketView(e.tag, origin="guest")
    return views, untagged


def _arrivals(received, magic_bytes) -> dict:
    """tag -> [[side, (src, dst) | None, used]] of the frames that came back."""
    arrivals: dict = {}
    for side, raw in received:
        t = tracing.tag_of(raw, magic_bytes)
        if t is not None:
            arrivals.setdefault(t, []).append([side, tracing.frame_addrs(raw), False])
    return arrivals


def _walks_of(tag, frames, log) -> list[Walk]:
    """The walks of the packet(s) tagged *tag*, each with its fate."""
    entries = log.tagged(tag) if log is not None else []
    if not entries:
        return [Walk([], _unseen(frames, log))]
    out = []
    for walk in tracing.walks(entries):
        arrived = _arrived(walk, frames, log.points)
        fate = tracing.fate(walk, log.points, arrived)
        if not arrived and _maybe_cut(walk, log):
            fate += (f" (uncertain: the tracer log filled up at entry {log.entries[-1].seq}, "
                     "right after this packet's last recorded visit; later visits were not recorded)")
        out.append(Walk(walk, fate))
    return out


def _unseen(frames, log) -> str:
    """What can be said of a packet the tracer has no entry for."""
    sides = list(dict.fromkeys(f[0] for f in frames))
    why = "arrived on the " + " and ".join(f"{s} wire" for s in sides) if sides else \
        "not seen on any wire"
    if log is None:
        return why + " (no tracer: no path)"
    if log.dropped:
        return why + (f"; no path: the tracer log was full ({log.size} entries, {log.dropped} more "
                      "not recorded), this packet came after")
    return why + ("; the tracer saw none of it (it never reached a hook, or it was not tagged "
                  "where the tracer looks)")


CUT_WINDOW = 64     # entries: a walk that ends this close to a full log's end may be cut short


def _maybe_cut(walk, log) -> bool:
    """True if the log was full and *walk* ends among its last entries: the visits
    after the fill point were not recorded, so where it "stopped" is unknown."""
    if log is None or not log.dropped or not log.entries or not walk:
        return False
    last = walk[-1]
    if last.hook in ("LOCAL_IN", "POST_ROUTING"):
        prios = [p.priority for p in log.points if p.family == last.family and p.hook == last.hook]
        if prios and last.priority == max(prios):
            return False            # it finished its way through the hooks
    return log.entries[-1].seq - last.seq < CUT_WINDOW


def _arrived(walk, frames, points) -> list[str]:
    """Sides on whose wire this walk's packet showed up: only a walk that passed
    the last POST_ROUTING point can have left; each frame is credited once."""
    last = walk[-1]
    if last.hook != "POST_ROUTING":
        return []
    prios = [p.priority for p in points if p.family == last.family and p.hook == "POST_ROUTING"]
    if prios and last.priority != max(prios):
        return []
    sides = []
    for f in frames:
        if not f[2] and f[1] == (last.src, last.dst) and f[0] not in sides:
            f[2] = True
            sides.append(f[0])
    return sides


# ---------------------------------------------------------------- HTML

_CSS = """
.nflab-report { font-family: sans-serif; font-size: 12px; }
.nflab-report h4 { margin: 8px 0 4px; }
.nflab-packet { border-left: 3px solid #888; margin: 6px 0; padding: 2px 8px; }
.nflab-packet.guest { border-left-color: #c80; }
.nflab-path { font-family: monospace; margin: 2px 0; }
.nflab-fate { font-weight: bold; margin: 2px 0 6px; }
.nflab-hooks { border-collapse: collapse; font-family: monospace; font-size: 11px; }
.nflab-hooks td, .nflab-hooks th { border: 1px solid #ccc; padding: 1px 4px; text-align: left; }
.nflab-report pre { font-size: 11px; max-height: 40em; overflow: auto; }
"""


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def path_text(entries) -> str:
    """``INGRESS/0 → PRE_ROUTING/-450 → ...`` for one walk."""
    return " → ".join(f"{e.hook}/{e.priority}" for e in entries)


def _walk_html(walk: Walk, labels: dict) -> str:
    rows = []
    for e in walk.entries:
        rows.append(
            "<tr>" + "".join(f"<td>{_e(v)}</td>" for v in (
                e.seq, e.family, e.hook, e.priority, e.indev, e.outdev, f"{e.mark:#x}", e.ct,
                f"{e.src} → {e.dst}", f"{e.proto}{' frag' if e.frag else ''}", e.len,
                labels.get(e.point, ""))) + "</tr>")
    parts = []
    if walk.entries:
        parts.append(f'<div class="nflab-path">{_e(path_text(walk.entries))}</div>')
        parts.append(f"<details><summary>{len(walk.entries)} tracer visits</summary>")
        parts.append('<table class="nflab-hooks"><tr>' + "".join(
            f"<th>{h}</th>" for h in ("seq", "family", "hook", "priority", "in", "out", "mark", "ct",
                                      "src → dst", "proto", "len", "point")) + "</tr>"
                     + "".join(rows) + "</table></details>")
    parts.append(f'<div class="nflab-fate">verdict: {_e(walk.fate)}</div>')
    return "".join(parts)


def rules_html(collected: dict) -> str:
    """The rule listings with counters; empty listings are named in one line."""
    parts, empty = [], []
    for name, _cmd in tracing.REPORT_SOURCES:
        if name == "tracer" or name not in collected:
            continue
        rc, text = collected[name]
        body = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        if rc == 0 and not body:
            empty.append(name)
            continue
        lines = text.splitlines()
        if len(lines) > MAX_RULE_LINES:
            lines = lines[:MAX_RULE_LINES] + [f"... ({len(lines) - MAX_RULE_LINES} more lines)"]
        status = "" if rc == 0 else f" (exit {rc})"
        parts.append(f'<details open><summary>{_e(name)}{_e(status)}</summary>'
                     f'<pre class="nflab-rules">{_e(chr(10).join(lines))}</pre></details>')
    if empty:
        parts.append(f"<div>no rules: {_e(', '.join(empty))}</div>")
    return "".join(parts) or "<div>no rule listings collected</div>"


def render(views: list[PacketView], collected: dict, *, labels: dict | None = None,
           log=None, notes: list[str] | None = None) -> str:
    """One test's section: packets with their walks and verdicts, then the rules."""
    labels = labels or {}
    parts = [f"<style>{_CSS}</style>", '<div class="nflab-report">',
             "<h4>Packets: path through the hooks (tracer) and verdict</h4>"]
    for n in notes or []:
        parts.append(f'<div class="nflab-note">{_e(n)}</div>')
    if log is not None and log.dropped:
        parts.append(f'<div class="nflab-note">the tracer log was full ({log.size} entries): '
                     f"{log.dropped} more were not recorded, so the last packets have no path</div>")
    if not views:
        parts.append("<div>no packets sent and none traced</div>")
    for view in views[:MAX_PACKETS]:
        who = "the guest (tracer only)" if view.origin == "guest" else "host"
        tag = f"tag {view.tag:#010x}" if view.tag is not None else "untagged"
        parts.append(f'<div class="nflab-packet {view.origin}" data-tag="{_e(tag)}">')
        if view.sent:
            parts.append(f"<div><b>sent</b> ({_e(tag)}):</div><ul>"
                         + "".join(f"<li><code>{_e(s)}</code></li>" for s in view.sent) + "</ul>")
        else:
            parts.append(f"<div><b>from {_e(who)}</b> ({_e(tag)})</div>")
        parts.extend(_walk_html(w, labels) for w in view.walks)
        parts.append("</div>")
    if len(views) > MAX_PACKETS:
        parts.append(f"<div>... {len(views) - MAX_PACKETS} more packets not shown</div>")
    parts.append("<h4>Rules and counters after the test</h4>")
    parts.append(rules_html(collected))
    parts.append("</div>")
    return "\n".join(parts)


def tracer_labels() -> dict:
    """Point index -> the label the tracer definition gives it."""
    try:
        return {i: h.label for i, h in enumerate(spec.load("tracer").hooks) if getattr(h, "label", "")}
    except Exception:
        return {}


def section(sent, received, collected: dict, *, tracer_note: str | None = None) -> str:
    """Everything the plugin needs for one test: parse the collected tracer log,
    map, render. A tracer log that cannot be read is named, not fatal."""
    notes = [tracer_note] if tracer_note else []
    log = None
    rc, text = collected.get("tracer", (None, ""))
    if rc == 0:
        try:
            log = tracing.parse(text)
        except ValueError as exc:
            notes.append(f"tracer log unreadable: {exc}")
    else:
        notes.append("no tracer log (nflab_tracer not loaded): packets without paths"
                     + (f": {text.strip()[:200]}" if text.strip() else ""))
    views = build(sent, log, received)
    return render(views, collected, labels=tracer_labels() if log is not None else {}, log=log,
                  notes=notes)
