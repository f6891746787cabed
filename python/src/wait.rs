//! Waiting on the engine from Python: blocking calls that release the GIL
//! and still answer Ctrl-C, and asyncio awaitables that need no thread.
//!
//! Both drive the engine's futures (every waiting call of the engine has
//! one). A blocking call polls its future with the GIL released, parking
//! the thread between wake-ups, and comes back to the interpreter every
//! [`SIGNAL_CHECK`] to run signal handlers: a `KeyboardInterrupt` drops the
//! future, which gives the wait up (nothing is sent, nothing is taken off a
//! queue). An awaitable polls its future on the event loop's thread; the
//! engine's wake-up reaches the loop through `call_soon_threadsafe`, issued
//! by the release thread (an engine thread never takes the GIL).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::release;

/// How often a blocking call returns to the interpreter to run signal handlers.
pub const SIGNAL_CHECK: Duration = Duration::from_millis(50);

/// Wakes a parked thread.
struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// A timeout in seconds (`None`: no limit) as a deadline.
///
/// # Errors
///
/// `ValueError` for a negative or NaN timeout.
pub fn deadline(timeout: Option<f64>) -> PyResult<Option<Instant>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_nan() || t < 0.0 => Err(PyValueError::new_err(format!(
            "timeout must be a number of seconds, 0 or more (or None for no limit), not {t}"
        ))),
        Some(t) if t.is_infinite() || t > 1e9 => Ok(None),
        Some(t) => Ok(Some(Instant::now() + Duration::from_secs_f64(t))),
    }
}

enum Step<T> {
    Ready(T),
    TimedOut,
    Check,
}

/// Runs `fut` to completion with the GIL released, checking for signals
/// every [`SIGNAL_CHECK`]; `None` when `deadline` passes first.
///
/// # Errors
///
/// What a signal handler raises (`KeyboardInterrupt` for Ctrl-C); the
/// future is dropped, giving the wait up.
pub fn block_on<F>(py: Python<'_>, fut: F, deadline: Option<Instant>) -> PyResult<Option<F::Output>>
where
    F: Future + Send,
    F::Output: Send,
{
    let mut fut = Box::pin(fut);
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    loop {
        let inside = crate::exit::enter()?;
        let step = py.detach(|| {
            let mut cx = Context::from_waker(&waker);
            let check_at = Instant::now() + SIGNAL_CHECK;
            loop {
                if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                    return Step::Ready(v);
                }
                let now = Instant::now();
                if deadline.is_some_and(|d| now >= d) {
                    return Step::TimedOut;
                }
                if now >= check_at {
                    return Step::Check;
                }
                let until = deadline.map_or(check_at, |d| d.min(check_at));
                thread::park_timeout(until - now);
            }
        });
        drop(inside);
        match step {
            Step::Ready(v) => return Ok(Some(v)),
            Step::TimedOut => return Ok(None),
            Step::Check => py.check_signals()?,
        }
    }
}

/// The result of a call made on a thread of its own, as a future.
struct Oneshot<T> {
    /// The result, the waker of whoever polls, and whether the thread ended.
    state: Mutex<(Option<T>, Option<Waker>, bool)>,
    /// Nobody waits for the result any more.
    abandoned: AtomicBool,
}

/// The future of [`on_thread`]: `None` when the call panicked.
pub struct OnThread<T>(Arc<Oneshot<T>>);

impl<T> Drop for OnThread<T> {
    fn drop(&mut self) {
        self.0.abandoned.store(true, Ordering::Release);
    }
}

/// Tells a call made by [`on_thread`] whether its caller gave up waiting.
pub struct Abandoned<'a>(&'a AtomicBool);

impl Abandoned<'_> {
    /// True once nobody waits for the result.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

impl<T> Future for OnThread<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = crate::lock(&self.0.state);
        if let Some(v) = state.0.take() {
            return Poll::Ready(Some(v));
        }
        if state.2 {
            return Poll::Ready(None);
        }
        state.1 = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Runs `f` on a thread of its own: for engine calls that wait without a
/// future to poll (connecting, which retries up to the connect timeout;
/// flushing). Dropping the future abandons the call: `f` can see it through
/// its [`Abandoned`] and stop early; otherwise it finishes on its thread and
/// its result is dropped there.
///
/// # Errors
///
/// An `OSError` when no thread can be started.
pub fn on_thread<T, F>(f: F) -> PyResult<OnThread<T>>
where
    T: Send + 'static,
    F: FnOnce(Abandoned<'_>) -> T + Send + 'static,
{
    let shared = Arc::new(Oneshot {
        state: Mutex::new((None, None, false)),
        abandoned: AtomicBool::new(false),
    });
    let done = Arc::clone(&shared);
    thread::Builder::new()
        .name("tensorferry-call".into())
        .spawn(move || {
            /// Marks the call ended even if `f` panics.
            struct Ended<T>(Arc<Oneshot<T>>, Option<T>);
            impl<T> Drop for Ended<T> {
                fn drop(&mut self) {
                    let waker = {
                        let mut state = crate::lock(&self.0.state);
                        state.0 = self.1.take();
                        state.2 = true;
                        state.1.take()
                    };
                    if let Some(w) = waker {
                        w.wake();
                    }
                }
            }
            let mut ended = Ended(done, None);
            let value = f(Abandoned(&ended.0.abandoned));
            ended.1 = Some(value);
        })
        .map_err(|e| pyo3::exceptions::PyOSError::new_err(format!("starting a thread: {e}")))?;
    Ok(OnThread(shared))
}

/// Runs `f` on a thread of its own and waits for it with the GIL released,
/// answering Ctrl-C (see [`on_thread`] and [`block_on`]).
///
/// # Errors
///
/// What a signal handler raises; a `RuntimeError` when the call panicked.
pub fn run_blocking<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    block_on(py, on_thread(move |_| f())?, None)?
        .flatten()
        .ok_or_else(panicked)
}

