//! Encoding: a [`Message`] into an [`Encoded`] frame — the head (prelude,
//! header, buffer table, padding) and the list of buffers, never
//! concatenated — and [`layout`] of a frame whose tensor bytes are written
//! in place afterwards.

use std::sync::Arc;

use serde_json::{Map, Value};
use tensorferry_device_map::Device;
use tensorferry_kernels::cpu::checksum;
use tensorferry_kernels::{element_count, DType};

use super::header::{ColumnOut, ColumnsOut, Few, HeaderOut, ObjectDesc};
use super::{align_up, compact, prelude, FrameMeta, Origin, PRELUDE_BYTES};
use crate::buffer::{HostBuffer, ALIGN};
use crate::error::{Error, Result};
use crate::message::{first_duplicate, Message};
use crate::tensor::{DeviceBuffer, Tensor};

/// Encoding options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Compute and send each tensor's checksum. Default: off.
    pub checksums: bool,
    /// Write the header in the compact binary form (docs/wire-format.md),
    /// which is several times cheaper to write and read than JSON, unless the
    /// message holds codec objects (their header stays JSON). Default: off;
    /// nodes use it for what they send and record.
    pub compact: bool,
}

/// One buffer of an encoded frame: host bytes, or bytes still on a device,
/// read back chunk by chunk while the frame is written
/// ([`crate::outbound`]).
#[derive(Debug, Clone)]
pub enum Payload {
    /// Host bytes, written as they are.
    Host(HostBuffer),
    /// A device buffer (CUDA or wgpu), read back through the device's
    /// staging pipeline straight into the writer: a chunk is written while
    /// the next one is still being copied from the device.
    Device(Arc<DeviceBuffer>),
}

impl Payload {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Host(b) => b.len(),
            Payload::Device(b) => b.len(),
        }
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The host bytes, when the payload is on the host.
    pub fn host(&self) -> Option<&HostBuffer> {
        match self {
            Payload::Host(b) => Some(b),
            Payload::Device(_) => None,
        }
    }
}

/// An encoded frame: the bytes before the first buffer, then the buffers,
/// never concatenated. [`crate::outbound::write_frame`] writes it to a
/// stream and [`crate::outbound::copy_frame_into`] into a region, reading
/// device buffers back as they go.
#[derive(Debug, Clone)]
pub struct Encoded {
    head: Vec<u8>,
    buffers: Vec<Payload>,
    frame_len: u64,
}

impl Encoded {
    /// Prelude, header, buffer table and padding: everything before the first buffer.
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// The payload buffers, in table order.
    pub fn buffers(&self) -> &[Payload] {
        &self.buffers
    }

    /// Bytes of the whole frame, padding included.
    pub fn frame_len(&self) -> u64 {
        self.frame_len
    }

    /// Whether every buffer is on the host (nothing to read back from a
    /// device while writing it).
    pub fn host_only(&self) -> bool {
        self.buffers.iter().all(|b| b.host().is_some())
    }
}

/// Encodes `message` for `meta`. Strided tensors are packed (only their visible
/// elements travel); contiguous ones are shared, not copied.
///
/// # Errors
///
/// Duplicate names, a tensor that cannot be packed or read back from its
/// device, or a header too large for the format.
///
/// # Examples
///
/// ```
/// use tensorferry_engine::wire::{decode, encode, EncodeOptions, FrameMeta, Limits};
/// use tensorferry_engine::{HostBuffer, Message, Tensor};
///
/// let m = Message::new().field("step", 3).tensor("x", Tensor::from_slice(&[1u8, 2, 3], &[3])?);
/// let frame = encode(&m, &FrameMeta::message("/demo", 0), EncodeOptions::default())?;
/// let mut bytes = Vec::new();
/// tensorferry_engine::outbound::write_frame(&frame, &mut bytes)?;
/// let back = decode(&HostBuffer::copy_from(&bytes), &Limits::default())?;
/// assert_eq!(back.message.get("x").map(|t| t.as_slice::<u8>().map(<[u8]>::to_vec)).transpose()?, Some(vec![1, 2, 3]));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn encode(message: &Message, meta: &FrameMeta, options: EncodeOptions) -> Result<Encoded> {
    encode_inner(message, None, meta, options)
}

