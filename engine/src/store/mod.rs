//! Stores and proxies: put a message once, send a small [`Proxy`] in its
//! place, and let each consumer fetch what it touches.
//!
//! A [`Store`] keeps messages under keys, write-once (overwriting is an
//! error unless asked for). Every backend holds a message as one encoded
//! frame, exactly as it travels on a socket, so a `get` decodes it in place:
//! tensors view the frame without a copy. Backends:
//!
//! - **memory** ([`Store::memory`]): frames in this process's memory;
//! - **directory** ([`Store::dir`]): one file per key, read back by mapping
//!   it, so a `get` costs the same for 4 KiB as for 256 MiB until the bytes
//!   are touched;
//! - **served** ([`Store::serve`] on a node, [`Store::remote`] to reach it):
//!   request/reply over any transport the node speaks, authenticated like
//!   any other peer.
//!
//! A [`Proxy`] names its store, its key and what each tensor is (dtype,
//! shape, byte length, checksum); it travels as a JSON field of any message
//! ([`Proxy::to_json`], [`Proxy::from_json`]) and fetches on first use, or
//! in the background ahead of use ([`Proxy::resolve_async`]). Fetched
//! messages are kept in a per-process cache bounded in bytes
//! ([`set_cache_limit`]), so several proxies of one key fetch once.
//!
//! # Examples
//!
//! ```
//! use tensorferry_engine::store::{Proxy, Store};
//! use tensorferry_engine::{Message, Tensor};
//!
//! let dir = tempfile::tempdir()?;
//! let store = Store::dir(dir.path())?;
//! let weights = Tensor::from_slice(&[0.5f32; 1024], &[32, 32])?;
//! let proxy = store.put_proxy(&Message::new().field("step", 7).tensor("w", weights))?;
//!
//! // The proxy travels as a field; the receiver resolves it when needed.
//! let sent = Message::new().field("weights", proxy.to_json());
//! let received = Proxy::from_json(sent.get_field("weights").unwrap())?;
//! let message = received.resolve()?;
//! assert_eq!(message.get("w").map(|t| t.shape().to_vec()), Some(vec![32, 32]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod backend;
mod cache;
mod proxy;
mod served;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tensorferry_kernels::cpu::Checksum;
use tensorferry_kernels::DType;

use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::node::Node;
use crate::wire::TensorInfo;

pub use cache::{cache_limit, cache_stats, clear_cache, set_cache_limit, CacheStats};
pub use proxy::{set_client_node, Proxy};
pub use served::DEFAULT_CHANNEL;

use backend::{Backend, DirBackend, MemoryBackend};
use served::RemoteBackend;

/// The name a message stored by [`Store::put_tensor`] keeps its tensor under.
pub const TENSOR_NAME: &str = "tensor";

/// The name a message stored by [`Store::put_object`] keeps its value under.
pub const OBJECT_NAME: &str = "value";

/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 200;

/// Checks that `key` can name an entry in every backend (a file name
/// included): 1 to [`MAX_KEY_LEN`] bytes of ASCII letters, digits, `.`, `_`
/// and `-`, not starting with `.`.
///
/// # Errors
///
/// [`Error::Invalid`] saying what is wrong with the key.
pub fn check_key(key: &str) -> Result<()> {
    let bad = |what: &str| Err(Error::Invalid(format!("store key `{key}`: {what}")));
    if key.is_empty() {
        return bad("empty; a key has 1 to 200 characters");
    }
    if key.len() > MAX_KEY_LEN {
        return bad("longer than 200 bytes");
    }
    if key.starts_with('.') {
        return bad("starts with `.`");
    }
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return bad(&format!(
            "`{c}` is not allowed; use ASCII letters, digits, `.`, `_` and `-`"
        ));
    }
    Ok(())
}

/// A fresh random key: 32 hexadecimal digits.
pub fn new_key() -> String {
    let bits: u128 = rand::random();
    format!("{bits:032x}")
}

/// Where a store is, as a proxy names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Location {
    /// A memory store of this process, by name.
    Memory {
        /// The store's name, unique in its process.
        name: String,
    },
    /// A directory store, by absolute path.
    Dir {
        /// The directory.
        path: PathBuf,
    },
    /// A store served by a node at `addr`, on `channel`.
    Served {
        /// The serving node's address (`tcp://HOST:PORT`, `shm://NAME`, …).
        addr: String,
        /// The channel its store service answers on.
        channel: String,
    },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Memory { name } => write!(f, "memory:{name}"),
            Location::Dir { path } => write!(f, "dir:{}", path.display()),
            Location::Served { addr, channel } if channel == DEFAULT_CHANNEL => f.write_str(addr),
            Location::Served { addr, channel } => write!(f, "{addr}#{channel}"),
        }
    }
}

