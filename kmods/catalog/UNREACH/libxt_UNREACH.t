# Rule syntax of the UNREACH target (IPv4), iptables' *.t format
:INPUT,FORWARD,OUTPUT
-j UNREACH;=;OK
-j UNREACH --reject-with port-unreach;-j UNREACH;OK
-j UNREACH --reject-with host-unreach;=;OK
-j UNREACH --reject-with net-unreach;=;OK
-j UNREACH --reject-with admin-prohib;=;OK
-p tcp --dport 22 -j UNREACH --reject-with admin-prohib;-p tcp -m tcp --dport 22 -j UNREACH --reject-with admin-prohib;OK
-j UNREACH --reject-with tcp-reset;;FAIL
-j UNREACH --reject-with;;FAIL
*mangle
:PREROUTING,INPUT
-j UNREACH;;FAIL
