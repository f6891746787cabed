//! The JSON header: what the decoder reads (strings borrowed from the frame,
//! tensor descriptors column by column, then checked row by row) and what
//! the encoder writes. The compact header (`compact`) reads into and writes
//! from the same structures.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tensorferry_device_map::Device;
use tensorferry_kernels::Dims;

use super::{compact, Kind, Prelude, PRELUDE_BYTES};
use crate::error::{Error, Result};

/// The header as the decoder reads it: strings borrow from the frame where they can.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Header<'a> {
    pub(super) channel: String,
    pub(super) seq: u64,
    pub(super) kind: Kind,
    #[serde(default)]
    pub(super) id: Option<u64>,
    pub(super) fields: Map<String, Value>,
    #[serde(borrow)]
    pub(super) tensors: Columns<'a>,
    #[serde(default)]
    pub(super) objects: Vec<ObjectDesc>,
}

/// A column of tensor descriptors: no allocation for messages of up to 4 tensors.
pub(super) type Few<T> = smallvec::SmallVec<[T; 4]>;

/// A JSON string borrowed from the frame when it has no escapes, owned otherwise.
/// (`Cow<str>` inside a `Vec` always deserializes owned.)
pub(super) struct Text<'a>(pub(super) Cow<'a, str>);

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
pub(super) enum Column<'a> {
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
pub(super) struct Columns<'a> {
    #[serde(borrow)]
    pub(super) name: Few<Text<'a>>,
    #[serde(borrow)]
    pub(super) dtype: Column<'a>,
    pub(super) shape: Few<Dims>,
    #[serde(default)]
    pub(super) strides: Option<Vec<Option<Dims>>>,
    #[serde(borrow)]
    pub(super) device: Column<'a>,
    pub(super) buffer: Few<u64>,
    pub(super) bytes: Few<u64>,
    #[serde(default, borrow)]
    pub(super) checksum: Option<Few<Option<Text<'a>>>>,
    #[serde(default, borrow)]
    pub(super) cast_from: Option<Few<Option<Text<'a>>>>,
}

/// One row of [`Columns`].
pub(super) struct TensorDesc<'c> {
    pub(super) name: &'c str,
    pub(super) dtype: &'c str,
    pub(super) shape: &'c [usize],
    pub(super) strides: Option<&'c [usize]>,
    pub(super) device: &'c str,
    pub(super) buffer: u64,
    pub(super) bytes: u64,
    pub(super) checksum: Option<&'c str>,
    pub(super) cast_from: Option<&'c str>,
}

impl Columns<'_> {
    /// The rows, after checking every column has one entry per tensor.
    pub(super) fn rows(&self) -> Result<Few<TensorDesc<'_>>> {
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
pub(super) struct ObjectDesc {
    pub(super) name: String,
    pub(super) tag: String,
    pub(super) value: Value,
    pub(super) buffers: Vec<u64>,
}

/// The header as the encoder writes it: everything borrowed from the message.
#[derive(Serialize)]
pub(super) struct HeaderOut<'a> {
    pub(super) channel: &'a str,
    pub(super) seq: u64,
    pub(super) kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) id: Option<u64>,
    pub(super) fields: &'a Map<String, Value>,
    pub(super) tensors: ColumnsOut<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(super) objects: Vec<ObjectDesc>,
}

/// A column the encoder writes as one value when every tensor shares it.
pub(super) struct ColumnOut<T>(pub(super) Few<T>);

impl<T: Serialize + PartialEq> Serialize for ColumnOut<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.0.split_first() {
            Some((first, rest)) if rest.iter().all(|x| x == first) => first.serialize(s),
            _ => self.0.serialize(s),
        }
    }
}

#[derive(Serialize)]
pub(super) struct ColumnsOut<'a> {
    pub(super) name: Few<&'a str>,
    pub(super) dtype: ColumnOut<&'static str>,
    pub(super) shape: Few<&'a [usize]>,
    pub(super) device: ColumnOut<Device>,
    pub(super) buffer: Few<u64>,
    pub(super) bytes: Few<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) checksum: Option<Few<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) cast_from: Option<Few<Option<&'static str>>>,
}

/// The header of a frame whose head is in `bytes`.
pub(super) fn parse<'b>(bytes: &'b [u8], p: &Prelude, base: u64) -> Result<Header<'b>> {
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
