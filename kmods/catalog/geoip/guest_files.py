"""Files `invoke install --name=geoip` puts into the guest: the country database.

Built from ``geoip.csv`` beside this file, or from the CSV named by
``$NFLAB_GEOIP_CSV`` (a user-supplied database), in the layout documented in
``build_db.py``, into the directory the plugin reads by default.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DB_DIR = "/usr/share/nflab/geoip"


def _builder():
    old, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec = importlib.util.spec_from_file_location("nflab_geoip_build_db", HERE / "build_db.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.dont_write_bytecode = old


def files() -> dict[str, bytes]:
    csv = Path(os.environ.get("NFLAB_GEOIP_CSV") or HERE / "geoip.csv")
    return {f"{DB_DIR}/{name}": data for name, data in _builder().build(csv.read_text(), str(csv)).items()}
