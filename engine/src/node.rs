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

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};
use serde_json::json;
use tensorferry_device_map::{ChannelConfig, ChannelSpec, Device, Inventory, Overflow};

use crate::address::Address;
use crate::error::{Error, Result};
use crate::file::{FileReader, FileWriter};
use crate::inbox::{Assembler, Inbox, Lead, Next};
use crate::message::Message;
use crate::pipe::{self, Pipe, PipeReader, PipeWriter};
use crate::pool::BufferPool;
use crate::service::{Handler, Schema, Service, ServiceError};
use crate::shm::{self, MappedSlot, SlotPool, SlotUse};
use crate::staging::{self, Direction, Stager};
use crate::stream::Router;
use crate::wire::layout;
use crate::wire::{
    decode_at, encode, encode_staged, EncodeOptions, Encoded, Frame, FrameMeta, HeadPlan, Kind,
    Limits, Origin, TensorInfo,
};
use crate::HostBuffer;
use tensorferry_kernels::DType;

/// How a node encodes what it sends and records: compact headers, which cost
/// a fraction of JSON to write and read (checksums are a channel setting).
const LINK_ENCODING: EncodeOptions = EncodeOptions {
    checksums: false,
    compact: true,
};

/// The channel name that subscribes to every channel.
pub const ALL_CHANNELS: &str = "*";

/// A message as a subscriber receives it.
#[derive(Debug, Clone)]
pub struct Received {
    /// The channel it was published on.
    pub channel: String,
    /// The publisher's sequence number.
    pub seq: u64,
    /// The message. Tensors that crossed a socket view a pooled receive buffer.
    pub message: Message,
    /// What the sender's header said of each tensor (source device, checksum),
    /// in message order; empty for messages that never left the process.
    pub tensors: Vec<TensorInfo>,
    /// Who sent it: the peer's address, or `local`.
    pub from: String,
    /// When its first byte arrived (for a local message: when it was published).
    pub first_byte: Instant,
}

type Delivery = std::result::Result<Received, Error>;

/// A bounded queue with an overflow policy: what sits between a publisher and one subscriber.
struct Queue<T> {
    tx: Sender<T>,
    rx: Receiver<T>,
    overflow: Overflow,
    dropped: AtomicU64,
    closed: AtomicBool,
}

