//! Peers: each connection as the node sees it — what the other end
//! subscribed to, who depends on it, a delivery waiting for room — driven by
//! an I/O thread (byte connections) or by the sender (inproc); and losing one.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};

use super::publish::{LostRecord, LostSubscriber};
use super::read::{Stalled, Wait};
use super::subscribe::SubQueue;
use super::{lock, NodeInner, ALL_CHANNELS};
use crate::address::Address;
use crate::error::Error;
use crate::reactor::{Readiness, Ready, Registration, Watched};
use crate::transport::shm::slots::MappedSlot;
use crate::transport::{Connection, Lane, ReadStop, Reading};

/// One connection of a node.
pub(crate) struct Peer {
    pub(crate) id: u64,
    pub(crate) label: Arc<str>,
    pub(crate) conn: Arc<dyn Connection>,
    pub(crate) node: Weak<NodeInner>,
    alive: AtomicBool,
    /// Channels the other end subscribed to, each with its lane on this
    /// connection (none for inproc, where the other node's queues wait).
    pub(crate) wants: Mutex<HashMap<String, Option<Arc<Lane>>>>,
    /// Subscriptions made through `subscribe(addr, …)` to this peer, told when it is lost.
    pub(crate) origin: Mutex<Vec<Weak<SubQueue>>>,
    /// The address this node dialed to reach it (none for accepted ones).
    pub(crate) dialed: Option<Address>,
    /// What the read side could not deliver yet, and where it still goes.
    pub(crate) stalled: Mutex<Option<Stalled>>,
    /// Held while a stalled delivery is tried again: whoever reads the
    /// connection next (its I/O thread, or a requester leading it) waits
    /// for that try, so messages reach their queues in the order they came.
    pub(crate) retrying: Mutex<()>,
    /// Shared slots mapped so far (shm), by id.
    pub(crate) mapped: Mutex<HashMap<u32, Arc<MappedSlot>>>,
    /// When this node last answered a request of the peer, until its next
    /// request comes: what a responder's adaptive spin is measured by.
    pub(crate) replied_at: Mutex<Option<Instant>>,
    /// Runs this peer on its I/O thread soon: what a full queue calls when
    /// it has room again.
    waker: OnceLock<Waker>,
}

/// A waker that nudges a connection's I/O thread.
struct Nudge(Registration);

impl Wake for Nudge {
    fn wake(self: Arc<Self>) {
        self.0.nudge();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.nudge();
    }
}

impl Peer {
    pub(crate) fn new(
        id: u64,
        conn: Arc<dyn Connection>,
        node: Weak<NodeInner>,
        dialed: Option<Address>,
    ) -> Self {
        Self {
            id,
            label: Arc::from(conn.label()),
            conn,
            node,
            alive: AtomicBool::new(true),
            wants: Mutex::new(HashMap::new()),
            origin: Mutex::new(Vec::new()),
            dialed,
            stalled: Mutex::new(None),
            retrying: Mutex::new(()),
            mapped: Mutex::new(HashMap::new()),
            replied_at: Mutex::new(None),
            waker: OnceLock::new(),
        }
    }

    pub(crate) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Records the peer's place on its I/O thread.
    pub(crate) fn set_registration(&self, registration: Registration) {
        let _ = self
            .waker
            .set(Waker::from(Arc::new(Nudge(registration.clone()))));
        if let Some(stream) = self.conn.stream() {
            stream.set_registration(registration);
        }
    }

    /// What to wake to run this peer again (none for inproc peers, whose
    /// deliveries wait on the sender's thread).
    pub(crate) fn waker(&self) -> Option<&Waker> {
        self.waker.get()
    }

    /// Whether the other end subscribed to `channel` (or to every channel),
    /// and the lane its messages take.
    pub(crate) fn wants(&self, channel: &str) -> Option<Option<Arc<Lane>>> {
        let wants = lock(&self.wants);
        wants
            .get(channel)
            .or_else(|| wants.get(ALL_CHANNELS))
            .cloned()
    }

    /// Marks the peer dead; `false` when it already was.
    pub(crate) fn mark_lost(&self) -> bool {
        self.alive.swap(false, Ordering::AcqRel)
    }
}

/// A peer as its I/O thread drives it.
pub(crate) struct Driven(pub(crate) Arc<Peer>);

impl Watched for Driven {
    fn fd(&self) -> RawFd {
        self.0.conn.stream().map_or(-1, |s| s.link().fd())
    }

