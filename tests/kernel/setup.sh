#!/usr/bin/env bash
# Prepare the kernel tier's virtual machine: Debian's stock kernel (which has
# sch_netem and cgroup v2 controllers) booted by QEMU, with this machine's / as
# its root. Nothing is installed into /boot or /lib/modules: the kernel package
# is downloaded and unpacked under $AFTERSHOCK_VM_DIR.
#
#   bash tests/kernel/setup.sh        # ~10-60 s the first time, instant after
#
# Exit codes: 0 ready; 3 cannot be prepared here (not root, no apt-get, no
# package mirror): run.sh reports the tier as SKIPPED; anything else: a bug.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
VM_DIR=${AFTERSHOCK_VM_DIR:-/var/tmp/aftershock-vm}

cannot() { echo "kernel-vm setup: $*" >&2; exit 3; }

need_root_and_apt() {
    [ "$(id -u)" -eq 0 ] || cannot "needs root (apt-get, QEMU's 9p root share)"
    command -v apt-get >/dev/null || cannot "needs apt-get (Debian or Ubuntu)"
}

# 1. QEMU, busybox (the guest's first userland) and cpio/gzip from apt.
if ! command -v qemu-system-x86_64 >/dev/null || [ ! -f /usr/share/qemu/qboot.rom ]; then
    need_root_and_apt
    apt-get update -qq || cannot "apt-get update failed (no package mirror?)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        qemu-system-x86 >/dev/null || cannot "cannot install qemu-system-x86"
fi

# 2. The kernel: the package linux-image-amd64 currently points to. The
#    cache is keyed by that package, so a kernel update rebuilds it.
mkdir -p "$VM_DIR/debs"
kernel_package() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
PACKAGE=$(kernel_package)
if [ -z "$PACKAGE" ]; then
    need_root_and_apt
    apt-get update -qq || cannot "apt-get update failed (no package mirror?)"
    PACKAGE=$(kernel_package)
fi
[ -n "$PACKAGE" ] || cannot "apt knows no linux-image-amd64 package"

STAMP="$VM_DIR/ready-$PACKAGE-$(sha256sum "$HERE/init" "$HERE/setup.sh" | sha256sum | cut -c1-12)"
if [ -f "$STAMP" ]; then
    exit 0
fi

cd "$VM_DIR/debs"
if ! ls "$PACKAGE"_*.deb >/dev/null 2>&1; then
    need_root_and_apt
    echo "kernel-vm setup: downloading $PACKAGE (~70 MB) and busybox-static"
    apt-get download -qq "$PACKAGE" >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get download -qq "$PACKAGE"; } \
        || cannot "cannot download $PACKAGE"
fi
if ! ls busybox-static_*.deb >/dev/null 2>&1; then
    apt-get download -qq busybox-static >/dev/null 2>&1 \
        || cannot "cannot download busybox-static"
fi

rm -rf "$VM_DIR/kernel" "$VM_DIR/busybox" "$VM_DIR/initramfs"
dpkg-deb -x "$PACKAGE"_*.deb "$VM_DIR/kernel"
dpkg-deb -x busybox-static_*.deb "$VM_DIR/busybox"
RELEASE=$(ls "$VM_DIR/kernel/lib/modules")
BUSYBOX="$VM_DIR/busybox/bin/busybox"
MODULES="$VM_DIR/kernel/lib/modules/$RELEASE"

# 3. An uncompressed vmlinux: QEMU boots its PVH entry directly, seconds
#    faster under the software CPU than the bzImage's decompressor.
python3 - "$VM_DIR/kernel/boot/vmlinuz-$RELEASE" "$VM_DIR/vmlinux" <<'EOF'
import lzma, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit("vmlinuz holds no xz stream; this kernel is packed differently")
open(sys.argv[2], "wb").write(lzma.LZMADecompressor().decompress(data[start:]))
EOF

# 4. The initramfs: busybox, the modules the guest needs, and our init.
"$BUSYBOX" depmod -b "$VM_DIR/kernel" "$RELEASE"
ROOT="$VM_DIR/initramfs"
mkdir -p "$ROOT"/{bin,sbin,proc,sys,dev,newroot,lower,upper,lib/modules/"$RELEASE"}
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$ROOT/bin/$applet"
done
# The kernel's request_module() calls /sbin/modprobe for qdiscs on demand.
ln -sf ../bin/busybox "$ROOT/sbin/modprobe"

wanted=$(cd "$MODULES" && ls \
    kernel/net/sched/*.ko kernel/net/9p/*.ko kernel/fs/9p/9p.ko \
    kernel/fs/overlayfs/overlay.ko kernel/drivers/virtio/*.ko \
    kernel/drivers/net/veth.ko kernel/drivers/net/ifb.ko \
    kernel/drivers/char/hw_random/virtio-rng.ko kernel/crypto/crc32c_generic.ko \
    kernel/net/netfilter/nf_tables.ko kernel/net/netfilter/nft_*.ko \
    kernel/net/netfilter/nf_conntrack.ko kernel/net/netfilter/nf_nat.ko \
    kernel/net/ipv4/netfilter/*.ko kernel/net/ipv6/netfilter/*.ko 2>/dev/null)
for module in $wanted; do
    # Each wanted module with everything it depends on.
    grep "^$module:" "$MODULES/modules.dep" | tr -d ':' | tr ' ' '\n'
done | sort -u | while read -r module; do
    [ -n "$module" ] || continue
    mkdir -p "$ROOT/lib/modules/$RELEASE/$(dirname "$module")"
    cp "$MODULES/$module" "$ROOT/lib/modules/$RELEASE/$module"
done
cp "$MODULES/modules.builtin" "$MODULES/modules.order" "$ROOT/lib/modules/$RELEASE/"
"$BUSYBOX" depmod -b "$ROOT" "$RELEASE"
install -m 755 "$HERE/init" "$ROOT/init"
(cd "$ROOT" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -1) \
    > "$VM_DIR/initrd.img"

rm -f "$VM_DIR"/ready-*
touch "$STAMP"
echo "kernel-vm setup: ready ($PACKAGE, $RELEASE, initrd $(du -h "$VM_DIR/initrd.img" | cut -f1))"
