//! The wire format (see `docs/wire-format.md`): [`encode`] a [`Message`] into
//! header bytes plus a list of buffers ready for a vectored write, and
//! [`decode`] a frame from a contiguous region into tensors that view it.
//!
//! The format is bytes only: nothing here opens a device. A frame whose
//! buffers are still on a device ([`Payload::Device`]) is written by
//! [`crate::outbound`], which reads them back while it writes.
//!
//! The rooms, in the order a frame's bytes lie:
//!
//! - `prelude`: the fixed 32 bytes every frame starts with ([`Prelude`]),
//!   written and checked against the [`Limits`], and the seal of a head
//!   (prelude flag [`FLAG_SEALED`]);
//! - `header`: the JSON header, its tensor columns and their rows;
//! - `compact`: the same header in binary (prelude flag [`FLAG_COMPACT`]);
//! - `encode`: a message into an [`Encoded`] frame (head plus buffer list),
//!   and [`layout`] of a frame whose bytes are written in place later;
//! - `decode`: a frame back into a [`Frame`] whose tensors view it, and
//!   [`plan_head`] of a frame whose buffers have not arrived yet.
//!
//! [`Message`]: crate::Message

use serde::{Deserialize, Serialize};
use tensorferry_device_map::Device;
use tensorferry_kernels::cpu::Checksum;
use tensorferry_kernels::DType;

mod compact;
mod decode;
mod encode;
mod header;
mod prelude;

pub use decode::{decode, decode_at, plan_head, verify_checksums, Frame, HeadPlan, PlannedTensor};
pub use encode::{encode, encode_staged, layout, EncodeOptions, Encoded, FrameLayout, Payload};
pub use prelude::Prelude;

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"TFRM";
/// The format version this build writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of the fixed prelude.
pub const PRELUDE_BYTES: usize = 32;
/// Prelude flag: the header is in the compact binary form, not JSON.
pub const FLAG_COMPACT: u16 = 0x0001;
/// Prelude flag: the head is sealed — prelude bytes 24..32 hold the
/// checksum of the rest of the head (see [`Prelude::seal`]). Frames whose
/// tensors carry checksums are sealed, so a header changed on the way
/// (another sequence number, channel, name or dtype) is caught as surely
/// as a tensor byte.
pub const FLAG_SEALED: u16 = 0x0002;

/// `x` rounded up to a multiple of `to`; `None` on overflow.
fn align_up(x: u64, to: u64) -> Option<u64> {
    x.checked_add(to - 1).map(|v| v / to * to)
}

/// What a frame is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A published message.
    Message,
    /// A request to a service.
    Request,
    /// A service's reply.
    Reply,
    /// A service's error reply.
    Error,
    /// Control: the sender wants the messages of this channel (`*`: every channel).
    Subscribe,
    /// Control: the sender no longer wants the messages of this channel.
    Unsubscribe,
    /// Shared memory: a `message` frame lies in a shared slot (`fields`: `slot`, `offset`, `len`, `fd`).
    Shm,
    /// Shared memory: the receiver is done with the frame at `slot`, `offset`.
    Release,
    /// Control (tcp): stripes for this connection — a dialer asks
    /// (`count`), a listener gives the token they join with (`count`,
    /// `token`).
    Stripes,
}

/// Decoder limits, enforced before anything is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest JSON header, in bytes. Default 16 MiB.
    pub max_header_bytes: u32,
    /// Most tensors (plus objects) per message. Default 65 536.
    pub max_tensors: usize,
    /// Most buffers per message. Default 65 536.
    pub max_buffers: u32,
    /// Largest frame, in bytes. Default 64 GiB.
    pub max_message_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 16 << 20,
            max_tensors: 65_536,
            max_buffers: 65_536,
            max_message_bytes: 64 << 30,
        }
    }
}

/// The routing part of a frame: channel, sequence number, kind and request id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameMeta {
    /// Channel name.
    pub channel: String,
    /// The sender's sequence number on the channel.
    pub seq: u64,
    /// What the frame is for.
    pub kind: Kind,
    /// Correlates a reply with its request.
    pub id: Option<u64>,
}

impl FrameMeta {
    /// A published message on `channel` with sequence number `seq`.
    pub fn message(channel: impl Into<String>, seq: u64) -> Self {
        Self {
            channel: channel.into(),
            seq,
            kind: Kind::Message,
            id: None,
        }
    }
}

/// What the header says about one tensor besides its name, dtype, shape and
/// strides (which the message and the decoded [`Tensor`](crate::Tensor) carry).
/// [`Frame::tensors`] holds one per tensor, in message order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: DType,
    /// The device the tensor was on at the sender.
    pub device: Device,
    /// Index into the frame's buffers.
    pub buffer: usize,
    /// Bytes of the buffer.
    pub bytes: u64,
    /// The sender's checksum of the bytes, if it sent one.
    pub checksum: Option<Checksum>,
    /// The dtype the tensor had at the sender when it was cast to `dtype`
    /// for the wire (a channel's `wire_dtype`); `None` when it was not.
    pub cast_from: Option<DType>,
}

/// What the sender says of one tensor besides what the tensor itself
/// carries: where it was, the dtype it had before a wire cast, and its
/// checksum. [`encode_staged`] takes one per tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The device the tensor was on at the sender.
    pub device: Device,
    /// The dtype it had before being cast for the wire.
    pub cast_from: Option<DType>,
    /// The checksum of the bytes as they travel (after any cast).
    pub checksum: Option<Checksum>,
}
