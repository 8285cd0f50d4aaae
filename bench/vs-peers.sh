#!/usr/bin/env bash
# Benchmark (not a test): Tierback against restic and borg on the same VM disk,
# in one run, on this machine. Prints a table with the ratio of each Tierback
# figure to the best peer; docs/benchmarks.md records the figures.
#
# The disk (bench/make-disks.py): a 4 GiB GPT disk whose ext4 partition holds
# ~2.9 GB of real files (copies of /usr, log text, random data) as a dynamic
# VHDX, and its "next day": ~3% of the data rewritten in clustered runs and ~1%
# in scattered 64 KiB writes, with the matching rct.json ranges.
#
# Steps, each after evicting the page cache of every file it reads and of
# every repository and store written so far (posix_fadvise DONTNEED after
# sync; works without root), so no tool starts with another's files filling
# memory; restored copies are deleted once compared:
#   full backup of day 1; incremental of day 2 (Tierback: with rct.json change
#   tracking, and again from the day-1 state by full read + compare; peers:
#   their normal re-read); restore of day 2; stored bytes after both days.
# Tierback: agent → gateway over loopback TLS (AES-128-GCM), chunks sealed
# with AES-256-GCM, release build.
# restic (repository v2, compression auto) and borg (repokey, zstd,3) from
# Debian. Peak RSS and CPU seconds: GNU time for every client process, and
# VmHWM plus /proc/<pid>/stat CPU for the gateway.
#
# Every tool's full backup runs in TIERBACK_BENCH_FULL_ROUNDS rounds (default
# 3, interleaved across the tools, each into a fresh repository or gateway) and
# counts with its median: it is CPU-bound, and this machine's speed drifts.
# TIERBACK_BENCH_DIR keeps the disks between runs (they take a few minutes to
# build); TIERBACK_BENCH_SKIP_PEERS=1 measures Tierback only;
# TIERBACK_BENCH_ZSTD_LEVEL=N sets the gateway's zstd level (default: its own).
#
# The host is calibrated before and after the run, each workload on one core
# and then twice at once: SHA-256 of 512 MiB (Python's hashlib) and `zstd -1`
# of 400 MiB of the day-1 VHDX's data (from the page cache). Tierback's full backup keeps
# both cores busy and borg's runs on one, so the full-backup ratio moves with
# how much the second core adds on this host at the time (the table prints
# it; on a virtual machine whose two vCPUs share a physical core, zstd gains
# little from the second).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
./scripts/install-deps.sh restic borgbackup zstd
cargo build --release --bins -q
GW="$ROOT/target/release/tierback-gateway"
AG="$ROOT/target/release/tierback-agent"
WORK="${TIERBACK_BENCH_DIR:-$(mktemp -d /tmp/tierback-bench.XXXXXX)}"
mkdir -p "$WORK"
echo "bench dir: $WORK" >&2
RES="$WORK/results.jsonl"
: > "$RES"

if [ ! -f "$WORK/day2.vhdx" ] || [ ! -f "$WORK/day2.ranges.json" ]; then
  echo "building the day-1 and day-2 disks (a few minutes)…" >&2
  python3 bench/make-disks.py "$WORK"
fi
DAY1="$WORK/day1.vhdx"
DAY2="$WORK/day2.vhdx"
SIZE1=$(stat -c %s "$DAY1")

