"""Kconfig option text: a kernel's ``.config`` or a fragment of one.

``CONFIG_X=value`` lines, and ``# CONFIG_X is not set`` (value ``n``); values
as written, so a string keeps its quotes (what a fragment's hash covers).
The one parser of the kit: fragments and cached kernels' configs strictly
(any other line is an error naming it), a guest's printed config leniently.
"""

from __future__ import annotations

import re
from pathlib import Path

from ground.errors import KernelError

OPTION_RE = re.compile(r"^(?P<name>CONFIG_[A-Za-z0-9_]+)=(?P<value>.*)$")
UNSET_RE = re.compile(r"^# (?P<name>CONFIG_[A-Za-z0-9_]+) is not set$")


def parse(text: str, where: str = "fragment", *, strict: bool = True) -> dict[str, str]:
    """{CONFIG_X: value}. Comments and blank lines are skipped; anything else
    is an error naming *where* and the line, or skipped too when not *strict*."""
    opts: dict[str, str] = {}
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        m = OPTION_RE.match(line) or UNSET_RE.match(line)
        if m:
            value = m.groupdict().get("value")
            opts[m.group("name")] = "n" if value is None or value == "n" else value
        elif strict and line and not line.startswith("#"):
            raise KernelError(f"{where}:{no}: not a Kconfig option line: {raw!r}",
                              hint="Kconfig text holds CONFIG_NAME=y|m|<value>, '# CONFIG_NAME is not set', "
                                   "comments and blank lines only: fix that line of a fragment, or fetch "
                                   "a kernel whose cached .config is damaged again")
    return opts


def read(path: Path | str) -> dict[str, str]:
    """A ``.config`` file, strictly."""
    return parse(Path(path).read_text(), str(path))


def value(config: dict[str, str], option: str) -> str | None:
    """``CONFIG_<option>``'s value without quotes; None when not set or absent."""
    got = config.get(option if option.startswith("CONFIG_") else f"CONFIG_{option}")
    return None if got in (None, "n") else got.strip('"')