impl<T> Queue<T> {
    fn new(spec: &ChannelSpec) -> Self {
        let (tx, rx) = bounded(spec.queue_depth.max(1));
        Self {
            tx,
            rx,
            overflow: spec.overflow,
            dropped: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// Queues `item` by the policy; `false` when the queue was closed meanwhile.
    fn push(&self, mut item: T) -> bool {
        loop {
            if self.closed.load(Ordering::Acquire) {
                return false;
            }
            match self.overflow {
                Overflow::Block => match self.tx.send_timeout(item, Duration::from_millis(50)) {
                    Ok(()) => return true,
                    Err(e) => item = e.into_inner(),
                },
                Overflow::DropOldest => match self.tx.try_send(item) {
                    Ok(()) => return true,
                    Err(TrySendError::Full(back)) => {
                        if self.rx.try_recv().is_ok() {
                            self.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        item = back;
                    }
                    Err(TrySendError::Disconnected(_)) => return false,
                },
            }
        }
    }

    /// Pushes regardless of the policy (for events that must not be lost, such as a lost peer).
    fn force(&self, item: T) {
        let mut item = item;
        while let Err(TrySendError::Full(back)) = self.tx.try_send(item) {
            let _ = self.rx.try_recv();
            item = back;
        }
    }
}

/// What waits in a remote subscription's queue.
enum Outgoing {
    /// A whole frame, for a TCP peer.
    Frame(Arc<Encoded>),
    /// A frame already in a shared slot, for a shm peer; the hold is given
    /// back when the peer releases it (or when the item is dropped unsent).
    Shm {
        held: SlotUse,
        len: u64,
        channel: String,
        seq: u64,
    },
}

/// The queue of one remote subscription and the thread that drains it into the socket.
struct Outlet {
    queue: Queue<Outgoing>,
    /// Frames queued or being written.
    inflight: AtomicU64,
}

enum Link {
    Stream {
        writer: Mutex<Box<dyn Write + Send>>,
        stream: TcpStream,
    },
    Inproc {
        remote: Weak<NodeInner>,
        twin: OnceLock<Weak<Peer>>,
    },
    Unix {
        /// Frames go through the connection's shared-memory pipe; slot
        /// descriptors through its socket.
        writer: Mutex<PipeWriter>,
        stream: UnixStream,
        /// Slots whose descriptor this peer has received.
        known: Mutex<HashSet<u32>>,
        /// Holds on slots until this peer releases the frame in them.
        awaiting: Mutex<HashMap<(u32, u64), SlotUse>>,
    },
}

struct Peer {
    id: u64,
    label: String,
    link: Link,
    alive: AtomicBool,
    /// Channels the remote end subscribed to.
    wants: Mutex<HashMap<String, Option<Arc<Outlet>>>>,
    /// Subscriptions made through `subscribe(addr, …)` to this peer, told when it is lost.
    origin: Mutex<Vec<Weak<Queue<Delivery>>>>,
    dialed: Option<Address>,
    /// The read side of a socket link (none for inproc).
    inbox: Option<Inbox<ReadSide>>,
}

/// How a connection's frames are read: by its reader thread, or by a
/// requester that leads its [`Inbox`] while it waits for a reply.
struct ReadSide {
    frames: Frames,
    /// The stream ended or failed; the peer is (being) marked lost.
    ended: bool,
}

enum Frames {
    Stream(Assembler<TcpStream>),
    Unix {
        frames: Assembler<PipeReader>,
        /// The pipe, whose socket brings the descriptors `shm` frames claim.
        pipe: Arc<Pipe>,
        /// Slots mapped so far, by id.
        mapped: HashMap<u32, Arc<MappedSlot>>,
    },
}

impl ReadSide {
    fn holds_bytes(&self) -> bool {
        match &self.frames {
            Frames::Stream(frames) => frames.holds_bytes(),
            Frames::Unix { frames, .. } => frames.holds_bytes(),
        }
    }
}

/// What one read step did.
enum Step {
    /// Read and dispatched a frame.
    Dispatched,
    /// Nothing whole to read now.
    Pending,
    /// The stream is over (why); the peer must be marked lost.
    Ended(String),
}

impl Peer {
    fn wants(&self, channel: &str) -> Option<Option<Arc<Outlet>>> {
        let wants = self.wants.lock().expect("peer lock is never poisoned");
        wants
            .get(channel)
            .or_else(|| wants.get(ALL_CHANNELS))
            .cloned()
    }

    /// Writes one frame now (control frames, requests, replies).
    /// Writes one frame. A failed write may have left part of the frame on
    /// the stream, which the peer could not tell from the next frame: the
    /// connection is shut down, and its reader reports the peer lost.
    fn write(&self, frame: &Encoded) -> Result<()> {
        let written = match &self.link {
            Link::Stream { writer, .. } => {
                let mut w = writer.lock().expect("writer lock is never poisoned");
                frame.write_to(&mut *w)
            }
            Link::Unix { writer, .. } => {
                let mut w = writer.lock().expect("writer lock is never poisoned");
                // The flush publishes the frame to the reader (one wake-up).
                frame.write_to(&mut *w).and_then(|()| w.flush())
            }
            Link::Inproc { .. } => {
                return Err(Error::Invalid(
                    "inproc peers take messages, not frames".into(),
                ))
            }
        };
        written.map_err(|e| {
            self.sever();
            Error::io(format!("writing to {}", self.label), e)
        })
    }

    /// Shuts the connection down without marking the peer lost: its reader
    /// then ends and reports the loss to everything that depended on it.
    fn sever(&self) {
        match &self.link {
            Link::Stream { stream, .. } => {
                let _ = stream.shutdown(Shutdown::Both);
            }
            Link::Unix { stream, .. } => {
                let _ = stream.shutdown(Shutdown::Both);
            }
            Link::Inproc { .. } => {}
        }
    }

    fn close(&self) {
        self.alive.store(false, Ordering::Release);
        match &self.link {
            Link::Stream { stream, .. } => {
                let _ = stream.shutdown(Shutdown::Both);
            }
            Link::Unix {
                stream, awaiting, ..
            } => {
                let _ = stream.shutdown(Shutdown::Both);
                awaiting.lock().expect("lock is never poisoned").clear();
            }
            Link::Inproc { .. } => {}
        }
        for outlet in self
            .wants
            .lock()
            .expect("peer lock is never poisoned")
            .values()
            .flatten()
        {
            outlet.queue.closed.store(true, Ordering::Release);
        }
    }
}

struct ServiceSlot {
    input: Schema,
    runner: Runner,
}

/// Where a service's `exec` runs.
enum Runner {
    /// On the service's own thread, fed by a queue.
    Thread(Sender<(Message, ReplyTo)>),
    /// On the reader thread of the request's connection.
    Inline(Arc<InlineService>),
}

struct InlineService {
    channel: String,
    handler: Mutex<Box<dyn Handler>>,
    output: Schema,
}

impl Drop for InlineService {
    fn drop(&mut self) {
        if let Ok(handler) = self.handler.get_mut() {
            handler.fini();
        }
    }
}

struct ReplyTo {
    peer: Arc<Peer>,
    channel: String,
    id: u64,
    /// Prepares the reply for the wire (casts, checksums, device tensors).
    stager: Option<Arc<Stager>>,
}

/// A reply and what its header said of each tensor.
type Reply = std::result::Result<(Message, Vec<TensorInfo>), Error>;

struct Pending {
    peer: u64,
    tx: Sender<Reply>,
}

struct NodeInner {
    name: String,
    config: ChannelConfig,
    limits: Limits,
    pool: BufferPool,
    connect_timeout: Duration,
    busy_poll: Duration,
    inventory: Option<Arc<Inventory>>,
    /// Each channel's stagers: forward (messages, requests) and reply.
    stagers: Mutex<HashMap<String, [Option<Arc<Stager>>; 2]>>,
    bound: Mutex<Vec<Address>>,
    subs: Mutex<HashMap<String, Vec<Arc<Queue<Delivery>>>>>,
    peers: Mutex<Vec<Arc<Peer>>>,
    services: Mutex<HashMap<String, ServiceSlot>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    slots: SlotPool,
}

fn inproc_registry() -> &'static Mutex<HashMap<String, Weak<NodeInner>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Weak<NodeInner>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Shuts the node down when the last user-facing handle is dropped.
struct Guard(Arc<NodeInner>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// Builds a [`Node`]; everything is checked in [`build`](NodeBuilder::build).
#[derive(Debug, Clone)]
pub struct NodeBuilder {
    name: String,
    listen: Vec<(String, bool)>,
    config: ChannelConfig,
    limits: Limits,
    connect_timeout: Duration,
    pool_idle_bytes: usize,
    shm_bytes: usize,
    busy_poll: Duration,
    inventory: Option<Inventory>,
}

/// Owns connections and channels.
///
/// # Examples
///
/// ```
/// use tensorferry_engine::{Message, Node, Tensor};
///
/// let server = Node::builder().name("camera").listen("tcp://127.0.0.1:0").build()?;
/// let addr = server.listen_addrs()[0].to_string(); // the port picked
/// let client = Node::builder().name("viewer").build()?;
/// let frames = client.subscribe(&addr, "/camera")?;
/// let publisher = server.publisher("/camera");
/// publisher.wait_for_subscribers(1, std::time::Duration::from_secs(5))?;
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

impl Default for NodeBuilder {
    fn default() -> Self {
        Self {
            name: "tensorferry".into(),
            listen: Vec::new(),
            config: ChannelConfig::new(),
            limits: Limits::default(),
            connect_timeout: Duration::from_secs(5),
            pool_idle_bytes: 1 << 30,
            shm_bytes: 4 << 30,
            busy_poll: Duration::ZERO,
            inventory: None,
        }
    }
}

impl NodeBuilder {
    /// The node's name, shown to peers and in logs. Default `tensorferry`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Listens on `addr` (`inproc://NAME`, `tcp://HOST:PORT`). TCP must be a
    /// loopback address; use [`listen_public`](Self::listen_public) to accept other hosts.
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.listen.push((addr.into(), false));
        self
    }

    /// Listens on `addr`, which may be reachable from other hosts (e.g. `tcp://0.0.0.0:7070`).
    pub fn listen_public(mut self, addr: impl Into<String>) -> Self {
        self.listen.push((addr.into(), true));
        self
    }

    /// Per-channel settings (queue depth, overflow policy, device maps). Default: none,
    /// so every channel gets [`ChannelSpec::default`].
    pub fn channels(mut self, config: ChannelConfig) -> Self {
        self.config = config;
        self
    }

    /// Decoder limits for frames from peers. Default [`Limits::default`].
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How long connecting retries (with backoff) before giving up, in ms. Default 5000.
    pub fn connect_timeout_ms(mut self, ms: u64) -> Self {
        self.connect_timeout = Duration::from_millis(ms);
        self
    }

    /// Most bytes of receive buffers kept for reuse. Default 1 GiB.
    pub fn pool_idle_bytes(mut self, bytes: usize) -> Self {
        self.pool_idle_bytes = bytes;
        self
    }

    /// Most bytes of shared-memory slots this node creates for `shm://`
    /// subscribers. Default 4 GiB; past it, publishers wait for receivers to
    /// release slots (a message larger than the limit still gets one slot).
    pub fn shm_bytes(mut self, bytes: usize) -> Self {
        self.shm_bytes = bytes;
        self
    }

    /// Busy polling, for lower round-trip latency at the cost of a core kept
    /// busy: a requester waiting for its reply spins this many microseconds
    /// before it sleeps, and so does a connection's reader after each frame
    /// while this node awaits no reply on that connection (a responder
    /// catching the next request). Default 0 (off).
    pub fn busy_poll_us(mut self, us: u64) -> Self {
        self.busy_poll = Duration::from_micros(us);
        self
    }

    /// The devices tensors may land on, instead of the ones this host has
    /// (probed when first needed): for tests, and to keep a node off some
    /// devices.
    pub fn inventory(mut self, inventory: Inventory) -> Self {
        self.inventory = Some(inventory);
        self
    }

    /// Binds every listen address and starts the node.
    ///
    /// # Errors
    ///
    /// A malformed address, a non-loopback address given to `listen`, an
    /// inproc name already taken, or a socket that cannot be bound.
    pub fn build(self) -> Result<Node> {
        let staging_errors = staging::validate(&self.config);
        if !staging_errors.is_empty() {
            return Err(tensorferry_device_map::Error::Invalid {
                errors: staging_errors,
            }
            .into());
        }
        let inner = Arc::new(NodeInner {
            name: self.name,
            config: self.config,
            limits: self.limits,
            pool: BufferPool::new(self.pool_idle_bytes),
            connect_timeout: self.connect_timeout,
            busy_poll: self.busy_poll,
            inventory: self.inventory.map(Arc::new),
            stagers: Mutex::new(HashMap::new()),
            bound: Mutex::new(Vec::new()),
            subs: Mutex::new(HashMap::new()),
            peers: Mutex::new(Vec::new()),
            services: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            slots: SlotPool::new(
                self.shm_bytes,
                self.connect_timeout.max(Duration::from_secs(30)),
            ),
        });
        let node = Node {
            guard: Arc::new(Guard(Arc::clone(&inner))),
            inner,
        };
        for (text, public) in &self.listen {
            let addr: Address = text.parse()?;
            node.inner.bind(&addr, *public)?;
        }
        Ok(node)
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
        self.inner
            .bound
            .lock()
            .expect("lock is never poisoned")
            .clone()
    }

    /// A publisher on `channel`.
    pub fn publisher(&self, channel: impl Into<String>) -> Publisher {
        Publisher {
            node: Arc::clone(&self.inner),
            _guard: Arc::clone(&self.guard),
            channel: channel.into(),
            seq: AtomicU64::new(0),
        }
    }

    /// A subscription to `channel` ([`ALL_CHANNELS`] for every channel) from
    /// every peer, present and future, and from this node's own publishers.
    pub fn subscriber(&self, channel: impl Into<String>) -> Subscription {
        let channel = channel.into();
        let queue = Arc::new(Queue::new(&self.inner.spec(&channel)));
        let first = {
            let mut subs = self.inner.subs.lock().expect("lock is never poisoned");
            let list = subs.entry(channel.clone()).or_default();
            list.push(Arc::clone(&queue));
            list.len() == 1
        };
        if first {
            for peer in self.inner.live_peers() {
                self.inner.announce(&peer, &channel, Kind::Subscribe);
            }
        }
        Subscription {
            node: Arc::clone(&self.inner),
            _guard: Arc::clone(&self.guard),
            channel,
            queue,
            registered: true,
        }
    }

    /// Connects to `addr` (if not yet connected) and subscribes to `channel`.
    /// If that connection is lost, the subscription reports it.
    ///
    /// A `file://PATH` address replays a recording (see [`Node::record`]):
    /// its messages on `channel` (every channel for [`ALL_CHANNELS`]) arrive
    /// in order, as fast as the subscription takes them, landed by this
    /// node's channel configuration like any others; after the last one the
    /// subscription reports [`Error::Closed`].
    ///
    /// # Errors
    ///
    /// When `addr` cannot be reached within the connect timeout.
    pub fn subscribe(&self, addr: &str, channel: impl Into<String>) -> Result<Subscription> {
        let addr: Address = addr.parse()?;
        if let Address::File(path) = &addr {
            return self.replay(path, channel.into());
        }
        let peer = self.inner.connect(&addr)?;
        let sub = self.subscriber(channel);
        peer.origin
            .lock()
            .expect("lock is never poisoned")
            .push(Arc::downgrade(&sub.queue));
        if !peer.alive.load(Ordering::Acquire) {
            return Err(Error::PeerLost {
                peer: peer.label.clone(),
                reason: "closed while subscribing".into(),
            });
        }
        Ok(sub)
    }

    /// Replays the recording at `path` into a subscription of its own.
    fn replay(&self, path: &std::path::Path, channel: String) -> Result<Subscription> {
        let reader = FileReader::open_with_limits(path, self.inner.limits)?;
        let queue = Arc::new(Queue::new(&self.inner.spec(&channel)));
        let label = format!("file://{}", path.display());
        let feed = Arc::clone(&queue);
        let wanted = channel.clone();
        thread::Builder::new()
            .name("tf-replay".into())
            .spawn(move || {
                for frame in reader {
                    if feed.closed.load(Ordering::Acquire) {
                        return;
                    }
                    let frame = match frame {
                        Ok(f) => f,
                        Err(e) => {
                            feed.push(Err(e));
                            break;
                        }
                    };
                    if frame.meta.kind != Kind::Message
                        || (wanted != ALL_CHANNELS && frame.meta.channel != wanted)
                    {
                        continue;
                    }
                    feed.push(Ok(Received {
                        channel: frame.meta.channel,
                        seq: frame.meta.seq,
                        message: frame.message,
                        tensors: frame.tensors,
                        from: label.clone(),
                        first_byte: Instant::now(),
                    }));
                }
                // Pushed like a message, so it never displaces one.
                feed.push(Err(Error::Closed));
            })
            .map_err(|e| Error::io("starting a replay thread", e))?;
        Ok(Subscription {
            node: Arc::clone(&self.inner),
            _guard: Arc::clone(&self.guard),
            channel,
            queue,
            registered: false,
        })
    }

    /// Records every message this node sees on `channel` ([`ALL_CHANNELS`]
    /// for all) — published here or received from peers — to `addr`, a
    /// `file://PATH` (created, or replaced), until the returned handle is
    /// stopped or dropped; then every message already taken is written and
    /// the file is synced. Device tensors are read back, and the channel's
    /// wire casts and checksums applied, as for a socket.
    ///
    /// # Errors
    ///
    /// An address that is not `file://`, or a file that cannot be created.
    pub fn record(&self, channel: impl Into<String>, addr: &str) -> Result<Recording> {
        let addr: Address = addr.parse()?;
        let Address::File(path) = &addr else {
            return Err(Error::Invalid(format!(
                "record to a file://PATH, not {addr}"
            )));
        };
        let mut writer = FileWriter::create(path)?;
        let sub = self.subscriber(channel);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let inner = Arc::clone(&self.inner);
        let worker = thread::Builder::new()
            .name("tf-record".into())
            .spawn(move || -> Result<u64> {
                let mut written = 0;
                let mut write = |r: Received| -> Result<()> {
                    let meta = FrameMeta::message(r.channel.clone(), r.seq);
                    let frame = if r.tensors.is_empty() {
                        // Published here: prepared as for a socket.
                        inner.encode_for(&r.message, &meta)?
                    } else {
                        // Received: recorded as it came, with what its
                        // sender said of each tensor (device, dtype before
                        // the wire cast, checksum, still to be verified).
                        let origins: Vec<Origin> = r
                            .tensors
                            .iter()
                            .map(|i| Origin {
                                device: i.device,
                                cast_from: i.cast_from,
                                checksum: i.checksum,
                            })
                            .collect();
                        encode_staged(&r.message, &origins, &meta, LINK_ENCODING)?
                    };
                    writer.write(&frame)?;
                    written += 1;
                    Ok(())
                };
                while !stopping.load(Ordering::Acquire) {
                    if let Ok(Ok(r)) = sub.queue.rx.recv_timeout(Duration::from_millis(50)) {
                        write(r)?;
                    }
                }
                // Stopped: what was already taken goes in too.
                while let Ok(next) = sub.queue.rx.try_recv() {
                    if let Ok(r) = next {
                        write(r)?;
                    }
                }
                writer.sync()?;
                Ok(written)
            })
            .map_err(|e| Error::io("starting a recording thread", e))?;
        Ok(Recording {
            stop,
            worker: Some(worker),
        })
    }

    /// Connects to `addr`, retrying with backoff up to the connect timeout;
    /// returns the existing connection when there is one.
    ///
    /// # Errors
    ///
    /// A malformed or unreachable address.
    pub fn connect(&self, addr: &str) -> Result<()> {
        let addr: Address = addr.parse()?;
        self.inner.connect(&addr).map(drop)
    }

    /// Registers a request/reply service on `channel`, running its `init` now
    /// and its `fini` when the node shuts down.
    ///
    /// # Errors
    ///
    /// When a service already serves `channel`, or `init` fails.
    pub fn serve(&self, channel: impl Into<String>, service: Service) -> Result<()> {
        let channel = channel.into();
        let Service {
            input,
            output,
            mut handler,
            inline,
        } = service;
        let mut services = self.inner.services.lock().expect("lock is never poisoned");
        if services.contains_key(&channel) {
            return Err(Error::Invalid(format!(
                "a service already serves `{channel}`"
            )));
        }
        handler.init().map_err(|e| Error::Remote {
            channel: channel.clone(),
            code: e.code,
            message: format!("init failed: {}", e.message),
        })?;
        let runner = if inline {
            Runner::Inline(Arc::new(InlineService {
                channel: channel.clone(),
                handler: Mutex::new(handler),
                output,
            }))
        } else {
            let (tx, rx) =
                bounded::<(Message, ReplyTo)>(self.inner.spec(&channel).queue_depth.max(1));
            let name = channel.clone();
            thread::Builder::new()
                .name(format!("tf-service{channel}"))
                .spawn(move || run_service(&name, handler, &output, &rx))
                .map_err(|e| Error::io("starting a service thread", e))?;
            Runner::Thread(tx)
        };
        services.insert(channel, ServiceSlot { input, runner });
        Ok(())
    }

    /// Sends `request` to the service on `channel` at `addr` and waits for its reply.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when no reply comes in `timeout`; [`Error::Remote`] for
    /// an error reply (a schema mismatch, a handler error, no such service);
    /// [`Error::PeerLost`] when the connection drops first.
    pub fn request(
        &self,
        addr: &str,
        channel: &str,
        request: Message,
        timeout: Duration,
    ) -> Result<Message> {
        let addr: Address = addr.parse()?;
        let peer = self.inner.connect(&addr)?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = bounded(1);
        self.inner
            .pending
            .lock()
            .expect("lock is never poisoned")
            .insert(id, Pending { peer: peer.id, tx });
        // Lead the connection's inbox when no one else does, before the reply
        // can arrive: this thread then reads the reply itself.
        let lead = peer.inbox.as_ref().and_then(Inbox::try_lead);
        let sent = match &peer.link {
            Link::Stream { .. } | Link::Unix { .. } => {
                let meta = FrameMeta {
                    channel: channel.to_string(),
                    seq: 0,
                    kind: Kind::Request,
                    id: Some(id),
                };
                self.inner
                    .encode_for(&request, &meta)
                    .and_then(|f| peer.write(&f))
            }
            Link::Inproc { remote, twin } => {
                match (remote.upgrade(), twin.get().and_then(Weak::upgrade)) {
                    (Some(remote), Some(twin)) => {
                        remote.dispatch_request(&twin, channel, id, request, &[]);
                        Ok(())
                    }
                    _ => Err(Error::PeerLost {
                        peer: peer.label.clone(),
                        reason: "the node is gone".into(),
                    }),
                }
            }
        };
        let wait = || {
            if let Some(lead) = lead {
                return self.inner.read_until_reply(&peer, lead, &rx, timeout);
            }
            let spin_until = Instant::now() + self.inner.busy_poll;
            while Instant::now() < spin_until {
                if let Ok(result) = rx.try_recv() {
                    return Ok(result);
                }
                std::hint::spin_loop();
            }
            rx.recv_timeout(timeout)
        };
        let outcome = sent.and_then(|()| match wait() {
            Ok(result) => result.and_then(|(reply, infos)| {
                self.inner.land(channel, Direction::Reply, reply, &infos)
            }),
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout {
                what: format!("waiting for the reply of `{channel}` at {addr}"),
                ms: timeout.as_millis() as u64,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(Error::Closed),
        });
        self.inner
            .pending
            .lock()
            .expect("lock is never poisoned")
            .remove(&id);
        outcome
    }

    /// Number of live connections.
    pub fn peer_count(&self) -> usize {
        self.inner.live_peers().len()
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

    /// Whether a requester of this node waits for a reply from `peer`.
    fn awaits_reply_from(&self, peer: &Peer) -> bool {
        self.pending
            .lock()
            .expect("lock is never poisoned")
            .values()
            .any(|p| p.peer == peer.id)
    }

    /// The staging rules of `channel` for messages travelling `direction`.
    fn stager(&self, channel: &str, direction: Direction) -> Result<Arc<Stager>> {
        let slot = match direction {
            Direction::Forward => 0,
            Direction::Reply => 1,
        };
        // Looked up by &str: no allocation on the request path.
        if let Some(s) = self
            .stagers
            .lock()
            .expect("lock is never poisoned")
            .get(channel)
            .and_then(|pair| pair[slot].as_ref())
        {
            return Ok(Arc::clone(s));
        }
        let stager = Arc::new(Stager::new(
            &self.spec(channel),
            direction,
            self.inventory.clone(),
        )?);
        self.stagers
            .lock()
            .expect("lock is never poisoned")
            .entry(channel.to_string())
            .or_default()[slot] = Some(Arc::clone(&stager));
        Ok(stager)
    }

    /// `message` with every tensor on the device `channel`'s map sends it to
    /// (see [`Stager::land`]); host tensors from host senders on a channel
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
        let stager = self.stager(channel, direction)?;
        if from_host && stager.passes_host_tensors() {
            return Ok(message);
        }
        Ok(stager.land(message, infos)?.0)
    }

    /// Encodes `message` for the wire on its channel: tensors on devices come
    /// to the host, casts and checksums are applied where the tensors are.
    fn encode_for(&self, message: &Message, meta: &FrameMeta) -> Result<Encoded> {
        let stager = self.stager(&meta.channel, Direction::Forward)?;
        encode_with(&stager, message, meta)
    }

    fn live_peers(&self) -> Vec<Arc<Peer>> {
        self.peers
            .lock()
            .expect("lock is never poisoned")
            .iter()
            .filter(|p| p.alive.load(Ordering::Acquire))
            .cloned()
            .collect()
    }

    fn bind(self: &Arc<Self>, addr: &Address, public: bool) -> Result<()> {
        match addr {
            Address::Inproc(name) => {
                let mut reg = inproc_registry().lock().expect("lock is never poisoned");
                if reg.get(name).is_some_and(|w| w.strong_count() > 0) {
                    return Err(Error::Invalid(format!(
                        "{addr} is already taken in this process"
                    )));
                }
                reg.insert(name.clone(), Arc::downgrade(self));
                self.bound
                    .lock()
                    .expect("lock is never poisoned")
                    .push(addr.clone());
                Ok(())
            }
            Address::Tcp(_) => {
                if !public && !addr.is_local_only()? {
                    return Err(Error::Invalid(format!(
                        "{addr} is reachable from other hosts; bind it with listen_public (the CLI: write the address explicitly) or use 127.0.0.1"
                    )));
                }
                let sock = addr.socket_addrs()?;
                let listener = TcpListener::bind(&sock[..])
                    .map_err(|e| Error::io(format!("binding {addr}"), e))?;
                let local = listener
                    .local_addr()
                    .map_err(|e| Error::io("reading the bound address", e))?;
                self.bound
                    .lock()
                    .expect("lock is never poisoned")
                    .push(Address::Tcp(local.to_string()));
                listener
                    .set_nonblocking(true)
                    .map_err(|e| Error::io("configuring the listener", e))?;
                let node = Arc::downgrade(self);
                thread::Builder::new()
                    .name("tf-accept".into())
                    .spawn(move || {
                        let what = format!("{local}");
                        let accept = || {
                            let (stream, from) = listener.accept()?;
                            stream.set_nonblocking(false)?;
                            Ok((stream, format!("tcp://{from}")))
                        };
                        accept_loop(&node, &what, accept, start_accepted_stream_peer);
                    })
                    .map_err(|e| Error::io("starting the accept thread", e))?;
                Ok(())
            }
            Address::Shm(name) => {
                let listener = shm::bind(name)?;
                self.bound
                    .lock()
                    .expect("lock is never poisoned")
                    .push(addr.clone());
                listener
                    .set_nonblocking(true)
                    .map_err(|e| Error::io("configuring the listener", e))?;
                let node = Arc::downgrade(self);
                let label = addr.to_string();
                thread::Builder::new()
                    .name("tf-accept-shm".into())
                    .spawn(move || {
                        let accept = || {
                            let (stream, _) = listener.accept()?;
                            stream.set_nonblocking(false)?;
                            Ok((stream, format!("{label} peer")))
                        };
                        accept_loop(&node, &label, accept, start_accepted_unix_peer);
                    })
                    .map_err(|e| Error::io("starting the accept thread", e))?;
                Ok(())
            }
            Address::File(_) => Err(Error::Invalid(format!(
                "a node cannot listen on {addr}; use inproc://, shm:// or tcp://, and Node::record(channel, \"{addr}\") to record to a file"
            ))),
        }
    }

    fn connect(self: &Arc<Self>, addr: &Address) -> Result<Arc<Peer>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        // Looked up in place: a request pays no copy of the peer list.
        let known = self
            .peers
            .lock()
            .expect("lock is never poisoned")
            .iter()
            .find(|p| p.alive.load(Ordering::Acquire) && p.dialed.as_ref() == Some(addr))
            .cloned();
        if let Some(p) = known {
            return Ok(p);
        }
        match addr {
            Address::Inproc(name) => {
                let remote = inproc_registry()
                    .lock()
                    .expect("lock is never poisoned")
                    .get(name)
                    .and_then(Weak::upgrade)
                    .ok_or_else(|| {
                        Error::Invalid(format!("nothing listens on {addr} in this process"))
                    })?;
                let here = self.add_peer(
                    addr.to_string(),
                    Link::Inproc {
                        remote: Arc::downgrade(&remote),
                        twin: OnceLock::new(),
                    },
                    Some(addr.clone()),
                    None,
                );
                let there = remote.add_peer(
                    format!("inproc peer {}", self.name),
                    Link::Inproc {
                        remote: Arc::downgrade(self),
                        twin: OnceLock::new(),
                    },
                    None,
                    None,
                );
                link_twins(&here, &there);
                self.greet(&here);
                remote.greet(&there);
                Ok(here)
            }
            Address::Tcp(_) => {
                let stream = dial(addr, self.connect_timeout)?;
                self.start_stream_peer(stream, addr.to_string(), Some(addr.clone()))
            }
            Address::Shm(name) => {
                let stream = retry(addr, self.connect_timeout, || shm::connect(name))?;
                self.start_unix_peer(stream, addr.to_string(), Some(addr.clone()))
            }
            Address::File(_) => Err(Error::Invalid(format!(
                "cannot connect to {addr}: replay a recording with Node::subscribe(\"{addr}\", channel) and make one with Node::record(channel, \"{addr}\")"
            ))),
        }
    }

    fn add_peer(
        &self,
        label: String,
        link: Link,
        dialed: Option<Address>,
        inbox: Option<Inbox<ReadSide>>,
    ) -> Arc<Peer> {
        let peer = Arc::new(Peer {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            label,
            link,
            alive: AtomicBool::new(true),
            wants: Mutex::new(HashMap::new()),
            origin: Mutex::new(Vec::new()),
            dialed,
            inbox,
        });
        self.peers
            .lock()
            .expect("lock is never poisoned")
            .push(Arc::clone(&peer));
        peer
    }

    /// Tells a new peer every channel this node subscribes to.
    fn greet(&self, peer: &Arc<Peer>) {
        let channels: Vec<String> = self
            .subs
            .lock()
            .expect("lock is never poisoned")
            .keys()
            .cloned()
            .collect();
        for ch in channels {
            self.announce(peer, &ch, Kind::Subscribe);
        }
    }

    fn start_stream_peer(
        self: &Arc<Self>,
        stream: TcpStream,
        label: String,
        dialed: Option<Address>,
    ) -> Result<Arc<Peer>> {
        tune(&stream);
        let reader = stream
            .try_clone()
            .map_err(|e| Error::io("cloning the socket", e))?;
        let writer = stream
            .try_clone()
            .map_err(|e| Error::io("cloning the socket", e))?;
        let watch = OwnedFd::from(
            stream
                .try_clone()
                .map_err(|e| Error::io("cloning the socket", e))?,
        );
        let frames = Frames::Stream(
            Assembler::new(reader, self.pool.clone(), self.limits)
                .with_router(device_router(Arc::downgrade(self))),
        );
        let link = Link::Stream {
            writer: Mutex::new(Box::new(writer)),
            stream,
        };
        let inbox = Inbox::new(
            watch,
            ReadSide {
                frames,
                ended: false,
            },
        )?;
        self.start_reading(label, link, dialed, inbox, "tf-read")
    }

    /// Adds a socket peer whose read side is `frames` (watched through
    /// `watch`), starts its reader thread and greets it.
    fn start_reading(
        self: &Arc<Self>,
        label: String,
        link: Link,
        dialed: Option<Address>,
        inbox: Inbox<ReadSide>,
        thread_name: &str,
    ) -> Result<Arc<Peer>> {
        let peer = self.add_peer(label, link, dialed, Some(inbox));
        let node = Arc::downgrade(self);
        let p = Arc::clone(&peer);
        let started = thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || read_loop(&p, &node));
        if let Err(e) = started {
            self.lose(&peer, "no reader thread");
            return Err(Error::io("starting a reader thread", e));
        }
        self.greet(&peer);
        Ok(peer)
    }

    fn start_unix_peer(
        self: &Arc<Self>,
        stream: UnixStream,
        label: String,
        dialed: Option<Address>,
    ) -> Result<Arc<Peer>> {
        let clone = |s: &UnixStream| {
            s.try_clone()
                .map_err(|e| Error::io("cloning the socket", e))
        };
        // Each side sends the ring it writes and maps the other's; from then
        // on frames go through the rings and the socket carries only slot
        // descriptors, read by a watcher thread that also sees the end.
        let pipe = pipe::handshake(&stream).map_err(|e| match e {
            // Closed while opening: the node there is going (or gone).
            Error::Io { source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::UnexpectedEof
                        | std::io::ErrorKind::BrokenPipe
                ) =>
            {
                Error::PeerLost {
                    peer: label.clone(),
                    reason: format!("the connection closed while it opened: {source}"),
                }
            }
            e => e,
        })?;
        // Both clones first: once the watcher runs, nothing here can fail
        // and leave it holding the socket open.
        let (watched, for_fds) = (clone(&stream)?, clone(&stream)?);
        pipe::watch(&pipe, watched)?;
        let writer = PipeWriter::new(Arc::clone(&pipe), for_fds);
        // No router here: a message's bytes come in a shared-memory slot
        // that is mapped already, or in the pipe's ring, not through a
        // socket, so there is no read to overlap with a copy; landing copies
        // them to their devices.
        let frames = Frames::Unix {
            frames: Assembler::new(
                PipeReader::new(Arc::clone(&pipe)),
                self.pool.clone(),
                self.limits,
            ),
            pipe: Arc::clone(&pipe),
            mapped: HashMap::new(),
        };
        let link = Link::Unix {
            writer: Mutex::new(writer),
            stream,
            known: Mutex::new(HashSet::new()),
            awaiting: Mutex::new(HashMap::new()),
        };
        let inbox = Inbox::pipe(
            pipe,
            ReadSide {
                frames,
                ended: false,
            },
        );
        self.start_reading(label, link, dialed, inbox, "tf-read-shm")
    }

    /// Sends a subscribe or unsubscribe to `peer`.
    fn announce(&self, peer: &Arc<Peer>, channel: &str, kind: Kind) {
        match &peer.link {
            Link::Stream { .. } | Link::Unix { .. } => {
                let meta = FrameMeta {
                    channel: channel.to_string(),
                    seq: 0,
                    kind,
                    id: None,
                };
                if let Ok(frame) = encode(&Message::new(), &meta, LINK_ENCODING) {
                    if peer.write(&frame).is_err() {
                        self.lose(peer, "write failed");
                    }
                }
            }
            Link::Inproc { remote, twin } => {
                if let (Some(remote), Some(twin)) =
                    (remote.upgrade(), twin.get().and_then(Weak::upgrade))
                {
                    remote.on_control(&twin, channel, kind);
                }
            }
        }
    }

    /// A peer asked for (or dropped) a channel.
    fn on_control(&self, peer: &Arc<Peer>, channel: &str, kind: Kind) {
        let mut wants = peer.wants.lock().expect("lock is never poisoned");
        match kind {
            Kind::Subscribe if !wants.contains_key(channel) => {
                let outlet = match &peer.link {
                    Link::Stream { .. } | Link::Unix { .. } => {
                        Some(spawn_outlet(peer, &self.spec(channel)))
                    }
                    Link::Inproc { .. } => None,
                };
                wants.insert(channel.to_string(), outlet);
            }
            Kind::Unsubscribe => {
                if let Some(Some(outlet)) = wants.remove(channel) {
                    outlet.queue.closed.store(true, Ordering::Release);
                }
            }
            _ => {}
        }
    }

    /// Delivers a message to this node's subscriptions of `channel` (and of `*`).
    fn deliver(&self, received: Received) {
        let queues: Vec<Arc<Queue<Delivery>>> = {
            let subs = self.subs.lock().expect("lock is never poisoned");
            subs.get(&received.channel)
                .into_iter()
                .chain(subs.get(ALL_CHANNELS))
                .flatten()
                .cloned()
                .collect()
        };
        if let Some((last, rest)) = queues.split_last() {
            for q in rest {
                q.push(Ok(received.clone()));
            }
            last.push(Ok(received));
        }
    }

    fn dispatch_request(
        &self,
        peer: &Arc<Peer>,
        channel: &str,
        id: u64,
        request: Message,
        infos: &[TensorInfo],
    ) {
        let mut reply_to = ReplyTo {
            peer: Arc::clone(peer),
            channel: channel.to_string(),
            id,
            stager: None,
        };
        let request = match self
            .stager(channel, Direction::Reply)
            .and_then(|reply_stager| {
                reply_to.stager = Some(reply_stager);
                self.land(channel, Direction::Forward, request, infos)
            }) {
            Ok(request) => request,
            Err(e) => {
                send_reply(
                    &reply_to,
                    Err(ServiceError::new(
                        "staging",
                        format!("the request could not be delivered here: {e}"),
                    )),
                );
                return;
            }
        };
        let services = self.services.lock().expect("lock is never poisoned");
        let Some(slot) = services.get(channel) else {
            drop(services);
            let err = ServiceError::new(
                "no_service",
                format!("no service is registered on `{channel}` at {}", self.name),
            );
            send_reply(&reply_to, Err(err));
            return;
        };
        if let Err(why) = slot.input.check(&request) {
            drop(services);
            send_reply(&reply_to, Err(ServiceError::new("bad_request", why)));
            return;
        }
        let queue = match &slot.runner {
            Runner::Thread(queue) => queue.clone(),
            Runner::Inline(service) => {
                let service = Arc::clone(service);
                drop(services);
                let reply = {
                    let mut handler = service
                        .handler
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    answer(&service.channel, handler.as_mut(), &service.output, request)
                };
                send_reply(&reply_to, reply);
                return;
            }
        };
        drop(services);
        if let Err(e) = queue.send((request, reply_to)) {
            let (_, reply_to) = e.into_inner();
            send_reply(
                &reply_to,
                Err(ServiceError::new(
                    "shutting_down",
                    "the service is stopping",
                )),
            );
        }
    }

    /// Reads and dispatches `peer`'s frames as its reader thread would, until
    /// the reply `rx` waits for arrives, `timeout` passes, or the stream ends.
    /// Spins (reading without sleeping) for the node's busy-poll time first.
    fn read_until_reply(
        self: &Arc<Self>,
        peer: &Arc<Peer>,
        mut lead: Lead<'_, ReadSide>,
        rx: &Receiver<Reply>,
        timeout: Duration,
    ) -> std::result::Result<Reply, RecvTimeoutError> {
        let start = Instant::now();
        let deadline = start + timeout;
        let spin_until = start + self.busy_poll;
        // The reply cannot be there yet: wait before the first read (unless spinning).
        let mut wait_first = self.busy_poll.is_zero() && !lead.holds_bytes();
        loop {
            if let Ok(result) = rx.try_recv() {
                // Frames read ahead are invisible to the reader thread's wait:
                // dispatch them before leaving.
                while lead.holds_bytes() {
                    match read_step(self, peer, &mut lead) {
                        Step::Dispatched => {}
                        Step::Pending => break,
                        Step::Ended(reason) => {
                            lead.ended = true;
                            self.lose(peer, &reason);
                            break;
                        }
                    }
                }
                return Ok(result);
            }
            if std::mem::take(&mut wait_first) {
                if let Err(e) = lead.inbox().wait_readable(deadline) {
                    lead.ended = true;
                    self.lose(peer, &format!("waiting to read: {e}"));
                }
            }
            match read_step(self, peer, &mut lead) {
                Step::Dispatched => {}
                Step::Pending => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(RecvTimeoutError::Timeout);
                    }
                    if now < spin_until {
                        std::hint::spin_loop();
                        continue;
                    }
                    if let Err(e) = lead.inbox().wait_readable(deadline) {
                        lead.ended = true;
                        self.lose(peer, &format!("waiting to read: {e}"));
                    }
                }
                Step::Ended(reason) => {
                    lead.ended = true;
                    drop(lead);
                    // Fails every request pending on the peer, this one included.
                    self.lose(peer, &reason);
                    return Ok(rx.try_recv().unwrap_or_else(|_| {
                        Err(Error::PeerLost {
                            peer: peer.label.clone(),
                            reason,
                        })
                    }));
                }
            }
        }
    }

