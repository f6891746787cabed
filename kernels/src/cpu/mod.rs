//! The CPU kernels: the reference every other backend must match bit for bit.

mod checksum;
mod pack;

pub use checksum::{checksum, Checksum, CHECKSUM_BLOCK_BYTES};
pub use pack::{pack, unpack};
