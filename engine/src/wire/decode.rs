//! Decoding: the frame at the start of a region into a [`Frame`] whose
//! tensors view the region, every length and descriptor checked first; the
//! checksums a sender sent; and [`plan_head`], what a frame's head says
//! before its buffers arrive.

use std::ops::Range;

use tensorferry_device_map::Device;
use tensorferry_kernels::cpu::{checksum, Checksum};
use tensorferry_kernels::{element_count, DType, Layout};

use super::header::{self, Few, Header};
use super::prelude::le_u64;
use super::{align_up, FrameMeta, Limits, Prelude, TensorInfo};
use crate::buffer::{HostBuffer, ALIGN};
use crate::error::{Error, Result};
use crate::message::{first_duplicate, Message, Object};
use crate::tensor::Tensor;

/// what the header said about each tensor.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Channel, sequence number, kind and id.
    pub meta: FrameMeta,
    /// The message; its tensors are host views into the frame.
    pub message: Message,
    /// Each tensor's descriptor (source device, checksum, …), in the order of
    /// `message.tensors()`.
    pub tensors: Vec<TensorInfo>,
    /// Bytes the frame occupies.
    pub frame_len: u64,
}

impl Frame {
    /// Verifies every checksum the sender sent; returns how many were checked.
    ///
    /// # Errors
    ///
    /// [`Error::Tensor`] naming the first tensor whose bytes do not match.
    pub fn verify_checksums(&self) -> Result<usize> {
        verify_checksums(&self.message, &self.tensors)
    }
}

/// Verifies every checksum in `infos` (one per tensor of `message`, in order);
/// returns how many were checked.
///
/// # Errors
///
/// [`Error::Tensor`] naming the first tensor whose bytes do not match.
pub fn verify_checksums(message: &Message, infos: &[TensorInfo]) -> Result<usize> {
    let mut checked = 0;
    for ((name, t), info) in message.tensors().zip(infos) {
        let Some(want) = info.checksum else { continue };
        let got = checksum(t.packed()?.as_slice());
        if got != want {
            return Err(Error::tensor(
                name,
                format!(
                    "checksum mismatch: the sender computed {want}, the bytes received give {got}"
                ),
            ));
        }
        checked += 1;
    }
    Ok(checked)
}

/// The prelude, buffer places and header of the frame that `bytes` starts
/// with: all of it when `whole`, else at least its head.
fn head_parts<'b>(
    bytes: &'b [u8],
    limits: &Limits,
    base: u64,
    whole: bool,
) -> Result<(Prelude, Few<Range<usize>>, Header<'b>)> {
    let p = Prelude::parse(bytes, limits, base)?;
    let needed = if whole { p.frame_len } else { p.data_start };
    if (bytes.len() as u64) < needed {
        return Err(Error::Truncated {
            offset: base,
            needed,
            available: bytes.len() as u64,
        });
    }
    p.check_seal(bytes, base)?;
    let ranges = buffer_ranges(bytes, &p, base)?;
    let header = header::parse(bytes, &p, base)?;
    Ok((p, ranges, header))
}

/// Where each buffer lies, from the table, each checked against the frame's
/// end; `bytes` holds at least the frame's head.
fn buffer_ranges(bytes: &[u8], p: &Prelude, base: u64) -> Result<Few<Range<usize>>> {
    let frame = |at: u64, what: String| Error::Frame {
        offset: base + at,
        what,
    };
    // The prelude's count was checked against the head's length.
    let mut ranges = Few::with_capacity(p.buffer_count as usize);
    let mut at = p.data_start;
    for i in 0..p.buffer_count as usize {
        let entry = p.table_start + 8 * i as u64;
        let len = le_u64(bytes, entry as usize);
        let end = at
            .checked_add(len)
            .filter(|&e| e <= p.frame_len)
            .ok_or_else(|| {
                frame(
                    entry,
                    format!(
                        "buffer {i} of {len} bytes at byte {at} reaches past the frame's end ({})",
                        p.frame_len
                    ),
                )
            })?;
        ranges.push(at as usize..end as usize);
        at = align_up(end, ALIGN as u64).expect("end is at most frame_len");
    }
    if at != p.frame_len {
        return Err(frame(
            16,
            format!(
                "frame length is {} but its buffers end at {at}",
                p.frame_len
            ),
        ));
    }
    Ok(ranges)
}

