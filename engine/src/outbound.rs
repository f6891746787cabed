//! Writing an encoded frame out: [`write_frame`] to a stream (a file),
//! [`copy_frame_into`] a region (a shared-memory slot), and `FrameWriter` a
//! piece at a time to a connection that never blocks. This is where a
//! frame's device buffers ([`Payload::Device`]) are read back, chunk by
//! chunk, while the frame is written; [`crate::wire`] itself only lays bytes
//! out.
//!
//! # Examples
//!
//! ```
//! use tensorferry_engine::wire::{decode, encode, EncodeOptions, FrameMeta, Limits};
//! use tensorferry_engine::{outbound, HostBuffer, Message, Tensor};
//!
//! let m = Message::new().tensor("x", Tensor::from_slice(&[1u16, 2, 3], &[3])?);
//! let frame = encode(&m, &FrameMeta::message("/demo", 0), EncodeOptions::default())?;
//!
//! let mut stream = Vec::new();
//! outbound::write_frame(&frame, &mut stream)?;
//! let mut slot = vec![0u8; frame.frame_len() as usize];
//! outbound::copy_frame_into(&frame, &mut slot)?;
//! assert_eq!(stream, slot);
//! assert_eq!(decode(&HostBuffer::copy_from(&slot), &Limits::default())?.message.tensors().len(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::{self, IoSlice, Write};
use std::sync::Arc;

use tensorferry_kernels::runtime::{DeviceBuffer, Runtime};

use crate::buffer::{HostBufferMut, ALIGN};
use crate::wire::{Encoded, Payload};

/// Bytes of a device buffer read back at a time by a [`FrameWriter`].
const DEVICE_CHUNK: usize = 4 << 20;

/// The zero padding after a buffer, at most one alignment unit.
static ZEROS: [u8; ALIGN] = [0; ALIGN];

/// Writes the whole of `frame` to `w`: runs of host bytes with vectored
/// writes; device buffers through their device's staging pipeline, each
/// chunk written as soon as it reaches the host.
///
/// Every device the frame needs is opened before the first byte goes out,
/// so failing to reach one leaves nothing of the frame on the stream.
///
/// # Errors
///
/// The writer's errors; a device that cannot be opened or read back.
pub fn write_frame(frame: &Encoded, w: &mut impl Write) -> io::Result<()> {
    let runtimes = open_devices(frame)?;
    let buffers = frame.buffers();
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(1 + 2 * buffers.len());
    slices.push(IoSlice::new(frame.head()));
    for b in buffers {
        match b {
            Payload::Host(h) if !h.is_empty() => slices.push(IoSlice::new(h.as_slice())),
            Payload::Host(_) => {}
            Payload::Device(d) => {
                write_all_vectored(w, &mut slices)?;
                let rt = runtimes
                    .iter()
                    .find(|rt| rt.device() == d.device())
                    .expect("every device of the frame was opened above");
                // The sink's own error (the socket's) is kept whole, rather
                // than as the text the runtime wraps it in.
                let mut failed = None;
                rt.download_to(d, &mut |chunk| {
                    w.write_all(chunk).inspect_err(|e| {
                        failed = Some(io::Error::new(e.kind(), e.to_string()));
                    })
                })
                .map_err(|e| failed.take().unwrap_or_else(|| io::Error::other(e)))?;
            }
        }
        let pad = pad_to_align(b.len());
        if pad > 0 {
            slices.push(IoSlice::new(&ZEROS[..pad]));
        }
    }
    write_all_vectored(w, &mut slices)
}

/// Copies the whole of `frame` into `out`, which must be exactly
/// [`Encoded::frame_len`] bytes (a shared-memory slot): large host buffers
/// are copied by several threads at once, device buffers read back through
/// their staging pipeline.
///
/// # Errors
///
/// `out` of the wrong length; a device that cannot be opened or read back.
pub fn copy_frame_into(frame: &Encoded, out: &mut [u8]) -> io::Result<()> {
    if out.len() as u64 != frame.frame_len() {
        return Err(io::Error::other(format!(
            "a frame of {} bytes does not fit a region of {}; give a region of exactly the frame's length",
            frame.frame_len(),
            out.len()
        )));
    }
    let runtimes = open_devices(frame)?;
    let (head, mut rest) = out.split_at_mut(frame.head().len());
    head.copy_from_slice(frame.head());
    for b in frame.buffers() {
        let padded = b.len() + pad_to_align(b.len());
        let (dst, tail) = rest.split_at_mut(padded);
        let (data, pad) = dst.split_at_mut(b.len());
        match b {
            Payload::Host(h) => parallel_copy(data, h.as_slice()),
            Payload::Device(d) => {
                let rt = runtimes
                    .iter()
                    .find(|rt| rt.device() == d.device())
                    .expect("every device of the frame was opened above");
                let mut at = 0;
                rt.download_to(d, &mut |chunk| {
                    let end = at + chunk.len();
                    let place = data.get_mut(at..end).ok_or_else(|| {
                        io::Error::other(format!(
                            "{} returned {end} bytes for a buffer of {}",
                            d.device(),
                            d.len()
                        ))
                    })?;
                    place.copy_from_slice(chunk);
                    at = end;
                    Ok(())
                })
                .map_err(io::Error::other)?;
            }
        }
        pad.fill(0);
        rest = tail;
    }
    Ok(())
}

