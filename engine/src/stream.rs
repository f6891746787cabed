//! Frames over a byte stream (a TCP or Unix socket): each frame is read
//! straight into a pooled buffer after its prelude has been checked, or,
//! with a [`Router`], each tensor bound for a device straight to that device.

use std::fmt;
use std::io::{self, Read};
use std::sync::Arc;

use tensorferry_kernels::runtime::{DeviceBuffer, Runtime};

use crate::error::{Error, Result};
use crate::pool::BufferPool;
use crate::tensor::Tensor;
use crate::wire::{decode_at, plan_head, Frame, HeadPlan, Limits, Prelude, PRELUDE_BYTES};

/// Given what a frame's head says, the runtime each tensor's bytes should
/// be read into (one entry per tensor; `None`: the host frame buffer).
pub type Router = Arc<dyn Fn(&HeadPlan) -> Vec<Option<Runtime>> + Send + Sync>;

/// Reads frames from a stream.
pub struct FrameReader<R> {
    inner: R,
    pool: BufferPool,
    limits: Limits,
    offset: u64,
    router: Option<Router>,
}

impl<R> fmt::Debug for FrameReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameReader")
            .field("offset", &self.offset)
            .field("routed", &self.router.is_some())
            .finish()
    }
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
            router: None,
        }
    }

    /// Reads the bytes of tensors that `router` sends to a device (CUDA or
    /// wgpu) straight there: through the device's pinned chunks for CUDA,
    /// each chunk copied to the device while the next one is read from the
    /// stream. The returned frames hold those tensors on their devices.
    pub fn with_router(mut self, router: Router) -> Self {
        self.router = Some(router);
        self
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
        let read_rest = |inner: &mut R, bytes: &mut [u8]| match fill(inner, bytes) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Error::io(
                context(self.offset),
                io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended mid-frame"),
            )),
            Err(e) => Err(Error::io(context(self.offset), e)),
        };
        let mut on_devices = Vec::new();
        match &self.router {
            None => read_rest(&mut self.inner, &mut bytes[PRELUDE_BYTES..])?,
            Some(router) => {
                let head = p.data_start as usize;
                read_rest(&mut self.inner, &mut bytes[PRELUDE_BYTES..head])?;
                let plan = plan_head(&bytes[..head], &self.limits, self.offset)?;
                let mut at = head;
                for (i, range, rt) in device_targets(&plan, &router(&plan)) {
                    read_rest(&mut self.inner, &mut bytes[at..range.start])?;
                    let dev = rt.upload_from(&mut self.inner, range.len()).map_err(|e| {
                        Error::io(
                            context(self.offset),
                            io::Error::other(format!(
                                "reading buffer {i} into {}: {e}",
                                rt.device()
                            )),
                        )
                    })?;
                    on_devices.push((i, dev));
                    at = range.end;
                }
                read_rest(&mut self.inner, &mut bytes[at..])?;
            }
        }
        let mut frame = decode_at(&buf.freeze(), &self.limits, self.offset)?;
        self.offset += p.frame_len;
        if !on_devices.is_empty() {
            frame = with_device_tensors(frame, on_devices)?;
        }
        Ok(Some(frame))
    }

    /// The stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

/// The buffers of a frame to read straight into a device, in stream order:
/// `(buffer index, byte range in the frame, runtime)` for each contiguous
/// tensor that `routes` (one entry per tensor of `plan`) sends to a runtime.
pub(crate) fn device_targets(
    plan: &HeadPlan,
    routes: &[Option<Runtime>],
) -> Vec<(usize, std::ops::Range<usize>, Runtime)> {
    let mut streamed: Vec<Option<&Runtime>> = vec![None; plan.buffers.len()];
    for (t, route) in plan.tensors.iter().zip(routes) {
        if let (Some(rt), true) = (route, t.contiguous) {
            // `plan_head` checked the index against the table.
            if let Some(slot) = streamed.get_mut(t.buffer) {
                *slot = Some(rt);
            }
        }
    }
    streamed
        .into_iter()
        .zip(&plan.buffers)
        .enumerate()
        .filter_map(|(i, (rt, range))| rt.map(|rt| (i, range.clone(), rt.clone())))
        .collect()
}

/// `frame` with the tensors whose buffers were read into devices taking
/// those device buffers (their host ranges were never filled).
///
/// # Errors
///
/// [`Error::Tensor`] for a device buffer whose length does not fit its
/// tensor's dtype and shape.
pub(crate) fn with_device_tensors(
    mut frame: Frame,
    mut on_devices: Vec<(usize, DeviceBuffer)>,
) -> Result<Frame> {
    let mut tensors = Vec::with_capacity(frame.tensors.len());
    for ((name, t), info) in frame.message.tensors().zip(&frame.tensors) {
        let t = match on_devices.iter().position(|(i, _)| *i == info.buffer) {
            Some(k) => {
                let (_, dev) = on_devices.swap_remove(k);
                Tensor::from_device(t.dtype(), t.shape(), dev)
                    .map_err(|e| Error::tensor(name, e.to_string()))?
            }
            None => t.clone(),
        };
        tensors.push((name.to_string(), t));
    }
    frame.message = frame.message.with_tensors(tensors);
    Ok(frame)
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
