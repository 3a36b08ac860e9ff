"""Property (issue 7 §2): any definition `validate` accepts renders and compiles with
-Werror (kernel module via Kbuild on a real 6.12, plugin via plugin.build against
libxtables); any definition it rejects raises SpecError before Jinja or a compiler
is ever touched.
"""

from __future__ import annotations

import copy
import subprocess
import tempfile
from pathlib import Path

import jinja2
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from kmods import build, render, spec
from ground.errors import BuildError, SpecError
from tests.conftest import HOOK_RAW, MATCH_RAW, TARGET_RAW, get_kernel

pytestmark = pytest.mark.slow

# Identifiers that are valid per the option grammar but not usable as C members
# (keywords, predefined or kernel object-like macros): excluded from the generator
# while the known-bug test below is xfail; widen the generator when it is fixed.
C_RESERVED = frozenset("""
auto break case char const continue default do double else enum extern float for goto if
inline int long register restrict return short signed sizeof static struct switch typedef
union unsigned void volatile while asm typeof bool true false linux unix current errno
noinline fallthrough
""".split())

NASTY_PIECES = ['"', "\\", "*/", "/*", "\n", "\t", "??=", "%s", "%n", "é", "\x7f", "'", "`",
                "$(id)", ";", "{{ ext.name }}", "{% raw %}", "}}", "#define", "\\n", "\u2028"]
CONTROL = ["\x01", "\x00", "\x1b", "\r"]


def text(clean: bool):
    """Help/summary/label text full of C- and Jinja-hostile pieces (control chars only if not clean)."""
    chars = st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]) if clean else \
        st.characters(codec="utf-8", exclude_categories=["Cs"])
    pieces = st.sampled_from(NASTY_PIECES + ([] if clean else CONTROL))
    return st.lists(st.one_of(pieces, st.text(chars, max_size=6)), max_size=8).map("".join)


WORD = st.from_regex(r"[a-z][a-z0-9]{0,7}", fullmatch=True).filter(lambda w: w not in C_RESERVED)
GOOD_OPT_NAME = st.one_of(
    WORD, st.builds(lambda a, b: f"{a}-{b}", WORD, st.from_regex(r"[a-z0-9]{1,4}", fullmatch=True)))
BAD_OPT_NAME = st.sampled_from(["Bad", "a_b", "a;b", "-x", "x-", "a--b", "a" * 31, "", "min-len\n", 5])
GOOD_EXT_NAME = st.from_regex(r"[a-z][a-z0-9_]{0,14}", fullmatch=True).map(lambda n: "nfl" + n[:25])
BAD_EXT_NAME = st.sampled_from(["../x", "a/b", "..", "x;rm", "$(id)", "a" * 29, "iprange\n", "", "1abc",
                                "mark", "Caps", "é", None])
GOOD_TYPES = st.sampled_from(list(spec.OPTION_TYPES))
BAD_TYPES = st.sampled_from(["float", "int", "", "UINT8", None])


def pick(draw, clean, good, bad):
    return draw(good) if clean or draw(st.integers(0, 3)) else draw(bad)


@st.composite
def option(draw, clean):
    o = {"name": pick(draw, clean, GOOD_OPT_NAME, BAD_OPT_NAME),
         "type": pick(draw, clean, GOOD_TYPES, BAD_TYPES)}
    otype = o["type"] if isinstance(o["type"], str) else ""
    if draw(st.booleans()):
        o["help"] = draw(text(clean))[:200] if clean else draw(text(clean))
    if draw(st.booleans()):
        o["label"] = draw(text(clean))[:60] if clean else draw(text(clean))
    if draw(st.booleans()):
        o["invert"] = draw(st.booleans()) if clean else draw(st.one_of(st.booleans(), st.just("yes")))
    if draw(st.integers(0, 3)) == 0:
        o["mandatory"] = draw(st.booleans())
    if otype == "string" or (not clean and draw(st.integers(0, 9)) == 0):
        o["length"] = draw(st.integers(2, 256)) if clean else draw(st.integers(0, 300))
    if otype == "choice" or (not clean and draw(st.integers(0, 9)) == 0):
        o["choices"] = draw(st.lists(WORD, min_size=1, max_size=4, unique=True)) if clean else \
            draw(st.lists(st.one_of(WORD, st.just("Bad")), max_size=4))
    if otype.startswith("uint") and draw(st.booleans()):
        lo = draw(st.integers(0, 2**32 - 1))
        o["min"], o["max"] = lo, draw(st.integers(lo, 2**32 - 1))
    return o