# host_speed STEP: the calibration above, best of two; one row of results.
host_speed() {
  python3 - "$RES" "$1" "$DAY1" "$WORK/calibrate.bin" <<'PY'
import hashlib, json, os, shutil, subprocess, sys, threading, time
res, step, disk, sample = sys.argv[1:]
buf = bytes(range(256)) * (1 << 21)
def sha():
    hashlib.sha256(buf).digest()
def zstd_runs(n):
    ps = [subprocess.Popen(["zstd", "-1", "--single-thread", "-q", "-c", sample],
                           stdout=subprocess.DEVNULL)
          for _ in range(n)]
    for p in ps:
        if p.wait() != 0:
            sys.exit("zstd failed")
def two_threads():
    ts = [threading.Thread(target=sha) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
def best(f):
    ts = []
    for _ in range(2):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return min(ts)
work = [("sha256", sha, two_threads, len(buf))]
if shutil.which("zstd"):
    # 400 MiB of the disk's data, written here, so in the page cache.
    with open(disk, "rb") as src, open(sample, "wb") as dst:
        src.seek(1200 * 2**20)
        dst.write(src.read(400 * 2**20))
    work.append(("zstd1", lambda: zstd_runs(1), lambda: zstd_runs(2), os.path.getsize(sample)))
row = {"tool": "host", "step": step}
for name, one, two, size in work:
    t1, t2 = best(one), best(two)
    row[name + "_mbs"] = size / 1e6 / t1
    row[name + "_two_x"] = 2 * t1 / t2
with open(res, "a") as f:
    f.write(json.dumps(row) + "\n")
if os.path.exists(sample):
    os.remove(sample)
PY
}

evict() {
  sync
  python3 - "$@" "$WORK"/*-repo "$WORK"/restic-cache "$WORK"/gw* <<'PY'
import os, sys
for top in sys.argv[1:]:
    paths = [top] if os.path.isfile(top) else [os.path.join(r, f) for r, _, fs in os.walk(top) for f in fs]
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
PY
}

# record TOOL STEP SECONDS CPU RSS_KIB [EXTRA_JSON]
record() {
  python3 - "$RES" "$@" <<'PY'
import json, sys
res, tool, step, secs, cpu, rss = sys.argv[1:7]
extra = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {}
with open(res, "a") as f:
    f.write(json.dumps({"tool": tool, "step": step, "seconds": float(secs), "cpu": float(cpu),
                        "rss_kib": int(rss), **extra}) + "\n")
PY
}

# timed TOOL STEP CMD...: runs CMD under GNU time and records it.
timed() {
  local tool=$1 step=$2; shift 2
  /usr/bin/time -f '%M %e %U %S' -o "$WORK/time.out" "$@" > "$WORK/cmd.out"
  read -r rss secs user sys < "$WORK/time.out"
  record "$tool" "$step" "$secs" "$(python3 -c "print($user+$sys)")" "$rss"
}

du_b() { du -sb "$@" | awk '{s+=$1} END {print s}'; }

# --- Tierback helpers -------------------------------------------------------
GW_PID=
start_gw() {
  rm -f "$WORK/gw/serve.addr"
  "$GW" serve --data-dir "$WORK/gw" 2>>"$WORK/gw.log" &
  GW_PID=$!
  for _ in $(seq 100); do [ -s "$WORK/gw/serve.addr" ] && break; sleep 0.1; done
}
stop_gw() { kill "$GW_PID"; wait "$GW_PID" 2>/dev/null || true; GW_PID=; }
trap '[ -n "$GW_PID" ] && kill $GW_PID 2>/dev/null || true' EXIT
gw_cpu() { awk '{print ($14+$15)/100}' "/proc/$GW_PID/stat"; }
gw_hwm() { awk '/VmHWM/{print $2}' "/proc/$GW_PID/status"; }
# tb_setup: a fresh gateway ($WORK/gw, started) and an enrolled agent
# ($WORK/agent) protecting one VM whose disk is linked in later.
HOST="$WORK/host"; VM="$HOST/bench01"
tb_setup() {
  if [ -n "$GW_PID" ]; then stop_gw; fi
  rm -rf "$HOST" "$WORK"/gw "$WORK"/gw-day1 "$WORK"/agent "$WORK"/agent-day1
  mkdir -p "$VM/Virtual Hard Disks" "$VM/Virtual Machines"
  echo '{"id":"b0000000-0000-0000-0000-000000000001","name":"bench01","generation":2,"state":"Running","disks":[{"controller":"SCSI","location":"0:0","path":"Virtual Hard Disks/bench01.vhdx"}]}' > "$VM/vm.json"
  local port init fp
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  init="$("$GW" init --data-dir "$WORK/gw" --listen "127.0.0.1:$port" --json)"
  fp="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["fingerprint"])' "$init")"
  if [ -n "${TIERBACK_BENCH_ZSTD_LEVEL:-}" ]; then
    sed -i "s/^zstd_level = .*/zstd_level = $TIERBACK_BENCH_ZSTD_LEVEL/" "$WORK/gw/gateway.toml"
  fi
  start_gw
  "$AG" enroll --state-dir "$WORK/agent" --gateway "https://127.0.0.1:$port" \
    --token "$("$GW" enroll-token --data-dir "$WORK/gw")" --fingerprint "$fp" --host-root "$HOST" >/dev/null
}

# tb_backup STEP: one agent backup, recorded with the gateway's CPU and peak RSS.
tb_backup() {
  local c0; c0="$(gw_cpu)"
  timed tierback "$1" "$AG" backup --state-dir "$WORK/agent" --vm bench01 --json
  cp "$WORK/cmd.out" "$WORK/$1.json"
  python3 - "$RES" "$(gw_cpu)" "$c0" "$(gw_hwm)" "$WORK/$1.json" <<'PY'
import json, sys
res, c1, c0, hwm, report = sys.argv[1:]
rows = [json.loads(l) for l in open(res)]
r = rows[-1]
b = json.load(open(report))
r.update(agent_cpu=r["cpu"], agent_rss_kib=r["rss_kib"], gw_cpu=float(c1) - float(c0), gw_rss_kib=int(hwm),
         bytes_read=b["bytes_read"], bytes_sent=b["bytes_sent"],
         methods=[d["method"] for d in b.get("disks", [])])
r["cpu"] += r["gw_cpu"]
r["rss_kib"] = r["agent_rss_kib"] + r["gw_rss_kib"]
with open(res, "w") as f:
    f.writelines(json.dumps(x) + "\n" for x in rows[:-1] + [r])
PY
}

rct() { # rct CURRENT SINCE_JSON
  printf '{"Virtual Hard Disks/bench01.vhdx":{"current":"%s","since":%s}}' "$1" "$2" > "$VM/rct.json"
}

# tb_full: a full backup of day 1 into the gateway tb_setup made.
tb_full() {
  ln -f "$DAY1" "$VM/Virtual Hard Disks/bench01.vhdx"
  rct rct-0001 '{}'
  evict "$DAY1"
  tb_backup full
}

PEERS=1; [ "${TIERBACK_BENCH_SKIP_PEERS:-0}" = 1 ] && PEERS=0
# peer_backup TOOL STEP ARCHIVE: one timed backup of $SRC by restic (cache
# $RESTIC_CACHE) or borg (archive ARCHIVE), with the settings of the table.
peer_backup() {
  case $1 in
    restic) timed restic "$2" restic backup -q --cache-dir "$RESTIC_CACHE" --compression auto "$SRC" ;;
    borg) timed borg "$2" borg create --compression zstd,3 "::$3" "$SRC" ;;
  esac
}
export RESTIC_PASSWORD=bench-passphrase RESTIC_REPOSITORY="$WORK/restic-repo"
export BORG_PASSPHRASE=bench-passphrase BORG_REPO="$WORK/borg-repo" BORG_BASE_DIR="$WORK/borg-home"
export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes

