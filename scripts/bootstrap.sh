#!/usr/bin/env bash
# Set up everything `make demo`, `make test` and `make bench` need on a fresh
# Debian machine: system packages (when root) and the project's virtualenv.
# Safe to run again: it installs only what is missing.
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# mosquitto: the reference broker in tests; stress-ng: the CPU baseline in
# benchmarks; nftables/iproute2: network faults and test namespaces;
# prometheus: the metrics probe's real server; qemu + busybox: the kernel tier.
SYSTEM_PACKAGES=(mosquitto stress-ng nftables iproute2 prometheus
                 qemu-system-x86 busybox-static procps)

missing=()
for pkg in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" \
        || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        echo "bootstrap: installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "bootstrap: missing system packages: ${missing[*]}" >&2
        echo "bootstrap: run as root, or install them with apt-get" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# pip's build warnings are noise on success; keep them for a failure.
log="$VENV/pip-install.log"
echo "bootstrap: installing the project and its Python dependencies into $VENV"
if ! { "$VENV/bin/pip" install --disable-pip-version-check --upgrade pip \
       && "$VENV/bin/pip" install --disable-pip-version-check -e ".[dev]"; } \
       >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "bootstrap: pip install failed; the whole log is in $log" >&2
    exit 1
fi
touch "$VENV/.installed"