impl Encoded {
    /// Writes the whole frame to `w`; the same as [`write_frame`].
    ///
    /// # Errors
    ///
    /// As [`write_frame`].
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        write_frame(self, w)
    }

    /// Copies the whole frame into `out`; the same as [`copy_frame_into`].
    ///
    /// # Errors
    ///
    /// As [`copy_frame_into`].
    pub fn copy_into(&self, out: &mut [u8]) -> io::Result<()> {
        copy_frame_into(self, out)
    }
}

/// One runtime for each device that holds a buffer of `frame` (none for a
/// frame of host bytes).
fn open_devices(frame: &Encoded) -> io::Result<Vec<Runtime>> {
    let mut runtimes: Vec<Runtime> = Vec::new();
    for b in frame.buffers() {
        if let Payload::Device(d) = b {
            if !runtimes.iter().any(|rt| rt.device() == d.device()) {
                runtimes.push(Runtime::open(d.device()).map_err(io::Error::other)?);
            }
        }
    }
    Ok(runtimes)
}

/// Copies `src` into `dst` (same length); above a few MiB, in pieces on the
/// thread pool, since one core alone does not reach the memory's bandwidth.
fn parallel_copy(dst: &mut [u8], src: &[u8]) {
    use rayon::prelude::*;
    const PIECE: usize = 4 << 20;
    if src.len() < 2 * PIECE {
        dst.copy_from_slice(src);
    } else {
        dst.par_chunks_mut(PIECE)
            .zip(src.par_chunks(PIECE))
            .for_each(|(d, s)| d.copy_from_slice(s));
    }
}

/// Writes every slice, then empties the list.
fn write_all_vectored(w: &mut impl Write, slices: &mut Vec<IoSlice<'_>>) -> io::Result<()> {
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match w.write_vectored(rest) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "writer accepted no bytes",
                ))
            }
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    slices.clear();
    Ok(())
}

/// Zero bytes that follow a buffer of `len` bytes, up to the next 64-byte
/// boundary (docs/wire-format.md).
fn pad_to_align(len: usize) -> usize {
    (ALIGN - len % ALIGN) % ALIGN
}

/// One frame written to a link that never blocks, a piece at a time: how far it is, and the chunk
/// of a device buffer read back and not yet written.
pub(crate) struct FrameWriter {
    frame: Arc<Encoded>,
    /// A record written before the frame's bytes (a stripe's plan or
    /// chunk header), and how much of it is written.
    record: Option<([u8; 32], usize)>,
    /// The frame position written up to (it starts where the part does).
    at: u64,
    /// Where the part written ends (the frame's length for a whole frame).
    end: u64,
    /// The runtime of each device payload, opened before the first byte.
    runtimes: Vec<Runtime>,
    /// A device chunk on the host: `(start in the frame, bytes)`.
    staged: Option<(u64, HostBufferMut)>,
}

