# BitTorrent - peer protocol, DHT, trackers (nflab pattern set)
# From BEP 3: the peer handshake (19, "BitTorrent protocol") and the tracker's
# HTTP GET /announce (and /scrape, BEP 48) with info_hash; BEP 5: DHT KRPC
# messages, bencoded dictionaries starting d1:a (queries) or d1:r (answers)
# with a 20-byte node id; BEP 15: the UDP tracker connect request, whose
# connection_id is the magic 0x41727101980 (its NUL bytes are removed
# before the search).
bittorrent
^(\x13bittorrent protocol|d1:[ar]d2:id20:|get /(announce|scrape)\?info_hash=|\x04\x17\x27\x10\x19\x80)
