//! One thread that runs, with the interpreter attached, what an engine
//! thread must not: releasing a Python object whose bytes a message held,
//! and waking an asyncio loop.
//!
//! The engine drops a message's buffers on whichever thread lets go of them
//! last — an I/O thread once the bytes are written, a worker, a consumer's
//! DLPack deleter — and such a thread may hold an engine lock. Attaching to
//! the interpreter there would wait for the GIL while holding that lock, and
//! a Python thread that holds the GIL and wants the lock would never get
//! it. So those threads hand the work to this one, which holds no engine
//! lock while it waits for the GIL.

use std::cell::Cell;
use std::sync::{Mutex, OnceLock};
use std::thread;

use crossbeam_channel::{unbounded, Sender};
use pyo3::prelude::*;

/// Work that needs the interpreter.
type Job = Box<dyn FnOnce(Python<'_>) + Send>;

static JOBS: OnceLock<Sender<Job>> = OnceLock::new();

/// Held by the release thread while it runs jobs; `true` once the
/// interpreter is about to finalize ([`stop`]): no job runs after that.
static RUNNING: Mutex<bool> = Mutex::new(false);

fn jobs() -> &'static Sender<Job> {
    JOBS.get_or_init(|| {
        let (tx, rx) = unbounded::<Job>();
        let started = thread::Builder::new()
            .name("tensorferry-py".into())
            .spawn(move || {
                crate::attach::keep_thread_state();
                for job in &rx {
                    let stopping = RUNNING.lock().unwrap_or_else(|p| p.into_inner());
                    if *stopping {
                        // The interpreter is finalizing: a thread that
                        // attaches now may be ended inside the call, through
                        // this thread's frames. What the job holds is leaked.
                        std::mem::forget(job);
                        continue;
                    }
                    let mut pending = Some(job);
                    let ran = Python::try_attach(|py| {
                        if let Some(job) = pending.take() {
                            job(py);
                        }
                        // Whatever queued meanwhile, while attached.
                        while let Ok(job) = rx.try_recv() {
                            job(py);
                        }
                    });
                    if ran.is_none() {
                        // The interpreter is shutting down: nothing can be
                        // released any more, and the process is ending. What
                        // the job holds is leaked, never dropped detached.
                        std::mem::forget(pending);
                    }
                    drop(stopping);
                }
            });
        if let Err(e) = started {
            // Without the thread, jobs queue up and what they hold stays
            // alive: a leak, never a crash.
            eprintln!("tensorferry: cannot start its release thread: {e}");
        }
        tx
    })
}

/// Runs `job` on the release thread, with the interpreter attached.
pub fn later(job: impl FnOnce(Python<'_>) + Send + 'static) {
    // Sending fails only when the receiver is gone, which it never is.
    let _ = jobs().send(Box::new(job));
}

thread_local! {
    /// Set while [`drop_here`] runs on this thread, which holds the GIL.
    static HOLDING: Cell<bool> = const { Cell::new(false) };
}

/// Drops `value` on the release thread, with the interpreter attached; or
/// at once, when this thread is inside [`drop_here`] (it holds the GIL).
pub fn drop_attached<T: Send + 'static>(value: T) {
    if HOLDING.get() {
        drop(value);
    } else {
        later(move |_py| drop(value));
    }
}

/// Drops `value` on this thread, which holds the GIL (`py` says so): the
/// Python objects whose last holder it is are let go here, not handed to
/// the release thread. A call that hands a message to the engine keeps a
/// copy and drops it this way once the engine is done with the original,
/// sparing the release thread a turn with the GIL (a wake-up and a GIL
/// hand-off per call).
pub fn drop_here<T>(_py: Python<'_>, value: T) {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            HOLDING.set(self.0);
        }
    }
    let _reset = Reset(HOLDING.replace(true));
    drop(value);
}

/// Stops the release thread before the interpreter finalizes (registered
/// with `atexit`): waits, without the GIL, for the job it runs to end, then
/// lets it run no more. A thread that takes the GIL during finalization is
/// ended by the interpreter where it stands, which through this crate's
/// frames would abort the process.
#[pyfunction]
pub fn stop(py: Python<'_>) {
    py.detach(|| {
        *RUNNING.lock().unwrap_or_else(|p| p.into_inner()) = true;
    });
}
