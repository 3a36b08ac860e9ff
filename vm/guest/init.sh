#!/bin/sh
# nflab guest init: PID 1 of the lab VM, started by the initramfs (vm/guest/
# initramfs-init.sh), which has already mounted everything, set up the NICs and
# installed the lab key. No systemd: start sshd, tell the host on the console,
# then reap orphans until asked to power off (`poweroff` = kill -USR2 1).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

# the SSH server: dropbear (7 libraries; under TCG it starts in 0.05 s where
# OpenSSH's sshd, linked against 27, takes 0.28 s, and its logins are cheaper);
# nflab.sshd=openssh on the kernel command line (NFLAB_SSHD=openssh on the host)
# starts OpenSSH instead, with -r: no re-exec per connection (~0.3 s per login)
read -r cmdline < /proc/cmdline
read -r up _ < /proc/uptime
case " $cmdline " in
*" nflab.sshd=openssh "*)
    echo "nflab-init: starting sshd (OpenSSH) after ${up}s" > /dev/console
    /usr/sbin/sshd -r -E /run/sshd.log || echo "nflab-init: sshd failed to start" > /dev/console
    ;;
*)
    # listens before it forks to the background: once it returns, logins work.
    # -s: keys only; -m: no motd; -W: 1 MiB window (the default 24 KiB throttles
    # the tar streams `install` sends)
    echo "nflab-init: starting sshd (dropbear) after ${up}s" > /dev/console
    /usr/sbin/dropbear -s -m -W 1048576 -p 22 -P /run/sshd.pid \
        -r /etc/dropbear/dropbear_ed25519_host_key 2> /dev/console \
        || echo "nflab-init: sshd failed to start" > /dev/console
    ;;
esac
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
