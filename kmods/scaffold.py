"""`invoke new-module`: write a definition (and a starter template) that builds at once."""

from __future__ import annotations

import tomllib
from pathlib import Path

from kmods import spec
from ground.errors import SpecError

_MATCH_BODY = """{% extends "match.c.j2" %}
{# A starter match: packets at least --min-len bytes long. Edit freely. #}
{% block match4 %}
	return (skb->len >= info->min_len) ^ !!(info->flags & {{ ext.inv_const(ext.options[0]) }});
{% endblock %}
{% block match6 %}
	return (skb->len >= info->min_len) ^ !!(info->flags & {{ ext.inv_const(ext.options[0]) }});
{% endblock %}
"""

_TARGET_BODY = """{% extends "target.c.j2" %}
{# A starter target: set the packet mark, then continue. Edit freely. #}
{% block target4 %}
	if (info->flags & {{ ext.flag_const(ext.options[0]) }})
		skb->mark = info->set_mark;
	return XT_CONTINUE;
{% endblock %}
{% block target6 %}
	if (info->flags & {{ ext.flag_const(ext.options[0]) }})
		skb->mark = info->set_mark;
	return XT_CONTINUE;
{% endblock %}
"""

_HOOK_BODY = """{% extends "hook.c.j2" %}
{# A starter hook: the base template counts packets per hook point in
   /proc/net/{{ ext.module }}; add your logic before the verdict. #}
{% block hook_body %}
	return NF_ACCEPT;
{% endblock %}
"""


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def definition_text(kind: str, name: str, hook: str, priority, family: str) -> str:
    lines = [f"# {name}: created by `invoke new-module`; see docs/definitions.md",
             f"kind = {_toml_str(kind)}", f"name = {_toml_str(name)}",
             f"summary = {_toml_str(f'{name} {kind} (nflab starter)')}"]
    if kind == "hook":
        lines += [f"families = [{_toml_str(family)}]", "", "[[hooks]]",
                  f"family = {_toml_str(family)}", f"hook = {_toml_str(hook)}",
                  f"priority = {priority}"]
    elif kind == "match":
        fams = '["ipv4", "ipv6"]' if family == "ipv4" else f"[{_toml_str(family)}]"
        lines += [f"families = {fams}", "", "[[options]]", 'name = "min-len"', 'type = "uint16"',
                  'invert = true', 'help = "match packets of at least this many bytes"']
    else:
        fams = '["ipv4", "ipv6"]' if family == "ipv4" else f"[{_toml_str(family)}]"
        lines += [f"families = {fams}", 'verdict = "XT_CONTINUE"', "", "[[options]]",
                  'name = "set-mark"', 'type = "uint32"', 'help = "mark to set on the packet"']
    return "\n".join(lines) + "\n"


def new_module(kind: str, name: str, hook: str = "PRE_ROUTING", priority="-175",
               family: str = "ipv4", catalog: Path | None = None) -> list[Path]:
    """Validate everything first, then write ext.toml and a starter template."""
    if kind not in spec.KINDS:
        raise SpecError(f"--kind: unknown kind {kind!r}", hint="valid: " + ", ".join(spec.KINDS))
    spec.check_name(name, "--name")
    prio = spec.check_priority(priority, "--priority")
    fam = spec.check_family(family, spec.FAMILIES if kind == "hook" else spec.XT_FAMILIES, "--family")
    hk = spec.check_hook(hook, fam, "--hook") if kind == "hook" else hook
    text = definition_text(kind, name, hk, prio, fam)
    ext = spec.validate(tomllib.loads(text), Path(f"{name}/ext.toml"))
    catalog = catalog or spec.CATALOG
    folder = catalog / name
    if folder.exists():
        raise SpecError(f"--name: {folder} already exists", hint="pick another name or edit it")
    body = {"hook": _HOOK_BODY, "match": _MATCH_BODY, "target": _TARGET_BODY}[kind]
    folder.mkdir(parents=True)
    written = [folder / "ext.toml", folder / f"{ext.module}.c.j2"]
    written[0].write_text(text)
    written[1].write_text(body)
    return written
