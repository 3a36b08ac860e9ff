"""Compiler output, read the way a person reads it: the errors, as ``file:line``."""

from __future__ import annotations

import re
from pathlib import Path

_DIAG_RE = re.compile(r"^(?P<file>[^\s:]+\.(?:c|h)):(?P<line>\d+):(?:(?P<col>\d+):)?\s*"
                      r"(?P<sev>error|warning|fatal error):(?P<msg>.*)$")


def diagnostics(output: str, src_dir: Path) -> list[str]:
    """Compiler errors as ``file:line: message`` lines, paths relative to the build dir."""
    found = []
    for line in output.splitlines():
        m = _DIAG_RE.match(line.strip())
        if m and m.group("sev") != "warning":
            path = m.group("file")
            try:
                path = str(Path(path).resolve().relative_to(src_dir.resolve()))
            except ValueError:
                pass
            found.append(f"{src_dir / path}:{m.group('line')}: {m.group('sev')}:{m.group('msg')}")
    return found
