#!/bin/busybox sh
# nflab initramfs: load the virtio modules listed in /modules.order, mount the
# root image (label nflab-root) and switch_root to nflab's init.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

fail() {
    echo "nflab-initramfs: FAILED: $*" > /dev/console
    poweroff -f
}

for m in $(cat /modules.order); do
    insmod "/modules/$m.ko" || echo "nflab-initramfs: insmod $m failed" > /dev/console
done

if grep -q nflab.probe /proc/cmdline; then
    echo "nflab-probe-ok" > /dev/console
    poweroff -f
fi

root=
i=0
while [ $i -lt 500 ]; do
    root=$(findfs LABEL=nflab-root 2>/dev/null) && break
    i=$((i + 1))
    usleep 10000
done
[ -n "$root" ] || fail "no disk labelled nflab-root (is the rootfs attached?)"
mkdir -p /newroot
mount -t ext4 -o rw "$root" /newroot || fail "cannot mount $root"
[ -x /newroot/sbin/nflab-init ] || fail "root image has no /sbin/nflab-init"
mount --move /dev /newroot/dev
umount /proc /sys
exec switch_root /newroot /sbin/nflab-init
