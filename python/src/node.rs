//! [`PyNode`] (`tensorferry.Node`) and what it hands out: publishers,
//! subscriptions and recordings.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyStopIteration, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use tensorferry_device_map::ChannelConfig;
use tensorferry_engine::{Error, Node, Publisher, Recording, Secret, Subscription};

use crate::errors::{to_py, IntoPy, Kind};
use crate::message::{build, PyMessage};
use crate::release;
use crate::wait::{awaitable, block_on, deadline, on_thread, panicked, run_blocking, Done, Op};

/// Drops `value` with the GIL released: dropping the last handle of a node
/// shuts it down, which waits for its I/O threads.
pub fn drop_detached<T: Send>(value: T) {
    Python::attach(|py| py.detach(move || drop(value)));
}

/// The timeout error of a wait that ran out, in the engine's words.
pub fn timed_out(what: String, timeout: Option<f64>) -> PyErr {
    to_py(Error::Timeout {
        what,
        ms: timeout.map_or(0, |t| (t * 1000.0) as u64),
    })
}

/// A channel configuration from a path or a dict.
fn load_config(config: &Bound<'_, PyAny>) -> PyResult<ChannelConfig> {
    if let Ok(dict) = config.cast::<PyDict>() {
        let value = crate::json::to_json(dict.as_any(), "config", 0)?;
        return ChannelConfig::from_json_str(&value.to_string())
            .map_err(|e| Kind::Config.err(format!("config: {e}")));
    }
    let path: PathBuf = config
        .extract()
        .map_err(|_| PyTypeError::new_err("config must be a path to a JSON file or a dict"))?;
    ChannelConfig::from_file(&path)
        .map_err(|e| Kind::Config.err(format!("{}: {e}", path.display())))
}

/// Addresses given as one string or a list of strings.
fn addresses(value: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
    let Some(value) = value.filter(|v| !v.is_none()) else {
        return Ok(Vec::new());
    };
    if let Ok(s) = value.cast::<PyString>() {
        return Ok(vec![s.to_string()]);
    }
    value
        .extract::<Vec<String>>()
        .map_err(|_| PyTypeError::new_err("an address must be a string or a list of strings"))
}

/// A number of seconds as a duration; `what` names it in the error.
pub fn seconds(value: f64, what: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| {
        Kind::Invalid.err(format!(
            "{what} must be a number of seconds, 0 or more, not {value}"
        ))
    })
}

/// A node: it listens and connects over ``tcp://``, ``shm://`` and
/// ``inproc://``, and on named channels publishes, subscribes, serves and
/// requests.
///
/// Args:
///     listen: address(es) to listen on, e.g. ``"tcp://127.0.0.1:0"`` (port 0
///         picks a free port; read it back from :attr:`address`),
///         ``"shm://name"`` (processes of this host), ``"inproc://name"``.
///         A tcp address must be loopback; use ``listen_public`` for others.
///     config: the channel configuration — a path to a JSON file or a dict
///         (per-channel device maps, queues, wire dtypes, checksums, and a
///         ``"node"`` section). Every error is reported at once, with its place.
///     name: the node's name, shown to peers and in logs.
///     listen_public: address(es) reachable from other hosts (``tcp://0.0.0.0:7070``).
///     secret_file: a file holding the secret every tcp peer must prove it
///         knows (both ends need the same one; it never travels).
///     secret_env: an environment variable holding that secret instead.
///     connect_timeout: seconds connecting retries before giving up (default 5).
///     io_threads: threads that drive the connections (default 1).
///     service_threads: threads that run service handlers (default 2).
///     receive_budget_bytes: most bytes of received frames held at once (default 8 GiB).
///
/// Raises:
///     ConfigError: the configuration is not valid.
///     InvalidArgument: a malformed address or option.
///     IoError: an address cannot be bound.
///
/// Example::
///
///     node = tf.Node(listen="tcp://127.0.0.1:0")
///     pub = node.publisher("/params")
///     sub = tf.Node().subscribe(node.address, "/params")
///     pub.wait_for_subscribers(1, timeout=5)
///     pub.send({"step": 3}, weights=np.ones((3, 4), np.float32))
///     msg = sub.recv(timeout=5)
///     w = np.from_dlpack(msg["weights"])
#[pyclass(module = "tensorferry", name = "Node", frozen)]
pub struct PyNode {
    node: Option<Node>,
}

