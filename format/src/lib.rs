//! Tierback's frozen formats: chunk identities, keys and sealing, packs, disk
//! indexes, VHDX encoding and the wire DTOs of the agent↔gateway protocol.
//!
//! This crate owns bytes, never files or sockets: every encoder writes into a
//! caller's buffer or `Write`, every decoder reads a caller's bytes or `Read`.
//! It must never depend on tokio, sqlx or anything that does I/O by itself, so
//! that the agent and the gateway agree on formats by linking the same code.
//! One process setting lives here too because both binaries share it: the
//! allocator thresholds of [`malloc`].

pub mod crypto;
pub mod ids;
pub mod index;
pub mod keyfile;
pub mod magic;
pub mod malloc;
pub mod pack;
#[cfg(feature = "pin")]
pub mod pin;
pub mod seed;
pub mod vhdx;
pub mod wire;
