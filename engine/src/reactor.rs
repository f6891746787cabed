//! [`Reactor`]: the node's I/O threads. A small, fixed set of threads (one
//! by default) waits for readiness events (epoll, through mio) on every
//! connection and listener of a node and runs what each one does when it can
//! read, write or accept. Threads do not grow with peers or channels.
//!
//! What an I/O thread drives implements [`Watched`]. Other threads talk to
//! an I/O thread through its command list and its waker: to add or remove a
//! source, or to *nudge* one (run it as if its socket were ready: a reader
//! that stalled on a full subscription queue, bytes a requester left
//! unread). A requester that reads its own reply takes a connection out of
//! its I/O thread's wait for the duration ([`Registration::pause`]) and puts
//! it back after ([`Registration::resume`]); putting it back reports what
//! arrived meanwhile.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::error::{Error, Result};

/// The token of each I/O thread's waker.
const WAKER: Token = Token(usize::MAX);

/// Why an I/O thread calls [`Watched::ready`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Readiness {
    /// The source can be read (or has ended, or failed).
    pub(crate) readable: bool,
    /// The source can take writes.
    pub(crate) writable: bool,
    /// Another thread asked (a nudge), or a deadline passed: look at everything.
    pub(crate) nudged: bool,
    /// The other end has closed its side (or the source failed): its end is
    /// waiting to be read, after any bytes before it, and no later event
    /// will say so again.
    pub(crate) closed: bool,
}

impl Readiness {
    /// Look at everything: reads, writes, deadlines.
    pub(crate) const ALL: Readiness = Readiness {
        readable: true,
        writable: true,
        nudged: true,
        closed: false,
    };
}

/// What a source tells its I/O thread after running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ready {
    /// Keep it; it has arranged to be reported when there is more to do.
    Wait,
    /// Keep it, and poll it while the thread spins (busy polling) for at
    /// least this long after it last did work: it has *not* arranged to be
    /// woken, to spare its peer a wake-up per message; [`Watched::arm`] is
    /// called before the thread sleeps.
    Spin(Duration),
    /// Remove it (its descriptor leaves the wait).
    Done,
}

/// What an I/O thread drives: a connection, a listener, a handshake.
pub(crate) trait Watched: Send + Sync {
    /// The descriptor to wait on.
    fn fd(&self) -> RawFd;

    /// Runs on the I/O thread when the descriptor is ready, when nudged, or
    /// when [`deadline`](Self::deadline) passes.
    fn ready(&self, why: Readiness) -> Ready;

    /// When `ready` must run even if nothing happens (a handshake's time
    /// limit). Asked once, when the source is added.
    fn deadline(&self) -> Option<Instant> {
        None
    }

    /// For a spinning source: whether there is work now that no event
    /// reports (bytes in a shared-memory ring). Costs no system call.
    fn has_work(&self) -> bool {
        false
    }

    /// For a spinning source, before its thread sleeps: arranges to be
    /// reported when there is more; `true` when there is work already.
    fn arm(&self) -> bool {
        false
    }

    /// The source's place on its I/O thread, given before it first runs
    /// (to ask for writability from [`ready`](Self::ready)).
    fn registered(&self, _registration: &Registration) {}
}

enum Command {
    Add(Registration, Arc<dyn Watched>),
    Remove(Token),
    Nudge(Token),
    Stop,
}

struct Shared {
    registry: mio::Registry,
    waker: mio::Waker,
    commands: Mutex<Vec<Command>>,
    stopped: AtomicBool,
}

impl Shared {
    fn send(&self, command: Command) {
        let first = {
            let mut commands = self.commands.lock().unwrap_or_else(|p| p.into_inner());
            commands.push(command);
            commands.len() == 1
        };
        // The thread takes every command each time it wakes: one wake-up
        // covers all that came before it looked.
        if first {
            let _ = self.waker.wake();
        }
    }
}

/// A source's place on an I/O thread.
///
/// A source is waited on for readability, and for writability only while
/// it asks ([`want_writable`](Registration::want_writable)): a socket is
/// writable nearly always, and being told so at every turn would wake the
/// I/O thread for nothing.
///
/// What is asked (writability, a pause) and what the poller is told change
/// together, under one lock: a requester pausing the connection while its
/// I/O thread asks for writability, or either of them before the thread has
/// taken the source in, must not leave the poller waiting for less than the
/// source needs (bytes left in its outbox that nobody writes).
#[derive(Clone)]
pub(crate) struct Registration {
    shared: Weak<Shared>,
    token: Token,
    fd: RawFd,
    state: Arc<Mutex<Interests>>,
    /// Whether writability is asked for now: read without the lock by
    /// [`want_writable`](Self::want_writable) to skip the usual no-change
    /// call; written only under it.
    writable: Arc<AtomicBool>,
}

