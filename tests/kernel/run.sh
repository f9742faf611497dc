#!/usr/bin/env bash
# Run the kernel tier: boot Debian's stock kernel under QEMU (it has sch_netem
# and cgroup v2 controllers, which the development machines' kernel lacks) and
# run `PYTHON -m pytest -m kernel tests/kernel` inside it, once for the whole
# tier. Exits with pytest's exit code.
#
#   bash tests/kernel/run.sh .venv/bin/python [extra pytest args]
#
# Where QEMU cannot run here (not root, no apt-get to fetch it or the kernel),
# it prints a line starting with "SKIPPED" and why, and exits 0; only then.
#
# Environment: AFTERSHOCK_VM_DIR (cache, default /var/tmp/aftershock-vm),
# AFTERSHOCK_VM_TIMEOUT (seconds, default 2700), AFTERSHOCK_VM_MEMORY (MiB,
# default 2048), AFTERSHOCK_VM_CPUS (default 2).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VM_DIR=${AFTERSHOCK_VM_DIR:-/var/tmp/aftershock-vm}
export AFTERSHOCK_VM_DIR=$VM_DIR

if [ $# -lt 1 ]; then
    echo "usage: $0 PYTHON [pytest args...]" >&2
    exit 2
fi
PYTHON=$1
shift
# Absolute, but not through symlinks: a venv's python is a symlink whose
# target would lose the venv.
case $PYTHON in
    /*) ;;
    */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;;
    *) PYTHON=$(command -v "$PYTHON") ;;
esac

skip() {
    echo "SKIPPED kernel tier: $* (netem and cgroup v2 tests did not run)"
    exit 0
}

[ "$(id -u)" -eq 0 ] || skip "needs root to share / with the QEMU guest"
status=0
bash "$HERE/setup.sh" || status=$?
case $status in
    0) ;;
    3) skip "the VM cannot be prepared here (see the setup message above)" ;;
    *) echo "kernel-vm: setup failed with exit code $status" >&2; exit "$status" ;;
esac

RUN=$(mktemp -d "$VM_DIR/run.XXXXXX")
trap 'rm -rf "$RUN"' EXIT
{
    printf 'cd %q || exit 125\n' "$REPO"
    printf 'exec %q -m pytest -m kernel tests/kernel -s -q -p no:cacheprovider' "$PYTHON"
    for arg in "$@"; do printf ' %q' "$arg"; done
    printf '\n'
} > "$RUN/cmd.sh"

echo "kernel-vm: booting $(ls "$VM_DIR" | grep -m1 '^ready-' | sed 's/^ready-//')"
started=$(date +%s)
timeout "${AFTERSHOCK_VM_TIMEOUT:-2700}" qemu-system-x86_64 \
    -accel tcg -cpu max -m "${AFTERSHOCK_VM_MEMORY:-2048}" -smp "${AFTERSHOCK_VM_CPUS:-2}" \
    -bios /usr/share/qemu/qboot.rom -nodefaults -nographic -no-reboot -serial stdio \
    -device virtio-rng-pci \
    -kernel "$VM_DIR/vmlinux" -initrd "$VM_DIR/initrd.img" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 aftershock_repo=$REPO aftershock_run=$RUN" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs local,path="$REPO",mount_tag=repo,security_model=none,multidevs=remap \
    -virtfs local,path="$RUN",mount_tag=run,security_model=none,multidevs=remap \
    || echo "kernel-vm: qemu exited with code $?"

rc=$(cat "$RUN/rc" 2>/dev/null || echo 255)
echo "kernel-vm: guest finished in $(( $(date +%s) - started )) s, pytest exit code $rc"
exit "$rc"
