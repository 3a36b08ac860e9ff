#!/bin/busybox sh
# nflab initramfs /init: everything that must happen before sshd, done by static
# busybox (its applets run without exec, which matters under TCG where every
# dynamically linked exec costs ~60 ms):
#   load the virtio modules in /modules.order, mount the root image (label
#   nflab-root, read-only under a tmpfs overlay) and the kernel's modules image
#   (label nflab-mods, read-only at /lib/modules/$(uname -r)), mount the pseudo
#   filesystems, name the NICs by MAC
#   (nflab.nics=), give eth0 the static slirp address, install the lab key
#   (nflab.key=), then switch_root to /sbin/nflab-init, which starts sshd.
# A failure prints "nflab-initramfs: FAILED: ..." and powers off, so the host
# sees QEMU exit and reports the console.
# (the applets' links to busybox are in the initramfs: made at build time)
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

fail() {
    echo "nflab-initramfs: FAILED: $*" > /dev/console
    poweroff -f
}

read -r up _ < /proc/uptime
echo "nflab-initramfs: started after ${up}s" > /dev/console
read -r cmdline < /proc/cmdline
for m in $(cat /modules.order); do
    case "$m $cmdline " in
    # -M microvm (pci=off): its virtio devices are on MMIO, so the PCI transport
    # has nothing to drive (3 modules less to load)
    virtio_pci*" pci=off "*) continue ;;
    esac
    insmod "/modules/$m.ko" || echo "nflab-initramfs: insmod $m failed" > /dev/console
done

key= nics= probe=
for arg in $cmdline; do
    case "$arg" in
        nflab.key=*) key="${arg#nflab.key=}" ;;
        nflab.nics=*) nics="${arg#nflab.nics=}" ;;
        nflab.probe) probe=1 ;;
    esac
done
if [ -n "$probe" ]; then
    echo "nflab-probe-ok" > /dev/console
    poweroff -f
fi

label_dev() {
    i=0
    while [ $i -lt 300 ]; do
        findfs "LABEL=$1" 2>/dev/null && return 0
        i=$((i + 1))
        usleep 10000
    done
    return 1
}
read -r up _ < /proc/uptime
echo "nflab-initramfs: modules loaded after ${up}s" > /dev/console
root=$(label_dev nflab-root) || fail "no disk labelled nflab-root (is the rootfs attached?)"
# the image stays read-only (QEMU opens it readonly=on): the root is an overlay
# whose upper layer is a tmpfs, so writes live in guest RAM, every boot starts
# clean and a saved VM state never refers to disk blocks it does not have
mkdir -p /lower /rw
mount -t ext4 -o ro,noload "$root" /lower || fail "cannot mount the root image $root"
mount -t tmpfs -o mode=755 rw /rw || fail "cannot mount the tmpfs for the root overlay"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work root /newroot \
    || fail "cannot mount the overlay root (is overlay.ko in the initramfs?)"
[ -x /newroot/sbin/nflab-init ] || fail "the root image has no /sbin/nflab-init"

R=/newroot
rel=$(uname -r)
mods=$(label_dev nflab-mods) || fail "no disk labelled nflab-mods (the modules image)"
mkdir -p "$R/usr/lib/modules/$rel"
mount -t ext4 -o ro "$mods" "$R/usr/lib/modules/$rel" || fail "cannot mount the modules image"

hostname nflab
read -r up _ < /proc/uptime
echo "nflab-initramfs: disks mounted after ${up}s" > /dev/console

# rename NICs by MAC: nflab.nics=eth0/52:54:00:00:00:01,eth1/... (no subshells:
# each fork costs under TCG)
rename_nics() {
    local IFS=, nic mac pair
    for nic in /sys/class/net/*; do
        [ -e "$nic/address" ] || continue
        read -r mac < "$nic/address"
        for pair in $nics; do
            if [ "${pair#*/}" = "$mac" ] && [ "${nic##*/}" != "${pair%%/*}" ]; then
                ip link set "${nic##*/}" name "nflab-${pair%%/*}"
            fi
        done
    done
}
rename_nics
for nic in /sys/class/net/nflab-*; do
    [ -e "$nic" ] && ip link set "${nic##*/}" name "${nic##*/nflab-}"
done
ip link set lo up
for nic in /sys/class/net/eth*; do
    [ -e "$nic" ] && ip link set "${nic##*/}" up
done
ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 \
    || echo "nflab-initramfs: eth0 setup failed" > /dev/console

# the key's type is the first field of its blob: base64 of "\0\0\0\7ssh-rsa" or
# "\0\0\0\13ssh-ed25519"; any other type is said on the console, not guessed
case "$key" in
    AAAAB3NzaC1yc2E*) keytype=ssh-rsa ;;
    AAAAC3NzaC1lZDI1NTE5*) keytype=ssh-ed25519 ;;
    "") ;;
    *) echo "nflab-initramfs: nflab.key= is neither ssh-rsa nor ssh-ed25519: SSH login will fail" > /dev/console
       key= ;;
esac
if [ -n "$key" ]; then
    mkdir -p -m 700 $R/root/.ssh
    echo "$keytype $key nflab" > $R/root/.ssh/authorized_keys
    chmod 600 $R/root/.ssh/authorized_keys
else
    echo "nflab-initramfs: no nflab.key= on the kernel command line: SSH login will fail" > /dev/console
fi

# from here on the kernel's warnings reach the console too ("quiet" kept the boot's
# to errors): lockdep's splats are warnings, and the host finds faults on the console
echo 5 > /proc/sys/kernel/printk
mount --move /dev $R/dev
mount --move /proc $R/proc
mount --move /sys $R/sys
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 shm $R/dev/shm
mount -t tmpfs -o mode=755 run $R/run
mount -t tmpfs -o mode=1777 tmp $R/tmp
mkdir -p $R/run/sshd $R/run/lock $R/run/nflab/lower $R/run/nflab/rw
mount --move /lower $R/run/nflab/lower
mount --move /rw $R/run/nflab/rw
read -r up _ < $R/proc/uptime
echo "nflab-initramfs: switch_root after ${up}s" > /dev/console
exec switch_root $R /sbin/nflab-init