impl std::str::FromStr for Location {
    type Err = Error;

    /// `memory:NAME`, `dir:PATH` (or a plain path), or a node's address,
    /// `ADDR[#CHANNEL]` (the channel defaults to [`DEFAULT_CHANNEL`]).
    fn from_str(text: &str) -> Result<Self> {
        if let Some(name) = text.strip_prefix("memory:") {
            return Ok(Location::Memory { name: name.into() });
        }
        if let Some(path) = text.strip_prefix("dir:") {
            return Ok(Location::Dir { path: path.into() });
        }
        if text.contains("://") {
            let (addr, channel) = match text.split_once('#') {
                Some((a, c)) => (a, c),
                None => (text, DEFAULT_CHANNEL),
            };
            addr.parse::<crate::Address>()?;
            return Ok(Location::Served {
                addr: addr.into(),
                channel: channel.into(),
            });
        }
        if text.is_empty() {
            return Err(Error::Invalid(
                "an empty store location; give dir:PATH, memory:NAME or a node's address such as tcp://HOST:PORT".into(),
            ));
        }
        Ok(Location::Dir { path: text.into() })
    }
}

/// What a store holds of one tensor of a message, as a proxy carries it:
/// enough to plan where it goes before fetching it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StoredTensor {
    /// The tensor's name in the message.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Bytes, packed.
    pub bytes: u64,
    /// The checksum of its bytes, computed when it was put.
    pub checksum: Checksum,
}

/// What a store holds under one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The key.
    pub key: String,
    /// Each tensor, in message order.
    pub tensors: Vec<StoredTensor>,
    /// Bytes of the stored frame (header, fields, tensors and objects).
    pub frame_bytes: u64,
    /// A checksum of everything else the message holds: its fields, its
    /// objects (tags, JSON and their buffers' checksums) and each tensor's
    /// entry above. A key put again with other fields or objects but the
    /// same tensors differs here. `None` in proxies made without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Checksum>,
}

/// The checksum [`Manifest::content`] holds for `message` with `tensors`.
fn content_digest(message: &Message, tensors: &[StoredTensor]) -> Checksum {
    use std::io::Write;
    let mut text = Vec::new();
    // serde_json keeps object keys sorted: the same fields give the same text.
    let _ = serde_json::to_writer(&mut text, message.fields());
    for (name, object) in message.objects() {
        let _ = write!(text, "\0object\0{name}\0{}\0", object.tag);
        let _ = serde_json::to_writer(&mut text, &object.value);
        for b in &object.buffers {
            let _ = write!(
                text,
                "\0{}",
                tensorferry_kernels::cpu::checksum(b.as_slice())
            );
        }
    }
    let _ = serde_json::to_writer(&mut text, tensors);
    tensorferry_kernels::cpu::checksum(&text)
}

