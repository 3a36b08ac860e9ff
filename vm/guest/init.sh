#!/bin/sh
# nflab guest init: PID 1 of the lab VM, started by the initramfs (vm/guest/
# initramfs-init.sh), which has already mounted everything, set up the NICs and
# installed the lab key. No systemd: start sshd, tell the host on the console,
# then reap orphans until asked to power off (`poweroff` = kill -USR2 1).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

# -r: no re-exec per connection (saves ~0.3 s per login under TCG)
/usr/sbin/sshd -r -E /run/sshd.log || echo "nflab-init: sshd failed to start" > /dev/console
echo "nflab-init: ready" > /dev/console

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
