#!/bin/sh
# nflab guest init: PID 1 of the lab VM (stage 2, after the initramfs).
#
# No systemd: mount the pseudo filesystems, bring up the slirp NIC with the
# static address QEMU's user network expects, mount the kernel's modules disk,
# install the lab's SSH key from the kernel command line, start sshd, tell the
# host on the console, then reap orphans until asked to power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

say() { echo "nflab-init: $*" > /dev/console; }

mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sys /sys
mountpoint -q /dev || mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t tmpfs -o mode=755 run /run
mount -t tmpfs -o mode=1777 tmp /tmp
mkdir -p /run/sshd /run/lock
hostname nflab

key=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        nflab.key=*) key="${arg#nflab.key=}" ;;
    esac
done
if [ -n "$key" ]; then
    mkdir -p -m 700 /root/.ssh
    echo "ssh-ed25519 $key nflab" > /root/.ssh/authorized_keys
    chmod 600 /root/.ssh/authorized_keys
else
    say "no nflab.key= on the kernel command line: SSH login will fail"
fi

ip link set lo up
ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up && ip route add default via 10.0.2.2 \
    || say "eth0 setup failed"
/usr/sbin/sshd -E /run/sshd.log || say "sshd failed to start"

rel=$(uname -r)
mkdir -p "/lib/modules/$rel"
mount -t ext4 -o ro LABEL=nflab-mods "/lib/modules/$rel" || say "modules disk not mounted"
for nic in eth1 eth2; do
    [ -e /sys/class/net/$nic ] && ip link set $nic up
done
say "ready $rel"

shutdown() {
    say "powering off"
    sync
    echo o > /proc/sysrq-trigger
}
trap shutdown TERM USR2 INT
# dash's wait reaps every child of PID 1, so orphans never pile up as zombies
while :; do
    sleep 3600 &
    wait $!
done