    fn complete(&self, id: u64, result: Reply) {
        if let Some(p) = self
            .pending
            .lock()
            .expect("lock is never poisoned")
            .remove(&id)
        {
            let _ = p.tx.try_send(result);
        }
    }

    /// Marks `peer` lost: tells the subscriptions and requests that depended on it.
    fn lose(&self, peer: &Arc<Peer>, reason: &str) {
        if !peer.alive.swap(false, Ordering::AcqRel) {
            return;
        }
        peer.close();
        self.peers
            .lock()
            .expect("lock is never poisoned")
            .retain(|p| p.id != peer.id);
        for q in peer
            .origin
            .lock()
            .expect("lock is never poisoned")
            .iter()
            .filter_map(Weak::upgrade)
        {
            q.force(Err(Error::PeerLost {
                peer: peer.label.clone(),
                reason: reason.to_string(),
            }));
        }
        let failed: Vec<Pending> = {
            let mut pending = self.pending.lock().expect("lock is never poisoned");
            let ids: Vec<u64> = pending
                .iter()
                .filter(|(_, p)| p.peer == peer.id)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .filter_map(|id| pending.remove(&id))
                .collect()
        };
        for p in failed {
            let _ = p.tx.try_send(Err(Error::PeerLost {
                peer: peer.label.clone(),
                reason: reason.to_string(),
            }));
        }
        if let Link::Inproc { remote, twin } = &peer.link {
            if let (Some(remote), Some(twin)) =
                (remote.upgrade(), twin.get().and_then(Weak::upgrade))
            {
                remote.lose(&twin, "the other node shut down");
            }
        }
    }

