//! The crate's one error type.

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in a device runtime or a kernel. The enum has the same
/// shape whatever features are enabled.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Host memory that could not be allocated.
    #[error("{bytes} bytes of host memory could not be allocated")]
    HostMemory {
        /// Bytes asked for.
        bytes: usize,
    },

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

    /// A cast between two dtypes that no kernel implements.
    #[error(
        "casting {from} to {to} is not supported; supported: {}",
        crate::cast::SUPPORTED
    )]
    UnsupportedCast {
        /// The source dtype.
        from: crate::DType,
        /// The target dtype.
        to: crate::DType,
    },

    /// A buffer whose length does not match what the operation needs.
    #[error("{op}: {what} has {actual} bytes but {expected} are needed; allocate it with the size the operation states")]
    SizeMismatch {
        /// The operation (`cast`, `copy`, `download`, …).
        op: &'static str,
        /// Which buffer.
        what: &'static str,
        /// Bytes needed.
        expected: usize,
        /// Bytes present.
        actual: usize,
    },

    /// A buffer that lives on another device than the runtime asked to use it.
    #[error("{op} on {runtime}: the {what} buffer lives on {found}; copy it to {runtime} first (DeviceBuffer::copy_from)")]
    WrongDevice {
        /// The operation.
        op: &'static str,
        /// Which buffer.
        what: &'static str,
        /// The runtime's device.
        runtime: tensorferry_device_map::Device,
        /// The buffer's device.
        found: tensorferry_device_map::Device,
    },

    /// An operation this backend cannot perform on these arguments.
    #[error("{op} on {backend}: {reason}")]
    Unsupported {
        /// The operation.
        op: &'static str,
        /// `cpu`, `cuda` or `wgpu`.
        backend: &'static str,
        /// What is not supported and what to do instead.
        reason: String,
    },

    /// A pinned pool setting that is not a size or is out of range.
    #[error("pinned pool {setting} `{value}` from {origin}: {reason}")]
    BadPinned {
        /// `chunk bytes`, `chunks`, or their product.
        setting: &'static str,
        /// The value as given.
        value: String,
        /// Where it came from (an environment variable, a call).
        origin: String,
        /// What is allowed.
        reason: String,
    },

    /// A pipeline would wait for a pinned chunk that only its own thread can
    /// give back.
    #[error("{pool}: all {chunks} pinned chunks are held by this thread in a pipeline it has not finished, so waiting for one would never end; finish or drop that pipeline before starting another on this thread, or raise TENSORFERRY_PINNED_CHUNKS")]
    PinnedExhausted {
        /// The pool (device and direction).
        pool: String,
        /// Its chunks.
        chunks: usize,
    },

    /// Reading a tensor's bytes from a source, or handing them to a sink, failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The I/O error.
        source: std::io::Error,
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

impl Error {
    /// A [`Error::Backend`] from any error value.
    #[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
    pub(crate) fn backend(
        op: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::Backend {
            op,
            source: source.into(),
        }
    }
}
