#!/usr/bin/env bash
# Benchmark (not a test): full backup and restore throughput and peak memory
# of Tierback for a ~4 GiB VM disk, agent → gateway over loopback TLS with
# encryption on. Prints a table; figures are recorded in docs/benchmarks.md.
#
# The disk: GPT + one 4 GiB ext4 partition holding ~2.6 GB of real files
# (copies of /usr, log-like text, incompressible random data), as a dynamic
# VHDX made by qemu-img. Page cache is dropped before each step when the
# machine allows it (root); otherwise the table says "warm".
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
./scripts/install-deps.sh
cargo build --release --bins -q
GW="$ROOT/target/release/tierback-gateway"
AG="$ROOT/target/release/tierback-agent"
WORK="${TIERBACK_BENCH_DIR:-$(mktemp -d /tmp/tierback-bench.XXXXXX)}"
mkdir -p "$WORK"
echo "bench dir: $WORK" >&2

drop_caches() {
  sync
  if [ -w /proc/sys/vm/drop_caches ] && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then CACHE=cold; else CACHE=warm; fi
}

DISK="$WORK/bench-disk.vhdx"
RAW="$WORK/bench-disk.raw"
if [ ! -f "$DISK" ]; then
  echo "building the 4 GiB test disk (takes a minute)…" >&2
  CONTENT="$WORK/content"; rm -rf "$CONTENT"; mkdir -p "$CONTENT/usr" "$CONTENT/log" "$CONTENT/data"
  # ~1.8 GB of real binaries and libraries, whole directories until the budget is reached
  mkdir -p "$CONTENT/usr/lib"
  for d in /usr/share /usr/bin /usr/lib/*; do
    [ "$(du -sm "$CONTENT/usr" | cut -f1)" -ge 1800 ] && break
    case "$d" in /usr/lib/*) dest="$CONTENT/usr/lib/";; *) dest="$CONTENT/usr/";; esac
    cp -a "$d" "$dest" 2>/dev/null || true
  done
  # ~400 MB of log-like text
  python3 - "$CONTENT/log" <<'PY'
import random, sys, os
random.seed(7)
words = "GET POST /api/v1/items /login 200 404 500 user session timeout backup restore chunk pack verify".split()
for f in range(8):
    with open(os.path.join(sys.argv[1], f"app{f}.log"), "w") as out:
        for i in range(700000):
            out.write(f"2026-11-{1+i%28:02d}T{i%24:02d}:{i%60:02d}:{(i*7)%60:02d}Z host{f} {' '.join(random.choices(words, k=6))} id={random.getrandbits(40)}\n")
PY
  # ~500 MB incompressible
  head -c 500000000 /dev/urandom > "$CONTENT/data/random.bin"
  rm -f "$RAW"; truncate -s 4G "$RAW"
  sgdisk -o -n 1:2048:0 -t 1:8300 "$RAW" >/dev/null
  truncate -s $(( 4 * 1024 * 1024 * 1024 - 2048 * 512 - 34 * 512 )) "$WORK/part.img"
  mkfs.ext4 -q -F -b 4096 -d "$CONTENT" "$WORK/part.img"
  dd if="$WORK/part.img" of="$RAW" bs=1M conv=notrunc,sparse oflag=seek_bytes seek=$((2048*512)) status=none
  rm -f "$WORK/part.img"; rm -rf "$CONTENT"
  qemu-img convert -f raw -O vhdx -o subformat=dynamic "$RAW" "$DISK"
fi

HOST="$WORK/host"; VM="$HOST/bench01"
rm -rf "$HOST" "$WORK/gw" "$WORK/agent" "$WORK/restored.raw" "$WORK/restored.vhdx"
mkdir -p "$VM/Virtual Hard Disks" "$VM/Virtual Machines"
ln "$DISK" "$VM/Virtual Hard Disks/bench01.vhdx" 2>/dev/null || cp "$DISK" "$VM/Virtual Hard Disks/bench01.vhdx"
echo '{"id":"b0000000-0000-0000-0000-000000000001","name":"bench01","generation":2,"state":"Running","disks":[{"controller":"SCSI","location":"0:0","path":"Virtual Hard Disks/bench01.vhdx"}]}' > "$VM/vm.json"

INIT="$("$GW" init --data-dir "$WORK/gw" --listen 127.0.0.1:0 --json)"
FP="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["fingerprint"])' "$INIT")"
"$GW" serve --data-dir "$WORK/gw" 2>"$WORK/gw.log" &
GW_PID=$!
trap 'kill $GW_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$WORK/gw/serve.addr" ] && break; sleep 0.1; done
"$AG" enroll --state-dir "$WORK/agent" --gateway "https://$(cat "$WORK/gw/serve.addr")" \
  --token "$("$GW" enroll-token --data-dir "$WORK/gw")" --fingerprint "$FP" --host-root "$HOST" >/dev/null

drop_caches; CACHE_BACKUP=$CACHE
/usr/bin/time -f '%M %e %U %S' -o "$WORK/agent.time" "$AG" backup --state-dir "$WORK/agent" --vm bench01 --json > "$WORK/backup.json"
GW_HWM_KB="$(awk '/VmHWM/{print $2}' /proc/$GW_PID/status)"
POINT="$(python3 -c 'import json;print(json.load(open("'"$WORK/backup.json"'"))["point"])')"

drop_caches; CACHE_RESTORE=$CACHE
/usr/bin/time -f '%M %e %U %S' -o "$WORK/restore.time" "$GW" restore-disk --data-dir "$WORK/gw" --point "$POINT" --disk 0 --format raw --out "$WORK/restored.raw" --json > "$WORK/restore.json"
/usr/bin/time -f '%M %e %U %S' -o "$WORK/restore-vhdx.time" "$GW" restore-disk --data-dir "$WORK/gw" --point "$POINT" --disk 0 --format vhdx --out "$WORK/restored.vhdx" --json > "$WORK/restore-vhdx.json"
GW_HWM2_KB="$(awk '/VmHWM/{print $2}' /proc/$GW_PID/status)"
qemu-img compare -q -f raw -F raw "$RAW" "$WORK/restored.raw" && SAME=identical || SAME=DIFFERENT
qemu-img compare -q -f raw -F vhdx "$RAW" "$WORK/restored.vhdx" && SAME2=identical || SAME2=DIFFERENT
STORE_BYTES="$(du -sb "$WORK/gw/packs" | cut -f1)"

python3 - "$WORK" "$GW_HWM_KB" "$GW_HWM2_KB" "$CACHE_BACKUP" "$CACHE_RESTORE" "$SAME" "$SAME2" "$STORE_BYTES" <<'PY'
import json, sys, os
w, gw_kb, gw2_kb, cb, cr, same, same2, store = sys.argv[1:]
b = json.load(open(os.path.join(w, "backup.json")))
def t(name):
    m, e, u, s = open(os.path.join(w, name)).read().split()
    return int(m), float(e), float(u) + float(s)
am, ae, acpu = t("agent.time"); rm, re_, rcpu = t("restore.time"); vm, ve, vcpu = t("restore-vhdx.time")
rr = json.load(open(os.path.join(w, "restore.json")))
mb = 1e6
print(f"disk: 4 GiB virtual, {b['bytes_read']/mb:.0f} MB allocated data read, {b['logical_bytes']/mb:.0f} MB non-zero; store after backup {int(store)/mb:.0f} MB")
print(f"{'step':<24}{'MB/s':>10}{'seconds':>10}{'CPU s':>8}{'peak RSS':>12}  cache   result")
print(f"{'full backup':<24}{b['bytes_read']/mb/ae:>10.0f}{ae:>10.1f}{acpu:>8.1f}{am/1024:>9.0f} MiB  {cb:<7} agent; gateway peak {int(gw_kb)/1024:.0f} MiB")
print(f"{'restore raw':<24}{rr['data_bytes']/mb/re_:>10.0f}{re_:>10.1f}{rcpu:>8.1f}{rm/1024:>9.0f} MiB  {cr:<7} {same}")
print(f"{'restore vhdx':<24}{rr['data_bytes']/mb/ve:>10.0f}{ve:>10.1f}{vcpu:>8.1f}{vm/1024:>9.0f} MiB  warm    {same2}; gateway peak {int(gw2_kb)/1024:.0f} MiB")
PY