# --- extra full-backup rounds ---------------------------------------------------
# The full backup is CPU-bound for every tool, and this machine's speed drifts
# by tens of percent over minutes: each tool's full backup is measured
# TIERBACK_BENCH_FULL_ROUNDS times (default 3), the rounds interleaved across
# the tools, each into a fresh repository or gateway; the table shows the
# median and every round. This loop runs all but the last round; the last is
# the full backup of the main sequence below.
ROUNDS="${TIERBACK_BENCH_FULL_ROUNDS:-3}"
host_speed start
for _ in $(seq 2 "$ROUNDS"); do
  if [ "$PEERS" = 1 ]; then
    SRC="$WORK/peer-src"; rm -rf "$SRC"; mkdir -p "$SRC"; ln -f "$DAY1" "$SRC/vm.vhdx"
    (
      export RESTIC_REPOSITORY="$WORK/extra-restic-repo" BORG_REPO="$WORK/extra-borg-repo" BORG_BASE_DIR="$WORK/extra-borg-home"
      RESTIC_CACHE="$WORK/extra-restic-cache"
      rm -rf "$RESTIC_REPOSITORY" "$BORG_REPO" "$BORG_BASE_DIR" "$RESTIC_CACHE"
      restic init --repository-version 2 --cache-dir "$RESTIC_CACHE" -q
      borg init -e repokey "$BORG_REPO" 2>/dev/null
      for tool in restic borg; do
        evict "$DAY1"
        peer_backup "$tool" full day1
      done
      rm -rf "$RESTIC_REPOSITORY" "$BORG_REPO" "$BORG_BASE_DIR" "$RESTIC_CACHE"
    )
  fi
  tb_setup
  tb_full
  stop_gw
