"""pktlog (issue 18, netlink): the [netlink]/[[events]] part of a hook definition,
the C and the userspace decoder table it drives, the shipped listener's wire
format, and the atlas/report hooks. Nothing here opens a netlink socket."""

from __future__ import annotations

import copy
import importlib.machinery
import importlib.util
import json
import re
import struct
import subprocess
from pathlib import Path

import pytest

from ground.errors import SpecError
from kmods import probes, render, spec
from nflab import atlas, deploy, tracing
from tests.conftest import HOOK_RAW

PKTLOG = spec.CATALOG / "pktlog"


def _listener():
    loader = importlib.machinery.SourceFileLoader("pktlog_listen", str(PKTLOG / "pktlog_listen.py"))
    mod = importlib.util.module_from_spec(importlib.util.spec_from_loader("pktlog_listen", loader))
    loader.exec_module(mod)
    return mod


pl = _listener()


def _events(*events, netlink=None, families=("ipv4", "ipv6")):
    raw = copy.deepcopy(HOOK_RAW)
    raw["families"] = list(families)
    raw["events"] = [dict(e) for e in events]
    if netlink is not None:
        raw["netlink"] = netlink
    return raw


DPORT = {"name": "dport", "type": "be16"}

# (id, raw definition, field the message must name, text the "valid:" hint must contain)
BAD = [
    ("events-not-list", _events() | {"events": {"name": "x"}}, "events", "[[events]]"),
    ("events-empty", _events(), "events", "[[events]] name ="),
    ("netlink-without-events", {**copy.deepcopy(HOOK_RAW), "netlink": {"family": "x"}}, "events",
     "[[events]]"),
    ("event-unknown-key", _events(DPORT | {"width": 2}), "events", "name, type, source, help"),
    ("event-name-not-ident", _events({"name": "d-port", "type": "be16", "source": "dport"}), "name",
     "C identifier"),
    ("event-name-reserved", _events({"name": "int", "type": "be16", "source": "dport"}), "name",
     "not a C keyword"),
    ("event-name-kit", _events({"name": "lost", "type": "be16", "source": "dport"}), "name",
     "ratelimited"),
    ("event-name-twice", _events(DPORT, {"name": "dport", "type": "be16", "source": "sport"}), "name",
     "a name other than"),
    ("event-source-unknown", _events({"name": "ttl", "type": "u8"}), "source", "nfproto, hook"),
    ("event-type-unknown", _events({"name": "dport", "type": "u24"}), "type", "u8, u16"),
    ("event-type-missing", _events({"name": "dport"}), "type", "in6_addr"),
    ("event-type-wrong-for-source", _events({"name": "dport", "type": "in_addr"}), "type", "be16"),
    ("event-address-type-wrong", _events({"name": "src", "type": "u32", "source": "saddr"}), "type",
     "in_addr or in6_addr"),
    ("event-v6-on-v4-module", _events({"name": "s6", "type": "in6_addr", "source": "saddr"},
                                      families=("ipv4",)), "type", "ipv6 in the extension's families"),
    ("event-source-twice", _events(DPORT, {"name": "port", "type": "be16", "source": "dport"}), "source",
     "each source once"),
    ("event-help-control", _events(DPORT | {"help": "a\x07b"}), "help", "printable"),
    ("events-too-many", _events(*({"name": f"f{i}", "type": "u32", "source": "mark"} for i in range(33))),
     "events", f"at most {spec.EVENTS_MAX}"),
    ("netlink-not-table", _events(DPORT, netlink="nflab_x"), "netlink", "family = "),
    ("netlink-unknown-key", _events(DPORT, netlink={"port": 1}), "netlink", "family, group, version"),
    ("netlink-family-too-long", _events(DPORT, netlink={"family": "nflab_" + "x" * 10}), "netlink.family",
     "at most 15"),
    ("netlink-family-capitals", _events(DPORT, netlink={"family": "Nflab"}), "netlink.family",
     "lower-case"),
    ("netlink-family-quote", _events(DPORT, netlink={"family": 'a"b'}), "netlink.family", "lower-case"),
    ("netlink-group-empty", _events(DPORT, netlink={"group": ""}), "netlink.group", "GENL_NAMSIZ"),
    ("netlink-version-zero", _events(DPORT, netlink={"version": 0}), "netlink.version", "1..255"),
    ("netlink-version-bool", _events(DPORT, netlink={"version": True}), "netlink.version", "1..255"),
    ("default-family-too-long", {**_events(DPORT), "name": "averylonghookname"}, "netlink.family",
     "at most 15"),
    ("events-on-a-match", {"kind": "match", "name": "m", "events": [DPORT]}, "events", "hook modules"),
]


