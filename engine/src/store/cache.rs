//! The per-process cache of resolved proxies, bounded in bytes, least
//! recently used first out.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use super::{Location, Manifest, StoredTensor};
use crate::message::Message;
use crate::node::lock;
use tensorferry_kernels::cpu::Checksum;

/// The cache's limit unless [`set_cache_limit`] or the environment variable
/// `TENSORFERRY_PROXY_CACHE_BYTES` says otherwise: 1 GiB.
pub const DEFAULT_CACHE_BYTES: u64 = 1 << 30;

/// The cache's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    /// Resolutions served from the cache.
    pub hits: u64,
    /// Resolutions that fetched.
    pub misses: u64,
    /// Entries dropped to stay under the limit.
    pub evictions: u64,
    /// Entries held now.
    pub entries: usize,
    /// Bytes held now.
    pub bytes: u64,
    /// The limit.
    pub limit: u64,
}

/// An entry is one store's key as one manifest described it: a key put
/// again with other bytes is another entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey {
    location: Location,
    key: String,
    tensors: Vec<StoredTensor>,
    content: Option<Checksum>,
}

impl CacheKey {
    pub(crate) fn new(location: &Location, manifest: &Manifest) -> Self {
        Self {
            location: location.clone(),
            key: manifest.key.clone(),
            tensors: manifest.tensors.clone(),
            content: manifest.content,
        }
    }
}

struct Cached {
    message: Message,
    bytes: u64,
    used: u64,
}

struct State {
    entries: HashMap<CacheKey, Cached>,
    clock: u64,
    stats: CacheStats,
}

fn state() -> &'static Mutex<State> {
    static CACHE: OnceLock<Mutex<State>> = OnceLock::new();
    CACHE.get_or_init(|| {
        let limit = std::env::var("TENSORFERRY_PROXY_CACHE_BYTES")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_CACHE_BYTES);
        Mutex::new(State {
            entries: HashMap::new(),
            clock: 0,
            stats: CacheStats {
                limit,
                ..CacheStats::default()
            },
        })
    })
}

impl State {
    fn shrink_to(&mut self, limit: u64) {
        while self.stats.bytes > limit {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, c)| c.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(gone) = self.entries.remove(&oldest) {
                self.stats.bytes -= gone.bytes;
                self.stats.evictions += 1;
            }
        }
        self.stats.entries = self.entries.len();
    }
}

/// Sets the cache's limit in bytes, dropping least recently used entries
/// until it holds no more (0 turns caching off).
pub fn set_cache_limit(bytes: u64) {
    let mut s = lock(state());
    s.stats.limit = bytes;
    s.shrink_to(bytes);
}

/// The cache's limit in bytes.
pub fn cache_limit() -> u64 {
    lock(state()).stats.limit
}

/// The cache's counters.
pub fn cache_stats() -> CacheStats {
    lock(state()).stats
}

/// Drops every entry (the counters stay).
pub fn clear_cache() {
    let mut s = lock(state());
    s.shrink_to(0);
}

/// The cached message for `key`, counting a hit or a miss.
pub(crate) fn lookup(key: &CacheKey) -> Option<Message> {
    let mut s = lock(state());
    s.clock += 1;
    let now = s.clock;
    let found = s.entries.get_mut(key).map(|c| {
        c.used = now;
        c.message.clone()
    });
    if found.is_some() {
        s.stats.hits += 1;
    } else {
        s.stats.misses += 1;
    }
    found
}

/// Keeps `message` (`bytes` long) under `key`, making room by dropping the
/// least recently used; a message larger than the limit is not kept.
pub(crate) fn insert(key: CacheKey, message: &Message, bytes: u64) {
    let mut s = lock(state());
    let limit = s.stats.limit;
    if bytes > limit {
        return;
    }
    s.clock += 1;
    let used = s.clock;
    if let Some(old) = s.entries.insert(
        key,
        Cached {
            message: message.clone(),
            bytes,
            used,
        },
    ) {
        s.stats.bytes -= old.bytes;
    }
    s.stats.bytes += bytes;
    s.shrink_to(limit);
}

/// Drops every entry of `location`'s `key` (it was evicted or replaced
/// through this process).
pub(crate) fn forget(location: &Location, key: &str) {
    let mut s = lock(state());
    let before = s.entries.len();
    let mut freed = 0;
    s.entries.retain(|k, c| {
        let keep = !(k.key == key && &k.location == location);
        if !keep {
            freed += c.bytes;
        }
        keep
    });
    s.stats.bytes -= freed;
    if s.entries.len() != before {
        s.stats.entries = s.entries.len();
    }
}
