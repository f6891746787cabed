//! [`PyProxy`] (`tensorferry.Proxy`): a small reference to what a store
//! holds under a key, that fetches on first use or ahead of it.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use tensorferry_engine::store::Proxy;
use tensorferry_engine::Result;

use crate::errors::{IntoPy, Kind};
use crate::json;
use crate::message::PyMessage;
use crate::node::{drop_detached, timed_out, PyNode};
use crate::serialized;
use crate::tensor::PyTensor;
use crate::wait::{awaitable, block_on, deadline, on_thread, panicked, Done, Op};

/// A reference to what a :class:`Store` holds under a key: where the
/// store is, the key, and each tensor's dtype, shape, byte length and
/// checksum — enough to plan before fetching.
///
/// Send it in place of the data: as a field value (``pub.send({"w":
/// proxy})`` sends :meth:`to_json`'s dict), rebuilt on the other side with
/// :meth:`from_json`. :meth:`resolve` fetches on first use (and keeps what
/// it fetched); :meth:`resolve_async` starts fetching in the background, to
/// overlap with other work. Resolving checks that the store still holds
/// what the proxy describes: an evicted key raises :class:`NotStored`, other
/// data under the key :class:`ProxyMismatch`, a store out of reach
/// :class:`StoreUnreachable` — never a wrong tensor. Fetched messages are
/// kept in a per-process cache bounded in bytes
/// (:func:`set_proxy_cache_limit`), so several proxies of one key fetch once.
///
/// A proxy names where to fetch from: resolve only proxies from peers you
/// trust to name stores.
///
/// Example::
///
///     proxy = store.put_proxy(w=np.ones((32, 32), np.float32))
///     pub.send({"weights": proxy})
///     # the receiver:
///     proxy = tf.Proxy.from_json(msg.fields["weights"])
///     proxy.resolve_async()                # fetch while computing
///     ...
///     w = np.from_dlpack(proxy.tensor())
#[pyclass(module = "tensorferry", name = "Proxy", frozen)]
pub struct PyProxy {
    proxy: Option<Proxy>,
}

impl PyProxy {
    /// Wraps an engine proxy.
    pub fn new(proxy: Proxy) -> Self {
        Self { proxy: Some(proxy) }
    }

    /// The engine proxy.
    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("present until dropped")
    }

    /// The name of the proxy's entry in errors.
    fn entry(&self) -> String {
        format!(
            "proxy `{}` of store {}",
            self.proxy().key(),
            self.proxy().location()
        )
    }

    /// Runs `f` on the proxy once it is resolved: with the GIL released,
    /// and, while it still has to fetch, on a thread of its own, waiting
    /// in steps that answer Ctrl-C and give up after `timeout` seconds (the
    /// fetch goes on in the background; a later call takes its result).
    fn when_resolved<T, F>(&self, py: Python<'_>, timeout: Option<f64>, f: F) -> PyResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Proxy) -> Result<T> + Send + 'static,
    {
        let until = deadline(timeout)?;
        let proxy = self.proxy().clone();
        if proxy.is_resolved() {
            return py.detach(move || f(&proxy)).py();
        }
        match block_on(py, on_thread(move |_| f(&proxy))?, until)? {
            Some(Some(done)) => done.py(),
            Some(None) => Err(panicked()),
            None => Err(timed_out(format!("resolving {}", self.entry()), timeout)),
        }
    }
}

impl Drop for PyProxy {
    fn drop(&mut self) {
        // A proxy given a node holds it: dropping its last handle shuts the
        // node down, which waits for its threads.
        if let Some(proxy) = self.proxy.take() {
            drop_detached(proxy);
        }
    }
}

