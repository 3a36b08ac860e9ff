# Rule syntax of the time match, iptables' *.t format. Saved as the classic
# plugin (libxt_time) saves: timestart and timestop (both, when either is
# not the whole day), monthdays, weekdays ("!" folded into the other days),
# datestart, datestop, kerneltz, contiguous; times with seconds, dates as
# UTC. Not as it: a rule without --datestop saves none (the classic plugin
# saves its 32-bit default --datestop 2038-01-19T03:14:07), a --datestop at
# the epoch is saved (the classic plugin drops it, so its rule that never
# matches restores as one that always does), dates past 2038 and lower-case
# day names are taken, and numbers are digits only, no more than the field has.
:INPUT,FORWARD,OUTPUT
-m time --timestart 01:02:03 --timestop 04:05:06;=;OK
-m time --timestart 08:00 --timestop 17:00;-m time --timestart 08:00:00 --timestop 17:00:00;OK
-m time --timestart 22:00:00 --timestop 02:00:00 --contiguous;=;OK
-m time --weekdays Mon,Tue,Wed,Thu,Fri;=;OK
-m time ! --weekdays Sat,Sun;-m time --weekdays Mon,Tue,Wed,Thu,Fri;OK
-m time --weekdays sun,1;-m time --weekdays Mon,Sun;OK
-m time --monthdays 1,15,31;=;OK
-m time ! --monthdays 31;-m time --monthdays 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30;OK
-m time --datestart 2024-01-01T00:00:00 --datestop 2038-01-20T03:14:08;=;OK
-m time ! --weekdays Mon,Tue,Wed,Thu,Fri,Sat,Sun;;FAIL
-m time ! --monthdays 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31;;FAIL
-m time --timestart 12:30junk;;FAIL
-m time --timestart 12:30:;;FAIL
-m time --datestart 2024-01-01xyz;;FAIL
-m time --datestart 2024-01-01T12:30junk;;FAIL
-m time --datestart 2024-01-01;-m time --datestart 2024-01-01T00:00:00;OK
-m time --datestop 2106-02-07T06:28:16;=;OK
-m time --timestart 08:00:00 --weekdays Mon --kerneltz;-m time --timestart 08:00:00 --timestop 23:59:59 --weekdays Mon --kerneltz;OK
-m time --timestop 17:00;-m time --timestart 00:00:00 --timestop 17:00:00;OK
-m time --timestart 00:00 --timestop 23:59:59;-m time;OK
-m time --weekdays Mon,Tue,Wed,Thu,Fri,Sat,Sun --monthdays 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31;-m time;OK
-m time --datestart 1970-01-01 --weekdays Sun;-m time --weekdays Sun;OK
-m time --kerneltz --contiguous --timestop 06:00 --timestart 22:00 --datestop 2025-12-31T23:59:59 --monthdays 15 --datestart 2025-01-01;-m time --timestart 22:00:00 --timestop 06:00:00 --monthdays 15 --datestart 2025-01-01T00:00:00 --datestop 2025-12-31T23:59:59 --kerneltz --contiguous;OK
-m time --timestart 24:00;;FAIL
-m time --timestart 8;;FAIL
-m time --weekdays Moo;;FAIL
-m time --weekdays 8;;FAIL
-m time --monthdays 0;;FAIL
-m time --monthdays 32;;FAIL
-m time --datestart 2024-13-01;;FAIL
-m time --datestart 2024-02-01 --datestop 2024-01-01;;FAIL
-m time --timestart 08:00 --timestop 17:00 --contiguous;;FAIL
-m time --datestop 1970-01-01;-m time --datestop 1970-01-01T00:00:00;OK
-m time --timestart 4294967319:00;;FAIL
-m time --timestart +1:02;;FAIL
-m time --timestart -0:00;;FAIL
-m time --datestart -001-01-01;;FAIL
-m time --datestart 2024-02-31;;FAIL
-m time --datestart 2024-02-29T12:00;-m time --datestart 2024-02-29T12:00:00;OK
