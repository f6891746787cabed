//! [`Queue`]: the bounded queue that sits between a producer and a consumer
//! everywhere in a node (a subscription's messages, a service's requests),
//! with the channel's overflow policy, and waits in both forms: blocking
//! (with a deadline) and async (through [`Waker`]s, on any executor).
//!
//! A producer that must not block — an I/O thread delivering what it read —
//! uses [`Queue::offer`]: under `block` a full queue hands the item back, and
//! the producer registers a waker with [`Queue::wake_on_room`] to be told
//! when a consumer has made room. That is how backpressure reaches a peer's
//! socket without stopping the thread that serves every other peer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use tensorferry_device_map::Overflow;

/// What [`Queue::offer`] did with an item.
#[derive(Debug)]
pub(crate) enum Offer<T> {
    /// Queued (under `drop_oldest`, possibly after dropping the oldest).
    Taken,
    /// The queue is full and its policy is `block`: the item is handed back.
    Full(T),
    /// The queue is closed: the item is handed back.
    Closed(T),
}

/// What a blocking [`Queue::pop`] found.
#[derive(Debug)]
pub(crate) enum Pop<T> {
    /// The next item.
    Item(T),
    /// Nothing came before the deadline.
    TimedOut,
    /// The queue is closed and empty.
    Closed,
}

struct State<T> {
    items: VecDeque<T>,
    /// What the queued items weigh (see [`Queue::with_bytes`]).
    bytes: u64,
    closed: bool,
    dropped: u64,
    /// Async consumers (and anything else) waiting for an item.
    item_wakers: Vec<Waker>,
    /// Async producers and stalled readers waiting for room.
    room_wakers: Vec<Waker>,
    /// When the first of `room_wakers` began to wait.
    room_waited_since: Option<Instant>,
    /// Threads blocked on each condition variable: a notify costs a system
    /// call whether or not anyone waits, so it is made only when someone does.
    waiting_items: usize,
    waiting_room: usize,
}

/// How many bytes an item counts for.
type Weigh<T> = fn(&T) -> u64;

/// A bounded queue with an overflow policy; see the [module docs](self).
pub(crate) struct Queue<T> {
    state: Mutex<State<T>>,
    /// Items queued, readable without the lock: what a consumer about to
    /// sleep looks at while it spins a little first.
    queued: AtomicUsize,
    item_arrived: Condvar,
    room_made: Condvar,
    depth: usize,
    overflow: Overflow,
    /// Most bytes queued, and how an item's bytes are counted.
    bytes: Option<(u64, Weigh<T>)>,
    /// See [`ROOM_PATIENCE`].
    room_patience: std::time::Duration,
}

/// How many times a consumer looks again before it sleeps.
const SPINS: u32 = 10;

/// Waits a little before looking again: a few spins, growing, then a yield.
fn backoff(step: u32) {
    if step < 6 {
        for _ in 0..1u32 << step {
            std::hint::spin_loop();
        }
    } else {
        std::thread::yield_now();
    }
}

fn wake_all(wakers: &mut Vec<Waker>) {
    for w in wakers.drain(..) {
        w.wake();
    }
}

/// Whether a bounded queue of `len` items (of `depth`) and `bytes` bytes
/// (of `max_bytes`, when bounded in bytes) has drained enough to wake a
/// producer that waited for room: empty, or at most half full both ways.
/// Waking at the first free place instead wakes a producer kept at the
/// limit once per item.
pub(crate) fn half_drained(len: usize, depth: usize, bytes: u64, max_bytes: Option<u64>) -> bool {
    len == 0 || (len <= depth / 2 && max_bytes.is_none_or(|max| bytes <= max / 2))
}

/// How long a waker waiting for room may be kept waiting for the queue to
/// drain to half: past it, the next item taken wakes it. Items that take
/// long to consume (large tensors) then leave no connection unread for long.
const ROOM_PATIENCE: std::time::Duration = std::time::Duration::from_micros(200);

fn register(wakers: &mut Vec<Waker>, waker: &Waker) {
    if !wakers.iter().any(|w| w.will_wake(waker)) {
        wakers.push(waker.clone());
    }
}

