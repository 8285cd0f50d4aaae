//! Tierback agent: runs on the Hyper-V host. It finds VMs through a host
//! provider, reads their disks with its own VHDX/VHD reader (source disks are
//! opened read-only and never written), cuts them into fixed-size chunks of
//! the virtual disk, asks the gateway which chunks it lacks and sends only
//! those.

pub mod backup;
pub mod changes;
pub mod client;
pub mod consistency;
pub mod disk;
pub mod host;
pub mod run;
pub mod seed;
pub mod state;