/// What a frame's head says before its buffers arrive: enough for a reader
/// to send each tensor's bytes straight to the device it will land on.
#[derive(Debug, Clone)]
pub struct HeadPlan {
    /// Channel, sequence number, kind and id.
    pub meta: FrameMeta,
    /// Each tensor, in message order.
    pub tensors: Vec<PlannedTensor>,
    /// Each buffer's byte range in the frame, in table order.
    pub buffers: Vec<Range<usize>>,
}

/// One tensor of a [`HeadPlan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTensor {
    /// The device it was on at the sender.
    pub device: Device,
    /// Index into [`HeadPlan::buffers`].
    pub buffer: usize,
    /// True when its bytes are exactly its elements, row-major (what
    /// senders send): only such a tensor can be read straight to a device.
    pub contiguous: bool,
}

/// Reads a frame's head — `head` holds at least the bytes up to the first
/// buffer — without its buffers. Everything it returns is checked again by
/// [`decode_at`] once the buffers are in.
///
/// # Errors
///
/// As [`decode_at`], for the prelude, the buffer table and the header.
pub fn plan_head(head: &[u8], limits: &Limits, base: u64) -> Result<HeadPlan> {
    let (_, buffers, header) = head_parts(head, limits, base, false)?;
    let tensors = header
        .tensors
        .rows()?
        .iter()
        .map(|d| {
            let device: Device = d
                .device
                .parse()
                .map_err(|e| Error::tensor(d.name, format!("{e}")))?;
            let buffer = usize::try_from(d.buffer)
                .ok()
                .filter(|&i| i < buffers.len())
                .ok_or_else(|| {
                    Error::tensor(d.name, format!("buffer index {} is out of range", d.buffer))
                })?;
            Ok(PlannedTensor {
                device,
                buffer,
                contiguous: d.strides.is_none(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(HeadPlan {
        meta: FrameMeta {
            channel: header.channel,
            seq: header.seq,
            kind: header.kind,
            id: header.id,
        },
        tensors,
        buffers: buffers.into_vec(),
    })
}

/// Decodes the frame at the start of `region` (which may hold more bytes after it).
///
/// Every length, offset, count and shape product is checked against the bytes
/// present and against `limits` before use; tensors view `region` without copying.
///
/// # Errors
///
/// An error naming what is wrong and where (byte offset or tensor name).
pub fn decode(region: &HostBuffer, limits: &Limits) -> Result<Frame> {
    decode_at(region, limits, 0)
}

/// [`decode`], with error offsets counted from `base` (the frame's place in a file or stream).
///
/// # Errors
///
/// As [`decode`].
pub fn decode_at(region: &HostBuffer, limits: &Limits, base: u64) -> Result<Frame> {
    let (p, ranges, header) = head_parts(region.as_slice(), limits, base, true)?;
    let count = header.tensors.name.len() + header.objects.len();
    if count > limits.max_tensors {
        return Err(Error::Limit {
            what: "tensor count",
            value: count as u64,
            limit: limits.max_tensors as u64,
        });
    }

    let mut used: Few<bool> = smallvec::smallvec![false; ranges.len()];
    let mut take = |name: &str, index: u64| -> Result<Range<usize>> {
        let i = usize::try_from(index)
            .ok()
            .filter(|&i| i < ranges.len())
            .ok_or_else(|| {
                Error::tensor(
                    name,
                    format!(
                        "buffer index {index} is out of range ({} buffers)",
                        ranges.len()
                    ),
                )
            })?;
        if std::mem::replace(&mut used[i], true) {
            return Err(Error::tensor(name, format!("buffer {i} is used twice")));
        }
        Ok(ranges[i].clone())
    };
    let rows = header.tensors.rows()?;
    let names = rows.iter().map(|d| d.name);
    if let Some(name) = first_duplicate(names.chain(header.objects.iter().map(|o| o.name.as_str())))
    {
        return Err(Error::DuplicateName {
            name: name.to_string(),
        });
    }
    let mut tensors = Vec::with_capacity(rows.len());
    let mut infos = Vec::with_capacity(rows.len());
    for d in &rows {
        let name = d.name;
        let dtype: DType = d
            .dtype
            .parse()
            .map_err(|e| Error::tensor(name, format!("{e}")))?;
        let device: Device = d
            .device
            .parse()
            .map_err(|e| Error::tensor(name, format!("{e}")))?;
        let shape = d.shape;
        let numel = element_count(shape).ok_or_else(|| {
            Error::tensor(
                name,
                format!("shape {shape:?} has more elements than fit in memory"),
            )
        })?;
        let range = take(name, d.buffer)?;
        let buffer_len = range.len() as u64;
        if d.bytes != buffer_len {
            return Err(Error::tensor(
                name,
                format!("says {} bytes but its buffer has {buffer_len}", d.bytes),
            ));
        }
        let view = region
            .slice(range)
            .expect("ranges were checked against the frame");
        let tensor = match d.strides {
            None => {
                let want = numel
                    .checked_mul(dtype.size_bytes())
                    .filter(|&b| b as u64 == d.bytes);
                if want.is_none() {
                    return Err(Error::tensor(
                        name,
                        format!("{dtype} × {shape:?} is not {} bytes", d.bytes),
                    ));
                }
                Tensor::from_host(dtype, shape, view)
            }
            Some(strides) => {
                let layout = Layout::new(shape, strides, 0)
                    .map_err(|e| Error::tensor(name, e.to_string()))?;
                // A view may show less than its buffer, never more: packing
                // allocates its visible bytes, and strides of 0 would let a
                // few bytes claim terabytes (or overflow the byte count).
                let visible = numel
                    .checked_mul(dtype.size_bytes())
                    .filter(|&b| b as u64 <= d.bytes);
                if visible.is_none() {
                    return Err(Error::tensor(
                        name,
                        format!("{dtype} × {shape:?} is more than its {} bytes", d.bytes),
                    ));
                }
                Tensor::from_host_strided(dtype, layout, view)
            }
        }
        .map_err(|e| Error::tensor(name, e.to_string()))?;
        let checksum = d
            .checksum
            .map(str::parse::<Checksum>)
            .transpose()
            .map_err(|e| Error::tensor(name, e.to_string()))?;
        let cast_from = match d.cast_from {
            None => None,
            Some(text) => {
                let from: DType = text
                    .parse()
                    .map_err(|e| Error::tensor(name, format!("cast_from: {e}")))?;
                if !tensorferry_kernels::cast::is_supported(dtype, from) {
                    return Err(Error::tensor(
                        name,
                        format!("cast_from says {from}, but {dtype} cannot be cast back to {from}"),
                    ));
                }
                Some(from)
            }
        };
        infos.push(TensorInfo {
            dtype,
            device,
            buffer: d.buffer as usize,
            bytes: d.bytes,
            checksum,
            cast_from,
        });
        tensors.push((name.to_string(), tensor));
    }
    let mut objects = Vec::with_capacity(header.objects.len());
    for o in &header.objects {
        let buffers = o
            .buffers
            .iter()
            .map(|&i| take(&o.name, i).map(|r| region.slice(r).expect("checked")))
            .collect::<Result<Vec<_>>>()?;
        objects.push((
            o.name.clone(),
            Object {
                tag: o.tag.clone(),
                value: o.value.clone(),
                buffers,
            },
        ));
    }
    if let Some(unused) = used.iter().position(|u| !u) {
        return Err(Error::Frame {
            offset: base + p.table_start + 8 * unused as u64,
            what: format!("buffer {unused} is not used by any tensor or object"),
        });
    }
    Ok(Frame {
        meta: FrameMeta {
            channel: header.channel,
            seq: header.seq,
            kind: header.kind,
            id: header.id,
        },
        message: Message::from_parts(header.fields, tensors, objects),
        tensors: infos,
        frame_len: p.frame_len,
    })
}
