#!/bin/sh
# nflab guest init: PID 1 of the lab VM, started by the initramfs (vm/guest/
# initramfs-init.sh), which has already mounted everything, set up the NICs and
# installed the lab key. No systemd: start sshd, tell the host on the console,
# then reap orphans until asked to power off (`poweroff` = kill -USR2 1).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

# -r: no re-exec per connection (saves ~0.3 s per login under TCG)
read -r up _ < /proc/uptime
echo "nflab-init: starting sshd after ${up}s" > /dev/console
/usr/sbin/sshd -r -E /run/sshd.log || echo "nflab-init: sshd failed to start" > /dev/console
# CPUs held back by maxcpus=1 (faster boot under TCG) come online now
for cpu in /sys/devices/system/cpu/cpu[0-9]*; do
    [ -w "$cpu/online" ] && [ "$(cat "$cpu/online")" = 0 ] && echo 1 > "$cpu/online"
done &
read -r up _ < /proc/uptime
echo "nflab-init: ready after ${up}s" > /dev/console

shutdown() {
    echo "nflab-init: powering off" > /dev/console
    sync
    echo o > /proc/sysrq-trigger
}
trap shutdown TERM USR2 INT
# dash's wait reaps every child of PID 1, so orphans never pile up as zombies
while :; do
    sleep 3600 &
    wait $!
done
