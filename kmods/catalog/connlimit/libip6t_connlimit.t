# IPv6 rule syntax of the connlimit match
:INPUT,FORWARD,OUTPUT
-m connlimit --connlimit-above 2 --connlimit-mask 64;=;OK
-m connlimit --connlimit-upto 5 --connlimit-mask 128 --connlimit-daddr;=;OK
-m connlimit --connlimit-above 2 --connlimit-mask 129;;FAIL
