//! Values stored through a serializer of the caller's (``pickle.dumps``,
//! say): the bytes it returns travel as one engine codec object
//! ([`PySerialized`]), and come back out through the matching deserializer.
//!
//! The bytes a serializer returns are not copied here: the buffer holds
//! the Python object until the store has copied or written them, and lets
//! it go on the release thread (see [`crate::release`]).

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;
use serde_json::Value;
use tensorferry_engine::store::OBJECT_NAME;
use tensorferry_engine::{Backing, Codec, Error, HostBuffer, Message, Result};

use crate::errors::{to_py, Kind};
use crate::json::type_name;
use crate::release;

/// The tag of a Python-serialized value.
pub const TAG: &str = "python.serialized/1";

/// The codec of a Python-serialized value: its bytes as one buffer, and no
/// JSON. Decoding hands the bytes back; the caller's deserializer makes
/// the value.
pub struct PySerialized;

impl Codec for PySerialized {
    type Value = HostBuffer;

    fn tag(&self) -> &str {
        TAG
    }

    fn encode(&self, bytes: &HostBuffer) -> Result<(Value, Vec<HostBuffer>)> {
        Ok((Value::Null, vec![bytes.clone()]))
    }

    fn decode(&self, _value: &Value, buffers: &[HostBuffer]) -> Result<HostBuffer> {
        match buffers {
            [bytes] => Ok(bytes.clone()),
            _ => Err(Error::Codec {
                tag: TAG.into(),
                what: format!(
                    "a serialized value is one buffer, this object has {}",
                    buffers.len()
                ),
            }),
        }
    }
}

/// The bytes a serializer returned, held until the engine lets go of them.
struct Serialized(Option<PyBackedBytes>);

impl Backing for Serialized {
    fn bytes(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }
}

impl Drop for Serialized {
    fn drop(&mut self) {
        if let Some(bytes) = self.0.take() {
            release::drop_attached(bytes);
        }
    }
}

/// A message holding `serializer(value)` as the object [`OBJECT_NAME`] (the
/// form `Store::put_object` writes).
///
/// # Errors
///
/// `TypeError` when `serializer` is not callable or returns something other
/// than `bytes` or `bytearray`; what the serializer raises.
pub fn serialize(value: &Bound<'_, PyAny>, serializer: &Bound<'_, PyAny>) -> PyResult<Message> {
    if !serializer.is_callable() {
        return Err(PyTypeError::new_err(format!(
            "serializer must be callable (such as pickle.dumps), not {}",
            type_name(serializer)
        )));
    }
    let out = serializer.call1((value,))?;
    let bytes: PyBackedBytes = out.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "the serializer returned {}; it must return bytes or bytearray",
            type_name(&out)
        ))
    })?;
    let buffer = HostBuffer::from_backing(Serialized(Some(bytes)));
    Message::new()
        .object(OBJECT_NAME, &PySerialized, &buffer)
        .map_err(to_py)
}

/// `deserializer(bytes)`, for the bytes of a serialized value (as
/// `bytes`, which every deserializer takes).
///
/// # Errors
///
/// What the deserializer raises.
pub fn deserialize(
    py: Python<'_>,
    bytes: &HostBuffer,
    deserializer: &Bound<'_, PyAny>,
) -> PyResult<Py<PyAny>> {
    let bytes = PyBytes::new(py, bytes.as_slice());
    Ok(deserializer.call1((bytes,))?.unbind())
}

/// Checks `deserializer` before anything is fetched.
///
/// # Errors
///
/// `TypeError` when it is given and not callable.
pub fn check_deserializer(deserializer: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
    match deserializer {
        Some(d) if !d.is_callable() => Err(PyTypeError::new_err(format!(
            "deserializer must be callable (such as pickle.loads), not {}",
            type_name(d)
        ))),
        _ => Ok(()),
    }
}

/// The bytes of the serialized value `message` holds (`what` names the
/// entry in errors): what `Store::get_object` decodes, with errors that say
/// which argument to change.
///
/// # Errors
///
/// `InvalidArgument` when the message was not put with a serializer.
pub fn serialized_bytes(message: &Message, what: &str) -> PyResult<HostBuffer> {
    match message.get_object(OBJECT_NAME) {
        None => Err(Kind::Invalid.err(format!(
            "{what} holds a message put without serializer= (fields and tensors); read it without deserializer="
        ))),
        Some(o) if o.tag != TAG => Err(Kind::Invalid.err(format!(
            "{what} holds an object of codec `{}`, not a value put with serializer=; read it without deserializer=",
            o.tag
        ))),
        Some(o) => PySerialized.decode(&o.value, &o.buffers).map_err(to_py),
    }
}

/// Refuses to read a serialized value as a message: it holds no tensors
/// and no fields, only the bytes a deserializer reads.
///
/// # Errors
///
/// `InvalidArgument` saying to pass a deserializer.
pub fn refuse_serialized(message: &Message, what: &str) -> PyResult<()> {
    match message.get_object(OBJECT_NAME) {
        Some(o) if o.tag == TAG && message.tensors().next().is_none() => Err(Kind::Invalid.err(format!(
            "{what} holds a value put with serializer=; read it with deserializer= (the matching function, such as pickle.loads)"
        ))),
        _ => Ok(()),
    }
}