def _no_derived_collisions(raw) -> bool:
    """Known bug (see test_known_bad_definitions_compile_or_are_rejected): names derived
    from one option (FIELD_min/_max members, FIELD_INV constants, choice constants) may
    equal another option's field."""
    opts = [o for o in (raw.get("options") or []) if isinstance(o, dict)]
    fields = {str(o.get("name", "")).replace("-", "_") for o in opts}
    derived = {f + s for f in fields for s in ("_inv", "_min", "_max")}
    choices = {f"{str(o.get('name', '')).replace('-', '_')}_{c}" for o in opts
               for c in (o.get("choices") or []) if isinstance(c, str)}
    return not (fields & (derived | choices))


@st.composite
def definition(draw, clean=None):
    """A definition; *clean* ones are built to be valid, the others may break any rule."""
    if clean is None:
        clean = draw(st.integers(0, 2)) > 0          # two thirds built to be valid
    kind = pick(draw, clean, st.sampled_from(["match", "target", "hook"]), st.just("widget"))
    raw = {"kind": kind, "name": pick(draw, clean, GOOD_EXT_NAME, BAD_EXT_NAME)}
    if kind == "target" and isinstance(raw["name"], str) and draw(st.booleans()):
        raw["name"] = raw["name"].upper()
    if draw(st.booleans()):
        raw["summary"] = draw(text(clean))[:200] if clean else draw(text(clean))
    if draw(st.integers(0, 3)) == 0:
        raw["author"] = draw(text(clean))[:100] if clean else draw(text(clean))
    if kind == "hook":
        fam = pick(draw, clean, st.sampled_from(["ipv4", "ipv6", "netdev"]), st.just("ipx"))
        raw["families"] = [fam]
        hooks = ["INGRESS"] if fam == "netdev" else list(spec.INET_HOOKS) + ["nf_inet_local_in"]
        raw["hooks"] = [{
            "family": fam,
            "hook": pick(draw, clean, st.sampled_from(hooks), st.sampled_from(["PREROUTING", "EGRESS", 3])),
            "priority": pick(draw, clean, st.one_of(st.integers(-(2**31), 2**31 - 1), st.integers(-400, 400)),
                             st.one_of(st.integers(2**31, 2**40), st.sampled_from(["abc", "1.5", "", 1.5]))),
        } for _ in range(draw(st.integers(1, 3)))]
        if clean:                                  # distinct (family, hook, priority)
            seen, uniq = set(), []
            for h in raw["hooks"]:
                key = (h["family"], str(h["hook"]).upper().removeprefix("NF_INET_"), h["priority"])
                if key not in seen:
                    seen.add(key)
                    uniq.append(h)
            raw["hooks"] = uniq
    else:
        raw["families"] = pick(draw, clean, st.sampled_from([["ipv4", "ipv6"], ["ipv4"], ["ipv6"]]),
                               st.sampled_from([["netdev"], [], ["ipv4", "ipv4"], "ipv4"]))
        raw["revision"] = pick(draw, clean, st.integers(0, 255), st.sampled_from([-1, 256, "1"]))
        # min_size=1 while the no-options known bug is open (then allow 0)
        opts = draw(st.lists(option(clean), min_size=1, max_size=4))
        if clean:                                  # unique names and fields
            uniq, seen = [], set()
            for o in opts:
                if o["name"] not in seen and o["name"].replace("-", "_") not in seen:
                    seen |= {o["name"], o["name"].replace("-", "_")}
                    uniq.append(o)
            opts = uniq
        raw["options"] = opts
    if not clean and draw(st.integers(0, 9)) == 0:
        raw["bogus"] = 1
    return raw


class _Forbidden(AssertionError):
    pass


def _validate_guarded(raw):
    """spec.validate with Jinja and every subprocess made to explode if touched."""
    def boom(*a, **k):
        raise _Forbidden("validation reached Jinja or a subprocess")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(render, "environment", boom)
        mp.setattr(render, "render", boom)
        mp.setattr(jinja2.Environment, "get_template", boom)
        mp.setattr(jinja2.Environment, "from_string", boom)
        mp.setattr(subprocess, "Popen", boom)
        mp.setattr(subprocess, "run", boom)
        return spec.validate(copy.deepcopy(raw))


def _compile(ext) -> None:
    kernel = get_kernel("6.12")
    with tempfile.TemporaryDirectory(prefix="nflab-prop-") as tmp, pytest.MonkeyPatch.context() as mp:
        mp.setenv("NFLAB_BUILD", tmp)
        try:
            art = build.build_extension(ext, kernel)
        except BuildError as exc:
            raise AssertionError(f"accepted definition does not compile:\n{exc}\n{exc.detail}\n"
                                 f"definition: {ext.raw!r}") from None
        assert art.ko.is_file()
        assert (art.so is not None) == (ext.kind != "hook")
        assert "-Werror" in (Path(tmp) / kernel.release / ext.name / "Kbuild").read_text()


