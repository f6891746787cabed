//! The crate's one error type.

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in a device runtime or a kernel. The enum has the same
/// shape whatever features are enabled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A runtime that this build or this host cannot provide.
    #[error("{runtime} is unavailable: {reason}")]
    Unavailable {
        /// `cuda` or `wgpu`.
        runtime: &'static str,
        /// Why, and how to get it.
        reason: String,
    },

    /// A dtype name that is not known.
    #[error("`{text}` is not a dtype; write one of: {}", crate::DType::ACCEPTED)]
    UnknownDType {
        /// The text as written.
        text: String,
    },

    /// A strided view that does not fit its storage, or whose sizes overflow.
    #[error("invalid tensor layout: {0}")]
    BadLayout(String),

    /// A checksum that is not 16 hex digits.
    #[error("`{text}` is not a checksum (16 hexadecimal digits)")]
    BadChecksumText {
        /// The text as written.
        text: String,
    },

    /// A device index the runtime does not have.
    #[error("{runtime}:{index} does not exist; this host has {count} {runtime} device(s) (see `tensorferry devices`)")]
    NoSuchDevice {
        /// `cuda` or `wgpu`.
        runtime: &'static str,
        /// The index asked for.
        index: u32,
        /// How many there are.
        count: usize,
    },

    /// A failure reported by a backend library (the CUDA driver, NVRTC, wgpu).
    #[error("{op} failed: {source}")]
    Backend {
        /// What was being done.
        op: &'static str,
        /// The backend's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}
