//! [`Signal`]: "something changed, look again", for a waiter that blocks and
//! a waiter that awaits alike (a publisher waiting for subscribers).
//!
//! A waiter reads the [`generation`](Signal::generation), looks at its
//! condition, and waits for a generation after the one it read; a change
//! made between the look and the wait is never missed.

use std::sync::{Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

#[derive(Default)]
struct State {
    generation: u64,
    wakers: Vec<Waker>,
}

/// A change notification; see the [module docs](self).
#[derive(Default)]
pub(crate) struct Signal {
    state: Mutex<State>,
    changed: Condvar,
}

impl Signal {
    /// The current generation.
    pub(crate) fn generation(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .generation
    }

    /// Tells every waiter that something changed.
    pub(crate) fn notify(&self) {
        let wakers = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            s.generation += 1;
            std::mem::take(&mut s.wakers)
        };
        self.changed.notify_all();
        for w in wakers {
            w.wake();
        }
    }

    /// Waits until the generation is past `seen`, or `deadline` passes
    /// (`false`).
    pub(crate) fn wait(&self, seen: u64, deadline: Instant) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while s.generation == seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// The async form of [`wait`](Self::wait), without a deadline.
    pub(crate) fn poll_changed(&self, seen: u64, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.generation != seen {
            return Poll::Ready(());
        }
        if !s.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            s.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_change_after_the_look_ends_the_wait() {
        let signal = Arc::new(Signal::default());
        let seen = signal.generation();
        let notifier = std::thread::spawn({
            let signal = Arc::clone(&signal);
            move || {
                std::thread::sleep(Duration::from_millis(10));
                signal.notify();
            }
        });
        assert!(signal.wait(seen, Instant::now() + Duration::from_secs(10)));
        notifier.join().expect("notifier");
        assert!(!signal.wait(
            signal.generation(),
            Instant::now() + Duration::from_millis(5)
        ));
    }
}
