//! Pinned chunks: bytes between the host and a device through a fixed pool of
//! (pinned) host chunks, with copies in flight while the host fills or drains
//! the next chunk.
//!
//! A backend implements [`ChunkDevice`]: allocate a chunk, enqueue an
//! asynchronous copy between a chunk and a device buffer (each returns an
//! event), ask whether an event is done or wait for it. On top of it:
//!
//! - [`ChunkPool`]: the chunks of one device and direction, shared by every
//!   pipeline, sized by [`PinnedConfig`] (default 16 × 1 MiB).
//! - [`Upload`]: host to device into one buffer. [`Upload::write_from`] reads
//!   a source (a socket) straight into a chunk's host memory and enqueues its
//!   copy, then reads the next chunk while that copy runs;
//!   [`Upload::write`] does the same for bytes already in memory.
//! - [`OwnedUpload`]: the same pipeline owning its device handle, pool share
//!   and buffer, fed across calls (and threads) by a reader that must not
//!   block: it writes into [`OwnedUpload::space`] (the free part of the
//!   current chunk) and counts the bytes with [`OwnedUpload::advance`].
//! - [`download`]: device to host, several chunk copies in flight, each
//!   finished chunk handed in order to a sink (a socket write) while later
//!   ones are still copying.
//!
//! Copies of one pipeline are enqueued in byte order, each after the previous,
//! so offsets in a buffer strictly increase. The host waits only on events
//! (never on a whole stream), and only for the oldest copy of its own
//! pipeline.
//!
//! # The pool rule
//!
//! A pipeline that holds chunks never blocks on the pool: when it needs
//! another chunk and the pool has none free, it waits for its own oldest copy
//! and reuses that chunk. Only a pipeline holding none may wait for the pool,
//! and the chunks it waits for belong to pipelines that never wait for it, so
//! every wait ends. A pipeline also reuses its oldest chunk, rather than
//! taking another, as soon as that chunk's copy is done, and gives finished
//! chunks back early while another pipeline is waiting. Chunks go back to the
//! pool when a pipeline finishes or is dropped (after their copies are done),
//! also on errors.
//!
//! One case the rule cannot help: a thread that holds every taken chunk in
//! one unfinished pipeline and starts a second on the same pool would wait for
//! itself. The pool detects it and answers [`Error::PinnedExhausted`]
//! instead of hanging.
//!
//! # Examples
//!
//! The CUDA runtime implements [`ChunkDevice`]; through
//! [`Runtime`](super::Runtime) the same calls work on every backend:
//!
//! ```
//! use tensorferry_device_map::Device;
//! use tensorferry_kernels::runtime::Runtime;
//!
//! let rt = Runtime::open(Device::cuda(0)).unwrap_or(Runtime::Cpu);
//! let mut socket: &[u8] = &[1, 2, 3, 4, 5];
//! let buf = rt.upload_from(&mut socket, 5)?;
//! let mut out = Vec::new();
//! rt.download_to(&buf, &mut |bytes| {
//!     out.extend_from_slice(bytes);
//!     Ok(())
//! })?;
//! assert_eq!(out, [1, 2, 3, 4, 5]);
//! # Ok::<(), tensorferry_kernels::Error>(())
//! ```

use std::borrow::{Borrow, BorrowMut};
use std::collections::VecDeque;
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::ThreadId;

use super::backend::{range, read_some};
use crate::error::{Error, Result};
use crate::runtime::lock;

/// Environment variable with the bytes per pinned chunk (`1048576`, `1M`,
/// `256K`, `4MiB`); default [`PinnedConfig::DEFAULT_CHUNK_BYTES`].
pub const CHUNK_BYTES_VAR: &str = "TENSORFERRY_PINNED_CHUNK_BYTES";
/// Environment variable with the pinned chunks per device and direction;
/// default [`PinnedConfig::DEFAULT_CHUNKS`].
pub const CHUNKS_VAR: &str = "TENSORFERRY_PINNED_CHUNKS";

/// The size of one device's pinned pools: `chunks` chunks of `chunk_bytes`
/// each, per direction. Valid once made.
///
/// # Examples
///
/// ```
/// use tensorferry_kernels::runtime::pinned::PinnedConfig;
///
/// let config = PinnedConfig::new(4 << 20, 8)?;
/// assert_eq!(config.total_bytes(), 32 << 20);
/// assert!(PinnedConfig::new(0, 8).is_err());
/// # Ok::<(), tensorferry_kernels::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinnedConfig {
    chunk_bytes: usize,
    chunks: usize,
}

impl Default for PinnedConfig {
    fn default() -> Self {
        Self {
            chunk_bytes: Self::DEFAULT_CHUNK_BYTES,
            chunks: Self::DEFAULT_CHUNKS,
        }
    }
}

impl PinnedConfig {
    /// Default bytes per chunk: 1 MiB.
    pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
    /// Default chunks per device and direction: 16.
    pub const DEFAULT_CHUNKS: usize = 16;
    /// Largest chunk: 1 GiB.
    pub const MAX_CHUNK_BYTES: usize = 1 << 30;
    /// Most chunks per pool.
    pub const MAX_CHUNKS: usize = 1024;
    /// Largest pool (`chunk_bytes × chunks`): 16 GiB of pinned memory.
    pub const MAX_TOTAL_BYTES: usize = 16 << 30;

    /// `chunks` chunks of `chunk_bytes` bytes.
    ///
    /// # Errors
    ///
    /// [`Error::BadPinned`] for zero, or for more than
    /// [`PinnedConfig::MAX_CHUNK_BYTES`], [`PinnedConfig::MAX_CHUNKS`] or
    /// [`PinnedConfig::MAX_TOTAL_BYTES`] in all.
    pub fn new(chunk_bytes: usize, chunks: usize) -> Result<Self> {
        Self::checked(chunk_bytes, chunks, "PinnedConfig::new")
    }

    /// The configuration from [`CHUNK_BYTES_VAR`] and [`CHUNKS_VAR`], each
    /// defaulting when unset.
    ///
    /// # Errors
    ///
    /// [`Error::BadPinned`] for a value that is not a size or is out of range.
    pub fn from_env() -> Result<Self> {
        let chunk_bytes = env_size(CHUNK_BYTES_VAR, "chunk bytes", Self::DEFAULT_CHUNK_BYTES)?;
        let chunks = env_size(CHUNKS_VAR, "chunks", Self::DEFAULT_CHUNKS)?;
        Self::checked(chunk_bytes, chunks, "the environment")
    }

    fn checked(chunk_bytes: usize, chunks: usize, origin: &str) -> Result<Self> {
        let bad = |setting, value: usize, reason: String| Error::BadPinned {
            setting,
            value: value.to_string(),
            origin: origin.to_string(),
            reason,
        };
        if !(1..=Self::MAX_CHUNK_BYTES).contains(&chunk_bytes) {
            return Err(bad(
                "chunk bytes",
                chunk_bytes,
                format!(
                    "set it between 1 and {} (default {})",
                    Self::MAX_CHUNK_BYTES,
                    Self::DEFAULT_CHUNK_BYTES
                ),
            ));
        }
        if !(1..=Self::MAX_CHUNKS).contains(&chunks) {
            return Err(bad(
                "chunks",
                chunks,
                format!(
                    "set it between 1 and {} (default {})",
                    Self::MAX_CHUNKS,
                    Self::DEFAULT_CHUNKS
                ),
            ));
        }
        let total = chunk_bytes.saturating_mul(chunks);
        if total > Self::MAX_TOTAL_BYTES {
            return Err(bad(
                "chunk bytes × chunks",
                total,
                format!(
                    "a pool may pin at most {} bytes; use fewer or smaller chunks",
                    Self::MAX_TOTAL_BYTES
                ),
            ));
        }
        Ok(Self {
            chunk_bytes,
            chunks,
        })
    }

    /// Bytes per chunk.
    pub fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    /// Chunks per pool.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// Bytes of one pool: `chunk_bytes × chunks`.
    pub fn total_bytes(&self) -> usize {
        self.chunk_bytes * self.chunks
    }
}

/// `var` as a size (`123`, `64K`, `1M`, `2MiB`, `1G`), or `default` when unset.
fn env_size(var: &'static str, setting: &'static str, default: usize) -> Result<usize> {
    let Ok(text) = std::env::var(var) else {
        return Ok(default);
    };
    parse_size(&text).ok_or_else(|| Error::BadPinned {
        setting,
        value: text.clone(),
        origin: var.to_string(),
        reason: "write a whole number, optionally with K, M or G (KiB, MiB, GiB)".to_string(),
    })
}

fn parse_size(text: &str) -> Option<usize> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: usize = digits.parse().ok()?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// Which way a pool's chunks carry bytes; a backend may allocate them
/// differently (CUDA: write-combined memory for [`Direction::ToDevice`],
/// which the CPU writes fast but reads slowly).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Host to device: the host writes chunks, copies read them.
    ToDevice,
    /// Device to host: copies write chunks, the host reads them.
    ToHost,
}

/// A device that copies between (pinned) host chunks and its buffers
/// asynchronously, in the order the copies are enqueued, and reports
/// completion through events.
pub trait ChunkDevice {
    /// Host memory of one chunk, which copies can read and write directly.
    type Chunk: Send;
    /// Device memory.
    type Buffer: ?Sized;
    /// Marks the end of one enqueued copy.
    type Event;

    /// The length of `buf` in bytes.
    fn buffer_len(&self, buf: &Self::Buffer) -> usize;

