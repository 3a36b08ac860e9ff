"""Extension definitions: loading, derived names, and the bad-input table (issue 7 §1).

Every rejected row must raise SpecError whose message names the field and
whose hint lists what is valid; nothing here touches a kernel or compiler.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from kmods import render, spec
from ground.errors import NflabError, SpecError
from tests.conftest import HOOK_RAW, MATCH_RAW, TARGET_RAW


def _hook(**kw):
    raw = copy.deepcopy(HOOK_RAW)
    raw["hooks"][0].update(kw)
    return raw


def _match(**kw):
    raw = copy.deepcopy(MATCH_RAW)
    raw.update(kw)
    return raw


def _opt(**kw):
    raw = copy.deepcopy(MATCH_RAW)
    raw["options"][0].update(kw)
    return raw


def _opts(*opts):
    raw = copy.deepcopy(MATCH_RAW)
    raw["options"] = list(opts)
    return raw


TOO_LONG = "a" * (spec.NAME_MAX + 1)

# (id, raw definition, field the message must name, text the "valid:" hint must contain)
BAD = [
    # names that are not C identifiers / path tricks / shell metacharacters / too long
    ("name-digit-first", _match(name="1range"), "name", "letters, digits"),
    ("name-slash", _match(name="a/b"), "name", "C identifier"),
    ("name-dotdot", _match(name=".."), "name", "C identifier"),
    ("name-dotdot-slash", _match(name="../x"), "name", "C identifier"),
    ("name-embedded-dotdot", _match(name="a..b"), "name", "C identifier"),
    ("name-dot-hidden", _match(name=".hidden"), "name", "C identifier"),
    ("name-semicolon", _match(name="x;rm"), "name", "letters, digits"),
    ("name-subshell", _match(name="$(id)"), "name", "letters, digits"),
    ("name-backtick", _match(name="a`id`"), "name", "letters, digits"),
    ("name-space", _match(name="a b"), "name", "letters, digits"),
    ("name-pipe", _match(name="a|b"), "name", "letters, digits"),
    ("name-dash", _match(name="ip-range"), "name", "letters, digits"),
    ("name-quote", _match(name='a"b'), "name", "letters, digits"),
    ("name-nonascii", _match(name="iprängé"), "name", "letters, digits"),
    ("name-too-long", _match(name=TOO_LONG), "name", f"at most {spec.NAME_MAX}"),
    ("name-empty", _match(name=""), "name", "C identifier"),
    ("name-not-string", _match(name=7), "name", "C identifier"),
    ("name-capitals-match", _match(name="IpRange"), "name", "lower case"),
    ("name-collides-in-tree", _match(name="mark"), "name", "overrides_in_tree"),
    ("overrides-not-in-tree", _match(overrides_in_tree=True), "overrides_in_tree",
     "remove overrides_in_tree"),
    # kind / family / hook
    ("kind-unknown", _match(kind="module"), "kind", "hook, match, target"),
    ("kind-missing", {k: v for k, v in MATCH_RAW.items() if k != "kind"}, "kind",
     "hook, match, target"),
    ("family-unknown", _match(families=["ipx"]), "family", "ipv4, ipv6"),
    ("family-netdev-match", _match(families=["netdev"]), "family", "ipv4, ipv6"),
    ("family-empty", _match(families=[]), "families", "ipv4"),
    ("family-duplicate", _match(families=["ipv4", "ipv4"]), "families", "each family once"),
    ("hook-unknown", _hook(hook="PREROUTING"), "hook", "PRE_ROUTING, LOCAL_IN, FORWARD"),
    ("hook-missing", _hook(hook=None), "hook", "PRE_ROUTING"),
    ("hook-ingress-ipv4", _hook(hook="INGRESS"), "family", "netdev"),
    ("hook-family-unknown", _hook(family="inet"), "family", "ipv4, ipv6, netdev"),
    ("hook-none", {**copy.deepcopy(HOOK_RAW), "hooks": []}, "hooks", "[[hooks]]"),
    # priority
    ("priority-word", _hook(priority="abc"), "priority", "an integer in [-2147483648, 2147483647]"),
    ("priority-float", _hook(priority=1.5), "priority", "an integer"),
    ("priority-bool", _hook(priority=True), "priority", "an integer"),
    ("priority-hex-string", _hook(priority="0x10"), "priority", "an integer"),
    ("priority-too-big", _hook(priority=2**31), "priority", "[-2147483648, 2147483647]"),
    ("priority-too-small", _hook(priority=-(2**31) - 1), "priority", "[-2147483648, 2147483647]"),
    ("priority-huge-string", _hook(priority="99999999999"), "priority", "[-2147483648, 2147483647]"),
    ("priority-missing", _hook(priority=None), "priority", "an integer"),
    # options
    ("option-type-unknown", _opt(type="float"), "type", "flag, uint8, uint16, uint32"),
    ("option-type-missing", _opts({"name": "x"}), "type", "flag, uint8"),
    ("option-duplicate-name", _opts({"name": "a", "type": "flag"}, {"name": "a", "type": "uint8"}),
     "options", "unique"),
    ("option-duplicate-field", _opts({"name": "a", "type": "flag", "field": "x"},
                                     {"name": "b", "type": "uint8", "field": "x"}),
     "options", "unique"),
    ("option-name-capital", _opt(name="Min"), "option name", "lower-case words"),
    ("option-name-underscore", _opt(name="min_len"), "option name", "lower-case words"),
    ("option-name-shell", _opt(name="a;b"), "option name", "lower-case words"),
    ("option-name-quote", _opt(name='a"b'), "option name", "lower-case words"),
    ("option-name-too-long", _opt(name="a" * 31), "option name", "at most 30"),
    ("option-field-flags", _opt(field="flags"), "field", "other than 'flags'"),
    ("option-field-not-ident", _opt(field="a-b"), "field", "C identifier"),
    ("option-unknown-key", _opt(colour="red"), "options", "help"),
    ("option-help-control-char", _opt(help="bell\x07"), "help", "printable text"),
    ("option-help-nul", _opt(help="a\x00b"), "help", "printable text"),
    ("option-help-too-long", _opt(help="x" * 201), "help", "at most 200"),
    ("option-help-not-string", _opt(help=["a"]), "help", "string"),
    ("option-invert-not-bool", _opt(invert="yes"), "invert", "true or false"),
    ("option-min-on-flag", _opts({"name": "a", "type": "flag", "min": 1}), "min", "uint"),
    ("option-string-length", _opts({"name": "a", "type": "string", "length": 1}), "length", "2..256"),
    ("option-choice-empty", _opts({"name": "a", "type": "choice", "choices": []}), "choices",
     "distinct lower-case words"),
    ("option-choice-dup", _opts({"name": "a", "type": "choice", "choices": ["x", "x"]}), "choices",
     "distinct"),
    ("options-on-hook", {**copy.deepcopy(HOOK_RAW), "options": MATCH_RAW["options"]}, "options",
     "[[params]]"),
    # defaults: within bounds, a choice by name, never on mandatory/invertible
    # options, and without flags only one that needs no flag to tell
    ("default-out-of-bounds", _opts({"name": "n", "type": "uint8", "max": 15, "default": 16}), "default",
     "0..15"),
    ("default-not-a-choice", _opts({"name": "c", "type": "choice", "choices": ["a", "b"], "default": "z"}),
     "default", "a, b"),
    ("default-on-string", _opts({"name": "s", "type": "string", "default": 1}), "default", "uint8..uint64"),
    ("default-bool", _opts({"name": "n", "type": "uint8", "default": True}), "default", "uint option"),
    ("default-mandatory", _opts({"name": "n", "type": "uint8", "mandatory": True, "default": 1}), "default",
     "drop default"),
    ("default-invertible", _opts({"name": "n", "type": "uint8", "invert": True, "default": 1}), "default",
     "drop default"),
    ("default-nonzero-without-flags", {**_opts({"name": "n", "type": "uint16", "default": 7}),
                                       "flags_type": "none"}, "flags_type", "first choice or 0"),
    ("options-too-many", _opts(*({"name": f"o{i}", "type": "flag"} for i in range(5))), "options",
     "flags_type"),
    # other fields
    ("summary-control-char", _match(summary="a\x1bb"), "summary", "printable text"),
    ("summary-too-long", _match(summary="s" * 201), "summary", "at most 200"),
    ("revision-negative", _match(revision=-1), "revision", "0..255"),
    ("revision-too-big", _match(revision=256), "revision", "0..255"),
    ("unknown-top-key", _match(colour="red"), "keys", "kind"),
    ("verdict-unknown", {**copy.deepcopy(TARGET_RAW), "verdict": "NF_STOLEN"}, "verdict", "NF_ACCEPT"),
    ("private-bad-type", _match(private=[{"name": "p", "type": "float"}]), "private", "kptr"),
    ("fields-too-big", _match(fields=[{"name": "d", "type": "uint32", "count": 20000}]), "fields",
     "xt_entry_match"),
    ("params-bad-type", _match(params=[{"name": "p", "type": "float"}]), "params", "charp"),
]


@pytest.mark.parametrize("raw,field,valid", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_definition_names_field_and_valid_values(raw, field, valid):
    with pytest.raises(SpecError) as info:
        spec.validate(raw, Path("x/ext.toml"))
    err = info.value
    assert err.exit_code == 2
    assert err.message.startswith("x/ext.toml"), err.message
    assert re.search(rf"\b{re.escape(field)}\b", err.message), f"field {field!r} not named: {err}"
    assert err.hint and err.hint.startswith("valid: "), f"no list of valid values: {err}"
    assert valid in err.hint, err.hint
    assert "\n" not in str(err).strip(), "one line only"


@pytest.mark.parametrize("good", [
    MATCH_RAW, TARGET_RAW, HOOK_RAW,
    _hook(priority="-175"), _hook(priority=" 42 "), _hook(priority=-(2**31)), _hook(priority=2**31 - 1),
    _hook(hook="nf_inet_local_in"), _match(name="a" * spec.NAME_MAX),
    _match(name="mark", overrides_in_tree=True),
    {**copy.deepcopy(HOOK_RAW), "families": ["netdev"],
     "hooks": [{"hook": "INGRESS", "priority": 0, "family": "netdev"}]},
], ids=lambda r: f"{r['kind']}-{r['name']}")
def test_valid_definitions_are_accepted(good):
    ext = spec.validate(copy.deepcopy(good))
    assert ext.name == good["name"] and ext.kind == good["kind"]


def _points(n):
    return {**copy.deepcopy(HOOK_RAW),
            "hooks": [{"hook": "PRE_ROUTING", "priority": i, "family": "ipv4"} for i in range(n)]}


def test_hook_points_fit_the_generated_u8_index():
    assert len(spec.validate(_points(spec.HOOK_POINTS_MAX)).hooks) == 256
    with pytest.raises(SpecError) as info:
        spec.validate(_points(spec.HOOK_POINTS_MAX + 1))
    assert "hooks: 257 [[hooks]] entries, more than 256" in info.value.message


def test_priority_string_is_converted_to_int():
    assert spec.check_priority("-175") == -175
    assert spec.validate(_hook(priority="12")).hooks[0].priority == 12


@pytest.mark.parametrize("value", ["abc", "1e3", "", "--5", "0x10", None, 1.0, 2**31, -(2**31) - 1])
def test_check_priority_cli_form(value):
    with pytest.raises(SpecError) as info:
        spec.check_priority(value, "--priority")
    assert info.value.message.startswith("--priority: ")
    assert "2147483647" in info.value.hint


@pytest.mark.parametrize("value", ["PREROUTING", "", "pre-routing", "EGRESS", 3, None])
def test_check_hook_lists_all_hooks(value):
    with pytest.raises(SpecError) as info:
        spec.check_hook(value, "ipv4", "--hook")
    assert info.value.message.startswith("--hook: ")
    for hook in spec.HOOKS:
        assert hook in info.value.hint


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "x;id", "$(id)", "", TOO_LONG])
def test_check_name_cli_form(name):
    with pytest.raises(SpecError) as info:
        spec.check_name(name, "--name")
    assert info.value.message.startswith("--name: ")
    assert info.value.hint.startswith("valid: ")


@pytest.mark.parametrize("name", ["iprange\n", "foo\n"])
def test_check_name_refuses_trailing_newline(name):
    with pytest.raises(SpecError):
        spec.check_name(name, "--name")


@pytest.mark.parametrize("key,value", [("name", "min-len\n"), ("field", "min_len\n")])
def test_option_identifiers_refuse_trailing_newline(key, value):
    with pytest.raises(SpecError):
        spec.validate(_opt(**{key: value}))


def test_load_refuses_path_names_before_touching_files():
    for name in ("../x", "../../etc/passwd", "/etc", "iprange/../iprange"):
        with pytest.raises(SpecError) as info:
            spec.load(name)
        assert "--name" in info.value.message


def test_load_unknown_name_lists_catalog():
    with pytest.raises(SpecError) as info:
        spec.load("nosuchext")
    assert "iprange" in info.value.hint


def test_load_file_name_must_match_folder(tmp_path):
    d = tmp_path / "other"
    d.mkdir()
    (d / "ext.toml").write_text('kind = "match"\nname = "nfltest"\n')
    with pytest.raises(SpecError) as info:
        spec.load_file(d / "ext.toml")
    assert "folder" in info.value.message


def test_load_file_bad_toml_is_spec_error(tmp_path):
    d = tmp_path / "nfltest"
    d.mkdir()
    (d / "ext.toml").write_text('kind = "match\n')
    with pytest.raises(SpecError) as info:
        spec.load_file(d / "ext.toml")
    assert "not valid TOML" in info.value.message


def test_catalog_has_iprange_and_every_entry_loads():
    names = spec.catalog_names(include_hidden=True)
    assert "iprange" in names
    assert set(spec.catalog_names()) <= set(names)
    for n in names:
        assert isinstance(spec.load(n), spec.Extension)


def test_iprange_definition():
    ext = spec.load("iprange")
    assert (ext.kind, ext.name, ext.revision) == ("match", "iprange", 1)
    assert ext.families == ["ipv4", "ipv6"]
    assert ext.module == "xt_iprange"
    assert ext.plugin == "libxt_iprange"
    assert ext.struct == "xt_iprange_mtinfo"      # the in-tree struct name
    assert [o.name for o in ext.options] == ["src-range", "dst-range"]
    assert all(o.invert for o in ext.options)
    assert ext.overrides_in_tree


def test_iprange_struct_layout_matches_in_tree():
    """include/uapi/linux/netfilter/xt_iprange.h: src_min, src_max, dst_min, dst_max, flags."""
    ext = spec.load("iprange")
    assert [(m.ctype, m.name) for m in ext.members] == [
        ("union nf_inet_addr", "src_min"), ("union nf_inet_addr", "src_max"),
        ("union nf_inet_addr", "dst_min"), ("union nf_inet_addr", "dst_max"),
        ("__u8", "flags"), ("__u8", "__pad0"),     # in-tree: 3 unnamed tail bytes
    ]
    assert ext.info_size == 68
    assert ext.userspace_size == 68
    # IPRANGE_SRC 1<<0, IPRANGE_DST 1<<1, IPRANGE_SRC_INV 1<<4, IPRANGE_DST_INV 1<<5
    src, dst = ext.options
    assert (1 << src.index, 1 << dst.index) == (0x01, 0x02)
    assert (1 << (src.index + ext.invert_shift), 1 << (dst.index + ext.invert_shift)) == (0x10, 0x20)
    assert (ext.flag_const(src), ext.inv_const(dst)) == ("IPRANGE_SRC", "IPRANGE_DST_INV")


@pytest.mark.parametrize("types,size", [
    (["uint8"], 2), (["uint16"], 4), (["uint32"], 8), (["uint64"], 16), (["host"], 20),
    (["flag"], 1), (["uint8", "uint64"], 24), (["choice", "uint32"], 12),
])
def test_struct_size_follows_abi(types, size):
    ext = spec.validate(_opts(*({"name": f"o{i}", "type": t,
                                 **({"choices": ["a", "b"]} if t == "choice" else {})}
                                for i, t in enumerate(types))))
    assert ext.info_size == size


def test_private_members_follow_userspace_ones():
    raw = _match(private=[{"name": "state", "type": "kptr"}])
    ext = spec.validate(raw)
    assert ext.members[-1].private and ext.members[-1].name == "state"
    assert ext.info_size == 16


def test_private_inet_addr_is_a_four_aligned_union():
    ext = spec.validate(_match(private=[{"name": "mask", "type": "inet_addr"},
                                        {"name": "data", "type": "kptr"}]))
    mask = next(m for m in ext.members if m.name == "mask")
    assert mask.decl == "union nf_inet_addr mask" and mask.private
    # __u16 min_len, __u8 flags, 1 byte of padding, the union at 4..20, the pointer at 24
    assert (ext.userspace_size, ext.info_size) == (4, 32)


def test_large_fields_sit_between_flags_and_private_ones():
    ext = spec.validate(_match(fields=[{"name": "n", "type": "uint16"},
                                       {"name": "table", "type": "uint8", "count": 300,
                                        "comment": "filled by the plugin"}],
                               private=[{"name": "state", "type": "kptr"}]))
    names = [m.name for m in ext.members]
    assert names[names.index("flags") + 1:] == ["__pad0", "n", "table", "__pad1", "state"]
    assert ext.members[-3].decl == "__u8 table[300]" and not ext.members[-3].private
    assert ext.members[-2].decl == "__u8 __pad1[6]" and not ext.members[-2].private
    # __u16 min_len, __u8 flags, pad, __u16 n, __u8 table[300] ends at 306; the pointer at 312
    assert (ext.userspace_size, ext.info_size) == (312, 320)


def test_userspace_size_is_offsetof_first_private_member():
    ext = spec.validate(_match(private=[{"name": "state", "type": "kptr"}]))
    assert ext.userspace_size == 8    # __u16 min_len, __u8 flags, pad to 8 for void *


def test_derived_names():
    m = spec.validate(copy.deepcopy(MATCH_RAW))
    t = spec.validate(copy.deepcopy(TARGET_RAW))
    h = spec.validate(copy.deepcopy(HOOK_RAW))
    assert (m.module, m.prefix, m.struct, m.header) == ("xt_nfltest", "nfltest_mt", "xt_nfltest_mtinfo",
                                                        "xt_nfltest.h")
    assert (t.module, t.prefix, t.struct) == ("xt_NFLTEST", "nfltest_tg", "xt_nfltest_tginfo")
    assert (h.module, h.plugin, h.hooks[0].hooknum, h.hooks[0].nfproto) == (
        "nflab_nflhook", None, "NF_INET_PRE_ROUTING", "NFPROTO_IPV4")


def test_hook_collision_is_case_insensitive():
    raw = copy.deepcopy(HOOK_RAW)
    with pytest.raises(SpecError):
        spec.validate(raw, kernel_modules={"NFLAB_NFLHOOK"})


def test_spec_error_is_nflab_error_with_exit_2():
    assert issubclass(SpecError, NflabError) and SpecError.exit_code == 2


def test_fields_are_plugin_filled_members_before_the_private_ones():
    raw = copy.deepcopy(MATCH_RAW)
    raw["fields"] = [{"name": "keys", "type": "uint64", "count": 3, "comment": "what the plugin read"},
                     {"name": "n", "type": "uint32"}]
    raw["private"] = [{"name": "state", "type": "kptr"}]
    ext = spec.validate(raw)
    decls = [m.decl for m in ext.members]
    assert decls == ["__u16 min_len", "__u8 flags", "__u8 __pad0[5]", "__aligned_u64 keys[3]", "__u32 n",
                     "__u8 __pad1[4]", "void *state __attribute__((aligned(8)))"]
    # min_len 0..2, flags 2, keys 8..32, n 32..36, state 40..48
    assert (ext.userspace_size, ext.info_size) == (40, 48)


def test_uncompared_fields_follow_the_compared_ones_and_end_what_iptables_compares():
    raw = copy.deepcopy(MATCH_RAW)
    raw["fields"] = [{"name": "user", "type": "uint64", "count": 2, "compared": False},
                     {"name": "keys", "type": "uint64", "count": 2}]
    raw["private"] = [{"name": "state", "type": "kptr"}]
    ext = spec.validate(raw)
    assert [m.name for m in ext.members] == ["min_len", "flags", "__pad0", "keys", "user", "state"]
    # min_len 0..2, flags 2, keys 8..24, user 24..40, state 40..48
    assert (ext.compare_end, ext.userspace_size, ext.info_size) == ("user", 24, 48)
    raw["private"] = []
    ext = spec.validate(raw)
    assert (ext.compare_end, ext.userspace_size, ext.has_private) == ("user", 24, False)
    raw["fields"] = [{"name": "keys", "type": "uint64"}]
    assert spec.validate(raw).compare_end is None
    with pytest.raises(SpecError, match="compared = false"):
        raw["fields"] = [{"name": "user", "type": "uint64", "compared": "no"}]
        spec.validate(raw)


@pytest.mark.parametrize("bad", [{"name": "k", "type": "int"}, {"name": "flags", "type": "uint8"},
                                 {"name": "min_len", "type": "uint8"}, {"name": "k", "type": "uint8", "count": 65497},
                                 {"name": "k", "type": "uint8", "size": 2}, "k"])
def test_fields_are_validated(bad):
    raw = copy.deepcopy(MATCH_RAW)
    raw["fields"] = [bad]
    with pytest.raises(SpecError, match="fields"):
        spec.validate(raw)


def test_a_given_default_leaves_no_trace_in_the_rule():
    """The header names each default; the plugin folds a given one away
    (flag clear, field 0) and prints the option only when it was not the
    default, so a rule has one encoding however it is spelt."""
    raw = _opts({"name": "to", "type": "uint16", "default": 65535},
                {"name": "with", "type": "choice", "choices": ["port", "host"], "default": "port"})
    ext = spec.validate(raw)
    assert [o.default for o in ext.options] == [65535, 0]
    files = render.render(ext)
    header, plugin = files[ext.header], files[f"{ext.plugin}.c"]
    assert re.search(r"#define \w+_TO_DEFAULT\t65535U", header)
    assert re.search(r"#define \w+_WITH_DEFAULT\t\w+_WITH_PORT", header)
    assert re.search(r"if \(info->to == \w+_TO_DEFAULT\) \{\n\t+info->flags &= ~\w+_TO;\n\t+info->to = 0;",
                     plugin)
    # the module reads a non-zero default through the header (the field is 0 then)
    assert "return info->flags & NFLTEST_TO ? info->to : NFLTEST_TO_DEFAULT;" in header
    assert "nfltest_to_value(" in header and "nfltest_with_value(" not in header


def test_a_default_constant_may_not_shadow_another_options_flag():
    raw = _opts({"name": "to", "type": "uint16", "default": 5}, {"name": "to-default", "type": "flag"})
    with pytest.raises(SpecError, match="--to-default and --to's default both generate NFLTEST_TO_DEFAULT"):
        spec.validate(raw)


def test_help_says_a_declared_default_once_from_the_definition():
    """`iptables -m NAME --help` ends an option's line with its declared default;
    a help text that states the default itself is refused, so the two cannot drift."""
    raw = _opts({"name": "to", "type": "uint16", "default": 65535, "help": "offset to stop at"},
                {"name": "with", "type": "choice", "choices": ["port", "host"], "default": "host"},
                {"name": "from", "type": "uint16", "help": "offset to start at"})
    ext = spec.validate(raw)
    assert [o.help_text for o in ext.options] == [
        "offset to stop at (default 65535)", "default host", "offset to start at"]
    plugin = render.render(ext)[f"{ext.plugin}.c"]
    assert "--to n\\n\\t\\toffset to stop at (default 65535)\\n" in plugin
    for stated in ("offset to stop at (default 65535)", "offset to stop at, default: 0",
                   "offset to stop at (Default 7)", "offset to stop at; defaults to the end",
                   "offset to stop at (the default is 65535)"):
        raw = _opts({"name": "to", "type": "uint16", "default": 65535, "help": stated})
        with pytest.raises(SpecError, match=r"states the default itself.*\(default 65535\)"):
            spec.validate(raw)
    # a help that only mentions the word keeps it (an option without a declared default too)
    raw = _opts({"name": "to", "type": "uint16", "default": 1, "help": "scan at most this much (l7-filter's default)"},
                {"name": "via", "type": "uint8", "default": 0, "help": "skip packets to the default gateway, by default none"},
                {"name": "mask", "type": "uint8", "help": "prefix length (default 32 / 128)"})
    assert [o.help_text for o in spec.validate(raw).options[:2]] == [
        "scan at most this much (l7-filter's default) (default 1)",
        "skip packets to the default gateway, by default none (default 0)"]


def test_checkentry_refuses_a_rule_without_its_mandatory_options():
    """The plugin insists on a mandatory option, but nft_compat or a raw
    setsockopt caller can hand the module a rule without it: checkentry refuses."""
    one = render.render(spec.validate(_opts({"name": "to", "type": "uint16", "mandatory": True},
                                            {"name": "by", "type": "uint8"})))["xt_nfltest.c"]
    assert ('\tif (!(info->flags & NFLTEST_TO)) {\n\t\tpr_info_ratelimited("--to is required\\n");\n'
            '\t\treturn -EINVAL;\n\t}\n') in one
    assert "NFLTEST_BY))" not in one
    two = render.render(spec.validate(_opts({"name": "to", "type": "uint16", "mandatory": True},
                                            {"name": "by", "type": "uint8", "mandatory": True})))["xt_nfltest.c"]
    assert ("if ((info->flags & (NFLTEST_TO | NFLTEST_BY)) != (NFLTEST_TO | NFLTEST_BY)) {\n"
            '\t\tpr_info_ratelimited("--to and --by are required\\n");') in two
    none = render.render(spec.validate(_opts({"name": "to", "type": "uint16"})))["xt_nfltest.c"]
    assert "required" not in none


@pytest.mark.parametrize("tables, hooks", [
    (["filter"], "(1 << NF_INET_LOCAL_IN) |\n\t\t\t\t  (1 << NF_INET_FORWARD) |\n\t\t\t\t  (1 << NF_INET_LOCAL_OUT),"),
    (["raw", "nat"], "(1 << NF_INET_PRE_ROUTING) |\n\t\t\t\t  (1 << NF_INET_LOCAL_IN) |\n\t\t\t\t  "
                     "(1 << NF_INET_LOCAL_OUT) |\n\t\t\t\t  (1 << NF_INET_POST_ROUTING),"),
    (["mangle"], None), ([], None)])
def test_a_target_declares_the_hooks_of_its_tables(tables, hooks):
    """As the in-tree REJECT does: nft_compat checks a target's hooks only when it
    has them (the table is matched by name alone)."""
    raw = {**copy.deepcopy(TARGET_RAW), "tables": tables}
    module = render.render(spec.validate(raw))["xt_NFLTEST.c"]
    if hooks is None:
        assert ".hooks" not in module
    else:
        assert f".hooks\t\t= {hooks}\n" in module
    assert (len(tables) == 1) == (f'.table\t\t= "{(tables or [""])[0]}",' in module)


@pytest.mark.parametrize("name", spec.catalog_names())
def test_every_byte_of_a_shared_struct_is_named(name):
    """No hole the compiler fills silently: each alignment gap is an explicit
    __padN, so the members' sizes add up to the struct's and each starts where
    the one before ended (layout and size as before: the header's static_asserts)."""
    ext = spec.load(name)
    offset = 0
    for m in ext.members:
        assert offset % m.align == 0, f"{name}: {m.name} at {offset} is not {m.align}-aligned: a hole before it"
        offset += m.size
    assert offset == ext.info_size, f"{name}: {ext.info_size - offset} unnamed tail bytes"
