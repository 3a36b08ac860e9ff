# Rule syntax of the TTLSET target (IPv4), iptables' *.t format
:INPUT,FORWARD,OUTPUT
-j TTLSET --ttl-set 42;;FAIL
*mangle
:PREROUTING,INPUT,FORWARD,OUTPUT,POSTROUTING
-j TTLSET --ttl-set 42;=;OK
-j TTLSET --ttl-set 0;=;OK
-j TTLSET --ttl-set 255;=;OK
-j TTLSET --ttl-dec 1;=;OK
-j TTLSET --ttl-inc 5;=;OK
-p udp -j TTLSET --ttl-dec 200;=;OK
-j TTLSET --ttl-set 256;;FAIL
-j TTLSET --ttl-dec 0;;FAIL
-j TTLSET --ttl-inc 0;;FAIL
-j TTLSET --ttl-set 1 --ttl-dec 1;;FAIL
-j TTLSET;;FAIL