done

# --- peers ------------------------------------------------------------------
if [ "$PEERS" = 1 ]; then
  SRC="$WORK/peer-src"; rm -rf "$SRC"; mkdir -p "$SRC"
  RESTIC_CACHE="$WORK/restic-cache"
  rm -rf "$RESTIC_REPOSITORY" "$BORG_REPO" "$BORG_BASE_DIR" "$RESTIC_CACHE"
  restic init --repository-version 2 --cache-dir "$RESTIC_CACHE" -q
  borg init -e repokey "$BORG_REPO"
  for tool in restic borg; do
    ln -f "$DAY1" "$SRC/vm.vhdx"
    evict "$DAY1" "$WORK/$tool-repo"
    peer_backup "$tool" full day1
    ln -f "$DAY2" "$SRC/vm.vhdx"
    evict "$DAY2" "$WORK/$tool-repo"
    peer_backup "$tool" incremental day2
    record "$tool" stored 0 0 0 "{\"bytes\": $(du_b "$WORK/$tool-repo")}"
    OUT="$WORK/$tool-restore"; rm -rf "$OUT"; mkdir -p "$OUT"
    evict "$WORK/$tool-repo"
    case $tool in
      restic) timed restic restore restic restore latest -q --cache-dir "$RESTIC_CACHE" --target "$OUT" ;;
      borg) (cd "$OUT" && timed borg restore borg extract "::day2") ;;
    esac
    got="$(find "$OUT" -name vm.vhdx | head -1)"
    cmp -s "$got" "$DAY2" || { echo "error: $tool restored a different file" >&2; exit 1; }
    rm -rf "$OUT"
  done
  rm -rf "$WORK/restic-repo" "$WORK/borg-repo" "$WORK/borg-home" "$RESTIC_CACHE" "$SRC"
fi

# --- Tierback ---------------------------------------------------------------
tb_setup
tb_full
# Keep the day-1 state for the full read + compare run.
stop_gw
cp -a "$WORK/gw" "$WORK/gw-day1"; cp -a "$WORK/agent" "$WORK/agent-day1"
start_gw

ln -f "$DAY2" "$VM/Virtual Hard Disks/bench01.vhdx"
rct rct-0002 "{\"rct-0001\": $(cat "$WORK/day2.ranges.json")}"
evict "$DAY2" "$WORK/gw"
tb_backup incremental-tracked
STORE="$(du_b "$WORK/gw/packs" "$WORK/gw/indexes" "$WORK"/gw/*.db*)"
record tierback stored 0 0 0 "{\"bytes\": $STORE}"
POINT="$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["point"])' "$WORK/incremental-tracked.json")"

for fmt in vhdx raw; do
  evict "$WORK/gw"
  c0="$(gw_cpu)"
  timed tierback "restore-$fmt" "$GW" restore-disk --data-dir "$WORK/gw" --point "$POINT" --disk 0 --format "$fmt" --out "$WORK/restored.$fmt" --json
  python3 - "$RES" "$(gw_cpu)" "$c0" <<'PY'
import json, sys
res, c1, c0 = sys.argv[1:]
rows = [json.loads(l) for l in open(res)]
rows[-1]["cpu"] += float(c1) - float(c0)
with open(res, "w") as f:
    f.writelines(json.dumps(x) + "\n" for x in rows)
PY
  qemu-img compare -q -f "$fmt" -F vhdx "$WORK/restored.$fmt" "$DAY2" || { echo "error: the $fmt restore differs from day 2" >&2; exit 1; }
  rm -f "$WORK/restored.$fmt"
done

# Day 2 again from the day-1 state, without change tracking: full read + compare.
stop_gw
rm -rf "$WORK/gw" "$WORK/agent"
mv "$WORK/gw-day1" "$WORK/gw"; mv "$WORK/agent-day1" "$WORK/agent"
rm -f "$VM/rct.json"
start_gw
evict "$DAY2" "$WORK/gw"
tb_backup incremental-compare
stop_gw
host_speed end

