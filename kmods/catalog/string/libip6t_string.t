# IPv6 rule syntax of the string match
:INPUT,FORWARD,OUTPUT
-m string --string "test" --algo bm;=;OK
-m string ! --hex-string "|dead|" --algo kmp --from 40;=;OK
-m string --algo kmp;;FAIL
