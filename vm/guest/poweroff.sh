#!/bin/sh
# poweroff/reboot/halt for the nflab guest: ask PID 1 (vm/guest/init.sh) to power off.
exec kill -USR2 1
