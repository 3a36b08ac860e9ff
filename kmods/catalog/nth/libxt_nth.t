:INPUT,FORWARD,OUTPUT
-m nth --every 2;=;OK
-m nth --every 3 --counter 1 --packet 2;=;OK
-m nth --every 10 --counter 15 --start 5 --packet 9;=;OK
-m nth --every 3 --packet 3;;FAIL
-m nth --every 3 --start 3;;FAIL
-m nth --every 1;;FAIL
-m nth --every 2 --counter 16;;FAIL
-m nth --counter 1;;FAIL