/// What a source asks of its I/O thread's poller.
#[derive(Debug, Default)]
struct Interests {
    /// Writability is waited for too.
    writable: bool,
    /// Taken out of the wait for readability by a requester.
    paused: bool,
    /// The I/O thread has taken the source in (until then, nothing is
    /// registered, and taking it in registers what is asked by then).
    added: bool,
    /// The I/O thread let it go: nothing is registered again.
    removed: bool,
}

impl Interests {
    /// What the poller waits for, `None` for nothing.
    fn interest(&self) -> Option<Interest> {
        match (self.paused, self.writable) {
            (false, false) => Some(Interest::READABLE),
            (false, true) => Some(Interest::READABLE | Interest::WRITABLE),
            (true, true) => Some(Interest::WRITABLE),
            (true, false) => None,
        }
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registration({})", self.token.0)
    }
}

impl Registration {
    fn new(shared: Weak<Shared>, token: Token, fd: RawFd) -> Registration {
        Registration {
            shared,
            token,
            fd,
            state: Arc::default(),
            writable: Arc::default(),
        }
    }

    /// A registration with no I/O thread behind it (the node shut down):
    /// every call does nothing.
    pub(crate) fn detached() -> Registration {
        Registration::new(Weak::new(), Token(usize::MAX - 1), -1)
    }

    /// Runs the source's [`Watched::ready`] on its I/O thread soon, as if
    /// everything were ready.
    pub(crate) fn nudge(&self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.send(Command::Nudge(self.token));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Interests> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the poller what `state` asks (called with its lock held).
    /// Fails only for a descriptor already gone: nothing to wait on then.
    fn apply(&self, state: &Interests) -> io::Result<()> {
        if !state.added || state.removed {
            return Ok(());
        }
        let Some(shared) = self.shared.upgrade() else {
            return Ok(());
        };
        match state.interest() {
            Some(interest) => watch(&shared.registry, self.fd, self.token, interest),
            None => match shared.registry.deregister(&mut SourceFd(&self.fd)) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
        }
    }

    /// Waits for writability too (`true`: a write could not finish), or no
    /// longer (`false`). Costs a system call only when it changes. While
    /// the source is [paused](Self::pause), writability alone is waited
    /// for: a requester reading its reply does not write the rest of its
    /// request, the I/O thread does.
    pub(crate) fn want_writable(&self, on: bool) {
        if self.writable.load(Ordering::Acquire) == on {
            return;
        }
        let mut state = self.lock();
        if state.writable == on {
            return;
        }
        state.writable = on;
        self.writable.store(on, Ordering::Release);
        let _ = self.apply(&state);
    }

    /// Takes the descriptor out of the I/O thread's wait for readability (a
    /// requester reads the connection itself meanwhile); writability stays
    /// waited for while a write waits for room. The source stays registered.
    pub(crate) fn pause(&self) {
        let mut state = self.lock();
        state.paused = true;
        let _ = self.apply(&state);
    }

    /// Puts a paused descriptor back; readiness that arrived meanwhile is
    /// reported at once.
    pub(crate) fn resume(&self) {
        let mut state = self.lock();
        state.paused = false;
        let _ = self.apply(&state);
    }

    /// The I/O thread takes the source in: registers what it asks now.
    fn added(&self) -> io::Result<()> {
        let mut state = self.lock();
        state.added = true;
        self.apply(&state)
    }

    /// The I/O thread lets the source go: its descriptor leaves the wait
    /// for good.
    fn removed(&self) {
        let mut state = self.lock();
        state.removed = true;
        if let Some(shared) = self.shared.upgrade() {
            let _ = shared.registry.deregister(&mut SourceFd(&self.fd));
        }
    }

    /// Removes the source from its I/O thread.
    pub(crate) fn remove(&self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.send(Command::Remove(self.token));
        }
    }
}

/// A node's I/O threads; see the [module docs](self).
pub(crate) struct Reactor {
    threads: Vec<(Arc<Shared>, Option<thread::JoinHandle<()>>)>,
    next_thread: AtomicUsize,
    next_token: AtomicUsize,
}