impl PyNode {
    /// The engine node.
    pub fn node(&self) -> &Node {
        self.node.as_ref().expect("present until dropped")
    }
}

impl Drop for PyNode {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            drop_detached(node);
        }
    }
}

#[pymethods]
impl PyNode {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (listen=None, config=None, name=None, *, listen_public=None, secret_file=None, secret_env=None, connect_timeout=None, io_threads=None, service_threads=None, receive_budget_bytes=None))]
    fn new(
        py: Python<'_>,
        listen: Option<&Bound<'_, PyAny>>,
        config: Option<&Bound<'_, PyAny>>,
        name: Option<String>,
        listen_public: Option<&Bound<'_, PyAny>>,
        secret_file: Option<PathBuf>,
        secret_env: Option<String>,
        connect_timeout: Option<f64>,
        io_threads: Option<usize>,
        service_threads: Option<usize>,
        receive_budget_bytes: Option<u64>,
    ) -> PyResult<Self> {
        let mut b = Node::builder();
        if let Some(config) = config.filter(|c| !c.is_none()) {
            b = b
                .configure(load_config(config)?)
                .map_err(|e| Kind::Config.err(e.to_string()))?;
        }
        if let Some(name) = name {
            b = b.name(name);
        }
        for a in addresses(listen)? {
            b = b.listen(a);
        }
        for a in addresses(listen_public)? {
            b = b.listen_public(a);
        }
        if let Some(path) = secret_file {
            b = b.secret(Secret::from_file(&path).py()?);
        }
        if let Some(var) = secret_env {
            b = b.secret(Secret::from_env(&var).py()?);
        }
        if let Some(t) = connect_timeout {
            b = b.connect_timeout(seconds(t, "connect_timeout")?);
        }
        if let Some(n) = io_threads {
            b = b.io_threads(n);
        }
        if let Some(n) = service_threads {
            b = b.service_threads(n);
        }
        if let Some(bytes) = receive_budget_bytes {
            b = b.receive_budget_bytes(bytes);
        }
        let node = py.detach(move || b.build()).py()?;
        Ok(Self { node: Some(node) })
    }

    /// The node's name.
    #[getter]
    fn name(&self) -> &str {
        self.node().name()
    }

    /// The first address the node listens on, with its port resolved
    /// (``None`` when it does not listen).
    #[getter]
    fn address(&self) -> Option<String> {
        self.node().listen_addrs().first().map(|a| a.to_string())
    }

    /// Every address the node listens on.
    #[getter]
    fn addresses(&self) -> Vec<String> {
        self.node()
            .listen_addrs()
            .iter()
            .map(|a| a.to_string())
            .collect()
    }

    /// Number of live connections.
    #[getter]
    fn peers(&self) -> usize {
        self.node().peer_count()
    }

    /// What the node has done since it started, as a dict:
    /// ``messages_received``, ``bytes_received`` (requests to its services
    /// included), ``messages_sent``, ``bytes_sent`` (one per peer reached),
    /// ``dropped`` (under ``drop_oldest``), ``rejected`` (peers dropped for
    /// breaking the protocol), ``peers`` (open now), ``peers_lost``,
    /// ``striped`` (messages sent over a tcp connection and its stripes).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.node().stats();
        let d = counters(
            py,
            [
                s.messages_received,
                s.bytes_received,
                s.messages_sent,
                s.bytes_sent,
            ],
        )?;
        d.set_item("dropped", s.dropped)?;
        d.set_item("rejected", s.rejected)?;
        d.set_item("peers", s.peers)?;
        d.set_item("peers_lost", s.peers_lost)?;
        d.set_item("striped", s.striped)?;
        Ok(d)
    }

    /// The same counters for one channel: ``messages_received``,
    /// ``bytes_received``, ``messages_sent``, ``bytes_sent`` (zeros for a
    /// channel the node has not used).
    fn channel_stats<'py>(&self, py: Python<'py>, channel: &str) -> PyResult<Bound<'py, PyDict>> {
        let s = self.node().channel_stats(channel);
        counters(
            py,
            [
                s.messages_received,
                s.bytes_received,
                s.messages_sent,
                s.bytes_sent,
            ],
        )
    }

    /// Connects to ``addr`` (if not yet connected), retrying up to the
    /// connect timeout (Ctrl-C gives up waiting).
    ///
    /// Raises:
    ///     InvalidArgument: a malformed address.
    ///     IoError: the address cannot be reached.
    fn connect(&self, py: Python<'_>, addr: String) -> PyResult<()> {
        let node = self.node().clone();
        run_blocking(py, move || node.connect(&addr))?.py()
    }

    /// A :class:`Publisher` on ``channel``.
    fn publisher(&self, channel: String) -> PyPublisher {
        PyPublisher {
            publisher: Some(Arc::new(self.node().publisher(channel))),
        }
    }

    /// Connects to ``addr`` (if not yet connected) and subscribes to
    /// ``channel`` there, retrying up to the connect timeout (Ctrl-C gives
    /// up waiting). A ``file://PATH`` address replays a recording.
    ///
    /// Raises:
    ///     IoError: ``addr`` cannot be reached within the connect timeout.
    ///     PeerLost: the connection closed while subscribing.
    fn subscribe(&self, py: Python<'_>, addr: String, channel: String) -> PyResult<PySubscription> {
        let node = self.node().clone();
        let sub = run_blocking(py, move || node.subscribe(&addr, channel))?.py()?;
        Ok(PySubscription::new(sub))
    }

    /// The asyncio form of :meth:`connect`.
    fn connect_async<'py>(&self, py: Python<'py>, addr: String) -> PyResult<Bound<'py, PyAny>> {
        let node = self.node().clone();
        let call = on_thread(move |_| node.connect(&addr))?;
        let op: Op = Box::pin(async move {
            let r = call.await;
            Box::new(move |py: Python<'_>| {
                r.ok_or_else(panicked)?.py()?;
                Ok(py.None())
            }) as Done
        });
        awaitable(py, op)
    }

    /// The asyncio form of :meth:`subscribe`.
    fn subscribe_async<'py>(
        &self,
        py: Python<'py>,
        addr: String,
        channel: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        let node = self.node().clone();
        let call = on_thread(move |_| node.subscribe(&addr, channel))?;
        let op: Op = Box::pin(async move {
            let r = call.await;
            Box::new(move |py: Python<'_>| {
                let sub = r.ok_or_else(panicked)?.py()?;
                Ok(Py::new(py, PySubscription::new(sub))?.into_any())
            }) as Done
        });
        awaitable(py, op)
    }

    /// A :class:`Subscription` to ``channel`` (``"*"`` for every channel)
    /// from every peer, present and future, and from this node's own publishers.
    #[pyo3(signature = (channel="*"))]
    fn subscriber(&self, py: Python<'_>, channel: &str) -> PySubscription {
        let node = self.node().clone();
        let channel = channel.to_string();
        PySubscription::new(py.detach(move || node.subscriber(channel)))
    }

    /// Records every message this node sees on ``channel`` (``"*"``: all)
    /// to ``addr``, a ``file://PATH``, until the returned
    /// :class:`Recording` is stopped. Replay it with ``subscribe(addr, channel)``.
    ///
    /// Raises:
    ///     InvalidArgument: ``addr`` is not ``file://``.
    ///     IoError: the file cannot be created.
    #[pyo3(signature = (addr, channel="*"))]
    fn record(&self, addr: &str, channel: &str) -> PyResult<PyRecording> {
        let rec = self.node().record(addr, channel).py()?;
        Ok(PyRecording {
            recording: Mutex::new(Some(rec)),
        })
    }

    /// Registers ``handler`` as the request/reply service on ``channel``.
    ///
    /// ``handler(request)`` gets a :class:`Message` and returns the reply:
    /// ``None`` (empty), a dict of fields, a ``(fields, tensors)`` pair, or a
    /// :class:`Message`. An exception it raises becomes an error reply: a
    /// :class:`ServiceError` with its code, any other with the exception's
    /// class name as the code and its text as the message. Handlers run on
    /// the node's service threads, one request at a time per service.
    ///
    /// Args:
    ///     input: a :class:`Schema` requests must match (others get the
    ///         error ``bad_request`` without reaching the handler).
    ///     output: a :class:`Schema` replies must match (others become ``bad_reply``).
    ///
    /// Raises:
    ///     InvalidArgument: a service already serves ``channel``.
    #[pyo3(signature = (channel, handler, *, input=None, output=None))]
    fn serve(
        &self,
        py: Python<'_>,
        channel: String,
        handler: Bound<'_, PyAny>,
        input: Option<PyRef<'_, crate::service::PySchema>>,
        output: Option<PyRef<'_, crate::service::PySchema>>,
    ) -> PyResult<()> {
        if !handler.is_callable() {
            return Err(PyTypeError::new_err("handler must be callable"));
        }
        let service = crate::service::service(
            &channel,
            handler.unbind(),
            input.map(|s| s.schema().clone()),
            output.map(|s| s.schema().clone()),
        );
        let node = self.node().clone();
        py.detach(move || node.serve(channel, service)).py()
    }

    /// Sends a request to the service on ``channel`` at ``addr`` and waits
    /// for its reply (a :class:`Message`). Tensors go as keywords or in the
    /// ``tensors`` dict, as for :meth:`Publisher.send`.
    ///
    /// Args:
    ///     timeout: seconds to wait for the reply (``None``: no limit).
    ///
    /// Raises:
    ///     ServiceError: the service answered with an error (``code``, ``message``).
    ///     TimeoutError: no reply in time.
    ///     PeerLost: the connection dropped first.
    ///     KeyboardInterrupt: Ctrl-C while waiting (the request is given up).
    #[pyo3(signature = (addr, channel, /, fields=None, tensors=None, *, timeout=None, **kwargs))]
    #[allow(clippy::too_many_arguments)]
    fn request(
        &self,
        py: Python<'_>,
        addr: String,
        channel: String,
        fields: Option<&Bound<'_, PyAny>>,
        tensors: Option<&Bound<'_, PyAny>>,
        timeout: Option<f64>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyMessage> {
        let request = build(fields, tensors, kwargs)?;
        // Written before the reply comes: the last hold on the objects
        // sent is then this copy, let go here, with the GIL.
        let keep = request.clone();
        let until = deadline(timeout)?;
        let node = self.node().clone();
        let (a, c) = (addr.clone(), channel.clone());
        let pending = py
            .detach(move || node.request_async(&a, &c, request))
            .py()?;
        let reply = wait_reply(py, pending, until);
        release::drop_here(py, keep);
        match reply? {
            Some(reply) => PyMessage::new(py, reply.py()?, Some(channel), None, Some(addr)),
            None => Err(timed_out(
                format!("waiting for the reply of `{channel}` at {addr}"),
                timeout,
            )),
        }
    }

    /// The asyncio form of :meth:`request`: ``await node.request_async(...)``.
    /// No time limit: use ``asyncio.wait_for``; cancelling gives the request up.
    #[pyo3(signature = (addr, channel, /, fields=None, tensors=None, **kwargs))]
    fn request_async<'py>(
        &self,
        py: Python<'py>,
        addr: String,
        channel: String,
        fields: Option<&Bound<'py, PyAny>>,
        tensors: Option<&Bound<'py, PyAny>>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = build(fields, tensors, kwargs)?;
        let node = self.node().clone();
        let op: Op = Box::pin(async move {
            let reply = match node.request_async(&addr, &channel, request) {
                Ok(pending) => pending.await,
                Err(e) => Err(e),
            };
            Box::new(move |py: Python<'_>| {
                let m = PyMessage::new(py, reply.py()?, Some(channel), None, Some(addr))?;
                Ok(Py::new(py, m)?.into_any())
            }) as Done
        });
        awaitable(py, op)
    }

    /// Closes every connection and listener and stops every service.
    fn close(&self, py: Python<'_>) {
        let node = self.node().clone();
        py.detach(move || node.shutdown());
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<Bound<'_, PyAny>>,
        exc_value: Option<Bound<'_, PyAny>>,
        traceback: Option<Bound<'_, PyAny>>,
    ) {
        let _ = (exc_type, exc_value, traceback);
        self.close(py);
    }

    fn __repr__(&self) -> String {
        format!(
            "tensorferry.Node(name={:?}, addresses={:?}, peers={})",
            self.node().name(),
            self.addresses(),
            self.node().peer_count()
        )
    }
}

