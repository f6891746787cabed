//! [`Proxy`]: a small reference to what a store holds under a key, that
//! fetches on first use or ahead of it.

use std::sync::{Arc, Condvar, Mutex, OnceLock};

use serde_json::{json, Value};

use super::cache::{self, CacheKey};
use super::{check_key, Location, Manifest, Store, StoredTensor, PROXY_MARK};
use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::node::{lock, Node};
use crate::tensor::{packed_bytes, Tensor};

/// The version of a proxy's JSON form.
const FORMAT: u64 = 1;

/// Most tensors a proxy may describe.
const MAX_TENSORS: usize = 65_536;

/// The node served stores are reached through when a proxy has none.
fn client() -> &'static Mutex<Option<Node>> {
    static CLIENT: OnceLock<Mutex<Option<Node>>> = OnceLock::new();
    CLIENT.get_or_init(Mutex::default)
}

/// Sets the node through which proxies of served stores resolve when they
/// were given none ([`Proxy::set_node`]): its secret and TLS settings are
/// what a served store sees. Without one, a node with default settings is
/// made on first use (with the shared secret of the environment variable
/// `TENSORFERRY_SECRET`, when set).
pub fn set_client_node(node: &Node) {
    *lock(client()) = Some(node.clone());
}

/// The process's client node, made on first use when none was set.
pub(crate) fn client_node() -> Result<Node> {
    let mut slot = lock(client());
    if let Some(node) = slot.as_ref() {
        return Ok(node.clone());
    }
    let mut builder = Node::builder().name("proxy-client");
    if std::env::var_os("TENSORFERRY_SECRET").is_some() {
        builder = builder.secret(crate::Secret::from_env("TENSORFERRY_SECRET")?);
    }
    let node = builder.build()?;
    *slot = Some(node.clone());
    Ok(node)
}

enum Slot {
    Idle,
    Fetching,
    Done(Message),
    Failed(Error),
}

struct Inner {
    location: Location,
    manifest: Manifest,
    node: Mutex<Option<Node>>,
    slot: Mutex<Slot>,
    changed: Condvar,
}

/// A fetch in progress: ends with its outcome, or, if the fetch panicked,
/// with the proxy idle again (so waiters wake and the next call fetches).
struct Fetching<'a>(&'a Inner);

impl Fetching<'_> {
    fn end(self, outcome: Slot) {
        *lock(&self.0.slot) = outcome;
        self.0.changed.notify_all();
        std::mem::forget(self);
    }
}

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        *lock(&self.0.slot) = Slot::Idle;
        self.0.changed.notify_all();
    }
}

/// A reference to what a [`Store`] holds under a key: the store's
/// location, the key, and each tensor's dtype, shape, byte length and
/// checksum, so a receiver can plan before fetching. It travels as a JSON
/// field of any message ([`to_json`](Self::to_json)); [`resolve`](Self::resolve)
/// fetches on first use, [`resolve_async`](Self::resolve_async) starts
/// the fetch in the background. Clones share one fetch.
///
/// Resolving checks that the store still holds what the proxy describes
/// (names, dtypes, shapes, lengths and the checksums recorded at put):
/// an evicted key, an unreachable store or other bytes under the key are
/// errors, never a wrong tensor. A proxy names where to fetch from, so
/// resolve only proxies from peers you trust to name stores.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Proxy({} {})",
            self.inner.location, self.inner.manifest.key
        )
    }
}

impl Proxy {
    pub(crate) fn new(location: Location, manifest: Manifest) -> Proxy {
        Proxy {
            inner: Arc::new(Inner {
                location,
                manifest,
                node: Mutex::new(None),
                slot: Mutex::new(Slot::Idle),
                changed: Condvar::new(),
            }),
        }
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.inner.manifest.key
    }

    /// Where the store is.
    pub fn location(&self) -> &Location {
        &self.inner.location
    }

