//! [`Message`]: JSON fields, named tensors, and codec-encoded objects.

use serde_json::{Map, Value};

use crate::buffer::HostBuffer;
use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// A name that occurs twice, if any. Sorting keeps the check O(n log n) even
/// for names a peer chose to collide in a hash table.
pub(crate) fn first_duplicate<'a>(names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    // Messages hold a few names: no allocation for up to 16.
    let mut sorted: smallvec::SmallVec<[&str; 16]> = names.collect();
    sorted.sort_unstable();
    sorted.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

/// A value encoded by a [`Codec`]: its tag, JSON part and buffers.
#[derive(Debug, Clone)]
pub struct Object {
    /// The codec's tag, which selects the decoder on the receiving side.
    pub tag: String,
    /// The JSON part.
    pub value: Value,
    /// The byte buffers.
    pub buffers: Vec<HostBuffer>,
}

/// What travels on a channel: JSON fields plus an ordered list of named tensors
/// (and objects encoded by registered codecs).
///
/// # Examples
///
/// ```
/// use tensorferry_engine::{Message, Tensor};
///
/// let grad = Tensor::from_slice(&[0.5f32; 4], &[2, 2])?;
/// let m = Message::new().field("step", 17).field("note", "warmup").tensor("grad", grad);
/// assert_eq!(m.get_field("step"), Some(&serde_json::json!(17)));
/// assert_eq!(m.get("grad").map(|t| t.shape()), Some(&[2, 2][..]));
/// # Ok::<(), tensorferry_engine::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Message {
    fields: Map<String, Value>,
    tensors: Vec<(String, Tensor)>,
    objects: Vec<(String, Object)>,
}

impl Message {
    /// An empty message.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a JSON field.
    pub fn field(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.fields.insert(key.into(), value.into());
        self
    }

    /// Appends a named tensor. Names must be unique; encoding checks.
    pub fn tensor(mut self, name: impl Into<String>, tensor: Tensor) -> Self {
        self.tensors.push((name.into(), tensor));
        self
    }

    /// Appends `value` encoded by `codec` under `name`.
    ///
    /// # Errors
    ///
    /// What the codec's `encode` returns.
    pub fn object<C: Codec>(
        mut self,
        name: impl Into<String>,
        codec: &C,
        value: &C::Value,
    ) -> Result<Self> {
        let (json, buffers) = codec.encode(value)?;
        self.objects.push((
            name.into(),
            Object {
                tag: codec.tag().to_string(),
                value: json,
                buffers,
            },
        ));
        Ok(self)
    }

    /// The JSON fields.
    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }

    /// One field.
    pub fn get_field(&self, key: &str) -> Option<&Value> {
        self.fields.get(key)
    }

    /// The named tensors, in order.
    pub fn tensors(&self) -> impl ExactSizeIterator<Item = (&str, &Tensor)> {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The encoded objects, in order.
    pub fn objects(&self) -> impl ExactSizeIterator<Item = (&str, &Object)> {
        self.objects.iter().map(|(n, o)| (n.as_str(), o))
    }

    /// The encoded object called `name`.
    pub fn get_object(&self, name: &str) -> Option<&Object> {
        self.objects.iter().find(|(n, _)| n == name).map(|(_, o)| o)
    }

    /// Bytes of all tensor and object payloads, packed (what the wire carries besides the header).
    pub fn payload_bytes(&self) -> u64 {
        let t: u64 = self
            .tensors
            .iter()
            .map(|(_, t)| t.size_bytes() as u64)
            .sum();
        let o: u64 = self
            .objects
            .iter()
            .flat_map(|(_, o)| o.buffers.iter())
            .map(|b| b.len() as u64)
            .sum();
        t + o
    }

    /// Checks that tensor and object names are unique.
    ///
    /// # Errors
    ///
    /// [`Error::DuplicateName`] naming the first repeated name.
    pub fn check_names(&self) -> Result<()> {
        let names = self.tensors.iter().map(|(n, _)| n.as_str());
        match first_duplicate(names.chain(self.objects.iter().map(|(n, _)| n.as_str()))) {
            Some(name) => Err(Error::DuplicateName {
                name: name.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// The same fields and objects with `tensors` instead of this message's tensors.
    pub fn with_tensors(&self, tensors: Vec<(String, Tensor)>) -> Message {
        Self {
            fields: self.fields.clone(),
            tensors,
            objects: self.objects.clone(),
        }
    }

    /// This message with `fields` in place of its fields.
    pub(crate) fn with_fields(mut self, fields: Map<String, Value>) -> Message {
        self.fields = fields;
        self
    }

    pub(crate) fn from_parts(
        fields: Map<String, Value>,
        tensors: Vec<(String, Tensor)>,
        objects: Vec<(String, Object)>,
    ) -> Self {
        Self {
            fields,
            tensors,
            objects,
        }
    }
}