    /// A new chunk of `bytes` bytes for copies in `direction`.
    ///
    /// # Errors
    ///
    /// The backend's allocation error.
    fn alloc_chunk(&self, bytes: usize, direction: Direction) -> Result<Self::Chunk>;

    /// The chunk's host memory (all of it), borrowed with the chunk. Callers
    /// only ask when no copy that uses the chunk is in flight.
    ///
    /// # Errors
    ///
    /// The backend's error when the memory cannot be reached.
    fn host_mut<'c>(&self, chunk: &'c mut Self::Chunk) -> Result<&'c mut [u8]>;

    /// Runs `f` on the chunk's host memory (all of it), under the same
    /// condition as [`ChunkDevice::host_mut`].
    ///
    /// # Errors
    ///
    /// As [`ChunkDevice::host_mut`].
    fn with_host<R>(&self, chunk: &mut Self::Chunk, f: impl FnOnce(&mut [u8]) -> R) -> Result<R> {
        Ok(f(self.host_mut(chunk)?))
    }

    /// Enqueues a copy of the chunk's first `len` bytes into `dst` at
    /// `offset`, after every copy enqueued before it on this device handle.
    ///
    /// # Errors
    ///
    /// The backend's error; an enqueue that fails leaves nothing in flight.
    ///
    /// # Safety
    ///
    /// `len` is at most the chunk's length and `offset + len` at most `dst`'s.
    /// Until the returned event is done, the caller neither reaches the
    /// chunk's host memory nor frees or reuses the chunk, nor frees `dst`.
    unsafe fn copy_to_device(
        &self,
        chunk: &Self::Chunk,
        len: usize,
        dst: &mut Self::Buffer,
        offset: usize,
    ) -> Result<Self::Event>;

    /// Enqueues a copy of `len` bytes of `src` from `offset` into the chunk's
    /// first `len` bytes, after every copy enqueued before it.
    ///
    /// # Errors
    ///
    /// As [`ChunkDevice::copy_to_device`].
    ///
    /// # Safety
    ///
    /// As [`ChunkDevice::copy_to_device`]: the ranges fit, and the chunk is
    /// left alone and `src` kept alive until the event is done.
    unsafe fn copy_to_host(
        &self,
        src: &Self::Buffer,
        offset: usize,
        chunk: &mut Self::Chunk,
        len: usize,
    ) -> Result<Self::Event>;

    /// True once the copy behind `event` is done; never blocks.
    ///
    /// # Errors
    ///
    /// The copy's error (or an earlier asynchronous one).
    fn is_done(&self, event: &Self::Event) -> Result<bool>;

    /// Blocks until the copy behind `event` is done.
    ///
    /// # Errors
    ///
    /// As [`ChunkDevice::is_done`].
    fn wait(&self, event: &Self::Event) -> Result<()>;
}

/// The pinned chunks of one device and direction, shared by every pipeline
/// on it: allocated on first use (at most [`PinnedConfig::chunks`]), reused,
/// freed with the pool. See the module docs for the rule that hands them out.
pub struct ChunkPool<C> {
    name: String,
    config: PinnedConfig,
    direction: Direction,
    state: Mutex<PoolState<C>>,
    returned: Condvar,
}

struct PoolState<C> {
    free: Vec<C>,
    allocated: usize,
    /// Chunks taken, by the thread that took them.
    holders: Vec<(ThreadId, usize)>,
    /// Threads blocked in [`ChunkPool::take`].
    waiting: usize,
}

impl<C> PoolState<C> {
    fn held_by(&self, thread: ThreadId) -> usize {
        self.holders
            .iter()
            .find(|(t, _)| *t == thread)
            .map_or(0, |(_, n)| *n)
    }

    fn count(&mut self, thread: ThreadId, up: bool) {
        match self.holders.iter().position(|(t, _)| *t == thread) {
            Some(i) if up => self.holders[i].1 += 1,
            Some(i) => {
                self.holders[i].1 -= 1;
                if self.holders[i].1 == 0 {
                    self.holders.swap_remove(i);
                }
            }
            None if up => self.holders.push((thread, 1)),
            None => {}
        }
    }
}

impl<C> std::fmt::Debug for ChunkPool<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkPool")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("direction", &self.direction)
            .finish_non_exhaustive()
    }
}

impl<C> ChunkPool<C> {
    /// An empty pool named `name` (for messages, e.g. `cuda:0 host-to-device`).
    pub fn new(name: impl Into<String>, config: PinnedConfig, direction: Direction) -> Self {
        Self {
            name: name.into(),
            config,
            direction,
            state: Mutex::new(PoolState {
                free: Vec::new(),
                allocated: 0,
                holders: Vec::new(),
                waiting: 0,
            }),
            returned: Condvar::new(),
        }
    }

    /// The pool's size.
    pub fn config(&self) -> PinnedConfig {
        self.config
    }

    /// The direction its chunks carry bytes.
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// Chunks allocated so far.
    pub fn allocated(&self) -> usize {
        lock(&self.state).allocated
    }

    /// Chunks taken by pipelines now.
    pub fn in_use(&self) -> usize {
        let state = lock(&self.state);
        state.allocated - state.free.len()
    }

    fn has_waiters(&self) -> bool {
        lock(&self.state).waiting > 0
    }

    /// A free chunk, or a new one while fewer than `chunks` exist.
    fn pop<D: ChunkDevice<Chunk = C>>(
        &self,
        state: &mut PoolState<C>,
        dev: &D,
    ) -> Result<Option<C>> {
        if let Some(chunk) = state.free.pop() {
            return Ok(Some(chunk));
        }
        if state.allocated < self.config.chunks {
            let chunk = dev.alloc_chunk(self.config.chunk_bytes, self.direction)?;
            state.allocated += 1;
            tracing::trace!(
                pool = %self.name,
                allocated = state.allocated,
                chunk_bytes = self.config.chunk_bytes,
                "allocated a pinned chunk"
            );
            return Ok(Some(chunk));
        }
        Ok(None)
    }
}

/// A handle on a pool: borrowed by a pipeline that lives within one call,
/// shared (`Arc`) by one that outlives it ([`OwnedUpload`]).
trait PoolHandle<C>: Borrow<ChunkPool<C>> + Clone {}

impl<C, T: Borrow<ChunkPool<C>> + Clone> PoolHandle<C> for T {}

fn pool_of<C, P: PoolHandle<C>>(handle: &P) -> &ChunkPool<C> {
    handle.borrow()
}

fn lease<C, P: PoolHandle<C>>(pool: &P, state: &mut PoolState<C>, chunk: C) -> Lease<C, P> {
    let thread = std::thread::current().id();
    state.count(thread, true);
    Lease {
        pool: pool.clone(),
        chunk: Some(chunk),
        thread,
    }
}

/// A chunk if one is free (or may still be allocated) now.
fn try_take<D: ChunkDevice, P: PoolHandle<D::Chunk>>(
    pool: &P,
    dev: &D,
) -> Result<Option<Lease<D::Chunk, P>>> {
    let p = pool_of(pool);
    let mut state = lock(&p.state);
    let chunk = p.pop(&mut state, dev)?;
    Ok(chunk.map(|c| lease(pool, &mut state, c)))
}

/// A chunk, waiting for one to come back when all are taken. Only for a
/// pipeline that holds none.
fn take<D: ChunkDevice, P: PoolHandle<D::Chunk>>(pool: &P, dev: &D) -> Result<Lease<D::Chunk, P>> {
    let me = std::thread::current().id();
    let p = pool_of(pool);
    let mut state = lock(&p.state);
    loop {
        if let Some(chunk) = p.pop(&mut state, dev)? {
            return Ok(lease(pool, &mut state, chunk));
        }
        // Every chunk is out. If this thread holds all of them (in a
        // pipeline it has not finished), nobody else can give one back.
        let mine = state.held_by(me);
        if mine >= state.allocated {
            return Err(Error::PinnedExhausted {
                pool: p.name.clone(),
                chunks: state.allocated,
            });
        }
        tracing::trace!(pool = %p.name, "every pinned chunk is taken; waiting for one");
        state.waiting += 1;
        state = p
            .returned
            .wait(state)
            .unwrap_or_else(PoisonError::into_inner);
        state.waiting -= 1;
    }
}

/// A chunk taken from a pool; it goes back on drop. Whoever drops it makes
/// sure no copy still uses it.
struct Lease<C, P: PoolHandle<C>> {
    pool: P,
    chunk: Option<C>,
    /// The thread it is counted against (for the pool's self-wait check).
    thread: ThreadId,
}

impl<C, P: PoolHandle<C>> Lease<C, P> {
    fn chunk(&self) -> &C {
        self.chunk
            .as_ref()
            .expect("a lease holds its chunk until drop")
    }

    fn chunk_mut(&mut self) -> &mut C {
        self.chunk
            .as_mut()
            .expect("a lease holds its chunk until drop")
    }

    /// Counts the chunk against `me` from now on (its pipeline moved there).
    fn adopt(&mut self, state: &mut PoolState<C>, me: ThreadId) {
        if self.thread != me {
            state.count(self.thread, false);
            state.count(me, true);
            self.thread = me;
        }
    }
}

impl<C, P: PoolHandle<C>> Drop for Lease<C, P> {
    fn drop(&mut self) {
        if let Some(chunk) = self.chunk.take() {
            let pool = pool_of(&self.pool);
            let mut state = lock(&pool.state);
            state.free.push(chunk);
            state.count(self.thread, false);
            drop(state);
            pool.returned.notify_one();
        }
    }
}

