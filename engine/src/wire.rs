//! The wire format (see `docs/wire-format.md`): [`encode`] a [`Message`] into
//! header bytes plus a list of buffers ready for a vectored write, and
//! [`decode`] a frame from a contiguous region into tensors that view it.

use std::borrow::Cow;
use std::io::{self, IoSlice, Write};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tensorferry_device_map::Device;
use tensorferry_kernels::cpu::{checksum, Checksum};
use tensorferry_kernels::runtime::{DeviceBuffer, Runtime};
use tensorferry_kernels::{element_count, DType, Dims, Layout};

use crate::buffer::{HostBuffer, ALIGN};
use crate::error::{Error, Result};
use crate::message::{first_duplicate, Message, Object};
use crate::tensor::Tensor;

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"TFRM";
/// The format version this build writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of the fixed prelude.
pub const PRELUDE_BYTES: usize = 32;
/// Prelude flag: the header is in the compact binary form, not JSON.
pub const FLAG_COMPACT: u16 = 0x0001;

static ZEROS: [u8; ALIGN] = [0; ALIGN];

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
/// strides (which the message and the decoded [`Tensor`] carry).
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

/// The header as the decoder reads it: strings borrow from the frame where they can.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Header<'a> {
    channel: String,
    seq: u64,
    kind: Kind,
    #[serde(default)]
    id: Option<u64>,
    fields: Map<String, Value>,
    #[serde(borrow)]
    tensors: Columns<'a>,
    #[serde(default)]
    objects: Vec<ObjectDesc>,
}

/// A column of tensor descriptors: no allocation for messages of up to 4 tensors.
type Few<T> = smallvec::SmallVec<[T; 4]>;

/// A JSON string borrowed from the frame when it has no escapes, owned otherwise.
/// (`Cow<str>` inside a `Vec` always deserializes owned.)
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> std::result::Result<Text<'a>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// A column whose entries may all be the same: an array with one entry per
/// tensor, or one string for every tensor.
enum Column<'a> {
    Each(Few<Text<'a>>),
    All(Text<'a>),
}

impl<'de: 'a, 'a> Deserialize<'de> for Column<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Column<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string, or an array of strings with one per tensor")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> std::result::Result<Column<'a>, E> {
                Ok(Column::All(Text(Cow::Borrowed(v))))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Column<'a>, E> {
                Ok(Column::All(Text(Cow::Owned(v.to_string()))))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Column<'a>, A::Error> {
                let mut v = Few::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(t) = seq.next_element::<Text<'a>>()? {
                    v.push(t);
                }
                Ok(Column::Each(v))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

impl Column<'_> {
    fn len_or(&self, n: usize) -> usize {
        match self {
            Column::Each(v) => v.len(),
            Column::All(_) => n,
        }
    }

    fn get(&self, i: usize) -> &str {
        match self {
            Column::Each(v) => &v[i],
            Column::All(t) => t,
        }
    }
}

/// Tensor descriptors, column-wise: one array per key, one entry per tensor,
/// so a message's keys are parsed once rather than once per tensor.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Columns<'a> {
    #[serde(borrow)]
    name: Few<Text<'a>>,
    #[serde(borrow)]
    dtype: Column<'a>,
    shape: Few<Dims>,
    #[serde(default)]
    strides: Option<Vec<Option<Dims>>>,
    #[serde(borrow)]
    device: Column<'a>,
    buffer: Few<u64>,
    bytes: Few<u64>,
    #[serde(default, borrow)]
    checksum: Option<Few<Option<Text<'a>>>>,
    #[serde(default, borrow)]
    cast_from: Option<Few<Option<Text<'a>>>>,
}

/// One row of [`Columns`].
struct TensorDesc<'c> {
    name: &'c str,
    dtype: &'c str,
    shape: &'c [usize],
    strides: Option<&'c [usize]>,
    device: &'c str,
    buffer: u64,
    bytes: u64,
    checksum: Option<&'c str>,
    cast_from: Option<&'c str>,
}