python3 - "$RES" "$SIZE1" "$(stat -c %s "$DAY2")" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
size1, size2 = int(sys.argv[2]), int(sys.argv[3])
def get(tool, step):
    """The step's row; for a step measured in several rounds (the full
    backup), the median round's, with every round's seconds and the highest
    peak RSS of any round."""
    rs = [r for r in rows if r["tool"] == tool and r["step"] == step]
    if len(rs) <= 1:
        return rs[0] if rs else None
    mid = statistics.median(r["seconds"] for r in rs)
    r = dict(min(rs, key=lambda r: abs(r["seconds"] - mid)), seconds=mid)
    r["rounds"] = [x["seconds"] for x in rs]
    r["rss_kib"] = max(x["rss_kib"] for x in rs)
    return r
peers = sorted({r["tool"] for r in rows} - {"tierback", "host"})
mb = 1e6
print(f"disk: day 1 VHDX {size1/mb:.0f} MB, day 2 VHDX {size2/mb:.0f} MB (MB/s = VHDX bytes / wall seconds)")
host = [r for r in rows if r["tool"] == "host"]
for key, what in [("sha256", "SHA-256"), ("zstd1", "zstd -1")]:
    if host and all(key + "_mbs" in r for r in host):
        print(f"host, {what}: " + " / ".join(f"{r[key + '_mbs']:.0f}" for r in host)
              + " MB/s on one core, both cores at once " + " / ".join(f"{r[key + '_two_x']:.2f}" for r in host)
              + "x one core (" + " / ".join(r["step"] for r in host) + " of the run)")
print(f"{'tool':<10}{'step':<22}{'MB/s':>8}{'seconds':>9}{'CPU s':>8}{'peak RSS':>11}  notes")
def line(r, size):
    rate = size / mb / r["seconds"] if r["seconds"] else 0
    note = ""
    if "gw_rss_kib" in r:
        note = (f"agent {r['agent_rss_kib']/1024:.0f} + gateway {r['gw_rss_kib']/1024:.0f} MiB; "
                f"read {r['bytes_read']/mb:.0f} MB, sent {r['bytes_sent']/mb:.0f} MB; {','.join(r['methods'])}")
    if "rounds" in r:
        note = f"median of {len(r['rounds'])} rounds: {' / '.join(f'{x:.1f}' for x in r['rounds'])} s; " + note
    print(f"{r['tool']:<10}{r['step']:<22}{rate:>8.0f}{r['seconds']:>9.1f}{r['cpu']:>8.1f}{r['rss_kib']/1024:>7.0f} MiB  {note}")
for tool in peers + ["tierback"]:
    for step, size in [("full", size1), ("incremental", size2), ("incremental-tracked", size2),
                       ("incremental-compare", size2), ("restore", size2), ("restore-vhdx", size2),
                       ("restore-raw", size2)]:
        r = get(tool, step)
        if r:
            line(r, size)
    s = get(tool, "stored")
    if s:
        print(f"{tool:<10}{'stored after day 2':<22}{s['bytes']/mb:>8.0f} MB")
if not peers:
    sys.exit(0)
print()
print("ratios to the best peer (target in brackets):")
def best(step, key, lowest):
    vals = [get(p, step)[key] for p in peers if get(p, step)]
    return min(vals) if lowest else max(vals)
def ratio(label, ours, theirs, target, higher_is_better=True):
    r = ours / theirs if higher_is_better else ours / theirs
    ok = r >= target if higher_is_better else r <= target
    print(f"  {label:<40}{r:>6.2f}x  [{'>=' if higher_is_better else '<='} {target}]  {'met' if ok else 'MISSED'}")
secs = lambda tool, step: get(tool, step)["seconds"]
ratio("full backup (speed)", best("full", "seconds", True), secs("tierback", "full"), 2.5)
ratio("incremental with tracking (speed)", best("incremental", "seconds", True), secs("tierback", "incremental-tracked"), 10)
ratio("incremental by full read+compare (speed)", best("incremental", "seconds", True), secs("tierback", "incremental-compare"), 1.5)
ratio("restore to VHDX (speed)", best("restore", "seconds", True), secs("tierback", "restore-vhdx"), 2)
ratio("restore to raw (speed)", best("restore", "seconds", True), secs("tierback", "restore-raw"), 2)
ratio("stored bytes after day 2", get("tierback", "stored")["bytes"], best("stored", "bytes", True), 0.9, False)
rss = get("tierback", "full")["rss_kib"] / 1024
print(f"  {'agent + gateway peak RSS, full backup':<40}{rss:>6.0f} MiB [<= 256]  {'met' if rss <= 256 else 'MISSED'}")
PY
