#!/usr/bin/env bash
# kiln's Debian 12 test image: the stand-in for Ubuntu 22.04 that CI can build offline
# (only Debian's apt mirror is reachable here). Real systemd, real cloud-init 22.4.2, a real
# kernel. Built without loop mounts: mmdebstrap -> directory -> `mkfs.ext4 -d` -> qcow2.
#
#   images/debian-12-test/build.sh OUTDIR
#
# Writes OUTDIR/{disk.qcow2,kernel,initrd.img,image.json} atomically (OUTDIR.tmp, then rename).
# `kiln qemu image debian-12-test` runs this script with OUTDIR set to the cache path keyed by
# the sha256 of this file, so any edit here rebuilds the image once per machine.
# Needs root (ownership in the image comes from the directory tree), mmdebstrap, e2fsprogs,
# qemu-utils, python3, zstd.
set -euo pipefail

out=${1:?usage: build.sh OUTDIR}
suite=bookworm
mirror=${KILN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${KILN_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
disk_size=${KILN_IMAGE_DISK_SIZE:-4G}
# What cloud-init and the kiln bootstrap/daemon need on a node, nothing more:
# - systemd/udev/dbus: the daemon is a systemd unit; cloud-init sets the hostname via hostnamectl.
# - cloud-init (22.4.2 in bookworm) + python3; openssh-server so cc_ssh behaves as on Ubuntu.
# - curl, ca-certificates, coreutils (sha256sum), tar, gzip: the bootstrap's tools.
# - iproute2 + systemd-networkd (DHCP on the user-mode network), e2fsprogs (fsck of root).
# - tzdata: profiles set a timezone (cc_timezone fails the boot without /usr/share/zoneinfo).
# - python3 also runs the K3s/Tailscale contract stand-ins in the e2e test.
# - qemu-guest-agent: the VM chaos test (qemu/tests/chaos.rs) kills the daemon from the host
#   through QGA's guest-exec; udev starts the agent only when the VM has the
#   org.qemu.guest_agent.0 port, so ordinary boots carry no extra service.
packages=(
  systemd systemd-sysv udev dbus kmod
  linux-image-amd64 initramfs-tools
  cloud-init python3 openssh-server sudo
  curl ca-certificates iproute2 e2fsprogs procps tzdata
  qemu-guest-agent
)
cmdline="console=ttyS0 root=/dev/vda rw panic=-1"

[ "$(id -u)" = 0 ] || { echo "build.sh: must run as root (mkfs.ext4 -d copies ownership)" >&2; exit 1; }
for tool in mmdebstrap mkfs.ext4 qemu-img python3 zstd; do
  command -v "$tool" >/dev/null || { echo "build.sh: missing $tool (run .ci/install-deps)" >&2; exit 1; }
done

tmp="$out.tmp"
rm -rf "$tmp"
mkdir -p "$tmp"
work=$(mktemp -d "${TMPDIR:-/var/tmp}/kiln-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
started=$(date +%s)

# Files placed before any package is installed: initramfs-tools then builds its one initrd
# small (MODULES=list, just what a virtio ext4 root needs) instead of MODULES=most.
pre="$work/pre"
mkdir -p "$pre/etc/initramfs-tools/conf.d" "$pre/etc/initramfs-tools/hooks"
cat > "$pre/etc/initramfs-tools/conf.d/kiln-test.conf" <<'EOF'
MODULES=list
COMPRESS=gzip
EOF
cat > "$pre/etc/initramfs-tools/hooks/kiln-virtio" <<'EOF'
#!/bin/sh
# Debian builds virtio and ext4 as modules; direct kernel boot needs them in the initrd.
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
for m in virtio_pci virtio_blk ext4 crc32c_generic crc32c_intel; do
  manual_add_modules "$m"
done
EOF
chmod 0755 "$pre/etc/initramfs-tools/hooks/kiln-virtio"

# Files placed after installation.
post="$work/post"
mkdir -p "$post/etc/cloud/cloud.cfg.d" "$post/etc/systemd/network" "$post/etc/default"
cat > "$post/etc/cloud/cloud.cfg.d/99-kiln-test.cfg" <<'EOF'
# kiln Debian 12 test image. NoCloud finds the CIDATA volume by its label; None keeps a boot
# without a seed quiet instead of probing cloud metadata services (no traffic leaves the VM).
datasource_list: [NoCloud, None]
# No `locales` package: C.UTF-8 is built into glibc and /etc/default/locale already names it,
# so cc_locale has nothing to generate (any other locale would fail the boot).
locale: C.UTF-8
# The disk is already its final size and has no partition table.
growpart: {mode: "off"}
resize_rootfs: false
# systemd-networkd below does DHCP; cloud-init has no renderer to pick here.
network: {config: disabled}
ssh_genkeytypes: [ed25519]
EOF
cat > "$post/etc/default/locale" <<'EOF'
LANG=C.UTF-8
EOF
cat > "$post/etc/systemd/network/80-kiln-dhcp.network" <<'EOF'
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
EOF
cat > "$post/etc/fstab" <<'EOF'
/dev/vda / ext4 rw,errors=remount-ro 0 1
EOF
echo kiln-test > "$post/etc/hostname"

export KILN_PRE="$pre" KILN_POST="$post"
echo "build.sh: mmdebstrap $suite (${#packages[@]} packages) from $mirror" >&2
mmdebstrap --variant=apt --mode=root --format=directory \
  --include="$(IFS=,; echo "${packages[*]}")" \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --setup-hook='cp -a "$KILN_PRE"/. "$1"/' \
  --customize-hook='cp -a "$KILN_POST"/. "$1"/' \
  --customize-hook='chroot "$1" systemctl enable systemd-networkd.service' \
  --customize-hook='chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer' \
  --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*_key "$1"/etc/ssh/ssh_host_*_key.pub' \
  --customize-hook=': > "$1"/etc/machine-id' \
  --customize-hook='dpkg-query --admindir="$1"/var/lib/dpkg -W -f="\${Package}=\${Version}\n" > "$1"/../packages.txt' \
  "$suite" "$work/root" \
  "deb $mirror $suite main" "deb $mirror $suite-updates main" "deb $security $suite-security main"
rootfs_done=$(date +%s)

root="$work/root"
kver=$(ls "$root/lib/modules" | sort -V | tail -n1)
# Drivers a virtio VM never loads; dropping them makes the image smaller and mkfs faster.
for d in sound drivers/gpu drivers/media drivers/net/wireless drivers/infiniband drivers/staging \
  drivers/bluetooth drivers/net/ethernet drivers/iio drivers/isdn drivers/input/touchscreen \
  net/wireless net/mac80211 net/bluetooth; do
  rm -rf "$root/lib/modules/$kver/kernel/$d"
done
chroot "$root" depmod -a "$kver"
cp "$root/boot/initrd.img-$kver" "$tmp/initrd.img"

# An uncompressed kernel boots noticeably faster under TCG (no in-guest decompression); Debian's
# kernel has a PVH ELF note, so QEMU's -kernel takes the extracted vmlinux directly.
python3 - "$root/boot/vmlinuz-$kver" "$tmp/kernel" <<'PY'
import lzma, subprocess, sys, zlib
src, dst = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()
def gz(b): return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(b)
def xz(b): return lzma.LZMADecompressor().decompress(b)
def zst(b): return subprocess.run(["zstd", "-dc"], input=b, capture_output=True).stdout
for magic, fn in ((b"\x1f\x8b\x08", gz), (b"\xfd7zXZ\x00", xz), (b"\x28\xb5\x2f\xfd", zst)):
    pos = data.find(magic)
    while pos != -1:
        try:
            out = fn(data[pos:])
        except Exception:
            out = b""
        if out[:4] == b"\x7fELF":
            open(dst, "wb").write(out)
            print(f"build.sh: extracted vmlinux ({len(out)} bytes) at offset {pos}", file=sys.stderr)
            sys.exit(0)
        pos = data.find(magic, pos + 1)
print("build.sh: no compressed ELF found in vmlinuz; using it as is", file=sys.stderr)
open(dst, "wb").write(data)
PY

cloud_init_version=$(grep '^cloud-init=' "$work/packages.txt" | cut -d= -f2)
mkfs.ext4 -q -F -L kiln-root -d "$root" "$work/disk.raw" "$disk_size"
qemu-img convert -f raw -O qcow2 "$work/disk.raw" "$tmp/disk.qcow2"
cp "$work/packages.txt" "$tmp/packages.txt"
done_at=$(date +%s)

cat > "$tmp/image.json" <<EOF
{
  "name": "debian-12-test",
  "boot": "direct-kernel",
  "disk": "disk.qcow2",
  "kernel": "kernel",
  "initrd": "initrd.img",
  "cmdline": "$cmdline",
  "kernel_version": "$kver",
  "cloud_init_version": "$cloud_init_version",
  "rootfs_seconds": $((rootfs_done - started)),
  "image_seconds": $((done_at - rootfs_done))
}
EOF
rm -rf "$out"
mv "$tmp" "$out"
echo "build.sh: built $out in $((done_at - started))s (rootfs $((rootfs_done - started))s, image $((done_at - rootfs_done))s)" >&2
