//! [`PyStore`] (`tensorferry.Store`): messages kept under keys, write-once,
//! in this process's memory, in a directory, or served by a node; and the
//! module functions of the per-process proxy cache.

use std::path::PathBuf;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use tensorferry_engine::store::{self, Location, Overwrite, Store, PROXY_MARK};
use tensorferry_engine::{Message, Result};

use crate::errors::{IntoPy, Kind};
use crate::message::{build, PyMessage};
use crate::node::{drop_detached, seconds, PyNode};
use crate::proxy::PyProxy;
use crate::serialized;
use crate::wait::run_blocking;
use crate::{json, release};

/// A store of messages under keys: put a message once, then get it, or
/// hand out a small :class:`Proxy` of it that fetches where it is used.
///
/// Keys are written once: putting a key again raises
/// :class:`AlreadyStored` unless ``overwrite=True``. Make one with
/// :meth:`memory` (this process), :meth:`dir` (a directory of files, read
/// back by mapping them: other processes of the host reach it by its path),
/// :meth:`remote` (a store another node serves with :meth:`serve`) or
/// :meth:`open` (from a location's text).
///
/// A ``get`` views what the store holds without copying it: a mapped file,
/// a frame in memory, or the reply a served store sent. Calls to a served
/// store release the GIL and answer Ctrl-C.
///
/// Example::
///
///     store = tf.Store.dir("weights")
///     key = store.put({"step": 7}, w=np.ones((32, 32), np.float32))
///     msg = store.get(key)                 # msg.fields, msg["w"]
///     proxy = store.proxy(key)             # send proxy.to_json() instead of the data
///     w = np.from_dlpack(proxy.resolve()["w"])
#[pyclass(module = "tensorferry", name = "Store", frozen)]
pub struct PyStore {
    store: Option<Store>,
}

impl PyStore {
    fn new(store: Store) -> Self {
        Self { store: Some(store) }
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("present until dropped")
    }

    /// Runs `f` on this store with the GIL released: for a served store on
    /// a thread of its own, waiting in steps that answer Ctrl-C (the call
    /// goes on to its end there, its result dropped).
    fn call<T, F>(&self, py: Python<'_>, f: F) -> PyResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T> + Send + 'static,
    {
        let store = self.store().clone();
        if matches!(store.location(), Location::Served { .. }) {
            run_blocking(py, move || f(&store))?.py()
        } else {
            // A large put or a slow disk: the interpreter's exit waits for it.
            let inside = crate::exit::enter()?;
            let done = py.detach(move || f(&store));
            drop(inside);
            done.py()
        }
    }
}

impl PyStore {
    /// Runs `put` on `message` (see [`PyStore::call`]). The last hold on
    /// the Python objects put is then a copy let go here, with the GIL.
    fn put_message<T, F>(&self, py: Python<'_>, message: Message, put: F) -> PyResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Store, &Message) -> Result<T> + Send + 'static,
    {
        let keep = message.clone();
        let done = self.call(py, move |s| put(s, &message));
        release::drop_here(py, keep);
        done
    }
}

impl Drop for PyStore {
    fn drop(&mut self) {
        // A served store's handle holds a node: dropping its last handle
        // shuts the node down, which waits for its threads.
        if let Some(store) = self.store.take() {
            drop_detached(store);
        }
    }
}

/// The message a put stores: `fields` and tensors, or, with a serializer,
/// what it makes of `fields` (any object).
fn message_of(
    py: Python<'_>,
    fields: Option<&Bound<'_, PyAny>>,
    tensors: Option<&Bound<'_, PyAny>>,
    serializer: Option<&Bound<'_, PyAny>>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<Message> {
    let Some(serializer) = serializer else {
        return build(fields, tensors, kwargs);
    };
    if tensors.is_some_and(|t| !t.is_none()) || kwargs.is_some_and(|k| !k.is_empty()) {
        return Err(PyTypeError::new_err(
            "with serializer=, a put stores one object (the first argument); put tensors without a serializer, or inside the object",
        ));
    }
    let none = py.None().into_bound(py);
    serialized::serialize(fields.unwrap_or(&none), serializer)
}

/// The name of an entry in errors.
fn entry(store: &Store, key: &str) -> String {
    format!("store {}: key `{key}`", store.location())
}

#[pymethods]
impl PyStore {
    /// A store in this process's memory: the one called ``name``, made when
    /// absent, or a new one with a generated name. Its proxies resolve in
    /// this process only (:meth:`serve` it to reach it from others).
    #[staticmethod]
    #[pyo3(signature = (name=None))]
    fn memory(name: Option<&str>) -> Self {
        Self::new(match name {
            Some(name) => Store::memory_named(name),
            None => Store::memory(),
        })
    }

