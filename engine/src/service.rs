//! Request/reply services: [`Service`] (a handler with `init`/`exec`/`fini`
//! stages) and its declared [`Schema`], checked before a request reaches it.

use std::fmt;

use tensorferry_kernels::DType;

use crate::message::Message;

/// An error a handler returns; it travels back as an error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    /// A short machine-readable code, e.g. `bad_input`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
}

impl ServiceError {
    /// An error with `code` and `message`.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// The stages of a service: set up once, run per request, tear down at shutdown.
/// A service runs one request at a time (on the node's worker pool, or inline),
/// so its state needs no locking.
pub trait Handler: Send + 'static {
    /// Runs once when the service is registered.
    ///
    /// # Errors
    ///
    /// An error makes registration fail.
    fn init(&mut self) -> Result<(), ServiceError> {
        Ok(())
    }

    /// Answers one request.
    ///
    /// # Errors
    ///
    /// An error becomes an error reply with its code and message.
    fn exec(&mut self, request: Message) -> Result<Message, ServiceError>;

    /// Runs once when the node shuts down.
    fn fini(&mut self) {}
}

impl<F> Handler for F
where
    F: FnMut(Message) -> Result<Message, ServiceError> + Send + 'static,
{
    fn exec(&mut self, request: Message) -> Result<Message, ServiceError> {
        self(request)
    }
}

/// One dimension of a shape pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    /// Any size.
    Any,
    /// Exactly this size.
    Is(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct TensorRule {
    name: String,
    dtype: Option<DType>,
    shape: Option<Vec<Dim>>,
}

/// What a message must hold: named tensors (dtype, shape with wildcards) and fields.
///
/// # Examples
///
/// ```
/// use tensorferry_engine::{DType, Message, Schema, Tensor};
///
/// let schema = Schema::new().tensor("image", DType::F32, "*,*,3")?.field("frame_id");
/// let ok = Message::new().field("frame_id", 7).tensor("image", Tensor::zeros(DType::F32, &[4, 5, 3])?);
/// assert!(schema.check(&ok).is_ok());
/// let bad = Message::new().tensor("image", Tensor::zeros(DType::F32, &[4, 5, 4])?);
/// let why = schema.check(&bad).unwrap_err();
/// assert!(why.contains("frame_id") || why.contains("[*, *, 3]"));
/// # Ok::<(), tensorferry_engine::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schema {
    tensors: Vec<TensorRule>,
    fields: Vec<String>,
}

impl Schema {
    /// A schema that accepts any message.
    pub fn new() -> Self {
        Self::default()
    }

    /// Requires tensor `name` of `dtype` whose shape matches `shape`: comma-
    /// separated sizes or `*` (any size), e.g. `"*,224,224,3"`; `"..."` allows any shape.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Invalid`] for a malformed pattern.
    pub fn tensor(
        mut self,
        name: impl Into<String>,
        dtype: DType,
        shape: &str,
    ) -> crate::Result<Self> {
        let shape = match shape.trim() {
            "..." => None,
            "" => Some(Vec::new()),
            text => Some(
                text.split(',')
                    .map(|d| match d.trim() {
                        "*" => Ok(Dim::Any),
                        n => n.parse().map(Dim::Is).map_err(|_| {
                            crate::Error::Invalid(format!(
                                "shape pattern `{text}`: `{n}` is neither a size nor `*`"
                            ))
                        }),
                    })
                    .collect::<crate::Result<Vec<_>>>()?,
            ),
        };
        self.tensors.push(TensorRule {
            name: name.into(),
            dtype: Some(dtype),
            shape,
        });
        Ok(self)
    }

    /// Requires JSON field `name`.
    pub fn field(mut self, name: impl Into<String>) -> Self {
        self.fields.push(name.into());
        self
    }

    /// Checks `message`; the error names the first mismatch.
    ///
    /// # Errors
    ///
    /// A description of what does not match.
    pub fn check(&self, message: &Message) -> Result<(), String> {
        for f in &self.fields {
            if message.get_field(f).is_none() {
                return Err(format!("required field `{f}` is missing"));
            }
        }
        for rule in &self.tensors {
            let Some(t) = message.get(&rule.name) else {
                return Err(format!("required tensor `{}` is missing", rule.name));
            };
            if let Some(d) = rule.dtype.filter(|d| *d != t.dtype()) {
                return Err(format!(
                    "tensor `{}` has dtype {}, expected {d}",
                    rule.name,
                    t.dtype()
                ));
            }
            if let Some(dims) = &rule.shape {
                let fits = dims.len() == t.shape().len()
                    && dims
                        .iter()
                        .zip(t.shape())
                        .all(|(d, &n)| matches!(d, Dim::Any) || *d == Dim::Is(n));
                if !fits {
                    let want: Vec<String> = dims
                        .iter()
                        .map(|d| match d {
                            Dim::Any => "*".to_string(),
                            Dim::Is(n) => n.to_string(),
                        })
                        .collect();
                    return Err(format!(
                        "tensor `{}` has shape {:?}, expected [{}]",
                        rule.name,
                        t.shape(),
                        want.join(", ")
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A request/reply service: its handler and the schemas of its inputs and outputs.
pub struct Service {
    pub(crate) input: Schema,
    pub(crate) output: Schema,
    pub(crate) handler: Box<dyn Handler>,
    pub(crate) inline: bool,
}

impl Service {
    /// A service running `handler`, accepting any input until [`input`](Self::input) says otherwise.
    pub fn new(handler: impl Handler) -> Self {
        Self {
            input: Schema::new(),
            output: Schema::new(),
            handler: Box::new(handler),
            inline: false,
        }
    }

    /// Runs `exec` on the thread that read the request — the connection's
    /// I/O thread, or a requester reading its reply — (one request at a
    /// time, under a lock) instead of handing it to the node's worker pool:
    /// one thread hand-off less per round trip, for handlers that return at
    /// once. A slow handler delays every connection of that I/O thread, and
    /// an inline handler must not wait on the node (a request, a `send` on a
    /// `block` channel whose queue is full): the thread it would wait for is
    /// its own. `init` runs at registration and `fini` when the node shuts
    /// down either way. Default: off.
    pub fn inline(mut self, inline: bool) -> Self {
        self.inline = inline;
        self
    }

    /// Requests that do not match `schema` get an error reply (`bad_request`) without reaching the handler.
    pub fn input(mut self, schema: Schema) -> Self {
        self.input = schema;
        self
    }

    /// Replies that do not match `schema` are replaced by an error reply (`bad_reply`).
    pub fn output(mut self, schema: Schema) -> Self {
        self.output = schema;
        self
    }
}

impl fmt::Debug for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Service")
            .field("input", &self.input)
            .field("output", &self.output)
            .field("inline", &self.inline)
            .finish_non_exhaustive()
    }
}
