"""Files `invoke install --name=layer7` puts into the guest: the kit's pattern set.

Every ``protocols/*.pat`` beside this file goes to
``/etc/l7-protocols/protocols/``, where l7-filter's protocol package put its
patterns and where the plugin looks by default (``--l7dir`` names another
directory).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
L7DIR = "/etc/l7-protocols"


def files() -> dict[str, bytes]:
    return {f"{L7DIR}/protocols/{pat.name}": pat.read_bytes()
            for pat in sorted((HERE / "protocols").glob("*.pat"))}