    /// A store in the directory ``path`` (made when absent): one file per
    /// key, read back by mapping it, so a get costs the same for any size
    /// until the bytes are read. Proxies name the directory by its absolute
    /// path, so they resolve in any process of this host.
    ///
    /// Raises:
    ///     IoError: the directory cannot be made or read.
    ///     InvalidArgument: ``path`` is not a directory.
    #[staticmethod]
    fn dir(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        Ok(Self::new(py.detach(move || Store::dir(&path)).py()?))
    }

    /// The store another node serves (:meth:`serve`) at ``addr`` on
    /// ``channel``, reached through ``node`` (its secret and TLS settings
    /// are what that node sees). Each call waits at most ``timeout`` seconds.
    ///
    /// Raises:
    ///     InvalidArgument: a malformed address or timeout. An unreachable
    ///         store shows on first use, as :class:`StoreUnreachable`.
    #[staticmethod]
    #[pyo3(signature = (node, addr, channel="/tensorferry/store", timeout=60.0))]
    fn remote(node: PyRef<'_, PyNode>, addr: &str, channel: &str, timeout: f64) -> PyResult<Self> {
        let timeout = seconds(timeout, "timeout")?;
        let store = Store::remote(node.node(), addr, channel).py()?;
        Ok(Self::new(store.with_timeout(timeout)))
    }

    /// The store at ``location``: ``"dir:PATH"`` (or a plain path),
    /// ``"memory:NAME"`` (a memory store of this process), or a serving
    /// node's address, ``"tcp://HOST:PORT"`` with ``"#CHANNEL"`` when it is
    /// not the default one. A served store is reached through ``node``, or
    /// without one through the process's client node
    /// (:func:`set_store_client_node`).
    ///
    /// Raises:
    ///     InvalidArgument: malformed text, or a memory store this process lacks.
    ///     IoError: a directory that cannot be opened.
    #[staticmethod]
    #[pyo3(signature = (location, node=None))]
    fn open(py: Python<'_>, location: &str, node: Option<PyRef<'_, PyNode>>) -> PyResult<Self> {
        let location: Location = location.parse().py()?;
        let node = node.map(|n| n.node().clone());
        let store = py.detach(move || Store::open(&location, node.as_ref()));
        Ok(Self::new(store.py()?))
    }

    /// Where the store is, as its proxies name it: ``"memory:NAME"``,
    /// ``"dir:PATH"`` or the serving node's address; :meth:`open` takes it.
    #[getter]
    fn location(&self) -> String {
        self.store().location().to_string()
    }

