# SSL/TLS - a TLS ClientHello (nflab pattern set)
# From RFC 8446 sections 5.1 and 4.1.2 (and RFC 5246 sections 6.2.1, 7.4.1.2):
# a record of type handshake (22) with legacy_record_version 3.x and a 16-bit
# length (at most 2^14 + 2048), carrying a handshake message of type
# client_hello (1) with a 24-bit length and legacy_version 3.1-3.4. The data
# is searched with its NUL bytes removed, so the zero bytes of the versions
# and lengths are optional here.
ssl
^\x16\x03[\x01-\x04]?[\x01-\x48]?.?\x01[\x01-\x48]?.?\x03[\x01-\x04]
