//! Recording: [`Node::record`] writes every message the node sees on a
//! channel — published here or received — to a `file://` connection, on the
//! thread that sees it (no thread of its own), until the [`Recording`] is
//! stopped. Replaying is a subscription to the file (see
//! [`Node::subscribe`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::subscribe::Received;
use super::{lock, Node, NodeInner, ALL_CHANNELS};
use crate::address::Address;
use crate::error::{Error, Result};
use crate::transport::file::FileConn;
use crate::transport::outbox::LINK_ENCODING;
use crate::transport::{Connection, Outgoing};
use crate::wire::{encode_staged, Encoded, FrameMeta, Origin};

/// One recording as the node feeds it.
pub(crate) struct Tap {
    channel: String,
    file: FileConn,
    written: AtomicU64,
    /// The first write that failed; the recording stopped there.
    failed: Mutex<Option<String>>,
    stopped: AtomicBool,
}

impl Tap {
    fn wants(&self, channel: &str) -> bool {
        !self.stopped.load(Ordering::Acquire)
            && lock(&self.failed).is_none()
            && (self.channel == ALL_CHANNELS || self.channel == channel)
    }

    fn write(&self, frame: Arc<Encoded>) {
        match self.file.send(Outgoing::Frame(frame), None) {
            Ok(()) => {
                self.written.fetch_add(1, Ordering::Relaxed);
            }
            Err(why) => {
                tracing::warn!(file = self.file.label(), error = %why, "recording stopped");
                lock(&self.failed).get_or_insert(why);
            }
        }
    }

    /// Stops taking messages (those being written finish).
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }
}

/// A recording started by [`Node::record`]; dropping it stops it too.
pub struct Recording {
    tap: Arc<Tap>,
    node: std::sync::Weak<NodeInner>,
    done: bool,
}

impl std::fmt::Debug for Recording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording")
            .field("file", &self.tap.file.label())
            .field("channel", &self.tap.channel)
            .field("written", &self.tap.written.load(Ordering::Relaxed))
            .finish()
    }
}

impl Node {
    /// Records every message this node sees on `channel` ([`ALL_CHANNELS`]
    /// for all) — published here or received from peers — to `addr`, a
    /// `file://PATH` (created, or replaced), until the returned handle is
    /// stopped or dropped; then the file is synced. Device tensors are read
    /// back, and the channel's wire casts and checksums applied, as for a
    /// socket. Replay it with [`Node::subscribe`]`(addr, channel)`.
    ///
    /// # Errors
    ///
    /// An address that is not `file://`, or a file that cannot be created.
    pub fn record(&self, addr: &str, channel: impl Into<String>) -> Result<Recording> {
        let addr: Address = addr.parse()?;
        let Address::File(path) = &addr else {
            return Err(Error::Invalid(format!(
                "record to a file://PATH, not {addr}"
            )));
        };
        let tap = Arc::new(Tap {
            channel: channel.into(),
            file: FileConn::record(path)?,
            written: AtomicU64::new(0),
            failed: Mutex::new(None),
            stopped: AtomicBool::new(false),
        });
        lock(&self.inner.taps).push(Arc::clone(&tap));
        self.inner.reroute();
        Ok(Recording {
            tap,
            node: Arc::downgrade(&self.inner),
            done: false,
        })
    }
}

impl NodeInner {
    /// Whether a recording takes `channel`.
    pub(crate) fn records(&self, channel: &str) -> bool {
        lock(&self.taps).iter().any(|t| t.wants(channel))
    }

    fn taps_for(&self, channel: &str) -> Vec<Arc<Tap>> {
        lock(&self.taps)
            .iter()
            .filter(|t| t.wants(channel))
            .cloned()
            .collect()
    }

    /// Records a frame published here (already prepared as for a socket).
    pub(crate) fn tap_frame(&self, channel: &str, frame: &Arc<Encoded>) {
        for tap in self.taps_for(channel) {
            tap.write(Arc::clone(frame));
        }
    }

    /// Records a message received from a peer as it came, with what its
    /// sender said of each tensor (device, dtype before the wire cast,
    /// checksum, still to be verified).
    pub(crate) fn tap_received(&self, r: &Received) {
        let taps = self.taps_for(&r.channel);
        if taps.is_empty() {
            return;
        }
        let meta = FrameMeta::message(r.channel.clone(), r.seq);
        let origins: Vec<Origin> = r
            .tensors
            .iter()
            .map(|i| Origin {
                device: i.device,
                cast_from: i.cast_from,
                checksum: i.checksum,
            })
            .collect();
        let frame = match encode_staged(&r.message, &origins, &meta, LINK_ENCODING) {
            Ok(f) => Arc::new(f),
            Err(e) => {
                for tap in taps {
                    lock(&tap.failed).get_or_insert(e.to_string());
                }
                return;
            }
        };
        for tap in taps {
            tap.write(Arc::clone(&frame));
        }
    }
}

impl Recording {
    /// Stops recording: syncs the file and returns how many messages it holds.
    ///
    /// # Errors
    ///
    /// The first write or encode error (recording stopped there), or a sync
    /// that fails.
    pub fn stop(mut self) -> Result<u64> {
        self.finish()
    }

    fn finish(&mut self) -> Result<u64> {
        if std::mem::replace(&mut self.done, true) {
            return Ok(self.tap.written.load(Ordering::Relaxed));
        }
        self.tap.stop();
        if let Some(node) = self.node.upgrade() {
            lock(&node.taps).retain(|t| !Arc::ptr_eq(t, &self.tap));
            node.reroute();
        }
        if let Some(why) = lock(&self.tap.failed).clone() {
            return Err(Error::Invalid(format!(
                "recording to {} stopped: {why}",
                self.tap.file.label()
            )));
        }
        self.tap.file.sync()?;
        Ok(self.tap.written.load(Ordering::Relaxed))
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::warn!(error = %e, "recording stopped");
        }
    }
}