    /// Stores a message and returns its key: ``fields`` (a dict of JSON
    /// values, :class:`Proxy` objects among them) and tensors, as keywords
    /// or in the ``tensors`` dict, as for :meth:`Publisher.send`. The bytes
    /// are copied (or written) before this returns: changing the arrays
    /// afterwards does not change what is stored.
    ///
    /// Args:
    ///     key: the key to store under (1 to 200 ASCII letters, digits,
    ///         ``.``, ``_``, ``-``); a new random key when ``None``.
    ///     overwrite: replace what ``key`` holds (proxies made before then
    ///         raise :class:`ProxyMismatch`); needs ``key``.
    ///     serializer: store ``serializer(fields)`` instead — any object,
    ///         made bytes by e.g. ``pickle.dumps``; read it back with
    ///         ``get(key, deserializer=pickle.loads)``.
    ///
    /// Raises:
    ///     AlreadyStored: ``key`` is taken and ``overwrite`` is false.
    ///     InvalidArgument: a bad key, or a name given twice.
    ///     TypeError: a field that is not JSON, or a tensor that is not one.
    ///     StoreUnreachable: a served store cannot be reached.
    #[pyo3(signature = (fields=None, tensors=None, *, key=None, overwrite=false, serializer=None, **kwargs))]
    #[allow(clippy::too_many_arguments)]
    fn put(
        &self,
        py: Python<'_>,
        fields: Option<&Bound<'_, PyAny>>,
        tensors: Option<&Bound<'_, PyAny>>,
        key: Option<String>,
        overwrite: bool,
        serializer: Option<&Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<String> {
        if overwrite && key.is_none() {
            return Err(Kind::Invalid
                .err("overwrite=True replaces what a key holds: give the key (key=...)"));
        }
        let message = message_of(py, fields, tensors, serializer, kwargs)?;
        let overwrite = if overwrite {
            Overwrite::Replace
        } else {
            Overwrite::Refuse
        };
        self.put_message(py, message, move |s, message| match key {
            Some(key) => s.put_as(&key, message, overwrite).map(|m| m.key),
            None => s.put(message),
        })
    }

    /// Stores a message under a new key, as :meth:`put` does, and returns
    /// a :class:`Proxy` of it.
    ///
    /// Raises:
    ///     As :meth:`put`.
    #[pyo3(signature = (fields=None, tensors=None, *, serializer=None, **kwargs))]
    fn put_proxy(
        &self,
        py: Python<'_>,
        fields: Option<&Bound<'_, PyAny>>,
        tensors: Option<&Bound<'_, PyAny>>,
        serializer: Option<&Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<PyProxy> {
        let message = message_of(py, fields, tensors, serializer, kwargs)?;
        let proxy = self.put_message(py, message, |s, message| s.put_proxy(message))?;
        Ok(PyProxy::new(proxy))
    }

    /// The message under ``key`` (a :class:`Message` whose tensors view what
    /// the store holds); with ``deserializer``, what it makes of the bytes
    /// a ``put(..., serializer=...)`` stored.
    ///
    /// Raises:
    ///     NotStored: nothing is stored under ``key`` (also a ``KeyError``).
    ///     InvalidArgument: a bad key; a value put with a serializer read
    ///         without a deserializer, or the other way round.
    ///     StoreUnreachable: a served store cannot be reached.
    #[pyo3(signature = (key, deserializer=None))]
    fn get(
        &self,
        py: Python<'_>,
        key: String,
        deserializer: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        serialized::check_deserializer(deserializer)?;
        let what = entry(self.store(), &key);
        let message = self.call(py, move |s| s.get(&key))?;
        if let Some(deserializer) = deserializer {
            let bytes = serialized::serialized_bytes(&message, &what)?;
            return serialized::deserialize(py, &bytes, deserializer);
        }
        serialized::refuse_serialized(&message, &what)?;
        Ok(Py::new(py, PyMessage::new(py, message, None, None, None)?)?.into_any())
    }

    /// Whether ``key`` holds something.
    ///
    /// Raises:
    ///     InvalidArgument: a bad key.
    ///     StoreUnreachable: a served store cannot be reached.
    fn exists(&self, py: Python<'_>, key: String) -> PyResult<bool> {
        self.call(py, move |s| s.exists(&key))
    }

    /// Removes ``key``; ``True`` when it held something. Messages already
    /// fetched stay readable; proxies of it raise :class:`NotStored`.
    ///
    /// Raises:
    ///     InvalidArgument: a bad key.
    ///     StoreUnreachable: a served store cannot be reached.
    ///     IoError: a file that cannot be removed.
    fn evict(&self, py: Python<'_>, key: String) -> PyResult<bool> {
        self.call(py, move |s| s.evict(&key))
    }

    /// Every entry, sorted by key: dicts with ``key`` and ``bytes`` (what
    /// the entry occupies).
    ///
    /// Raises:
    ///     StoreUnreachable: a served store cannot be reached.
    ///     IoError: a directory that cannot be read.
    fn list<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let entries = self.call(py, |s| s.list())?;
        let list = PyList::empty(py);
        for e in entries {
            let d = PyDict::new(py);
            d.set_item("key", e.key)?;
            d.set_item("bytes", e.bytes)?;
            list.append(d)?;
        }
        Ok(list)
    }

    /// What ``key`` holds, without fetching its tensors: a dict with
    /// ``key``, ``tensors`` (each a dict of ``name``, ``dtype``, ``shape``,
    /// ``bytes`` and ``checksum``) and ``frame_bytes``.
    ///
    /// Raises:
    ///     As :meth:`get`.
    fn manifest<'py>(&self, py: Python<'py>, key: String) -> PyResult<Bound<'py, PyAny>> {
        let manifest = self.call(py, move |s| s.manifest(&key))?;
        let value = serde_json::to_value(&manifest)
            .map_err(|e| Kind::Base.err(format!("describing the manifest: {e}")))?;
        json::to_py(py, &value)
    }

