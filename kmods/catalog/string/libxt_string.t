# Rule syntax of the string match, iptables' *.t format. Saved as the classic
# plugin (libxt_string) saves: [!] --string or --hex-string by the pattern's
# bytes (hex when one is not printable or the last is a backslash), --algo,
# --from unless 0, --to unless 65535, --icase.
:INPUT,FORWARD,OUTPUT
-m string --algo bm --string "test";-m string --string "test" --algo bm;OK
-m string --string "test" --algo kmp;=;OK
-m string ! --string "test" --algo kmp;=;OK
-m string --string "test" --algo bm --icase;=;OK
-m string --string "test" --algo bm --from 10 --to 200;=;OK
-m string --string "test" --algo kmp --from 0 --to 65535;-m string --string "test" --algo kmp;OK
-m string --string "test" --algo bm --from 0;-m string --string "test" --algo bm;OK
-m string --string "test" --algo bm --to 65535;-m string --string "test" --algo bm;OK
-m string --string "test" --algo bm --from 0 --to 100;-m string --string "test" --algo bm --to 100;OK
-m string --string "test" --algo bm --from 5 --to 65535;-m string --string "test" --algo bm --from 5;OK
-m string --string "test" --algo bm --from 0 --to 65535 --icase;-m string --string "test" --algo bm --icase;OK
-m string --icase --to 10 --from 2 --algo kmp --string "x";-m string --string "x" --algo kmp --from 2 --to 10 --icase;OK
-m string --string "GET /index.html" --algo bm;=;OK
-m string --string "with \"quote\"" --algo bm;=;OK
-m string --string "ends in \\" --algo bm;-m string --hex-string "|656e647320696e205c|" --algo bm;OK
-m string --hex-string "|0d0a|" --algo bm;=;OK
-m string ! --hex-string "|00ff10|" --algo kmp;=;OK
-m string --hex-string "GET|20|/" --algo bm;-m string --string "GET /" --algo bm;OK
-m string --hex-string "|74657374|" --algo bm --from 0 --to 65535;-m string --string "test" --algo bm;OK
-m string ! --hex-string "|41|" --algo bm;-m string ! --string "A" --algo bm;OK
-m string --hex-string "ab|09|c" --algo bm;-m string --hex-string "|61620963|" --algo bm;OK
-m string --hex-string "|0a 0b 0c|" --algo bm;-m string --hex-string "|0a0b0c|" --algo bm;OK
-m string --string "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" --algo bm;=;OK
-m string --string "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" --algo bm;;FAIL
# 128 bytes, the most there is (what --string of 127 A and a backslash saves as)
-m string --hex-string "|414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141415c|" --algo bm;=;OK
-m string --hex-string "|414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141414141|" --algo bm;;FAIL
-m string --string "test";;FAIL
-m string --algo bm;;FAIL
-m string --string "test" --algo ac;;FAIL
-m string --string "test" --algo bm --from 20 --to 10;;FAIL
-m string --string "a" --hex-string "|61|" --algo bm;;FAIL
-m string --hex-string "|0g|" --algo bm;;FAIL
-m string --hex-string "|0a" --algo bm;;FAIL
-m string --string "test" --algo bm --to 65536;;FAIL