/// One enqueued copy: its chunk, its event, and how many bytes it moves.
struct Flight<D: ChunkDevice, P: PoolHandle<D::Chunk>> {
    lease: Lease<D::Chunk, P>,
    event: D::Event,
    len: usize,
}

/// A pipeline's copies in flight, oldest first. On drop it waits for them
/// before their chunks go back to the pool (a copy may still be reading or
/// writing one); their errors were or will be reported by the call that saw
/// them.
struct Flights<D: ChunkDevice, R: Borrow<D>, P: PoolHandle<D::Chunk>> {
    dev: R,
    pool: P,
    queue: VecDeque<Flight<D, P>>,
}

impl<D: ChunkDevice, R: Borrow<D>, P: PoolHandle<D::Chunk>> Flights<D, R, P> {
    fn new(dev: R, pool: P) -> Self {
        Self {
            dev,
            pool,
            queue: VecDeque::new(),
        }
    }

    fn dev(&self) -> &D {
        self.dev.borrow()
    }

    fn pool(&self) -> &ChunkPool<D::Chunk> {
        pool_of(&self.pool)
    }

    /// Gives finished chunks back while another pipeline waits for one,
    /// keeping at least `keep`.
    fn yield_surplus(&mut self, keep: usize) -> Result<()> {
        while self.queue.len() > keep
            && self.pool().has_waiters()
            && self.dev().is_done(&self.queue[0].event)?
        {
            self.queue.pop_front();
        }
        Ok(())
    }

    /// The chunk for the next copy, by the pool rule: the oldest chunk if its
    /// copy is done; else a free one; else, holding some, the oldest after
    /// its copy; only when holding none, whatever the pool gives back first.
    fn next_chunk(&mut self) -> Result<Lease<D::Chunk, P>> {
        self.yield_surplus(1)?;
        let Some(oldest) = self.queue.front() else {
            return take(&self.pool, self.dev());
        };
        if !self.dev().is_done(&oldest.event)? {
            if let Some(lease) = try_take(&self.pool, self.dev())? {
                return Ok(lease);
            }
            self.dev().wait(&oldest.event)?;
        }
        Ok(self.queue.pop_front().expect("checked non-empty").lease)
    }

    /// Waits for every copy, oldest first; the first error is returned after
    /// all are done.
    fn finish(&mut self) -> Result<()> {
        let mut first = Ok(());
        while let Some(flight) = self.queue.pop_front() {
            let done = self.dev().wait(&flight.event);
            if first.is_ok() {
                first = done;
            }
        }
        first
    }
}

impl<D: ChunkDevice, R: Borrow<D>, P: PoolHandle<D::Chunk>> Drop for Flights<D, R, P> {
    fn drop(&mut self) {
        while let Some(flight) = self.queue.pop_front() {
            let _ = self.dev().wait(&flight.event);
        }
    }
}

/// The host-to-device pipeline behind [`Upload`] and [`OwnedUpload`]: the
/// device `R`, pool `P` and destination `B` borrowed or owned.
///
/// Fields drop in order: the filling chunk (no copy uses it), then the
/// copies in flight (waited for), then the destination.
struct Pipe<D, R, P, B>
where
    D: ChunkDevice,
    R: Borrow<D>,
    P: PoolHandle<D::Chunk>,
    B: BorrowMut<D::Buffer>,
{
    filling: Option<(Lease<D::Chunk, P>, usize)>,
    flights: Flights<D, R, P>,
    dst: B,
    /// Where the filling chunk lands.
    at: usize,
    end: usize,
    /// The thread the pipeline's chunks are counted against.
    thread: ThreadId,
}

impl<D, R, P, B> Pipe<D, R, P, B>
where
    D: ChunkDevice,
    R: Borrow<D>,
    P: PoolHandle<D::Chunk>,
    B: BorrowMut<D::Buffer>,
{
    fn new(dev: R, pool: P, dst: B, offset: usize) -> Result<Self> {
        let end = dev.borrow().buffer_len(dst.borrow());
        if offset > end {
            return Err(Error::SizeMismatch {
                op: "upload",
                what: "device buffer",
                expected: offset,
                actual: end,
            });
        }
        Ok(Self {
            filling: None,
            flights: Flights::new(dev, pool),
            dst,
            at: offset,
            end,
            thread: std::thread::current().id(),
        })
    }

    fn position(&self) -> usize {
        self.at + self.filling.as_ref().map_or(0, |(_, n)| *n)
    }

    fn room(&self, len: usize) -> Result<()> {
        let position = self.position();
        if position.checked_add(len).is_none_or(|e| e > self.end) {
            return Err(Error::SizeMismatch {
                op: "upload",
                what: "device buffer",
                expected: position.saturating_add(len),
                actual: self.end,
            });
        }
        Ok(())
    }

    /// Counts the pipeline's chunks against the calling thread, when it is
    /// not the one that used it last (an owned pipeline moves between
    /// threads), so the pool's self-wait check stays right.
    fn adopt(&mut self) {
        let me = std::thread::current().id();
        if me == self.thread {
            return;
        }
        self.thread = me;
        let mut state = lock(&pool_of(&self.flights.pool).state);
        if let Some((lease, _)) = &mut self.filling {
            lease.adopt(&mut state, me);
        }
        for flight in &mut self.flights.queue {
            flight.lease.adopt(&mut state, me);
        }
    }

    /// Bytes the filling chunk takes before its copy: a chunk never reaches
    /// past the buffer, so it is full at the end.
    fn cap(&self) -> usize {
        self.flights
            .pool()
            .config()
            .chunk_bytes()
            .min(self.end - self.at)
    }

    /// The free part of the filling chunk (taking one first if needed);
    /// empty once every byte is in.
    fn space(&mut self) -> Result<&mut [u8]> {
        self.adopt();
        let cap = self.cap();
        if cap == 0 {
            return Ok(&mut []);
        }
        if self.filling.is_none() {
            self.filling = Some((self.flights.next_chunk()?, 0));
        }
        let (lease, filled) = self.filling.as_mut().expect("taken above");
        let host = self.flights.dev().host_mut(lease.chunk_mut())?;
        let chunk = host.len();
        host.get_mut(*filled..cap).ok_or(Error::SizeMismatch {
            op: "upload",
            what: "pinned chunk",
            expected: cap,
            actual: chunk,
        })
    }

    /// Counts `n` bytes written into [`Pipe::space`]; enqueues the chunk's
    /// copy once it is full.
    fn advance(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        self.adopt();
        let cap = self.cap();
        let filled = match &mut self.filling {
            Some((_, filled)) if *filled + n <= cap => filled,
            filling => {
                let have = filling.as_ref().map_or(0, |(_, f)| *f);
                return Err(Error::SizeMismatch {
                    op: "upload: advance",
                    what: "free space of the pinned chunk",
                    expected: n,
                    actual: filling.as_ref().map_or(0, |_| cap - have),
                });
            }
        };
        *filled += n;
        if *filled == cap {
            self.flush()?;
        }
        Ok(())
    }

    fn write(&mut self, mut bytes: &[u8]) -> Result<()> {
        self.room(bytes.len())?;
        while !bytes.is_empty() {
            let n = self.fill(|free| {
                let n = free.len().min(bytes.len());
                free[..n].copy_from_slice(&bytes[..n]);
                Ok(n)
            })?;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    fn write_from(&mut self, reader: &mut impl Read, len: usize) -> Result<()> {
        self.room(len)?;
        let mut done = 0;
        while done < len {
            let want = len - done;
            done += self.fill(|free| {
                let n = free.len().min(want);
                read_some(reader, &mut free[..n], done, len)
            })?;
        }
        Ok(())
    }

    /// Runs `f` on the free part of the filling chunk (taking one first if
    /// needed) and enqueues the chunk's copy once it is full.
    fn fill(&mut self, f: impl FnOnce(&mut [u8]) -> Result<usize>) -> Result<usize> {
        let free = self.space()?;
        let n = f(free)?.min(free.len());
        self.advance(n)?;
        Ok(n)
    }

    /// Enqueues the filling chunk's copy.
    fn flush(&mut self) -> Result<()> {
        let Some((lease, len)) = self.filling.take() else {
            return Ok(());
        };
        if len == 0 {
            return Ok(());
        }
        // SAFETY: `len` ≤ the chunk's bytes and `at + len` ≤ the buffer's end
        // (`cap` bounds a chunk by both, `advance` checks against it); the
        // lease moves into `flights`, which touches the chunk again, or hands
        // it back, only after the event is done (`next_chunk`,
        // `finish`, `pause`, drop); `dst` is borrowed or owned by
        // `self` and declared after `flights`, whose drop waits for every
        // copy before the destination can go.
        let event = unsafe {
            self.flights.dev.borrow().copy_to_device(
                lease.chunk(),
                len,
                self.dst.borrow_mut(),
                self.at,
            )
        }?;
        self.at += len;
        self.flights.queue.push_back(Flight { lease, event, len });
        Ok(())
    }

    /// Enqueues what is left and waits for every copy.
    fn finish_copies(&mut self) -> Result<()> {
        self.flush()?;
        self.flights.finish()
    }
}

/// A host-to-device pipeline into one buffer, from a start offset onwards.
///
/// Bytes fill a chunk; a full chunk (or the last bytes the buffer takes, or
/// what is left at [`Upload::finish`]) is copied to the device while the next
/// one fills. Dropping it without [`Upload::finish`] waits for the copies in
/// flight and discards bytes not yet enqueued.
pub struct Upload<'a, D: ChunkDevice>(Pipe<D, &'a D, &'a ChunkPool<D::Chunk>, &'a mut D::Buffer>);

impl<'a, D: ChunkDevice> Upload<'a, D> {
    /// A pipeline writing `dst` from byte `offset`, through `pool`'s chunks
    /// and copies enqueued on `dev`.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`] for an offset past the buffer's end.
    pub fn new(
        dev: &'a D,
        pool: &'a ChunkPool<D::Chunk>,
        dst: &'a mut D::Buffer,
        offset: usize,
    ) -> Result<Self> {
        Pipe::new(dev, pool, dst, offset).map(Self)
    }

    /// The offset the next byte lands at.
    pub fn position(&self) -> usize {
        self.0.position()
    }

    /// Copies `bytes` to the device at the current position.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`] past the buffer's end (nothing is written);
    /// [`Error::PinnedExhausted`]; the backend's errors.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.0.write(bytes)
    }

    /// Reads exactly `len` bytes from `reader` straight into chunks and
    /// copies them to the device at the current position: each full chunk's
    /// copy runs while the next is read.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`] past the buffer's end (nothing is read);
    /// [`Error::Io`] when the reader fails or ends early; as [`Upload::write`].
    pub fn write_from(&mut self, reader: &mut impl Read, len: usize) -> Result<()> {
        self.0.write_from(reader, len)
    }

    /// Enqueues what is left and waits for every copy; afterwards the bytes
    /// are on the device and every chunk is back in the pool.
    ///
    /// # Errors
    ///
    /// The first copy's error; every chunk goes back all the same.
    pub fn finish(mut self) -> Result<()> {
        self.0.finish_copies()
    }
}

