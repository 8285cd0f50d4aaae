//! Identities of stored things: chunk hashes, chunk ids, pack ids, point ids.
//!
//! All are fixed-size byte arrays with a lowercase-hex text form (Display,
//! FromStr, serde as hex strings). [`ChunkHash`] is the plaintext BLAKE3 the
//! agent computes; [`ChunkId`] is what the gateway stores, a BLAKE3 keyed hash
//! over the chunk hash, so nothing outside the key holder ever sees plaintext
//! hashes while the gateway can still answer "which of these do you lack?"
//! from hashes alone.

use std::fmt;
use std::str::FromStr;

/// Error parsing an id from text or bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The input has the wrong length (in hex characters or bytes).
    #[error("{kind}: expected {expected} {unit}, got {got}")]
    Length {
        /// Which id type was being parsed.
        kind: &'static str,
        /// Expected length.
        expected: usize,
        /// Actual length.
        got: usize,
        /// "hex characters" or "bytes".
        unit: &'static str,
    },
    /// The input is not lowercase or uppercase hexadecimal.
    #[error("{kind}: not hexadecimal: {text:?}")]
    Hex {
        /// Which id type was being parsed.
        kind: &'static str,
        /// The offending text (truncated to 80 characters).
        text: String,
    },
}

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// Length of the id in bytes.
            pub const LEN: usize = $len;

            /// The raw bytes.
            pub const fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }

            /// Builds the id from a byte slice of exactly [`Self::LEN`] bytes
            /// (as read back from a database BLOB).
            pub fn from_slice(bytes: &[u8]) -> Result<Self, IdError> {
                let arr: [u8; $len] = bytes.try_into().map_err(|_| IdError::Length {
                    kind: stringify!($name),
                    expected: $len,
                    got: bytes.len(),
                    unit: "bytes",
                })?;
                Ok(Self(arr))
            }

            /// Lowercase hex text form (same as `Display`).
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut buf = [0u8; $len * 2];
                // Cannot fail: the buffer is exactly twice the input length.
                if hex::encode_to_slice(self.0, &mut buf).is_err() {
                    return Err(fmt::Error);
                }
                f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                if s.len() != $len * 2 {
                    return Err(IdError::Length {
                        kind: stringify!($name),
                        expected: $len * 2,
                        got: s.len(),
                        unit: "hex characters",
                    });
                }
                let mut out = [0u8; $len];
                hex::decode_to_slice(s, &mut out).map_err(|_| IdError::Hex {
                    kind: stringify!($name),
                    text: s.chars().take(80).collect(),
                })?;
                Ok(Self(out))
            }
        }

        impl TryFrom<&[u8]> for $name {
            type Error = IdError;
            fn try_from(bytes: &[u8]) -> Result<Self, IdError> {
                Self::from_slice(bytes)
            }
        }

        impl AsRef<[u8]> for $name {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "{} hex characters", $len * 2)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        v.parse().map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

hex_id!(
    /// BLAKE3 hash of a chunk's plaintext, computed by the agent and verified
    /// by the gateway on receipt. Never leaves the gateway's trust boundary
    /// towards the cloud.
    ChunkHash,
    32
);

hex_id!(
    /// Stored identity of a chunk: `BLAKE3-keyed(id_key, chunk_hash)`.
    /// Keyed over the *hash* (not the data) so the gateway can map the agent's
    /// hashes to ids without the data. See [`crate::crypto::MasterKey::id_key`].
    ChunkId,
    32
);

hex_id!(
    /// Random identity of a pack file (16 bytes).
    PackId,
    16
);

hex_id!(
    /// Random identity of a recovery point (16 bytes; text form is 32
    /// lowercase hex characters).
    PointId,
    16
);

impl ChunkHash {
    /// BLAKE3 of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }
}

impl ChunkId {
    /// The stored id of the chunk whose plaintext hash is `hash`:
    /// `blake3::keyed_hash(id_key, hash)`.
    pub fn derive(id_key: &[u8; 32], hash: &ChunkHash) -> Self {
        Self(*blake3::keyed_hash(id_key, &hash.0).as_bytes())
    }

    /// The stored id of a chunk with plaintext `data` (hash, then keyed hash).
    pub fn of_data(id_key: &[u8; 32], data: &[u8]) -> Self {
        Self::derive(id_key, &ChunkHash::of(data))
    }
}

impl PackId {
    /// A fresh random pack id.
    pub fn random() -> Self {
        Self(rand::random())
    }
}

impl PointId {
    /// A fresh random recovery-point id.
    pub fn random() -> Self {
        Self(rand::random())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn chunk_hash_known_answer() {
        // BLAKE3 test vector for "abc".
        assert_eq!(
            ChunkHash::of(b"abc").to_string(),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
    }

    #[test]
    fn chunk_id_known_answer() {
        let key = [0x42u8; 32];
        let id = ChunkId::derive(&key, &ChunkHash::of(b"abc"));
        assert_eq!(id, ChunkId::of_data(&key, b"abc"));
        assert_eq!(id.to_string(), CHUNK_ID_ABC_KEY42);
        // Keyed over the hash, not over the data.
        assert_ne!(id.0, *blake3::keyed_hash(&key, b"abc").as_bytes());
    }
    const CHUNK_ID_ABC_KEY42: &str =
        "dfe867bf74d7582d688c6a114d59e04d92237fe19f0cac7132610ae7be024cb3";

    #[test]
    fn hex_round_trip_and_errors() {
        let p: PointId = "00112233445566778899aabbccddeeff".parse().unwrap();
        assert_eq!(p.to_string(), "00112233445566778899aabbccddeeff");
        assert_eq!(
            format!("{p:?}"),
            "PointId(00112233445566778899aabbccddeeff)"
        );
        let upper: PointId = "00112233445566778899AABBCCDDEEFF".parse().unwrap();
        assert_eq!(upper, p);
        assert!(matches!(
            "00".parse::<PointId>(),
            Err(IdError::Length { .. })
        ));
        assert!(matches!(
            "zz112233445566778899aabbccddeeff".parse::<PointId>(),
            Err(IdError::Hex { .. })
        ));
        // Multi-byte UTF-8 of the right byte length must not panic.
        assert!("é".repeat(16).parse::<PointId>().is_err());
        assert!(PackId::from_slice(&[0u8; 15]).is_err());
        assert_eq!(PackId::from_slice(&[7u8; 16]).unwrap(), PackId([7; 16]));
    }

    #[test]
    fn serde_as_hex_string() {
        let id = PackId([0xab; 16]);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{}\"", "ab".repeat(16)));
        assert_eq!(serde_json::from_str::<PackId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<PackId>("\"abcd\"").is_err());
        assert!(serde_json::from_str::<PackId>("17").is_err());
    }

    #[test]
    fn random_ids_differ_and_order() {
        assert_ne!(PackId::random(), PackId::random());
        assert_ne!(PointId::random(), PointId::random());
        assert!(ChunkId([0; 32]) < ChunkId([1; 32]));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in ".{0,80}") {
            let _ = s.parse::<ChunkId>();
            let _ = s.parse::<PointId>();
        }

        #[test]
        fn display_parse_round_trip(b in proptest::array::uniform32(proptest::num::u8::ANY)) {
            let id = ChunkId(b);
            proptest::prop_assert_eq!(id.to_string().parse::<ChunkId>().unwrap(), id);
        }
    }
}
