# Rule syntax of the UNREACH target (IPv6), iptables' *.t format
:INPUT,FORWARD,OUTPUT
-j UNREACH;=;OK
-j UNREACH --reject-with port-unreach;-j UNREACH;OK
-j UNREACH --reject-with admin-prohib;=;OK
-j UNREACH --reject-with icmp6-no-route;;FAIL