/// Publishes messages on one channel (from :meth:`Node.publisher`).
#[pyclass(module = "tensorferry", name = "Publisher", frozen)]
pub struct PyPublisher {
    publisher: Option<Arc<Publisher>>,
}

impl PyPublisher {
    fn publisher(&self) -> &Arc<Publisher> {
        self.publisher.as_ref().expect("present until dropped")
    }
}

impl Drop for PyPublisher {
    fn drop(&mut self) {
        if let Some(p) = self.publisher.take() {
            drop_detached(p);
        }
    }
}

#[pymethods]
impl PyPublisher {
    /// The channel.
    #[getter]
    fn channel(&self) -> &str {
        self.publisher().channel()
    }

    /// Subscribers reached: this node's own and every peer's that asked.
    #[getter]
    fn subscribers(&self) -> usize {
        self.publisher().subscribers()
    }

    /// Sends a message to every subscriber: ``fields`` (a dict of JSON
    /// values) and tensors, as keywords (``weights=array``) or in the
    /// ``tensors`` dict (for names that are not identifiers).
    ///
    /// A tensor is anything with ``__dlpack__`` or the buffer protocol
    /// (NumPy arrays, PyTorch CPU tensors, bytes, :class:`Tensor`); its
    /// bytes are not copied — the object is kept alive until they are
    /// written to every subscriber, so do not change it meanwhile (and call
    /// :meth:`flush` before the program ends). A strided view travels
    /// packed. Under the channel's ``block`` policy this waits
    /// (GIL released, Ctrl-C honoured) while a subscriber's queue is full.
    ///
    /// Raises:
    ///     TypeError: a field that is not JSON, or a tensor that is not one.
    ///     DeviceError: a tensor in device memory.
    ///     ClosedError: the node is shut down.
    ///     KeyboardInterrupt: Ctrl-C while waiting for room (nothing was sent).
    #[pyo3(signature = (fields=None, tensors=None, **kwargs))]
    fn send(
        &self,
        py: Python<'_>,
        fields: Option<&Bound<'_, PyAny>>,
        tensors: Option<&Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<()> {
        let message = build(fields, tensors, kwargs)?;
        // Often written before `send` returns (not when a fast sender's
        // messages are left to the I/O thread): the last hold on the
        // objects sent is then this copy, let go here, with the GIL.
        let keep = message.clone();
        let p = Arc::clone(self.publisher());
        let sent = block_on(py, async move { p.send_async(message).await }, None);
        release::drop_here(py, keep);
        sent?.expect("no deadline").py()
    }

    /// The asyncio form of :meth:`send`: waits for room without blocking the loop.
    #[pyo3(signature = (fields=None, tensors=None, **kwargs))]
    fn send_async<'py>(
        &self,
        py: Python<'py>,
        fields: Option<&Bound<'py, PyAny>>,
        tensors: Option<&Bound<'py, PyAny>>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let message = build(fields, tensors, kwargs)?;
        let p = Arc::clone(self.publisher());
        let op: Op = Box::pin(async move {
            let sent = p.send_async(message).await;
            Box::new(move |py: Python<'_>| {
                sent.py()?;
                Ok(py.None())
            }) as Done
        });
        awaitable(py, op)
    }

    /// Waits until at least ``n`` subscribers are reached.
    ///
    /// Raises:
    ///     TimeoutError: fewer than ``n`` after ``timeout`` seconds.
    #[pyo3(signature = (n=1, timeout=None))]
    fn wait_for_subscribers(&self, py: Python<'_>, n: usize, timeout: Option<f64>) -> PyResult<()> {
        let until = deadline(timeout)?;
        let p = Arc::clone(self.publisher());
        match block_on(
            py,
            async move { p.wait_for_subscribers_async(n).await },
            until,
        )? {
            Some(r) => r.py(),
            None => Err(timed_out(
                format!(
                    "waiting for {n} subscriber(s) of `{}` ({} so far)",
                    self.publisher().channel(),
                    self.publisher().subscribers()
                ),
                timeout,
            )),
        }
    }

    /// The asyncio form of :meth:`wait_for_subscribers` (no time limit).
    #[pyo3(signature = (n=1))]
    fn wait_for_subscribers_async<'py>(
        &self,
        py: Python<'py>,
        n: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let p = Arc::clone(self.publisher());
        let op: Op = Box::pin(async move {
            let r = p.wait_for_subscribers_async(n).await;
            Box::new(move |py: Python<'_>| {
                r.py()?;
                Ok(py.None())
            }) as Done
        });
        awaitable(py, op)
    }

    /// Waits until every message queued for this channel's peers has been
    /// written to its connection.
    ///
    /// Raises:
    ///     TimeoutError: messages are still queued after ``timeout`` seconds.
    #[pyo3(signature = (timeout=None))]
    fn flush(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let until = deadline(timeout)?;
        loop {
            let slice = until.map_or(crate::wait::SIGNAL_CHECK, |d| {
                d.saturating_duration_since(Instant::now())
                    .min(crate::wait::SIGNAL_CHECK)
            });
            let p = Arc::clone(self.publisher());
            let inside = crate::exit::enter()?;
            let flushed = py.detach(move || p.flush(slice));
            drop(inside);
            match flushed {
                Ok(()) => return Ok(()),
                Err(Error::Timeout { what, .. }) => {
                    if until.is_some_and(|d| Instant::now() >= d) {
                        return Err(timed_out(what, timeout));
                    }
                    py.check_signals()?;
                }
                Err(e) => return Err(to_py(e)),
            }
        }
    }

    /// The asyncio form of :meth:`flush` (no time limit: use ``asyncio.wait_for``).
    fn flush_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let p = Arc::clone(self.publisher());
        let call = on_thread(move |abandoned| loop {
            match p.flush(crate::wait::SIGNAL_CHECK) {
                Err(Error::Timeout { .. }) if !abandoned.get() => continue,
                other => return other,
            }
        })?;
        let op: Op = Box::pin(async move {
            let r = call.await;
            Box::new(move |py: Python<'_>| {
                r.ok_or_else(panicked)?.py()?;
                Ok(py.None())
            }) as Done
        });
        awaitable(py, op)
    }

    /// Subscribers of this channel whose connection was lost, oldest first:
    /// dicts with ``peer``, ``channel``, ``reason``, ``written`` (messages
    /// written to it) and ``unsent`` (messages queued for it and lost).
    fn lost_subscribers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for l in self.publisher().lost_subscribers() {
            let d = PyDict::new(py);
            d.set_item("peer", l.peer)?;
            d.set_item("channel", l.channel)?;
            d.set_item("reason", l.reason)?;
            d.set_item("written", l.written)?;
            d.set_item("unsent", l.unsent)?;
            list.append(d)?;
        }
        Ok(list)
    }

    fn __repr__(&self) -> String {
        format!(
            "tensorferry.Publisher(channel={:?}, subscribers={})",
            self.publisher().channel(),
            self.publisher().subscribers()
        )
    }
}

