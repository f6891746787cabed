//! Export to and import from safetensors, so recorded tensors open in PyTorch and NumPy.
//!
//! A safetensors file is one flat name → tensor table plus string metadata. A
//! record file with one frame exports its tensors under their own names; with
//! several, tensor `x` of frame 3 becomes `3/x`. Each frame's channel, sequence
//! number, kind, fields and tensor order go in the metadata under
//! `tensorferry.frames`, so importing the file gives back the same frames.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use ::safetensors::tensor::{Dtype, SafeTensors, View};
use serde_json::{json, Value};
use tensorferry_device_map::Device;
use tensorferry_kernels::DType;

use crate::buffer::HostBuffer;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::tensor::Tensor;
use crate::wire::{Frame, FrameMeta, Kind};

/// The metadata key that carries the frames' routing and fields.
pub const FRAMES_KEY: &str = "tensorferry.frames";

fn to_st(d: DType) -> Result<Dtype> {
    Ok(match d {
        DType::Bool => Dtype::BOOL,
        DType::U8 => Dtype::U8,
        DType::U16 => Dtype::U16,
        DType::U32 => Dtype::U32,
        DType::U64 => Dtype::U64,
        DType::I8 => Dtype::I8,
        DType::I16 => Dtype::I16,
        DType::I32 => Dtype::I32,
        DType::I64 => Dtype::I64,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::F8E4M3 => Dtype::F8_E4M3,
        DType::F8E5M2 => Dtype::F8_E5M2,
        other => return Err(Error::Invalid(format!("safetensors has no {other} dtype"))),
    })
}

fn from_st(d: Dtype) -> Result<DType> {
    Ok(match d {
        Dtype::BOOL => DType::Bool,
        Dtype::U8 => DType::U8,
        Dtype::U16 => DType::U16,
        Dtype::U32 => DType::U32,
        Dtype::U64 => DType::U64,
        Dtype::I8 => DType::I8,
        Dtype::I16 => DType::I16,
        Dtype::I32 => DType::I32,
        Dtype::I64 => DType::I64,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::F8_E4M3 => DType::F8E4M3,
        Dtype::F8_E5M2 => DType::F8E5M2,
        other => {
            return Err(Error::Invalid(format!(
                "safetensors dtype {other:?} has no tensorferry equivalent"
            )))
        }
    })
}

struct Exported {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: HostBuffer,
}

impl View for &Exported {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.bytes.as_slice())
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes the tensors of `frames` to a safetensors file at `path`.
///
/// # Errors
///
/// When a name repeats, a tensor is not on the host, or the file cannot be written.
pub fn export(frames: &[Frame], path: &Path) -> Result<usize> {
    let prefix = frames.len() > 1;
    let mut tensors = Vec::new();
    let mut described = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let mut names = Vec::new();
        for ((name, t), info) in f.message.tensors().zip(&f.tensors) {
            let key = if prefix {
                format!("{i}/{name}")
            } else {
                name.to_string()
            };
            tensors.push((
                key,
                Exported {
                    dtype: to_st(t.dtype())?,
                    shape: t.shape().to_vec(),
                    bytes: t.packed()?,
                },
            ));
            names.push(json!({"name": name, "device": info.device}));
        }
        described.push(json!({
            "channel": f.meta.channel, "seq": f.meta.seq, "kind": f.meta.kind, "id": f.meta.id,
            "fields": f.message.fields(), "tensors": names,
        }));
    }
    let count = tensors.len();
    let mut seen = std::collections::HashSet::new();
    if let Some((dup, _)) = tensors.iter().find(|(k, _)| !seen.insert(k.clone())) {
        return Err(Error::DuplicateName { name: dup.clone() });
    }
    let metadata = HashMap::from([(FRAMES_KEY.to_string(), Value::Array(described).to_string())]);
    ::safetensors::serialize_to_file(
        tensors.iter().map(|(k, v)| (k.clone(), v)),
        Some(metadata),
        path,
    )
    .map_err(|e| Error::Invalid(format!("cannot write `{}`: {e}", path.display())))?;
    Ok(count)
}

/// One frame read back from a safetensors file: its routing and message.
#[derive(Debug, Clone)]
pub struct Imported {
    /// Channel, sequence number, kind and id.
    pub meta: FrameMeta,
    /// The message.
    pub message: Message,
    /// The device each tensor was on when recorded, in message order.
    pub devices: Vec<Device>,
}

/// Reads a safetensors file: the frames recorded in its metadata, or one frame
/// on `channel` holding every tensor (sorted by name) for a file made elsewhere.
///
/// # Errors
///
/// When the file is not valid safetensors or its tensorferry metadata is inconsistent.
pub fn import(path: &Path, channel: &str) -> Result<Vec<Imported>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io_path("cannot read", path, e))?;
    let bad = |what: String| Error::Invalid(format!("`{}`: {what}", path.display()));
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let tensor = |key: &str| -> Result<Tensor> {
        let v = st
            .tensor(key)
            .map_err(|e| bad(format!("tensor `{key}`: {e}")))?;
        Tensor::from_host(
            from_st(v.dtype())?,
            v.shape(),
            HostBuffer::copy_from(v.data()),
        )
    };
    let frames = match meta.metadata().as_ref().and_then(|m| m.get(FRAMES_KEY)) {
        None => {
            let mut names = st.names();
            names.sort_unstable();
            let mut message = Message::new();
            for n in &names {
                message = message.tensor(*n, tensor(n)?);
            }
            return Ok(vec![Imported {
                meta: FrameMeta::message(channel, 0),
                message,
                devices: vec![Device::Cpu; names.len()],
            }]);
        }
        Some(text) => serde_json::from_str::<Vec<Value>>(text)
            .map_err(|e| bad(format!("{FRAMES_KEY}: {e}")))?,
    };
    let prefix = frames.len() > 1;
    let mut out = Vec::with_capacity(frames.len());
    for (i, f) in frames.iter().enumerate() {
        let field = |k: &str| f.get(k).cloned().unwrap_or(Value::Null);
        let kind: Kind = serde_json::from_value(field("kind"))
            .map_err(|e| bad(format!("frame {i} kind: {e}")))?;
        let meta = FrameMeta {
            channel: field("channel").as_str().unwrap_or(channel).to_string(),
            seq: field("seq").as_u64().unwrap_or(i as u64),
            kind,
            id: field("id").as_u64(),
        };
        let mut message = Message::new();
        if let Value::Object(fields) = field("fields") {
            for (k, v) in fields {
                message = message.field(k, v);
            }
        }
        let mut devices = Vec::new();
        for t in field("tensors")
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let name = t["name"]
                .as_str()
                .ok_or_else(|| bad(format!("frame {i}: a tensor has no name")))?;
            let key = if prefix {
                format!("{i}/{name}")
            } else {
                name.to_string()
            };
            message = message.tensor(name, tensor(&key)?);
            devices.push(
                t["device"]
                    .as_str()
                    .and_then(|d| d.parse().ok())
                    .unwrap_or(Device::Cpu),
            );
        }
        out.push(Imported {
            meta,
            message,
            devices,
        });
    }
    Ok(out)
}
