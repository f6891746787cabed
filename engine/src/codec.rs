//! Codecs: how a type that is not a plain tensor travels, and the registry that
//! decides which decoders may run on receipt.
//!
//! Nothing in a message selects code to run except a tag, and a tag runs only
//! the codec registered for it; an unknown tag is an error naming it.

use std::any::Any;
use std::collections::HashMap;

use serde_json::Value;

use crate::buffer::HostBuffer;
use crate::error::{Error, Result};
use crate::message::{Message, Object};

/// Encodes and decodes one type as JSON plus byte buffers.
///
/// # Examples
///
/// ```
/// use serde_json::{json, Value};
/// use tensorferry_engine::{Codec, CodecRegistry, Error, HostBuffer, Message, Result};
///
/// struct Pose { frame: String, xyz: [f32; 3] }
/// struct PoseCodec;
///
/// impl Codec for PoseCodec {
///     type Value = Pose;
///     fn tag(&self) -> &str { "example.pose/1" }
///     fn encode(&self, p: &Pose) -> Result<(Value, Vec<HostBuffer>)> {
///         Ok((json!({"frame": p.frame}), vec![HostBuffer::copy_from(bytemuck::cast_slice(&p.xyz))]))
///     }
///     fn decode(&self, v: &Value, bufs: &[HostBuffer]) -> Result<Pose> {
///         let bad = |what: &str| Error::Codec { tag: self.tag().into(), what: what.into() };
///         let frame = v["frame"].as_str().ok_or_else(|| bad("missing frame"))?.to_string();
///         let bytes = bufs.first().filter(|b| b.len() == 12).ok_or_else(|| bad("want one 12-byte buffer"))?;
///         let xyz: [f32; 3] = bytemuck::pod_read_unaligned(bytes.as_slice());
///         Ok(Pose { frame, xyz })
///     }
/// }
///
/// let m = Message::new().object("pose", &PoseCodec, &Pose { frame: "map".into(), xyz: [1.0, 2.0, 3.0] })?;
/// let mut registry = CodecRegistry::new();
/// registry.register(PoseCodec)?;
/// let p: Pose = registry.decode(&m, "pose")?;
/// assert_eq!((p.frame.as_str(), p.xyz), ("map", [1.0, 2.0, 3.0]));
/// # Ok::<(), tensorferry_engine::Error>(())
/// ```
pub trait Codec: Send + Sync + 'static {
    /// The type this codec carries.
    type Value: 'static;

    /// A stable tag naming this codec and its version, e.g. `"myapp.pose/1"`.
    fn tag(&self) -> &str;

    /// Turns a value into JSON plus byte buffers.
    ///
    /// # Errors
    ///
    /// When the value cannot be encoded.
    fn encode(&self, value: &Self::Value) -> Result<(Value, Vec<HostBuffer>)>;

    /// Rebuilds a value; must treat its input as untrusted.
    ///
    /// # Errors
    ///
    /// When the JSON or buffers are not what this codec writes.
    fn decode(&self, value: &Value, buffers: &[HostBuffer]) -> Result<Self::Value>;
}

trait ErasedCodec: Send + Sync {
    fn decode_any(&self, value: &Value, buffers: &[HostBuffer]) -> Result<Box<dyn Any>>;
    fn type_name(&self) -> &'static str;
}

impl<C: Codec> ErasedCodec for C {
    fn decode_any(&self, value: &Value, buffers: &[HostBuffer]) -> Result<Box<dyn Any>> {
        Ok(Box::new(self.decode(value, buffers)?))
    }

    fn type_name(&self) -> &'static str {
        std::any::type_name::<C::Value>()
    }
}

/// The codecs a receiver trusts, by tag.
#[derive(Default)]
pub struct CodecRegistry {
    codecs: HashMap<String, Box<dyn ErasedCodec>>,
}

impl CodecRegistry {
    /// An empty registry: every object is an unknown tag.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `codec` under its tag.
    ///
    /// # Errors
    ///
    /// [`Error::Codec`] when the tag is already registered.
    pub fn register<C: Codec>(&mut self, codec: C) -> Result<()> {
        let tag = codec.tag().to_string();
        if self.codecs.contains_key(&tag) {
            return Err(Error::Codec {
                tag,
                what: "already registered".into(),
            });
        }
        self.codecs.insert(tag, Box::new(codec));
        Ok(())
    }

    /// True when a codec is registered for `tag`.
    pub fn contains(&self, tag: &str) -> bool {
        self.codecs.contains_key(tag)
    }

    /// Decodes the object called `name` of `message` as a `T`.
    ///
    /// # Errors
    ///
    /// When there is no such object, its tag is not registered
    /// ([`Error::UnknownCodec`]), the registered codec does not produce a `T`,
    /// or the codec rejects the object.
    pub fn decode<T: 'static>(&self, message: &Message, name: &str) -> Result<T> {
        let object = message
            .get_object(name)
            .ok_or_else(|| Error::Invalid(format!("the message has no object `{name}`")))?;
        let any = self.decode_object(name, object)?;
        any.downcast::<T>().map(|b| *b).map_err(|_| Error::Codec {
            tag: object.tag.clone(),
            what: format!(
                "object `{name}` decodes to {}, not {}",
                self.codecs[&object.tag].type_name(),
                std::any::type_name::<T>()
            ),
        })
    }

    /// Decodes an object with the codec registered for its tag, whatever its type.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownCodec`] for an unregistered tag; the codec's own errors.
    pub fn decode_object(&self, name: &str, object: &Object) -> Result<Box<dyn Any>> {
        let codec = self
            .codecs
            .get(&object.tag)
            .ok_or_else(|| Error::UnknownCodec {
                tag: object.tag.clone(),
                name: name.to_string(),
            })?;
        codec.decode_any(&object.value, &object.buffers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Text;
    impl Codec for Text {
        type Value = String;
        fn tag(&self) -> &str {
            "test.text/1"
        }
        fn encode(&self, v: &String) -> Result<(Value, Vec<HostBuffer>)> {
            Ok((Value::Null, vec![HostBuffer::copy_from(v.as_bytes())]))
        }
        fn decode(&self, _: &Value, b: &[HostBuffer]) -> Result<String> {
            let bytes = b.first().ok_or_else(|| Error::Codec {
                tag: "test.text/1".into(),
                what: "no buffer".into(),
            })?;
            String::from_utf8(bytes.as_slice().to_vec()).map_err(|e| Error::Codec {
                tag: "test.text/1".into(),
                what: e.to_string(),
            })
        }
    }

    #[test]
    fn unknown_tags_and_wrong_types_are_errors_naming_them() {
        let m = Message::new()
            .object("greeting", &Text, &"hi".to_string())
            .expect("encode");
        let empty = CodecRegistry::new();
        let err = empty
            .decode::<String>(&m, "greeting")
            .expect_err("unregistered");
        assert!(err.to_string().contains("`test.text/1`"), "{err}");
        let mut r = CodecRegistry::new();
        r.register(Text).expect("register");
        assert!(r.register(Text).is_err(), "a tag registers once");
        assert_eq!(r.decode::<String>(&m, "greeting").expect("decode"), "hi");
        let err = r.decode::<u32>(&m, "greeting").expect_err("wrong type");
        assert!(err.to_string().contains("String"), "{err}");
        assert!(r.decode::<String>(&m, "missing").is_err());
    }
}
