//! Frames over a byte stream (a TCP or Unix socket): each frame is read
//! straight into a pooled buffer after its prelude has been checked.

use std::io::{self, Read};

use crate::error::{Error, Result};
use crate::pool::BufferPool;
use crate::wire::{decode_at, Frame, Limits, Prelude, PRELUDE_BYTES};

/// Reads frames from a stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    pool: BufferPool,
    limits: Limits,
    offset: u64,
}

/// Reads until `buf` is full; `Ok(false)` when the stream ended before the first byte.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) if done == 0 => return Ok(false),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the stream ended mid-frame",
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

impl<R: Read> FrameReader<R> {
    /// Reads frames from `inner` into buffers from `pool`, within `limits`.
    pub fn new(inner: R, pool: BufferPool, limits: Limits) -> Self {
        Self {
            inner,
            pool,
            limits,
            offset: 0,
        }
    }

    /// The next frame; `Ok(None)` when the stream ended cleanly between frames.
    ///
    /// # Errors
    ///
    /// A stream that ends mid-frame, an I/O error, or a frame the decoder rejects.
    /// Nothing beyond the prelude is allocated for a frame that exceeds the limits.
    pub fn read_frame(&mut self) -> Result<Option<Frame>> {
        let mut prelude = [0u8; PRELUDE_BYTES];
        let context = |offset: u64| format!("reading the frame at stream byte {offset}");
        if !fill(&mut self.inner, &mut prelude).map_err(|e| Error::io(context(self.offset), e))? {
            return Ok(None);
        }
        let p = Prelude::parse(&prelude, &self.limits, self.offset)?;
        let len = usize::try_from(p.frame_len).map_err(|_| Error::Limit {
            what: "frame size",
            value: p.frame_len,
            limit: usize::MAX as u64,
        })?;
        let mut buf = self.pool.get(len);
        let bytes = buf.as_mut_slice();
        bytes[..PRELUDE_BYTES].copy_from_slice(&prelude);
        match fill(&mut self.inner, &mut bytes[PRELUDE_BYTES..]) {
            Ok(true) => {}
            Ok(false) => {
                return Err(Error::io(
                    context(self.offset),
                    io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended mid-frame"),
                ))
            }
            Err(e) => return Err(Error::io(context(self.offset), e)),
        }
        let frame = decode_at(&buf.freeze(), &self.limits, self.offset)?;
        self.offset += p.frame_len;
        Ok(Some(frame))
    }

    /// The stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{encode, EncodeOptions, FrameMeta};
    use crate::{Message, Tensor};

    fn frames(n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for seq in 0..n {
            let m = Message::new().tensor(
                "x",
                Tensor::from_slice(&[seq as u32; 100], &[100]).expect("t"),
            );
            encode(&m, &FrameMeta::message("/s", seq), EncodeOptions::default())
                .expect("encode")
                .write_to(&mut out)
                .expect("write");
        }
        out
    }

    #[test]
    fn reads_frames_until_a_clean_end_and_reports_a_cut_one() {
        let bytes = frames(3);
        let pool = BufferPool::new(1 << 20);
        let mut r = FrameReader::new(&bytes[..], pool.clone(), Limits::default());
        for seq in 0..3 {
            let f = r.read_frame().expect("frame").expect("present");
            assert_eq!(f.meta.seq, seq);
            assert_eq!(
                f.message
                    .get("x")
                    .expect("x")
                    .as_slice::<u32>()
                    .expect("u32")[99],
                seq as u32
            );
        }
        assert!(r.read_frame().expect("clean end").is_none());
        for cut in [1, 31, 32, 100, bytes.len() / 3 + 7, bytes.len() - 1] {
            let mut r = FrameReader::new(&bytes[..cut], pool.clone(), Limits::default());
            let outcome = std::iter::from_fn(|| r.read_frame().transpose()).find(Result::is_err);
            assert!(
                outcome.is_some(),
                "cut at {cut} must end in an error, not a clean end"
            );
        }
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_before_allocating() {
        let bytes = frames(1);
        let limits = Limits {
            max_message_bytes: 128,
            ..Limits::default()
        };
        let pool = BufferPool::new(1 << 20);
        let mut r = FrameReader::new(&bytes[..], pool.clone(), limits);
        assert!(matches!(r.read_frame(), Err(Error::Limit { .. })));
        assert_eq!(pool.idle_bytes(), 0);
    }
}