/// A host-to-device pipeline that owns its device handle, a share of the
/// pool and the whole destination buffer, so it can be kept across calls
/// and threads (a reader that returns whenever its socket has nothing more
/// and comes back later).
///
/// The caller writes into [`OwnedUpload::space`], the free part of the
/// current chunk (the socket is read straight into it), and reports the
/// bytes with [`OwnedUpload::advance`]; a full chunk's copy is enqueued at
/// once and the next chunk taken, by the pool rule (module docs).
/// [`OwnedUpload::finish`] waits for the copies and hands the buffer over.
/// Dropping it unfinished waits for the copies in flight and returns every
/// chunk; the buffer is freed.
///
/// # Examples
///
/// Through [`Runtime::begin_upload`](super::Runtime::begin_upload), which
/// uses this on CUDA:
///
/// ```
/// use tensorferry_kernels::runtime::Runtime;
///
/// let rt = Runtime::Cpu;
/// let mut up = rt.begin_upload(5)?;
/// for piece in [&b"ten"[..], b"so"] {
///     up.space()?[..piece.len()].copy_from_slice(piece);
///     up.advance(piece.len())?;
/// }
/// assert_eq!(rt.to_vec(&up.finish()?)?, b"tenso");
/// # Ok::<(), tensorferry_kernels::Error>(())
/// ```
pub struct OwnedUpload<D: ChunkDevice>
where
    D::Buffer: Sized,
{
    pipe: Pipe<D, D, Arc<ChunkPool<D::Chunk>>, D::Buffer>,
}

impl<D: ChunkDevice> std::fmt::Debug for OwnedUpload<D>
where
    D::Buffer: Sized,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedUpload")
            .field("position", &self.pipe.position())
            .field("len", &self.pipe.end)
            .field("in_flight", &self.pipe.flights.queue.len())
            .finish()
    }
}

impl<D: ChunkDevice> OwnedUpload<D>
where
    D::Buffer: Sized,
{
    /// A pipeline filling all of `dst` through `pool`'s chunks and copies
    /// enqueued on `dev`.
    pub fn new(dev: D, pool: Arc<ChunkPool<D::Chunk>>, dst: D::Buffer) -> Self {
        let end = dev.buffer_len(&dst);
        Self {
            pipe: Pipe {
                filling: None,
                flights: Flights::new(dev, pool),
                dst,
                at: 0,
                end,
                thread: std::thread::current().id(),
            },
        }
    }

    /// Bytes the destination takes in all.
    pub fn len(&self) -> usize {
        self.pipe.end
    }

    /// True for an empty destination.
    pub fn is_empty(&self) -> bool {
        self.pipe.end == 0
    }

    /// Bytes written so far.
    pub fn position(&self) -> usize {
        self.pipe.position()
    }

    /// Host memory for the next bytes: the free part of the current chunk
    /// (a chunk is taken first when none is held). Empty once every byte is in.
    ///
    /// # Errors
    ///
    /// [`Error::PinnedExhausted`]; the backend's errors (a failed copy).
    pub fn space(&mut self) -> Result<&mut [u8]> {
        self.pipe.space()
    }

    /// Counts `n` bytes written at the start of [`OwnedUpload::space`]; a
    /// chunk that is now full is copied to the device asynchronously.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`] when `n` is more than the space offered (nothing is
    /// counted); the backend's errors.
    pub fn advance(&mut self, n: usize) -> Result<()> {
        self.pipe.advance(n)
    }

    /// Copies `bytes` in at the current position.
    ///
    /// # Errors
    ///
    /// As [`Upload::write`].
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.pipe.write(bytes)
    }

    /// For a caller about to wait for more bytes, perhaps for long (a peer
    /// that stalls mid-tensor): copies the partly filled chunk now and waits
    /// for every copy in flight (each at most one chunk), so that a paused
    /// upload holds no chunk and stalled uploads cannot starve the pool that
    /// every other pipeline of the device draws from. The next bytes take a
    /// fresh chunk.
    ///
    /// # Errors
    ///
    /// A copy's error.
    pub fn pause(&mut self) -> Result<()> {
        self.pipe.adopt();
        self.pipe.flush()?;
        self.pipe.flights.finish()
    }

    /// Waits for every copy and returns the filled buffer; every chunk is
    /// back in the pool, on errors too.
    ///
    /// # Errors
    ///
    /// [`Error::SizeMismatch`] when not every byte was written; the first
    /// copy's error.
    pub fn finish(mut self) -> Result<D::Buffer> {
        if self.pipe.position() != self.pipe.end {
            return Err(Error::SizeMismatch {
                op: "upload: finish",
                what: "bytes written",
                expected: self.pipe.end,
                actual: self.pipe.position(),
            });
        }
        self.pipe.finish_copies()?;
        Ok(self.pipe.dst)
    }
}

/// Copies `len` bytes of `src` from `offset` to the host through `pool`'s
/// chunks and hands them to `sink` in order, chunk by chunk: while the sink
/// takes one chunk, the copies of the next ones run. Returns once every byte
/// went to the sink; every chunk is back in the pool, on errors too.
///
/// # Errors
///
/// [`Error::SizeMismatch`] for a range past the buffer's end;
/// [`Error::PinnedExhausted`]; the sink's error; the backend's errors.
pub fn download<D: ChunkDevice>(
    dev: &D,
    pool: &ChunkPool<D::Chunk>,
    src: &D::Buffer,
    offset: usize,
    len: usize,
    mut sink: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let end = range("download", offset, len, dev.buffer_len(src))?.end;
    let chunk_bytes = pool.config().chunk_bytes();
    let mut flights = Flights::<D, _, _>::new(dev, pool);
    // The chunk whose bytes the sink just took, for the next copy.
    let mut spare = None;
    let mut at = offset;
    loop {
        // As many copies in flight as the pool gives without waiting; only a
        // pipeline holding no chunk waits for one.
        if at < end {
            let lease = match spare.take() {
                Some(lease) => Some(lease),
                None if flights.queue.is_empty() => Some(take(&pool, dev)?),
                None => try_take(&pool, dev)?,
            };
            if let Some(mut lease) = lease {
                let n = chunk_bytes.min(end - at);
                // SAFETY: `n` ≤ the chunk's bytes and `at + n` ≤ `end` ≤ the
                // buffer's length (checked above); the chunk is touched again
                // only after its event is done (`wait` below, or the drop of
                // `flights`, which waits), and `src` is borrowed for the whole
                // call, which outlives `flights`.
                let event = unsafe { dev.copy_to_host(src, at, lease.chunk_mut(), n) }?;
                flights.queue.push_back(Flight {
                    lease,
                    event,
                    len: n,
                });
                at += n;
                continue;
            }
        }
        let Some(mut oldest) = flights.queue.pop_front() else {
            return Ok(());
        };
        dev.wait(&oldest.event)?;
        let n = oldest.len;
        dev.with_host(oldest.lease.chunk_mut(), |host| sink(&host[..n]))??;
        // Reuse the chunk, unless another pipeline waits for one and this one
        // keeps others.
        let keep = flights.queue.is_empty() || !pool.has_waiters();
        if at < end && keep {
            spare = Some(oldest.lease);
        }
    }
}