    fn shutdown(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        inproc_registry()
            .lock()
            .expect("lock is never poisoned")
            .retain(|_, w| {
                w.upgrade()
                    .is_some_and(|n| !std::ptr::eq(Arc::as_ptr(&n), self))
            });
        let peers: Vec<Arc<Peer>> = self
            .peers
            .lock()
            .expect("lock is never poisoned")
            .drain(..)
            .collect();
        for p in &peers {
            self.lose(p, "this node shut down");
        }
        // Dropping the queues' senders lets each service thread run `fini` and end.
        self.services
            .lock()
            .expect("lock is never poisoned")
            .clear();
        for q in self
            .subs
            .lock()
            .expect("lock is never poisoned")
            .values()
            .flatten()
        {
            q.closed.store(true, Ordering::Release);
        }
    }
}

fn link_twins(a: &Arc<Peer>, b: &Arc<Peer>) {
    if let Link::Inproc { twin, .. } = &a.link {
        let _ = twin.set(Arc::downgrade(b));
    }
    if let Link::Inproc { twin, .. } = &b.link {
        let _ = twin.set(Arc::downgrade(a));
    }
}

/// Socket options for throughput and latency: no Nagle delay, large buffers.
fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(stream);
    let _ = sock.set_send_buffer_size(4 << 20);
    let _ = sock.set_recv_buffer_size(4 << 20);
}

