# Rule syntax of the ipp2p match, iptables' *.t format. Saved in the classic
# order: --ipp2p, --edk, --dc, --gnu, --kazaa, --bit.
:INPUT,FORWARD,OUTPUT
-m ipp2p --edk;=;OK
-m ipp2p --kazaa;=;OK
-m ipp2p --bit;=;OK
-m ipp2p --dc;=;OK
-m ipp2p --gnu;=;OK
-m ipp2p --edk --kazaa --bit;=;OK
-m ipp2p --bit --kazaa --edk;-m ipp2p --edk --kazaa --bit;OK
-m ipp2p --edk --dc --gnu --kazaa --bit;=;OK
-p tcp -m ipp2p --bit;=;OK
-p udp -m ipp2p --edk --bit;=;OK
-m ipp2p --ipp2p;=;OK
-m ipp2p --ipp2p --edk;;FAIL
-m ipp2p;;FAIL
-m ipp2p --edk --edk;;FAIL
-m ipp2p ! --edk;;FAIL
-m ipp2p --apple;;FAIL
