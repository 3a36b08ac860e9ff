"""Files `invoke install --name=pktlog` puts into the guest: the listener and its
decoder table.

The table is written here, on the host, from the same validated definition
the module is built from (``kmods.spec.Netlink.table``), so the attribute ids,
types and the layout hash the listener checks against the module's agree.
"""

from __future__ import annotations

import json
from pathlib import Path

from kmods import spec

HERE = Path(__file__).resolve().parent
LISTENER = "/usr/local/bin/pktlog-listen"
TABLE = "/usr/share/nflab/pktlog/attrs.json"


def files() -> dict:
    table = spec.load_file(HERE / "ext.toml").netlink.table()
    return {
        LISTENER: ((HERE / "pktlog_listen.py").read_bytes(), 0o755),
        TABLE: json.dumps(table, indent=1, sort_keys=True).encode() + b"\n",
    }
