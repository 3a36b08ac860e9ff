# Rule syntax of the TTLSET target (IPv6: the hop limit), iptables' *.t format
*mangle
:PREROUTING,INPUT,FORWARD,OUTPUT,POSTROUTING
-j TTLSET --ttl-set 64;=;OK
-j TTLSET --ttl-dec 3;=;OK
-j TTLSET --ttl-inc 1;=;OK
-j TTLSET --ttl-inc 1 --ttl-set 3;;FAIL
-j TTLSET;;FAIL
