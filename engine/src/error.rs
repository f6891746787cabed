//! The crate's one error type.

use std::path::PathBuf;

use tensorferry_device_map::Device;
use tensorferry_kernels::DType;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong building, encoding, decoding, storing or moving messages.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A frame that is malformed: truncated, lying about lengths, or inconsistent.
    #[error("bad frame at byte {offset}: {what}")]
    Frame {
        /// Byte offset from the start of the frame (or of the file, for files).
        offset: u64,
        /// What is wrong.
        what: String,
    },

    /// A frame that is shorter than it says.
    #[error("truncated frame: needs {needed} bytes from byte {offset}, but only {available} are present")]
    Truncated {
        /// Where the frame starts.
        offset: u64,
        /// Bytes the frame needs.
        needed: u64,
        /// Bytes present.
        available: u64,
    },

    /// A frame written in a format version this build does not read.
    #[error("frame format version {found}; this build reads version {supported} (upgrade the reader or the writer so they match)")]
    UnknownVersion {
        /// The frame's version.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },

    /// A frame that exceeds a configured limit.
    #[error(
        "{what} is {value}, over the limit of {limit} (raise it in `Limits` if this is expected)"
    )]
    Limit {
        /// Which limit.
        what: &'static str,
        /// The frame's value.
        value: u64,
        /// The limit.
        limit: u64,
    },

    /// A header that is not the JSON this format expects.
    #[error("bad frame header: {what}")]
    Header {
        /// What is wrong, with the JSON position where there is one.
        what: String,
    },

    /// A tensor descriptor that is inconsistent.
    #[error("tensor `{name}`: {what}")]
    Tensor {
        /// The tensor's name.
        name: String,
        /// What is wrong.
        what: String,
    },

    /// A typed view asked for the wrong element type.
    #[error("tensor has dtype {actual}, not {requested}")]
    DTypeMismatch {
        /// The tensor's dtype.
        actual: DType,
        /// The dtype asked for.
        requested: DType,
    },

    /// Host bytes asked of a tensor that lives on a device.
    #[error("the tensor is on {device}; copy it to the host first (Tensor::to_host)")]
    NotOnHost {
        /// Where it lives.
        device: Device,
    },

    /// A byte view that is not aligned for its element type.
    #[error("tensor bytes at address offset {misalignment} are not aligned for {dtype}")]
    Misaligned {
        /// The dtype.
        dtype: DType,
        /// Address modulo the element size.
        misalignment: usize,
    },

    /// Two tensors or objects with one name in a message.
    #[error("`{name}` appears twice in the message; names must be unique")]
    DuplicateName {
        /// The name.
        name: String,
    },

    /// An object whose tag no registered codec handles.
    #[error("no codec is registered for tag `{tag}` (object `{name}`); register one with `CodecRegistry::register`")]
    UnknownCodec {
        /// The object's tag.
        tag: String,
        /// The object's name.
        name: String,
    },

    /// A codec that failed, or a registry misuse.
    #[error("codec `{tag}`: {what}")]
    Codec {
        /// The codec's tag.
        tag: String,
        /// What went wrong.
        what: String,
    },

    /// A value a caller supplied that is not valid (a name, an address, an option).
    #[error("{0}")]
    Invalid(String),

    /// Nothing arrived in time.
    #[error("timed out after {ms} ms {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        ms: u64,
    },

    /// The connection a subscription or request depended on was lost.
    #[error("connection to {peer} lost: {reason}")]
    PeerLost {
        /// The peer's address.
        peer: String,
        /// Why.
        reason: String,
    },

    /// A peer broke the protocol (sent a frame that cannot be read, lied
    /// about its lengths, named memory it never shared): its connection was
    /// closed.
    #[error("closed the connection to {peer}: {offence}")]
    Misbehaved {
        /// The peer's address.
        peer: String,
        /// What it did.
        offence: String,
    },

    /// A TLS connection could not be opened: a certificate that does not
    /// verify, a peer without TLS, a listener that refused this node's
    /// certificate. The message says what to change.
    #[error("TLS with {peer}: {what}")]
    Tls {
        /// The peer's address.
        peer: String,
        /// What failed, and what to change.
        what: String,
    },

    /// A message that arrived whole but could not be delivered: a tensor
    /// whose checksum does not match the bytes received, whose target
    /// device is missing, or whose copy or cast failed. The message is
    /// dropped; the subscription goes on.
    #[error("message {seq} on `{channel}` from {from} was not delivered: {source}")]
    Undelivered {
        /// The channel it was published on.
        channel: String,
        /// The publisher's sequence number.
        seq: u64,
        /// Who sent it.
        from: String,
        /// What was wrong, naming the tensor.
        source: Box<Error>,
    },

    /// A service answered with an error.
    #[error("service `{channel}` replied with error `{code}`: {message}")]
    Remote {
        /// The service channel.
        channel: String,
        /// The error code.
        code: String,
        /// The service's message.
        message: String,
    },

    /// The node was shut down.
    #[error("the node is shut down")]
    Closed,

    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done (and to which file).
        context: String,
        /// The error.
        source: std::io::Error,
    },

    /// A store holds nothing under the key: it was never put, or was evicted.
    #[error("store {store} holds nothing under key `{key}`: it was never put there, or was evicted (list the keys with `tensorferry store ls --store {store}`)")]
    NotStored {
        /// Where the store is.
        store: String,
        /// The key.
        key: String,
    },

    /// A put found the key taken; stores are write-once.
    #[error("store {store} already holds key `{key}`; a key is written once: evict it first, or put with overwrite")]
    AlreadyStored {
        /// Where the store is.
        store: String,
        /// The key.
        key: String,
    },

    /// What a store holds under a key is not what the proxy describes.
    #[error("proxy `{key}` no longer matches its store: {what}")]
    ProxyMismatch {
        /// The key.
        key: String,
        /// What differs.
        what: String,
    },

    /// A served store could not be reached (or refused this peer).
    #[error("store {store} cannot be reached: {source}")]
    StoreUnreachable {
        /// Where the store is.
        store: String,
        /// Why.
        source: Box<Error>,
    },

    /// An error from the kernels crate (layouts, dtypes, runtimes).
    #[error(transparent)]
    Kernels(#[from] tensorferry_kernels::Error),

    /// An error from the device-map crate.
    #[error(transparent)]
    DeviceMap(#[from] tensorferry_device_map::Error),
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn io_path(what: &str, path: &std::path::Path, source: std::io::Error) -> Self {
        Error::io(
            format!("{what} `{}`", PathBuf::from(path).display()),
            source,
        )
    }

    pub(crate) fn tensor(name: &str, what: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.to_string(),
            what: what.into(),
        }
    }
}
