//! Reads every allocated byte of a disk image through the agent's reader, in
//! 1 MiB chunks on several threads as a backup does, and prints what it read.
//! For measuring the reader alone (e.g. buffered against direct reads):
//!
//! ```text
//! cargo run --release -p tierback-agent --example read_disk -- DISK [--buffered] [--threads N]
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tierback_agent::disk::{open_disk_with, ReadMode};

const CHUNK: u64 = 1 << 20;

fn main() -> anyhow::Result<()> {
    let mut path = None;
    let mut mode = ReadMode::Direct;
    let mut threads = 4usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--buffered" => mode = ReadMode::Buffered,
            "--threads" => {
                threads = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| anyhow::anyhow!("--threads needs a number"))?
            }
            _ => path = Some(PathBuf::from(a)),
        }
    }
    let path =
        path.ok_or_else(|| anyhow::anyhow!("usage: read_disk DISK [--buffered] [--threads N]"))?;
    let dir = path
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf();
    let disk = open_disk_with(&path, &dir, mode)?;
    let size = disk.virtual_size();
    let mut chunks: Vec<u64> = disk
        .allocated_ranges()?
        .into_iter()
        .flat_map(|(o, l)| o / CHUNK..(o + l).div_ceil(CHUNK))
        .collect();
    chunks.dedup();
    let start = Instant::now();
    let next = AtomicU64::new(0);
    let (read, sum) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    while let Some(&n) = chunks.get(next.fetch_add(1, Ordering::Relaxed) as usize) {
                        let mut buf = vec![0u8; CHUNK.min(size - n * CHUNK) as usize];
                        disk.read_at(n * CHUNK, &mut buf)?;
                        // Touch the data, as hashing would.
                        let x = buf
                            .iter()
                            .step_by(4096)
                            .fold(0u64, |a, &b| a.wrapping_add(u64::from(b)));
                        sum.fetch_add(x, Ordering::Relaxed);
                        read.fetch_add(buf.len() as u64, Ordering::Relaxed);
                    }
                    Ok(())
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a reader panicked"))??;
        }
        Ok(())
    })?;
    let secs = start.elapsed().as_secs_f64();
    let bytes = read.load(Ordering::Relaxed);
    println!(
        "{} ({mode:?}, {threads} threads): {} MiB in {secs:.2} s ({:.0} MiB/s), checksum {}",
        disk.describe(),
        bytes >> 20,
        bytes as f64 / secs / (1 << 20) as f64,
        sum.load(Ordering::Relaxed)
    );
    Ok(())
}
