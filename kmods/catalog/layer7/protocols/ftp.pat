# FTP - File Transfer Protocol control connection (nflab pattern set)
# From RFC 959: the server opens with 220 (section 5.4, service ready), whose
# text usually names FTP; when it does not, the client's first command
# follows: USER or PASS (section 4.1.1), AUTH (RFC 4217), FEAT or OPTS
# (RFC 2389), SYST.
ftp
^220[\x09-\x0d -~]*(ftp|\x0a(user|pass|auth|feat|opts|syst) )
