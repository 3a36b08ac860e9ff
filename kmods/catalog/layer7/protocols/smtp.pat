# SMTP - Simple Mail Transfer Protocol (nflab pattern set)
# From RFC 5321: the server opens with a 220 greeting (section 4.2, "220"
# then text, lines may continue as 220-), which usually names ESMTP or SMTP;
# when it does not, the client's EHLO or HELO (section 4.1.1.1) follows it.
smtp
^220[\x09-\x0d -~]*(e?smtp|\x0a(ehlo|helo) )