impl Manifest {
    /// Bytes of all tensors.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes).sum()
    }

    /// Builds a manifest from a decoded frame's message and tensor descriptors.
    fn from_frame(
        key: &str,
        message: &Message,
        infos: &[TensorInfo],
        frame_bytes: u64,
    ) -> Result<Self> {
        let tensors = message
            .tensors()
            .zip(infos)
            .map(|((name, t), info)| {
                let checksum = match info.checksum {
                    Some(c) => c,
                    None => t.checksum()?,
                };
                Ok(StoredTensor {
                    name: name.to_string(),
                    dtype: t.dtype(),
                    shape: t.shape().to_vec(),
                    bytes: info.bytes,
                    checksum,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            key: key.to_string(),
            content: Some(content_digest(message, &tensors)),
            tensors,
            frame_bytes,
        })
    }

    /// The manifest of a message a served store replied with: each tensor
    /// as it arrived, with the checksums and frame size the store's own
    /// manifest `claimed` states, checked against it (a cast on the way,
    /// or a store that describes other data than it sends, is an error).
    fn of_reply(message: &Message, claimed: &Manifest) -> Result<Self> {
        let differs = |what: String| {
            Err(Error::ProxyMismatch {
                key: claimed.key.clone(),
                what: format!("the store's reply differs from its own description: {what} (is a cast or device map set on the store's channel?)"),
            })
        };
        if message.tensors().len() != claimed.tensors.len() {
            return differs(format!(
                "{} tensor(s) arrived, {} described",
                message.tensors().len(),
                claimed.tensors.len()
            ));
        }
        let mut tensors = Vec::with_capacity(claimed.tensors.len());
        for ((name, t), c) in message.tensors().zip(&claimed.tensors) {
            let arrived = StoredTensor {
                name: name.to_string(),
                dtype: t.dtype(),
                shape: t.shape().to_vec(),
                bytes: t.size_bytes() as u64,
                checksum: c.checksum,
            };
            if &arrived != c {
                return differs(format!(
                    "tensor `{name}` arrived as {} {:?}, described as `{}` {} {:?}",
                    arrived.dtype, arrived.shape, c.name, c.dtype, c.shape
                ));
            }
            tensors.push(arrived);
        }
        let manifest = Self {
            key: claimed.key.clone(),
            content: Some(content_digest(message, &tensors)),
            tensors,
            frame_bytes: claimed.frame_bytes,
        };
        if claimed.content.is_some() && manifest.content != claimed.content {
            return differs("its fields or objects".into());
        }
        Ok(manifest)
    }

    /// Checks that what a store holds now is what `want` (a proxy's
    /// manifest) described.
    fn check_matches(&self, want: &Manifest) -> Result<()> {
        let mismatch = |what: String| {
            Err(Error::ProxyMismatch {
                key: want.key.clone(),
                what,
            })
        };
        if self.tensors.len() != want.tensors.len() {
            return mismatch(format!(
                "the proxy describes {} tensor(s), the store holds {}",
                want.tensors.len(),
                self.tensors.len()
            ));
        }
        for (have, want) in self.tensors.iter().zip(&want.tensors) {
            let what = if have.name != want.name {
                format!("tensor `{}` is now called `{}`", want.name, have.name)
            } else if have.dtype != want.dtype {
                format!(
                    "tensor `{}` is {}, the proxy says {}",
                    want.name, have.dtype, want.dtype
                )
            } else if have.shape != want.shape || have.bytes != want.bytes {
                format!(
                    "tensor `{}` has shape {:?} ({} bytes), the proxy says {:?} ({} bytes)",
                    want.name, have.shape, have.bytes, want.shape, want.bytes
                )
            } else if have.checksum != want.checksum {
                format!(
                    "tensor `{}` has checksum {}, the proxy says {} (the key was overwritten)",
                    want.name, have.checksum, want.checksum
                )
            } else {
                continue;
            };
            return mismatch(what);
        }
        if let (Some(have), Some(wanted)) = (self.content, want.content) {
            if have != wanted {
                return mismatch(
                    "its fields or objects differ from the proxy's (the key was overwritten)"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

/// One entry of a store's listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// Bytes the entry occupies (its frame).
    pub bytes: u64,
}

/// Whether a put may replace what a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overwrite {
    /// A key already present is an error ([`Error::AlreadyStored`]).
    #[default]
    Refuse,
    /// Replace it. Readers holding the old message keep reading it; proxies
    /// made before no longer resolve ([`Error::ProxyMismatch`]).
    Replace,
}

/// A store of messages under keys. Cloning shares it.
///
/// See the [module documentation](self) for the backends and an example.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Store({})", self.backend.location())
    }
}

impl Store {
    /// A new memory store of this process with a generated name. Proxies of
    /// it resolve in this process only (serve it to reach it from others).
    pub fn memory() -> Store {
        Store {
            backend: MemoryBackend::create(None),
        }
    }

    /// The memory store called `name` in this process, created when absent.
    pub fn memory_named(name: &str) -> Store {
        Store {
            backend: MemoryBackend::create(Some(name)),
        }
    }

    /// A directory store at `path` (created when absent): one file per key,
    /// read back by mapping it.
    ///
    /// # Errors
    ///
    /// When the directory cannot be created or is not a directory.
    pub fn dir(path: impl AsRef<Path>) -> Result<Store> {
        Ok(Store {
            backend: Arc::new(DirBackend::open(path.as_ref())?),
        })
    }

    /// The store served on `channel` by the node at `addr`, reached through
    /// `node` (whose secret and TLS settings apply), with a 60 s limit per
    /// call ([`with_timeout`](Self::with_timeout) changes it).
    ///
    /// # Errors
    ///
    /// A malformed address. An unreachable store shows on first use.
    pub fn remote(node: &Node, addr: &str, channel: &str) -> Result<Store> {
        addr.parse::<crate::Address>()?;
        Ok(Store {
            backend: Arc::new(RemoteBackend::new(
                node.clone(),
                addr,
                channel,
                served::DEFAULT_TIMEOUT,
            )),
        })
    }

    /// The store at `location`: a memory store of this process, a directory,
    /// or a served store reached through `node` (or, without one, the
    /// process's client node: see [`set_client_node`]).
    ///
    /// # Errors
    ///
    /// A memory store that is not in this process, a directory that cannot
    /// be opened, a malformed address.
    pub fn open(location: &Location, node: Option<&Node>) -> Result<Store> {
        let backend: Arc<dyn Backend> = match location {
            Location::Memory { name } => MemoryBackend::find(name)?,
            Location::Dir { path } => Arc::new(DirBackend::open_existing(path)?),
            Location::Served { addr, channel } => {
                let node = match node {
                    Some(n) => n.clone(),
                    None => proxy::client_node()?,
                };
                Arc::new(RemoteBackend::new(
                    node,
                    addr,
                    channel,
                    served::DEFAULT_TIMEOUT,
                ))
            }
        };
        Ok(Store { backend })
    }

    /// This store with `timeout` for each call to a served store (other
    /// backends do not wait).
    pub fn with_timeout(self, timeout: Duration) -> Store {
        match self.backend.remote() {
            Some(r) => Store {
                backend: Arc::new(r.with_timeout(timeout)),
            },
            None => self,
        }
    }

    /// Where this store is, as its proxies name it.
    pub fn location(&self) -> Location {
        self.backend.location()
    }

    /// Stores `message` under a new random key and returns the key. Its
    /// bytes are copied (or written) now: changing the tensors afterwards
    /// does not change what the store holds.
    ///
    /// # Errors
    ///
    /// A message that cannot be encoded (duplicate names, a device that
    /// cannot be read back); the backend's errors (a full disk, an
    /// unreachable store).
    pub fn put(&self, message: &Message) -> Result<String> {
        Ok(self.put_new(message)?.key)
    }

    /// Stores `message` under a new random key; what it holds there.
    fn put_new(&self, message: &Message) -> Result<Manifest> {
        self.backend.put(&new_key(), message, Overwrite::Refuse)
    }

    /// Stores `message` under `key`.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyStored`] when `key` is present and `overwrite` is
    /// [`Overwrite::Refuse`]; an invalid key ([`check_key`]); those of [`put`](Self::put).
    pub fn put_as(&self, key: &str, message: &Message, overwrite: Overwrite) -> Result<Manifest> {
        check_key(key)?;
        if overwrite == Overwrite::Replace {
            cache::forget(&self.location(), key);
        }
        self.backend.put(key, message, overwrite)
    }

    /// Stores one tensor (as a message holding it under [`TENSOR_NAME`])
    /// under a new key and returns the key; [`Proxy::tensor`] gives it back.
    ///
    /// # Errors
    ///
    /// Those of [`put`](Self::put).
    pub fn put_tensor(&self, tensor: &crate::Tensor) -> Result<String> {
        self.put(&Message::new().tensor(TENSOR_NAME, tensor.clone()))
    }

    /// Stores `message` under a new key and returns a proxy of it.
    ///
    /// # Errors
    ///
    /// Those of [`put`](Self::put).
    pub fn put_proxy(&self, message: &Message) -> Result<Proxy> {
        Ok(Proxy::new(self.location(), self.put_new(message)?))
    }

    /// Stores a value through its codec (a serializer of your own): the
    /// message holds it as the object [`OBJECT_NAME`].
    ///
    /// # Errors
    ///
    /// The codec's errors; those of [`put`](Self::put).
    pub fn put_object<C: Codec>(&self, codec: &C, value: &C::Value) -> Result<String> {
        self.put(&Message::new().object(OBJECT_NAME, codec, value)?)
    }

    /// The message under `key`; its tensors view what the store holds (a
    /// mapped file, a frame in memory, or the frame the reply came in).
    ///
    /// # Errors
    ///
    /// [`Error::NotStored`] for a key that is absent (never put, or evicted);
    /// an unreachable store; stored bytes that do not decode.
    pub fn get(&self, key: &str) -> Result<Message> {
        check_key(key)?;
        Ok(self.backend.get(key)?.0)
    }

    /// The value put by [`put_object`](Self::put_object), decoded by `codec`.
    ///
    /// # Errors
    ///
    /// Those of [`get`](Self::get); [`Error::Codec`] when the entry holds no
    /// object of the codec's tag; the codec's own errors.
    pub fn get_object<C: Codec>(&self, key: &str, codec: &C) -> Result<C::Value> {
        decode_object(&self.get(key)?, codec)
    }

    /// What the store holds under `key`, without fetching its tensors.
    ///
    /// # Errors
    ///
    /// Those of [`get`](Self::get).
    pub fn manifest(&self, key: &str) -> Result<Manifest> {
        check_key(key)?;
        self.backend.manifest(key)
    }

    /// A proxy of what `key` holds now.
    ///
    /// # Errors
    ///
    /// Those of [`manifest`](Self::manifest).
    pub fn proxy(&self, key: &str) -> Result<Proxy> {
        Ok(Proxy::new(self.location(), self.manifest(key)?))
    }

    /// Whether `key` is present.
    ///
    /// # Errors
    ///
    /// An invalid key; an unreachable store.
    pub fn exists(&self, key: &str) -> Result<bool> {
        check_key(key)?;
        self.backend.exists(key)
    }

    /// Removes `key`; true when it was present. Messages already fetched
    /// stay valid; proxies of it no longer resolve ([`Error::NotStored`]),
    /// except in another process that still caches it (what it returns is
    /// still exactly what the proxy describes).
    ///
    /// # Errors
    ///
    /// An invalid key; an unreachable store; a file that cannot be removed.
    pub fn evict(&self, key: &str) -> Result<bool> {
        check_key(key)?;
        cache::forget(&self.location(), key);
        self.backend.evict(key)
    }

    /// Every entry, sorted by key.
    ///
    /// # Errors
    ///
    /// An unreachable store; a directory that cannot be read.
    pub fn list(&self) -> Result<Vec<Entry>> {
        let mut entries = self.backend.list()?;
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(entries)
    }

    /// Serves this store on `node`'s `channel` (see [`DEFAULT_CHANNEL`]), so
    /// that other processes and hosts reach it with [`Store::remote`] and
    /// resolve its proxies. The proxies this store makes keep naming where
    /// it is; [`Store::served_at`] makes ones that name the node.
    ///
    /// # Errors
    ///
    /// When a service already serves `channel` on `node`.
    pub fn serve(&self, node: &Node, channel: &str) -> Result<()> {
        served::serve(Arc::clone(&self.backend), node, channel)
    }

    /// A view of this store whose proxies name the node serving it at
    /// `addr` on `channel`, for proxies sent to other hosts. Puts and gets
    /// still go to this store directly.
    pub fn served_at(&self, addr: &str, channel: &str) -> Store {
        Store {
            backend: Arc::new(backend::Relocated {
                inner: Arc::clone(&self.backend),
                location: Location::Served {
                    addr: addr.into(),
                    channel: channel.into(),
                },
            }),
        }
    }

    /// The message under `key` with its manifest, in one call.
    ///
    /// # Errors
    ///
    /// Those of [`get`](Self::get).
    pub fn get_entry(&self, key: &str) -> Result<(Message, Manifest)> {
        check_key(key)?;
        self.backend.get(key)
    }
}

/// Decodes the object [`OBJECT_NAME`] of `message` with `codec`.
pub(crate) fn decode_object<C: Codec>(message: &Message, codec: &C) -> Result<C::Value> {
    let object = message.get_object(OBJECT_NAME).ok_or_else(|| Error::Codec {
        tag: codec.tag().to_string(),
        what: format!("the stored message holds no object `{OBJECT_NAME}` (it was not put with put_object)"),
    })?;
    if object.tag != codec.tag() {
        return Err(Error::Codec {
            tag: codec.tag().to_string(),
            what: format!("the stored object was encoded by `{}`", object.tag),
        });
    }
    codec.decode(&object.value, &object.buffers)
}

/// A proxy's JSON marker: the field holding the format version.
pub const PROXY_MARK: &str = "tensorferry_proxy";

/// Whether a JSON value is a proxy ([`Proxy::to_json`]'s form).
pub fn is_proxy(value: &Value) -> bool {
    value.get(PROXY_MARK).is_some()
}

#[cfg(test)]
mod tests;