impl Reactor {
    /// Starts `threads` I/O threads (at least one), named after `name`.
    /// A thread keeps polling without sleeping for as long as a source that
    /// asked to [spin](Ready::Spin) said, after it did work.
    ///
    /// # Errors
    ///
    /// When the poller or a thread cannot be created.
    pub(crate) fn new(threads: usize, name: &str) -> Result<Reactor> {
        let mut started = Vec::new();
        for i in 0..threads.max(1) {
            let poll = Poll::new().map_err(|e| Error::io("creating an I/O poller (epoll)", e))?;
            let registry = poll
                .registry()
                .try_clone()
                .map_err(|e| Error::io("creating an I/O poller (epoll)", e))?;
            let waker = mio::Waker::new(poll.registry(), WAKER)
                .map_err(|e| Error::io("creating an I/O thread's waker (eventfd)", e))?;
            let shared = Arc::new(Shared {
                registry,
                waker,
                commands: Mutex::new(Vec::new()),
                stopped: AtomicBool::new(false),
            });
            let s = Arc::clone(&shared);
            let handle = thread::Builder::new()
                .name(format!("tf-io-{i}"))
                .spawn(move || run(poll, &s))
                .map_err(|e| Error::io("starting an I/O thread", e))?;
            tracing::debug!(node = name, thread = i, "I/O thread started");
            started.push((shared, Some(handle)));
        }
        Ok(Reactor {
            threads: started,
            next_thread: AtomicUsize::new(0),
            next_token: AtomicUsize::new(0),
        })
    }

    /// Hands `source` to one of the I/O threads (in turn) and returns its
    /// registration.
    pub(crate) fn add(&self, source: Arc<dyn Watched>) -> Registration {
        let i = self.next_thread.fetch_add(1, Ordering::Relaxed) % self.threads.len();
        let shared = &self.threads[i].0;
        let token = Token(self.next_token.fetch_add(1, Ordering::Relaxed));
        let registration = Registration::new(Arc::downgrade(shared), token, source.fd());
        source.registered(&registration);
        shared.send(Command::Add(registration.clone(), source));
        registration
    }

    /// Stops every I/O thread and waits for them (unless called on one of
    /// them). What they held is dropped.
    pub(crate) fn stop(&mut self) {
        let me = thread::current().id();
        for (shared, handle) in &mut self.threads {
            shared.stopped.store(true, Ordering::Release);
            shared.send(Command::Stop);
            if let Some(h) = handle.take() {
                if h.thread().id() != me {
                    let _ = h.join();
                }
            }
        }
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        self.stop();
    }
}