    /// What the store held under the key when the proxy was made.
    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }

    /// The tensors the proxy describes.
    pub fn tensors(&self) -> &[StoredTensor] {
        &self.inner.manifest.tensors
    }

    /// Resolves a served store's proxy through `node` instead of the
    /// process's client node ([`set_client_node`]).
    pub fn set_node(&self, node: &Node) {
        *lock(&self.inner.node) = Some(node.clone());
    }

    /// The proxy as JSON, to travel as a field of a message.
    pub fn to_json(&self) -> Value {
        json!({
            PROXY_MARK: FORMAT,
            "store": self.inner.location,
            "key": self.inner.manifest.key,
            "tensors": self.inner.manifest.tensors,
            "frame_bytes": self.inner.manifest.frame_bytes,
            "content": self.inner.manifest.content,
        })
    }

    /// A proxy from [`to_json`](Self::to_json)'s form, checked as input
    /// from a peer.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] saying what is wrong: not a proxy, another
    /// format version, a bad key, a tensor whose byte length does not
    /// follow from its dtype and shape.
    pub fn from_json(value: &Value) -> Result<Proxy> {
        let bad = |what: String| Error::Invalid(format!("not a valid proxy: {what}"));
        match value.get(PROXY_MARK).and_then(Value::as_u64) {
            Some(FORMAT) => {}
            Some(v) => {
                return Err(bad(format!(
                    "format version {v}; this build reads version {FORMAT}"
                )))
            }
            None => return Err(bad(format!("no `{PROXY_MARK}` version field"))),
        }
        let location: Location =
            serde_json::from_value(value.get("store").cloned().unwrap_or(Value::Null))
                .map_err(|e| bad(format!("`store`: {e}")))?;
        let key = value
            .get("key")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no `key`".into()))?
            .to_string();
        check_key(&key)?;
        let tensors = value
            .get("tensors")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no `tensors` list".into()))?;
        if tensors.len() > MAX_TENSORS {
            return Err(bad(format!(
                "{} tensors, more than {MAX_TENSORS}",
                tensors.len()
            )));
        }
        let tensors: Vec<StoredTensor> = tensors
            .iter()
            .map(|t| serde_json::from_value(t.clone()).map_err(|e| bad(format!("a tensor: {e}"))))
            .collect::<Result<_>>()?;
        for t in &tensors {
            let want = packed_bytes(t.dtype, &t.shape)
                .map_err(|e| bad(format!("tensor `{}`: {e}", t.name)))?;
            if want as u64 != t.bytes {
                return Err(bad(format!(
                    "tensor `{}` says {} bytes, but {} {:?} is {want}",
                    t.name, t.bytes, t.dtype, t.shape
                )));
            }
        }
        let frame_bytes = value
            .get("frame_bytes")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let content = match value.get("content") {
            None | Some(Value::Null) => None,
            Some(c) => Some(
                serde_json::from_value(c.clone()).map_err(|e| bad(format!("`content`: {e}")))?,
            ),
        };
        Ok(Proxy::new(
            location,
            Manifest {
                key,
                tensors,
                frame_bytes,
                content,
            },
        ))
    }

    /// Whether the message has been fetched (and checked).
    pub fn is_resolved(&self) -> bool {
        matches!(*lock(&self.inner.slot), Slot::Done(_))
    }

    /// The message, fetched on first use (or taken from the process's
    /// cache, or from a fetch [`resolve_async`](Self::resolve_async)
    /// started) and kept: later calls return it at once. Its tensors are
    /// on the host, viewing what the store returned; see
    /// [`resolve_to`](Self::resolve_to) to land them where a channel's map
    /// says.
    ///
    /// # Errors
    ///
    /// [`Error::NotStored`] for a key no longer there, [`Error::StoreUnreachable`],
    /// [`Error::ProxyMismatch`] when the store holds other data under the
    /// key; a memory store of another process. A failed fetch is tried
    /// again by the next call.
    pub fn resolve(&self) -> Result<Message> {
        let mut slot = lock(&self.inner.slot);
        loop {
            match &*slot {
                Slot::Done(m) => return Ok(m.clone()),
                Slot::Fetching => {
                    slot = self
                        .inner
                        .changed
                        .wait(slot)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                Slot::Failed(_) => {
                    let Slot::Failed(e) = std::mem::replace(&mut *slot, Slot::Idle) else {
                        unreachable!("matched Failed above")
                    };
                    return Err(e);
                }
                Slot::Idle => {
                    *slot = Slot::Fetching;
                    drop(slot);
                    let fetching = Fetching(&self.inner);
                    let fetched = self.fetch();
                    fetching.end(match &fetched {
                        Ok(m) => Slot::Done(m.clone()),
                        Err(_) => Slot::Idle,
                    });
                    return fetched;
                }
            }
        }
    }

    /// Starts fetching in the background and returns at once; a later
    /// [`resolve`](Self::resolve) waits for that fetch (and reports its
    /// error). Does nothing when the proxy is resolved or being fetched.
    pub fn resolve_async(&self) {
        let mut slot = lock(&self.inner.slot);
        if !matches!(*slot, Slot::Idle) {
            return;
        }
        *slot = Slot::Fetching;
        drop(slot);
        let me = self.clone();
        let started = std::thread::Builder::new()
            .name("tf-proxy-fetch".into())
            .spawn(move || {
                let fetching = Fetching(&me.inner);
                fetching.end(match me.fetch() {
                    Ok(m) => Slot::Done(m),
                    Err(e) => Slot::Failed(e),
                });
            });
        if started.is_err() {
            // No thread to fetch on: the next resolve fetches itself.
            *lock(&self.inner.slot) = Slot::Idle;
            self.inner.changed.notify_all();
        }
    }

    /// The message landed as if it had arrived on `node`'s `channel`: each
    /// tensor on the device that channel's map names.
    ///
    /// # Errors
    ///
    /// Those of [`resolve`](Self::resolve); a device the map names that
    /// this host lacks.
    pub fn resolve_to(&self, node: &Node, channel: &str) -> Result<Message> {
        node.land_on(channel, self.resolve()?)
    }

    /// The one tensor of a proxy made of one tensor (a proxy then behaves
    /// as the tensor).
    ///
    /// # Errors
    ///
    /// Those of [`resolve`](Self::resolve); [`Error::Invalid`] when the
    /// proxy describes more or fewer than one tensor.
    pub fn tensor(&self) -> Result<Tensor> {
        let message = self.resolve()?;
        let mut tensors = message.tensors();
        match (tensors.next(), tensors.next()) {
            (Some((_, t)), None) => Ok(t.clone()),
            _ => Err(Error::Invalid(format!(
                "proxy `{}` holds {} tensors; take one by name from resolve()",
                self.key(),
                message.tensors().len()
            ))),
        }
    }

    /// The value stored by [`Store::put_object`], decoded by `codec`.
    ///
    /// # Errors
    ///
    /// Those of [`resolve`](Self::resolve) and [`Store::get_object`].
    pub fn resolve_object<C: Codec>(&self, codec: &C) -> Result<C::Value> {
        super::decode_object(&self.resolve()?, codec)
    }

    /// Resolves, then recomputes each tensor's checksum from the bytes
    /// themselves (reading every byte, which [`resolve`](Self::resolve)
    /// does not) and compares it with the proxy's.
    ///
    /// # Errors
    ///
    /// Those of [`resolve`](Self::resolve); [`Error::ProxyMismatch`] naming
    /// the first tensor whose bytes differ.
    pub fn verify(&self) -> Result<Message> {
        let message = self.resolve()?;
        for ((name, t), want) in message.tensors().zip(&self.inner.manifest.tensors) {
            let got = t.checksum()?;
            if got != want.checksum {
                return Err(Error::ProxyMismatch {
                    key: self.key().to_string(),
                    what: format!(
                        "the bytes of tensor `{name}` give checksum {got}, the proxy says {}",
                        want.checksum
                    ),
                });
            }
        }
        Ok(message)
    }

    /// One fetch: from the cache, else from the store, checked against the manifest.
    fn fetch(&self) -> Result<Message> {
        let inner = &self.inner;
        let cache_key = CacheKey::new(&inner.location, &inner.manifest);
        if let Some(message) = cache::lookup(&cache_key) {
            return Ok(message);
        }
        let node = lock(&inner.node).clone();
        let store = Store::open(&inner.location, node.as_ref())?;
        let (message, manifest) = store.get_entry(&inner.manifest.key)?;
        manifest.check_matches(&inner.manifest)?;
        let bytes = manifest.frame_bytes.max(manifest.tensor_bytes());
        cache::insert(cache_key, &message, bytes);
        Ok(message)
    }
}
