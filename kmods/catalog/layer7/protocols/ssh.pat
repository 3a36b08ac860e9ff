# SSH - Secure Shell (nflab pattern set)
# From RFC 4253 section 4.2: both sides open with the identification string
# SSH-protoversion-softwareversion, protoversion 2.0 (or 1.99 for a server that
# also speaks version 1, section 5.1); softwareversion is printable US-ASCII
# without hyphens or spaces.
ssh
^ssh-(2\.0|1\.99|1\.[0-9])-[!-,.-~]+
