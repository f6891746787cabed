//! The tensorferry engine: tensors, messages, the wire format, transports and
//! channels. It builds on `tensorferry-kernels` (device runtimes and kernels)
//! and `tensorferry-device-map` (where each tensor lands).
//!
//! The message model and the wire format are the next layer to land here; see
//! `docs/ARCHITECTURE.md` for what exists today.