    fn ready(&self, why: Readiness) -> Ready {
        let peer = &self.0;
        let (Some(node), Some(stream)) = (peer.node.upgrade(), peer.conn.stream()) else {
            return Ready::Done;
        };
        if !peer.is_alive() {
            return Ready::Done;
        }
        // Writes first: the room the transport reported (a socket says so
        // with writability, a ring with a wake-up to read), or a nudge. A
        // failed write shuts the link down; the read below then ends.
        if why.writable || why.nudged || !stream.link().wants_writable() {
            let _ = stream.pump();
        }
        // With busy polling, and no requester of this node reading this
        // connection itself, the I/O thread polls the connection for a
        // while instead of asking its peer for a wake-up. Without it, it
        // spins only after answering a request on its own thread (an inline
        // service), as long as the node's next requests have lately come
        // that fast (`spin.rs`).
        let spin = if !node.busy_poll.is_zero() {
            node.busy_poll
        } else if lock(&peer.replied_at).is_some() {
            node.serve_spin.budget()
        } else {
            Duration::ZERO
        };
        let idle = if !spin.is_zero() && !node.awaits_reply_from(peer) {
            Ready::Spin(spin)
        } else {
            Ready::Wait
        };
        if !(why.readable || why.nudged) {
            return idle;
        }
        // A subscriber keeps the connection and comes back to it: a nudge
        // (its time not over yet) is not a reason to read it, unless a
        // delivery waits for room. Nor to spin on it; a frame begun is
        // judged once the I/O thread reads again.
        if why.nudged && stream.parked(Instant::now()) && lock(&peer.stalled).is_none() {
            stream.hold_watch(Instant::now());
            return Ready::Wait;
        }
        // A delivery that waited for room goes before anything newer.
        if !node.retry_stalled(peer) {
            stream.unwatch();
            return idle;
        }
        let stop = peer.conn.read(
            &mut |frame| node.on_frame(peer, frame, Wait::Stall),
            Reading {
                arm: idle == Ready::Wait,
                evented: why.readable,
                closed: why.closed,
            },
        );
        // Reading drained the wake-ups on the socket: one that reported
        // room to write, arriving after the pump above, is acted on here.
        if stream.link().take_room_rung() {
            let _ = stream.pump();
        }
        match stop {
            ReadStop::Idle => match node.progress {
                // What has begun of a frame must keep coming.
                Some(rule) => match stream.watch_progress(rule, Instant::now()) {
                    Ok(()) => idle,
                    Err(offence) => {
                        node.offend(peer, &offence);
                        Ready::Done
                    }
                },
                None => idle,
            },
            // Another thread reads: the frame in flight is still its
            // peer's to finish.
            ReadStop::Busy => {
                stream.hold_watch(Instant::now());
                idle
            }
            ReadStop::Stalled => {
                stream.unwatch();
                idle
            }
            ReadStop::Ended(why) => {
                node.lose(peer, &why);
                Ready::Done
            }
            ReadStop::Broken(what) => {
                node.offend(peer, &what);
                Ready::Done
            }
            ReadStop::Joined(join) => {
                node.adopt_stripe(peer, join);
                Ready::Done
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        let stream = self.0.conn.stream()?;
        match (stream.watch_due(), stream.parked_until()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn has_work(&self) -> bool {
        self.0.conn.stream().is_some_and(|s| s.link().has_input())
    }

    fn arm(&self) -> bool {
        self.0.conn.stream().is_some_and(|s| s.link().idle_read())
    }
}

impl NodeInner {
    /// Whether a requester of this node waits for a reply from `peer`.
    pub(crate) fn awaits_reply_from(&self, peer: &Peer) -> bool {
        lock(&self.pending).values().any(|p| p.peer == peer.id)
    }

    /// Marks `peer` lost: closes its connection and tells the subscriptions
    /// and requests that depended on it.
    pub(crate) fn lose(&self, peer: &Arc<Peer>, reason: &str) {
        self.drop_peer(peer, reason, &|| Error::PeerLost {
            peer: peer.label.to_string(),
            reason: reason.to_string(),
        });
    }

    /// Closes `peer`'s connection and tells what depended on it `error`.
    pub(crate) fn drop_peer(&self, peer: &Arc<Peer>, reason: &str, error: &dyn Fn() -> Error) {
        if !peer.mark_lost() {
            return;
        }
        if !self.is_closed() {
            tracing::info!(node = %self.name, peer = %peer.label, reason, "peer lost");
        }
        // What each channel's publishers had handed this peer, before the
        // connection's queue is dropped.
        let lost: Vec<LostRecord> = lock(&peer.wants)
            .iter()
            .map(|(channel, lane)| LostRecord {
                subscriber: LostSubscriber {
                    peer: peer.label.to_string(),
                    channel: channel.clone(),
                    reason: reason.to_string(),
                    written: lane.as_ref().map_or(0, |l| l.written()),
                    unsent: lane.as_ref().map_or(0, |l| l.queued() as u64),
                },
                lane: lane.clone(),
            })
            .collect();
        if !lost.is_empty() {
            let mut record = lock(&self.lost_subscribers);
            record.extend(lost);
            let over = record.len().saturating_sub(super::MAX_LOST_RECORDS);
            record.drain(..over);
        }
        peer.conn.close(reason);
        self.release_stripes(peer);
        lock(&self.peers).retain(|p| p.id != peer.id);
        self.reroute();
        self.counters.peer_lost();
        for lane in lock(&peer.wants).values().flatten() {
            lane.close();
        }
        lock(&peer.stalled).take();
        for q in lock(&peer.origin).iter().filter_map(Weak::upgrade) {
            q.force(Err(error()));
        }
        self.fail_requests_to(peer, error);
        self.subscribers_changed.notify();
    }
}