@pytest.mark.parametrize("raw,field,valid", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_event_definitions_name_field_and_valid_values(raw, field, valid):
    with pytest.raises(SpecError) as info:
        spec.validate(raw, Path("x/ext.toml"))
    err = info.value
    assert err.exit_code == 2 and err.message.startswith("x/ext.toml"), err.message
    assert re.search(rf"\b{re.escape(field)}\b", err.message), f"field {field!r} not named: {err}"
    assert err.hint and err.hint.startswith("valid: ") and valid in err.hint, err.hint
    assert "\n" not in str(err).strip()


def test_defaults_and_ids():
    nl = spec.validate(_events(DPORT, {"name": "s4", "type": "in_addr", "source": "saddr"})).netlink
    assert (nl.family, nl.group, nl.version) == ("nflab_nflhook", "events", 1)
    kit = [name for name, _, _ in spec.KIT_ATTRS] + [name for name, _ in spec.COUNTERS]
    assert [a.name for a in nl.attrs] == kit + ["dport", "s4"]
    assert [a.id for a in nl.attrs] == list(range(1, len(kit) + 3))
    assert nl.attr("s4").source == "saddr" and nl.attr("dport").source == "dport"


def test_a_new_field_moves_no_id_and_changes_the_layout():
    one = spec.validate(_events(DPORT)).netlink
    two = spec.validate(_events(DPORT, {"name": "mark", "type": "u32"})).netlink
    assert [(a.name, a.id) for a in one.attrs] == [(a.name, a.id) for a in two.attrs][:len(one.attrs)]
    assert one.layout != two.layout
    assert one.layout == spec.validate(_events(DPORT)).netlink.layout


def test_pktlog_definition():
    ext = spec.load("pktlog")
    nl = ext.netlink
    assert nl.family == "nflab_pktlog" and nl.group == "events"
    assert {a.source for a in nl.events} == set(spec.EVENT_SOURCES)
    assert [p["name"] for p in ext.params] == ["rate", "burst"]
    table = nl.table()
    assert table["layout"] == nl.layout and table["commands"] == {"event": 1, "get": 2, "set": 3}
    assert {a["name"]: a["names"] for a in table["attrs"]}["hook"]["2"] == "FORWARD"


def _all_pairs():
    events = []
    for source, types in spec.EVENT_SOURCES.items():
        for typ in types:
            events.append({"name": f"{source}_{typ}", "type": typ, "source": source})
    raw = copy.deepcopy(spec.load("pktlog").raw)
    raw["events"] = events
    return spec.validate(raw, PKTLOG / "ext.toml")


def test_every_source_and_type_renders():
    ext = _all_pairs()
    c = render.render(ext)["nflab_pktlog.c"]
    for a in ext.netlink.events:
        const = f"PKTLOG_A_{a.name.upper()}"
        assert f"[{const}] = " in c, f"{a.name}: no policy"
        assert re.search(rf"nla_put_\w+\(skb, {const}, ", c), f"{a.name}: no nla_put"
        assert f"flt->present |= BIT(PKTLOG_F_{a.name.upper()});" in c, f"{a.name}: not parsed"


@pytest.fixture(scope="module")
def pktlog_c():
    return render.render(spec.load("pktlog"))["nflab_pktlog.c"]


def test_the_family_is_per_netns_strict_and_admin_only_where_it_changes_things(pktlog_c):
    assert re.search(r"\.netnsok\s*= true,", pktlog_c)
    assert "genlmsg_multicast_netns(&pktlog_family, net, skb, 0," in pktlog_c
    assert "pktlog_count(pn, pktlog_emit(pn, state->net, &v), 1);" in pktlog_c   # the packet's netns
    assert "GENL_DONT_VALIDATE" not in pktlog_c and ".validate" not in pktlog_c
    assert "[PKTLOG_A_FILTER] = NLA_POLICY_NESTED(pktlog_filter_policy)," in pktlog_c
    assert "NLA_POLICY_FULL_RANGE(NLA_U32, &pktlog_rate_range)" in pktlog_c
    assert re.search(r"\.cmd\s*= PKTLOG_CMD_SET,.*?\.flags\s*= GENL_UNS_ADMIN_PERM,", pktlog_c, re.S)
    assert ("#if NFLAB_HAVE_GENL_MCAST_CAP_NET_ADMIN\n\t\t.flags\t\t= GENL_MCAST_CAP_NET_ADMIN,\n"
            "#elif NFLAB_HAVE_GENL_MCGRP_CAP_SYS_ADMIN\n\t\t.cap_sys_admin\t= 1,\n#else\n#error ") in pktlog_c
    assert "netlink_ns_capable(skb, net->user_ns, CAP_NET_ADMIN)" in pktlog_c      # GET's reset


def test_a_kernel_that_cannot_restrict_listeners_refuses_pktlog(pktlog_c):
    """Neither GENL_MCAST_CAP_NET_ADMIN nor the stable kernels' cap_sys_admin bit:
    events would reach any local user, so the module is refused before Kbuild."""
    table = probes.load_table()
    forms = {"genl_mcast_cap_net_admin", "genl_mcgrp_cap_sys_admin"}
    for have in ("genl_mcast_cap_net_admin", "genl_mcgrp_cap_sys_admin", None):
        probed = {p.name: probes.Result(p.name, p.name not in forms or p.name == have, p.how, "x")
                  for p in table if p.how != "any"}
        results = probes.derive(table, probed)      # genl_mcgrp_privileged from the two forms
        refused = [p.name for p, _ in probes.missing_for(pktlog_c, table, results)]
        assert refused == ([] if have else ["genl_mcgrp_privileged"]), have


def test_counters_are_the_base_per_cpu_u64_stats(pktlog_c):
    ctrs = [f"PKTLOG_CTR_{name.upper()}" for name, _ in spec.COUNTERS]
    enum = pktlog_c[pktlog_c.index("\tPKTLOG_CTR_PACKETS = 0,"):pktlog_c.index("PKTLOG_NCTRS =")]
    assert [line.split()[0] for line in enum.splitlines()[1:] if line.strip()] == ctrs
    assert "u64_stats_t ctr[PKTLOG_NCTRS];" in pktlog_c
    assert "pktlog_count(pn, PKTLOG_CTR_MATCHED, 1);" in pktlog_c
    for name, _ in spec.COUNTERS:
        assert f'{{ "{name}", PKTLOG_A_{name.upper()}, PKTLOG_CTR_{name.upper()} }},' in pktlog_c
    get = pktlog_c[pktlog_c.index("static int pktlog_get_doit"):]
    get = get[:get.index("\n}\n")]
    # GET's reset takes off what it reported, under the base's clear mutex
    assert get.index("pktlog_sum(pn, sum);") < get.index("pktlog_put_state(msg, pn, sum)") \
        < get.index("pktlog_subtract(pn, sum);") < get.index("mutex_unlock(&pn->clear_mutex);")


def test_nothing_is_formatted_under_a_spinlock(pktlog_c):
    sections = list(re.finditer(r"spin_lock(_bh)?\((.*?)\);(.*?)spin_unlock(_bh)?\(\2\);", pktlog_c, re.S))
    assert len(sections) >= 3, "the locked sections moved: the check below would look at none"
    for m in sections:
        assert not re.search(r"printf|seq_|pr_\w+\(|snprintf", m.group(3)), m.group(0)


def test_init_and_exit_unwind_in_order(pktlog_c):
    init = pktlog_c[pktlog_c.index("static int __init pktlog_init"):]
    init = init[:init.index("\n}\n")]
    assert init.index("register_pernet_device") < init.index("genl_register_family") \
        < init.index("smp_store_release(&pktlog_live, true)")
    assert "unregister_pernet_device(&pktlog_net_ops);\n\t\treturn err;" in init
    exit_ = pktlog_c[pktlog_c.index("static void __exit pktlog_exit"):]
    order = [exit_.index(s) for s in ("WRITE_ONCE(pktlog_live, false)", "synchronize_net()",
                                      "genl_unregister_family", "unregister_pernet_device")]
    assert order == sorted(order)
    state_exit = pktlog_c[pktlog_c.index("static void pktlog_state_exit"):]
    assert "kfree(rcu_dereference_protected(pn->filter, true));\n\tmutex_destroy(&pn->mutex);" \
        in state_exit[:state_exit.index("\n}\n")]


def test_compat_and_probes_cover_what_pktlog_needs():
    from kmods import probes
    compat = (spec.CATALOG.parent / "templates" / "compat_nflab.h").read_text()
    assert "#define nflab_nla_strscpy(dst, nla, size) nla_strlcpy(dst, nla, size)" in compat
    names = {p.name for p in probes.load_table()}
    assert {"nla_strscpy", "genl_mcast_cap_net_admin", "genl_mcgrp_cap_sys_admin"} <= names


# ---------------------------------------------------------------- userspace

@pytest.fixture(scope="module")
def table():
    return pl.Table(json.loads(json.dumps(spec.load("pktlog").netlink.table())))


def _event_bytes(table, values: dict) -> bytes:
    out = b""
    for name, payload in values.items():
        out += pl.nla(table.id(name), payload)
    return out


def test_decoder_reads_an_event(table):
    payload = _event_bytes(table, {
        "lost": struct.pack("=Q", 7), "nfproto": b"\x0a", "hook": b"\x02",
        "priority": struct.pack("=i", -140), "iif": struct.pack("=I", 3), "indev": b"eth1\0",
        "saddr6": bytes.fromhex("20010db8000100000000000000000002"), "sport": struct.pack("!H", 33000),
        "l4proto": b"\x11", "len": struct.pack("=I", 76)})
    ev = table.decode(payload + pl.nla(999, b"\1\2"))
    assert ev == {"lost": 7, "nfproto": "ipv6", "hook": "FORWARD", "priority": -140, "iif": 3,
                  "indev": "eth1", "saddr6": "2001:db8:1::2", "sport": 33000, "l4proto": "udp",
                  "len": 76, "attr999": "0102"}
    assert "FORWARD/-140 ipv6 udp 2001:db8:1::2:33000" in pl.describe(ev | {"dport": 9})


def test_filter_values_are_encoded_by_type(table):
    assert table.encode("hook", "forward") == pl.nla(table.id("hook"), b"\x02")
    assert table.encode("dport", "40300") == pl.nla(table.id("dport"), struct.pack("!H", 40300))
    assert table.encode("daddr4", "127.0.0.1") == pl.nla(table.id("daddr4"), bytes([127, 0, 0, 1]))
    assert table.encode("indev", "eth1") == pl.nla(table.id("indev"), b"eth1\0")
    for name, value in (("daddr4", "::1"), ("saddr6", "10.0.0.1"), ("rate", "5"), ("ttl", "1")):
        with pytest.raises(ValueError):
            table.encode(name, value)


def test_attribute_and_message_framing():
    assert pl.nla(5, b"abc") == struct.pack("=HH", 7, 5) + b"abc\0"
    assert pl.nla(3, b"", nested=True) == struct.pack("=HH", 4, 3 | pl.NLA_F_NESTED)
    assert pl.parse_attrs(pl.nla(1, b"x") + pl.nla(2, b"yz") + b"\x09\x00") == [(1, b"x"), (2, b"yz")]
    msg = pl.genl_message(0x22, 2, pl.nla(6), seq=9)
    assert pl.split_messages(msg + msg) == [(0x22, pl.NLM_F_REQUEST | pl.NLM_F_ACK, 9, msg[16:])] * 2


def test_error_messages_with_and_without_the_echoed_request():
    request = pl.genl_message(0x22, 3, pl.nla(4, b"\1\2"), seq=5)
    tlv = pl.nla(pl.NLMSGERR_ATTR_MSG, b"invalid attribute length\0")
    whole = struct.pack("=i", -22) + request + tlv
    assert pl.error_of(pl.NLM_F_ACK_TLVS, whole) == (22, "invalid attribute length")
    capped = struct.pack("=i", -34) + request[:16] + tlv
    assert pl.error_of(pl.NLM_F_ACK_TLVS | pl.NLM_F_CAPPED, capped) == (34, "invalid attribute length")
    assert pl.error_of(pl.NLM_F_CAPPED, struct.pack("=i", 0) + request[:16]) == (0, "")


def test_family_reply_with_groups():
    groups = pl.nla(1, pl.nla(pl.CTRL_ATTR_MCAST_GRP_NAME, b"events\0")
                    + pl.nla(pl.CTRL_ATTR_MCAST_GRP_ID, struct.pack("=I", 12)), nested=True)
    attrs = (pl.nla(pl.CTRL_ATTR_FAMILY_ID, struct.pack("=H", 34))
             + pl.nla(pl.CTRL_ATTR_FAMILY_NAME, b"nflab_pktlog\0")
             + pl.nla(pl.CTRL_ATTR_VERSION, struct.pack("=I", 1))
             + pl.nla(pl.CTRL_ATTR_MCAST_GROUPS, groups, nested=True))
    assert pl.parse_family(attrs) == {"id": 34, "name": "nflab_pktlog", "version": 1,
                                      "groups": {"events": 12}}


def test_install_ships_the_listener_and_the_table_of_the_definition():
    files = deploy.guest_files("pktlog")
    data, mode = files["/usr/local/bin/pktlog-listen"]
    assert mode == 0o755 and data.startswith(b"#!/usr/bin/python3\n")
    compile(data, "pktlog-listen", "exec")
    assert json.loads(files["/usr/share/nflab/pktlog/attrs.json"]) == \
        json.loads(json.dumps(spec.load("pktlog").netlink.table()))


def test_the_fuzzer_covers_every_kind():
    fuzz = (Path(__file__).parents[1] / "suites" / "pktlog_fuzz.py").read_text()
    kinds = re.search(r"KINDS = \((.*?)\)\n", fuzz, re.S).group(1)
    for kind in re.findall(r'"([a-z-]+)"', kinds):
        assert f"def k_{kind.replace('-', '_')}(" in fuzz, kind


# ---------------------------------------------------------------- atlas and report

def test_atlas_reads_points_and_the_netlink_family():
    out = ("=== nflab_pktlog\npoint ipv4 PRE_ROUTING -140 1 7\npoint ipv4 FORWARD 10 0 0\n"
           "genl family=nflab_pktlog id=34 group=events layout=0x72931543\n"
           "=== nflab_pktcount\npoint ipv4 LOCAL_IN 2147483647 1 3\n")
    points, genl = atlas.parse_proc_points(out)
    assert points == {"nflab_pktlog": [("ipv4", "PRE_ROUTING", -140)],
                      "nflab_pktcount": [("ipv4", "LOCAL_IN", 2147483647)]}
    assert genl == {"nflab_pktlog": {"family": "nflab_pktlog", "id": "34", "group": "events",
                                     "layout": "0x72931543"}}


def test_report_lists_the_other_hook_modules(tmp_path):
    (tmp_path / "nflab_tracer").write_text("point ipv4 FORWARD 0 1 0\nring size=1\n")
    (tmp_path / "nflab_pktlog").write_text("point ipv4 FORWARD 10 1 0\nstats matched=3\nfilter all\n")
    cmd = dict(tracing.REPORT_SOURCES)["nflab hook modules"].format(module=tracing.MODULE)
    cmd = cmd.replace("/proc/net/", f"{tmp_path}/")
    res = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout == "# nflab_pktlog\nstats matched=3\nfilter all\n"
