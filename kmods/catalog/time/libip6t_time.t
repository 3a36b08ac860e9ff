# IPv6 rule syntax of the time match
:INPUT,FORWARD,OUTPUT
-m time --timestart 08:00:00 --timestop 17:00:00 --weekdays Mon,Fri;=;OK
-m time --datestart 2030-06-30T12:00:00;=;OK
