"""geoip database builder (kmods/catalog/geoip/build_db.py): layout and validation."""

from __future__ import annotations

import struct

import pytest

from tests.suites.test_geoip import builder


@pytest.fixture(scope="module")
def b():
    return builder()


def test_shipped_csv_builds_both_families_per_country(b):
    from kmods.spec import CATALOG
    files = b.build((CATALOG / "geoip" / "geoip.csv").read_text())
    assert sorted(files) == ["XA.iv4", "XA.iv6", "XB.iv4", "XB.iv6", "XC.iv4", "XC.iv6"]
    for name, data in files.items():
        magic, ver, fam, _, count = struct.unpack("<8sBBHI", data[:16])
        assert (magic, ver, fam) == (b"NFLGEOIP", 1, int(name[-1]))
        assert len(data) == 16 + count * (8 if fam == 4 else 32)


def test_v4_records_are_le_u32_pairs_merged_and_sorted(b):
    files = b.build("192.0.2.10,192.0.2.20,xa\n192.0.2.21,192.0.2.30,XA\n10.0.0.0,10.0.0.0,XA\n")
    data = files["XA.iv4"]
    assert struct.unpack("<I", data[12:16]) == (2,)
    assert struct.unpack("<IIII", data[16:]) == (0x0a000000, 0x0a000000, 0xc000020a, 0xc000021e)
    assert struct.unpack("<I", files["XA.iv6"][12:16]) == (0,)


def test_v6_records_are_network_order(b):
    data = b.build("2001:db8::1,2001:db8::2,XA\n")["XA.iv6"]
    assert data[16:48] == bytes.fromhex("20010db8000000000000000000000001" "20010db8000000000000000000000002")


@pytest.mark.parametrize("csv, err", [
    ("192.0.2.1,192.0.2.0,XA\n", "above"),
    ("192.0.2.1,2001:db8::1,XA\n", "families"),
    ("192.0.2.1,192.0.2.2,X\n", "two letters"),
    ("192.0.2.1,192.0.2.2\n", "start,end,CC"),
    ("192.0.2.0,192.0.2.10,XA\n192.0.2.10,192.0.2.20,XB\n", "overlap"),
    ("192.0.2.300,192.0.2.2,XA\n", "csv:1"),
])
def test_bad_rows_are_refused(b, csv, err):
    with pytest.raises(b.DBError, match=err):
        b.build(csv)


def test_lookup_matches_the_ranges(b):
    db = b.parse_csv("192.0.2.0,192.0.2.63,XA\n192.0.2.64,192.0.2.127,XB\n")
    assert [b.lookup(db, a) for a in ("192.0.2.63", "192.0.2.64", "192.0.2.128")] == ["XA", "XB", None]
