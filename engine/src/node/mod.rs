//! [`Node`]: owns connections and channels; publishes, subscribes, serves and requests.
//!
//! A node listens on any number of addresses and connects to others. Every
//! connection (a *peer*) carries all channels in both directions. A
//! subscription on a node asks every peer for its channel; a publisher sends
//! to the node's own subscriptions and to every peer that asked. Each
//! subscriber has a bounded queue with the channel's overflow policy (`block`
//! the publisher, or `drop_oldest` and count), so memory never grows without
//! bound. A lost connection is reported to the subscriptions and requests that
//! depended on it; the node and its other peers carry on.
//!
//! The node's rooms, in the order a message meets them:
//!
//! | room | what it does |
//! |---|---|
//! | [`builder`] | [`NodeBuilder`]: settings, checked once in `build` |
//! | [`connect`] | listening, accepting, connecting: a connection becomes a [`peers::Peer`] |
//! | [`publish`] | [`Publisher`] and [`Loan`]: one message to every subscriber |
//! | [`peers`] | each connection as the node sees it, driven by an I/O thread; losing one |
//! | [`read`] | the read path: each frame a peer sends, to where it goes |
//! | [`subscribe`] | [`Subscription`]: a channel's messages, landed on their devices |
//! | [`services`] | [`Node::serve`], [`Node::request`], the worker pool |
//! | [`stripes`] | setting up the stripes a tcp connection sends large frames over |
//! | [`record`] | [`Recording`], and replaying a recording |
//! | [`stats`] | counters a user can read |

mod builder;
mod connect;
mod peers;
mod publish;
mod read;
mod record;
mod services;
mod stats;
mod stripes;
mod subscribe;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tensorferry_device_map::{ChannelConfig, ChannelSpec, Device, Inventory};

use crate::address::Address;
use crate::delivery::{Delivery, Direction};
use crate::error::Result;
use crate::message::Message;
use crate::pool::BufferPool;
use crate::reactor::{Reactor, Registration};
use crate::signal::Signal;
use crate::transport::shm::slots::SlotPool;
use crate::transport::Listener;
use crate::wire::{Limits, TensorInfo};

pub use builder::NodeBuilder;
pub use publish::{Loan, LostSubscriber, Publisher, SendFuture, SubscribersFuture};
pub use record::Recording;
pub use services::RequestFuture;
pub use stats::{ChannelStats, NodeStats};
pub use subscribe::{Received, RecvFuture, Subscription};

use peers::Peer;
use services::{Pending, ServiceSlot, Workers};
use stats::Counters;
use subscribe::SubQueue;

/// The channel name that subscribes to every channel.
pub const ALL_CHANNELS: &str = "*";

/// How many lost subscribers a node remembers for its publishers.
const MAX_LOST_RECORDS: usize = 4096;

/// Locks a mutex whose data stays consistent even if a holder panicked
/// (every critical section here leaves it whole).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A listener and its place on an I/O thread.
struct Listening {
    listener: Arc<dyn Listener>,
    registration: Option<Registration>,
}

/// What every room of a node shares.
pub(crate) struct NodeInner {
    name: String,
    config: ChannelConfig,
    limits: Limits,
    pool: BufferPool,
    connect_timeout: Duration,
    /// How long an I/O thread spins after a frame (zero unless `busy_poll`).
    busy_poll: Duration,
    /// How long a requester spins for its reply before it sleeps.
    reply_spin: crate::spin::Spin,
    /// How long an I/O thread that answered a request spins for the next
    /// one (adaptive only without `busy_poll`).
    serve_spin: crate::spin::Spin,
    /// How fast a begun frame must keep arriving; `None`: no check.
    progress: Option<crate::transport::stream::ProgressRule>,
    /// Other users whose processes may connect over `shm://`.
    shm_uids: Vec<u32>,
    /// The secret tcp peers must prove they know.
    secret: Option<crate::transport::auth::Secret>,
    /// TLS for every tcp connection.
    tls: Option<Arc<crate::transport::tls::Tls>>,
    inventory: Option<Arc<Inventory>>,
    /// Each channel's delivery rules: forward (messages, requests) and reply.
    deliveries: Mutex<HashMap<String, [Option<Arc<Delivery>>; 2]>>,
    listening: Mutex<Vec<Listening>>,
    subs: Mutex<HashMap<String, Vec<Arc<SubQueue>>>>,
    peers: Mutex<Vec<Arc<Peer>>>,
    services: Mutex<HashMap<String, Arc<ServiceSlot>>>,
    pending: Mutex<HashMap<u64, Pending>>,
    /// Recordings: channel and the file each writes to.
    taps: Mutex<Vec<Arc<record::Tap>>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    slots: SlotPool,
    reactor: Mutex<Option<Reactor>>,
    workers: Workers,
    /// Told whenever subscribers come or go (here or at a peer).
    subscribers_changed: Signal,
    /// Counts changes to whom a published message goes (subscribers here
    /// or at peers, peers lost, recordings): publishers keep the route they
    /// worked out until it moves.
    routes: AtomicU64,
    /// Subscribers lost with their connection, oldest first (the last
    /// [`MAX_LOST_RECORDS`]), with their index since the node started.
    lost_subscribers: Mutex<Vec<publish::LostRecord>>,
    counters: Counters,
    /// Tokens given out for stripes to join tcp connections with.
    stripes: stripes::StripeBook,
    /// This node, for what must hold a reference back (connections' handlers).
    me: Weak<NodeInner>,
}