impl<T> Queue<T> {
    /// A queue of at most `depth` items (at least one) with `overflow`.
    pub(crate) fn new(depth: usize, overflow: Overflow) -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::new(),
                bytes: 0,
                closed: false,
                dropped: 0,
                item_wakers: Vec::new(),
                room_wakers: Vec::new(),
                room_waited_since: None,
                waiting_items: 0,
                waiting_room: 0,
            }),
            queued: AtomicUsize::new(0),
            item_arrived: Condvar::new(),
            room_made: Condvar::new(),
            depth: depth.max(1),
            overflow,
            bytes: None,
            room_patience: ROOM_PATIENCE,
        }
    }

    /// Bounds the queue in bytes too, each item weighing what `weigh` says:
    /// the policy applies on either limit; a single item heavier than
    /// `max` still passes through an empty queue.
    pub(crate) fn with_bytes(mut self, max: u64, weigh: Weigh<T>) -> Self {
        self.bytes = Some((max.max(1), weigh));
        self
    }

    /// Sets how long a waker waits for half the queue (tests).
    #[cfg(test)]
    fn with_room_patience(mut self, patience: std::time::Duration) -> Self {
        self.room_patience = patience;
        self
    }

    fn weight(&self, item: &T) -> u64 {
        self.bytes.map_or(0, |(_, weigh)| weigh(item))
    }

    /// Whether `weight` more fits now.
    fn fits(&self, s: &State<T>, weight: u64) -> bool {
        s.items.len() < self.depth
            && match self.bytes {
                Some((max, _)) => s.items.is_empty() || s.bytes.saturating_add(weight) <= max,
                None => true,
            }
    }

    /// Whether a waiting producer should look again: a place is free and
    /// some bytes are.
    fn has_room(&self, s: &State<T>) -> bool {
        s.items.len() < self.depth
            && self
                .bytes
                .is_none_or(|(max, _)| s.bytes < max || s.items.is_empty())
    }

    /// Whether producers waiting for room (a stalled connection's I/O
    /// thread or an async producer through a waker, a thread blocked in
    /// [`push`](Self::push)) are woken now: once the queue has drained to
    /// half its depth (and half its bytes), not at the first free place, so
    /// that a producer kept at the limit is woken once per half a queue, not
    /// once per item (a sleep and a wake-up on each side per item); or at
    /// the first item taken after the first of them waited
    /// [`ROOM_PATIENCE`], so items that take long to consume keep no
    /// producer waiting long.
    fn drained(&self, s: &State<T>) -> bool {
        half_drained(
            s.items.len(),
            self.depth,
            s.bytes,
            self.bytes.map(|(max, _)| max),
        )
    }

    fn pop_front(&self, s: &mut State<T>) -> Option<T> {
        let item = s.items.pop_front()?;
        s.bytes = s.bytes.saturating_sub(self.weight(&item));
        Some(item)
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `item` without blocking: under `drop_oldest` a full queue
    /// drops its oldest item (and counts it); under `block` it hands `item`
    /// back.
    pub(crate) fn offer(&self, item: T) -> Offer<T> {
        let mut s = self.lock();
        if s.closed {
            return Offer::Closed(item);
        }
        let weight = self.weight(&item);
        while !self.fits(&s, weight) {
            match self.overflow {
                Overflow::Block => return Offer::Full(item),
                Overflow::DropOldest => {
                    self.pop_front(&mut s);
                    s.dropped += 1;
                }
            }
        }
        s.bytes += weight;
        s.items.push_back(item);
        self.arrived(s);
        Offer::Taken
    }

    fn arrived(&self, mut s: MutexGuard<'_, State<T>>) {
        self.queued.store(s.items.len(), Ordering::Release);
        let mut wakers = std::mem::take(&mut s.item_wakers);
        let blocked = s.waiting_items > 0;
        drop(s);
        if blocked {
            self.item_arrived.notify_one();
        }
        wake_all(&mut wakers);
    }

    /// Queues `item` by the policy, waiting for room under `block` until
    /// `deadline` (`None`: as long as it takes).
    ///
    /// # Errors
    ///
    /// The item back, as [`Offer::Full`] when the deadline passed or
    /// [`Offer::Closed`] when the queue was closed.
    pub(crate) fn push(&self, item: T, deadline: Option<Instant>) -> Result<(), Offer<T>> {
        let mut item = item;
        loop {
            match self.offer(item) {
                Offer::Taken => return Ok(()),
                Offer::Closed(back) => return Err(Offer::Closed(back)),
                Offer::Full(back) => item = back,
            }
            let mut s = self.lock();
            if s.closed {
                return Err(Offer::Closed(item));
            }
            if self.has_room(&s) {
                continue;
            }
            s.waiting_room += 1;
            s.room_waited_since.get_or_insert_with(Instant::now);
            let mut s = match deadline {
                None => self.room_made.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        s.waiting_room -= 1;
                        return Err(Offer::Full(item));
                    }
                    self.room_made
                        .wait_timeout(s, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
            s.waiting_room -= 1;
        }
    }

    /// Whether a [`push`](Self::push) would find room now (or the queue
    /// closed, or its policy drops instead of waiting); if not, the
    /// context's waker is woken when room is made.
    pub(crate) fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.lock();
        if s.closed || self.has_room(&s) || self.overflow == Overflow::DropOldest {
            return Poll::Ready(());
        }
        register(&mut s.room_wakers, cx.waker());
        s.room_waited_since.get_or_insert_with(Instant::now);
        Poll::Pending
    }

    /// Queues `item` whatever the depth: for events that must not be lost
    /// (a lost peer). The queue may hold one more than its depth.
    pub(crate) fn force(&self, item: T) {
        let mut s = self.lock();
        s.bytes += self.weight(&item);
        s.items.push_back(item);
        self.arrived(s);
    }

    /// Wakes `waker` once when the queue has room (or is closed): at once
    /// when it has room now.
    pub(crate) fn wake_on_room(&self, waker: &Waker) {
        let mut s = self.lock();
        if s.closed || self.has_room(&s) {
            drop(s);
            waker.wake_by_ref();
        } else {
            register(&mut s.room_wakers, waker);
            s.room_waited_since.get_or_insert_with(Instant::now);
        }
    }

    fn took(&self, mut s: MutexGuard<'_, State<T>>) {
        self.queued.store(s.items.len(), Ordering::Release);
        if s.room_wakers.is_empty() && s.waiting_room == 0 {
            return;
        }
        let patience_over = || {
            s.room_waited_since
                .is_some_and(|t| t.elapsed() >= self.room_patience)
        };
        if !(self.drained(&s) || patience_over()) {
            return;
        }
        s.room_waited_since = None;
        let blocked = s.waiting_room > 0;
        let mut wakers = std::mem::take(&mut s.room_wakers);
        drop(s);
        if blocked {
            self.room_made.notify_all();
        }
        wake_all(&mut wakers);
    }

    /// The next item if one is queued; `Err(())` when closed and empty.
    pub(crate) fn try_pop(&self) -> Result<Option<T>, ()> {
        let mut s = self.lock();
        match self.pop_front(&mut s) {
            Some(item) => {
                self.took(s);
                Ok(Some(item))
            }
            None if s.closed => Err(()),
            None => Ok(None),
        }
    }

    /// The next item, waiting until `deadline` (`None`: as long as it takes).
    pub(crate) fn pop(&self, deadline: Option<Instant>) -> Pop<T> {
        let mut s = self.lock();
        let mut spins = 0;
        loop {
            if let Some(item) = self.pop_front(&mut s) {
                self.took(s);
                return Pop::Item(item);
            }
            if s.closed {
                return Pop::Closed;
            }
            // A producer that is busy now usually has the next item soon:
            // a short spin saves the sleep and the wake-up (as channels do).
            if spins < SPINS {
                drop(s);
                while spins < SPINS && self.queued.load(Ordering::Acquire) == 0 {
                    backoff(spins);
                    spins += 1;
                }
                s = self.lock();
                continue;
            }
            s.waiting_items += 1;
            s = match deadline {
                None => self.item_arrived.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        s.waiting_items -= 1;
                        return Pop::TimedOut;
                    }
                    self.item_arrived
                        .wait_timeout(s, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
            s.waiting_items -= 1;
        }
    }

    /// Whether an item waits (or the queue is closed); if not, `waker` is
    /// woken when one arrives or the queue closes.
    pub(crate) fn ready_or_wake(&self, waker: &Waker) -> bool {
        let mut s = self.lock();
        if !s.items.is_empty() || s.closed {
            return true;
        }
        register(&mut s.item_wakers, waker);
        false
    }

    /// Whether no item waits, as last published, without taking the lock
    /// (a consumer's quick look; [`len`](Self::len) is exact).
    pub(crate) fn looks_empty(&self) -> bool {
        self.queued.load(Ordering::Acquire) == 0
    }

    /// The async form of [`pop`](Self::pop): `Ready(None)` when closed and empty.
    pub(crate) fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut s = self.lock();
        if let Some(item) = self.pop_front(&mut s) {
            self.took(s);
            return Poll::Ready(Some(item));
        }
        if s.closed {
            return Poll::Ready(None);
        }
        register(&mut s.item_wakers, cx.waker());
        Poll::Pending
    }

    /// Closes the queue: producers are refused from now on, consumers take
    /// what is left and then learn it is closed; every waiter is woken.
    pub(crate) fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        let mut wakers = std::mem::take(&mut s.item_wakers);
        wakers.append(&mut s.room_wakers);
        s.room_waited_since = None;
        drop(s);
        self.item_arrived.notify_all();
        self.room_made.notify_all();
        wake_all(&mut wakers);
    }

    /// The most items it holds.
    pub(crate) fn depth(&self) -> usize {
        self.depth
    }

    /// Items queued now.
    pub(crate) fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// Items dropped by `drop_oldest` so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.lock().dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;
    use std::time::Duration;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counter() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (Arc::clone(&c), Waker::from(c))
    }

    #[test]
    fn drop_oldest_keeps_the_newest_and_counts_the_rest() {
        let q = Queue::new(2, Overflow::DropOldest);
        for i in 0..5 {
            assert!(matches!(q.offer(i), Offer::Taken));
        }
        assert_eq!(q.dropped(), 3);
        assert!(matches!(q.try_pop(), Ok(Some(3))));
        assert!(matches!(q.try_pop(), Ok(Some(4))));
        assert!(matches!(q.try_pop(), Ok(None)));
    }

    #[test]
    fn block_hands_the_item_back_and_wakes_the_producer_when_room_is_made() {
        let q = Queue::new(1, Overflow::Block);
        assert!(matches!(q.offer(1), Offer::Taken));
        assert!(matches!(q.offer(2), Offer::Full(2)));
        let (count, waker) = counter();
        q.wake_on_room(&waker);
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        assert!(matches!(q.try_pop(), Ok(Some(1))));
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(matches!(q.offer(2), Offer::Taken));
    }

    #[test]
    fn a_producer_at_the_limit_is_woken_once_half_the_queue_drained() {
        // Eight places: a stalled producer is woken when four are left, not
        // at the first free place (a wake-up per item at the limit is what
        // the hysteresis saves); byte bounds drain to half their bytes too.
        let hour = Duration::from_secs(3600);
        let q = Queue::new(8, Overflow::Block).with_room_patience(hour);
        for i in 0..8 {
            assert!(matches!(q.offer(i), Offer::Taken));
        }
        let (count, waker) = counter();
        q.wake_on_room(&waker);
        for (i, woken) in [(0, 0), (1, 0), (2, 0), (3, 1)] {
            assert!(matches!(q.try_pop(), Ok(Some(n)) if n == i));
            assert_eq!(
                count.0.load(Ordering::SeqCst),
                woken,
                "after popping item {i}"
            );
        }
        // Room now is taken at once, without waiting.
        q.wake_on_room(&waker);
        assert_eq!(count.0.load(Ordering::SeqCst), 2);

        let weigh: Weigh<usize> = |n| *n as u64;
        let q = Queue::new(100, Overflow::Block)
            .with_bytes(100, weigh)
            .with_room_patience(hour);
        for _ in 0..4 {
            assert!(matches!(q.offer(25), Offer::Taken));
        }
        let (count, waker) = counter();
        q.wake_on_room(&waker);
        assert!(matches!(q.try_pop(), Ok(Some(25))));
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "75 of 100 bytes left");
        assert!(matches!(q.try_pop(), Ok(Some(25))));
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "50 of 100 bytes left");

        // Slow items (large tensors): a waker that waited past its patience
        // is woken by the next item taken, not left until half is drained.
        let q = Queue::new(8, Overflow::Block).with_room_patience(Duration::from_millis(5));
        for i in 0..8 {
            assert!(matches!(q.offer(i), Offer::Taken));
        }
        let (count, waker) = counter();
        q.wake_on_room(&waker);
        assert!(matches!(q.try_pop(), Ok(Some(0))));
        std::thread::sleep(Duration::from_millis(10));
        assert!(matches!(q.try_pop(), Ok(Some(1))));
        assert_eq!(count.0.load(Ordering::SeqCst), 1, "woken past its patience");
    }

    #[test]
    fn a_blocked_push_goes_on_when_a_consumer_takes_an_item() {
        let q = Arc::new(Queue::new(1, Overflow::Block));
        q.push(1, None).expect("room");
        let consumer = std::thread::spawn({
            let q = Arc::clone(&q);
            move || {
                std::thread::sleep(Duration::from_millis(20));
                matches!(q.pop(None), Pop::Item(1))
            }
        });
        q.push(2, None).expect("room after the pop");
        assert!(consumer.join().expect("consumer"));
        assert!(matches!(q.try_pop(), Ok(Some(2))));
        let deadline = Instant::now() + Duration::from_millis(10);
        q.push(3, None).expect("room");
        assert!(matches!(q.push(4, Some(deadline)), Err(Offer::Full(4))));
    }

    /// A queue of 8 holding 0..8, and a thread blocked pushing 8 into it
    /// (given 20 ms to block).
    fn full_with_a_blocked_producer(
        patience: Duration,
    ) -> (Arc<Queue<i32>>, std::thread::JoinHandle<bool>) {
        let q = Arc::new(Queue::new(8, Overflow::Block).with_room_patience(patience));
        for i in 0..8 {
            q.push(i, None).expect("room");
        }
        let producer = std::thread::spawn({
            let q = Arc::clone(&q);
            move || q.push(8, None).is_ok()
        });
        std::thread::sleep(Duration::from_millis(20));
        (q, producer)
    }

    #[test]
    fn a_blocked_push_is_woken_when_half_the_queue_is_free_not_at_each_item() {
        let (q, producer) = full_with_a_blocked_producer(Duration::from_secs(60));
        for taken in 0..3 {
            assert!(matches!(q.try_pop(), Ok(Some(n)) if n == taken));
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(
                q.len(),
                7 - taken as usize,
                "the producer was woken with the queue over half full"
            );
        }
        // The fourth item taken leaves half the queue free.
        assert!(matches!(q.try_pop(), Ok(Some(3))));
        assert!(producer.join().expect("producer"));
        assert_eq!(q.len(), 5);

        // Past its patience, the next item taken wakes it.
        let (q, producer) = full_with_a_blocked_producer(Duration::from_millis(1));
        assert!(matches!(q.try_pop(), Ok(Some(0))));
        assert!(producer.join().expect("producer"));
        assert_eq!(q.len(), 8);
    }

    #[test]
    fn a_byte_bound_applies_the_policy_on_bytes_too() {
        let weigh: Weigh<usize> = |n| *n as u64;
        // Ten places, but 100 bytes.
        let q = Queue::new(10, Overflow::Block).with_bytes(100, weigh);
        assert!(matches!(q.offer(60), Offer::Taken));
        assert!(matches!(q.offer(60), Offer::Full(60)));
        assert!(matches!(q.offer(40), Offer::Taken));
        assert!(matches!(q.try_pop(), Ok(Some(60))));
        assert!(matches!(q.offer(60), Offer::Taken));
        // One item larger than the bound passes an empty queue.
        let q = Queue::new(10, Overflow::DropOldest).with_bytes(100, weigh);
        assert!(matches!(q.offer(500), Offer::Taken));
        for n in [30, 30, 30, 30] {
            assert!(matches!(q.offer(n), Offer::Taken));
        }
        // The 500 and one 30 were dropped to make room for the last 30.
        assert_eq!(q.dropped(), 2);
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn closing_lets_consumers_take_what_is_left_then_says_closed() {
        let q = Queue::new(4, Overflow::Block);
        q.push(7, None).expect("room");
        q.close();
        assert!(matches!(q.offer(8), Offer::Closed(8)));
        assert!(matches!(q.pop(None), Pop::Item(7)));
        assert!(matches!(q.pop(None), Pop::Closed));
        assert!(matches!(q.try_pop(), Err(())));
    }

    #[test]
    fn an_async_consumer_is_woken_by_an_item_and_by_the_close() {
        let q = Queue::new(4, Overflow::Block);
        let (count, waker) = counter();
        let mut cx = Context::from_waker(&waker);
        assert!(q.poll_pop(&mut cx).is_pending());
        q.force(5);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(q.poll_pop(&mut cx), Poll::Ready(Some(5)));
        assert!(q.poll_pop(&mut cx).is_pending());
        q.close();
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        assert_eq!(q.poll_pop(&mut cx), Poll::Ready(None));
    }
}
