#!/usr/bin/env python3
"""Builds the benchmark's VM disk and its "next day" version.

Usage: make-disks.py WORKDIR

Writes WORKDIR/day1.vhdx (a dynamic VHDX of a 4 GiB GPT disk whose ext4
partition holds ~2.9 GB of real files: copies of /usr, log-like text and
random data), WORKDIR/day2.vhdx (the same disk after a day of writes: ~3% of
the data rewritten in clustered runs, ~1% in scattered 64 KiB writes) and
WORKDIR/day2.ranges.json (the written byte ranges, for rct.json). Both disks
are made by qemu-img from raw images that are deleted afterwards.
Deterministic apart from the copied /usr files.
"""
import json
import os
import random
import shutil
import subprocess
import sys

GIB = 1 << 30
MIB = 1 << 20
DISK_SIZE = 4 * GIB
PART_START = 2048 * 512
USR_BUDGET = 1_900_000_000
LOG_BYTES = 500_000_000
RANDOM_BYTES = 500_000_000
WORDS = ("GET POST PUT /api/v1/items /api/v1/users /login /logout 200 201 204 "
         "301 404 500 user session timeout backup restore chunk pack verify "
         "db query slow cache miss hit worker started stopped").split()


def run(*args):
    subprocess.run(args, check=True)


def log_text(rng, n, host):
    """n bytes of log-like text (as compressible as real logs: ~5-8x)."""
    out = []
    size = 0
    i = rng.getrandbits(20)
    while size < n:
        i += 1
        line = (f"2026-11-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:{(i * 7) % 60:02d}."
                f"{i % 1000:03d}Z {host} pid={1000 + i % 97} "
                f"{' '.join(rng.choices(WORDS, k=7))} id={rng.getrandbits(40):x} "
                f"ms={rng.randint(1, 5000)}\n")
        out.append(line)
        size += len(line)
    return "".join(out).encode()[:n]


def copy_usr(dest):
    """Regular files and symlinks from /usr, in sorted order, up to the budget."""
    total = 0
    for top in ("/usr/lib", "/usr/share", "/usr/bin", "/usr/libexec", "/usr/sbin"):
        for root, dirs, files in os.walk(top):
            dirs.sort()
            for name in sorted(files):
                src = os.path.join(root, name)
                dst = os.path.join(dest, os.path.relpath(src, "/"))
                try:
                    if os.path.islink(src):
                        os.makedirs(os.path.dirname(dst), exist_ok=True)
                        os.symlink(os.readlink(src), dst)
                        continue
                    if not os.path.isfile(src):
                        continue
                    size = os.path.getsize(src)
                    if total + size > USR_BUDGET:
                        continue
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    shutil.copyfile(src, dst)
                    total += size
                except OSError:
                    continue
                if total >= USR_BUDGET - 1_000_000:
                    return total
    return total


def build_day1(work, raw):
    content = os.path.join(work, "content")
    shutil.rmtree(content, ignore_errors=True)
    os.makedirs(os.path.join(content, "log"))
    os.makedirs(os.path.join(content, "data"))
    usr = copy_usr(content)
    rng = random.Random(7)
    per = LOG_BYTES // 10
    for f in range(10):
        with open(os.path.join(content, "log", f"app{f}.log"), "wb") as out:
            out.write(log_text(rng, per, f"web{f:02d}"))
    left = RANDOM_BYTES
    n = 0
    while left > 0:
        size = min(left, 100_000_000)
        with open(os.path.join(content, "data", f"blob{n}.bin"), "wb") as out:
            out.write(rng.randbytes(size))
        left -= size
        n += 1
    print(f"content: {usr / 1e9:.2f} GB of /usr files, {LOG_BYTES / 1e9:.2f} GB of logs, "
          f"{RANDOM_BYTES / 1e9:.2f} GB random", file=sys.stderr)
    part = os.path.join(work, "part.img")
    with open(raw, "wb") as f:
        f.truncate(DISK_SIZE)
    run("sgdisk", "-q", "-o", "-n", "1:2048:0", "-t", "1:8300", raw)
    with open(part, "wb") as f:
        f.truncate(DISK_SIZE - PART_START - 34 * 512)
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", content, part)
    shutil.rmtree(content)
    run("dd", f"if={part}", f"of={raw}", "bs=1M", "conv=notrunc,sparse",
        "oflag=seek_bytes", f"seek={PART_START}", "status=none")
    os.remove(part)


def used_mibs(raw):
    """Indexes of the 1 MiB blocks of the image that hold any non-zero byte."""
    zero = bytes(MIB)
    used = []
    with open(raw, "rb") as f:
        n = 0
        while True:
            b = f.read(MIB)
            if not b:
                break
            if b != zero[:len(b)]:
                used.append(n)
            n += 1
    return used


def day2_writes(raw):
    """Rewrites ~3% of the data in clustered runs and ~1% in scattered 64 KiB
    writes, in place; returns the written (offset, length) ranges."""
    last = DISK_SIZE // MIB - 1
    used = [n for n in used_mibs(raw) if 1 <= n < last]  # not the GPT areas
    data_bytes = len(used) * MIB
    rng = random.Random(2)
    writes = []
    clustered = int(data_bytes * 0.03)
    while clustered > 0:
        length = min(clustered, rng.randint(64, 2048) * 4096)
        start = rng.choice(used) * MIB + rng.randint(0, 255) * 4096
        writes.append((start, length))
        clustered -= length
    scattered = int(data_bytes * 0.01) // (64 << 10)
    for _ in range(scattered):
        start = rng.choice(used) * MIB + rng.randint(0, 15) * (64 << 10)
        writes.append((start, 64 << 10))
    with open(raw, "r+b") as f:
        for i, (start, length) in enumerate(writes):
            length = min(length, DISK_SIZE - MIB - start)
            if i % 3 == 2:
                data = rng.randbytes(length)
            else:
                data = log_text(rng, length, "day2")
            f.seek(start)
            f.write(data)
    changed = sum(l for _, l in writes)
    print(f"day 2: {len(writes)} writes, {changed / 1e6:.0f} MB written "
          f"({changed / data_bytes * 100:.1f}% of {data_bytes / 1e9:.2f} GB in use)", file=sys.stderr)
    return sorted(writes)


def main():
    work = sys.argv[1]
    raw = os.path.join(work, "disk.raw")
    build_day1(work, raw)
    run("qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic",
        raw, os.path.join(work, "day1.vhdx.tmp"))
    os.rename(os.path.join(work, "day1.vhdx.tmp"), os.path.join(work, "day1.vhdx"))
    writes = day2_writes(raw)
    with open(os.path.join(work, "day2.ranges.json"), "w") as f:
        json.dump([[s, l] for s, l in writes], f)
    run("qemu-img", "convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic",
        raw, os.path.join(work, "day2.vhdx.tmp"))
    os.rename(os.path.join(work, "day2.vhdx.tmp"), os.path.join(work, "day2.vhdx"))
    os.remove(raw)


if __name__ == "__main__":
    main()
