"""Extension definitions: load, validate, and derive everything both sides need.

One ``kmods/catalog/<name>/ext.toml`` per extension drives the kernel module,
the iptables plugin and the tests. Validation happens here, before any
template or compiler sees the values; every error names the field, what was
wrong and what is valid.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ground.errors import SpecError

CATALOG = Path(__file__).resolve().parent / "catalog"
# more catalog folders (each holding <name>/ext.toml), separated by ':'; set by
# `invoke test/matrix --extensions-dir=DIR` for their subprocesses
EXTRA_CATALOG_ENV = "NFLAB_EXTRA_CATALOG"

KINDS = ("hook", "match", "target")
FAMILIES = ("ipv4", "ipv6", "netdev")
XT_FAMILIES = ("ipv4", "ipv6")
HOOKS = ("PRE_ROUTING", "LOCAL_IN", "FORWARD", "LOCAL_OUT", "POST_ROUTING", "INGRESS")
INET_HOOKS = HOOKS[:5]
TARGET_VERDICTS = ("XT_CONTINUE", "NF_ACCEPT", "NF_DROP")
INT_MIN, INT_MAX = -(2**31), 2**31 - 1

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
OPTION_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
IDENT_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
# C keywords and macros every kernel/userspace compile predefines: never usable as members
C_RESERVED = frozenset("""
auto break case char const continue default do double else enum extern float for goto if
inline int long register restrict return short signed sizeof static struct switch typedef
union unsigned void volatile while _Bool _Complex _Static_assert asm typeof bool true false
linux unix i386 current jiffies NULL min max likely unlikely
s6_addr s6_addr16 s6_addr32 sin_zero errno stdin stdout stderr offsetof container_of
noinline fallthrough barrier swap clamp abs min_t max_t htons htonl ntohs ntohl assert
ifr_name ifr_addr ifr_flags ifr_mtu ifr_data si_pid si_uid si_code sa_handler
""".split())
# Hook names whose derived C symbols (<name>_hook, <name>_net, <name>_init...) are the
# kernel's own namespaces: "nf" would define nf_hook(), which <linux/netfilter.h> has.
KERNEL_PREFIXES = frozenset("""
nf nft nfnl nfqnl nf_conntrack nf_nat nf_tables xt ipt ip6t arpt ebt x_tables ip ip6 ipv4
ipv6 inet inet6 net netdev netns dev skb sk sock tcp udp icmp icmpv6 nla nlmsg genl netlink
proc seq rcu kernel module init exit pernet neigh dst rt fib xfrm br nflab
""".split())
NETFILTER_NAMESPACES = ("nf_", "nft_", "nfnl_", "xt_", "ipt_", "ip6t_", "arpt_", "ebt_", "nflab_")
# iptables' own long options (original_opts of iptables.c, ip6tables.c and xtables.c in
# iptables 1.8, plus --fragment, the spelling its man page gives): getopt_long matches
# an exact name first, so an extension option of one of these names is never seen
# (`-m foo --dst X` sets the rule's destination address, not foo's option)
IPTABLES_OPTIONS = frozenset("""
append delete check insert replace list list-rules flush zero new-chain delete-chain
rename-chain policy source destination src dst protocol in-interface jump table match
numeric out-interface verbose wait wait-interval exact fragments fragment version help
line-numbers modprobe set-counters goto ipv4 ipv6
""".split())
NAME_MAX = 28           # XT_EXTENSION_MAXNAMELEN (29) minus the NUL
MODULE_NAME_MAX = 55    # MODULE_NAME_LEN (64 - sizeof(unsigned long)) minus the NUL
TEXT_MAX = 512
HOOK_POINTS_MAX = 256   # the generated point's index (and the tracer's record of it) is a u8

# Netfilter modules of the stock kernels; a kit module must not shadow one silently.
IN_TREE_MODULES = frozenset("""
xt_addrtype xt_AUDIT xt_bpf xt_cgroup xt_CHECKSUM xt_CLASSIFY xt_cluster xt_comment
xt_connbytes xt_connlabel xt_connlimit xt_connmark xt_CONNSECMARK xt_conntrack xt_cpu
xt_CT xt_dccp xt_devgroup xt_dscp xt_DSCP xt_ecn xt_esp xt_hashlimit xt_helper xt_hl
xt_HL xt_HMARK xt_IDLETIMER xt_ipcomp xt_iprange xt_ipvs xt_l2tp xt_LED xt_length
xt_limit xt_LOG xt_mac xt_mark xt_MASQUERADE xt_multiport xt_nat xt_NETMAP xt_nfacct
xt_NFLOG xt_NFQUEUE xt_osf xt_owner xt_physdev xt_pkttype xt_policy xt_quota
xt_rateest xt_RATEEST xt_realm xt_recent xt_REDIRECT xt_sctp xt_SECMARK xt_set
xt_socket xt_state xt_statistic xt_string xt_tcpmss xt_TCPMSS xt_TCPOPTSTRIP
xt_tcpudp xt_TEE xt_time xt_TPROXY xt_TRACE xt_u32 x_tables nf_conntrack nf_nat
nf_tables nf_defrag_ipv4 nf_defrag_ipv6 nfnetlink nfnetlink_hook nfnetlink_log
nfnetlink_queue iptable_filter iptable_mangle iptable_nat iptable_raw
iptable_security ip6table_filter ip6table_mangle ip6table_nat ip6table_raw
ip6table_security nf_reject_ipv4 nf_reject_ipv6 nft_compat
""".split())

# The xtables names the stock kernels serve (5.10 to 7.x, modules.alias and module
# names: `alias ipt_TTL xt_HL`, ipt_REJECT.ko): x_tables looks a rule's match or
# target up by name and family and loads ipt_NAME / ip6t_NAME, so a kit extension
# of one of these names is served by the stock module as well as by its own.
_STOCK_XT_BOTH = """
AUDIT CHECKSUM CLASSIFY CONNMARK CONNSECMARK CT DNAT DSCP HMARK IDLETIMER LED LOG MARK
MASQUERADE NETMAP NFLOG NFQUEUE NOTRACK RATEEST REDIRECT REJECT SECMARK SET SNAT SYNPROXY
TCPMSS TCPOPTSTRIP TEE TOS TPROXY TRACE addrtype ah bpf cgroup cluster comment connbytes
connlabel connlimit connmark conntrack cpu dccp devgroup dscp ecn esp hashlimit helper
ipcomp iprange ipvs l2tp length limit mac mark multiport nfacct osf owner physdev pkttype
policy quota rateest recent rpfilter sctp set socket state statistic string tcp tcpmss
time tos u32 udp
""".split()
STOCK_XT_NAMES = frozenset(
    [f"ipt_{n}" for n in _STOCK_XT_BOTH + "CLUSTERIP ECN TTL icmp realm ttl".split()]
    + [f"ip6t_{n}" for n in _STOCK_XT_BOTH + """DNPT HL NPT SNPT dst eui64 frag hbh hl icmp6
                                                ipv6header mh rt srh""".split()])


@dataclass(frozen=True)
class OptionType:
    """How one option type is stored in the shared struct and parsed by xtables."""

    name: str
    xttype: str          # XTTYPE_* used in x6_options
    ctype: str | None    # C type of the struct member (None: flag only)
    size: int
    align: int
    put: bool            # stored by libxtables itself via XTOPT_PUT
    members: tuple = ("",)  # suffixes of struct members (iprange: _min/_max)


OPTION_TYPES = {
    "flag": OptionType("flag", "XTTYPE_NONE", None, 0, 1, False, ()),
    "uint8": OptionType("uint8", "XTTYPE_UINT8", "__u8", 1, 1, True),
    "uint16": OptionType("uint16", "XTTYPE_UINT16", "__u16", 2, 2, True),
    "uint32": OptionType("uint32", "XTTYPE_UINT32", "__u32", 4, 4, True),
    "uint64": OptionType("uint64", "XTTYPE_UINT64", "__aligned_u64", 8, 8, True),
    "string": OptionType("string", "XTTYPE_STRING", "char", 1, 1, True),
    "host": OptionType("host", "XTTYPE_HOST", "union nf_inet_addr", 16, 4, True),
    "iprange": OptionType("iprange", "XTTYPE_STRING", "union nf_inet_addr", 16, 4, False,
                          ("_min", "_max")),
    "choice": OptionType("choice", "XTTYPE_STRING", "__u8", 1, 1, False),
    # parsed and printed by the extension's own plugin functions
    # <prefix>_parse_<option>() / <prefix>_print_<option>(); with `length` it owns
    # a counted byte buffer (char <field>[length] + __u8 <field>_len), with
    # `member = "uint8".."uint64"` one integer member <field>, else no member
    "custom": OptionType("custom", "XTTYPE_STRING", "char", 1, 1, False, ("", "_len")),
}
# members the plugin fills itself (its custom parse functions, or its final
# check: layer7's automaton), beside the options' (userspace-owned: copied
# back when rules are listed)
FIELD_TYPES = ("uint8", "uint16", "uint32", "uint64")
# an info struct must fit xt_entry_match/target: its __u16 size covers the
# 32-byte header too, and XT_ALIGN rounds the total up to 8
INFO_MAX = 65535 // 8 * 8 - 32
FIELD_COUNT_MAX = INFO_MAX
# kernel-private members (counters, pointers) that userspace never fills
PRIVATE_TYPES = {
    "kptr": ("void *", 8, 8),
    "u64": ("__aligned_u64", 8, 8),
    "u32": ("__u32", 4, 4),
    "inet_addr": ("union nf_inet_addr", 16, 4),
}

# ---- netlink events of hook modules ([netlink] + [[events]]) ----------------
# Attribute types an event field can have -> payload bytes (ifname: up to IFNAMSIZ).
EVENT_TYPES = {"u8": 1, "u16": 2, "u32": 4, "u64": 8, "s32": 4, "be16": 2,
               "in_addr": 4, "in6_addr": 16, "ifname": 16}
# What the kernel can report about a packet at a hook point -> the types that carry it.
# The C that reads each (source, type) from a packet is in kmods/templates/_netlink.j2.
EVENT_SOURCES = {
    "nfproto": ("u8",), "hook": ("u8",), "priority": ("s32",),
    "iif": ("u32",), "oif": ("u32",), "indev": ("ifname",), "outdev": ("ifname",),
    "mark": ("u32",), "len": ("u32",), "l4proto": ("u8",),
    "saddr": ("in_addr", "in6_addr"), "daddr": ("in_addr", "in6_addr"),
    "sport": ("be16",), "dport": ("be16",),
}
# the address family a source/type pair only exists in
EVENT_TYPE_FAMILY = {"in_addr": "ipv4", "in6_addr": "ipv6"}
# names userspace shows (and accepts) for the values of some sources
EVENT_NAMES = {
    "nfproto": {2: "ipv4", 10: "ipv6"},
    "hook": {0: "PRE_ROUTING", 1: "LOCAL_IN", 2: "FORWARD", 3: "LOCAL_OUT", 4: "POST_ROUTING"},
    "l4proto": {1: "icmp", 6: "tcp", 17: "udp", 33: "dccp", 58: "ipv6-icmp", 132: "sctp",
                136: "udplite"},
}
GENL_NAME_MAX = 15      # GENL_NAMSIZ (16) minus the NUL
EVENTS_MAX = 32         # the kernel's filter keeps a u32 bitmap of the fields it compares
# The kit's own attributes, numbered first so their ids do not move with the events:
# (name, type, meaning). Counters follow, then the definition's event fields.
KIT_ATTRS = (
    ("pad", "pad", "alignment of 64-bit attributes"),
    ("lost", "u64", "event: matching packets not reported since the previous event "
                    "(rate limit, failed sends)"),
    ("filter", "nested", "SET: the fields an event must carry to be sent (empty: every packet); "
                         "GET: the filter in force"),
    ("rate", "u32", "SET/GET: events per second the netns may send"),
    ("burst", "u32", "SET/GET: events the netns may send at once"),
    ("reset", "flag", "GET: zero the counters once read"),
    ("layout", "u32", "GET: hash of this attribute and command layout"),
)
COUNTERS = (
    ("matched", "packets that passed the filter"),
    ("unheard", "matching packets while nobody listened in the netns"),
    ("ratelimited", "matching packets the rate limit kept from being reported"),
    ("failed", "events that could not be built or sent"),
    ("events", "events delivered to every listener"),
    ("overrun", "events delivered, but not to a listener whose socket buffer was full"),
)
COMMANDS = (
    ("event", "multicast: one matching packet"),
    ("get", "counters, filter and rate limit of the netns"),
    ("set", "filter and rate limit of the netns (CAP_NET_ADMIN)"),
)
# "(default 0)", "default: 32", "defaults to 3": a help text saying a default the
# definition declares ("the default route", "by default every packet" are not)
HELP_DEFAULT_RE = re.compile(r"\(default\b|\bdefaults?\s*(?::|=|\bto\b|\bis\b)", re.I)
INET_HOOKS = ("PRE_ROUTING", "LOCAL_IN", "FORWARD", "LOCAL_OUT", "POST_ROUTING")
# the hooks each xtables table attaches to (net/ipv4/netfilter/iptable_*.c)
TABLE_HOOKS = {"raw": ("PRE_ROUTING", "LOCAL_OUT"), "mangle": INET_HOOKS,
               "nat": ("PRE_ROUTING", "LOCAL_IN", "LOCAL_OUT", "POST_ROUTING"),
               "filter": ("LOCAL_IN", "FORWARD", "LOCAL_OUT"),
               "security": ("LOCAL_IN", "FORWARD", "LOCAL_OUT")}
RATE_MAX = 1000000      # events per second per netns
BURST_MAX = 10000


@dataclass
class Option:
    name: str            # command-line name without dashes: "src-range"
    type: str
    help: str
    field: str           # struct member base name
    invert: bool = False
    mandatory: bool = False
    length: int = 0      # strings: buffer size incl. NUL
    choices: tuple = ()
    minimum: int | None = None
    maximum: int | None = None
    label: str = ""      # word used by `iptables -L` print
    member: str = ""     # custom options: integer type of their own member
    index: int = 0       # bit position of the "present" flag
    # the value a rule has without the option (a choice's index); given, it
    # leaves no trace (flag clear, field 0), so every spelling of a rule is one
    # encoding and the saved text finds it again (iptables -D, -C)
    default: int | None = None

    @property
    def ident(self) -> str:
        return self.name.replace("-", "_")

    @property
    def id_const(self) -> str:
        return "O_" + self.ident.upper()

    @property
    def otype(self) -> OptionType:
        return OPTION_TYPES[self.type]

    @property
    def default_word(self) -> str:
        """The declared default as a user types it (a choice's name), or ''."""
        if self.default is None:
            return ""
        return self.choices[self.default] if self.type == "choice" else str(self.default)

    @property
    def help_text(self) -> str:
        """The help line of ``iptables -m NAME --help``: *help*, and the declared
        default (said once, by the kit, so it cannot disagree with the code)."""
        if self.default is None:
            return self.help
        return f"{self.help} (default {self.default_word})" if self.help else f"default {self.default_word}"


@dataclass
class Member:
    """One member of the shared info struct, in declaration order."""

    ctype: str
    name: str
    array: int = 0
    size: int = 0
    align: int = 1
    private: bool = False
    comment: str = ""
    compared: bool = True     # within the bytes iptables compares and lists

    @property
    def decl(self) -> str:
        if self.ctype.endswith("*"):
            return f"{self.ctype}{self.name} __attribute__((aligned(8)))"
        suffix = f"[{self.array}]" if self.array else ""
        return f"{self.ctype} {self.name}{suffix}"


@dataclass
class HookPoint:
    family: str
    hook: str
    priority: int
    label: str = ""

    @property
    def nfproto(self) -> str:
        return {"ipv4": "NFPROTO_IPV4", "ipv6": "NFPROTO_IPV6", "netdev": "NFPROTO_NETDEV"}[self.family]

    @property
    def hooknum(self) -> str:
        return "NF_NETDEV_INGRESS" if self.hook == "INGRESS" else f"NF_INET_{self.hook}"


@dataclass(frozen=True)
class NlAttr:
    """One attribute of a hook module's generic netlink family."""

    name: str
    type: str            # an EVENT_TYPES key, or pad, nested, flag
    id: int
    role: str            # kit, counter or event
    source: str = ""     # events: an EVENT_SOURCES key
    help: str = ""


@dataclass
class Netlink:
    """The generic netlink family of a hook module that reports packets as events."""

    family: str
    group: str
    version: int
    attrs: list
    rate_max: int = RATE_MAX
    burst_max: int = BURST_MAX

    @property
    def events(self) -> list:
        return [a for a in self.attrs if a.role == "event"]

    @property
    def counters(self) -> list:
        return [a for a in self.attrs if a.role == "counter"]

    @property
    def counter_sizes(self) -> dict:
        """The counters as hook.c.j2 takes a module's own (name -> how many): one each."""
        return {a.name: 1 for a in self.counters}

    def attr(self, name: str) -> NlAttr:
        return next(a for a in self.attrs if a.name == name)

    @property
    def commands(self) -> list:
        """[(name, id, meaning)]; 0 is unused."""
        return [(name, i, text) for i, (name, text) in enumerate(COMMANDS, 1)]

    @property
    def layout(self) -> int:
        """32-bit hash of everything both sides must agree on: the module reports it
        (GET), the decoder table carries it."""
        data = repr((self.family, self.group, self.version, [(a.id, a.name, a.type, a.source)
                     for a in self.attrs], [c[:2] for c in self.commands]))
        return int.from_bytes(hashlib.sha256(data.encode()).digest()[:4], "big")

    def table(self) -> dict:
        """The userspace decoder's table (JSON-able): what every id means."""
        return {
            "family": self.family, "group": self.group, "version": self.version,
            "layout": self.layout,
            "commands": {name: cid for name, cid, _ in self.commands},
            "attrs": [{"name": a.name, "id": a.id, "type": a.type, "role": a.role,
                       "source": a.source, "help": a.help,
                       "names": {str(k): v for k, v in EVENT_NAMES.get(a.source, {}).items()}}
                      for a in self.attrs],
        }


@dataclass
class Extension:
    kind: str
    name: str
    summary: str
    families: list
    path: Path | None = None
    revision: int = 0
    options: list = field(default_factory=list)
    private: list = field(default_factory=list)
    fields: list = field(default_factory=list)
    hooks: list = field(default_factory=list)
    overrides_in_tree: bool = False
    verdict: str = "XT_CONTINUE"
    tables: list = field(default_factory=list)
    author: str = "nflab"
    params: list = field(default_factory=list)
    test: dict = field(default_factory=dict)
    catalog_only: bool = False
    flags_type: str = "__u8"
    invert_shift: int = 4
    info_name: str = ""
    netlink: Netlink | None = None
    raw: dict = field(default_factory=dict)

    # ---- names derived once, used by every template ---------------------
    @property
    def lname(self) -> str:
        return self.name.lower()

    @property
    def module(self) -> str:
        if self.kind == "hook":
            return f"nflab_{self.lname}"
        return f"xt_{self.name}"

    @property
    def prefix(self) -> str:
        """C identifier prefix of the extension: ``iprange_mt``, ``ECHO_tg``..."""
        return {"match": f"{self.lname}_mt", "target": f"{self.lname}_tg",
                "hook": f"{self.lname}"}[self.kind]

    @property
    def struct(self) -> str:
        if self.info_name:
            return self.info_name
        return f"xt_{self.lname}_{'mtinfo' if self.kind == 'match' else 'tginfo'}"

    @property
    def header(self) -> str:
        return f"xt_{self.name}.h" if self.kind != "hook" else f"{self.module}.h"

    @property
    def guard(self) -> str:
        return f"_NFLAB_{self.header.replace('.', '_').upper()}"

    @property
    def plugin(self) -> str | None:
        return f"libxt_{self.name}" if self.kind != "hook" else None

    @property
    def version_tag(self) -> str:
        """Short hash of the definition and its own templates: MODULE_VERSION."""
        h = hashlib.sha256()
        if self.path:
            for f in sorted(self.path.parent.iterdir()):
                if f.is_file():
                    h.update(f.name.encode() + f.read_bytes())
        else:
            h.update(repr(sorted(self.raw.items())).encode())
        return h.hexdigest()[:12]

    def flag_const(self, opt: Option) -> str:
        return f"{self.lname.upper()}_{opt.field.upper()}"

    def inv_const(self, opt: Option) -> str:
        return f"{self.flag_const(opt)}_INV"

    def choice_const(self, opt: Option, choice: str) -> str:
        return f"{self.lname.upper()}_{opt.ident.upper()}_{choice.replace('-', '_').upper()}"

    def default_const(self, opt: Option) -> str:
        return f"{self.flag_const(opt)}_DEFAULT"

    def value_getter(self, opt: Option) -> str:
        """The header's function giving *opt*'s value in a rule, its default
        when not given (only where the default is not 0: the zeroed field)."""
        return f"{self.lname}_{opt.field}_value"

    def c_names(self) -> list[tuple[str, str]]:
        """The file-scope C names the generated sources take from the definition's
        options, each with the option it comes from (a name may repeat)."""
        names = []
        for opt in self.options:
            names.append((self.flag_const(opt), f"--{opt.name}"))
            if opt.invert:
                names.append((self.inv_const(opt), f"! --{opt.name}"))
            names.append((opt.id_const, f"--{opt.name}"))
            for c in opt.choices:
                names.append((self.choice_const(opt, c), f"--{opt.name} {c}"))
            if opt.default is not None:
                names.append((self.default_const(opt), f"--{opt.name}'s default"))
                names.append((self.value_getter(opt), f"--{opt.name}'s value"))
        return names

    def name_prefixes(self) -> dict[str, str]:
        """The prefixes of every other C name the generated sources define (struct,
        guard, functions, the hook's symbols), with where they come from."""
        of_name = f"the name {self.name!r}"
        return {f"{self.lname}_": of_name, f"{self.lname.upper()}_": of_name,
                f"xt_{self.lname}_": of_name, self.struct: of_name, self.guard: of_name}

    def default_value(self, opt: Option) -> str:
        """*opt*'s default as C: a choice by its enum name, a number unsigned."""
        if opt.type == "choice":
            return self.choice_const(opt, opt.choices[opt.default])
        return f"{opt.default}{'ULL' if opt.type == 'uint64' else 'U'}"

    @property
    def members(self) -> list:
        return struct_members(self)

    @property
    def info_size(self) -> int:
        return struct_size(self.members)

    @property
    def userspace_size(self) -> int:
        """Bytes iptables compares and the kernel lists back: up to the first member
        that is private or a field with ``compared = false``."""
        offset = 0
        for m in self.members:
            if m.private or not m.compared:
                return _align(offset, m.align)   # == offsetof(struct, compare_end)
            offset = _align(offset, m.align) + m.size
        return struct_size(self.members)

    @property
    def compare_end(self) -> str | None:
        """The first member outside :attr:`userspace_size`, or None (the whole struct)."""
        return next((m.name for m in self.members if m.private or not m.compared), None)

    @property
    def has_private(self) -> bool:
        return bool(self.private)

    @property
    def valid_hooks(self) -> list[str]:
        """A target's ``.hooks``: the hooks of the tables it is for (NF_INET_*),
        as the in-tree REJECT declares its filter hooks. x_tables matches ``.table``
        by name only, and nft_compat checks a target's hooks only when it has
        them: without, a base chain of any hook in a table named filter takes it."""
        hooks = {h for t in self.tables for h in TABLE_HOOKS[t]} if self.kind == "target" else set()
        if hooks == set(INET_HOOKS):
            return []           # every hook: nothing to restrict
        return [h for h in INET_HOOKS if h in hooks]

    @property
    def has_flags(self) -> bool:
        """False for classic layouts without a flags member (e.g. comment)."""
        return self.flags_type != "none"


def _align(offset: int, align: int) -> int:
    return (offset + align - 1) // align * align


def struct_members(ext: Extension) -> list:
    members = []
    for opt in ext.options:
        ot = opt.otype
        if ot.ctype is None:
            continue
        if opt.type == "custom" and opt.member:
            mt = OPTION_TYPES[opt.member]
            members.append(Member(mt.ctype, opt.field, 0, mt.size, mt.align))
            continue
        if opt.type == "custom" and not opt.length:
            continue
        for suffix in ot.members:
            if opt.type == "custom":
                members.append(Member("char", f"{opt.field}", opt.length, opt.length, 1) if not suffix
                               else Member("__u8", f"{opt.field}_len", 0, 1, 1))
            elif opt.type == "string":
                members.append(Member("char", f"{opt.field}{suffix}", opt.length, opt.length, 1))
            else:
                members.append(Member(ot.ctype, f"{opt.field}{suffix}", 0, ot.size, ot.align))
    if ext.options and ext.has_flags:
        fsize = {"__u8": 1, "__u16": 2, "__u32": 4}[ext.flags_type]
        members.append(Member(ext.flags_type, "flags", 0, fsize, fsize))
    # compared fields first: those with compared = false sit between them and the private ones
    for fld in sorted(ext.fields, key=lambda f: not f.get("compared", True)):
        ft = OPTION_TYPES[fld["type"]]
        count = fld.get("count", 0)
        members.append(Member(ft.ctype, fld["name"], count, ft.size * max(count, 1), ft.align,
                              comment=fld.get("comment", ""), compared=fld.get("compared", True)))
    for priv in ext.private:
        ctype, size, align = PRIVATE_TYPES[priv["type"]]
        members.append(Member(ctype, priv["name"], 0, size, align, True,
                              priv.get("comment", "kernel private")))
    if not members:
        members.append(Member("__u8", "flags", 0, 1, 1))
    return _padded(members)


def _pad(n: int, size: int, like: Member) -> Member:
    """``__u8 __padN[size]``, on the same side of what iptables compares as *like*."""
    return Member("__u8", f"__pad{n}", size if size > 1 else 0, size, 1, like.private,
                  compared=like.compared)


def _padded(members: list) -> list:
    """*members* with each alignment hole the compiler would leave unnamed made an
    explicit ``__padN`` (as new UAPI structs do): every byte of the struct is
    named, the layout and size stay what they were."""
    out: list = []
    offset = max_align = pads = 0
    for m in members:
        gap = _align(offset, m.align) - offset
        if gap:
            out.append(_pad(pads, gap, out[-1]))
            pads += 1
        out.append(m)
        offset += gap + m.size
        max_align = max(max_align, m.align)
    tail = _align(offset, max_align) - offset
    if tail:
        out.append(_pad(pads, tail, out[-1]))
    return out


def struct_size(members: list) -> int:
    """sizeof() of the struct per the x86-64 (and i386-compatible) ABI rules."""
    offset, max_align = 0, 1
    for m in members:
        offset = _align(offset, m.align) + m.size
        max_align = max(max_align, m.align)
    return _align(offset, max_align)


# ---- validation -----------------------------------------------------------

def _fail(where: str, field_name: str, problem: str, valid: str) -> SpecError:
    if where.startswith("--"):          # a command-line option already names the field
        return SpecError(f"{where}: {problem}", hint=f"valid: {valid}")
    return SpecError(f"{where}: {field_name}: {problem}", hint=f"valid: {valid}")


def check_name(name, where="extension") -> str:
    if not isinstance(name, str) or not name:
        raise _fail(where, "name", "missing or not a string", "a C identifier such as iprange")
    if "/" in name or ".." in name or name.startswith("."):
        raise _fail(where, "name", f"{name!r} looks like a path",
                    "a C identifier such as iprange (letters, digits, _)")
    if not NAME_RE.fullmatch(name):
        raise _fail(where, "name", f"{name!r} is not a C identifier",
                    "letters, digits and _ , starting with a letter")
    if len(name) > NAME_MAX:
        raise _fail(where, "name", f"{name!r} is {len(name)} characters long",
                    f"at most {NAME_MAX} (XT_EXTENSION_MAXNAMELEN)")
    return name


def check_ident(value, where, field_name) -> str:
    """A lower-case C identifier usable as a struct member, constant or variable."""
    if not isinstance(value, str) or not IDENT_RE.fullmatch(value):
        raise _fail(where, field_name, f"{value!r} is not a lower-case C identifier",
                    "a lower-case C identifier: letters, digits and _, starting with a letter")
    if value.startswith("_") or value in C_RESERVED:
        raise _fail(where, field_name, f"{value!r} is reserved in C or the kernel",
                    "a name that is not a C keyword, predefined macro or _-prefixed")
    return value


def check_text(value, where, field_name, maximum=TEXT_MAX) -> str:
    if not isinstance(value, str):
        raise _fail(where, field_name, "not a string", "a quoted TOML string")
    if len(value) > maximum:
        raise _fail(where, field_name, f"{len(value)} characters", f"at most {maximum}")
    if any(ord(c) < 0x20 and c not in "\n\t" for c in value):
        raise _fail(where, field_name, "contains control characters", "printable text")
    return value


def check_bool(table: dict, key: str, where: str, default: bool = False) -> bool:
    """``table[key]``, a TOML boolean: a word ("no", "false") or a list would be
    read as true, so anything but true or false is refused, naming the key."""
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise _fail(where, key, f"{value!r} is not a boolean",
                    "true or false (a TOML boolean, unquoted)")
    return value


def check_priority(value, where="hook") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            value = int(value)
        else:
            raise _fail(where, "priority", f"{value!r} is not an integer",
                        f"an integer in [{INT_MIN}, {INT_MAX}], e.g. -175 (between mangle -150 "
                        "and conntrack -200)")
    if not INT_MIN <= value <= INT_MAX:
        raise _fail(where, "priority", f"{value} is out of range", f"[{INT_MIN}, {INT_MAX}]")
    return value


def check_hook(value, family, where="hook") -> str:
    if not isinstance(value, str) or value.upper().removeprefix("NF_INET_") not in HOOKS:
        raise _fail(where, "hook", f"unknown hook {value!r}", ", ".join(HOOKS))
    hook = value.upper().removeprefix("NF_INET_")
    if family == "netdev" and hook != "INGRESS":
        raise _fail(where, "hook", f"{hook} is not a netdev hook", "INGRESS")
    if family != "netdev" and hook == "INGRESS":
        raise _fail(where, "family", "INGRESS hooks run in the netdev family", "netdev")
    return hook


def check_family(value, allowed=FAMILIES, where="extension") -> str:
    if value not in allowed:
        raise _fail(where, "family", f"unknown family {value!r}", ", ".join(allowed))
    return value


def _is_key(value, table) -> bool:
    """*value* is a string naming an entry of *table* (a list or table never is)."""
    return isinstance(value, str) and value in table


def _own_option_name(name: str) -> str:
    """A suggestion for an option named like one of iptables': dst -> dst-addr."""
    return {"src": "src-addr", "dst": "dst-addr", "source": "src-addr",
            "destination": "dst-addr", "protocol": "proto"}.get(name, f"{name}-value")


def _option(raw, index, where) -> Option:
    if not isinstance(raw, dict):
        raise _fail(where, "options", "each option must be a table", "[[options]] name=... type=...")
    known = {"name", "type", "help", "field", "invert", "mandatory", "length", "choices",
             "min", "max", "label", "member", "default"}
    extra = set(raw) - known
    if extra:
        raise _fail(where, "options", f"unknown key(s) {sorted(extra)}", ", ".join(sorted(known)))
    name = raw.get("name")
    if not isinstance(name, str) or not OPTION_RE.fullmatch(name) or len(name) > 30:
        raise _fail(where, "option name", f"{name!r} is not a valid option name",
                    "lower-case words joined by -, e.g. src-range (at most 30 characters)")
    owhere = f"{where} option --{name}"
    if name in IPTABLES_OPTIONS:
        raise _fail(owhere, "option name", f"--{name} is an option of iptables itself, which "
                    "takes it before any extension sees it", f"a name of the extension's own, "
                    f"e.g. {_own_option_name(name)}")
    otype = raw.get("type")
    if not _is_key(otype, OPTION_TYPES):
        raise _fail(owhere, "type", f"unknown option type {otype!r}", ", ".join(OPTION_TYPES))
    fld = raw.get("field", name.replace("-", "_"))
    if fld == "flags":
        raise _fail(owhere, "field", "'flags' is the kit's own member", "a C identifier other than 'flags'")
    check_ident(fld, owhere, "field")
    opt = Option(name=name, type=otype, field=fld, index=index,
                 help=check_text(raw.get("help", ""), owhere, "help", 200),
                 label=check_text(raw.get("label", name), owhere, "label", 60),
                 invert=check_bool(raw, "invert", owhere),
                 mandatory=check_bool(raw, "mandatory", owhere))
    _option_storage(opt, raw, owhere)
    _option_bounds(opt, raw, owhere)
    _option_default(opt, raw, owhere)
    _check_default_help(opt, owhere)
    return opt


def _option_storage(opt: Option, raw: dict, owhere: str):
    """Buffer length, custom member type and choices of option *opt*."""
    otype = opt.type
    if otype == "string":
        length = raw.get("length", 32)
        if isinstance(length, bool) or not isinstance(length, int) or not 2 <= length <= 256:
            raise _fail(owhere, "length", f"{length!r}", "an integer buffer size 2..256")
        opt.length = length
    if otype == "custom" and "length" in raw:
        length = raw["length"]
        if isinstance(length, bool) or not isinstance(length, int) or not 2 <= length <= 255:
            raise _fail(owhere, "length", f"{length!r}", "an integer buffer size 2..255 (its length is a __u8)")
        opt.length = length
    if "member" in raw:
        if otype != "custom" or raw["member"] not in ("uint8", "uint16", "uint32", "uint64"):
            raise _fail(owhere, "member", f"{raw['member']!r}",
                        "uint8, uint16, uint32 or uint64, on a custom option")
        if "length" in raw:
            raise _fail(owhere, "member", "both member and length", "one of them")
        opt.member = raw["member"]
    if otype == "choice":
        choices = raw.get("choices")
        if (not isinstance(choices, list) or not choices or len(choices) > 255
                or not all(isinstance(c, str) and OPTION_RE.fullmatch(c) for c in choices)
                or len(set(choices)) != len(choices)):
            raise _fail(owhere, "choices", f"{choices!r}", "a list of distinct lower-case words")
        opt.choices = tuple(choices)


def _option_bounds(opt: Option, raw: dict, owhere: str):
    """``min``/``max`` of a uint option, within what libxtables can hold."""
    otype = opt.type
    for key in ("min", "max"):
        if key in raw:
            if not otype.startswith("uint") or isinstance(raw[key], bool) or not isinstance(raw[key], int):
                raise _fail(owhere, key, f"{raw[key]!r}", "an integer bound on a uint option")
            # libxtables keeps bounds in unsigned int (xt_option_entry.min/max)
            top = min(2 ** int(otype[4:]) - 1, 2 ** 32 - 1)
            if not 0 <= raw[key] <= top:
                raise _fail(owhere, key, f"{raw[key]} is out of range", f"0..{top}")
            setattr(opt, "minimum" if key == "min" else "maximum", raw[key])
    if opt.minimum is not None and opt.maximum is not None and opt.minimum > opt.maximum:
        raise _fail(owhere, "min", f"min {opt.minimum} > max {opt.maximum}", "min <= max")


def _option_default(opt: Option, raw: dict, owhere: str):
    """``default``: a value of a uint option within its bounds, or one of a
    choice's names; not on an option that must be given or can be inverted."""
    if "default" not in raw:
        return
    value = raw["default"]
    if opt.mandatory or opt.invert:
        raise _fail(owhere, "default", "a mandatory or invertible option has no default",
                    "drop default, or mandatory/invert")
    if opt.type == "choice":
        if value not in opt.choices:
            raise _fail(owhere, "default", f"{value!r} is not one of the choices", ", ".join(opt.choices))
        opt.default = opt.choices.index(value)
        return
    if not opt.type.startswith("uint"):
        raise _fail(owhere, "default", f"a {opt.type} option has no default",
                    "default only on uint8..uint64 and choice options")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(owhere, "default", f"{value!r} is not an integer", "an integer on a uint option")
    low = opt.minimum if opt.minimum is not None else 0
    high = opt.maximum if opt.maximum is not None else 2 ** int(opt.type[4:]) - 1
    if not low <= value <= high:
        raise _fail(owhere, "default", f"{value} is out of range", f"{low}..{high}")
    opt.default = value


def _check_default_help(opt: Option, owhere: str):
    """A help text does not state a declared default itself: ``help_text`` does."""
    if opt.default is not None and HELP_DEFAULT_RE.search(opt.help):
        raise _fail(owhere, "help", f"{opt.help!r} states the default itself",
                    f"drop it from help: the kit appends \"(default {opt.default_word})\" from default")


DEFINITION_KEYS = {"kind", "name", "summary", "families", "revision", "options", "private", "fields", "hooks",
                   "overrides_in_tree", "verdict", "tables", "author", "params", "test",
                   "catalog_only", "flags_type", "invert_shift", "info_name", "netlink", "events"}


def validate(raw: dict, path: Path | None = None, *, kernel_modules=None) -> Extension:
    """Validate a parsed definition and return the Extension it describes."""
    where = str(path) if path else "definition"
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: not a TOML table")
    extra = set(raw) - DEFINITION_KEYS
    if extra:
        raise _fail(where, "keys", f"unknown key(s) {sorted(extra)}", ", ".join(sorted(DEFINITION_KEYS)))
    ext = _identity(raw, path, where)
    _validate_options(ext, raw, where)
    _validate_private(ext, raw, where)
    if ext.kind == "hook":
        _validate_hook(ext, raw, where)
        ext.netlink = _validate_netlink(ext, raw, where)
    else:
        if "hooks" in raw:
            raise _fail(where, "hooks", f"a {ext.kind} has no hooks of its own", "remove [[hooks]]")
        for key in ("netlink", "events"):
            if key in raw:
                raise _fail(where, key, f"a {ext.kind} sends no netlink events",
                            "[netlink] and [[events]] only in hook modules")
    if ext.kind == "target":
        _validate_target(ext, raw, where)
    _validate_params(ext, raw, where)
    _check_generated_names(ext, where)
    _check_custom_functions(ext, path, where)
    check_collision(ext, kernel_modules, where)
    if ext.kind != "hook" and ext.info_size > INFO_MAX:
        raise _fail(where, "fields", f"the info struct has {ext.info_size} bytes",
                    f"at most {INFO_MAX} (xt_entry_match/target sizes are 16-bit)")
    return ext


def _identity(raw: dict, path: Path | None, where: str) -> Extension:
    """The Extension with what identifies it: kind, name, families, revision,
    and the plain fields (summary, author, test, info_name, flags_type)."""
    kind = raw.get("kind")
    if kind not in KINDS:
        raise _fail(where, "kind", f"unknown kind {kind!r}", ", ".join(KINDS))
    name = check_name(raw.get("name"), where)
    if kind != "target" and name != name.lower():
        raise _fail(where, "name", f"{name!r} has capitals", "lower case for matches and hooks "
                    "(capitals are the convention for targets)")
    summary = check_text(raw.get("summary", ""), where, "summary", 200)
    fams = raw.get("families", ["ipv4", "ipv6"] if kind != "hook" else ["ipv4"])
    if not isinstance(fams, list) or not fams:
        raise _fail(where, "families", f"{fams!r}", "a non-empty list of " + ", ".join(FAMILIES))
    allowed = XT_FAMILIES if kind != "hook" else FAMILIES
    families = [check_family(f, allowed, where) for f in fams]
    if len(set(families)) != len(families):
        raise _fail(where, "families", "duplicate family", "each family once")
    revision = raw.get("revision", 0)
    if isinstance(revision, bool) or not isinstance(revision, int) or not 0 <= revision <= 255:
        raise _fail(where, "revision", f"{revision!r}", "an integer 0..255")
    ext = Extension(kind=kind, name=name, summary=summary, families=families, path=path,
                    revision=revision, raw=raw)
    ext.overrides_in_tree = check_bool(raw, "overrides_in_tree", where)
    ext.catalog_only = check_bool(raw, "catalog_only", where)
    ext.author = check_text(raw.get("author", "nflab"), where, "author", 100)
    # [test]: free-form values for the extension's own test suite
    ext.test = raw.get("test", {})
    if not isinstance(ext.test, dict):
        raise _fail(where, "test", f"{ext.test!r} is not a table", "[test] key = value ...")
    info_name = raw.get("info_name", "")
    if info_name != "":                 # false or 0 is no name either: check_ident refuses it
        check_ident(info_name, where, "info_name")
    ext.info_name = info_name
    ext.flags_type = raw.get("flags_type", "__u8")
    if ext.flags_type not in ("__u8", "__u16", "__u32", "none"):
        raise _fail(where, "flags_type", f"{ext.flags_type!r}", "__u8, __u16, __u32, none")
    return ext


def _validate_options(ext: Extension, raw: dict, where: str):
    """The iptables options, and whether they fit the flags word."""
    opts_raw = raw.get("options", [])
    if ext.kind == "hook" and opts_raw:
        raise _fail(where, "options", "hooks take no iptables options", "use [[params]] for module parameters")
    if not isinstance(opts_raw, list):
        raise _fail(where, "options", "not a list", "[[options]] tables")
    ext.options = [_option(o, i, where) for i, o in enumerate(opts_raw)]
    seen = set()
    for opt in ext.options:
        if opt.name in seen or opt.field in seen:
            raise _fail(where, "options", f"duplicate option or field {opt.name!r}", "unique names")
        seen.update({opt.name, opt.field})
    if not ext.has_flags:
        for opt in ext.options:
            if opt.invert or opt.type in ("flag", "iprange", "host"):
                raise _fail(where, "flags_type", f"\"none\" cannot record --{opt.name} ({opt.type}"
                            f"{', invertible' if opt.invert else ''})",
                            "a flags type, or only non-invertible value options")
            if opt.default not in (None, 0):
                raise _fail(where, "flags_type", f"\"none\" cannot tell --{opt.name}'s default "
                            "from a given value (it is not the first choice or 0)",
                            "a flags type, or a default that is the first choice or 0")
    bits = {"__u8": 8, "__u16": 16, "__u32": 32, "none": 64}[ext.flags_type]
    ext.invert_shift = raw.get("invert_shift", bits // 2)
    if isinstance(ext.invert_shift, bool) or not isinstance(ext.invert_shift, int):
        raise _fail(where, "invert_shift", f"{ext.invert_shift!r}", "an integer")
    if len(ext.options) > ext.invert_shift or ext.invert_shift * 2 > bits:
        raise _fail(where, "options", f"{len(ext.options)} options do not fit {ext.flags_type} flags "
                    f"with invert_shift {ext.invert_shift}", "fewer options or flags_type = \"__u32\"")


def _validate_private(ext: Extension, raw: dict, where: str):
    """Kernel-only members: new C identifiers, none an option's name or field."""
    privs = raw.get("private", [])
    if not isinstance(privs, list):
        raise _fail(where, "private", "not a list", "[[private]] name=... type=...")
    seen = {n for opt in ext.options for n in (opt.name, opt.field)}
    for p in privs:
        if (not isinstance(p, dict) or not _is_key(p.get("type"), PRIVATE_TYPES)
                or not isinstance(p.get("name"), str) or p["name"] in seen or p["name"] == "flags"):
            raise _fail(where, "private", f"{p!r}", "name = a new C identifier, type = " + ", ".join(PRIVATE_TYPES))
        check_ident(p["name"], where, "private name")
        check_text(p.get("comment", ""), where, "private comment", 200)
        seen.add(p["name"])
    ext.private = privs
    ext.fields = _fields(raw.get("fields", []), ext.kind, where, seen)


def _validate_target(ext: Extension, raw: dict, where: str):
    verdict = raw.get("verdict", "XT_CONTINUE")
    if verdict not in TARGET_VERDICTS:
        raise _fail(where, "verdict", f"{verdict!r}", ", ".join(TARGET_VERDICTS))
    ext.verdict = verdict
    tables = raw.get("tables", [])
    if not isinstance(tables, list) or any(t not in ("raw", "mangle", "nat", "filter", "security") for t in tables):
        raise _fail(where, "tables", f"{tables!r}", "a list of raw, mangle, nat, filter, security")
    ext.tables = tables


def _validate_params(ext: Extension, raw: dict, where: str):
    """Module parameters: distinct C identifiers of a kernel param type, defaults that fit."""
    params = raw.get("params", [])
    if not isinstance(params, list):
        raise _fail(where, "params", "not a list", "[[params]] name=... type=... default=...")
    pnames = set()
    for p in params:
        if (not isinstance(p, dict) or not isinstance(p.get("name"), str)
                or p.get("type") not in ("int", "uint", "bool", "charp") or p["name"] in pnames):
            raise _fail(where, "params", f"{p!r}", "name = a new C identifier, type = int, uint, bool or charp")
        check_ident(p["name"], where, "params name")
        pnames.add(p["name"])
        check_text(p.get("help", ""), where, "params.help", 200)
        _check_param_default(p, where)
    ext.params = params
    _check_ingress_dev(ext, where)


def _check_ingress_dev(ext: Extension, where: str):
    """The netdev points attach to the device ``ingress_dev`` names (hook.c.j2 compares
    it with dev->name): declared by the definition, it is a charp."""
    own = next((p for p in ext.params if p["name"] == "ingress_dev"), None)
    netdev = any(h.family == "netdev" for h in ext.hooks)
    if own is not None and netdev and own["type"] != "charp":
        raise _fail(where, "params ingress_dev type", f"{own['type']!r}: ingress_dev names the "
                    "device the netdev INGRESS points attach to", 'type = "charp" (a device '
                    'name such as default = "eth1"), or drop [[params]] ingress_dev for "eth0"')


def _check_custom_functions(ext: Extension, path: Path | None, where: str):
    """A `custom` option is parsed and printed by functions of the extension's own
    plugin template (libxt_NAME.c.j2 beside ext.toml); without them the plugin
    cannot compile, so the definition is refused naming what is missing. A
    template that fills the ``dump`` block prints every option itself (a stock
    twin's exact text) and needs no print functions."""
    custom = [o for o in ext.options if o.type == "custom"]
    if not custom:
        return
    tpl = path.parent / f"{ext.plugin}.c.j2" if path else None
    text = tpl.read_text() if tpl is not None and tpl.is_file() else ""
    needed = ("parse",) if re.search(r"{%-?\s*block\s+dump\s*-?%}", text) else ("parse", "print")
    missing = [f"{ext.prefix}_{what}_{o.ident}()" for o in custom for what in needed
               if not re.search(rf"\b{ext.prefix}_{what}_{o.ident}\s*\(", text)]
    if missing:
        place = str(tpl) if tpl is not None else f"{ext.plugin}.c.j2 beside ext.toml"
        raise _fail(where, "options", f"--{custom[0].name} is a custom option, but {place} does "
                    f"not define {', '.join(missing)}",
                    f"a {ext.plugin}.c.j2 (extends libxt.c.j2) whose helpers block defines "
                    "<prefix>_parse_<option>(cb, info, family) and <prefix>_print_<option>(info, "
                    "family, save) for each custom option (no print functions when it fills the "
                    "dump block), or another option type")


def _fields(fields, kind: str, where: str, seen: set) -> list:
    """[[fields]]: members the plugin's custom parse functions fill themselves."""
    if not isinstance(fields, list) or (fields and kind == "hook"):
        raise _fail(where, "fields", f"{fields!r}", "[[fields]] name=... type=... on a match or target")
    for f in fields:
        if (not isinstance(f, dict) or set(f) - {"name", "type", "count", "comment", "compared"}
                or f.get("type") not in FIELD_TYPES or not isinstance(f.get("name"), str)
                or f["name"] in seen or f["name"] == "flags" or not isinstance(f.get("compared", True), bool)):
            raise _fail(where, "fields", f"{f!r}", "name = a new C identifier, type = "
                        + ", ".join(FIELD_TYPES) + f", optional count = 1..{FIELD_COUNT_MAX}, comment, "
                        "compared = false (outside what iptables compares and lists)")
        check_ident(f["name"], where, "fields name")
        count = f.get("count", 0)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= FIELD_COUNT_MAX:
            raise _fail(where, f"fields {f['name']} count", f"{count!r}", f"an integer 1..{FIELD_COUNT_MAX}")
        check_text(f.get("comment", ""), where, "fields comment", 200)
        seen.add(f["name"])
    return fields


def _check_param_default(p: dict, where: str):
    if "default" not in p:
        return
    value, kind = p["default"], p["type"]
    ranges = {"int": (INT_MIN, INT_MAX), "uint": (0, 2**32 - 1)}
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "charp":
        ok = isinstance(value, str) and check_text(value, where, "params.default", 200) is not None
    else:
        lo, hi = ranges[kind]
        ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
    if not ok:
        raise _fail(where, f"params {p['name']} default", f"{value!r} does not fit {kind}",
                    {"bool": "true or false", "charp": "a string"}.get(kind, f"an integer in {ranges.get(kind)}"))


def _check_generated_names(ext: Extension, where: str):
    """Members and constants derived from different options must not collide."""
    members = [m.name for m in ext.members]
    dup = sorted({m for m in members if members.count(m) > 1})
    if dup:
        raise _fail(where, "options", f"two options generate the struct member {dup[0]}",
                    "option names and fields whose derived member names differ")
    seen = {}
    for name, origin in ext.c_names():
        if name in seen and seen[name] != origin:
            raise _fail(where, "options", f"{origin} and {seen[name]} both generate {name}",
                        "option names and fields whose derived C names differ")
        seen.setdefault(name, origin)


def _check_hook_name(ext: Extension, where: str):
    """A hook module's C symbols are its name and a suffix (<name>_hook, <name>_net):
    a name that is a kernel namespace would define the kernel's own (nf_hook)."""
    name = ext.lname
    if name in KERNEL_PREFIXES or name.startswith(NETFILTER_NAMESPACES):
        raise _fail(where, "name", f"{ext.name!r} would generate C symbols such as {name}_hook "
                    f"and {name}_net, which are (or may be) the kernel's own",
                    f"a name that is not a kernel prefix ({', '.join(sorted(KERNEL_PREFIXES)[:6])}"
                    f"... or starts with {', '.join(NETFILTER_NAMESPACES)}), e.g. my{name}")


def _validate_hook(ext: Extension, raw: dict, where: str):
    _check_hook_name(ext, where)
    hooks = raw.get("hooks")
    if not isinstance(hooks, list) or not hooks:
        raise _fail(where, "hooks", "a hook module needs at least one [[hooks]] entry",
                    "[[hooks]] hook = \"PRE_ROUTING\" priority = -175 family = \"ipv4\"")
    if len(hooks) > HOOK_POINTS_MAX:
        raise _fail(where, "hooks", f"{len(hooks)} [[hooks]] entries, more than {HOOK_POINTS_MAX}",
                    f"at most {HOOK_POINTS_MAX} hook points (the generated C numbers them in a u8)")
    points = []
    for i, h in enumerate(hooks):
        hwhere = f"{where} hooks[{i}]"
        if not isinstance(h, dict):
            raise _fail(hwhere, "hooks", "not a table", "hook, priority, family")
        extra = set(h) - {"hook", "priority", "family", "label"}
        if extra:
            raise _fail(hwhere, "hooks", f"unknown key(s) {sorted(extra)}", "hook, priority, family, label")
        family = check_family(h.get("family", ext.families[0]), FAMILIES, hwhere)
        if family not in ext.families:
            raise _fail(hwhere, "family", f"{family} is not in the extension's families", ", ".join(ext.families))
        hook = check_hook(h.get("hook"), family, hwhere)
        prio = check_priority(h.get("priority"), hwhere)
        label = check_text(h.get("label", ""), hwhere, "label", 40)
        points.append(HookPoint(family, hook, prio, label))
    keys = [(p.family, p.hook, p.priority) for p in points]
    if len(set(keys)) != len(keys):
        raise _fail(where, "hooks", "the same (family, hook, priority) twice", "distinct hook points")
    ext.hooks = points


def _validate_netlink(ext: Extension, raw: dict, where: str) -> Netlink | None:
    """[netlink] (family, group, version) and [[events]]: the generic netlink family
    a hook module reports packets through, and the fields of its events."""
    if "netlink" not in raw and "events" not in raw:
        return None
    section = raw.get("netlink", {})
    if not isinstance(section, dict):
        raise _fail(where, "netlink", "not a table", "[netlink] family = ..., group = ..., version = 1")
    extra = set(section) - {"family", "group", "version"}
    if extra:
        raise _fail(where, "netlink", f"unknown key(s) {sorted(extra)}", "family, group, version")
    names = {}
    for key, default in (("family", f"nflab_{ext.lname}"), ("group", "events")):
        value = section.get(key, default)
        if not isinstance(value, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", value) \
                or len(value) > GENL_NAME_MAX:
            raise _fail(where, f"netlink.{key}", f"{value!r} cannot name a generic netlink {key}",
                        f"lower-case letters, digits and _, at most {GENL_NAME_MAX} characters "
                        "(GENL_NAMSIZ)")
        names[key] = value
    version = section.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= 255:
        raise _fail(where, "netlink.version", f"{version!r}", "an integer 1..255")
    events = raw.get("events")
    if not isinstance(events, list) or not events:
        raise _fail(where, "events", "a netlink family needs at least one [[events]] field",
                    '[[events]] name = "dport" type = "be16" source = "dport"')
    if len(events) > EVENTS_MAX:
        raise _fail(where, "events", f"{len(events)} fields", f"at most {EVENTS_MAX}")
    kit = [name for name, _, _ in KIT_ATTRS] + [name for name, _ in COUNTERS]
    attrs = [NlAttr(name, typ, i, "kit", help=text) for i, (name, typ, text) in enumerate(KIT_ATTRS, 1)]
    attrs += [NlAttr(name, "u64", i, "counter", help=text)
              for i, (name, text) in enumerate(COUNTERS, len(attrs) + 1)]
    seen = {}
    for i, ev in enumerate(events):
        attr = _event(ev, len(attrs) + 1, f"{where} events[{i}]", ext.families)
        if attr.name in kit or attr.name in seen:
            raise _fail(f"{where} events[{i}]", "name", f"{attr.name!r} is used twice or by the kit",
                        "a name other than " + ", ".join(kit + sorted(seen)))
        if (attr.source, attr.type) in seen.values():
            raise _fail(f"{where} events[{i}]", "source", f"{attr.source} as {attr.type} is "
                        "reported twice", "each source once per type")
        seen[attr.name] = (attr.source, attr.type)
        attrs.append(attr)
    return Netlink(names["family"], names["group"], version, attrs)


def _event(raw, attr_id: int, where: str, families: list) -> NlAttr:
    if not isinstance(raw, dict):
        raise _fail(where, "events", "not a table", "name, type, source, help")
    extra = set(raw) - {"name", "type", "source", "help"}
    if extra:
        raise _fail(where, "events", f"unknown key(s) {sorted(extra)}", "name, type, source, help")
    name = check_ident(raw.get("name"), where, "name")
    source = raw.get("source", name)
    if not _is_key(source, EVENT_SOURCES):
        raise _fail(where, "source", f"unknown source {source!r}", ", ".join(EVENT_SOURCES))
    typ = raw.get("type")
    if not _is_key(typ, EVENT_TYPES):
        raise _fail(where, "type", f"unknown type {typ!r}", ", ".join(EVENT_TYPES))
    if typ not in EVENT_SOURCES[source]:
        raise _fail(where, "type", f"{source} cannot be reported as {typ}",
                    " or ".join(EVENT_SOURCES[source]))
    family = EVENT_TYPE_FAMILY.get(typ)
    if family and family not in families:
        raise _fail(where, "type", f"{typ} needs {family} packets, the module sees "
                    + ", ".join(families), f"{family} in the extension's families, or another type")
    text = check_text(raw.get("help", ""), where, "help", 200)
    return NlAttr(name, typ, attr_id, "event", source, text)


def xtables_modules(ext: Extension) -> list[str]:
    """The modules x_tables asks for when a rule names *ext* (ipt_NAME, ip6t_NAME per
    family, as xt_request_find_match/target do); none for a hook module."""
    # the stock targets are all upper case, its matches all lower case (ipt_TTL is the
    # TTL target, ipt_ttl the ttl match): a lower-case target asks for a module that
    # serves only a match of its name
    if ext.kind == "hook" or (ext.kind == "target" and ext.name == ext.name.lower()):
        return []
    return [f"{'ipt' if f == 'ipv4' else 'ip6t'}_{ext.name}" for f in ext.families]


def check_collision(ext: Extension, kernel_modules=None, where: str | None = None):
    """Refuse *ext* when the stock kernel ships its .ko or serves its xtables name
    (*kernel_modules*: the module and alias names of a known kernel, else the
    static lists), unless it says overrides_in_tree = true; and refuse the flag
    when nothing is overridden."""
    where = where or str(ext.path or "definition")
    names = set(IN_TREE_MODULES) | STOCK_XT_NAMES | set(kernel_modules or ())
    lower = {m.lower() for m in names}
    served = [m for m in xtables_modules(ext) if m in names]
    collides = ext.module in names or (ext.kind == "hook" and ext.module.lower() in lower)
    if (collides or served) and not ext.overrides_in_tree:
        what = (f"would build {ext.module}.ko, which the kernel already ships" if collides else
                f"is the {ext.kind} the kernel already serves ({', '.join(served)})")
        raise _fail(where, "name", f"{ext.name!r} {what}", "another name, or overrides_in_tree "
                    "= true to replace the in-tree module on purpose")
    if ext.overrides_in_tree and not (collides or served):
        raise _fail(where, "overrides_in_tree", f"{ext.module} is not an in-tree module and "
                    f"the kernel serves no {ext.kind} {ext.name!r}", "remove overrides_in_tree")


# ---- loading --------------------------------------------------------------

def catalog_dirs() -> list[Path]:
    """The kit's catalog, then the folders of ``$NFLAB_EXTRA_CATALOG`` (':'-separated)."""
    dirs = [CATALOG]
    for item in os.environ.get(EXTRA_CATALOG_ENV, "").split(os.pathsep):
        if not item.strip():
            continue
        path = Path(item).expanduser().resolve()
        if not path.is_dir():
            raise SpecError(f"{EXTRA_CATALOG_ENV}: {item!r} is not a directory",
                            hint="point it (or --extensions-dir) at a folder holding <name>/ext.toml")
        if path not in dirs:
            dirs.append(path)
    return dirs


def definition_path(name: str) -> Path:
    """``<catalog>/<name>/ext.toml`` in the first catalog folder that has it (the kit's
    catalog when none has: the caller reports it missing)."""
    check_name(name, "--name")
    found = [d / name / "ext.toml" for d in catalog_dirs() if (d / name / "ext.toml").is_file()]
    if len(found) > 1:
        raise SpecError(f"--name: extension {name!r} is defined twice: "
                        + ", ".join(str(f) for f in found),
                        hint=f"rename one of them (folder and name in ext.toml); {EXTRA_CATALOG_ENV} "
                             "folders add extensions, they do not replace the kit's")
    return found[0] if found else CATALOG / name / "ext.toml"


def load(name: str) -> Extension:
    """Load and validate a catalog extension by name."""
    path = definition_path(name)
    if not path.is_file():
        raise SpecError(f"--name: no extension {name!r} in the catalog",
                        hint=f"valid: {', '.join(catalog_names(include_hidden=True)) or 'none'}; "
                             "`invoke new-module` creates one")
    return load_file(path)


def load_file(path: Path) -> Extension:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from exc
    ext = validate(raw, Path(path))
    if ext.name != Path(path).parent.name:
        raise _fail(str(path), "name", f"{ext.name!r} differs from its folder {Path(path).parent.name!r}",
                    "the folder name")
    return ext


def catalog_names(include_hidden=False) -> list:
    names = []
    for folder in catalog_dirs():
        if not folder.is_dir():
            continue
        for d in sorted(folder.iterdir()):
            if (d / "ext.toml").is_file():
                if not include_hidden:
                    try:
                        raw = tomllib.loads((d / "ext.toml").read_text())
                    except tomllib.TOMLDecodeError:
                        continue
                    if raw.get("catalog_only") is True:   # else load() names the error
                        continue
                names.append(d.name)
    return list(dict.fromkeys(names))
