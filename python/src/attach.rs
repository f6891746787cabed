//! Engine threads that run Python code again and again (service workers,
//! the release thread) keep one interpreter thread state for their life.
//!
//! An engine thread has no thread state of its own, so each `Python::attach`
//! on it creates one and the matching release deletes it: every handler
//! call paid for a new state and its frame stack (a fresh memory mapping,
//! page faults, and unmapping it after). A kept state makes attaching a
//! plain GIL hand-over. The state goes when its thread ends, unless the
//! interpreter is finalizing by then (it deletes every state itself).

use std::cell::RefCell;

use pyo3::ffi;

/// This thread's kept state and how it was made (to undo it).
struct Kept {
    made: ffi::PyGILState_STATE,
    state: *mut ffi::PyThreadState,
}

impl Drop for Kept {
    fn drop(&mut self) {
        // The thread is ending. Once the interpreter is about to finalize
        // the state is left to it: taking the GIL then could end this thread
        // in the middle of its exit.
        let Some(_inside) = crate::exit::try_enter() else {
            return;
        };
        // SAFETY: `state` is this thread's own state, detached by `keep`;
        // restoring it takes the GIL, and releasing the `PyGILState_Ensure`
        // that made it (the only count left) deletes it and lets the GIL go.
        unsafe {
            ffi::PyEval_RestoreThread(self.state);
            ffi::PyGILState_Release(self.made);
        }
    }
}

thread_local! {
    static KEPT: RefCell<Option<Kept>> = const { RefCell::new(None) };
}

/// Gives the calling thread a thread state that lasts until it ends, unless
/// it has one already (a Python thread, or one kept before). Call it
/// without the GIL, before the thread's first `Python::attach`.
pub fn keep_thread_state() {
    KEPT.with(|kept| {
        let mut kept = kept.borrow_mut();
        if kept.is_some() {
            return;
        }
        let Some(_inside) = crate::exit::try_enter() else {
            return;
        };
        // SAFETY: the interpreter is initialized (this module is imported)
        // and not finalizing (the gate is open). A thread with no state of
        // its own holds no GIL, so `PyGILState_Ensure` makes its state and
        // takes the GIL, and `PyEval_SaveThread` lets the GIL go while the
        // state stays this thread's, counted once.
        unsafe {
            if !ffi::PyGILState_GetThisThreadState().is_null() {
                return;
            }
            let made = ffi::PyGILState_Ensure();
            let state = ffi::PyEval_SaveThread();
            *kept = Some(Kept { made, state });
        }
    });
}