/// Copies bytes `offset..offset + out.len()` of `src` into `out` through
/// `pool`'s chunks, as [`download`] does: each chunk is copied into `out`
/// while the copies of the next ones run.
///
/// # Errors
///
/// As [`download`].
pub fn download_into<D: ChunkDevice>(
    dev: &D,
    pool: &ChunkPool<D::Chunk>,
    src: &D::Buffer,
    offset: usize,
    out: &mut [u8],
) -> Result<()> {
    let mut at = 0;
    download(dev, pool, src, offset, out.len(), |bytes| {
        out[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    //! The pipelines on a test double of a device: device memory in host
    //! vectors, copies run in order by a worker thread after a set latency.

    use std::collections::VecDeque;
    use std::io;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc, Condvar, Mutex};
    use std::thread::JoinHandle;
    use std::time::Duration;

    use super::*;

    /// A copy the fake device ran, in the order it ran them.
    #[derive(Clone, Debug, PartialEq, Eq)]
    struct Copy {
        direction: Direction,
        buffer: usize,
        offset: usize,
        len: usize,
        chunk: usize,
    }

    type Bytes = Arc<Mutex<Vec<u8>>>;

    struct FakeChunk {
        id: usize,
        mem: Bytes,
        /// Copies enqueued on the chunk that have not run yet.
        pending: Arc<AtomicUsize>,
    }

    #[derive(Debug)]
    struct FakeBuffer {
        id: usize,
        mem: Bytes,
    }

    struct FakeEvent(u64);

    struct Op {
        seq: u64,
        copy: Copy,
        chunk: Bytes,
        pending: Arc<AtomicUsize>,
        device: Bytes,
        /// Host-to-device: the chunk's bytes when the copy was enqueued.
        snapshot: Vec<u8>,
    }

    #[derive(Default)]
    struct State {
        queue: VecDeque<Op>,
        enqueued: u64,
        done: u64,
        /// The first copy that failed; it and every later one report it.
        failed: Option<u64>,
        copies: Vec<Copy>,
        max_in_flight: u64,
        violations: Vec<String>,
        next_id: usize,
        chunks_allocated: usize,
        stop: bool,
    }

    #[derive(Default)]
    struct Faults {
        latency: Duration,
        /// The n-th copy (1-based) fails when it runs.
        fail_copy: Option<u64>,
        /// The n-th enqueue (1-based) is refused.
        fail_enqueue: Option<u64>,
    }

    struct Shared {
        state: Mutex<State>,
        changed: Condvar,
        faults: Faults,
    }

    /// A device whose copies a worker thread runs in enqueue order.
    struct FakeDevice {
        shared: Arc<Shared>,
        worker: Option<JoinHandle<()>>,
    }

    fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().expect("test locks are not poisoned")
    }

    impl FakeDevice {
        fn new(faults: Faults) -> Self {
            let shared = Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                faults,
            });
            let worker = {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || Self::run(&shared))
            };
            Self {
                shared,
                worker: Some(worker),
            }
        }

        fn with_latency(micros: u64) -> Self {
            Self::new(Faults {
                latency: Duration::from_micros(micros),
                ..Faults::default()
            })
        }

        fn run(shared: &Shared) {
            loop {
                let op = {
                    let mut state = locked(&shared.state);
                    loop {
                        if let Some(op) = state.queue.pop_front() {
                            break op;
                        }
                        if state.stop {
                            return;
                        }
                        state = shared.changed.wait(state).expect("not poisoned");
                    }
                };
                std::thread::sleep(shared.faults.latency);
                let fails = shared.faults.fail_copy == Some(op.seq)
                    || locked(&shared.state).failed.is_some();
                let mut violation = None;
                if !fails {
                    let (at, n) = (op.copy.offset, op.copy.len);
                    match op.copy.direction {
                        Direction::ToDevice => {
                            let chunk = locked(&op.chunk);
                            if chunk[..n] != op.snapshot[..] {
                                violation = Some(format!(
                                    "chunk {} changed between enqueue and copy",
                                    op.copy.chunk
                                ));
                            }
                            // What a DMA engine does: copy what is there now.
                            locked(&op.device)[at..at + n].copy_from_slice(&chunk[..n]);
                        }
                        Direction::ToHost => {
                            let device = locked(&op.device);
                            locked(&op.chunk)[..n].copy_from_slice(&device[at..at + n]);
                        }
                    }
                }
                // The chunk's memory is the host's alone again before the
                // copy counts as done (so `host_mut` may borrow it).
                let Op {
                    seq,
                    copy,
                    pending,
                    chunk,
                    device,
                    snapshot,
                } = op;
                drop((chunk, device, snapshot));
                pending.fetch_sub(1, Ordering::SeqCst);
                let op = (seq, copy);
                let mut state = locked(&shared.state);
                if fails && state.failed.is_none() {
                    state.failed = Some(op.0);
                }
                state.violations.extend(violation);
                state.copies.push(op.1);
                state.done = op.0;
                shared.changed.notify_all();
            }
        }

        fn buffer(&self, bytes: &[u8]) -> FakeBuffer {
            let mut state = locked(&self.shared.state);
            state.next_id += 1;
            FakeBuffer {
                id: state.next_id,
                mem: Arc::new(Mutex::new(bytes.to_vec())),
            }
        }

        fn contents(buf: &FakeBuffer) -> Vec<u8> {
            locked(&buf.mem).clone()
        }

        fn copies(&self) -> Vec<Copy> {
            locked(&self.shared.state).copies.clone()
        }

        fn max_in_flight(&self) -> u64 {
            locked(&self.shared.state).max_in_flight
        }

        fn violations(&self) -> Vec<String> {
            locked(&self.shared.state).violations.clone()
        }

        fn chunks_allocated(&self) -> usize {
            locked(&self.shared.state).chunks_allocated
        }

        fn enqueue(
            &self,
            copy: Copy,
            chunk: &FakeChunk,
            device: &Bytes,
            device_len: usize,
        ) -> Result<FakeEvent> {
            let chunk_len = locked(&chunk.mem).len();
            if copy.len > chunk_len || copy.offset + copy.len > device_len {
                return Err(Error::backend(
                    "fake copy",
                    format!(
                        "{copy:?} out of range ({chunk_len}-byte chunk, {device_len}-byte buffer)"
                    ),
                ));
            }
            let snapshot = match copy.direction {
                Direction::ToDevice => locked(&chunk.mem)[..copy.len].to_vec(),
                Direction::ToHost => Vec::new(),
            };
            let mut state = locked(&self.shared.state);
            let attempt = state.enqueued + 1;
            if self.shared.faults.fail_enqueue == Some(attempt) || state.failed.is_some() {
                return Err(Error::backend("fake enqueue", "injected enqueue failure"));
            }
            state.enqueued = attempt;
            chunk.pending.fetch_add(1, Ordering::SeqCst);
            state.queue.push_back(Op {
                seq: attempt,
                copy,
                chunk: Arc::clone(&chunk.mem),
                pending: Arc::clone(&chunk.pending),
                device: Arc::clone(device),
                snapshot,
            });
            state.max_in_flight = state.max_in_flight.max(state.enqueued - state.done);
            self.shared.changed.notify_all();
            Ok(FakeEvent(attempt))
        }

        fn outcome(state: &State, event: &FakeEvent) -> Result<()> {
            match state.failed {
                Some(failed) if failed <= event.0 => Err(Error::backend(
                    "fake copy",
                    format!("injected failure of copy {failed}"),
                )),
                _ => Ok(()),
            }
        }
    }

    impl Drop for FakeDevice {
        fn drop(&mut self) {
            locked(&self.shared.state).stop = true;
            self.shared.changed.notify_all();
            if let Some(worker) = self.worker.take() {
                worker.join().expect("the worker does not panic");
            }
        }
    }

    impl ChunkDevice for FakeDevice {
        type Chunk = FakeChunk;
        type Buffer = FakeBuffer;
        type Event = FakeEvent;

        fn buffer_len(&self, buf: &FakeBuffer) -> usize {
            locked(&buf.mem).len()
        }

        fn alloc_chunk(&self, bytes: usize, _direction: Direction) -> Result<FakeChunk> {
            let mut state = locked(&self.shared.state);
            state.next_id += 1;
            state.chunks_allocated += 1;
            Ok(FakeChunk {
                id: state.next_id,
                // Poisoned, so a byte that is not copied shows.
                mem: Arc::new(Mutex::new(vec![0xa5; bytes])),
                pending: Arc::new(AtomicUsize::new(0)),
            })
        }

        fn host_mut<'c>(&self, chunk: &'c mut FakeChunk) -> Result<&'c mut [u8]> {
            if chunk.pending.load(Ordering::SeqCst) > 0 {
                locked(&self.shared.state).violations.push(format!(
                    "the host borrowed chunk {} while a copy on it was pending",
                    chunk.id
                ));
                return Err(Error::backend("fake host_mut", "a copy is pending"));
            }
            let mem = Arc::get_mut(&mut chunk.mem)
                .ok_or_else(|| Error::backend("fake host_mut", "the chunk is shared"))?;
            Ok(mem.get_mut().expect("test locks are not poisoned"))
        }

        fn with_host<R>(&self, chunk: &mut FakeChunk, f: impl FnOnce(&mut [u8]) -> R) -> Result<R> {
            if chunk.pending.load(Ordering::SeqCst) > 0 {
                locked(&self.shared.state).violations.push(format!(
                    "the host reached chunk {} while a copy on it was pending",
                    chunk.id
                ));
            }
            Ok(f(&mut locked(&chunk.mem)))
        }

        unsafe fn copy_to_device(
            &self,
            chunk: &FakeChunk,
            len: usize,
            dst: &mut FakeBuffer,
            offset: usize,
        ) -> Result<FakeEvent> {
            let copy = Copy {
                direction: Direction::ToDevice,
                buffer: dst.id,
                offset,
                len,
                chunk: chunk.id,
            };
            self.enqueue(copy, chunk, &dst.mem, self.buffer_len(dst))
        }

        unsafe fn copy_to_host(
            &self,
            src: &FakeBuffer,
            offset: usize,
            chunk: &mut FakeChunk,
            len: usize,
        ) -> Result<FakeEvent> {
            let copy = Copy {
                direction: Direction::ToHost,
                buffer: src.id,
                offset,
                len,
                chunk: chunk.id,
            };
            self.enqueue(copy, chunk, &src.mem, self.buffer_len(src))
        }

        fn is_done(&self, event: &FakeEvent) -> Result<bool> {
            let state = locked(&self.shared.state);
            Self::outcome(&state, event)?;
            Ok(state.done >= event.0)
        }

        fn wait(&self, event: &FakeEvent) -> Result<()> {
            let mut state = locked(&self.shared.state);
            while state.done < event.0 {
                state = self.shared.changed.wait(state).expect("not poisoned");
            }
            Self::outcome(&state, event)
        }
    }

    /// SplitMix64, seeded per test.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// A source that hands out a few bytes at a time, like a socket, and
    /// fails after `fail_after` bytes when set.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        rng: Rng,
        fail_after: Option<usize>,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.fail_after.is_some_and(|n| self.at >= n) {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "peer went away",
                ));
            }
            if self.rng.below(4) == 0 {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = buf
                .len()
                .min(self.data.len() - self.at)
                .min(1 + self.rng.below(100));
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    fn trickle(data: &[u8], seed: u64) -> Trickle {
        Trickle {
            data: data.to_vec(),
            at: 0,
            rng: Rng(seed),
            fail_after: None,
        }
    }

    const CHUNK: usize = 64;

    fn pool(chunks: usize) -> ChunkPool<FakeChunk> {
        ChunkPool::new(
            "fake",
            PinnedConfig::new(CHUNK, chunks).expect("valid"),
            Direction::ToDevice,
        )
    }

    fn download_all(dev: &FakeDevice, pool: &ChunkPool<FakeChunk>, buf: &FakeBuffer) -> Vec<u8> {
        let mut out = Vec::new();
        download(dev, pool, buf, 0, dev.buffer_len(buf), |bytes| {
            out.extend_from_slice(bytes);
            Ok(())
        })
        .expect("download");
        out
    }

    /// Every copy into or out of each buffer follows the previous one:
    /// offsets strictly increase and leave no gap.
    fn assert_in_order(copies: &[Copy]) {
        let mut next: Vec<((usize, Direction), usize)> = Vec::new();
        for c in copies {
            let key = (c.buffer, c.direction);
            match next.iter_mut().find(|(k, _)| *k == key) {
                Some((_, end)) => {
                    assert_eq!(c.offset, *end, "out of order: {c:?}");
                    *end += c.len;
                }
                None => next.push((key, c.offset + c.len)),
            }
            assert!(c.len > 0 && c.len <= CHUNK, "{c:?}");
        }
    }

    const LENGTHS: [usize; 7] = [
        0,
        1,
        CHUNK - 1,
        CHUNK,
        CHUNK + 1,
        3 * CHUNK - 5,
        37 * CHUNK + 11,
    ];

    /// Runs one pipeline with `f` and checks the copies it made are in order.
    fn in_order<T>(dev: &FakeDevice, f: impl FnOnce() -> T) -> T {
        let before = dev.copies().len();
        let out = f();
        assert_in_order(&dev.copies()[before..]);
        out
    }

    #[test]
    fn round_trips_are_byte_exact_at_odd_lengths() {
        let dev = FakeDevice::with_latency(20);
        let (up, down) = (pool(4), pool(4));
        let mut rng = Rng(1);
        for len in LENGTHS {
            let data = rng.bytes(len);
            // From memory, in uneven pieces.
            let mut buf = dev.buffer(&vec![0; len]);
            in_order(&dev, || {
                let mut upload = Upload::new(&dev, &up, &mut buf, 0).expect("upload");
                let mut rest = &data[..];
                while !rest.is_empty() {
                    let n = rest.len().min(1 + rng.below(2 * CHUNK));
                    upload.write(&rest[..n]).expect("write");
                    rest = &rest[n..];
                }
                upload.finish().expect("finish");
            });
            assert_eq!(FakeDevice::contents(&buf), data, "write, {len} bytes");
            let back = in_order(&dev, || download_all(&dev, &down, &buf));
            assert_eq!(back, data, "download, {len} bytes");
            // From a trickling source, behind a prefix.
            let mut buf = dev.buffer(&vec![0; len + 3]);
            in_order(&dev, || {
                let mut upload = Upload::new(&dev, &up, &mut buf, 0).expect("upload");
                upload.write(&[7, 8, 9]).expect("prefix");
                upload
                    .write_from(&mut trickle(&data, len as u64), len)
                    .expect("write_from");
                upload.finish().expect("finish");
            });
            let back = in_order(&dev, || download_all(&dev, &down, &buf));
            assert_eq!(back[..3], [7, 8, 9]);
            assert_eq!(back[3..], data[..], "write_from, {len} bytes");
            // A range of the buffer.
            let from = rng.below(len + 1);
            let n = rng.below(len + 1).min(len - from);
            let mut part = Vec::new();
            in_order(&dev, || {
                download(&dev, &down, &buf, 3 + from, n, |b| {
                    part.extend_from_slice(b);
                    Ok(())
                })
                .expect("part")
            });
            assert_eq!(part, data[from..from + n]);
        }
        assert!(dev.violations().is_empty(), "{:?}", dev.violations());
        assert_eq!((up.in_use(), down.in_use()), (0, 0));
    }

    #[test]
    fn ranges_download_into_memory_byte_exact_at_odd_offsets() {
        let dev = FakeDevice::with_latency(20);
        let down = pool(3);
        let mut rng = Rng(7);
        for len in LENGTHS {
            let data = rng.bytes(len);
            let buf = dev.buffer(&data);
            for _ in 0..4 {
                let from = rng.below(len + 1);
                let n = rng.below(len - from + 1);
                let mut out = vec![0xa5; n];
                in_order(&dev, || {
                    download_into(&dev, &down, &buf, from, &mut out).expect("download_into")
                });
                assert_eq!(out, data[from..from + n], "{n} bytes at {from} of {len}");
            }
            // Past the end, or an offset that overflows: refused, nothing written.
            for (from, n) in [(len, 1), (len / 2, len - len / 2 + 1), (usize::MAX, 2)] {
                let mut out = vec![0xa5; n];
                let err =
                    download_into(&dev, &down, &buf, from, &mut out).expect_err("past the end");
                assert!(matches!(err, Error::SizeMismatch { .. }), "{err}");
                assert!(out.iter().all(|&b| b == 0xa5), "written before the check");
            }
        }
        assert!(dev.violations().is_empty(), "{:?}", dev.violations());
        assert_eq!(down.in_use(), 0);
    }

    #[test]
    fn writes_past_the_end_are_refused_whole() {
        let dev = FakeDevice::with_latency(0);
        let up = pool(2);
        let mut buf = dev.buffer(&[0; 10]);
        assert!(Upload::new(&dev, &up, &mut buf, 11).is_err());
        let mut upload = Upload::new(&dev, &up, &mut buf, 4).expect("upload");
        let err = upload.write(&[1; 7]).expect_err("too long");
        assert!(matches!(err, Error::SizeMismatch { .. }), "{err}");
        upload.write(&[1; 6]).expect("fits");
        assert!(upload.write_from(&mut &[2u8][..], 1).is_err());
        upload.finish().expect("finish");
        assert_eq!(FakeDevice::contents(&buf), [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]);
        let err = download(&dev, &up, &buf, 5, 6, |_| Ok(())).expect_err("past the end");
        assert!(matches!(err, Error::SizeMismatch { .. }), "{err}");
    }

    #[test]
    fn copies_run_in_strictly_increasing_order_per_buffer() {
        let dev = FakeDevice::with_latency(50);
        let (up, down) = (pool(8), pool(8));
        let data = Rng(2).bytes(50 * CHUNK + 7);
        let mut buf = dev.buffer(&vec![0; data.len()]);
        let mut upload = Upload::new(&dev, &up, &mut buf, 0).expect("upload");
        upload
            .write_from(&mut &data[..], data.len())
            .expect("write_from");
        upload.finish().expect("finish");
        assert_eq!(download_all(&dev, &down, &buf), data);
        let copies = dev.copies();
        assert_eq!(copies.len(), 2 * 51);
        assert_in_order(&copies);
        // The download kept several copies in flight.
        assert!(
            dev.max_in_flight() > 1,
            "max in flight {}",
            dev.max_in_flight()
        );
    }

    #[test]
    fn a_pool_of_two_moves_a_hundred_chunk_tensor() {
        let dev = FakeDevice::with_latency(30);
        let (up, down) = (pool(2), pool(2));
        let data = Rng(3).bytes(100 * CHUNK);
        let mut buf = dev.buffer(&vec![0; data.len()]);
        let mut upload = Upload::new(&dev, &up, &mut buf, 0).expect("upload");
        upload.write(&data).expect("write");
        upload.finish().expect("finish");
        assert_eq!(download_all(&dev, &down, &buf), data);
        assert!(
            dev.max_in_flight() <= 2,
            "max in flight {}",
            dev.max_in_flight()
        );
        assert_eq!(dev.chunks_allocated(), 4);
        assert_eq!((up.allocated(), up.in_use()), (2, 0));
        assert_eq!((down.allocated(), down.in_use()), (2, 0));
        assert_in_order(&dev.copies());
        assert!(dev.violations().is_empty(), "{:?}", dev.violations());
    }

    /// Runs `f` on a thread and fails the test if it takes longer than
    /// `limit` (a deadlock) instead of hanging.
    fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(limit)
            .unwrap_or_else(|_| panic!("not done after {limit:?}: deadlock"))
    }

    #[test]
    fn pipelines_on_threads_sharing_three_chunks_all_finish() {
        within(Duration::from_secs(60), || {
            let dev = FakeDevice::with_latency(10);
            let (up, down) = (pool(3), pool(3));
            let sources: Vec<(Vec<u8>, FakeBuffer)> = (0..6)
                .map(|i| {
                    let data = Rng(10 + i).bytes(20 * CHUNK + i as usize * 13);
                    let buf = dev.buffer(&data);
                    (data, buf)
                })
                .collect();
            std::thread::scope(|s| {
                for i in 0..6u64 {
                    let (dev, up) = (&dev, &up);
                    s.spawn(move || {
                        let data = Rng(20 + i).bytes(30 * CHUNK + i as usize);
                        let mut buf = dev.buffer(&vec![0; data.len()]);
                        for _ in 0..3 {
                            let mut upload = Upload::new(dev, up, &mut buf, 0).expect("upload");
                            upload
                                .write_from(&mut trickle(&data, i), data.len())
                                .expect("write_from");
                            upload.finish().expect("finish");
                            assert_eq!(FakeDevice::contents(&buf), data);
                        }
                    });
                }
                for (data, buf) in &sources {
                    let (dev, down) = (&dev, &down);
                    s.spawn(move || {
                        for _ in 0..3 {
                            let mut out = Vec::new();
                            download(dev, down, buf, 0, data.len(), |bytes| {
                                out.extend_from_slice(bytes);
                                std::thread::sleep(Duration::from_micros(5));
                                Ok(())
                            })
                            .expect("download");
                            assert_eq!(&out, data);
                        }
                    });
                }
            });
            assert!(dev.violations().is_empty(), "{:?}", dev.violations());
            assert_eq!((up.allocated(), up.in_use()), (3, 0));
            assert_eq!((down.allocated(), down.in_use()), (3, 0));
        });
    }

    #[test]
    fn a_second_pipeline_on_a_thread_holding_every_chunk_errors_instead_of_hanging() {
        within(Duration::from_secs(30), || {
            // Slow copies, so the first pipeline still holds both chunks.
            let dev = FakeDevice::with_latency(100_000);
            let up = pool(2);
            let mut a = dev.buffer(&[0; 4 * CHUNK]);
            let mut b = dev.buffer(&[0; CHUNK]);
            let mut first = Upload::new(&dev, &up, &mut a, 0).expect("upload");
            first.write(&[1; 2 * CHUNK]).expect("two chunks in flight");
            assert_eq!(up.in_use(), 2);
            let mut second = Upload::new(&dev, &up, &mut b, 0).expect("upload");
            let err = second
                .write(&[2; CHUNK])
                .expect_err("would wait for itself");
            assert!(
                matches!(err, Error::PinnedExhausted { chunks: 2, .. }),
                "{err}"
            );
            assert!(err.to_string().contains("finish or drop"), "{err}");
            drop(second);
            first.write(&[1; 2 * CHUNK]).expect("the first goes on");
            first.finish().expect("finish");
            assert_eq!(up.in_use(), 0);
        });
    }

    #[test]
    fn injected_copy_errors_are_returned_and_every_chunk_comes_back() {
        for k in [1, 2, 5] {
            let dev = FakeDevice::new(Faults {
                latency: Duration::from_micros(20),
                fail_copy: Some(k),
                ..Faults::default()
            });
            let up = pool(3);
            let mut buf = dev.buffer(&[0; 10 * CHUNK]);
            let mut upload = Upload::new(&dev, &up, &mut buf, 0).expect("upload");
            let outcome = upload
                .write(&[1; 10 * CHUNK])
                .and_then(|()| upload.finish());
            let err = outcome.expect_err("a copy failed");
            assert!(err.to_string().contains("injected"), "{err}");
            assert_eq!(up.in_use(), 0, "upload, copy {k} failed");

            let dev = FakeDevice::new(Faults {
                latency: Duration::from_micros(20),
                fail_copy: Some(k),
                ..Faults::default()
            });
            let down = pool(3);
            let buf = dev.buffer(&[1; 10 * CHUNK]);
            let err = download(&dev, &down, &buf, 0, 10 * CHUNK, |_| Ok(())).expect_err("failed");
            assert!(err.to_string().contains("injected"), "{err}");
            assert_eq!(down.in_use(), 0, "download, copy {k} failed");
        }
        // An enqueue refused outright.
        let dev = FakeDevice::new(Faults {
            fail_enqueue: Some(3),
            ..Faults::default()
        });
        let up = pool(3);
        let mut buf = dev.buffer(&[0; 10 * CHUNK]);
        let mut upload = Upload::new(&dev, &up, &mut buf, 0).expect("upload");
        assert!(upload.write(&[1; 10 * CHUNK]).is_err());
        drop(upload);
        assert_eq!(up.in_use(), 0);
        let down = pool(3);
        assert!(download(&dev, &down, &buf, 0, 10 * CHUNK, |_| Ok(())).is_err());
        assert_eq!(down.in_use(), 0);
    }

    #[test]
    fn a_failing_source_or_sink_returns_its_error_and_every_chunk() {
        let dev = FakeDevice::with_latency(20);
        let (up, down) = (pool(3), pool(3));
        let data = Rng(4).bytes(10 * CHUNK);
        let mut buf = dev.buffer(&vec![0; data.len()]);
        // A source that fails mid-way.
        let mut source = trickle(&data, 4);
        source.fail_after = Some(5 * CHUNK + 3);
        let mut upload = Upload::new(&dev, &up, &mut buf, 0).expect("upload");
        let err = upload
            .write_from(&mut source, data.len())
            .expect_err("the source fails");
        assert!(
            matches!(&err, Error::Io { source, .. } if source.kind() == io::ErrorKind::ConnectionReset),
            "{err}"
        );
        drop(upload);
        assert_eq!(up.in_use(), 0);
        // A source that ends early.
        let mut upload = Upload::new(&dev, &up, &mut buf, 0).expect("upload");
        let err = upload
            .write_from(&mut &data[..4 * CHUNK], data.len())
            .expect_err("the source ends");
        assert!(
            err.to_string().contains("ended after 256 of 640 bytes"),
            "{err}"
        );
        drop(upload);
        assert_eq!(up.in_use(), 0);
        // A sink that fails on the third chunk.
        let mut calls = 0;
        let err = download(&dev, &down, &buf, 0, data.len(), |_| {
            calls += 1;
            if calls == 3 {
                Err(Error::Io {
                    op: "test sink",
                    source: io::ErrorKind::BrokenPipe.into(),
                })
            } else {
                Ok(())
            }
        })
        .expect_err("the sink fails");
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert_eq!(down.in_use(), 0);
        assert!(dev.violations().is_empty(), "{:?}", dev.violations());
    }

    #[test]
    fn the_double_flags_a_host_touching_a_chunk_in_flight() {
        // The pipelines above assert no violations; this shows the check bites.
        let dev = FakeDevice::with_latency(50_000);
        let mut chunk = dev.alloc_chunk(CHUNK, Direction::ToDevice).expect("chunk");
        let mut buf = dev.buffer(&[0; CHUNK]);
        // SAFETY: the fake device copies through shared vectors; breaking the
        // contract is the point of the test and cannot corrupt memory.
        let event = unsafe { dev.copy_to_device(&chunk, CHUNK, &mut buf, 0) }.expect("enqueue");
        dev.with_host(&mut chunk, |host| host[0] = 1).expect("host");
        dev.wait(&event).expect("wait");
        let violations = dev.violations();
        assert_eq!(violations.len(), 2, "{violations:?}");
        assert!(violations[0].contains("pending"), "{violations:?}");
        assert!(violations[1].contains("changed"), "{violations:?}");
    }

    #[test]
    fn uploads_overlap_reading_with_copies() {
        // Copies slower than the source: the pipeline grows to more than one
        // chunk in flight and stays within the pool.
        let dev = FakeDevice::with_latency(2_000);
        let up = pool(4);
        let data = Rng(5).bytes(12 * CHUNK);
        let mut buf = dev.buffer(&vec![0; data.len()]);
        let mut upload = Upload::new(&dev, &up, &mut buf, 0).expect("upload");
        upload
            .write_from(&mut &data[..], data.len())
            .expect("write_from");
        upload.finish().expect("finish");
        assert_eq!(FakeDevice::contents(&buf), data);
        let most = dev.max_in_flight();
        assert!((2..=4).contains(&most), "max in flight {most}");
        assert!(dev.violations().is_empty(), "{:?}", dev.violations());
    }

    #[test]
    fn pinned_settings_are_checked() {
        assert_eq!(PinnedConfig::default().chunk_bytes(), 1 << 20);
        assert_eq!(PinnedConfig::default().chunks(), 16);
        for (bytes, chunks) in [
            (0, 16),
            (1 << 20, 0),
            ((1 << 30) + 1, 1),
            (1, 1025),
            (1 << 30, 17),
        ] {
            let err = PinnedConfig::new(bytes, chunks).expect_err("out of range");
            assert!(matches!(err, Error::BadPinned { .. }), "{err}");
            assert!(err.to_string().contains("PinnedConfig::new"), "{err}");
        }
        assert_eq!(parse_size("256K"), Some(256 << 10));
        assert_eq!(parse_size(" 4MiB "), Some(4 << 20));
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("1.5M"), None);
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size(""), None);
    }

    /// The double by reference, so an owned pipeline can hold it.
    impl ChunkDevice for &FakeDevice {
        type Chunk = FakeChunk;
        type Buffer = FakeBuffer;
        type Event = FakeEvent;

        fn buffer_len(&self, buf: &FakeBuffer) -> usize {
            (**self).buffer_len(buf)
        }

        fn alloc_chunk(&self, bytes: usize, direction: Direction) -> Result<FakeChunk> {
            (**self).alloc_chunk(bytes, direction)
        }

        fn host_mut<'c>(&self, chunk: &'c mut FakeChunk) -> Result<&'c mut [u8]> {
            (**self).host_mut(chunk)
        }

        unsafe fn copy_to_device(
            &self,
            chunk: &FakeChunk,
            len: usize,
            dst: &mut FakeBuffer,
            offset: usize,
        ) -> Result<FakeEvent> {
            // SAFETY: the caller keeps the contract, which is the same.
            unsafe { (**self).copy_to_device(chunk, len, dst, offset) }
        }

        unsafe fn copy_to_host(
            &self,
            src: &FakeBuffer,
            offset: usize,
            chunk: &mut FakeChunk,
            len: usize,
        ) -> Result<FakeEvent> {
            // SAFETY: the caller keeps the contract, which is the same.
            unsafe { (**self).copy_to_host(src, offset, chunk, len) }
        }

        fn is_done(&self, event: &FakeEvent) -> Result<bool> {
            (**self).is_done(event)
        }

        fn wait(&self, event: &FakeEvent) -> Result<()> {
            (**self).wait(event)
        }
    }

    fn shared_pool(chunks: usize) -> Arc<ChunkPool<FakeChunk>> {
        Arc::new(pool(chunks))
    }

    /// Feeds `data` into `up` in pieces of 1 to `most` bytes, pausing now and then.
    /// Feeds `data` in random steps of at most `most` bytes, pausing now
    /// and then when `pauses` (a paused upload must hold no chunk).
    fn feed(
        up: &mut OwnedUpload<&FakeDevice>,
        data: &[u8],
        rng: &mut Rng,
        most: usize,
        pauses: Option<&ChunkPool<FakeChunk>>,
    ) {
        let mut at = 0;
        while at < data.len() {
            let space = up.space().expect("space");
            assert!(
                !space.is_empty(),
                "no space with {} bytes to go",
                data.len() - at
            );
            let n = space.len().min(1 + rng.below(most)).min(data.len() - at);
            space[..n].copy_from_slice(&data[at..at + n]);
            up.advance(n).expect("advance");
            at += n;
            if let Some(pool) = pauses.filter(|_| rng.below(5) == 0) {
                up.pause().expect("pause");
                assert_eq!(pool.in_use(), 0, "a paused upload holds no chunk");
            }
        }
    }

    #[test]
    fn owned_uploads_fed_in_tiny_steps_are_byte_exact_at_odd_lengths() {
        let dev = FakeDevice::with_latency(20);
        let up_pool = shared_pool(3);
        let mut rng = Rng(30);
        for len in LENGTHS {
            for most in [1, 7, 3 * CHUNK] {
                let data = rng.bytes(len);
                let mut up =
                    OwnedUpload::new(&dev, Arc::clone(&up_pool), dev.buffer(&vec![0; len]));
                assert_eq!((up.len(), up.position()), (len, 0));
                let buf = in_order(&dev, || {
                    feed(&mut up, &data, &mut rng, most, Some(&up_pool));
                    assert!(up.space().expect("space").is_empty(), "all in");
                    up.finish().expect("finish")
                });
                assert_eq!(
                    FakeDevice::contents(&buf),
                    data,
                    "{len} bytes in steps of ≤ {most}"
                );
                assert_eq!(up_pool.in_use(), 0);
            }
        }
        // Never paused, each chunk went whole, in order: 37 full chunks and the tail.
        let data = rng.bytes(37 * CHUNK + 11);
        let mut up = OwnedUpload::new(&dev, Arc::clone(&up_pool), dev.buffer(&vec![0; data.len()]));
        let before = dev.copies().len();
        feed(&mut up, &data, &mut rng, 5, None);
        up.finish().expect("finish");
        let lens: Vec<usize> = dev.copies()[before..].iter().map(|c| c.len).collect();
        assert_eq!(lens.len(), 38);
        assert!(lens[..37].iter().all(|&n| n == CHUNK), "{lens:?}");
        assert_eq!(lens[37], 11);
        assert!(dev.violations().is_empty(), "{:?}", dev.violations());
        assert!(up_pool.allocated() <= 3);
    }

    #[test]
    fn owned_uploads_refuse_too_much_and_too_little() {
        let dev = FakeDevice::with_latency(0);
        let up_pool = shared_pool(2);
        let mut up = OwnedUpload::new(&dev, Arc::clone(&up_pool), dev.buffer(&[0; CHUNK + 5]));
        let room = up.space().expect("space").len();
        assert_eq!(room, CHUNK);
        let err = up.advance(room + 1).expect_err("more than offered");
        assert!(matches!(err, Error::SizeMismatch { .. }), "{err}");
        assert_eq!(up.position(), 0, "nothing counted");
        up.write(&[3; CHUNK + 1]).expect("fits");
        assert!(up.write(&[3; 5]).is_err(), "past the end");
        let err = up.finish().expect_err("4 bytes missing");
        assert!(err.to_string().contains("bytes written"), "{err}");
        assert_eq!(up_pool.in_use(), 0);
        assert!(dev.violations().is_empty(), "{:?}", dev.violations());
    }

    #[test]
    fn two_owned_uploads_on_threads_share_a_pool_of_two() {
        within(Duration::from_secs(60), || {
            let dev = FakeDevice::with_latency(50);
            let up_pool = shared_pool(2);
            let inputs: Vec<Vec<u8>> = (0..2).map(|i| Rng(40 + i).bytes(20 * CHUNK + 3)).collect();
            std::thread::scope(|s| {
                for (i, data) in inputs.iter().enumerate() {
                    let (dev, up_pool) = (&dev, &up_pool);
                    s.spawn(move || {
                        let mut rng = Rng(50 + i as u64);
                        for _ in 0..3 {
                            let buf = dev.buffer(&vec![0; data.len()]);
                            let mut up = OwnedUpload::new(dev, Arc::clone(up_pool), buf);
                            feed(&mut up, data, &mut rng, CHUNK / 2, None);
                            let buf = up.finish().expect("finish");
                            assert_eq!(&FakeDevice::contents(&buf), data);
                        }
                    });
                }
            });
            assert_in_order(&dev.copies());
            assert!(dev.max_in_flight() <= 2, "{}", dev.max_in_flight());
            assert_eq!((up_pool.allocated(), up_pool.in_use()), (2, 0));
            assert!(dev.violations().is_empty(), "{:?}", dev.violations());
        });
    }

    #[test]
    fn an_owned_upload_moved_to_another_thread_counts_against_it() {
        within(Duration::from_secs(30), || {
            // Slow copies: the first upload still holds both chunks.
            let dev = FakeDevice::with_latency(200_000);
            let up_pool = shared_pool(2);
            std::thread::scope(|s| {
                let first = s
                    .spawn(|| {
                        let mut up = OwnedUpload::new(
                            &dev,
                            Arc::clone(&up_pool),
                            dev.buffer(&[0; 4 * CHUNK]),
                        );
                        up.write(&[1; 2 * CHUNK]).expect("two chunks in flight");
                        up
                    })
                    .join()
                    .expect("first thread");
                // This thread now holds every chunk through `first`: a second
                // upload here must not wait for itself.
                let mut first = first;
                // Touching it here counts its chunks against this thread.
                first.space().expect("space");
                assert_eq!(up_pool.in_use(), 2);
                let mut second =
                    OwnedUpload::new(&dev, Arc::clone(&up_pool), dev.buffer(&[0; CHUNK]));
                let err = second.space().expect_err("would wait for itself");
                assert!(
                    matches!(err, Error::PinnedExhausted { chunks: 2, .. }),
                    "{err}"
                );
                drop(second);
                first.write(&[1; 2 * CHUNK]).expect("the first goes on");
                let buf = first.finish().expect("finish");
                assert_eq!(FakeDevice::contents(&buf), [1; 4 * CHUNK]);
            });
            assert_eq!(up_pool.in_use(), 0);
        });
    }

    #[test]
    fn dropping_an_owned_upload_midway_returns_every_chunk() {
        let dev = FakeDevice::with_latency(2_000);
        let up_pool = shared_pool(3);
        let data = Rng(60).bytes(10 * CHUNK);
        for cut in [1, CHUNK, 5 * CHUNK + 17, 10 * CHUNK - 1] {
            let mut up =
                OwnedUpload::new(&dev, Arc::clone(&up_pool), dev.buffer(&vec![0; data.len()]));
            up.write(&data[..cut]).expect("write");
            assert!(up_pool.in_use() > 0);
            drop(up);
            assert_eq!(up_pool.in_use(), 0, "cut at {cut}");
        }
        assert!(dev.violations().is_empty(), "{:?}", dev.violations());
    }

    #[test]
    fn a_failing_copy_fails_the_owned_upload_and_every_chunk_comes_back() {
        for k in [1, 3] {
            let dev = FakeDevice::new(Faults {
                latency: Duration::from_micros(20),
                fail_copy: Some(k),
                ..Faults::default()
            });
            let up_pool = shared_pool(2);
            let data = Rng(70).bytes(8 * CHUNK);
            let mut up =
                OwnedUpload::new(&dev, Arc::clone(&up_pool), dev.buffer(&vec![0; data.len()]));
            let outcome = up.write(&data).and_then(|()| up.finish().map(drop));
            let err = outcome.expect_err("a copy failed");
            assert!(err.to_string().contains("injected"), "copy {k}: {err}");
            assert_eq!(up_pool.in_use(), 0, "copy {k} failed");
        }
    }
}
