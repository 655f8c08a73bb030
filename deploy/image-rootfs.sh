#!/bin/sh
# Usage: deploy/image-rootfs.sh BINARY OUTDIR
#
# Assembles a distroless-style root filesystem for regrelay in OUTDIR (created; must not exist
# or be empty), for a `FROM scratch` image (deploy/Dockerfile's final stage COPYs it to /):
#   /usr/local/bin/regrelay            BINARY
#   the shared libraries `ldd BINARY` lists, and the dynamic loader, at the paths ldd gives
#   /etc/ssl/certs/ca-certificates.crt the CA bundle (CA_BUNDLE=FILE to take another one)
#   /etc/passwd, /etc/group            root, nonroot (65532), nobody; no login shells
#   /etc/nsswitch.conf                 hosts: files dns
#   /tmp                               empty, mode 1777
# No shell, no package manager, nothing else. Needs only POSIX sh, coreutils and ldd (libc-bin).
# tests/it/image.rs runs this script on the debug binary and builds the real final stage from it.
set -eu

die() {
  echo "image-rootfs: $*" >&2
  exit 1
}

[ "$#" -eq 2 ] || die "usage: $0 BINARY OUTDIR"
bin=$1
out=$2
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
umask 022

[ -f "$bin" ] && [ -x "$bin" ] || die "$bin: not an executable file"
[ -f "$ca_bundle" ] || die "$ca_bundle: no CA bundle (install ca-certificates)"
if [ -e "$out" ] && [ -n "$(ls -A "$out")" ]; then
  die "$out: exists and is not empty"
fi

mkdir -p "$out/usr/local/bin" "$out/etc/ssl/certs" "$out/tmp"
cp "$bin" "$out/usr/local/bin/regrelay"
chmod 0755 "$out/usr/local/bin/regrelay"

# Shared libraries and the loader, copied (symlinks resolved) to the very paths ldd prints: the
# loader path is the binary's PT_INTERP, the libraries sit in the loader's default directories,
# so no ld.so.cache is needed. A static binary ("not a dynamic executable") needs none.
libs=$(mktemp)
trap 'rm -f "$libs"' EXIT
if ! ldd "$bin" >"$libs" 2>&1; then
  grep -q 'not a dynamic executable' "$libs" || die "ldd $bin failed: $(cat "$libs")"
  : >"$libs"
fi
if grep -q 'not found' "$libs"; then
  die "ldd $bin: missing libraries: $(grep 'not found' "$libs" | tr -s ' \t' ' ')"
fi
while read -r first arrow path _rest; do
  case $first in
    /*) lib=$first ;; # the loader: "/lib64/ld-linux-x86-64.so.2 (0x...)"
    *)
      [ "$arrow" = "=>" ] || continue # linux-vdso.so.1 (0x...): in the kernel, no file
      case $path in /*) lib=$path ;; *) continue ;; esac
      ;;
  esac
  mkdir -p "$out$(dirname "$lib")"
  cp -L "$lib" "$out$lib"
done <"$libs"

cp -L "$ca_bundle" "$out/etc/ssl/certs/ca-certificates.crt"
chmod 0644 "$out/etc/ssl/certs/ca-certificates.crt"

cat >"$out/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
EOF
cat >"$out/etc/group" <<'EOF'
root:x:0:
nonroot:x:65532:
nogroup:x:65534:
EOF
cat >"$out/etc/nsswitch.conf" <<'EOF'
passwd: files
group: files
hosts: files dns
EOF
chmod 0644 "$out/etc/passwd" "$out/etc/group" "$out/etc/nsswitch.conf"
chmod 1777 "$out/tmp"
