# Rule syntax of the layer7 match (IPv4), iptables' *.t format. The rules
# name the kit's pattern set, which `invoke install --name=layer7` puts in
# the guest's /etc/l7-protocols/protocols. Saved as given, --l7dir first
# (where l7-filter's plugin needed it), only when it was given, quoted as
# iptables quotes strings with characters other than letters, digits, - and _.
:INPUT,FORWARD,OUTPUT
-m layer7 --l7proto http;=;OK
-m layer7 ! --l7proto ssh;=;OK
-p tcp -m layer7 --l7proto ssl;=;OK
-p udp -m layer7 --l7proto dns;=;OK
-m layer7 --l7proto bittorrent;=;OK
-m layer7 --l7proto smtp;=;OK
-m layer7 --l7proto ftp;=;OK
-m layer7 --l7dir /etc/l7-protocols --l7proto http;-m layer7 --l7dir "/etc/l7-protocols" --l7proto http;OK
-m layer7 --l7proto http --l7dir /etc/l7-protocols;-m layer7 --l7dir "/etc/l7-protocols" --l7proto http;OK
-m layer7 --l7dir "/etc/l7-protocols/protocols" ! --l7proto ftp;=;OK
-m layer7;;FAIL
-m layer7 --l7proto nosuchproto;;FAIL
-m layer7 --l7dir /nonexistent --l7proto http;;FAIL
-m layer7 --l7proto ../protocols/http;;FAIL
-m layer7 --l7proto http --l7proto ssh;;FAIL
-m layer7 --l7proto abcdefghijabcdefghijabcdefghijab;;FAIL
-m layer7 --l7dir /etc/l7-protocols;;FAIL