/// Encodes `message`, whose tensors a stager has already brought to the
/// host (and cast for the wire), with what `origins` says of each tensor
/// (one per tensor, in order): its device at the sender, its dtype before
/// the cast, its checksum. A tensor whose origin has no checksum gets one
/// computed here when `options.checksums` is set.
///
/// # Errors
///
/// As [`encode`], and when `origins` does not have one entry per tensor.
pub fn encode_staged(
    message: &Message,
    origins: &[Origin],
    meta: &FrameMeta,
    options: EncodeOptions,
) -> Result<Encoded> {
    if origins.len() != message.tensors().len() {
        return Err(Error::Invalid(format!(
            "{} origins for {} tensors",
            origins.len(),
            message.tensors().len()
        )));
    }
    encode_inner(message, Some(origins), meta, options)
}

fn encode_inner(
    message: &Message,
    origins: Option<&[Origin]>,
    meta: &FrameMeta,
    options: EncodeOptions,
) -> Result<Encoded> {
    message.check_names()?;
    let n = message.tensors().len();
    let origin = |i: usize| origins.and_then(|o| o.get(i));
    let with_sums =
        options.checksums || (0..n).any(|i| origin(i).is_some_and(|o| o.checksum.is_some()));
    let with_casts = (0..n).any(|i| origin(i).is_some_and(|o| o.cast_from.is_some()));
    let mut buffers = Vec::with_capacity(n);
    let mut tensors = ColumnsOut {
        name: Few::with_capacity(n),
        dtype: ColumnOut(Few::with_capacity(n)),
        shape: Few::with_capacity(n),
        device: ColumnOut(Few::with_capacity(n)),
        buffer: Few::with_capacity(n),
        bytes: Few::with_capacity(n),
        checksum: with_sums.then(|| Few::with_capacity(n)),
        cast_from: with_casts.then(|| Few::with_capacity(n)),
    };
    for (i, (name, t)) in message.tensors().enumerate() {
        let packed = payload(t).map_err(|e| Error::tensor(name, e.to_string()))?;
        let from = origin(i);
        tensors.name.push(name);
        tensors.dtype.0.push(t.dtype().name());
        tensors.shape.push(t.shape());
        tensors.device.0.push(from.map_or(t.device(), |o| o.device));
        tensors.buffer.push(buffers.len() as u64);
        tensors.bytes.push(packed.len() as u64);
        if let Some(sums) = &mut tensors.checksum {
            let sum = match (from.and_then(|o| o.checksum), &packed) {
                (Some(sum), _) => sum,
                (None, Payload::Host(h)) => checksum(h.as_slice()),
                // On the device that holds it: only the sum comes back.
                (None, Payload::Device(_)) => t
                    .checksum()
                    .map_err(|e| Error::tensor(name, e.to_string()))?,
            };
            sums.push(sum.to_string());
        }
        if let Some(casts) = &mut tensors.cast_from {
            casts.push(from.and_then(|o| o.cast_from).map(DType::name));
        }
        buffers.push(packed);
    }
    let mut objects = Vec::new();
    for (name, o) in message.objects() {
        let first = buffers.len() as u64;
        buffers.extend(o.buffers.iter().cloned().map(Payload::Host));
        objects.push(ObjectDesc {
            name: name.to_string(),
            tag: o.tag.clone(),
            value: o.value.clone(),
            buffers: (first..buffers.len() as u64).collect(),
        });
    }
    let header = HeaderOut {
        channel: &meta.channel,
        seq: meta.seq,
        kind: meta.kind,
        id: meta.id,
        fields: message.fields(),
        tensors,
        objects,
    };
    let lens: Few<u64> = buffers.iter().map(|b| b.len() as u64).collect();
    let compact = options.compact && header.objects.is_empty();
    let (head, frame_len) = assemble(&header, &lens, compact)?;
    Ok(Encoded {
        head,
        buffers,
        frame_len,
    })
}

/// What travels for tensor `t`: its device buffer when it is a whole,
/// contiguous device tensor (read back while the frame is written), its
/// packed host bytes otherwise.
fn payload(t: &Tensor) -> Result<Payload> {
    match t.device_buffer() {
        Some(d) if t.is_contiguous() && t.layout().offset() == 0 && d.len() == t.size_bytes() => {
            Ok(Payload::Device(Arc::clone(d)))
        }
        Some(_) => Ok(Payload::Host(t.to_host()?.packed()?)),
        None => Ok(Payload::Host(t.packed()?)),
    }
}

