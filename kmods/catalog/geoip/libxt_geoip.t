# Rule syntax of the geoip match, iptables' *.t format. The rules name the
# kit's demonstration countries XA, XB, XC (geoip.csv), so the database must
# be installed in the guest's /usr/share/nflab/geoip (test_geoip.py does it
# and leaves the kit's database there); a country without a database file
# is refused by checkentry, as in the classic match.
:INPUT,FORWARD,OUTPUT
-m geoip --src-cc XA;=;OK
-m geoip ! --src-cc XA;=;OK
-m geoip --src-cc XA,XB,XC;=;OK
-m geoip --src-cc xa,Xc;-m geoip --src-cc XA,XC;OK
-m geoip --dst-cc XB;=;OK
-m geoip ! --dst-cc XB;=;OK
-m geoip --src-cc XA ! --dst-cc XB;=;OK
-p udp -m geoip ! --src-cc XC,XB --dst-cc XA;=;OK
-m geoip --src-cc QZ;;FAIL
-m geoip;;FAIL
-m geoip --src-cc X;;FAIL
-m geoip --src-cc XAB;;FAIL
-m geoip --src-cc XA,;;FAIL
-m geoip --src-cc XA,XA;;FAIL
-m geoip --src-cc X1;;FAIL
-m geoip --src-cc XA,XB,XC,XA,XB,XC,XA,XB,XC,XA,XB,XC,XA,XB,XC,XD;;FAIL
