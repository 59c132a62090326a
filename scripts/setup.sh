#!/usr/bin/env bash
# Installs what backupd and its test suite need on Debian 12 (idempotent):
# the qemu/NBD packages and the S3 test server (OpenStack Swift) when missing, then a
# virtualenv in .venv with the project and its test extras.  Safe to run again; it only
# adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
want() { command -v "$1" >/dev/null 2>&1 || need_pkgs+=("$2"); }
want qemu-system-x86_64 qemu-system-x86
want qemu-img qemu-utils
want qemu-nbd qemu-utils
want qemu-storage-daemon qemu-system-common
want nbdkit nbdkit
want nbd-server nbd-server
want nbdinfo libnbd-bin
want nbdcopy libnbd-bin
want systemd-analyze systemd
want openssl openssl
want strace strace  # the hostile-repository suite audits opened paths
# the S3 server of the tests: OpenStack Swift with s3api, and a memcached for it
want swift-proxy-server swift-proxy
want swift-object-server swift-object
want swift-container-server swift-container
want swift-account-server swift-account
want swift-ring-builder swift
want memcached memcached
[ -d /usr/lib/python3/dist-packages/swift ] || need_pkgs+=(python3-swift)
want cpio cpio  # scripts/build-guest.sh packs the Linux test guest's initrd
# the guest's ext4 disks are made and checked with e2fsprogs, called by path
for tool in mke2fs e2fsck dumpe2fs debugfs; do
    [ -x "/usr/sbin/$tool" ] || [ -x "/sbin/$tool" ] || need_pkgs+=(e2fsprogs)
done
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_pkgs+=(python3-venv)

if ((${#need_pkgs[@]})); then
    mapfile -t need_pkgs < <(printf '%s\n' "${need_pkgs[@]}" | sort -u)
    echo "setup: installing Debian packages: ${need_pkgs[*]}"
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
        --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
    echo "setup: backupd needs Python >= 3.11 ($PY is $("$PY" --version 2>&1))" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import backupd, nbdclient, pytest, qemu.qmp' >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.installed ]; then
    echo "setup: installing Python packages into .venv"
    # (the local package mirrors' "Location ... is ignored" notices are noise)
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' \
        2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
    touch .venv/.installed
fi
echo "setup: ready ($(.venv/bin/python --version), $(qemu-system-x86_64 --version | head -1))"
