"""Extra guest files an extension declares (geoip's database) are built on the host."""

from nflab import deploy


def test_geoip_ships_its_database():
    files = deploy.guest_files("geoip")
    assert sorted(files) == [f"/usr/share/nflab/geoip/{cc}.iv{v}" for cc in ("XA", "XB", "XC") for v in (4, 6)]
    assert all(data.startswith(b"NFLGEOIP") for data in files.values())


def test_user_csv_replaces_the_shipped_one(tmp_path, monkeypatch):
    csv = tmp_path / "mine.csv"
    csv.write_text("192.0.2.0,192.0.2.255,ZZ\n")
    monkeypatch.setenv("NFLAB_GEOIP_CSV", str(csv))
    assert sorted(deploy.guest_files("geoip")) == ["/usr/share/nflab/geoip/ZZ.iv4",
                                                   "/usr/share/nflab/geoip/ZZ.iv6"]


def test_extensions_without_guest_files():
    assert deploy.guest_files("iprange") == {}
