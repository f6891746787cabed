//! `tensorferry._native`: the extension module behind the `tensorferry`
//! Python package.
//!
//! The binding stays thin: the engine holds the logic, and this crate
//! converts arguments, waits with the GIL released while checking for
//! signals ([`wait`]), maps errors to the exception hierarchy of
//! `tensorferry._errors` ([`errors`]), and moves tensors in and out without
//! copying their bytes — in through DLPack and the buffer protocol
//! ([`input`]), out as [`tensor::PyTensor`], which exports both ([`dlpack`]).
//! Python objects that messages hold are released on one thread of their
//! own ([`release`]), never on an engine thread. Stores and the proxies
//! they hand out are [`store::PyStore`] and [`proxy::PyProxy`]; values of
//! a caller's serializer travel as one codec object ([`serialized`]).

mod attach;
mod dlpack;
mod errors;
mod exit;
mod input;
mod json;
mod message;
mod node;
mod proxy;
mod release;
mod serialized;
mod service;
mod store;
mod tensor;
mod wait;

/// The module's allocator, for the Rust side only (Python objects keep
/// Python's). A message is often built on one thread and freed on another
/// (the caller's, an I/O thread's, the release thread's); the system
/// allocator then takes its slow path and an arena lock for most of them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::{Mutex, MutexGuard};

use pyo3::prelude::*;
use pyo3::types::PyDict;
use tensorferry_device_map::Inventory;
use tensorferry_engine::delivery;
use tensorferry_kernels::runtime::HostReport;

use crate::errors::Kind;

/// Locks a mutex whose data stays whole if a holder panicked.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What this host has: ``{"cpu": {...}, "cuda": {"devices": [...],
/// "unavailable": reason or None}, "wgpu": {...}, "inventory": ["cuda:0", ...]}``
/// — the devices channel maps resolve against.
#[pyfunction]
fn devices(py: Python<'_>) -> PyResult<Py<PyAny>> {
    let (mut value, inventory) = py.detach(|| {
        let host = HostReport::probe();
        let inventory: Vec<String> = host.inventory().iter().map(|d| d.to_string()).collect();
        (serde_json::to_value(&host), inventory)
    });
    let value = value
        .as_mut()
        .map_err(|e| Kind::Base.err(format!("describing the host: {e}")))?;
    value["inventory"] = inventory.into();
    Ok(json::to_py(py, value)?.unbind())
}

/// Checks a channel configuration file and resolves each channel's device
/// map against this host's devices, or against ``devices`` (e.g.
/// ``"cpu,cuda:0,cuda:1"``, to check a file meant for another machine).
///
/// Returns ``{"valid": bool, "errors": [{"channel", "path", "message"}],
/// "channels": {name: {"resolved": {source: {"target", "reason", ...}}}}}``:
/// every error of the file at once, each with its place.
///
/// Raises:
///     IoError: the file cannot be read.
///     ConfigError: ``devices`` is not a device list.
#[pyfunction]
#[pyo3(signature = (path, devices=None))]
fn check_map(
    py: Python<'_>,
    path: std::path::PathBuf,
    devices: Option<&str>,
) -> PyResult<Py<PyDict>> {
    let inventory = match devices {
        Some(list) => list
            .parse::<Inventory>()
            .map_err(|e| Kind::Config.err(format!("devices: {e}")))?,
        None => py.detach(|| HostReport::probe().inventory()),
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Kind::Io.err(format!("cannot read `{}`: {e}", path.display())))?;
    let report = delivery::check(&text, &inventory).to_json();
    match json::to_py(py, &report)?.cast_into::<PyDict>() {
        Ok(d) => Ok(d.unbind()),
        Err(_) => Err(Kind::Base.err("the check report is not an object")),
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<node::PyNode>()?;
    m.add_class::<node::PyPublisher>()?;
    m.add_class::<node::PySubscription>()?;
    m.add_class::<node::PyRecording>()?;
    m.add_class::<message::PyMessage>()?;
    m.add_class::<tensor::PyTensor>()?;
    m.add_class::<service::PySchema>()?;
    m.add_class::<store::PyStore>()?;
    m.add_class::<proxy::PyProxy>()?;
    m.add_class::<proxy::PyFetch>()?;
    // Before the interpreter finalizes, the release thread stops taking
    // the GIL.
    let atexit = m.py().import("atexit")?;
    atexit.call_method1("register", (wrap_pyfunction!(release::stop, m)?,))?;
    // Registered last, so run first: waits and handlers leave before the
    // release thread stops.
    atexit.call_method1("register", (wrap_pyfunction!(exit::close_gate, m)?,))?;
    m.add_function(wrap_pyfunction!(tensor::tensor, m)?)?;
    m.add_function(wrap_pyfunction!(devices, m)?)?;
    m.add_function(wrap_pyfunction!(check_map, m)?)?;
    m.add_function(wrap_pyfunction!(store::set_proxy_cache_limit, m)?)?;
    m.add_function(wrap_pyfunction!(store::proxy_cache_stats, m)?)?;
    m.add_function(wrap_pyfunction!(store::clear_proxy_cache, m)?)?;
    m.add_function(wrap_pyfunction!(store::set_store_client_node, m)?)?;
    m.add_function(wrap_pyfunction!(store::is_proxy, m)?)?;
    m.add(
        "DEFAULT_STORE_CHANNEL",
        tensorferry_engine::store::DEFAULT_CHANNEL,
    )?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
