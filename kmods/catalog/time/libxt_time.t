# Rule syntax of the time match, iptables' *.t format. Saved in the classic
# order: timestart, timestop, monthdays, weekdays, datestart, datestop,
# kerneltz, contiguous. Times print with seconds, dates as UTC.
:INPUT,FORWARD,OUTPUT
-m time --timestart 01:02:03 --timestop 04:05:06;=;OK
-m time --timestart 08:00 --timestop 17:00;-m time --timestart 08:00:00 --timestop 17:00:00;OK
-m time --timestart 22:00:00 --timestop 02:00:00 --contiguous;=;OK
-m time --weekdays Mon,Tue,Wed,Thu,Fri;=;OK
-m time ! --weekdays Sat,Sun;=;OK
-m time --weekdays sun,1;-m time --weekdays Mon,Sun;OK
-m time --monthdays 1,15,31;=;OK
-m time ! --monthdays 31;=;OK
-m time --datestart 2024-01-01T00:00:00 --datestop 2038-01-20T03:14:08;=;OK
-m time --datestart 2024-01-01;-m time --datestart 2024-01-01T00:00:00;OK
-m time --datestop 2106-02-07T06:28:16;=;OK
-m time --timestart 08:00:00 --weekdays Mon --kerneltz;=;OK
-m time --timestart 24:00;;FAIL
-m time --timestart 8;;FAIL
-m time --weekdays Moo;;FAIL
-m time --weekdays 8;;FAIL
-m time --monthdays 0;;FAIL
-m time --monthdays 32;;FAIL
-m time --datestart 2024-13-01;;FAIL
-m time --datestart 2024-02-01 --datestop 2024-01-01;;FAIL
-m time --timestart 08:00 --timestop 17:00 --contiguous;;FAIL
