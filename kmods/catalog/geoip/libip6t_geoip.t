# IPv6 rule syntax of the geoip match (reads the CC.iv6 files)
:INPUT,FORWARD,OUTPUT
-m geoip --src-cc XA;=;OK
-m geoip ! --dst-cc XB,XC;=;OK
-m geoip --src-cc QZ;;FAIL
-m geoip;;FAIL