    /// A :class:`Proxy` of what ``key`` holds now.
    ///
    /// Raises:
    ///     As :meth:`get`.
    fn proxy(&self, py: Python<'_>, key: String) -> PyResult<PyProxy> {
        Ok(PyProxy::new(self.call(py, move |s| s.proxy(&key))?))
    }

    /// Serves this store on ``node``'s ``channel``, so that other processes
    /// and hosts reach it (:meth:`remote`, :meth:`open` with the node's
    /// address) and resolve its proxies. Peers must pass the node's checks
    /// (its secret) like any other.
    ///
    /// Raises:
    ///     InvalidArgument: a service already serves ``channel`` on ``node``.
    #[pyo3(signature = (node, channel="/tensorferry/store"))]
    fn serve(&self, py: Python<'_>, node: PyRef<'_, PyNode>, channel: &str) -> PyResult<()> {
        let node = node.node().clone();
        let (store, channel) = (self.store().clone(), channel.to_string());
        py.detach(move || store.serve(&node, &channel)).py()
    }

    /// This store, making proxies that name the node serving it at ``addr``
    /// on ``channel`` instead (for proxies sent to other hosts); puts and
    /// gets still go to this store directly.
    #[pyo3(signature = (addr, channel="/tensorferry/store"))]
    fn served_at(&self, addr: &str, channel: &str) -> PyResult<Self> {
        addr.parse::<tensorferry_engine::Address>().py()?;
        Ok(Self::new(self.store().served_at(addr, channel)))
    }

    fn __repr__(&self) -> String {
        format!("tensorferry.Store({:?})", self.location())
    }
}

/// Sets the most bytes the per-process cache of resolved proxies holds,
/// dropping the least recently used entries until it holds no more (0
/// turns caching off). Several proxies of one key then fetch once. The
/// default is 1 GiB, or the environment variable
/// ``TENSORFERRY_PROXY_CACHE_BYTES``.
#[pyfunction]
pub fn set_proxy_cache_limit(py: Python<'_>, bytes: u64) {
    py.detach(|| store::set_cache_limit(bytes));
}

/// The proxy cache's counters, as a dict: ``hits`` and ``misses``
/// (resolutions served from the cache, and those that fetched),
/// ``evictions`` (entries dropped to stay under the limit), ``entries`` and
/// ``bytes`` (held now), and ``limit``.
#[pyfunction]
pub fn proxy_cache_stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let s = store::cache_stats();
    let d = PyDict::new(py);
    d.set_item("hits", s.hits)?;
    d.set_item("misses", s.misses)?;
    d.set_item("evictions", s.evictions)?;
    d.set_item("entries", s.entries)?;
    d.set_item("bytes", s.bytes)?;
    d.set_item("limit", s.limit)?;
    Ok(d)
}

/// Drops every entry of the proxy cache (the counters stay).
#[pyfunction]
pub fn clear_proxy_cache(py: Python<'_>) {
    py.detach(store::clear_cache);
}

/// Sets the node through which proxies of served stores resolve when they
/// were given none (:meth:`Proxy.set_node`), and :meth:`Store.open` reaches
/// a served store without one: its secret and TLS settings are what the
/// serving node sees. Without one, a node with default settings is made on
/// first use (with the secret of the environment variable
/// ``TENSORFERRY_SECRET``, when set).
#[pyfunction]
pub fn set_store_client_node(py: Python<'_>, node: PyRef<'_, PyNode>) {
    let node = node.node().clone();
    // The node it replaces may be shut down here: without the GIL.
    py.detach(move || store::set_client_node(&node));
}

/// Whether ``value`` is a :class:`Proxy`, or the dict of one
/// (:meth:`Proxy.to_json`, as a received message's field holds it).
#[pyfunction]
pub fn is_proxy(value: &Bound<'_, PyAny>) -> bool {
    if value.cast::<PyProxy>().is_ok() {
        return true;
    }
    // As the engine's `is_proxy`: the marker field makes a proxy's JSON.
    value
        .cast::<PyDict>()
        .is_ok_and(|d| d.contains(PROXY_MARK).unwrap_or(false))
}
