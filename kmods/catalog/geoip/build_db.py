#!/usr/bin/env python3
"""Build the geoip match's country database from a CSV (nflab layout 1).

Input: CSV rows ``start,end,CC`` (inclusive range, IPv4 or IPv6, both ends of
one family; CC two letters, case-insensitive; ``#`` comments, blank lines
and a ``start,end,CC`` header ignored). Ranges of one country are merged
when adjacent or overlapping; ranges of two different countries must not
overlap.

Output: for every country in the CSV two files, ``CC.iv4`` and ``CC.iv6``
(upper-case CC; a family without ranges still gets its file, with count 0):

    offset  size  field
    0       8     magic  "NFLGEOIP"
    8       1     version 1
    9       1     family 4 or 6
    10      2     reserved, 0
    12      4     count of ranges, u32 little-endian
    16      ...   count records, sorted ascending, non-overlapping:
                  .iv4: first, last  as u32 little-endian  (8 bytes)
                  .iv6: first, last  as 16-byte addresses in network order (32 bytes)

The plugin (libxt_geoip, directory ``$NFLAB_GEOIP_DIR``, default
/usr/share/nflab/geoip) reads ``<dir>/CC.iv4`` / ``.iv6`` when a rule naming
CC is added and hands the ranges to the module, which keeps one shared copy.

Usage: build_db.py [--csv FILE] --out DIR      (default CSV: the kit's geoip.csv)
"""

from __future__ import annotations

import argparse
import csv
import io
import ipaddress
import struct
import sys
from pathlib import Path

MAGIC = b"NFLGEOIP"
VERSION = 1
DEFAULT_CSV = Path(__file__).resolve().parent / "geoip.csv"
MAX_FILE = 16 << 20          # the module refuses bigger files


class DBError(ValueError):
    pass


def parse_csv(text: str, where: str = "csv") -> dict:
    """{CC: {4: [(lo, hi)], 6: [(lo, hi)]}} with ints, merged and sorted."""
    raw: dict = {}
    for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        row = [c.strip() for c in row]
        if [c.lower() for c in row] == ["start", "end", "cc"]:
            continue
        if len(row) != 3:
            raise DBError(f"{where}:{n}: need start,end,CC, got {len(row)} fields")
        try:
            lo, hi = ipaddress.ip_address(row[0]), ipaddress.ip_address(row[1])
        except ValueError as e:
            raise DBError(f"{where}:{n}: {e}") from None
        if lo.version != hi.version:
            raise DBError(f"{where}:{n}: {lo} and {hi} are of different families")
        if lo > hi:
            raise DBError(f"{where}:{n}: start {lo} is above end {hi}")
        cc = row[2].upper()
        if len(cc) != 2 or not cc.isascii() or not cc.isalpha():
            raise DBError(f"{where}:{n}: country {row[2]!r} is not two letters")
        raw.setdefault(cc, {4: [], 6: []})[lo.version].append((int(lo), int(hi)))
    db = {}
    for cc, fams in raw.items():
        db[cc] = {}
        for fam, ranges in fams.items():
            merged = []
            for lo, hi in sorted(ranges):
                if merged and lo <= merged[-1][1] + 1:
                    merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
                else:
                    merged.append((lo, hi))
            db[cc][fam] = merged
    for fam in (4, 6):
        spans = sorted((lo, hi, cc) for cc in db for lo, hi in db[cc][fam])
        for (alo, ahi, acc), (blo, bhi, bcc) in zip(spans, spans[1:]):
            if blo <= ahi:
                raise DBError(f"{where}: {acc} and {bcc} overlap at {ipaddress.ip_address(blo)}")
    return db


def encode(fam: int, ranges: list) -> bytes:
    out = [MAGIC, struct.pack("<BBHI", VERSION, fam, 0, len(ranges))]
    for lo, hi in ranges:
        if fam == 4:
            out.append(struct.pack("<II", lo, hi))
        else:
            out.append(lo.to_bytes(16, "big") + hi.to_bytes(16, "big"))
    return b"".join(out)


def build(text: str, where: str = "csv") -> dict:
    """{file name: bytes} for the CSV *text*."""
    db = parse_csv(text, where)
    files = {}
    for cc, fams in sorted(db.items()):
        for fam in (4, 6):
            data = encode(fam, fams[fam])
            if len(data) > MAX_FILE:
                raise DBError(f"{cc}.iv{fam}: {len(data)} bytes, the module reads at most {MAX_FILE}")
            files[f"{cc}.iv{fam}"] = data
    return files


def lookup(db: dict, addr) -> str | None:
    """The country of *addr* in a parse_csv() result (what the module computes)."""
    a = ipaddress.ip_address(addr)
    for cc, fams in db.items():
        if any(lo <= int(a) <= hi for lo, hi in fams[a.version]):
            return cc
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="start,end,CC rows (default: %(default)s)")
    ap.add_argument("--out", type=Path, required=True, help="directory to write CC.iv4/CC.iv6 into")
    args = ap.parse_args(argv)
    try:
        files = build(args.csv.read_text(), str(args.csv))
    except (OSError, DBError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (args.out / name).write_bytes(data)
    print(f"{len(files) // 2} countries, {len(files)} files in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
