//! The CPU kernels: the reference every other backend must match bit for bit.
//!
//! Each kernel runs on the calling thread for small inputs and on the rayon
//! pool above a size threshold; results never depend on the split.

mod buffer;
mod cast;
mod checksum;
pub(crate) mod pack;

pub use buffer::{AlignedBuffer, HOST_ALIGN};
pub use cast::cast;
pub use checksum::{checksum, finish as finish_checksum, Checksum, CHECKSUM_BLOCK_BYTES};
pub use pack::{pack, unpack};
