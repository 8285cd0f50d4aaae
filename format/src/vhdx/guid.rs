//! GUIDs as MS-VHDX stores them: a Windows `GUID` struct, i.e. `Data1` (u32),
//! `Data2` (u16) and `Data3` (u16) little-endian, then `Data4` as 8 plain bytes.
//!
//! The canonical text form `{2DC27766-F623-4200-9D64-115E9BFD4A08}` prints
//! `Data1..Data3` as numbers, so its first 8 bytes are *not* in on-disk order.

use std::fmt;
use std::str::FromStr;

/// A GUID, held in its on-disk (Windows, mixed-endian) byte order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Guid([u8; 16]);

/// Text that is not a GUID (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, braces optional).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a GUID: {0:?}")]
pub struct GuidParseError(pub String);

impl Guid {
    /// The all-zero GUID (e.g. an empty `LogGuid`).
    pub const ZERO: Guid = Guid([0; 16]);

    /// Wraps 16 bytes already in on-disk order.
    pub const fn from_bytes(bytes: [u8; 16]) -> Guid {
        Guid(bytes)
    }

    /// The 16 bytes in on-disk order.
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    /// Builds a GUID from the numeric fields of its text form.
    pub const fn from_fields(data1: u32, data2: u16, data3: u16, data4: [u8; 8]) -> Guid {
        let a = data1.to_le_bytes();
        let b = data2.to_le_bytes();
        let c = data3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], data4[0], data4[1], data4[2], data4[3],
            data4[4], data4[5], data4[6], data4[7],
        ])
    }

    /// The numeric fields `(Data1, Data2, Data3, Data4)`.
    pub fn fields(&self) -> (u32, u16, u16, [u8; 8]) {
        let b = &self.0;
        let mut d4 = [0u8; 8];
        d4.copy_from_slice(&b[8..16]);
        (
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            d4,
        )
    }

    /// A fresh random (version 4) GUID.
    pub fn random() -> Guid {
        let mut b: [u8; 16] = rand::random();
        // Version nibble lives in the high nibble of Data3 (stored LE: byte 7).
        b[7] = (b[7] & 0x0f) | 0x40;
        // RFC 4122 variant in Data4[0].
        b[8] = (b[8] & 0x3f) | 0x80;
        Guid(b)
    }

    /// True for the all-zero GUID.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, with or without braces, any case.
    pub fn parse(s: &str) -> Result<Guid, GuidParseError> {
        let err = || GuidParseError(s.chars().take(64).collect());
        let t = s.trim();
        let t = match (t.strip_prefix('{'), t.ends_with('}')) {
            (Some(rest), true) => &rest[..rest.len() - 1],
            (None, false) => t,
            _ => return Err(err()),
        };
        let parts: Vec<&str> = t.split('-').collect();
        let lens = [8usize, 4, 4, 4, 12];
        if parts.len() != 5 || parts.iter().zip(lens).any(|(p, l)| p.len() != l) {
            return Err(err());
        }
        if !parts
            .iter()
            .all(|p| p.bytes().all(|c| c.is_ascii_hexdigit()))
        {
            return Err(err());
        }
        let d1 = u32::from_str_radix(parts[0], 16).map_err(|_| err())?;
        let d2 = u16::from_str_radix(parts[1], 16).map_err(|_| err())?;
        let d3 = u16::from_str_radix(parts[2], 16).map_err(|_| err())?;
        let mut d4 = [0u8; 8];
        let tail = format!("{}{}", parts[3], parts[4]);
        for (i, slot) in d4.iter_mut().enumerate() {
            *slot = u8::from_str_radix(&tail[2 * i..2 * i + 2], 16).map_err(|_| err())?;
        }
        Ok(Guid::from_fields(d1, d2, d3, d4))
    }
}

impl fmt::Display for Guid {
    /// Braced lowercase text form, as MS-VHDX writes `parent_linkage`:
    /// `{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (d1, d2, d3, d4) = self.fields();
        write!(
            f,
            "{{{d1:08x}-{d2:04x}-{d3:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}}}",
            d4[0], d4[1], d4[2], d4[3], d4[4], d4[5], d4[6], d4[7]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Guid {
    type Err = GuidParseError;
    fn from_str(s: &str) -> Result<Guid, GuidParseError> {
        Guid::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bat_region_guid_on_disk_order() {
        // Known answer: 2DC27766-F623-4200-9D64-115E9BFD4A08 as bytes in a
        // qemu-made file (66 77 c2 2d 23 f6 00 42 9d 64 11 5e 9b fd 4a 08).
        let g = Guid::parse("2DC27766-F623-4200-9D64-115E9BFD4A08").expect("test value");
        assert_eq!(
            g.to_bytes(),
            [
                0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
                0x4a, 0x08
            ]
        );
        assert_eq!(g.to_string(), "{2dc27766-f623-4200-9d64-115e9bfd4a08}");
        assert_eq!(Guid::parse(&g.to_string()).expect("test value"), g);
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "{}",
            "2DC27766F6234200",
            "{2DC27766-F623-4200-9D64-115E9BFD4A08",
            "zzzzzzzz-f623-4200-9d64-115e9bfd4a08",
            "2dc27766-+623-4200-9d64-115e9bfd4a08",
        ] {
            assert!(Guid::parse(s).is_err(), "{s}");
        }
    }

    #[test]
    fn random_is_v4() {
        let g = Guid::random();
        let (_, _, d3, d4) = g.fields();
        assert_eq!(d3 >> 12, 4);
        assert_eq!(d4[0] >> 6, 0b10);
        assert!(!g.is_zero());
    }
}