def _raw_opts(*opts, kind="match"):
    raw = copy.deepcopy(MATCH_RAW if kind == "match" else TARGET_RAW)
    raw["options"] = list(opts)
    return raw


@settings(max_examples=15, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@example(copy.deepcopy(MATCH_RAW))
@example(copy.deepcopy(TARGET_RAW))
@example(copy.deepcopy(HOOK_RAW))
# a seed found it: a custom option was accepted without the plugin functions that
# parse and print it, and libxt_<name>.c failed with an implicit declaration of
# <name>_tg_parse_a_hi0; the spec now refuses it, naming the missing functions
@example({"kind": "target", "name": "NFLA", "families": ["ipv4"], "options": [{"name": "a-hi0", "type": "custom"}]})
@given(definition().filter(_no_derived_collisions))
def test_accepted_definitions_compile_rejected_never_reach_jinja(raw):
    try:
        ext = _validate_guarded(raw)
    except SpecError as exc:
        assert exc.message and (exc.hint is None or exc.hint.startswith("valid"))
        return
    files = render.render(ext)
    assert all("{{" not in t or "{{ ext.name }}" in repr(ext.raw) for t in files.values())
    _compile(ext)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@example({**copy.deepcopy(MATCH_RAW), "name": "../x"})
@example({**copy.deepcopy(MATCH_RAW), "bogus": 1})
@example(_raw_opts({"name": "x", "type": "float"}))
@example(_raw_opts({"name": "int", "type": "uint8"}))
@given(definition())
def test_rejected_definitions_raise_spec_error_before_jinja(raw):
    """Fast half of the property: validation is pure, errors are SpecError naming a field."""
    try:
        ext = _validate_guarded(raw)
    except SpecError as exc:
        assert "\n" not in exc.message.split(": ", 1)[0]
        assert exc.hint is None or exc.hint.startswith("valid")
        return
    assert isinstance(ext, spec.Extension)
    assert render.render(ext)         # accepted definitions render (StrictUndefined) without error


def _starter_body(ext) -> str:
    """A tiny own template that uses `info`, so only the definition is under test."""
    base = "match.c.j2" if ext.kind == "match" else "target.c.j2"
    ret = "true" if ext.kind == "match" else ext.verdict
    blocks = [f"{{% extends '{base}' %}}"]
    for b in (("match4", "match6") if ext.kind == "match" else ("target4", "target6")):
        blocks.append(f"{{% block {b} %}}\n\tif (info->flags)\n\t\treturn {ret};\n\treturn {ret};\n"
                      "{% endblock %}")
    return "\n".join(blocks) + "\n"


KNOWN_BAD = [
    ("keyword-field", _raw_opts({"name": "int", "type": "uint8"})),
    ("predefined-macro-linux", _raw_opts({"name": "linux", "type": "uint8"})),
    ("kernel-macro-current", _raw_opts({"name": "current", "type": "uint32"})),
    ("underscore-attribute-field", _raw_opts({"name": "x", "type": "uint8", "field": "__init"})),
    ("inv-const-collision", _raw_opts({"name": "x", "type": "flag", "invert": True},
                                      {"name": "x-inv", "type": "flag"})),
    ("range-member-collision", _raw_opts({"name": "src", "type": "iprange"},
                                         {"name": "src-min", "type": "uint8"})),
    ("uint-bound-overflow", _raw_opts({"name": "n", "type": "uint8", "max": 2**40})),
    ("no-options-match", _raw_opts()),
    ("no-options-target", _raw_opts(kind="target")),
    ("param-default-overflow", {**copy.deepcopy(MATCH_RAW),
                                "params": [{"name": "limit", "type": "int", "default": 2**40}]}),
]


@pytest.mark.parametrize("raw", [k[1] for k in KNOWN_BAD], ids=[k[0] for k in KNOWN_BAD])
def test_known_bad_definitions_compile_or_are_rejected(raw, tmp_path):
    try:
        ext = spec.validate(copy.deepcopy(raw))
    except SpecError:
        return                                    # rejected with a clear error: fine
    folder = tmp_path / ext.name
    folder.mkdir()
    (folder / "ext.toml").write_text("")          # path only locates the own template
    (folder / f"{ext.module}.c.j2").write_text(_starter_body(ext))
    ext.path = folder / "ext.toml"
    _compile(ext)
