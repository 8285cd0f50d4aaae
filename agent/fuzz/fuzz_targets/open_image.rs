//! Any bytes given to the VHDX/VHD/raw parsers: they may fail, never panic,
//! and whatever opens must read without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = tierback_agent::disk::open_image_bytes("fuzz.vhdx", data.to_vec()) {
        let _ = d.describe();
        let _ = d.leaf_ranges();
        if let Ok(ranges) = d.allocated_ranges() {
            for (off, len) in ranges.into_iter().take(16) {
                let mut b = vec![0u8; len.min(1 << 20) as usize];
                let _ = d.read_at(off, &mut b);
            }
        }
        let n = d.virtual_size().min(1 << 20);
        let mut b = vec![0u8; n as usize];
        let _ = d.read_at(d.virtual_size() - n, &mut b);
    }
});
