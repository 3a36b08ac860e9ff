# IPv6 rule syntax of the string match (saved as in libxt_string.t)
:INPUT,FORWARD,OUTPUT
-m string --string "test" --algo bm;=;OK
-m string ! --hex-string "|dead|" --algo kmp --from 40;=;OK
-m string --algo bm --from 0 --to 65535 --string "test";-m string --string "test" --algo bm;OK
-m string --hex-string "|74657374|" --algo kmp --from 0 --to 1500 --icase;-m string --string "test" --algo kmp --to 1500 --icase;OK
-m string ! --hex-string "|41|" --algo bm --to 65535;-m string ! --string "A" --algo bm;OK
-m string --algo kmp;;FAIL
