# Rule syntax of the string match, iptables' *.t format. Saved as the classic
# plugin saves: --string/--hex-string, --algo, --from, --to, --icase.
:INPUT,FORWARD,OUTPUT
-m string --algo bm --string "test";-m string --string "test" --algo bm;OK
-m string --string "test" --algo kmp;=;OK
-m string ! --string "test" --algo kmp;=;OK
-m string --string "test" --algo bm --icase;=;OK
-m string --string "test" --algo bm --from 10 --to 200;=;OK
-m string --string "test" --algo kmp --from 0 --to 65535;=;OK
-m string --string "GET /index.html" --algo bm;=;OK
-m string --string "with \"quote\"" --algo bm;=;OK
-m string --hex-string "|0d0a|" --algo bm;=;OK
-m string ! --hex-string "|00ff10|" --algo kmp;=;OK
-m string --hex-string "GET|20|/" --algo bm;-m string --hex-string "|474554202f|" --algo bm;OK
-m string --hex-string "|0a 0b 0c|" --algo bm;-m string --hex-string "|0a0b0c|" --algo bm;OK
-m string --string "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" --algo bm;=;OK
-m string --string "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" --algo bm;;FAIL
-m string --string "test";;FAIL
-m string --algo bm;;FAIL
-m string --string "test" --algo ac;;FAIL
-m string --string "test" --algo bm --from 20 --to 10;;FAIL
-m string --string "a" --hex-string "|61|" --algo bm;;FAIL
-m string --hex-string "|0g|" --algo bm;;FAIL
-m string --hex-string "|0a" --algo bm;;FAIL
-m string --string "test" --algo bm --to 65536;;FAIL