/// Connects, retrying with exponential backoff until `timeout`.
fn dial(addr: &Address, timeout: Duration) -> Result<TcpStream> {
    let sock = addr.socket_addrs()?;
    retry(addr, timeout, || TcpStream::connect(&sock[..]))
}

/// Calls `connect` with exponential backoff until it succeeds or `timeout` passes.
fn retry<T>(
    addr: &Address,
    timeout: Duration,
    mut connect: impl FnMut() -> std::io::Result<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut wait = Duration::from_millis(10);
    loop {
        let last = match connect() {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        if Instant::now() + wait > deadline {
            return Err(Error::io(
                format!(
                    "connecting to {addr} (retried for {} ms)",
                    timeout.as_millis()
                ),
                last,
            ));
        }
        thread::sleep(wait);
        wait = (wait * 2).min(Duration::from_millis(500));
    }
}

/// Makes an accepted stream a peer of the node.
type StartPeer<S> = fn(&Arc<NodeInner>, S, String, Option<Address>) -> Result<()>;

/// Starts an accepted TCP peer.
fn start_accepted_stream_peer(
    inner: &Arc<NodeInner>,
    stream: TcpStream,
    label: String,
    dialed: Option<Address>,
) -> Result<()> {
    inner.start_stream_peer(stream, label, dialed).map(drop)
}

/// Starts an accepted shm peer on a thread of its own: its handshake waits
/// for the peer's pipe, and a peer that never sends one must not hold up
/// the connections behind it.
fn start_accepted_unix_peer(
    inner: &Arc<NodeInner>,
    stream: UnixStream,
    label: String,
    dialed: Option<Address>,
) -> Result<()> {
    let node = Arc::downgrade(inner);
    thread::Builder::new()
        .name("tf-hello-shm".into())
        .spawn(move || {
            let Some(inner) = node.upgrade() else { return };
            if let Err(e) = inner.start_unix_peer(stream, label.clone(), dialed) {
                eprintln!(
                    "tensorferry: {}: dropping the connection {label}: {e}",
                    inner.name
                );
            }
        })
        .map(drop)
        .map_err(|e| Error::io("starting a shm connection", e))
}

/// Accepts connections until the node shuts down. `accept` gives a stream and
/// the label its peer will carry (it fails with `WouldBlock` when none waits);
/// `start` makes the stream a peer.
fn accept_loop<S>(
    node: &Weak<NodeInner>,
    what: &str,
    mut accept: impl FnMut() -> std::io::Result<(S, String)>,
    start: StartPeer<S>,
) {
    loop {
        let Some(inner) = node.upgrade() else { return };
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        match accept() {
            Ok((stream, label)) => {
                if let Err(e) = start(&inner, stream, label.clone(), None) {
                    eprintln!(
                        "tensorferry: {}: dropping the connection {label}: {e}",
                        inner.name
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                drop(inner);
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                eprintln!("tensorferry: {}: accept on {what} failed: {e}", inner.name);
                drop(inner);
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// The reader thread of a socket peer: reads whenever no requester leads the
/// inbox, until the stream ends.
fn read_loop(peer: &Arc<Peer>, node: &Weak<NodeInner>) {
    let Some(inbox) = &peer.inbox else { return };
    loop {
        if let Err(e) = inbox.wait() {
            if let Some(inner) = node.upgrade() {
                inner.lose(peer, &format!("waiting to read: {e}"));
            }
            return;
        }
        let Some(inner) = node.upgrade() else { return };
        let Some(mut side) = inbox.read_turn() else {
            continue;
        };
        if side.ended {
            return;
        }
        // With busy polling, the reader keeps reading for a while after each
        // frame instead of sleeping, unless a requester of this node waits
        // for a reply on this connection (it reads that itself).
        let spin = !inner.busy_poll.is_zero();
        let mut spin_until = spin.then(|| Instant::now() + inner.busy_poll);
        loop {
            match read_step(&inner, peer, &mut side) {
                Step::Dispatched if spin => spin_until = Some(Instant::now() + inner.busy_poll),
                // The wait is level-triggered: what is left in the socket wakes it again.
                Step::Dispatched if !side.holds_bytes() => break,
                Step::Dispatched => {}
                Step::Pending
                    if spin_until.is_some_and(|until| Instant::now() < until)
                        && !inner.awaits_reply_from(peer) =>
                {
                    std::hint::spin_loop();
                }
                Step::Pending => break,
                Step::Ended(reason) => {
                    side.ended = true;
                    drop(side);
                    inner.lose(peer, &reason);
                    return;
                }
            }
        }
    }
}

/// Sends the bytes of each tensor whose channel maps it to a device (CUDA
/// or wgpu) straight from the socket to that device.
fn device_router(node: Weak<NodeInner>) -> Router {
    Arc::new(move |plan: &HeadPlan| {
        let none = || vec![None; plan.tensors.len()];
        let direction = match plan.meta.kind {
            Kind::Message | Kind::Request => Direction::Forward,
            Kind::Reply => Direction::Reply,
            _ => return none(),
        };
        let Some(inner) = node.upgrade() else {
            return none();
        };
        let Ok(stager) = inner.stager(&plan.meta.channel, direction) else {
            return none();
        };
        if stager.passes_host_tensors() && plan.tensors.iter().all(|t| t.device == Device::Cpu) {
            return none();
        }
        plan.tensors
            .iter()
            .map(|t| {
                // A tensor whose target is missing is read to the host; its
                // landing then reports the error.
                let (target, _) = stager.target(t.device).ok()?;
                if target == Device::Cpu {
                    return None;
                }
                let rt = stager.runtime_for(target).ok()?;
                // Otherwise landing uploads it, on the receiving thread,
                // while this one reads the next frame.
                let len = plan.buffers.get(t.buffer).map_or(0, |r| r.len());
                rt.overlaps_upload(len).then_some(rt)
            })
            .collect()
    })
}

/// Reads the next frame if all of it is there and dispatches it as the reader
/// thread does: control frames inline, shm messages from their shared slots.
fn read_step(inner: &Arc<NodeInner>, peer: &Arc<Peer>, side: &mut ReadSide) -> Step {
    if side.ended {
        return Step::Ended("the connection was closed".into());
    }
    let next = match &mut side.frames {
        Frames::Stream(frames) => frames.next(),
        Frames::Unix { frames, .. } => frames.next(),
    };
    let frame = match next {
        Ok(Next::Frame(f)) => f,
        Ok(Next::Pending) => return Step::Pending,
        Ok(Next::End) => return Step::Ended("the peer closed the connection".into()),
        Err(e) => return Step::Ended(report(inner, peer, &e)),
    };
    let first_byte = Instant::now();
    let Frames::Unix { pipe, mapped, .. } = &mut side.frames else {
        handle_frame(inner, peer, frame, first_byte);
        return Step::Dispatched;
    };
    match frame.meta.kind {
        Kind::Shm => match open_slot_frame(inner, peer, &frame, pipe, mapped) {
            Ok(f) => handle_frame(inner, peer, f, first_byte),
            Err(e) => return Step::Ended(report(inner, peer, &e)),
        },
        Kind::Release => {
            let slot = frame
                .message
                .get_field("slot")
                .and_then(serde_json::Value::as_u64);
            let offset = frame
                .message
                .get_field("offset")
                .and_then(serde_json::Value::as_u64);
            if let (Some(slot), Some(offset), Link::Unix { awaiting, .. }) =
                (slot, offset, &peer.link)
            {
                if let Ok(slot) = u32::try_from(slot) {
                    awaiting
                        .lock()
                        .expect("lock is never poisoned")
                        .remove(&(slot, offset));
                }
            }
        }
        _ => handle_frame(inner, peer, frame, first_byte),
    }
    Step::Dispatched
}

fn report(inner: &NodeInner, peer: &Peer, e: &Error) -> String {
    if peer.alive.load(Ordering::Acquire) && !inner.closed.load(Ordering::Acquire) {
        eprintln!("tensorferry: {}: closing {}: {e}", inner.name, peer.label);
    }
    e.to_string()
}

/// Decodes the message frame a `shm` frame points to, in place in the shared slot.
fn open_slot_frame(
    inner: &NodeInner,
    peer: &Arc<Peer>,
    pointer: &Frame,
    pipe: &Pipe,
    mapped: &mut HashMap<u32, Arc<MappedSlot>>,
) -> Result<Frame> {
    let field = |k: &str| pointer.message.get_field(k);
    let number = |k: &str| {
        field(k)
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| Error::Invalid(format!("a shm frame without a valid `{k}`")))
    };
    let (slot, offset, len) = (number("slot")?, number("offset")?, number("len")?);
    let slot = u32::try_from(slot)
        .map_err(|_| Error::Invalid(format!("shm slot {slot} is out of range")))?;
    if field("fd").and_then(serde_json::Value::as_bool) == Some(true) {
        let fd = pipe.take_fd().ok_or_else(|| {
            Error::Invalid("a shm frame announced a descriptor that did not arrive".into())
        })?;
        mapped.insert(slot, Arc::new(MappedSlot::map(fd)?));
    }
    let map = mapped
        .get(&slot)
        .ok_or_else(|| Error::Invalid(format!("shm slot {slot} was never sent")))?;
    let weak = Arc::downgrade(peer);
    let release = Box::new(move || {
        if let Some(peer) = weak.upgrade() {
            let fields = Message::new().field("slot", slot).field("offset", offset);
            let meta = FrameMeta {
                channel: String::new(),
                seq: 0,
                kind: Kind::Release,
                id: None,
            };
            if let Ok(f) = encode(&fields, &meta, LINK_ENCODING) {
                let _ = peer.write(&f);
            }
        }
    });
    let region = shm::view(map, offset, len, release)?;
    let frame = decode_at(&region, &inner.limits, 0)?;
    if frame.meta.kind != Kind::Message {
        return Err(Error::Invalid(
            "a shared slot held a frame that is not a message".into(),
        ));
    }
    Ok(frame)
}

/// Encodes `message` with `stager`'s sending rules; host tensors on a
/// channel without casts or checksums skip the stager.
fn encode_with(stager: &Stager, message: &Message, meta: &FrameMeta) -> Result<Encoded> {
    let on_host = message.tensors().all(|(_, t)| t.device() == Device::Cpu);
    if on_host && !stager.prepares_host_tensors() {
        return encode(message, meta, LINK_ENCODING);
    }
    let (wire, origins) = stager.prepare(message)?;
    encode_staged(&wire, &origins, meta, LINK_ENCODING)
}

fn handle_frame(inner: &Arc<NodeInner>, peer: &Arc<Peer>, frame: Frame, first_byte: Instant) {
    let Frame {
        meta,
        message,
        tensors,
        ..
    } = frame;
    match meta.kind {
        Kind::Message => inner.deliver(Received {
            channel: meta.channel,
            seq: meta.seq,
            message,
            tensors,
            from: peer.label.clone(),
            first_byte,
        }),
        Kind::Subscribe | Kind::Unsubscribe => inner.on_control(peer, &meta.channel, meta.kind),
        // Only shm links carry these, and their reader handles them before here.
        Kind::Shm | Kind::Release => {
            eprintln!(
                "tensorferry: {}: ignoring a shm frame from {}",
                inner.name, peer.label
            );
        }
        Kind::Request => match meta.id {
            Some(id) => inner.dispatch_request(peer, &meta.channel, id, message, &tensors),
            None => eprintln!(
                "tensorferry: {}: request without id from {}",
                inner.name, peer.label
            ),
        },
        Kind::Reply => {
            if let Some(id) = meta.id {
                inner.complete(id, Ok((message, tensors)));
            }
        }
        Kind::Error => {
            if let Some(id) = meta.id {
                let text = |k: &str| {
                    message
                        .get_field(k)
                        .and_then(|v| v.as_str())
                        .unwrap_or("")
                        .to_string()
                };
                inner.complete(
                    id,
                    Err(Error::Remote {
                        channel: meta.channel.clone(),
                        code: text("code"),
                        message: text("message"),
                    }),
                );
            }
        }
    }
}

fn spawn_outlet(peer: &Arc<Peer>, spec: &ChannelSpec) -> Arc<Outlet> {
    let outlet = Arc::new(Outlet {
        queue: Queue::new(spec),
        inflight: AtomicU64::new(0),
    });
    let o = Arc::clone(&outlet);
    let p = Arc::downgrade(peer);
    let spawned = thread::Builder::new()
        .name("tf-write".into())
        .spawn(move || loop {
            let frame = match o.queue.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(f) => f,
                Err(RecvTimeoutError::Timeout) if !o.queue.closed.load(Ordering::Acquire) => {
                    continue
                }
                Err(_) => return,
            };
            let Some(peer) = p.upgrade() else { return };
            let ok = peer.alive.load(Ordering::Acquire) && write_outgoing(&peer, frame).is_ok();
            o.inflight.fetch_sub(1, Ordering::AcqRel);
            if !ok {
                peer.sever();
                // Drain what is queued so publishers waiting on a flush are released.
                while o.queue.rx.try_recv().is_ok() {
                    o.inflight.fetch_sub(1, Ordering::AcqRel);
                }
                return;
            }
        });
    if spawned.is_err() {
        outlet.queue.closed.store(true, Ordering::Release);
    }
    outlet
}

/// Writes one queued item to its peer.
fn write_outgoing(peer: &Peer, item: Outgoing) -> Result<()> {
    match item {
        Outgoing::Frame(frame) => peer.write(&frame),
        Outgoing::Shm {
            held,
            len,
            channel,
            seq,
        } => {
            let Link::Unix {
                writer,
                known,
                awaiting,
                ..
            } = &peer.link
            else {
                return Err(Error::Invalid(
                    "a shared-memory frame for a peer without shared memory".into(),
                ));
            };
            let id = held.0.id;
            let first = known.lock().expect("lock is never poisoned").insert(id);
            let pointer = Message::new()
                .field("slot", id)
                .field("offset", 0)
                .field("len", len)
                .field("fd", first);
            let meta = FrameMeta {
                channel,
                seq,
                kind: Kind::Shm,
                id: None,
            };
            let frame = encode(&pointer, &meta, LINK_ENCODING)?;
            let mut bytes = Vec::with_capacity(frame.frame_len() as usize);
            frame
                .write_to(&mut bytes)
                .map_err(|e| Error::io("encoding a shm frame", e))?;
            awaiting
                .lock()
                .expect("lock is never poisoned")
                .insert((id, 0), held);
            let mut w = writer.lock().expect("writer lock is never poisoned");
            // The descriptor goes first, through the socket: the reader waits
            // for it when the frame announcing it comes through the pipe.
            let fd = first.then(|| held_fd(awaiting, id)).flatten();
            fd.map_or(Ok(()), |fd| w.send_fd(fd))
                .and_then(|()| w.write_all(&bytes))
                .and_then(|()| w.flush())
                .map_err(|e| Error::io(format!("writing to {}", peer.label), e))
        }
    }
}

fn held_fd(awaiting: &Mutex<HashMap<(u32, u64), SlotUse>>, id: u32) -> Option<std::os::fd::RawFd> {
    awaiting
        .lock()
        .expect("lock is never poisoned")
        .get(&(id, 0))
        .map(|h| h.0.fd())
}

fn run_service(
    channel: &str,
    mut handler: Box<dyn Handler>,
    output: &Schema,
    requests: &Receiver<(Message, ReplyTo)>,
) {
    for (request, reply_to) in requests {
        send_reply(
            &reply_to,
            answer(channel, handler.as_mut(), output, request),
        );
    }
    handler.fini();
}

/// Runs `exec` on one request, turning a panic into an error reply and checking
/// the reply against the output schema.
fn answer(
    channel: &str,
    handler: &mut dyn Handler,
    output: &Schema,
    request: Message,
) -> std::result::Result<Message, ServiceError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.exec(request))) {
        Ok(Ok(reply)) => match output.check(&reply) {
            Ok(()) => Ok(reply),
            Err(why) => Err(ServiceError::new(
                "bad_reply",
                format!("the handler's reply {why}"),
            )),
        },
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ServiceError::new(
            "handler_panicked",
            format!("the handler of `{channel}` panicked"),
        )),
    }
}

fn send_reply(to: &ReplyTo, result: std::result::Result<Message, ServiceError>) {
    match &to.peer.link {
        Link::Stream { .. } | Link::Unix { .. } => {
            let (kind, message) = match result {
                Ok(m) => (Kind::Reply, m),
                Err(e) => (
                    Kind::Error,
                    Message::new()
                        .field("code", e.code)
                        .field("message", e.message),
                ),
            };
            let meta = FrameMeta {
                channel: to.channel.clone(),
                seq: 0,
                kind,
                id: Some(to.id),
            };
            let encoded = match &to.stager {
                Some(stager) => encode_with(stager, &message, &meta),
                None => encode(&message, &meta, LINK_ENCODING),
            };
            match encoded {
                Ok(frame) => {
                    let _ = to.peer.write(&frame);
                }
                Err(e) => {
                    let fallback = Message::new().field("code", "bad_reply").field(
                        "message",
                        json!(format!("the reply cannot be encoded: {e}")),
                    );
                    if let Ok(frame) = encode(
                        &fallback,
                        &FrameMeta {
                            kind: Kind::Error,
                            ..meta
                        },
                        LINK_ENCODING,
                    ) {
                        let _ = to.peer.write(&frame);
                    }
                }
            }
        }
        Link::Inproc { remote, .. } => {
            if let Some(remote) = remote.upgrade() {
                let result = result.map_err(|e| Error::Remote {
                    channel: to.channel.clone(),
                    code: e.code,
                    message: e.message,
                });
                remote.complete(to.id, result.map(|m| (m, Vec::new())));
            }
        }
    }
}

/// Publishes messages on one channel.
pub struct Publisher {
    node: Arc<NodeInner>,
    _guard: Arc<Guard>,
    channel: String,
    seq: AtomicU64,
}

impl Publisher {
    /// The channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Sends `message` to every subscriber: this node's by reference, each
    /// peer's through its queue (encoded once for all of them). Under the
    /// channel's `block` policy this waits while a subscriber's queue is full.
    ///
    /// # Errors
    ///
    /// When the message cannot be encoded (duplicate names, a tensor not on the host).
    pub fn send(&self, message: Message) -> Result<()> {
        if self.node.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        self.dispatch(seq, Some(message), None)
    }

    /// Lays out a message of `fields` (a message whose tensors are ignored) and
    /// the host tensors `(name, dtype, shape)` directly in shared memory: fill
    /// each tensor in place with [`Loan::fill`], then [`Loan::send`]. Subscribers
    /// over `shm://` get it with no copy at all; others get one copy.
    ///
    /// # Errors
    ///
    /// Duplicate names, sizes that overflow, or shared memory that cannot be created.
    pub fn loan(&self, fields: &Message, tensors: &[(&str, DType, &[usize])]) -> Result<Loan<'_>> {
        if self.node.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        if self
            .node
            .stager(&self.channel, Direction::Forward)?
            .prepares_host_tensors()
        {
            return Err(Error::Invalid(format!(
                "channel `{}` casts or checksums tensors before they travel, and a loan sends its bytes as laid out; use send()",
                self.channel
            )));
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let layout = layout(
            &FrameMeta::message(self.channel.clone(), seq),
            fields.fields(),
            tensors,
        )?;
        let len = usize::try_from(layout.frame_len)
            .map_err(|_| Error::Invalid("frame too large".into()))?;
        let held = self.node.slots.take(len)?;
        held.0
            .with_bytes(|bytes| bytes[..layout.head.len()].copy_from_slice(&layout.head));
        Ok(Loan {
            publisher: self,
            held,
            seq,
            frame_len: layout.frame_len,
            names: tensors.iter().map(|(n, _, _)| n.to_string()).collect(),
            spans: layout.spans,
        })
    }

    /// Hands a message to every subscriber. `message` is the message itself
    /// when the caller has one; `slot` holds the encoded frame when it is
    /// already in shared memory (a loan).
    fn dispatch(
        &self,
        seq: u64,
        mut message: Option<Message>,
        mut slot: Option<(SlotUse, u64)>,
    ) -> Result<()> {
        let now = Instant::now();
        let peers = self.node.live_peers();
        let needs_message = peers
            .iter()
            .any(|p| !matches!(p.link, Link::Unix { .. }) && p.wants(&self.channel).is_some())
            || self.has_local_subscribers();
        if message.is_none() && needs_message {
            // A loan reaching non-shm subscribers: decode a copy of the frame.
            let (held, len) = slot.as_ref().expect("a loan always has its slot");
            let bytes = held
                .0
                .with_bytes(|b| HostBuffer::copy_from(&b[..*len as usize]));
            message = Some(decode_at(&bytes, &self.node.limits, 0)?.message);
        }
        let mut encoded: Option<Arc<Encoded>> = None;
        for peer in peers {
            let Some(outlet) = peer.wants(&self.channel) else {
                continue;
            };
            match (&peer.link, outlet) {
                (Link::Stream { .. } | Link::Unix { .. }, Some(outlet)) => {
                    let unix = matches!(peer.link, Link::Unix { .. });
                    if encoded.is_none() && (!unix || slot.is_none()) {
                        let meta = FrameMeta::message(self.channel.clone(), seq);
                        let m = message
                            .as_ref()
                            .expect("a message is at hand when no slot is");
                        encoded = Some(Arc::new(self.node.encode_for(m, &meta)?));
                    }
                    let item = if unix {
                        if slot.is_none() {
                            slot =
                                Some(self.copy_to_slot(encoded.as_ref().expect("encoded above"))?);
                        }
                        let (held, len) = slot.as_ref().expect("filled above");
                        Outgoing::Shm {
                            held: held.share(),
                            len: *len,
                            channel: self.channel.clone(),
                            seq,
                        }
                    } else {
                        Outgoing::Frame(Arc::clone(encoded.as_ref().expect("encoded above")))
                    };
                    outlet.inflight.fetch_add(1, Ordering::AcqRel);
                    if !outlet.queue.push(item) {
                        outlet.inflight.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                (Link::Inproc { remote, .. }, _) => {
                    let m = message.as_ref().expect("decoded above for non-shm peers");
                    m.check_names()?;
                    if let Some(remote) = remote.upgrade() {
                        remote.deliver(Received {
                            channel: self.channel.clone(),
                            seq,
                            message: m.clone(),
                            tensors: Vec::new(),
                            from: format!("inproc peer {}", self.node.name),
                            first_byte: now,
                        });
                    }
                }
                (Link::Stream { .. } | Link::Unix { .. }, None) => {}
            }
        }
        if let Some(message) = message {
            self.node.deliver(Received {
                channel: self.channel.clone(),
                seq,
                message,
                tensors: Vec::new(),
                from: "local".into(),
                first_byte: now,
            });
        }
        Ok(())
    }

    fn has_local_subscribers(&self) -> bool {
        let subs = self.node.subs.lock().expect("lock is never poisoned");
        subs.contains_key(&self.channel) || subs.contains_key(ALL_CHANNELS)
    }

    /// Copies an encoded frame into a free shared slot (the one copy of the shm path).
    fn copy_to_slot(&self, frame: &Encoded) -> Result<(SlotUse, u64)> {
        let len = frame.frame_len();
        let held = self
            .node
            .slots
            .take(usize::try_from(len).map_err(|_| Error::Invalid("frame too large".into()))?)?;
        held.0
            .with_bytes(|bytes| frame.copy_into(&mut bytes[..len as usize]))
            .map_err(|e| Error::io("writing into shared memory", e))?;
        Ok((held, len))
    }

    /// Subscribers reached: this node's own plus every peer that asked for the channel.
    pub fn subscribers(&self) -> usize {
        let local = {
            let subs = self.node.subs.lock().expect("lock is never poisoned");
            subs.get(&self.channel).map_or(0, Vec::len) + subs.get(ALL_CHANNELS).map_or(0, Vec::len)
        };
        local
            + self
                .node
                .live_peers()
                .iter()
                .filter(|p| p.wants(&self.channel).is_some())
                .count()
    }

    /// Waits until at least `n` subscribers are reached.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when fewer than `n` have subscribed after `timeout`.
    pub fn wait_for_subscribers(&self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.subscribers() < n {
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "waiting for {n} subscriber(s) of `{}` ({} so far)",
                        self.channel,
                        self.subscribers()
                    ),
                    ms: timeout.as_millis() as u64,
                });
            }
            thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Waits until every queued message has been written to its socket.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when messages are still queued after `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let queued: u64 = self
                .node
                .live_peers()
                .iter()
                .filter_map(|p| p.wants(&self.channel).flatten())
                .map(|o| o.inflight.load(Ordering::Acquire))
                .sum();
            if queued == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("flushing {queued} message(s) of `{}`", self.channel),
                    ms: timeout.as_millis() as u64,
                });
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Messages dropped by `drop_oldest` in the queues of peers subscribed to this channel.
    pub fn dropped(&self) -> u64 {
        self.node
            .live_peers()
            .iter()
            .filter_map(|p| p.wants(&self.channel).flatten())
            .map(|o| o.queue.dropped.load(Ordering::Relaxed))
            .sum()
    }
}

/// A message laid out in shared memory by [`Publisher::loan`], filled in place.
pub struct Loan<'p> {
    publisher: &'p Publisher,
    held: SlotUse,
    seq: u64,
    frame_len: u64,
    names: Vec<String>,
    spans: Vec<std::ops::Range<usize>>,
}

impl Loan<'_> {
    /// Lets `fill` write the bytes of tensor `name` in place (they start zeroed
    /// or with a previous message's bytes: write all of them).
    ///
    /// # Errors
    ///
    /// When the loan has no tensor `name`.
    pub fn fill<T>(&mut self, name: &str, fill: impl FnOnce(&mut [u8]) -> T) -> Result<T> {
        let i = self.names.iter().position(|n| n == name).ok_or_else(|| {
            Error::Invalid(format!(
                "the loan has no tensor `{name}`; it has: {}",
                self.names.join(", ")
            ))
        })?;
        let span = self.spans[i].clone();
        Ok(self.held.0.with_bytes(|b| fill(&mut b[span])))
    }

    /// The sequence number the message will carry.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Sends the message to every subscriber.
    ///
    /// # Errors
    ///
    /// When the node shut down, or a non-shm subscriber's copy cannot be made.
    pub fn send(self) -> Result<()> {
        let Loan {
            publisher,
            held,
            seq,
            frame_len,
            ..
        } = self;
        publisher.dispatch(seq, None, Some((held, frame_len)))
    }
}

/// Receives the messages of one channel.
pub struct Subscription {
    node: Arc<NodeInner>,
    _guard: Arc<Guard>,
    channel: String,
    queue: Arc<Queue<Delivery>>,
    /// False for a replay, which no publisher knows of.
    registered: bool,
}

/// A recording started by [`Node::record`]; dropping it stops it too.
pub struct Recording {
    stop: Arc<AtomicBool>,
    worker: Option<thread::JoinHandle<Result<u64>>>,
}

impl Recording {
    /// Stops recording: writes every message already taken, syncs the file,
    /// and returns how many messages the file holds.
    ///
    /// # Errors
    ///
    /// The first write or encode error (recording stopped there).
    pub fn stop(mut self) -> Result<u64> {
        self.finish()
    }

    fn finish(&mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Release);
        match self.worker.take() {
            Some(w) => w
                .join()
                .unwrap_or_else(|_| Err(Error::Invalid("the recording thread panicked".into()))),
            None => Ok(0),
        }
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            eprintln!("tensorferry: recording stopped: {e}");
        }
    }
}

impl Subscription {
    /// The channel.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next message, waiting as long as it takes.
    ///
    /// # Errors
    ///
    /// [`Error::PeerLost`] when the connection this subscription was made
    /// through is lost (once; later calls wait for other peers); [`Error::Closed`]
    /// when the node shut down.
    pub fn recv(&self) -> Result<Received> {
        loop {
            match self.queue.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(d) => return self.land(d),
                Err(RecvTimeoutError::Timeout) if self.node.closed.load(Ordering::Acquire) => {
                    return Err(Error::Closed)
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(Error::Closed),
            }
        }
    }

    /// The next message if one is queued.
    ///
    /// # Errors
    ///
    /// As [`recv`](Self::recv).
    pub fn try_recv(&self) -> Result<Option<Received>> {
        match self.queue.rx.try_recv() {
            Ok(d) => self.land(d).map(Some),
            Err(_) if self.node.closed.load(Ordering::Acquire) => Err(Error::Closed),
            Err(_) => Ok(None),
        }
    }

    /// The next message, waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`] when nothing arrives in time; otherwise as [`recv`](Self::recv).
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Received> {
        match self.queue.rx.recv_timeout(timeout) {
            Ok(d) => self.land(d),
            Err(_) if self.node.closed.load(Ordering::Acquire) => Err(Error::Closed),
            Err(_) => Err(Error::Timeout {
                what: format!("waiting for a message on `{}`", self.channel),
                ms: timeout.as_millis() as u64,
            }),
        }
    }

    /// Messages as they arrive; ends when the node shuts down.
    pub fn iter(&self) -> impl Iterator<Item = Result<Received>> + '_ {
        std::iter::from_fn(move || match self.recv() {
            Err(Error::Closed) => None,
            other => Some(other),
        })
    }

    /// Messages this subscription's queue dropped under `drop_oldest`.
    pub fn dropped(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }

    /// Brings a delivered message's tensors to their target devices.
    fn land(&self, delivery: Delivery) -> Result<Received> {
        let mut r = delivery?;
        r.message = self
            .node
            .land(&r.channel, Direction::Forward, r.message, &r.tensors)?;
        Ok(r)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::Release);
        if !self.registered {
            return;
        }
        let last = {
            let mut subs = self.node.subs.lock().expect("lock is never poisoned");
            let list = subs.entry(self.channel.clone()).or_default();
            list.retain(|q| !Arc::ptr_eq(q, &self.queue));
            let empty = list.is_empty();
            if empty {
                subs.remove(&self.channel);
            }
            empty
        };
        if last && !self.node.closed.load(Ordering::Acquire) {
            for peer in self.node.live_peers() {
                self.node.announce(&peer, &self.channel, Kind::Unsubscribe);
            }
        }
    }
}