thread_local! {
    /// Whether this thread is an I/O thread (see [`on_io_thread`]).
    static IO_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is one of the nodes' I/O threads: work handed
/// to an I/O thread from one (an inline service's) may wait for it to
/// return, so it is done there and then instead.
pub(crate) fn on_io_thread() -> bool {
    IO_THREAD.with(std::cell::Cell::get)
}

/// One I/O thread's loop.
fn run(mut poll: Poll, shared: &Shared) {
    IO_THREAD.with(|t| t.set(true));
    let mut events = Events::with_capacity(256);
    let mut state = Sources::default();
    // Until when the thread spins, while sources ask to.
    let mut spin_until = Instant::now();
    loop {
        let now = Instant::now();
        if !state.spinning.is_empty() && now >= spin_until {
            // About to sleep: every spinning source arms its wake-ups; one
            // with work already runs (and may spin on).
            let mut again = false;
            for token in std::mem::take(&mut state.spinning) {
                if state.watched.get(&token).is_some_and(|(s, _)| s.arm()) {
                    again |= state.run_one(token, Readiness::ALL);
                }
            }
            if again {
                spin_until = Instant::now() + std::mem::take(&mut state.spin_for);
            }
        }
        let timeout = match (state.spinning.is_empty(), state.deadlines.first()) {
            (false, _) => Some(Duration::ZERO),
            (true, Some((at, _))) => Some(at.saturating_duration_since(now)),
            (true, None) => None,
        };
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() != io::ErrorKind::Interrupted {
                tracing::error!(error = %e, "I/O thread: waiting for events failed; it stops");
                return;
            }
        }
        let mut nudged: Vec<Token> = Vec::new();
        let commands =
            std::mem::take(&mut *shared.commands.lock().unwrap_or_else(|p| p.into_inner()));
        for command in commands {
            match command {
                Command::Add(registration, source) => {
                    let token = registration.token;
                    if let Err(e) = registration.added() {
                        tracing::warn!(error = %e, "I/O thread: a connection could not be watched; it is closed");
                        registration.removed();
                        let _ = source.ready(Readiness::ALL);
                        continue;
                    }
                    if let Some(at) = source.deadline() {
                        state.deadlines.insert((at, token));
                    }
                    state.watched.insert(token, (source, registration));
                    // What arrived before the registration is looked at now.
                    nudged.push(token);
                }
                Command::Remove(token) => {
                    if let Some((_, registration)) = state.watched.remove(&token) {
                        registration.removed();
                    }
                    state.spinning.retain(|t| *t != token);
                }
                Command::Nudge(token) => nudged.push(token),
                Command::Stop => return,
            }
        }
        // Whether a source that spins did work: the spin goes on from now.
        let mut worked = false;
        let spun = state.spinning.len();
        for event in events.iter() {
            let token = event.token();
            if token == WAKER {
                continue;
            }
            let why = Readiness {
                readable: event.is_readable() || event.is_read_closed() || event.is_error(),
                writable: event.is_writable() || event.is_write_closed(),
                nudged: false,
                closed: event.is_read_closed() || event.is_error(),
            };
            worked |= state.run_one(token, why);
        }
        let now = Instant::now();
        while let Some(&(at, token)) = state.deadlines.first() {
            if at > now {
                break;
            }
            state.deadlines.pop_first();
            nudged.push(token);
        }
        for token in nudged {
            worked |= state.run_one(token, Readiness::ALL);
        }
        // Spinning sources with work no event reports (a ring) run too.
        for i in 0..spun.min(state.spinning.len()) {
            let token = state.spinning[i];
            if state.watched.get(&token).is_some_and(|(s, _)| s.has_work()) {
                worked |= state.run_one(token, Readiness::ALL);
            }
        }
        if worked {
            spin_until = Instant::now() + std::mem::take(&mut state.spin_for);
        }
        if shared.stopped.load(Ordering::Acquire) {
            return;
        }
    }
}

/// Adds `fd` to the registry's wait for `interest`, or sets its interest
/// when it is there already (a paused source put back).
fn watch(registry: &mio::Registry, fd: RawFd, token: Token, interest: Interest) -> io::Result<()> {
    match registry.register(&mut SourceFd(&fd), token, interest) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            registry.reregister(&mut SourceFd(&fd), token, interest)
        }
        other => other,
    }
}

/// What one I/O thread watches.
#[derive(Default)]
struct Sources {
    watched: HashMap<Token, (Arc<dyn Watched>, Registration)>,
    /// When each source with a deadline is run again (entries may be stale:
    /// a source run early only looks again).
    deadlines: BTreeSet<(Instant, Token)>,
    /// Sources that asked to spin.
    spinning: Vec<Token>,
    /// The longest spin a source asked for since the spin was last renewed.
    spin_for: Duration,
}

