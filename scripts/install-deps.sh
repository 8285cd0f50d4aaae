#!/usr/bin/env bash
# Installs what Tierback's demo, tests and benchmarks need on Debian: the tools
# that build realistic VM disks (qemu-img, mkfs.*, sgdisk, ntfs-3g, mtools) and
# GNU time for peak-memory figures. Extra package names given as arguments
# (the benchmark's restic and borgbackup) are installed too. Idempotent; quiet
# when all is present.
set -euo pipefail
pkgs=(qemu-utils e2fsprogs ntfs-3g ntfs-3g-dev xfsprogs gdisk fdisk dosfstools mtools gcc openssl time sqlite3 "$@")
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian packages: ${missing[*]}" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "error: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    SUDO=sudo
  fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
for tool in qemu-img mkfs.ext4 mkfs.xfs mkntfs ntfscp sgdisk sfdisk mkfs.vfat mcopy cc sqlite3; do
  command -v "$tool" >/dev/null || { echo "error: $tool is still missing after installing packages" >&2; exit 1; }
done
