# IPv6 rule syntax of the iprange match (ip6tables), iptables' *.t format
:INPUT,FORWARD,OUTPUT
-m iprange --src-range 2001:db8::1-2001:db8::10;=;OK
-m iprange ! --src-range 2001:db8::1-2001:db8::10;=;OK
-m iprange --dst-range 2001:db8::1-2001:db8::ffff:1;=;OK
-m iprange ! --dst-range ::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff;=;OK
-m iprange --src-range 2001:db8::10-2001:db8::1;;FAIL
-m iprange --src-range 1.1.1.1-1.1.1.2;;FAIL
