//! Leaving the interpreter cleanly while this module's threads wait or run
//! Python code.
//!
//! Once the interpreter finalizes, a thread that takes the GIL back is
//! ended where it stands (`pthread_exit`); through this crate's frames that
//! aborts the whole process. So every long wait without the GIL, and every
//! Python service handler, passes through the gate here, and `atexit` —
//! which runs before finalization — closes the gate and lets what is inside
//! finish (at most [`EXIT_WAIT`]). A call that finds the gate closed raises
//! `ClosedError` without letting the GIL go.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use crate::errors::Kind;

/// How long exiting waits for waits and handlers inside the gate.
pub const EXIT_WAIT: Duration = Duration::from_secs(3);

static INSIDE: AtomicUsize = AtomicUsize::new(0);
static CLOSED: AtomicBool = AtomicBool::new(false);

/// One thread inside the gate; leaving it (dropping) counts it out.
pub struct Inside(());

impl Drop for Inside {
    fn drop(&mut self) {
        INSIDE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Enters the gate, unless the interpreter is about to finalize.
pub fn try_enter() -> Option<Inside> {
    INSIDE.fetch_add(1, Ordering::SeqCst);
    // Counted first, then looked at the gate: exiting closes the gate,
    // then counts, so one of the two sees the other.
    if CLOSED.load(Ordering::SeqCst) {
        INSIDE.fetch_sub(1, Ordering::SeqCst);
        return None;
    }
    Some(Inside(()))
}

/// Enters the gate before a wait without the GIL.
///
/// # Errors
///
/// `ClosedError` once the interpreter is exiting.
pub fn enter() -> PyResult<Inside> {
    try_enter().ok_or_else(|| {
        Kind::Closed.err("the interpreter is exiting: tensorferry calls no longer wait")
    })
}

/// Closes the gate and waits, without the GIL, for the waits and handlers
/// inside it to leave, at most [`EXIT_WAIT`] (registered with `atexit`).
#[pyfunction]
pub fn close_gate(py: Python<'_>) {
    CLOSED.store(true, Ordering::SeqCst);
    py.detach(|| {
        let deadline = Instant::now() + EXIT_WAIT;
        while INSIDE.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    });
}