impl Columns<'_> {
    /// The rows, after checking every column has one entry per tensor.
    fn rows(&self) -> Result<Few<TensorDesc<'_>>> {
        let n = self.name.len();
        let lens = [
            ("dtype", self.dtype.len_or(n)),
            ("shape", self.shape.len()),
            ("device", self.device.len_or(n)),
            ("buffer", self.buffer.len()),
            ("bytes", self.bytes.len()),
            ("strides", self.strides.as_ref().map_or(n, Vec::len)),
            ("checksum", self.checksum.as_ref().map_or(n, |c| c.len())),
            ("cast_from", self.cast_from.as_ref().map_or(n, |c| c.len())),
        ];
        if let Some((key, len)) = lens.iter().find(|(_, len)| *len != n) {
            return Err(Error::Header {
                what: format!("tensors.{key} has {len} entries but tensors.name has {n}"),
            });
        }
        Ok((0..n)
            .map(|i| TensorDesc {
                name: &self.name[i],
                dtype: self.dtype.get(i),
                shape: &self.shape[i],
                strides: self.strides.as_ref().and_then(|s| s[i].as_deref()),
                device: self.device.get(i),
                buffer: self.buffer[i],
                bytes: self.bytes[i],
                checksum: self.checksum.as_ref().and_then(|c| c[i].as_deref()),
                cast_from: self.cast_from.as_ref().and_then(|c| c[i].as_deref()),
            })
            .collect())
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectDesc {
    name: String,
    tag: String,
    value: Value,
    buffers: Vec<u64>,
}

/// The header as the encoder writes it: everything borrowed from the message.
#[derive(Serialize)]
struct HeaderOut<'a> {
    channel: &'a str,
    seq: u64,
    kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    fields: &'a Map<String, Value>,
    tensors: ColumnsOut<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    objects: Vec<ObjectDesc>,
}

/// A column the encoder writes as one value when every tensor shares it.
struct ColumnOut<T>(Few<T>);

impl<T: Serialize + PartialEq> Serialize for ColumnOut<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.0.split_first() {
            Some((first, rest)) if rest.iter().all(|x| x == first) => first.serialize(s),
            _ => self.0.serialize(s),
        }
    }
}

