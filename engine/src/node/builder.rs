//! [`NodeBuilder`]: a node's settings, checked once in [`NodeBuilder::build`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tensorferry_device_map::{ChannelConfig, Inventory, SecretSource};

use super::services::Workers;
use super::stats::Counters;
use super::{Guard, Node, NodeInner};
use crate::address::Address;
use crate::error::{Error, Result};
use crate::pool::BufferPool;
use crate::reactor::Reactor;
use crate::signal::Signal;
use crate::transport::auth::Secret;
use crate::transport::shm::slots::SlotPool;
use crate::transport::stream::ProgressRule;
use crate::transport::tls::TlsConfig;
use crate::wire::Limits;

/// Builds a [`Node`]; everything is checked in [`build`](NodeBuilder::build).
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tensorferry_engine::Node;
///
/// let node = Node::builder()
///     .name("trainer-0")
///     .listen("tcp://127.0.0.1:0")
///     .connect_timeout(Duration::from_secs(2))
///     .io_threads(1)
///     .build()?;
/// assert_eq!(node.listen_addrs().len(), 1);
/// # Ok::<(), tensorferry_engine::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct NodeBuilder {
    name: String,
    listen: Vec<(String, bool)>,
    config: ChannelConfig,
    limits: Limits,
    connect_timeout: Duration,
    pool_idle_bytes: usize,
    receive_budget_bytes: u64,
    shm_bytes: usize,
    shm_uids: Vec<u32>,
    secret: Option<Secret>,
    tls: Option<TlsConfig>,
    /// `None`: requesters spin adaptively, I/O threads do not.
    busy_poll: Option<Duration>,
    progress_timeout: Duration,
    min_receive_rate: u64,
    io_threads: usize,
    service_threads: usize,
    inventory: Option<Inventory>,
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
            receive_budget_bytes: 8 << 30,
            shm_bytes: 4 << 30,
            shm_uids: Vec::new(),
            secret: None,
            tls: None,
            busy_poll: None,
            progress_timeout: Duration::from_secs(30),
            min_receive_rate: 64 << 10,
            io_threads: 1,
            service_threads: 2,
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

    /// Listens on `addr` (`inproc://NAME`, `shm://NAME`, `tcp://HOST:PORT`).
    /// TCP must be a loopback address; use
    /// [`listen_public`](Self::listen_public) to accept other hosts.
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.listen.push((addr.into(), false));
        self
    }

    /// Listens on `addr`, which may be reachable from other hosts (e.g. `tcp://0.0.0.0:7070`).
    pub fn listen_public(mut self, addr: impl Into<String>) -> Self {
        self.listen.push((addr.into(), true));
        self
    }

    /// Per-channel settings (queue depth, overflow policy, device maps, wire
    /// casts, checksums). Default: none, so every channel gets
    /// [`ChannelSpec::default`](tensorferry_device_map::ChannelSpec::default).
    /// Only the channels are taken: [`configure`](Self::configure) applies
    /// the file's `"node"` section too.
    pub fn channels(mut self, config: ChannelConfig) -> Self {
        self.config = config;
        self
    }

    /// Per-channel settings and the node's own from a configuration file's
    /// `"node"` section ([`NodeSection`](tensorferry_device_map::NodeSection)):
    /// name, listen addresses, receive budget, buffer pool, shared-memory
    /// size, limits, the shared secret (read now, from its file or
    /// variable), TLS files (read by `build`), `shm://` users, busy polling,
    /// threads and timeouts. What
    /// the section leaves out keeps its current value; calls made after
    /// this one override it.
    ///
    /// # Errors
    ///
    /// A secret that cannot be read, or a setting out of this platform's
    /// range; each names its key.
    pub fn configure(mut self, config: ChannelConfig) -> Result<Self> {
        let node = config.node().clone();
        let too_large = |key: &str, value: u64| {
            Error::Invalid(format!(
                "node.{key}: {value} is more than this platform can address"
            ))
        };
        if let Some(name) = node.name {
            self.name = name;
        }
        self.listen
            .extend(node.listen.into_iter().map(|a| (a, false)));
        self.listen
            .extend(node.listen_public.into_iter().map(|a| (a, true)));
        if let Some(n) = node.io_threads {
            self = self.io_threads(usize::try_from(n).unwrap_or(usize::MAX));
        }
        if let Some(n) = node.service_threads {
            self = self.service_threads(usize::try_from(n).unwrap_or(usize::MAX));
        }
        if let Some(b) = node.receive_budget {
            self.receive_budget_bytes = b;
        }
        if let Some(b) = node.pool_idle {
            self.pool_idle_bytes = usize::try_from(b).map_err(|_| too_large("pool_idle", b))?;
        }
        if let Some(b) = node.shm_bytes {
            self.shm_bytes = usize::try_from(b).map_err(|_| too_large("shm_bytes", b))?;
        }
        if let Some(us) = node.busy_poll_us {
            self.busy_poll = Some(Duration::from_micros(us));
        }
        if let Some(t) = node.connect_timeout {
            self.connect_timeout = t;
        }
        if let Some(t) = node.progress_timeout {
            self.progress_timeout = t;
        }
        if let Some(r) = node.min_receive_rate {
            self.min_receive_rate = r;
        }
        let l = &node.limits;
        if let Some(b) = l.header_bytes {
            self.limits.max_header_bytes =
                u32::try_from(b).map_err(|_| too_large("limits.header_bytes", b))?;
        }
        if let Some(n) = l.tensors {
            self.limits.max_tensors =
                usize::try_from(n).map_err(|_| too_large("limits.tensors", n))?;
        }
        if let Some(n) = l.buffers {
            self.limits.max_buffers =
                u32::try_from(n).map_err(|_| too_large("limits.buffers", n))?;
        }
        if let Some(b) = l.frame_bytes {
            self.limits.max_message_bytes = b;
        }
        match &node.secret {
            Some(SecretSource::File(path)) => {
                self.secret = Some(
                    Secret::from_file(path)
                        .map_err(|e| Error::Invalid(format!("node.secret_file: {e}")))?,
                );
            }
            Some(SecretSource::Env(var)) => {
                self.secret = Some(
                    Secret::from_env(var)
                        .map_err(|e| Error::Invalid(format!("node.secret_env: {e}")))?,
                );
            }
            None => {}
        }
        if let Some(uids) = node.shm_peer_uids {
            self.shm_uids = uids;
        }
        if let Some(tls) = node.tls {
            let mut config = TlsConfig::new();
            if let (Some(cert), Some(key)) = (tls.cert_file, tls.key_file) {
                config = config.cert_file(cert).key_file(key);
            }
            if let Some(ca) = tls.ca_file {
                config = config.ca_file(ca);
            }
            if let Some(ca) = tls.client_ca_file {
                config = config.client_ca_file(ca);
            }
            if let Some(name) = tls.server_name {
                config = config.server_name(name);
            }
            self.tls = Some(config);
        }
        self.config = config;
        Ok(self)
    }

    /// Decoder limits for frames from peers. Default [`Limits::default`].
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// How long connecting retries (with backoff) before giving up. Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Most bytes of receive buffers kept for reuse once their messages are
    /// done with; past it, buffers are freed. Default 1 GiB.
    pub fn pool_idle_bytes(mut self, bytes: usize) -> Self {
        self.pool_idle_bytes = bytes;
        self
    }

    /// Most bytes of received frames this node holds at once — arriving, or
    /// waiting in queues until their messages are dropped — over every
    /// connection together. A frame is let in only when its whole length
    /// fits (its memory becomes resident only as its bytes arrive); until
    /// then its connection is not read. A frame larger than the budget is
    /// refused and its connection closed. Default 8 GiB.
    pub fn receive_budget_bytes(mut self, bytes: u64) -> Self {
        self.receive_budget_bytes = bytes;
        self
    }

    /// Most bytes of shared-memory slots this node creates for `shm://`
    /// subscribers. Default 4 GiB; past it, publishers wait for receivers to
    /// release slots (a message larger than the limit still gets one slot).
    pub fn shm_bytes(mut self, bytes: usize) -> Self {
        self.shm_bytes = bytes;
        self
    }

    /// Authenticates every tcp peer, both ways, with this shared secret
    /// before its first frame (HMAC-SHA256 challenge–response: the secret
    /// never travels, an answer cannot be replayed); a peer without it is
    /// dropped and counted in [`NodeStats::rejected`](crate::NodeStats).
    /// Both ends must have the same secret. Read it from a file
    /// ([`Secret::from_file`]) or the environment ([`Secret::from_env`]),
    /// never from a command line. Default: none (any peer that reaches a
    /// listener is served). It authenticates; it does not encrypt.
    pub fn secret(mut self, secret: Secret) -> Self {
        self.secret = Some(secret);
        self
    }

    /// Speaks TLS 1.3 on every tcp connection of this node, dialed or
    /// accepted: its listeners show the certificate of `config`, it verifies
    /// the certificates of the listeners it dials against the CAs of
    /// `config` (for the host dialed, or `TlsConfig::server_name`), and with
    /// a client CA its listeners require dialers' certificates. Addresses
    /// stay `tcp://HOST:PORT`; a peer without TLS is refused, the dialer
    /// told what to configure ([`Error::Tls`](crate::Error::Tls)), the
    /// listener counting it in [`NodeStats::rejected`](crate::NodeStats).
    /// With a [`secret`](Self::secret) too, its challenge–response runs
    /// inside TLS. Files are read in [`build`](Self::build). Default: none
    /// (tcp is plaintext).
    pub fn tls(mut self, config: TlsConfig) -> Self {
        self.tls = Some(config);
        self
    }

    /// Lets processes of these users connect to this node's `shm://`
    /// listeners too. By default only processes of this process's own
    /// user may (checked with the socket's peer credentials before the
    /// connection is taken): the shared memory is theirs to read and write.
    pub fn shm_peer_uids(mut self, uids: impl IntoIterator<Item = u32>) -> Self {
        self.shm_uids = uids.into_iter().collect();
        self
    }

    /// Busy polling, for lower round-trip latency at the cost of a core kept
    /// busy: a requester waiting for its reply spins this long before it
    /// sleeps, and so does an I/O thread after each frame while this node
    /// awaits no reply (a responder catching the next request). Zero turns
    /// all spinning off.
    ///
    /// Default: spinning adapts. A requester spins for twice its node's
    /// recent reply wait, at most 50 µs, and not at all while replies take
    /// longer than that (one wait in 64 spins anyway, to notice replies
    /// that got fast again); an I/O thread that answered a request itself
    /// (an inline service) spins for the next one by the same rule, measured
    /// on the gaps between a reply and the next request, and a worker that
    /// answered one (a service on the worker pool) by that rule up to
    /// 200 µs, reading the request's connection itself meanwhile. Nothing
    /// else spins.
    pub fn busy_poll(mut self, spin: Duration) -> Self {
        self.busy_poll = Some(spin);
        self
    }

    /// How long a frame a peer has begun may go without enough of its
    /// bytes arriving: every `timeout`, at least
    /// [`min_receive_rate`](Self::min_receive_rate) × `timeout` more of it
    /// must have come (or the rest of it). A peer that stops mid-frame, or
    /// trickles one to keep its share of the receive budget, is then
    /// dropped (`Error::Misbehaved`, counted in `NodeStats::rejected`). Time
    /// a frame waits on this node (a full queue, the receive budget) does
    /// not count. Default 30 s; `Duration::ZERO` turns the check off.
    pub fn progress_timeout(mut self, timeout: Duration) -> Self {
        self.progress_timeout = timeout;
        self
    }

    /// The slowest a begun frame may arrive, in bytes per second, averaged
    /// over each [`progress_timeout`](Self::progress_timeout). Default 64 KiB/s:
    /// lower it for links slower than that.
    pub fn min_receive_rate(mut self, bytes_per_second: u64) -> Self {
        self.min_receive_rate = bytes_per_second;
        self
    }

    /// How many I/O threads drive the node's connections (each connection
    /// belongs to one). Default 1: one thread serves any number of peers.
    pub fn io_threads(mut self, threads: usize) -> Self {
        self.io_threads = threads.max(1);
        self
    }

    /// How many threads run service handlers that are not marked inline
    /// (started with the first such service). Default 2. A service runs one
    /// request at a time; several services share these threads.
    pub fn service_threads(mut self, threads: usize) -> Self {
        self.service_threads = threads.max(1);
        self
    }

    /// The devices tensors may land on, instead of the ones this host has
    /// (probed when first needed): for tests, and to keep a node off some
    /// devices.
    pub fn inventory(mut self, inventory: Inventory) -> Self {
        self.inventory = Some(inventory);
        self
    }

    /// Checks the settings, starts the I/O threads and binds every listen address.
    ///
    /// # Errors
    ///
    /// A channel configuration that is not valid (every error, with its
    /// place), a malformed address, a non-loopback address given to
    /// `listen`, an inproc name already taken, a socket that cannot be
    /// bound, or TLS files that cannot be read or do not fit together (a
    /// tcp listener with TLS needs a certificate and its key).
    pub fn build(self) -> Result<Node> {
        let errors = crate::delivery::validate(&self.config);
        if !errors.is_empty() {
            return Err(tensorferry_device_map::Error::Invalid { errors }.into());
        }
        let addrs = self
            .listen
            .iter()
            .map(|(text, public)| Ok((text.parse::<Address>()?, *public)))
            .collect::<Result<Vec<_>>>()?;
        let tls = self
            .tls
            .as_ref()
            .map(TlsConfig::load)
            .transpose()?
            .map(Arc::new);
        let reactor = Reactor::new(self.io_threads, &self.name)?;
        let inner = Arc::new_cyclic(|me| NodeInner {
            name: self.name,
            config: self.config,
            limits: self.limits,
            pool: BufferPool::with_budget(self.pool_idle_bytes, self.receive_budget_bytes),
            connect_timeout: self.connect_timeout,
            busy_poll: self.busy_poll.unwrap_or(Duration::ZERO),
            reply_spin: match self.busy_poll {
                Some(d) => crate::spin::Spin::fixed(d),
                None => crate::spin::Spin::adaptive(),
            },
            serve_spin: match self.busy_poll {
                Some(_) => crate::spin::Spin::fixed(Duration::ZERO),
                None => crate::spin::Spin::adaptive(),
            },
            progress: (!self.progress_timeout.is_zero()).then_some(ProgressRule {
                period: self.progress_timeout,
                min_bytes: (self.min_receive_rate as f64 * self.progress_timeout.as_secs_f64())
                    as u64,
            }),
            shm_uids: self.shm_uids,
            secret: self.secret,
            tls,
            inventory: self.inventory.map(Arc::new),
            deliveries: Mutex::new(HashMap::new()),
            listening: Mutex::new(Vec::new()),
            subs: Mutex::new(HashMap::new()),
            peers: Mutex::new(Vec::new()),
            services: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            taps: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            slots: SlotPool::new(
                self.shm_bytes,
                self.connect_timeout.max(Duration::from_secs(30)),
            ),
            reactor: Mutex::new(Some(reactor)),
            workers: Workers::new(self.service_threads),
            subscribers_changed: Signal::default(),
            routes: AtomicU64::new(0),
            lost_subscribers: Mutex::new(Vec::new()),
            counters: Counters::default(),
            stripes: Default::default(),
            me: me.clone(),
        });
        let node = Node {
            guard: Arc::new(Guard(Arc::clone(&inner))),
            inner,
        };
        for (addr, public) in &addrs {
            node.inner.listen(addr, *public)?;
        }
        Ok(node)
    }
}
