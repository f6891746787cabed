//! [`Spin`]: how long a requester spins for its reply before it sleeps (and
//! a responder for the next request).
//!
//! Sleeping costs a wake-up per round trip, which on a virtual machine can
//! double a loopback round trip; spinning costs a core while it lasts. A
//! node built with `busy_poll` spins that long, always. Without it, the
//! spin adapts: twice the recent reply wait (a running average), at most
//! [`CAP`], and none once replies take longer than that, so a slow service
//! costs its requesters no spinning. One wait in [`PROBE_EVERY`] spins
//! anyway, so that replies that got fast again are noticed (a wait that
//! slept includes the wake-up and can stay above the cap on its own).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The longest adaptive spin.
pub(crate) const CAP: Duration = Duration::from_micros(50);
/// The shortest adaptive spin, when replies come at once.
const FLOOR: Duration = Duration::from_micros(2);
/// While replies are slower than the cap, one wait in this many spins.
pub(crate) const PROBE_EVERY: u64 = 64;

/// A spin policy: a node's for requesters waiting on replies, or one for
/// responders waiting for the next request.
#[derive(Debug)]
pub(crate) struct Spin {
    fixed: Option<Duration>,
    /// The longest adaptive spin.
    cap: Duration,
    /// Running average of recent waits, in nanoseconds (0: none yet).
    recent_ns: AtomicU64,
    waits: AtomicU64,
}

impl Spin {
    /// Spins `d` before every sleep (zero: never spins).
    pub(crate) fn fixed(d: Duration) -> Self {
        Self {
            fixed: Some(d),
            cap: d,
            recent_ns: AtomicU64::new(0),
            waits: AtomicU64::new(0),
        }
    }

    /// Spins as long as recent replies suggest.
    pub(crate) fn adaptive() -> Self {
        Self::adaptive_up_to(CAP)
    }

    /// Spins as long as recent waits suggest, at most `cap`.
    pub(crate) fn adaptive_up_to(cap: Duration) -> Self {
        Self {
            fixed: None,
            cap,
            recent_ns: AtomicU64::new(0),
            waits: AtomicU64::new(0),
        }
    }

    /// A new policy of the same kind, with nothing learnt yet, adapting
    /// up to `cap` (a fixed one stays as it is).
    pub(crate) fn like_up_to(&self, cap: Duration) -> Self {
        match self.fixed {
            Some(d) => Self::fixed(d),
            None => Self::adaptive_up_to(cap),
        }
    }

    /// How long the next wait spins before it sleeps.
    pub(crate) fn budget(&self) -> Duration {
        if let Some(d) = self.fixed {
            return d;
        }
        let recent = self.recent_ns.load(Ordering::Relaxed);
        let cap = self.cap.as_nanos() as u64;
        if recent == 0 {
            return self.cap;
        }
        if recent <= cap {
            return Duration::from_nanos(recent.saturating_mul(2)).clamp(FLOOR, self.cap);
        }
        if self.waits.fetch_add(1, Ordering::Relaxed) % PROBE_EVERY == 0 {
            self.cap
        } else {
            Duration::ZERO
        }
    }

    /// A wait ended after `waited` (until its reply, or until it gave up).
    pub(crate) fn observe(&self, waited: Duration) {
        if self.fixed.is_some() {
            return;
        }
        let w = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX).max(1);
        let old = self.recent_ns.load(Ordering::Relaxed);
        // An average over about the last eight waits; two requesters
        // updating at once lose one update, which an average can afford.
        let new = if old == 0 { w } else { old - old / 8 + w / 8 };
        self.recent_ns.store(new.max(1), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spin_made_like_another_keeps_its_kind_with_its_own_cap() {
        let fixed = Spin::fixed(Duration::from_micros(7)).like_up_to(Duration::from_millis(1));
        assert_eq!(fixed.budget(), Duration::from_micros(7));
        let longer = Spin::adaptive().like_up_to(Duration::from_micros(200));
        assert_eq!(
            longer.budget(),
            Duration::from_micros(200),
            "nothing known yet"
        );
        longer.observe(Duration::from_micros(80));
        assert_eq!(
            longer.budget(),
            Duration::from_micros(160),
            "twice the recent gap"
        );
        for _ in 0..50 {
            longer.observe(Duration::from_micros(300));
        }
        assert_eq!(longer.budget(), Duration::from_micros(200), "a probe first");
        assert_eq!(
            longer.budget(),
            Duration::ZERO,
            "then none while gaps are longer"
        );
    }

    #[test]
    fn a_fixed_spin_never_changes() {
        let s = Spin::fixed(Duration::from_micros(200));
        s.observe(Duration::from_secs(1));
        assert_eq!(s.budget(), Duration::from_micros(200));
        assert_eq!(Spin::fixed(Duration::ZERO).budget(), Duration::ZERO);
    }

    #[test]
    fn the_adaptive_spin_follows_fast_replies_and_stops_for_slow_ones() {
        let s = Spin::adaptive();
        assert_eq!(s.budget(), CAP, "nothing known yet: spin at most the cap");
        for _ in 0..20 {
            s.observe(Duration::from_micros(10));
        }
        assert_eq!(
            s.budget(),
            Duration::from_micros(20),
            "twice the recent wait"
        );
        // A slow service: the average passes the cap and spinning stops,
        // but for one probe in PROBE_EVERY waits.
        for _ in 0..40 {
            s.observe(Duration::from_millis(2));
        }
        let spun = (0..PROBE_EVERY * 4)
            .filter(|_| !s.budget().is_zero())
            .count() as u64;
        assert_eq!(spun, 4);
        // Fast again: the probes' short waits bring the spin back.
        for _ in 0..120 {
            s.observe(Duration::from_micros(5));
        }
        let b = s.budget().as_nanos();
        assert!((9_900..=10_100).contains(&b), "{b} ns, not about 10 µs");
        for _ in 0..60 {
            s.observe(Duration::from_nanos(100));
        }
        assert_eq!(s.budget(), FLOOR);
    }
}