/// Receives the messages of one channel (from :meth:`Node.subscribe` or
/// :meth:`Node.subscriber`). Iterating yields messages until the node shuts
/// down (or a replay ends).
#[pyclass(module = "tensorferry", name = "Subscription", frozen)]
pub struct PySubscription {
    sub: Mutex<Option<Arc<Subscription>>>,
    channel: String,
}

impl PySubscription {
    fn new(sub: Subscription) -> Self {
        Self {
            channel: sub.channel().to_string(),
            sub: Mutex::new(Some(Arc::new(sub))),
        }
    }

    fn sub(&self) -> PyResult<Arc<Subscription>> {
        crate::lock(&self.sub)
            .clone()
            .ok_or_else(|| to_py(Error::Closed))
    }

    fn recv_inner(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<PyMessage> {
        let until = deadline(timeout)?;
        let s = self.sub()?;
        match block_on(py, async move { s.recv_async().await }, until)? {
            Some(r) => PyMessage::received(py, r.py()?),
            None => Err(timed_out(
                format!("waiting for a message on `{}`", self.channel),
                timeout,
            )),
        }
    }
}

impl Drop for PySubscription {
    fn drop(&mut self) {
        if let Some(s) = crate::lock(&self.sub).take() {
            drop_detached(s);
        }
    }
}

#[pymethods]
impl PySubscription {
    /// The channel.
    #[getter]
    fn channel(&self) -> &str {
        &self.channel
    }

