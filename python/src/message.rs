//! [`PyMessage`] (`tensorferry.Message`): a received message, and building
//! an engine message from Python fields and tensors.

use pyo3::exceptions::{PyKeyError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use tensorferry_engine::{Message, Received};

use crate::input::tensor_from_py;
use crate::json;
use crate::tensor::PyTensor;

/// A message: JSON ``fields`` and named tensors.
///
/// ``msg["name"]`` is a :class:`Tensor` viewing the received bytes (hand it
/// to ``np.from_dlpack``, ``torch.from_dlpack`` or ``np.asarray``);
/// ``"name" in msg``, ``len(msg)``, ``list(msg)`` (tensor names, in order)
/// and ``msg.tensors`` (a dict) work as for a mapping. A received message
/// also says where it came from: ``channel``, ``seq`` (the publisher's
/// sequence number) and ``sender`` (the peer's address, or ``"local"``).
#[pyclass(module = "tensorferry", name = "Message", frozen)]
pub struct PyMessage {
    message: Message,
    fields: Py<PyDict>,
    tensors: Vec<(String, Py<PyTensor>)>,
    channel: Option<String>,
    seq: Option<u64>,
    sender: Option<String>,
}

impl PyMessage {
    /// A message as Python sees it.
    pub fn new(
        py: Python<'_>,
        message: Message,
        channel: Option<String>,
        seq: Option<u64>,
        sender: Option<String>,
    ) -> PyResult<Self> {
        let fields = json::map_to_py(py, message.fields())?.unbind();
        let tensors = message
            .tensors()
            .map(|(n, t)| Ok((n.to_string(), Py::new(py, PyTensor::new(t.clone()))?)))
            .collect::<PyResult<Vec<_>>>()?;
        Ok(Self {
            message,
            fields,
            tensors,
            channel,
            seq,
            sender,
        })
    }

    /// A received message.
    pub fn received(py: Python<'_>, r: Received) -> PyResult<Self> {
        Self::new(
            py,
            r.message,
            Some(r.channel),
            Some(r.seq),
            Some(r.from.to_string()),
        )
    }

    /// The engine message.
    pub fn message(&self) -> &Message {
        &self.message
    }
}

/// An engine message from `fields` (a dict or None) and tensors given as a
/// dict (`tensors`) and as keywords (`kwargs`).
///
/// # Errors
///
/// `TypeError` for fields that are not JSON or a tensor that is not a
/// tensor; a name given twice.
pub fn build(
    fields: Option<&Bound<'_, PyAny>>,
    tensors: Option<&Bound<'_, PyAny>>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<Message> {
    let mut m = Message::new();
    for (k, v) in json::fields_from_py(fields)? {
        m = m.field(k, v);
    }
    let mut add = |name: String, value: &Bound<'_, PyAny>| -> PyResult<()> {
        let t = tensor_from_py(value, &name, None)?;
        m = std::mem::take(&mut m).tensor(name, t);
        Ok(())
    };
    if let Some(tensors) = tensors.filter(|t| !t.is_none()) {
        let dict = tensors
            .cast::<PyDict>()
            .map_err(|_| PyTypeError::new_err("tensors must be a dict of name -> tensor"))?;
        for (k, v) in dict.iter() {
            let name = k
                .cast::<PyString>()
                .map_err(|_| PyTypeError::new_err("tensor names must be strings"))?
                .to_string();
            add(name, &v)?;
        }
    }
    if let Some(kwargs) = kwargs {
        for (k, v) in kwargs.iter() {
            add(k.to_string(), &v)?;
        }
    }
    m.check_names().map_err(crate::errors::to_py)?;
    Ok(m)
}

#[pymethods]
impl PyMessage {
    /// A message to reply with from a service handler, or to inspect:
    /// ``Message({"step": 1}, x=array)``. Tensors are viewed, not copied.
    #[new]
    #[pyo3(signature = (fields=None, tensors=None, **kwargs))]
    fn py_new(
        py: Python<'_>,
        fields: Option<&Bound<'_, PyAny>>,
        tensors: Option<&Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        Self::new(py, build(fields, tensors, kwargs)?, None, None, None)
    }

    /// The JSON fields, as a dict.
    #[getter]
    fn fields(&self, py: Python<'_>) -> Py<PyDict> {
        self.fields.clone_ref(py)
    }

    /// The tensors, by name, in message order.
    #[getter]
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (n, t) in &self.tensors {
            d.set_item(n, t.clone_ref(py))?;
        }
        Ok(d)
    }

    /// The channel it was published on (``None`` for a message made here or a reply).
    #[getter]
    fn channel(&self) -> Option<&str> {
        self.channel.as_deref()
    }

    /// The publisher's sequence number (``None`` for a message made here or a reply).
    #[getter]
    fn seq(&self) -> Option<u64> {
        self.seq
    }

    /// Who sent it: the peer's address, ``"local"`` for this process, or
    /// the recording it was replayed from (``None`` for a reply).
    #[getter]
    fn sender(&self) -> Option<&str> {
        self.sender.as_deref()
    }

    /// Bytes of all tensors, packed.
    #[getter]
    fn nbytes(&self) -> u64 {
        self.message.payload_bytes()
    }

    /// The tensor names, in order.
    fn keys<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        PyList::new(py, self.tensors.iter().map(|(n, _)| n.as_str()))
    }

    fn __getitem__(&self, py: Python<'_>, name: &str) -> PyResult<Py<PyTensor>> {
        self.tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.clone_ref(py))
            .ok_or_else(|| {
                PyKeyError::new_err(format!(
                    "the message has no tensor `{name}`; it has: {}",
                    self.tensors
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    fn __contains__(&self, name: &str) -> bool {
        self.tensors.iter().any(|(n, _)| n == name)
    }

    fn __len__(&self) -> usize {
        self.tensors.len()
    }

    fn __iter__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(self.keys(py)?.try_iter()?.into_any())
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let fields = self
            .fields
            .bind(py)
            .repr()
            .map(|r| r.to_string())
            .unwrap_or_default();
        let tensors: Vec<String> = self
            .message
            .tensors()
            .map(|(n, t)| format!("{n}: {} {:?}", t.dtype(), t.shape()))
            .collect();
        let origin = match (&self.channel, self.seq) {
            (Some(c), Some(s)) => format!("channel={c:?}, seq={s}, "),
            _ => String::new(),
        };
        format!(
            "tensorferry.Message({origin}fields={fields}, tensors={{{}}})",
            tensors.join(", ")
        )
    }
}
