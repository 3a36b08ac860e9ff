# IPv6 rule syntax of the layer7 match
:INPUT,FORWARD,OUTPUT
-m layer7 --l7proto http;=;OK
-p udp -m layer7 ! --l7proto dns;=;OK
-m layer7 --l7dir /etc/l7-protocols --l7proto ssl;-m layer7 --l7dir "/etc/l7-protocols" --l7proto ssl;OK
-m layer7 --l7proto nosuchproto;;FAIL
