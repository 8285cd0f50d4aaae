#!/usr/bin/env bash
# One command, end to end on embedded defaults: installs the tools, builds
# Tierback, makes a sample Hyper-V VM from real disk images, starts a gateway,
# enrols an agent, backs the VM up (twice: the second sends nothing new),
# restores it to a new VM folder and compares every disk with qemu-img.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
./scripts/install-deps.sh
echo "== building (release)"
cargo build --release --bins -q
GW="$ROOT/target/release/tierback-gateway"
AG="$ROOT/target/release/tierback-agent"
WORK="${TIERBACK_DEMO_DIR:-$(mktemp -d /tmp/tierback-demo.XXXXXX)}"
mkdir -p "$WORK"
echo "== working in $WORK"

echo "== making sample disks (GPT ESP+MSR+NTFS, Linux ext4+xfs) with qemu-img and mkfs"
OUT="$WORK/disks" "$ROOT/tests/fixtures/make-test-disks.sh" >/dev/null

VM="$WORK/host/web01"
mkdir -p "$VM/Virtual Machines" "$VM/Virtual Hard Disks"
ID=8f0c2d1e-4b7a-4c59-9a0e-2f6d7c1b33a1
for ext in vmcx vmrs vmgs; do head -c 65536 /dev/urandom > "$VM/Virtual Machines/${ID^^}.$ext"; done
cp "$WORK/disks/win-gpt-dynamic.vhdx" "$VM/Virtual Hard Disks/web01-os.vhdx"
cp "$WORK/disks/linux-gpt-dynamic.vhd" "$VM/Virtual Hard Disks/web01-data.vhd"
cat > "$VM/vm.json" <<JSON
{
  "id": "$ID", "name": "web01", "generation": 2, "config_version": "9.0", "state": "Running",
  "config_files": ["Virtual Machines/${ID^^}.vmcx", "Virtual Machines/${ID^^}.vmrs", "Virtual Machines/${ID^^}.vmgs"],
  "disks": [
    { "controller": "SCSI", "location": "0:0", "path": "Virtual Hard Disks/web01-os.vhdx" },
    { "controller": "SCSI", "location": "0:1", "path": "Virtual Hard Disks/web01-data.vhd" }
  ]
}
JSON

echo "== gateway: init + serve"
INIT_JSON="$("$GW" init --data-dir "$WORK/gateway" --listen 127.0.0.1:0 --json)"
echo "$INIT_JSON"
FP="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["fingerprint"])' "$INIT_JSON")"
"$GW" serve --data-dir "$WORK/gateway" 2>"$WORK/gateway.log" &
GW_PID=$!
trap 'kill $GW_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$WORK/gateway/serve.addr" ] && break; sleep 0.1; done
ADDR="$(cat "$WORK/gateway/serve.addr")"

echo "== agent: enroll + backup"
TOKEN="$("$GW" enroll-token --data-dir "$WORK/gateway")"
"$AG" enroll --state-dir "$WORK/agent" --gateway "https://$ADDR" --token "$TOKEN" --fingerprint "$FP" --host-root "$WORK/host"
"$AG" backup --state-dir "$WORK/agent" --vm web01
echo "== second backup (everything already on the gateway)"
"$AG" backup --state-dir "$WORK/agent" --vm web01
"$GW" points --data-dir "$WORK/gateway"
POINT="$("$GW" points --data-dir "$WORK/gateway" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')"

echo "== restore the VM to a new folder and compare"
"$GW" restore-vm --data-dir "$WORK/gateway" --point "$POINT" --to "$WORK/restored/web01"
qemu-img compare -f vhdx -F vhdx "$VM/Virtual Hard Disks/web01-os.vhdx" "$WORK/restored/web01/Virtual Hard Disks/web01-os.vhdx"
qemu-img compare -f vpc -F vhdx "$VM/Virtual Hard Disks/web01-data.vhd" "$WORK/restored/web01/Virtual Hard Disks/web01-data.vhdx"
for f in "$VM/Virtual Machines/"*; do cmp "$f" "$WORK/restored/web01/Virtual Machines/$(basename "$f")"; done
echo "config files identical"
"$GW" verify --data-dir "$WORK/gateway"
echo "DEMO OK: backed up, restored and verified web01 (files in $WORK)"