#[pymethods]
impl PyProxy {
    /// A proxy from :meth:`to_json`'s form: the dict (as a received
    /// message's field holds it) or its JSON text. It is checked as input
    /// from a peer.
    ///
    /// Raises:
    ///     InvalidArgument: not a proxy, saying what is wrong (another
    ///         format version, a bad key, a tensor whose byte length does
    ///         not follow from its dtype and shape).
    #[staticmethod]
    fn from_json(value: &Bound<'_, PyAny>) -> PyResult<Self> {
        let value = if let Ok(text) = value.cast::<PyString>() {
            serde_json::from_str(text.to_str()?)
                .map_err(|e| Kind::Invalid.err(format!("not a valid proxy: {e}")))?
        } else if value.cast::<PyDict>().is_ok() {
            json::to_json(value, "proxy", 0)?
        } else {
            return Err(PyTypeError::new_err(
                "a proxy is rebuilt from the dict Proxy.to_json() returns, or from its JSON text",
            ));
        };
        Ok(Self::new(Proxy::from_json(&value).py()?))
    }

    /// The proxy as a dict of JSON values, to travel as a field of any
    /// message (a :class:`Proxy` given as a field value is sent this way).
    fn to_json<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json::to_py(py, &self.proxy().to_json())
    }

    /// The key.
    #[getter]
    fn key(&self) -> &str {
        self.proxy().key()
    }

    /// Where the store is: ``"memory:NAME"``, ``"dir:PATH"`` or a serving
    /// node's address (what :meth:`Store.open` takes).
    #[getter]
    fn location(&self) -> String {
        self.proxy().location().to_string()
    }

    /// The tensors it describes, in message order: dicts with ``name``,
    /// ``dtype``, ``shape``, ``bytes`` and ``checksum`` (16 hex digits).
    #[getter]
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let value = serde_json::to_value(self.proxy().tensors())
            .map_err(|e| Kind::Base.err(format!("describing the tensors: {e}")))?;
        json::to_py(py, &value)
    }

    /// Bytes of all its tensors.
    #[getter]
    fn nbytes(&self) -> u64 {
        self.proxy().manifest().tensor_bytes()
    }

    /// Whether the message has been fetched (and checked): :meth:`resolve`
    /// then returns at once.
    fn is_resolved(&self) -> bool {
        self.proxy().is_resolved()
    }

    /// The message, fetched on first use (or taken from the process's
    /// cache, or from the fetch :meth:`resolve_async` started) and kept.
    /// Its tensors are on the host, viewing what the store returned. With
    /// ``deserializer``, what it makes of the bytes a
    /// ``put(..., serializer=...)`` stored.
    ///
    /// Waits with the GIL released; Ctrl-C raises ``KeyboardInterrupt``.
    ///
    /// Args:
    ///     timeout: seconds to wait (``None``: as long as the store's own
    ///         limit allows); the fetch goes on in the background after.
    ///
    /// Raises:
    ///     NotStored: the key is no longer there.
    ///     ProxyMismatch: the store holds other data under the key.
    ///     StoreUnreachable: a served store cannot be reached, or refused
    ///         this node.
    ///     InvalidArgument: a memory store of another process.
    ///     TimeoutError: not fetched within ``timeout``.
    ///
    /// A failed fetch is tried again by the next call.
    #[pyo3(signature = (timeout=None, deserializer=None))]
    fn resolve(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
        deserializer: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        serialized::check_deserializer(deserializer)?;
        let message = self.when_resolved(py, timeout, |p| p.resolve())?;
        let what = self.entry();
        if let Some(deserializer) = deserializer {
            let bytes = serialized::serialized_bytes(&message, &what)?;
            return serialized::deserialize(py, &bytes, deserializer);
        }
        serialized::refuse_serialized(&message, &what)?;
        Ok(Py::new(py, PyMessage::new(py, message, None, None, None)?)?.into_any())
    }

    /// Starts fetching in the background and returns at once; a later
    /// :meth:`resolve` waits for that fetch (and raises its error),
    /// :meth:`is_resolved` says whether it is done. Does nothing more when
    /// the proxy is resolved or being fetched.
    ///
    /// Returns a :class:`Fetch`: ignore it, or ``await`` it under asyncio
    /// for the message (``msg = await proxy.resolve_async()``).
    fn resolve_async(slf: Bound<'_, Self>) -> PyResult<PyFetch> {
        let proxy = slf.get().proxy().clone();
        slf.py().detach(move || proxy.resolve_async());
        Ok(PyFetch {
            proxy: slf.unbind(),
        })
    }

    /// The message landed as if it had arrived on ``node``'s ``channel``:
    /// each tensor on the device that channel's map names (``msg.channel``
    /// is ``channel``).
    ///
    /// Raises:
    ///     As :meth:`resolve`; DeviceError: a device the map names that this
    ///     host lacks.
    #[pyo3(signature = (node, channel, timeout=None))]
    fn resolve_to(
        &self,
        py: Python<'_>,
        node: PyRef<'_, PyNode>,
        channel: String,
        timeout: Option<f64>,
    ) -> PyResult<PyMessage> {
        let node = node.node().clone();
        let on = channel.clone();
        let message = self.when_resolved(py, timeout, move |p| p.resolve_to(&node, &on))?;
        PyMessage::new(py, message, Some(channel), None, None)
    }

    /// The one tensor of a proxy of one tensor, resolving it first: a
    /// :class:`Tensor`, read with ``np.from_dlpack`` or ``torch.from_dlpack``.
    ///
    /// Raises:
    ///     As :meth:`resolve`; InvalidArgument: the proxy describes more or
    ///     fewer than one tensor.
    #[pyo3(signature = (timeout=None))]
    fn tensor(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<PyTensor> {
        let t = self.when_resolved(py, timeout, |p| p.tensor())?;
        Ok(PyTensor::new(t))
    }

    /// Resolves, then recomputes each tensor's checksum from its bytes
    /// (reading every byte, which :meth:`resolve` does not) and compares it
    /// with the proxy's; returns the message.
    ///
    /// Raises:
    ///     As :meth:`resolve`; ProxyMismatch: naming the first tensor whose
    ///     bytes differ.
    #[pyo3(signature = (timeout=None))]
    fn verify(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<PyMessage> {
        let message = self.when_resolved(py, timeout, |p| p.verify())?;
        PyMessage::new(py, message, None, None, None)
    }

    /// Resolves this proxy of a served store through ``node`` (its secret
    /// and TLS settings) instead of the process's client node
    /// (:func:`set_store_client_node`).
    fn set_node(&self, node: PyRef<'_, PyNode>) {
        self.proxy().set_node(node.node());
    }

    fn __repr__(&self) -> String {
        let p = self.proxy();
        let tensors: Vec<String> = p
            .tensors()
            .iter()
            .map(|t| format!("{}: {} {:?}", t.name, t.dtype, t.shape))
            .collect();
        format!(
            "tensorferry.Proxy(key={:?}, location={:?}, tensors={{{}}})",
            p.key(),
            p.location().to_string(),
            tensors.join(", ")
        )
    }
}

/// A fetch :meth:`Proxy.resolve_async` started: ``await`` it under asyncio
/// for the message, or call :meth:`result`.
#[pyclass(module = "tensorferry", name = "Fetch", frozen)]
pub struct PyFetch {
    proxy: Py<PyProxy>,
}

#[pymethods]
impl PyFetch {
    /// Whether the fetch finished and the proxy is resolved.
    fn done(&self) -> bool {
        self.proxy.get().proxy().is_resolved()
    }

    /// The message, waiting for the fetch (see :meth:`Proxy.resolve`).
    ///
    /// Raises:
    ///     As :meth:`Proxy.resolve`.
    #[pyo3(signature = (timeout=None))]
    fn result(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Py<PyAny>> {
        self.proxy.get().resolve(py, timeout, None)
    }

    fn __await__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let me = self.proxy.get();
        let proxy = me.proxy().clone();
        let what = me.entry();
        let call = on_thread(move |_| proxy.resolve())?;
        let op: Op = Box::pin(async move {
            let r = call.await;
            Box::new(move |py: Python<'_>| {
                let message = r.ok_or_else(panicked)?.py()?;
                serialized::refuse_serialized(
                    &message,
                    &format!("{what} (awaited; use resolve(deserializer=...) for it)"),
                )?;
                Ok(Py::new(py, PyMessage::new(py, message, None, None, None)?)?.into_any())
            }) as Done
        });
        awaitable(py, op)?.call_method0("__await__")
    }

    fn __repr__(&self) -> String {
        let state = if self.done() { "done" } else { "fetching" };
        format!("<tensorferry.Fetch {} {state}>", self.proxy.get().entry())
    }
}