#[derive(Serialize)]
struct ColumnsOut<'a> {
    name: Few<&'a str>,
    dtype: ColumnOut<&'static str>,
    shape: Few<&'a [usize]>,
    device: ColumnOut<Device>,
    buffer: Few<u64>,
    bytes: Few<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    checksum: Option<Few<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cast_from: Option<Few<Option<&'static str>>>,
}

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
/// read back chunk by chunk while the frame is written.
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
/// never concatenated.
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

    /// Writes the whole frame: runs of host bytes with vectored writes;
    /// device buffers through their device's staging pipeline, each chunk
    /// written as soon as it reaches the host.
    ///
    /// # Errors
    ///
    /// The writer's errors, and a device's read-back errors.
    pub fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        // Every device is opened before the first byte goes out, so that
        // failing to reach one does not leave half a frame on the stream.
        let mut runtimes: Vec<Runtime> = Vec::new();
        for b in &self.buffers {
            if let Payload::Device(d) = b {
                if !runtimes.iter().any(|rt| rt.device() == d.device()) {
                    runtimes.push(Runtime::open(d.device()).map_err(io::Error::other)?);
                }
            }
        }
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(1 + 2 * self.buffers.len());
        slices.push(IoSlice::new(&self.head));
        for b in &self.buffers {
            match b {
                Payload::Host(h) if !h.is_empty() => slices.push(IoSlice::new(h.as_slice())),
                Payload::Host(_) => {}
                Payload::Device(d) => {
                    write_all_vectored(w, &mut slices)?;
                    let rt = runtimes
                        .iter()
                        .find(|rt| rt.device() == d.device())
                        .expect("opened above");
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
}

impl Encoded {
    /// Copies the whole frame into `out`, which must be exactly
    /// [`frame_len`](Self::frame_len) bytes (a shared-memory slot): large
    /// host buffers are copied by several threads at once, device buffers
    /// read back through their staging pipeline.
    ///
    /// # Errors
    ///
    /// A wrong length; a device's read-back error.
    pub fn copy_into(&self, out: &mut [u8]) -> io::Result<()> {
        if out.len() as u64 != self.frame_len {
            return Err(io::Error::other(format!(
                "a frame of {} bytes does not fit a region of {}",
                self.frame_len,
                out.len()
            )));
        }
        let (head, mut rest) = out.split_at_mut(self.head.len());
        head.copy_from_slice(&self.head);
        for b in &self.buffers {
            let padded = b.len() + pad_to_align(b.len());
            let (dst, tail) = rest.split_at_mut(padded);
            let (data, pad) = dst.split_at_mut(b.len());
            match b {
                Payload::Host(h) => parallel_copy(data, h.as_slice()),
                Payload::Device(d) => {
                    let rt = Runtime::open(d.device()).map_err(io::Error::other)?;
                    let mut at = 0;
                    rt.download_to(d, &mut |chunk| {
                        data[at..at + chunk.len()].copy_from_slice(chunk);
                        at += chunk.len();
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

fn pad_to_align(len: usize) -> usize {
    (ALIGN - len % ALIGN) % ALIGN
}

/// Encodes `message` for `meta`. Strided tensors are packed (only their visible
/// elements travel); contiguous ones are shared, not copied.
///
/// # Errors
///
/// Duplicate names, tensors not on the host, or a header too large for the format.
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
/// frame.write_to(&mut bytes)?;
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
                (None, Payload::Device(d)) => Runtime::open(d.device())
                    .and_then(|rt| rt.checksum(d))
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
    let mut prelude = [0u8; PRELUDE_BYTES];
    prelude[..4].copy_from_slice(&MAGIC);
    prelude[4..6].copy_from_slice(&VERSION.to_le_bytes());
    let flags = if compact { FLAG_COMPACT } else { 0 };
    prelude[6..8].copy_from_slice(&flags.to_le_bytes());
    // Bytes 24..32 (reserved) stay zero.
    prelude[8..12].copy_from_slice(&header_len.to_le_bytes());
    prelude[12..16].copy_from_slice(&count.to_le_bytes());
    prelude[16..24].copy_from_slice(&frame_len.to_le_bytes());
    head[..PRELUDE_BYTES].copy_from_slice(&prelude);
    head.resize(table_start as usize, 0);
    for len in lens {
        head.extend_from_slice(&len.to_le_bytes());
    }
    head.resize(data_start as usize, 0);
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
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
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
            return Err(frame(
                0,
                format!(
                    "not a tensorferry frame: magic bytes {:02x?}, expected \"TFRM\"",
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
        if flags & !FLAG_COMPACT != 0 {
            return Err(frame(
                6,
                format!(
                    "flags {flags:#06x} are set; version {VERSION} defines only {FLAG_COMPACT:#06x} (compact header)"
                ),
            ));
        }
        let header_len = le_u32(bytes, 8);
        let buffer_count = le_u32(bytes, 12);
        let frame_len = le_u64(bytes, 16);
        if le_u64(bytes, 24) != 0 {
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
        })
    }
}

/// A decoded frame: routing, the message (tensors view the frame's bytes), and
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
) -> Result<(Prelude, Vec<std::ops::Range<usize>>, Header<'b>)> {
    let p = Prelude::parse(bytes, limits, base)?;
    let needed = if whole { p.frame_len } else { p.data_start };
    if (bytes.len() as u64) < needed {
        return Err(Error::Truncated {
            offset: base,
            needed,
            available: bytes.len() as u64,
        });
    }
    let ranges = buffer_ranges(bytes, &p, base)?;
    let header = parse_header(bytes, &p, base)?;
    Ok((p, ranges, header))
}

/// Where each buffer lies, from the table, each checked against the frame's
/// end; `bytes` holds at least the frame's head.
fn buffer_ranges(bytes: &[u8], p: &Prelude, base: u64) -> Result<Vec<std::ops::Range<usize>>> {
    let frame = |at: u64, what: String| Error::Frame {
        offset: base + at,
        what,
    };
    let mut ranges = Vec::with_capacity(p.buffer_count as usize);
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

/// The header of a frame whose head is in `bytes`.
fn parse_header<'b>(bytes: &'b [u8], p: &Prelude, base: u64) -> Result<Header<'b>> {
    let header_bytes = &bytes[PRELUDE_BYTES..PRELUDE_BYTES + p.header_len as usize];
    if p.compact {
        return compact::read(header_bytes, base + PRELUDE_BYTES as u64);
    }
    let text = std::str::from_utf8(header_bytes).map_err(|e| Error::Frame {
        offset: base + PRELUDE_BYTES as u64 + e.valid_up_to() as u64,
        what: "the header is not UTF-8".into(),
    })?;
    serde_json::from_str(text).map_err(|e| Error::Header {
        what: format!(
            "{e} (the header starts at byte {})",
            base + PRELUDE_BYTES as u64
        ),
    })
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
    pub buffers: Vec<std::ops::Range<usize>>,
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
        buffers,
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

    let mut used = vec![false; ranges.len()];
    let mut take = |name: &str, index: u64| -> Result<std::ops::Range<usize>> {
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

/// The compact binary header: the same content as the JSON one (without
/// codec objects), as lengths and little-endian integers.
mod compact {
    use std::borrow::Cow;
    use std::io::Write as _;

    use serde_json::Map;
    use tensorferry_kernels::Dims;

    use super::{Column, Columns, Few, Header, HeaderOut, Kind, Text};
    use crate::error::{Error, Result};

    const HAS_ID: u8 = 1;
    const HAS_CHECKSUMS: u8 = 2;
    const HAS_CASTS: u8 = 4;
    /// Each kind's code: its place in this list.
    const KINDS: [Kind; 8] = [
        Kind::Message,
        Kind::Request,
        Kind::Reply,
        Kind::Error,
        Kind::Subscribe,
        Kind::Unsubscribe,
        Kind::Shm,
        Kind::Release,
    ];

    fn put_str(out: &mut Vec<u8>, s: &str) -> Result<()> {
        let len = u32::try_from(s.len())
            .map_err(|_| Error::Invalid(format!("a header string of {} bytes", s.len())))?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(s.as_bytes());
        Ok(())
    }

    /// A string written by `f`, length first.
    fn put_with(
        out: &mut Vec<u8>,
        f: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>,
    ) -> Result<()> {
        let at = out.len();
        out.extend_from_slice(&[0; 4]);
        f(out).map_err(|e| Error::Header {
            what: e.to_string(),
        })?;
        let len = u32::try_from(out.len() - at - 4)
            .map_err(|_| Error::Invalid("a header string over 4 GiB".into()))?;
        out[at..at + 4].copy_from_slice(&len.to_le_bytes());
        Ok(())
    }

    /// Appends `h` in compact form (`h.objects` must be empty).
    pub(super) fn write(out: &mut Vec<u8>, h: &HeaderOut<'_>) -> Result<()> {
        let t = &h.tensors;
        let kind = KINDS
            .iter()
            .position(|k| *k == h.kind)
            .expect("every kind is listed") as u8;
        let mut opt = 0;
        if h.id.is_some() {
            opt |= HAS_ID;
        }
        if t.checksum.is_some() {
            opt |= HAS_CHECKSUMS;
        }
        if t.cast_from.is_some() {
            opt |= HAS_CASTS;
        }
        out.extend_from_slice(&[kind, opt]);
        out.extend_from_slice(&h.seq.to_le_bytes());
        if let Some(id) = h.id {
            out.extend_from_slice(&id.to_le_bytes());
        }
        put_str(out, h.channel)?;
        if h.fields.is_empty() {
            put_str(out, "")?;
        } else {
            put_with(out, |w| {
                serde_json::to_writer(w, h.fields).map_err(Into::into)
            })?;
        }
        let n = u32::try_from(t.name.len())
            .map_err(|_| Error::Invalid("too many tensors in one message".into()))?;
        out.extend_from_slice(&n.to_le_bytes());
        for i in 0..t.name.len() {
            put_str(out, t.name[i])?;
            put_str(out, t.dtype.0[i])?;
            put_with(out, |w| write!(w, "{}", t.device.0[i]))?;
            let shape = t.shape[i];
            let ndim = u8::try_from(shape.len()).map_err(|_| {
                Error::tensor(
                    t.name[i],
                    format!("{} dimensions; at most 255 travel", shape.len()),
                )
            })?;
            out.push(ndim);
            for &d in shape {
                out.extend_from_slice(&(d as u64).to_le_bytes());
            }
            out.extend_from_slice(&t.buffer[i].to_le_bytes());
            out.extend_from_slice(&t.bytes[i].to_le_bytes());
            if let Some(sums) = &t.checksum {
                put_str(out, &sums[i])?;
            }
            if let Some(casts) = &t.cast_from {
                put_str(out, casts[i].unwrap_or(""))?;
            }
        }
        Ok(())
    }

    /// Reads a compact header; `base` is its offset, for errors.
    struct Reader<'b> {
        bytes: &'b [u8],
        at: usize,
        base: u64,
    }

    impl<'b> Reader<'b> {
        fn fail(&self, what: impl Into<String>) -> Error {
            Error::Frame {
                offset: self.base + self.at as u64,
                what: format!("compact header: {}", what.into()),
            }
        }

        fn take(&mut self, n: usize, what: &str) -> Result<&'b [u8]> {
            let end = self
                .at
                .checked_add(n)
                .filter(|&e| e <= self.bytes.len())
                .ok_or_else(|| {
                    self.fail(format!(
                        "{what} needs {n} bytes, {} are left",
                        self.bytes.len() - self.at
                    ))
                })?;
            let got = &self.bytes[self.at..end];
            self.at = end;
            Ok(got)
        }

        fn u8(&mut self, what: &str) -> Result<u8> {
            Ok(self.take(1, what)?[0])
        }

        fn u32(&mut self, what: &str) -> Result<u32> {
            let b = self.take(4, what)?;
            Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
        }

        fn u64(&mut self, what: &str) -> Result<u64> {
            let b = self.take(8, what)?;
            Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
        }

        fn str(&mut self, what: &str) -> Result<&'b str> {
            let len = self.u32(what)? as usize;
            let at = self.at;
            let b = self.take(len, what)?;
            std::str::from_utf8(b).map_err(|e| Error::Frame {
                offset: self.base + (at + e.valid_up_to()) as u64,
                what: format!("compact header: {what} is not UTF-8"),
            })
        }

        fn opt_str(&mut self, what: &str) -> Result<Option<Text<'b>>> {
            let s = self.str(what)?;
            Ok((!s.is_empty()).then_some(Text(Cow::Borrowed(s))))
        }
    }

    /// Parses a compact header into what the JSON one parses into, so both
    /// go through the same checks after.
    pub(super) fn read(bytes: &[u8], base: u64) -> Result<Header<'_>> {
        let mut r = Reader { bytes, at: 0, base };
        let kind = r.u8("the kind")?;
        let kind = *KINDS
            .get(kind as usize)
            .ok_or_else(|| r.fail(format!("unknown kind {kind}")))?;
        let opt = r.u8("the options")?;
        if opt & !(HAS_ID | HAS_CHECKSUMS | HAS_CASTS) != 0 {
            return Err(r.fail(format!("unknown option bits {opt:#04x}")));
        }
        let seq = r.u64("the sequence number")?;
        let id = if opt & HAS_ID != 0 {
            Some(r.u64("the id")?)
        } else {
            None
        };
        let channel = r.str("the channel")?.to_string();
        let fields_text = r.str("the fields")?;
        let fields = if fields_text.is_empty() {
            Map::new()
        } else {
            serde_json::from_str(fields_text).map_err(|e| Error::Header {
                what: format!("compact header fields: {e} (the header starts at byte {base})"),
            })?
        };
        let n = r.u32("the tensor count")? as usize;
        // Each tensor takes at least 33 bytes: no allocation beyond what the header holds.
        let room = (bytes.len() - r.at) / 33;
        if n > room {
            return Err(r.fail(format!("{n} tensors cannot fit in what is left of it")));
        }
        let mut cols = Columns {
            name: Few::with_capacity(n),
            dtype: Column::Each(Few::with_capacity(n)),
            shape: Few::with_capacity(n),
            strides: None,
            device: Column::Each(Few::with_capacity(n)),
            buffer: Few::with_capacity(n),
            bytes: Few::with_capacity(n),
            checksum: (opt & HAS_CHECKSUMS != 0).then(|| Few::with_capacity(n)),
            cast_from: (opt & HAS_CASTS != 0).then(|| Few::with_capacity(n)),
        };
        for _ in 0..n {
            cols.name.push(Text(Cow::Borrowed(r.str("a tensor name")?)));
            let dtype = Text(Cow::Borrowed(r.str("a dtype")?));
            let device = Text(Cow::Borrowed(r.str("a device")?));
            if let (Column::Each(d), Column::Each(v)) = (&mut cols.dtype, &mut cols.device) {
                d.push(dtype);
                v.push(device);
            }
            let ndim = r.u8("a shape's rank")?;
            let mut shape = Dims::new();
            for _ in 0..ndim {
                let d = r.u64("a dimension")?;
                shape.push(usize::try_from(d).map_err(|_| r.fail(format!("dimension {d}")))?);
            }
            cols.shape.push(shape);
            cols.buffer.push(r.u64("a buffer index")?);
            cols.bytes.push(r.u64("a byte count")?);
            if let Some(sums) = &mut cols.checksum {
                sums.push(r.opt_str("a checksum")?);
            }
            if let Some(casts) = &mut cols.cast_from {
                casts.push(r.opt_str("a dtype cast from")?);
            }
        }
        if r.at != bytes.len() {
            return Err(r.fail(format!("{} bytes after its end", bytes.len() - r.at)));
        }
        Ok(Header {
            channel,
            seq,
            kind,
            id,
            fields,
            tensors: cols,
            objects: Vec::new(),
        })
    }
}
