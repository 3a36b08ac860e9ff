# Rule syntax of the connlimit match (IPv4), iptables' *.t format.
# Saved as given (the classic plugin also printed the default mask and saddr).
:INPUT,FORWARD,OUTPUT
-m connlimit --connlimit-upto 0;=;OK
-m connlimit --connlimit-upto 4294967295;=;OK
-m connlimit --connlimit-above 2;=;OK
-m connlimit ! --connlimit-above 2;=;OK
-m connlimit --connlimit-above 2 --connlimit-mask 24;=;OK
-m connlimit --connlimit-above 2 --connlimit-mask 0 --connlimit-daddr;=;OK
-m connlimit --connlimit-upto 10 --connlimit-mask 32 --connlimit-saddr;=;OK
-p tcp --syn --dport 22 -m connlimit --connlimit-above 3;-p tcp -m tcp --dport 22 --tcp-flags FIN,SYN,RST,ACK SYN -m connlimit --connlimit-above 3;OK
-m connlimit --connlimit-upto 4294967296;;FAIL
-m connlimit --connlimit-upto -1;;FAIL
-m connlimit --connlimit-mask 24;;FAIL
-m connlimit --connlimit-above 2 --connlimit-upto 2;;FAIL
-m connlimit --connlimit-above 2 --connlimit-mask 33;;FAIL
-m connlimit --connlimit-above 2 --connlimit-saddr --connlimit-daddr;;FAIL
