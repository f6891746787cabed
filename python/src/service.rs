//! Services written in Python: a callable as the engine's [`Handler`], and
//! [`PySchema`] (`tensorferry.Schema`).

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use tensorferry_engine::{Handler, Message, Schema, Service, ServiceError};

use crate::errors::{IntoPy, Kind};
use crate::message::{build, PyMessage};
use crate::release;
use crate::tensor::parse_dtype;

/// A Python callable answering requests.
struct PyHandler {
    channel: String,
    callable: Option<Py<PyAny>>,
}

impl Drop for PyHandler {
    fn drop(&mut self) {
        // Dropped where the node stops its services, maybe without the GIL.
        if let Some(c) = self.callable.take() {
            release::drop_attached(c);
        }
    }
}

impl Handler for PyHandler {
    fn exec(&mut self, request: Message) -> Result<Message, ServiceError> {
        let Some(callable) = &self.callable else {
            return Err(ServiceError::new(
                "shutting_down",
                "the service is stopping",
            ));
        };
        // Not once the interpreter is about to finalize: this thread would
        // be ended inside the handler. Exiting waits for a handler inside.
        let Some(_inside) = crate::exit::try_enter() else {
            return Err(ServiceError::new(
                "shutting_down",
                "the serving process is exiting",
            ));
        };
        // A service thread: it holds no engine lock a Python thread could want.
        // Its interpreter state lasts from one request to the next.
        crate::attach::keep_thread_state();
        Python::attach(|py| {
            let request = PyMessage::new(py, request, Some(self.channel.clone()), None, None)
                .and_then(|m| Py::new(py, m))
                .map_err(|e| error_reply(py, &e))?;
            let reply = callable
                .call1(py, (request,))
                .map_err(|e| error_reply(py, &e))?;
            reply_from_py(reply.bind(py)).map_err(|e| {
                ServiceError::new(
                    "bad_reply",
                    format!("the handler of `{}` returned {e}", self.channel),
                )
            })
        })
    }
}

/// The error reply for an exception a handler raised.
fn error_reply(py: Python<'_>, e: &PyErr) -> ServiceError {
    let value = e.value(py);
    let is_service = Kind::Service
        .class(py)
        .is_ok_and(|cls| value.is_instance(&cls).unwrap_or(false));
    if is_service {
        let code = value
            .getattr("code")
            .and_then(|c| c.extract::<String>())
            .unwrap_or_else(|_| "error".into());
        let message = value
            .getattr("message")
            .and_then(|m| m.extract::<String>())
            .unwrap_or_default();
        return ServiceError::new(code, message);
    }
    let code = value
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "exception".into());
    let message = value.str().map(|s| s.to_string()).unwrap_or_default();
    ServiceError::new(code, message)
}

/// The reply a handler returned: None, a dict of fields, a `(fields,
/// tensors)` pair or a Message.
fn reply_from_py(reply: &Bound<'_, PyAny>) -> PyResult<Message> {
    if reply.is_none() {
        return Ok(Message::new());
    }
    if let Ok(m) = reply.cast::<PyMessage>() {
        return Ok(m.get().message().clone());
    }
    if reply.is_instance_of::<PyDict>() {
        return build(Some(reply), None, None);
    }
    if let Ok(t) = reply.cast::<PyTuple>() {
        if t.len() == 2 {
            return build(Some(&t.get_item(0)?), Some(&t.get_item(1)?), None);
        }
    }
    Err(PyValueError::new_err(format!(
        "a `{}`; return None, a dict of fields, a (fields, tensors) pair or a Message",
        reply
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default()
    )))
}

/// The engine service for a Python handler.
pub fn service(
    channel: &str,
    handler: Py<PyAny>,
    input: Option<Schema>,
    output: Option<Schema>,
) -> Service {
    let mut s = Service::new(PyHandler {
        channel: channel.to_string(),
        callable: Some(handler),
    });
    if let Some(i) = input {
        s = s.input(i);
    }
    if let Some(o) = output {
        s = s.output(o);
    }
    s
}

/// What a message must hold: named tensors (dtype, and a shape with ``*``
/// for any size) and fields. Built by chaining::
///
///     schema = tf.Schema().tensor("x", "f32", "*,3").field("step")
///
/// A service checks requests against its ``input`` schema (a mismatch is
/// answered with ``bad_request``) and replies against its ``output`` schema.
#[pyclass(module = "tensorferry", name = "Schema", frozen)]
#[derive(Clone)]
pub struct PySchema {
    schema: Schema,
}

impl PySchema {
    /// The engine schema.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }
}

#[pymethods]
impl PySchema {
    /// A schema that accepts any message.
    #[new]
    fn new() -> Self {
        Self {
            schema: Schema::new(),
        }
    }

    /// This schema, also requiring tensor ``name`` of ``dtype`` whose shape
    /// matches ``shape``: comma-separated sizes or ``*``, e.g. ``"*,224,224,3"``;
    /// ``"..."`` allows any shape.
    ///
    /// Raises:
    ///     ValueError: an unknown dtype.
    ///     InvalidArgument: a malformed shape pattern.
    #[pyo3(signature = (name, dtype, shape="..."))]
    fn tensor(&self, name: &str, dtype: &str, shape: &str) -> PyResult<Self> {
        let schema = self
            .schema
            .clone()
            .tensor(name, parse_dtype(dtype)?, shape)
            .py()?;
        Ok(Self { schema })
    }

    /// This schema, also requiring field ``name``.
    fn field(&self, name: &str) -> Self {
        Self {
            schema: self.schema.clone().field(name),
        }
    }

    /// Checks ``message``.
    ///
    /// Raises:
    ///     ValueError: naming the first mismatch.
    fn check(&self, message: PyRef<'_, PyMessage>) -> PyResult<()> {
        self.schema
            .check(message.message())
            .map_err(PyValueError::new_err)
    }

    fn __repr__(&self) -> String {
        format!("tensorferry.{:?}", self.schema)
    }
}
