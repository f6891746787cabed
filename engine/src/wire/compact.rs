//! The compact binary header: the same content as the JSON one (without
//! codec objects), as lengths and little-endian integers, read into the
//! same structures so both go through the same checks after.

use std::borrow::Cow;
use std::io::Write as _;

use serde_json::Map;
use tensorferry_kernels::Dims;

use super::header::{Column, Columns, Few, Header, HeaderOut, Text};
use super::Kind;
use crate::error::{Error, Result};

const HAS_ID: u8 = 1;
const HAS_CHECKSUMS: u8 = 2;
const HAS_CASTS: u8 = 4;
/// Each kind's code: its place in this list.
const KINDS: [Kind; 9] = [
    Kind::Message,
    Kind::Request,
    Kind::Reply,
    Kind::Error,
    Kind::Subscribe,
    Kind::Unsubscribe,
    Kind::Shm,
    Kind::Release,
    Kind::Stripes,
];

fn put_str(out: &mut Vec<u8>, s: &str) -> Result<()> {
    let len = u32::try_from(s.len())
        .map_err(|_| Error::Invalid(format!("a header string of {} bytes", s.len())))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// A string written by `f`, length first.
fn put_with(out: &mut Vec<u8>, f: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>) -> Result<()> {
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