    /// Messages this subscription's queue dropped under ``drop_oldest``.
    #[getter]
    fn dropped(&self) -> PyResult<u64> {
        Ok(self.sub()?.dropped())
    }

    /// The next message, waiting at most ``timeout`` seconds (``None``: as
    /// long as it takes). The GIL is released while waiting; Ctrl-C raises
    /// ``KeyboardInterrupt`` and takes nothing off the queue.
    ///
    /// Raises:
    ///     TimeoutError: nothing arrived in time.
    ///     PeerLost: the connection this subscription was made through was
    ///         lost (once; later calls wait for other peers).
    ///     ClosedError: the node shut down, or a replay ended.
    #[pyo3(signature = (timeout=None))]
    fn recv(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<PyMessage> {
        self.recv_inner(py, timeout)
    }

    /// The next message if one is queued, else ``None``.
    fn try_recv(&self, py: Python<'_>) -> PyResult<Option<PyMessage>> {
        let s = self.sub()?;
        match py.detach(move || s.try_recv()).py()? {
            Some(r) => Ok(Some(PyMessage::received(py, r)?)),
            None => Ok(None),
        }
    }

    /// The asyncio form of :meth:`recv`: ``msg = await sub.recv_async()``.
    /// No time limit: use ``asyncio.wait_for``; cancelling takes nothing
    /// off the queue.
    fn recv_async<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let s = self.sub()?;
        let op: Op = Box::pin(async move {
            let r = s.recv_async().await;
            Box::new(move |py: Python<'_>| {
                let m = PyMessage::received(py, r.py()?)?;
                Ok(Py::new(py, m)?.into_any())
            }) as Done
        });
        awaitable(py, op)
    }