/// The error of a call whose thread panicked.
pub fn panicked() -> PyErr {
    pyo3::exceptions::PyRuntimeError::new_err(
        "the call's thread ended without a result (it panicked)",
    )
}

/// What an awaitable's future yields: turned into a Python value on the loop's thread.
pub type Done = Box<dyn FnOnce(Python<'_>) -> PyResult<Py<PyAny>> + Send>;

/// An engine future behind an awaitable.
pub type Op = Pin<Box<dyn Future<Output = Done> + Send>>;

/// One awaitable in flight: its future, and the asyncio future it completes.
struct Task {
    op: Mutex<Option<Op>>,
    event_loop: Py<PyAny>,
    future: Py<PyAny>,
    /// A poll is already scheduled on the loop.
    scheduled: AtomicBool,
}

/// The waker of a task: schedules a poll on the task's loop.
struct TaskWaker(Weak<Task>);

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let Some(task) = self.0.upgrade() else {
            return;
        };
        if task.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        // Called on engine threads, possibly under engine locks: the GIL is
        // taken by the release thread, never here.
        release::later(move |py| {
            let event_loop = task.event_loop.clone_ref(py);
            let callback = PollTask {
                task: Arc::clone(&task),
            };
            // A closed loop has nothing left to wake.
            let _ = event_loop.call_method1(py, "call_soon_threadsafe", (callback,));
        });
    }
}

impl Task {
    /// Polls the future once, on the loop's thread, completing the asyncio
    /// future when it is ready. A cancelled asyncio future drops it.
    fn poll(self: &Arc<Self>, py: Python<'_>) {
        self.scheduled.store(false, Ordering::Release);
        let mut op = crate::lock(&self.op);
        let done = self
            .future
            .call_method0(py, "done")
            .and_then(|d| d.extract::<bool>(py))
            .unwrap_or(true);
        if done {
            *op = None;
            return;
        }
        let Some(fut) = op.as_mut() else {
            return;
        };
        let waker = Waker::from(Arc::new(TaskWaker(Arc::downgrade(self))));
        let polled = py.detach(|| fut.as_mut().poll(&mut Context::from_waker(&waker)));
        let Poll::Ready(finish) = polled else {
            return;
        };
        *op = None;
        drop(op);
        let outcome = match finish(py) {
            Ok(value) => self.future.call_method1(py, "set_result", (value,)),
            Err(e) => self
                .future
                .call_method1(py, "set_exception", (e.value(py).clone(),)),
        };
        if let Err(e) = outcome {
            // The future was completed meanwhile (cancelled): nothing to tell.
            drop(e);
        }
    }
}

/// A scheduled poll of a task (a callable handed to the loop).
#[pyclass(module = "tensorferry", frozen)]
struct PollTask {
    task: Arc<Task>,
}

#[pymethods]
impl PollTask {
    fn __call__(&self, py: Python<'_>) {
        self.task.poll(py);
    }
}

/// Keeps a task alive while its asyncio future is pending (the future
/// holds its done-callbacks until it completes), and drops the task's
/// engine future when it completes — at once when it was cancelled.
#[pyclass(module = "tensorferry", frozen)]
struct CancelTask {
    task: Arc<Task>,
}

#[pymethods]
impl CancelTask {
    fn __call__(&self, _future: Bound<'_, PyAny>) {
        let op = crate::lock(&self.task.op).take();
        drop(op);
    }
}

/// An asyncio future, on the running loop, completed by `op`.
///
/// # Errors
///
/// `RuntimeError` when no event loop is running in this thread.
pub fn awaitable(py: Python<'_>, op: Op) -> PyResult<Bound<'_, PyAny>> {
    let asyncio = py.import("asyncio")?;
    let event_loop = asyncio.call_method0("get_running_loop")?;
    let future = event_loop.call_method0("create_future")?;
    let task = Arc::new(Task {
        op: Mutex::new(Some(op)),
        event_loop: event_loop.unbind(),
        future: future.clone().unbind(),
        scheduled: AtomicBool::new(false),
    });
    future.call_method1(
        "add_done_callback",
        (CancelTask {
            task: Arc::clone(&task),
        },),
    )?;
    task.poll(py);
    Ok(future)
}
