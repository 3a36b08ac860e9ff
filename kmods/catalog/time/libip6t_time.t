# IPv6 rule syntax of the time match
:INPUT,FORWARD,OUTPUT
-m time --timestart 08:00:00 --timestop 17:00:00 --weekdays Mon,Fri;=;OK
-m time --datestart 2030-06-30T12:00:00;=;OK
-m time ! --weekdays Mon --timestart 06:00;-m time --timestart 06:00:00 --timestop 23:59:59 --weekdays Tue,Wed,Thu,Fri,Sat,Sun;OK
