# DNS - Domain Name System queries and answers (nflab pattern set)
# From RFC 1035 section 4.1: a 12-byte header (ID, flags, QDCOUNT = 1 and
# three small counts), then the question: QNAME as length-prefixed labels of
# at most 63 bytes (letters, digits, - and _), QTYPE and QCLASS IN (1) or
# CH (3). Over TCP (section 4.2.2) a 16-bit length comes first. NUL bytes
# of the data are removed before the search, so the zero high bytes of the
# counts, type and class, and the root label, vanish.
dns
^.?.?.?.?.?.?\x01[\x01-\x10]?[\x01-\x10]?[\x01-\x10]?([\x01-\x3f][a-z0-9_-]+)+[\x01-\x41\xff][\x01\x03]
