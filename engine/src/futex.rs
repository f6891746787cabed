//! Futex waits and wake-ups on words that may live in memory shared between
//! processes: the one place this workspace makes the system call.
//!
//! A waiter passes the value it last saw; the kernel puts it to sleep only if
//! the word still holds that value, so a wake-up that comes between the look
//! and the sleep is never lost. Bitsets let several kinds of waiter share a
//! word and be woken apart.
//!
//! # Examples
//!
//! ```
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use std::time::Duration;
//! use tensorferry_engine::futex;
//!
//! let word = AtomicU32::new(0);
//! // Nobody changes the word: the wait ends when its time is up.
//! futex::wait(&word, 0, futex::ALL, Some(Duration::from_millis(1)));
//! word.fetch_add(1, Ordering::SeqCst);
//! futex::wake(&word, futex::ALL); // wakes nobody, costs one system call
//! ```

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// The bitset that matches every waiter.
pub const ALL: u32 = u32::MAX;

/// Sleeps while `word` holds `seen`, until woken with a bitset that shares a
/// bit with `bits`, or until `timeout` passes (`None`: no limit).
///
/// Returns on a wake-up, a timeout, a signal or a word that changed: the
/// caller looks at its condition again in every case.
pub fn wait(word: &AtomicU32, seen: u32, bits: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|t| {
        // FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC time.
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec it is given.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        let total = now.tv_nsec as u64 + u64::from(t.subsec_nanos());
        libc::timespec {
            tv_sec: now.tv_sec
                + t.as_secs().min(1 << 31) as libc::time_t
                + (total / 1_000_000_000) as libc::time_t,
            tv_nsec: (total % 1_000_000_000) as libc::c_long,
        }
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: a futex wait on a live, 4-aligned word (an AtomicU32); the
    // kernel returns at once when the word no longer holds `seen`.
    // Interruptions and timeouts come back as errors the callers do not
    // need: they look again.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT_BITSET,
            seen,
            ts_ptr,
            std::ptr::null::<u32>(),
            bits,
        );
    }
}

/// Wakes every waiter on `word` whose bitset shares a bit with `bits`.
pub fn wake(word: &AtomicU32, bits: u32) {
    // SAFETY: a futex wake on a live, 4-aligned word; it touches no memory.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE_BITSET,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            bits,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_wake_with_a_matching_bit_ends_the_wait() {
        let word = Arc::new(AtomicU32::new(0));
        let waiter = std::thread::spawn({
            let word = Arc::clone(&word);
            move || {
                let start = Instant::now();
                while word.load(Ordering::SeqCst) == 0 {
                    wait(&word, 0, 2, Some(Duration::from_secs(10)));
                }
                start.elapsed()
            }
        });
        std::thread::sleep(Duration::from_millis(20));
        word.store(1, Ordering::SeqCst);
        wake(&word, 2);
        let took = waiter.join().expect("waiter");
        assert!(took < Duration::from_secs(5), "woken late: {took:?}");
    }

    #[test]
    fn a_wait_on_a_changed_word_returns_at_once() {
        let word = AtomicU32::new(5);
        let start = Instant::now();
        wait(&word, 4, ALL, Some(Duration::from_secs(10)));
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