impl Sources {
    /// Runs one source: removes it when it is done, and keeps it among the
    /// spinning ones when it asks to spin (then `true`).
    fn run_one(&mut self, token: Token, why: Readiness) -> bool {
        let Some(source) = self.watched.get(&token).map(|(s, _)| Arc::clone(s)) else {
            return false;
        };
        let ready = source.ready(why);
        if ready != Ready::Done {
            // A source may have a new deadline now (a frame begun, say); one
            // that passed or moved only runs it once more.
            if let Some(at) = source.deadline() {
                self.deadlines.insert((at, token));
            }
        }
        match ready {
            Ready::Wait => {
                self.spinning.retain(|t| *t != token);
                false
            }
            Ready::Spin(d) => {
                if !self.spinning.contains(&token) {
                    self.spinning.push(token);
                }
                self.spin_for = self.spin_for.max(d);
                true
            }
            Ready::Done => {
                self.spinning.retain(|t| *t != token);
                if let Some((_, registration)) = self.watched.remove(&token) {
                    registration.removed();
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::AtomicU32;

    struct Echoless {
        stream: UnixStream,
        read: AtomicU32,
        nudges: AtomicU32,
        /// Writability the poller reported (not nudges).
        writable: AtomicU32,
    }

    impl Watched for Echoless {
        fn fd(&self) -> RawFd {
            self.stream.as_raw_fd()
        }
        fn ready(&self, why: Readiness) -> Ready {
            if why.nudged {
                self.nudges.fetch_add(1, Ordering::SeqCst);
            } else if why.writable {
                self.writable.fetch_add(1, Ordering::SeqCst);
            }
            if !(why.readable || why.nudged) {
                return Ready::Wait;
            }
            let mut buf = [0u8; 64];
            loop {
                match (&self.stream).read(&mut buf) {
                    Ok(0) => return Ready::Done,
                    Ok(n) => {
                        self.read.fetch_add(n as u32, Ordering::SeqCst);
                    }
                    Err(_) => return Ready::Wait,
                }
            }
        }
    }

    /// A socket pair, one end watched as an `Echoless`.
    fn echoless() -> (UnixStream, Arc<Echoless>) {
        let (a, b) = UnixStream::pair().expect("pair");
        b.set_nonblocking(true).expect("nonblocking");
        let source = Arc::new(Echoless {
            stream: b,
            read: AtomicU32::new(0),
            nudges: AtomicU32::new(0),
            writable: AtomicU32::new(0),
        });
        (a, source)
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn one_thread_reads_many_sockets_and_takes_nudges() {
        let reactor = Reactor::new(1, "test").expect("reactor");
        let mut peers = Vec::new();
        let mut sources = Vec::new();
        for _ in 0..50 {
            let (a, source) = echoless();
            let reg = reactor.add(Arc::clone(&source) as Arc<dyn Watched>);
            peers.push((a, reg));
            sources.push(source);
        }
        for (i, (a, _)) in peers.iter_mut().enumerate() {
            a.write_all(&vec![1u8; i + 1]).expect("write");
        }
        wait_for("every byte", || {
            sources
                .iter()
                .enumerate()
                .all(|(i, s)| s.read.load(Ordering::SeqCst) == i as u32 + 1)
        });
        let before = sources[7].nudges.load(Ordering::SeqCst);
        peers[7].1.nudge();
        wait_for("the nudge", || {
            sources[7].nudges.load(Ordering::SeqCst) > before
        });
    }

    #[test]
    fn a_paused_source_is_not_run_and_resuming_reports_what_came() {
        let reactor = Reactor::new(1, "test").expect("reactor");
        let (mut a, source) = echoless();
        let reg = reactor.add(Arc::clone(&source) as Arc<dyn Watched>);
        wait_for("the first look", || {
            source.nudges.load(Ordering::SeqCst) == 1
        });
        reg.pause();
        a.write_all(b"abc").expect("write");
        thread::sleep(Duration::from_millis(50));
        assert_eq!(source.read.load(Ordering::SeqCst), 0, "read while paused");
        reg.resume();
        wait_for("the bytes", || source.read.load(Ordering::SeqCst) == 3);
    }

    #[test]
    fn a_source_that_ends_is_removed() {
        let reactor = Reactor::new(2, "test").expect("reactor");
        let (a, source) = echoless();
        let weak = Arc::downgrade(&source);
        reactor.add(source as Arc<dyn Watched>);
        drop(a);
        wait_for("the removal", || weak.strong_count() == 0);
    }

    #[test]
    fn writability_asked_for_around_a_pause_is_reported_whenever_the_thread_takes_the_source_in() {
        // A requester sends (its write fills the socket and asks for
        // writability) and pauses the connection to read its reply, all
        // before or while the I/O thread takes the new connection in: the
        // rest of the request is written only if the thread is told when
        // the socket has room.
        for pause_first in [false, true] {
            let reactor = Reactor::new(1, "test").expect("reactor");
            let (mut a, source) = echoless();
            let chunk = [7u8; 4096];
            let mut filled = 0usize;
            loop {
                match (&source.stream).write(&chunk) {
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("filling the socket: {e}"),
                }
            }
            let reg = reactor.add(Arc::clone(&source) as Arc<dyn Watched>);
            if pause_first {
                reg.pause();
                reg.want_writable(true);
            } else {
                reg.want_writable(true);
                reg.pause();
            }
            wait_for("the first look", || {
                source.nudges.load(Ordering::SeqCst) == 1
            });
            let mut buf = vec![0u8; filled];
            a.read_exact(&mut buf).expect("drain");
            wait_for("writability", || {
                source.writable.load(Ordering::SeqCst) >= 1
            });
            // Paused: what the peer writes is not read by the I/O thread.
            a.write_all(b"abc").expect("write");
            thread::sleep(Duration::from_millis(50));
            assert_eq!(source.read.load(Ordering::SeqCst), 0, "read while paused");
            reg.resume();
            wait_for("the bytes", || source.read.load(Ordering::SeqCst) == 3);
        }
    }
}
