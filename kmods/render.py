"""Render an extension's kernel module, shared header, Kbuild and plugin sources.

Templates are looked up first in the extension's own catalog folder (where
``xt_NAME.c.j2`` extends ``match.c.j2`` and fills its blocks), then in
``kmods/templates`` and ``userspace_ext/templates``. ``StrictUndefined``
turns a typo in a template into an error instead of empty C.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jinja2

from ground.errors import SpecError
from ground.files import atomic_write
from ground.paths import cache_dir
from kmods.spec import Extension

KMODS_TEMPLATES = Path(__file__).resolve().parent / "templates"
USERSPACE_TEMPLATES = Path(__file__).resolve().parent.parent / "userspace_ext" / "templates"

_C_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r", "?": "\\?"}


def cstr(value) -> str:
    """A C string literal for *value*; every byte outside printable ASCII is escaped."""
    out = []
    for ch in str(value):
        if ch in _C_ESCAPES:
            out.append(_C_ESCAPES[ch])
        elif 0x20 <= ord(ch) < 0x7F:
            out.append(ch)
        else:
            out.extend(f"\\{b:03o}" for b in ch.encode("utf-8"))
    return '"' + "".join(out) + '"'


def ccomment(value) -> str:
    """Text safe inside a C block comment: one line, no comment terminators."""
    text = " ".join(str(value).split())
    return text.replace("*/", "* /").replace("/*", "/ *")


class _SharedBytecode(jinja2.BytecodeCache):
    """Compiled templates shared by every environment of the process (each
    extension folder has its own environment, its overrides first on the search
    path, but the kit's templates are the same files for all of them) and kept
    on disk in ``$NFLAB_CACHE/jinja`` for the next process: compiling the
    templates was ~0.3 s of every warm `build-module`. Jinja keys a template by
    name and file, and checks its source's checksum and its own version."""

    def __init__(self):
        self._code: dict[str, bytes] = {}

    def _file(self, key: str) -> Path:
        return cache_dir() / "jinja" / f"{key}.bc"

    def load_bytecode(self, bucket):
        code = self._code.get(bucket.key)
        if code is None:
            try:
                code = self._file(bucket.key).read_bytes()
            except OSError:
                return
        bucket.bytecode_from_string(code)

    def dump_bytecode(self, bucket):
        code = bucket.bytecode_to_string()
        self._code[bucket.key] = code
        path = self._file(bucket.key)
        try:
            atomic_write(path, code)
        except OSError:
            pass                    # a read-only cache only costs the compile


_BYTECODE = _SharedBytecode()


@functools.lru_cache(maxsize=64)
def environment(ext_dir: Path | None = None) -> jinja2.Environment:
    """The Jinja2 environment for an extension folder, one per folder and process:
    compiled templates are reused (Jinja re-reads a template whose file changed),
    which makes checking a warm build of the whole catalog 1.6 s cheaper."""
    search = ([str(ext_dir)] if ext_dir else []) + [str(KMODS_TEMPLATES), str(USERSPACE_TEMPLATES)]
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(search),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
        bytecode_cache=_BYTECODE,
    )
    env.filters["cstr"] = cstr
    env.filters["ccomment"] = ccomment
    return env


def _template_for(env: jinja2.Environment, own: str, base: str) -> jinja2.Template:
    try:
        return env.get_template(own)
    except jinja2.TemplateNotFound:
        return env.get_template(base)


def _tidy(text: str) -> str:
    """Collapse runs of blank lines left by empty blocks; one newline at EOF."""
    lines, blank = [], 0
    for line in text.splitlines():
        line = line.rstrip()
        blank = blank + 1 if not line else 0
        if blank <= 1:
            lines.append(line)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def render(ext: Extension) -> dict[str, str]:
    """Return {filename: text} for every source file of *ext*; a template that does not
    parse or render (Jinja syntax, an undefined name) is a SpecError naming file:line."""
    try:
        files = _render_files(ext)
    except jinja2.TemplateError as exc:
        raise template_error(exc, ext) from None
    return {name: _tidy(text) for name, text in files.items()}


def template_error(exc: jinja2.TemplateError, ext: Extension) -> SpecError:
    """A Jinja error as one line: where (file:line) and what Jinja said."""
    where = _where(exc)
    kind = "does not parse" if isinstance(exc, jinja2.TemplateSyntaxError) else "does not render"
    return SpecError(f"{where or 'a template of ' + ext.name}: the template {kind}: "
                     f"{exc.message or type(exc).__name__}",
                     hint="fix that line (Jinja: every {% block %}/{% if %} needs its "
                          "{% endblock %}/{% endif %}; names come from `ext`, see "
                          "docs/definitions.md), then run the task again")


def _where(exc: jinja2.TemplateError) -> str | None:
    """file:line of a Jinja error: the parser's position, else the deepest template frame."""
    if isinstance(exc, jinja2.TemplateSyntaxError) and exc.lineno:
        return f"{exc.filename or exc.name}:{exc.lineno}"
    found, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(".j2"):
            found = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found


def _render_files(ext: Extension) -> dict[str, str]:
    ext_dir = ext.path.parent if ext.path else None
    env = environment(ext_dir)
    ctx = {"ext": ext}
    base = {"hook": "hook.c.j2", "match": "match.c.j2", "target": "target.c.j2"}[ext.kind]
    files = {
        f"{ext.module}.c": _template_for(env, f"{ext.module}.c.j2", base).render(ctx),
        "compat_nflab.h": (KMODS_TEMPLATES / "compat_nflab.h").read_text(),
        "Kbuild": env.get_template("Kbuild.j2").render(ctx),
    }
    if ext.kind != "hook":
        files[ext.header] = env.get_template("shared_header.h.j2").render(ctx)
        files[f"{ext.plugin}.c"] = _template_for(env, f"{ext.plugin}.c.j2", "libxt.c.j2").render(ctx)
    return files
