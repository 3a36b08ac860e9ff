# Rule syntax of the connlimit match (IPv4), iptables' *.t format. Saved as
# the classic plugin (libxt_connlimit) saves: --connlimit-upto or
# --connlimit-above ("!" folded into the other one), then always
# --connlimit-mask and --connlimit-saddr or --connlimit-daddr.
:INPUT,FORWARD,OUTPUT
-m connlimit --connlimit-upto 0;-m connlimit --connlimit-upto 0 --connlimit-mask 32 --connlimit-saddr;OK
-m connlimit --connlimit-upto 4294967295;-m connlimit --connlimit-upto 4294967295 --connlimit-mask 32 --connlimit-saddr;OK
-m connlimit --connlimit-above 2;-m connlimit --connlimit-above 2 --connlimit-mask 32 --connlimit-saddr;OK
-m connlimit ! --connlimit-above 2;-m connlimit --connlimit-upto 2 --connlimit-mask 32 --connlimit-saddr;OK
-m connlimit ! --connlimit-upto 7 --connlimit-daddr;-m connlimit --connlimit-above 7 --connlimit-mask 32 --connlimit-daddr;OK
-m connlimit --connlimit-above 2 --connlimit-mask 24;-m connlimit --connlimit-above 2 --connlimit-mask 24 --connlimit-saddr;OK
-m connlimit --connlimit-above 2 --connlimit-mask 0 --connlimit-daddr;=;OK
-m connlimit --connlimit-upto 10 --connlimit-mask 32 --connlimit-saddr;=;OK
-m connlimit --connlimit-saddr --connlimit-mask 16 --connlimit-upto 3;-m connlimit --connlimit-upto 3 --connlimit-mask 16 --connlimit-saddr;OK
-p tcp --syn --dport 22 -m connlimit --connlimit-above 3;-p tcp -m tcp --dport 22 --tcp-flags FIN,SYN,RST,ACK SYN -m connlimit --connlimit-above 3 --connlimit-mask 32 --connlimit-saddr;OK
-m connlimit --connlimit-upto 4294967296;;FAIL
-m connlimit --connlimit-upto -1;;FAIL
-m connlimit --connlimit-mask 24;;FAIL
-m connlimit;;FAIL
-m connlimit --connlimit-above 2 --connlimit-upto 2;;FAIL
-m connlimit --connlimit-above 2 --connlimit-mask 33;;FAIL
-m connlimit --connlimit-above 2 --connlimit-saddr --connlimit-daddr;;FAIL
