# IPv6 rule syntax of the ipp2p match
:INPUT,FORWARD,OUTPUT
-m ipp2p --edk --kazaa --bit;=;OK
-p udp -m ipp2p --bit;=;OK
-m ipp2p --ipp2p;=;OK
-m ipp2p;;FAIL
