# Rule syntax of the iprange match, iptables' extensions/*.t format:
#   RULE;SAVED;RESULT   SAVED "=" means iptables-save prints RULE back unchanged
:INPUT,FORWARD,OUTPUT
-m iprange --src-range 1.1.1.1-1.1.1.10;=;OK
-m iprange ! --src-range 1.1.1.1-1.1.1.10;=;OK
-m iprange --dst-range 1.1.1.1-1.1.1.10;=;OK
-m iprange ! --dst-range 1.1.1.1-1.1.1.10;=;OK
-m iprange --src-range 1.1.1.1-1.1.1.10 --dst-range 2.2.2.2-2.2.2.20;=;OK
-m iprange ! --src-range 1.1.1.1-1.1.1.10 ! --dst-range 2.2.2.2-2.2.2.20;=;OK
-m iprange --src-range 1.1.1.1;-m iprange --src-range 1.1.1.1-1.1.1.1;OK
-m iprange --src-range 0.0.0.0-255.255.255.255;=;OK
-m iprange --src-range 1.1.1.10-1.1.1.1;;FAIL
-m iprange --src-range 1.1.1.1-1.1.1.256;;FAIL
-m iprange --src-range 1.1.1.1-;;FAIL
-m iprange --src-range ::1-::2;;FAIL
-m iprange --src-range;;FAIL
-m iprange;;FAIL
*mangle
:PREROUTING,POSTROUTING
-m iprange --dst-range 10.0.0.0-10.255.255.255;=;OK
