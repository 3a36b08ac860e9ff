# HTTP/1.x - Hypertext Transfer Protocol (nflab pattern set)
# From RFC 9112: a request-line is method SP request-target SP HTTP-version
# (section 3), a status-line HTTP-version SP status-code SP (section 4); the
# methods of RFC 9110 section 9 and PATCH (RFC 5789), and PRI, the HTTP/2
# connection preface (RFC 9113 section 3.4). Anchored: the client speaks
# first, so a connection's data starts with the request (or, seen from the
# middle of a path that missed it, with the response).
http
^(get|post|head|put|delete|connect|options|trace|patch|pri) [!-~]+ http/[0-9]\.[0-9]|^http/[0-9]\.[0-9] [1-5][0-9][0-9]