/// Prelude, header, buffer table and padding for a header and buffer lengths;
/// returns the head and the frame length.
fn assemble(header: &HeaderOut<'_>, lens: &[u64], compact: bool) -> Result<(Vec<u8>, u64)> {
    // The header goes straight after room for the prelude, which is filled in
    // once the header's length is known: one buffer, no copy of the header.
    let mut head = Vec::with_capacity(PRELUDE_BYTES + 512 + 8 * lens.len() + ALIGN);
    head.resize(PRELUDE_BYTES, 0);
    if compact {
        compact::write(&mut head, header)?;
    } else {
        serde_json::to_writer(&mut head, header).map_err(|e| Error::Header {
            what: e.to_string(),
        })?;
    }
    let json_len = head.len() - PRELUDE_BYTES;
    let header_len = u32::try_from(json_len).map_err(|_| {
        Error::Invalid(format!(
            "the header is {json_len} bytes; the format allows 4 GiB"
        ))
    })?;
    let count = u32::try_from(lens.len())
        .map_err(|_| Error::Invalid("too many buffers in one message".into()))?;
    let table_start = align_up(PRELUDE_BYTES as u64 + u64::from(header_len), 8).expect("small");
    let data_start = align_up(table_start + 8 * u64::from(count), ALIGN as u64).expect("small");
    let frame_len = lens
        .iter()
        .try_fold(data_start, |acc, &len| {
            acc.checked_add(len).and_then(|v| align_up(v, ALIGN as u64))
        })
        .ok_or_else(|| Error::Invalid("the message size overflows".into()))?;
    head[..PRELUDE_BYTES].copy_from_slice(&prelude::write(compact, header_len, count, frame_len));
    head.resize(table_start as usize, 0);
    for len in lens {
        head.extend_from_slice(&len.to_le_bytes());
    }
    head.resize(data_start as usize, 0);
    // A frame whose tensors carry checksums carries its head's too: what a
    // checksum is worth depends on the header that says which tensor, of
    // which message, it belongs to.
    if header.tensors.checksum.is_some() {
        prelude::seal(&mut head);
    }
    Ok((head, frame_len))
}

/// Where each tensor of a frame goes, before its bytes exist: what a loan
/// needs to lay a message out in place.
#[derive(Debug, Clone)]
pub struct FrameLayout {
    /// Prelude, header, table and padding.
    pub head: Vec<u8>,
    /// Bytes of the whole frame.
    pub frame_len: u64,
    /// Byte range of each tensor within the frame, in the order given.
    pub spans: Vec<std::ops::Range<usize>>,
}

/// Lays out a frame of `fields` and host tensors `(name, dtype, shape)` without their bytes.
///
/// # Errors
///
/// Duplicate names, sizes that overflow, or a header too large for the format.
pub fn layout(
    meta: &FrameMeta,
    fields: &Map<String, Value>,
    tensors: &[(&str, DType, &[usize])],
) -> Result<FrameLayout> {
    if let Some(name) = first_duplicate(tensors.iter().map(|(n, _, _)| *n)) {
        return Err(Error::DuplicateName {
            name: name.to_string(),
        });
    }
    let mut lens = Vec::with_capacity(tensors.len());
    for (name, dtype, shape) in tensors {
        let bytes = element_count(shape)
            .and_then(|n| n.checked_mul(dtype.size_bytes()))
            .ok_or_else(|| Error::tensor(name, "its size overflows"))?;
        lens.push(bytes as u64);
    }
    let header = HeaderOut {
        channel: &meta.channel,
        seq: meta.seq,
        kind: meta.kind,
        id: meta.id,
        fields,
        tensors: ColumnsOut {
            name: tensors.iter().map(|(n, _, _)| *n).collect(),
            dtype: ColumnOut(tensors.iter().map(|(_, d, _)| d.name()).collect()),
            shape: tensors.iter().map(|(_, _, s)| *s).collect(),
            device: ColumnOut(smallvec::smallvec![Device::Cpu; tensors.len()]),
            buffer: (0..tensors.len() as u64).collect(),
            bytes: lens.iter().copied().collect(),
            checksum: None,
            cast_from: None,
        },
        objects: Vec::new(),
    };
    let (head, frame_len) = assemble(&header, &lens, true)?;
    let mut at = head.len();
    let spans = lens
        .iter()
        .map(|&len| {
            let span = at..at + len as usize;
            at = (at + len as usize).div_ceil(ALIGN) * ALIGN;
            span
        })
        .collect();
    Ok(FrameLayout {
        head,
        frame_len,
        spans,
    })
}