/// Shuts the node down when the last user-facing handle is dropped.
struct Guard(Arc<NodeInner>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// Owns connections and channels.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tensorferry_engine::{Message, Node, Tensor};
///
/// let server = Node::builder().name("camera").listen("tcp://127.0.0.1:0").build()?;
/// let addr = server.listen_addrs()[0].to_string(); // the port picked
/// let client = Node::builder().name("viewer").build()?;
/// let frames = client.subscribe(&addr, "/camera")?;
/// let publisher = server.publisher("/camera");
/// publisher.wait_for_subscribers(1, Duration::from_secs(5))?;
/// publisher.send(Message::new().tensor("image", Tensor::from_slice(&[1u8, 2, 3], &[3])?))?;
/// let got = frames.recv()?;
/// assert_eq!(got.message.get("image").map(|t| t.shape().to_vec()), Some(vec![3]));
/// # Ok::<(), tensorferry_engine::Error>(())
/// ```
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
    guard: Arc<Guard>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.inner.name)
            .field("listening", &self.listen_addrs())
            .field("peers", &self.peer_count())
            .finish()
    }
}

impl Node {
    /// Starts building a node.
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The addresses the node listens on, with ports resolved (`tcp://…:0` becomes the port picked).
    pub fn listen_addrs(&self) -> Vec<Address> {
        lock(&self.inner.listening)
            .iter()
            .map(|l| l.listener.address())
            .collect()
    }

    /// Connects to `addr` (if not yet connected), retrying with backoff up
    /// to the connect timeout.
    ///
    /// # Errors
    ///
    /// A malformed or unreachable address.
    pub fn connect(&self, addr: &str) -> Result<()> {
        let addr: Address = addr.parse()?;
        self.inner.connect(&addr).map(drop)
    }

    /// Number of live connections.
    pub fn peer_count(&self) -> usize {
        self.inner.live_peers().len()
    }

    /// The rules of `channel` on this node: its configured spec, or the
    /// default one.
    pub fn channel_spec(&self, channel: &str) -> ChannelSpec {
        self.inner.spec(channel)
    }

    /// `message` landed as if it had arrived on `channel`: each tensor moved
    /// to the device the channel's map names for its device (casts and the
    /// map's other rules included). Used for messages that reach this
    /// process some other way, such as a resolved store proxy.
    ///
    /// # Errors
    ///
    /// A map that names a device this host lacks; a failed copy or cast.
    pub fn land_on(&self, channel: &str, message: Message) -> Result<Message> {
        self.inner.land(channel, Direction::Forward, message, &[])
    }

    /// Closes every connection and listener and stops every service (running its `fini`).
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

impl NodeInner {
    fn spec(&self, channel: &str) -> ChannelSpec {
        self.config.get(channel).cloned().unwrap_or_default()
    }

    /// The delivery rules of `channel` for messages travelling `direction`.
    fn delivery(&self, channel: &str, direction: Direction) -> Result<Arc<Delivery>> {
        let slot = match direction {
            Direction::Forward => 0,
            Direction::Reply => 1,
        };
        // Looked up by &str: no allocation on the request path.
        if let Some(d) = lock(&self.deliveries)
            .get(channel)
            .and_then(|pair| pair[slot].as_ref())
        {
            return Ok(Arc::clone(d));
        }
        let delivery = Arc::new(Delivery::new(
            &self.spec(channel),
            direction,
            self.inventory.clone(),
        )?);
        lock(&self.deliveries)
            .entry(channel.to_string())
            .or_default()[slot] = Some(Arc::clone(&delivery));
        Ok(delivery)
    }

    /// `message` with every tensor on the device `channel`'s map sends it to
    /// (see [`Delivery::land`]); host tensors from host senders on a channel
    /// with nothing to do pass through untouched.
    fn land(
        &self,
        channel: &str,
        direction: Direction,
        message: Message,
        infos: &[TensorInfo],
    ) -> Result<Message> {
        if message.tensors().len() == 0 {
            return Ok(message);
        }
        let from_host = if infos.is_empty() {
            message.tensors().all(|(_, t)| t.device() == Device::Cpu)
        } else {
            infos
                .iter()
                .all(|i| i.device == Device::Cpu && i.checksum.is_none() && i.cast_from.is_none())
        };
        let delivery = self.delivery(channel, direction)?;
        if from_host && delivery.passes_host_tensors() {
            return Ok(message);
        }
        Ok(delivery.land(message, infos)?.0)
    }

    /// A change to whom published messages go: publishers work their
    /// routes out again (see [`NodeInner::routes`]). Made after the change.
    pub(crate) fn reroute(&self) {
        self.routes.fetch_add(1, Ordering::AcqRel);
    }

    fn live_peers(&self) -> Vec<Arc<Peer>> {
        lock(&self.peers)
            .iter()
            .filter(|p| p.is_alive())
            .cloned()
            .collect()
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn shutdown(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::debug!(node = %self.name, "shutting down");
        // Listeners first: no new connection comes in while the rest closes.
        for l in lock(&self.listening).drain(..) {
            if let Some(r) = l.registration {
                r.remove();
            }
        }
        let peers: Vec<Arc<Peer>> = lock(&self.peers).drain(..).collect();
        for p in &peers {
            self.lose(p, "this node shut down");
        }
        self.stop_services();
        for q in lock(&self.subs).values().flatten() {
            q.close();
        }
        for tap in lock(&self.taps).drain(..) {
            tap.stop();
        }
        self.reroute();
        self.subscribers_changed.notify();
        // Taken out first: an I/O thread may need the lock (to hand a new
        // connection over) while this one waits for it to stop.
        let reactor = lock(&self.reactor).take();
        if let Some(mut reactor) = reactor {
            reactor.stop();
        }
    }
}
