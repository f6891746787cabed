//! The fixed 32-byte prelude every frame starts with: written by the
//! encoder, checked by [`Prelude::parse`] before anything is allocated.

use tensorferry_kernels::cpu;

use super::{align_up, Limits, FLAG_COMPACT, FLAG_SEALED, MAGIC, PRELUDE_BYTES, VERSION};
use crate::buffer::ALIGN;
use crate::error::{Error, Result};

/// The fixed prelude of a frame, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prelude {
    /// The header is in the compact binary form ([`FLAG_COMPACT`]), not JSON.
    pub compact: bool,
    /// Bytes of the header.
    pub header_len: u32,
    /// Number of buffers.
    pub buffer_count: u32,
    /// Bytes of the whole frame.
    pub frame_len: u64,
    /// Where the buffer table starts.
    pub table_start: u64,
    /// Where the first buffer starts (the end of the head).
    pub data_start: u64,
    /// The head's checksum as the sender computed it ([`FLAG_SEALED`]):
    /// checked against the head's bytes once they are in (see
    /// [`Prelude::check_seal`]).
    pub seal: Option<u64>,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

pub(super) fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Prelude {
    /// Checks the first 32 bytes of a frame against the format and `limits`;
    /// `base` is the frame's offset, for error messages. A stream reader calls
    /// this before allocating anything for the frame.
    ///
    /// # Errors
    ///
    /// Truncation, a wrong magic, an unknown version, unknown flags, or a limit exceeded.
    pub fn parse(bytes: &[u8], limits: &Limits, base: u64) -> Result<Prelude> {
        if bytes.len() < PRELUDE_BYTES {
            return Err(Error::Truncated {
                offset: base,
                needed: PRELUDE_BYTES as u64,
                available: bytes.len() as u64,
            });
        }
        let frame = |at: u64, what: String| Error::Frame {
            offset: base + at,
            what,
        };
        if bytes[..4] != MAGIC {
            // A listener that requires a shared secret opens with its
            // challenge: a dialer without the secret reads that here.
            let hint = if &bytes[..4] == b"TFAU" {
                " (an authentication challenge: the peer requires a shared secret this node was not given; \
                 set the same secret on both sides, e.g. NodeBuilder::secret or --secret-file)"
            } else {
                ""
            };
            return Err(frame(
                0,
                format!(
                    "not a tensorferry frame: magic bytes {:02x?}, expected \"TFRM\"{hint}",
                    &bytes[..4]
                ),
            ));
        }
        let version = le_u16(bytes, 4);
        if version != VERSION {
            return Err(Error::UnknownVersion {
                found: version,
                supported: VERSION,
            });
        }
        let flags = le_u16(bytes, 6);
        if flags & !(FLAG_COMPACT | FLAG_SEALED) != 0 {
            return Err(frame(
                6,
                format!(
                    "flags {flags:#06x} are set; version {VERSION} defines only {FLAG_COMPACT:#06x} (compact header) and {FLAG_SEALED:#06x} (sealed head)"
                ),
            ));
        }
        let header_len = le_u32(bytes, 8);
        let buffer_count = le_u32(bytes, 12);
        let frame_len = le_u64(bytes, 16);
        let seal = (flags & FLAG_SEALED != 0).then(|| le_u64(bytes, 24));
        if seal.is_none() && le_u64(bytes, 24) != 0 {
            return Err(frame(24, "reserved bytes are not zero".into()));
        }
        let limit = |what, value: u64, limit: u64| {
            if value > limit {
                Err(Error::Limit { what, value, limit })
            } else {
                Ok(())
            }
        };
        limit(
            "header size",
            header_len.into(),
            limits.max_header_bytes.into(),
        )?;
        limit(
            "buffer count",
            buffer_count.into(),
            limits.max_buffers.into(),
        )?;
        limit("frame size", frame_len, limits.max_message_bytes)?;
        if frame_len % ALIGN as u64 != 0 {
            return Err(frame(
                16,
                format!("frame length {frame_len} is not a multiple of {ALIGN}"),
            ));
        }
        let table_start =
            align_up(PRELUDE_BYTES as u64 + u64::from(header_len), 8).expect("below 2^33");
        let data_start =
            align_up(table_start + 8 * u64::from(buffer_count), ALIGN as u64).expect("below 2^36");
        if frame_len < data_start {
            return Err(frame(
                16,
                format!("frame length {frame_len} is smaller than its header and buffer table ({data_start} bytes)"),
            ));
        }
        Ok(Prelude {
            compact: flags & FLAG_COMPACT != 0,
            header_len,
            buffer_count,
            frame_len,
            table_start,
            data_start,
            seal,
        })
    }

    /// Checks a sealed head: `head` (at least the frame's first
    /// `data_start` bytes) must give the checksum the sender sealed it with.
    /// An unsealed frame passes.
    ///
    /// # Errors
    ///
    /// [`Error::Frame`] when the prelude (but for the seal itself), the
    /// header, the buffer table or the padding changed on the way.
    pub fn check_seal(&self, head: &[u8], base: u64) -> Result<()> {
        let Some(want) = self.seal else {
            return Ok(());
        };
        let got = seal_of(&head[..self.data_start as usize]);
        if got != want {
            return Err(Error::Frame {
                offset: base + 24,
                what: format!(
                    "the head's checksum does not match: the sender sealed it with {want:016x}, the bytes received give {got:016x} (its header, buffer table or prelude changed on the way)"
                ),
            });
        }
        Ok(())
    }
}

/// The seal of a frame's head: the checksum of its bytes, the seal's own
/// eight (prelude bytes 24..32) read as zeros.
pub(super) fn seal_of(head: &[u8]) -> u64 {
    let mut bytes = head.to_vec();
    bytes[24..PRELUDE_BYTES].fill(0);
    cpu::checksum(&bytes).0
}

/// Seals `head` (a whole head, prelude included): sets [`FLAG_SEALED`] and
/// writes the seal into prelude bytes 24..32.
pub(super) fn seal(head: &mut [u8]) {
    let flags = le_u16(head, 6) | FLAG_SEALED;
    head[6..8].copy_from_slice(&flags.to_le_bytes());
    let sum = seal_of(head);
    head[24..PRELUDE_BYTES].copy_from_slice(&sum.to_le_bytes());
}

/// The prelude of a frame of `frame_len` bytes with a header of
/// `header_len` bytes (compact or JSON) and `buffer_count` buffers.
pub(super) fn write(
    compact: bool,
    header_len: u32,
    buffer_count: u32,
    frame_len: u64,
) -> [u8; PRELUDE_BYTES] {
    let mut prelude = [0u8; PRELUDE_BYTES];
    prelude[..4].copy_from_slice(&MAGIC);
    prelude[4..6].copy_from_slice(&VERSION.to_le_bytes());
    let flags = if compact { FLAG_COMPACT } else { 0 };
    prelude[6..8].copy_from_slice(&flags.to_le_bytes());
    prelude[8..12].copy_from_slice(&header_len.to_le_bytes());
    prelude[12..16].copy_from_slice(&buffer_count.to_le_bytes());
    prelude[16..24].copy_from_slice(&frame_len.to_le_bytes());
    // Bytes 24..32 stay zero, unless the head is sealed once it is whole.
    prelude
}
