#!/usr/bin/env bash
# Builds the Linux test guest from Debian 12 packages: OUTDIR/vmlinuz and
# OUTDIR/initrd.cpio.gz (busybox, qemu-ga, the virtio modules and the scripts in
# scripts/guest/).  The packages are downloaded and unpacked, never installed.
# Idempotent: OUTDIR/stamp holds the sha256 of this script and of scripts/guest/*;
# a build with the same stamp is kept as it is.
#
#   scripts/build-guest.sh OUTDIR
set -euo pipefail

die() { echo "build-guest: $*" >&2; exit 1; }
[ $# = 1 ] || die "usage: $0 OUTDIR"
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)

# The guest boots these modules, each after what its depends= names (no modules.dep
# in the package, so the order is worked out here from the .ko files themselves).
wanted_modules=(virtio_blk virtio_console virtio_pci)
# Package names; the kernel is the one linux-image-cloud-amd64 depends on.
kernel_meta=linux-image-cloud-amd64
other_packages=(busybox-static qemu-guest-agent)

stamp=$(cat "$here/build-guest.sh" "$here"/guest/* | sha256sum | cut -d' ' -f1)

exec 9>"$out/.lock"
flock 9  # one build at a time into one OUTDIR
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] \
   && [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.cpio.gz" ]; then
    echo "build-guest: $out is up to date"
    exit 0
fi
for tool in apt-get apt-cache dpkg-deb cpio gzip ldd; do
    command -v "$tool" >/dev/null || die "$tool is missing (run scripts/setup.sh)"
done

tmp=$(mktemp -d /var/tmp/build-guest.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
started=$SECONDS

apt_get() { apt-get -q -o DPkg::Lock::Timeout=600 "$@"; }

kernel_package() {  # prints nothing when the package index does not know it
    { apt-cache depends "$kernel_meta" 2>/dev/null || true; } \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}

download() {  # download PACKAGE...: the .deb files into $tmp/debs
    mkdir -p "$tmp/debs"
    # apt drops privileges to _apt for downloads: let it write there
    if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then
        chmod 0755 "$tmp"
        chown _apt "$tmp/debs"
    fi
    (cd "$tmp/debs" && apt_get download "$@" >"$tmp/download.log" 2>&1)
}

kernel=$(kernel_package)
if [ -z "$kernel" ] || ! download "$kernel" "${other_packages[@]}"; then
    echo "build-guest: package index missing or stale; running apt-get update"
    apt_get update -qq || die "apt-get update failed"
    kernel=$(kernel_package)
    [ -n "$kernel" ] || die "no kernel package found for $kernel_meta"
    download "$kernel" "${other_packages[@]}" \
        || die "download failed: $(tail -3 "$tmp/download.log")"
fi

: >"$tmp/packages.txt"
for deb in "$tmp"/debs/*.deb; do
    dpkg-deb -x "$deb" "$tmp/x"
    dpkg-deb -W --showformat='${Package}=${Version}\n' "$deb" >>"$tmp/packages.txt"
done

root=$tmp/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,data,tmp,lib/modules}

# busybox and a link per applet (busybox's own names: sbin/poweroff, bin/sh, ...)
install -m 0755 "$tmp/x/bin/busybox" "$root/bin/busybox"
while read -r applet; do
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done < <("$root/bin/busybox" --list-full)

# qemu-ga and the shared libraries it loads, taken from the host (qemu is installed
# there, so its libraries are) with the paths ldd resolves them to
install -m 0755 "$tmp/x/usr/sbin/qemu-ga" "$root/usr/bin/qemu-ga"
libs=$(ldd "$tmp/x/usr/sbin/qemu-ga") || die "ldd qemu-ga failed"
if grep -q 'not found' <<<"$libs"; then
    die "qemu-ga needs libraries the host lacks: $(grep 'not found' <<<"$libs" | tr -s ' \t\n' ' ')"
fi
for lib in $(grep -o '/[^ ]*' <<<"$libs"); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done

# the virtio modules, decompressed, and their load order
moddir=$(find "$tmp/x/lib/modules" -mindepth 1 -maxdepth 1 -type d -print -quit)
[ -n "$moddir" ] || die "no modules in $kernel"
module_file() {  # the .ko, .ko.xz or .ko.zst of a module name
    find "$moddir/kernel" \( -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" \) -print -quit
}
unpack_module() {  # unpack_module NAME: lib/modules/NAME.ko in the initrd
    local src
    src=$(module_file "$1")
    [ -n "$src" ] || die "module $1 not found in $kernel"
    case "$src" in
        *.ko.xz) xz -dc "$src" >"$root/lib/modules/$1.ko" ;;
        *.ko.zst) zstd -qdc "$src" >"$root/lib/modules/$1.ko" ;;
        *) cp "$src" "$root/lib/modules/$1.ko" ;;
    esac
}
module_depends() {  # the names in a module's depends= (its .modinfo section)
    tr '\0' '\n' <"$root/lib/modules/$1.ko" | sed -n 's/^depends=//p' | tr ',' ' '
}
declare -A placed=()
order=()
place() {  # place NAME: its dependencies first, then itself
    local dep
    [ -z "${placed[$1]:-}" ] || return 0
    placed[$1]=visiting
    unpack_module "$1"
    for dep in $(module_depends "$1"); do
        [ "${placed[$dep]:-}" != visiting ] || die "module dependency cycle at $dep"
        place "$dep"
    done
    placed[$1]=done
    order+=("$1")
}
for module in "${wanted_modules[@]}"; do place "$module"; done
printf '%s\n' "${order[@]}" >"$root/lib/modules/load-order"

install -m 0755 "$here/guest/init" "$root/init"
install -m 0755 "$here/guest/shutdown" "$root/sbin/shutdown"
install -m 0755 "$here/guest/workload" "$root/bin/workload"
install -D -m 0755 "$here/guest/fsfreeze-hook" "$root/etc/qemu/fsfreeze-hook"

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort \
    | cpio -o -H newc -R 0:0 --reproducible --quiet) | gzip -6n >"$tmp/initrd.cpio.gz"
cp "$tmp"/x/boot/vmlinuz-* "$tmp/vmlinuz"

rm -f "$out/stamp"
mv "$tmp/vmlinuz" "$out/vmlinuz"
mv "$tmp/initrd.cpio.gz" "$out/initrd.cpio.gz"
mv "$tmp/packages.txt" "$out/packages.txt"
echo "$stamp" >"$out/stamp"
echo "build-guest: built $out in $((SECONDS - started)) s: $(paste -sd" " "$out/packages.txt"); modules: ${order[*]}"