    /// Unsubscribes now (instead of when the object is collected).
    fn close(&self, py: Python<'_>) {
        let s = crate::lock(&self.sub).take();
        py.detach(move || drop(s));
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<PyMessage> {
        match self.recv_inner(py, None) {
            Err(e) if e.is_instance(py, Kind::Closed.class(py)?.as_any()) => {
                Err(PyStopIteration::new_err(()))
            }
            other => other,
        }
    }

    fn __repr__(&self) -> String {
        format!("tensorferry.Subscription(channel={:?})", self.channel)
    }
}

/// A recording started by :meth:`Node.record`; a context manager that
/// stops it on exit. Dropping it stops it too.
#[pyclass(module = "tensorferry", name = "Recording", frozen)]
pub struct PyRecording {
    recording: Mutex<Option<Recording>>,
}

impl Drop for PyRecording {
    fn drop(&mut self) {
        if let Some(r) = crate::lock(&self.recording).take() {
            drop_detached(r);
        }
    }
}

#[pymethods]
impl PyRecording {
    /// Stops recording, syncs the file and returns how many messages it holds.
    ///
    /// Raises:
    ///     IoError: a write or the sync failed (recording stopped there).
    fn stop(&self, py: Python<'_>) -> PyResult<u64> {
        let Some(r) = crate::lock(&self.recording).take() else {
            return Err(Kind::Invalid.err("the recording is already stopped"));
        };
        py.detach(move || r.stop()).py()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<Bound<'_, PyAny>>,
        exc_value: Option<Bound<'_, PyAny>>,
        traceback: Option<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        let _ = (exc_type, exc_value, traceback);
        if crate::lock(&self.recording).is_some() {
            self.stop(py)?;
        }
        Ok(())
    }
}

/// The counters a node and a channel both have, as a dict: messages
/// received, bytes received, messages sent, bytes sent, in that order.
fn counters(py: Python<'_>, values: [u64; 4]) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    let keys = [
        "messages_received",
        "bytes_received",
        "messages_sent",
        "bytes_sent",
    ];
    for (key, v) in keys.into_iter().zip(values) {
        d.set_item(key, v)?;
    }
    Ok(d)
}

/// Waits for a request's reply, reading its connection on this thread (no
/// hand-off from the I/O thread), with the GIL released and a look for
/// signals every 50 ms; `None` after `until`.
///
/// # Errors
///
/// What a signal handler raises (`KeyboardInterrupt` for Ctrl-C): the
/// request is given up.
fn wait_reply(
    py: Python<'_>,
    mut pending: tensorferry_engine::RequestFuture,
    until: Option<Instant>,
) -> PyResult<Option<tensorferry_engine::Result<tensorferry_engine::Message>>> {
    loop {
        let check_at = Instant::now() + crate::wait::SIGNAL_CHECK;
        let stop = until.map_or(check_at, |u| u.min(check_at));
        let inside = crate::exit::enter()?;
        let reply = py.detach(|| pending.wait_until(stop));
        drop(inside);
        if let Some(reply) = reply {
            return Ok(Some(reply));
        }
        if until.is_some_and(|u| Instant::now() >= u) {
            return Ok(None);
        }
        py.check_signals()?;
    }
}
