//! Counters a user can read, per node and per channel: [`Node::stats`] and
//! [`Node::channel_stats`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{lock, Node};

/// What a node has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeStats {
    /// Messages received from peers, requests to this node's services
    /// included.
    pub messages_received: u64,
    /// Bytes of the frames those came in.
    pub bytes_received: u64,
    /// Messages handed to peers' connections (one per peer reached).
    pub messages_sent: u64,
    /// Bytes of the frames those went in.
    pub bytes_sent: u64,
    /// Messages dropped under `drop_oldest`: this node's subscriptions and
    /// its connections' queues.
    pub dropped: u64,
    /// Connections closed because the peer broke the protocol.
    pub rejected: u64,
    /// Connections open now.
    pub peers: u64,
    /// Connections lost since the start.
    pub peers_lost: u64,
    /// Messages sent in parts over a tcp connection and its stripes (see
    /// the channel setting `stripes`).
    pub striped: u64,
}

/// What a node has done on one channel since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChannelStats {
    /// Messages received from peers, requests to this node's services
    /// included.
    pub messages_received: u64,
    /// Bytes of the frames those came in.
    pub bytes_received: u64,
    /// Messages handed to peers' connections.
    pub messages_sent: u64,
    /// Bytes of the frames those went in.
    pub bytes_sent: u64,
}

/// One channel's counters (a publisher keeps its channel's).
#[derive(Default)]
pub(crate) struct ChannelCounters {
    messages_received: AtomicU64,
    bytes_received: AtomicU64,
    messages_sent: AtomicU64,
    bytes_sent: AtomicU64,
}

/// The node's counters; updated without locks on the hot paths once a
/// channel has been seen.
#[derive(Default)]
pub(crate) struct Counters {
    messages_received: AtomicU64,
    bytes_received: AtomicU64,
    messages_sent: AtomicU64,
    bytes_sent: AtomicU64,
    rejected: AtomicU64,
    striped: AtomicU64,
    peers: AtomicU64,
    peers_lost: AtomicU64,
    channels: Mutex<HashMap<String, Arc<ChannelCounters>>>,
}

impl Counters {
    pub(crate) fn channel(&self, name: &str) -> Arc<ChannelCounters> {
        let mut channels = lock(&self.channels);
        if let Some(c) = channels.get(name) {
            return Arc::clone(c);
        }
        let c = Arc::new(ChannelCounters::default());
        channels.insert(name.to_string(), Arc::clone(&c));
        c
    }

    pub(crate) fn received(&self, channel: &str, bytes: u64) {
        self.messages_received.fetch_add(1, Ordering::Relaxed);
        self.bytes_received.fetch_add(bytes, Ordering::Relaxed);
        let c = self.channel(channel);
        c.messages_received.fetch_add(1, Ordering::Relaxed);
        c.bytes_received.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A message handed to a peer's connection on the channel of `c`.
    pub(crate) fn sent(&self, c: &ChannelCounters, bytes: u64) {
        self.messages_sent.fetch_add(1, Ordering::Relaxed);
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        c.messages_sent.fetch_add(1, Ordering::Relaxed);
        c.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn striped(&self) {
        self.striped.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn peer_added(&self) {
        self.peers.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn peer_lost(&self) {
        self.peers_lost.fetch_add(1, Ordering::Relaxed);
    }
}

impl Node {
    /// The node's counters now.
    ///
    /// # Examples
    ///
    /// ```
    /// use tensorferry_engine::Node;
    ///
    /// let node = Node::builder().build()?;
    /// assert_eq!(node.stats().peers, 0);
    /// # Ok::<(), tensorferry_engine::Error>(())
    /// ```
    pub fn stats(&self) -> NodeStats {
        let c = &self.inner.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let local_drops: u64 = lock(&self.inner.subs)
            .values()
            .flatten()
            .map(|q| q.dropped())
            .sum();
        let lane_drops: u64 = self
            .inner
            .live_peers()
            .iter()
            .flat_map(|p| {
                lock(&p.wants)
                    .values()
                    .flatten()
                    .map(|l| l.dropped())
                    .collect::<Vec<_>>()
            })
            .sum();
        NodeStats {
            messages_received: load(&c.messages_received),
            bytes_received: load(&c.bytes_received),
            messages_sent: load(&c.messages_sent),
            bytes_sent: load(&c.bytes_sent),
            dropped: local_drops + lane_drops,
            rejected: load(&c.rejected),
            peers: self.inner.live_peers().len() as u64,
            peers_lost: load(&c.peers_lost),
            striped: load(&c.striped),
        }
    }

    /// The node's counters for `channel` now (zeros for a channel it has not seen).
    pub fn channel_stats(&self, channel: &str) -> ChannelStats {
        let Some(c) = lock(&self.inner.counters.channels).get(channel).cloned() else {
            return ChannelStats::default();
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ChannelStats {
            messages_received: load(&c.messages_received),
            bytes_received: load(&c.bytes_received),
            messages_sent: load(&c.messages_sent),
            bytes_sent: load(&c.bytes_sent),
        }
    }
}