/// A frame's pieces in order: bytes on the host, or a device buffer.
enum Piece<'a> {
    Host(&'a [u8]),
    Device(&'a DeviceBuffer),
}

impl FrameWriter {
    /// Opens every device the frame's payloads are on, so that failing to
    /// reach one happens before a byte is written.
    ///
    /// # Errors
    ///
    /// A device that cannot be opened.
    pub(crate) fn new(frame: Arc<Encoded>) -> io::Result<FrameWriter> {
        let runtimes = open_devices(&frame)?;
        let end = frame.frame_len();
        Ok(FrameWriter {
            frame,
            record: None,
            at: 0,
            end,
            runtimes,
            staged: None,
        })
    }

    /// Writes `record` and then the bytes `range` of a host-only frame
    /// (one part of a striped frame: `transport/stripe.rs`).
    pub(crate) fn part(
        frame: Arc<Encoded>,
        record: [u8; 32],
        range: std::ops::Range<u64>,
    ) -> FrameWriter {
        debug_assert!(frame.host_only() && range.end <= frame.frame_len());
        FrameWriter {
            frame,
            record: Some((record, 0)),
            at: range.start,
            end: range.end,
            runtimes: Vec::new(),
            staged: None,
        }
    }

    /// Whether it writes a whole frame and nothing else (not a part).
    pub(crate) fn is_whole(&self) -> bool {
        self.record.is_none() && self.end == self.frame.frame_len()
    }

    fn pieces(frame: &Encoded) -> impl Iterator<Item = Piece<'_>> {
        std::iter::once(Piece::Host(frame.head())).chain(frame.buffers().iter().flat_map(|b| {
            let pad = pad_to_align(b.len());
            let data = match b {
                Payload::Host(h) => Piece::Host(h.as_slice()),
                Payload::Device(d) => Piece::Device(d),
            };
            [data, Piece::Host(&ZEROS[..pad])]
        }))
    }

    /// Whether every piece is on the host (no device read-back): such a
    /// frame can be written beside others in one vectored write.
    pub(crate) fn host_only(&self) -> bool {
        self.frame.host_only()
    }

    /// Whether nothing of it is written yet.
    pub(crate) fn at_start(&self) -> bool {
        self.at == 0 && self.record.is_none_or(|(_, done)| done == 0)
    }

    /// Bytes still to write.
    pub(crate) fn remaining(&self) -> u64 {
        let record = self.record.map_or(0, |(r, done)| r.len() - done) as u64;
        record + self.end - self.at
    }

    /// Counts `n` more bytes written (at most [`remaining`](Self::remaining)),
    /// by a write the caller made of [`host_slices`](Self::host_slices) (of
    /// a whole frame).
    pub(crate) fn advance(&mut self, n: u64) {
        self.at = (self.at + n).min(self.end);
    }

    /// The rest of a [host-only](Self::host_only) frame, as slices, added
    /// to `out`.
    pub(crate) fn host_slices<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) {
        let mut pos = 0u64;
        for piece in Self::pieces(&self.frame) {
            let Piece::Host(b) = piece else { continue };
            let end = pos + b.len() as u64;
            if end > self.at && !b.is_empty() {
                let off = self.at.max(pos) - pos;
                out.push(IoSlice::new(&b[off as usize..]));
            }
            pos = end;
        }
    }

    /// Writes what fits now; `Ok(true)` when the whole frame is written.
    ///
    /// # Errors
    ///
    /// `write`'s errors (`WouldBlock` is not one: it ends the call with
    /// `Ok(false)`); a device read-back that fails (the frame is then cut:
    /// the connection must be shut down).
    pub(crate) fn write_some(
        &mut self,
        write: &mut dyn FnMut(&[IoSlice<'_>]) -> io::Result<usize>,
    ) -> io::Result<bool> {
        if let Some((record, done)) = &mut self.record {
            while *done < record.len() {
                match write(&[IoSlice::new(&record[*done..])]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => *done += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let total = self.end;
        while self.at < total {
            let n = match self.slices_now()? {
                Some(slices) => match write(&slices) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                    Err(e) => return Err(e),
                },
                None => 0,
            };
            self.at += n as u64;
        }
        Ok(true)
    }

    /// The next run of bytes to write from `at`: host pieces as they are,
    /// or the staged chunk of a device buffer (read back first when none
    /// covers `at`; then `None`, and the caller asks again).
    fn slices_now(&mut self) -> io::Result<Option<Vec<IoSlice<'_>>>> {
        let at = self.at;
        let covered = self
            .staged
            .as_ref()
            .is_some_and(|(start, chunk)| (*start..start + chunk.len() as u64).contains(&at));
        if covered {
            let (start, chunk) = self.staged.as_ref().expect("checked above");
            let off = (at - start) as usize;
            let upto = chunk.len().min((self.end - start) as usize);
            return Ok(Some(vec![IoSlice::new(&chunk.as_slice()[off..upto])]));
        }
        let stop = self.end;
        let mut slices = Vec::new();
        let mut pos = 0u64;
        for piece in Self::pieces(&self.frame) {
            let len = match &piece {
                Piece::Host(b) => b.len() as u64,
                Piece::Device(d) => d.len() as u64,
            };
            let end = pos + len;
            if end <= self.at || len == 0 {
                pos = end;
                continue;
            }
            if pos >= stop {
                break;
            }
            let off = self.at.max(pos) - pos;
            // The part ends inside this piece, or after it.
            let upto = len.min(stop - pos);
            match piece {
                Piece::Host(b) => slices.push(IoSlice::new(&b[off as usize..upto as usize])),
                Piece::Device(d) if slices.is_empty() => {
                    let n = (upto - off).min(DEVICE_CHUNK as u64) as usize;
                    let rt = self
                        .runtimes
                        .iter()
                        .find(|rt| rt.device() == d.device())
                        .ok_or_else(|| {
                            io::Error::other("a device payload's runtime is not open")
                        })?;
                    let mut chunk = HostBufferMut::zeroed(n);
                    rt.download_range(d, off as usize, chunk.as_mut_slice())
                        .map_err(io::Error::other)?;
                    self.staged = Some((self.at, chunk));
                    return Ok(None);
                }
                Piece::Device(_) => break,
            }
            pos = end;
            if slices.len() >= 64 {
                break;
            }
        }
        Ok(Some(slices))
    }
}
