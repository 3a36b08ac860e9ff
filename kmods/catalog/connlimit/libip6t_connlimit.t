# IPv6 rule syntax of the connlimit match (saved as in libxt_connlimit.t)
:INPUT,FORWARD,OUTPUT
-m connlimit --connlimit-above 2 --connlimit-mask 64;-m connlimit --connlimit-above 2 --connlimit-mask 64 --connlimit-saddr;OK
-m connlimit --connlimit-upto 5 --connlimit-mask 128 --connlimit-daddr;=;OK
-m connlimit --connlimit-above 2;-m connlimit --connlimit-above 2 --connlimit-mask 128 --connlimit-saddr;OK
-m connlimit ! --connlimit-above 2 --connlimit-mask 48;-m connlimit --connlimit-upto 2 --connlimit-mask 48 --connlimit-saddr;OK
-m connlimit --connlimit-above 2 --connlimit-mask 129;;FAIL
