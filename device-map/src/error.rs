//! The crate's one error type.

use std::fmt;
use std::path::PathBuf;

use crate::device::{Device, ACCEPTED_FORMS};

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can be wrong with a device name, a device map or a channel
/// configuration. Each message names the bad value and says how to fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A device name that is not one of the accepted spellings.
    #[error("`{text}` is not a device: {reason}; write one of: {ACCEPTED_FORMS}")]
    InvalidDevice {
        /// The text as written.
        text: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Two entries of one map name the same source device with different targets.
    #[error("`{first}` and `{second}` name the same device ({device}) but map it to {a} and {b}; keep one entry")]
    ConflictingTargets {
        /// The earlier entry's key as written.
        first: String,
        /// The later entry's key as written.
        second: String,
        /// The canonical source device both keys name.
        device: Device,
        /// The earlier entry's target.
        a: Device,
        /// The later entry's target.
        b: Device,
    },

    /// Two `default` entries with different targets.
    #[error("`{first}` and `{second}` both set the default target, to {a} and {b}; keep one")]
    ConflictingDefaults {
        /// The earlier key as written.
        first: String,
        /// The later key as written.
        second: String,
        /// The earlier target.
        a: Device,
        /// The later target.
        b: Device,
    },

    /// Two sources share a target where replies need the reverse map.
    #[error("`{first}` and `{second}` both map to {target}, so a reply on {target} could not tell which device to go back to; give each source its own target, or make the channel `pubsub`")]
    ManyToOne {
        /// The earlier entry's key as written.
        first: String,
        /// The later entry's key as written.
        second: String,
        /// The shared target.
        target: Device,
    },

    /// A `default` target where replies need the reverse map.
    #[error("a `default` target sends every unlisted device to {target}, so replies could not find their way back; list each source explicitly on a `reqrep` channel, or make the channel `pubsub`")]
    DefaultNotReversible {
        /// The default target.
        target: Device,
    },

    /// A target (or kept device) that the receiving host lacks, under the `error` fallback.
    #[error("{wanted} (for source {source_device}) does not exist on this host, which has: {available}; map it to one of those, or set \"fallback\" to \"cpu\" or \"wgpu\"")]
    MissingDevice {
        /// The device the map asked for.
        wanted: Device,
        /// The source device being resolved.
        source_device: Device,
        /// The host's devices, comma-separated.
        available: String,
    },

    /// A key that this place in the file does not know.
    #[error("unknown key `{key}`; expected one of: {expected} (a misspelt key would otherwise do nothing)")]
    UnknownKey {
        /// The key as written.
        key: String,
        /// The keys allowed here.
        expected: &'static str,
    },

    /// A key that is required here but absent.
    #[error("missing key `{key}`")]
    MissingKey {
        /// The key.
        key: &'static str,
    },

    /// The same key twice in one JSON object, where that cannot be merged.
    #[error("`{key}` is given twice; keep one")]
    DuplicateKey {
        /// The key as written.
        key: String,
    },

    /// A JSON value of the wrong type.
    #[error("expected {expected}, found {found}")]
    WrongType {
        /// What belongs here.
        expected: &'static str,
        /// What the file has.
        found: &'static str,
    },

    /// A JSON value of the right type but not one of the allowed values.
    #[error("`{value}` is not allowed here; expected {expected}")]
    InvalidValue {
        /// The value as written.
        value: String,
        /// The allowed values.
        expected: &'static str,
    },

    /// A `wire_dtype` entry naming an unknown dtype or a cast that does not
    /// exist both ways (checked by the engine, which knows the dtypes).
    #[error("{what}")]
    WireDtype {
        /// What is wrong, and what would be accepted.
        what: String,
    },

    /// A node setting that is not valid (a size in an unknown unit, a
    /// secret given twice), said in full.
    #[error("{message}")]
    Setting {
        /// What is wrong, and what would be accepted.
        message: String,
    },

    /// Text that is not JSON.
    #[error("malformed JSON at line {line}, column {column}: {message}")]
    Json {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What the parser expected.
        message: String,
    },

    /// A configuration file that could not be read.
    #[error("cannot read `{}`: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },

    /// A channel that the configuration does not define.
    #[error("no channel named `{name}` in the configuration; it defines: {defined}")]
    UnknownChannel {
        /// The name asked for.
        name: String,
        /// The defined channel names, comma-separated.
        defined: String,
    },

    /// One or more errors, each with its place; every error of a file is reported at once.
    #[error("{}", Located::list(errors))]
    Invalid {
        /// The errors in file order.
        errors: Vec<Located>,
    },
}

impl Error {
    /// The individual errors: those inside [`Error::Invalid`], or this one alone.
    pub fn errors(&self) -> Vec<&Error> {
        match self {
            Error::Invalid { errors } => errors.iter().map(|l| &l.error).collect(),
            other => vec![other],
        }
    }
}

/// An error with its place in a configuration file.
#[derive(Debug)]
pub struct Located {
    /// The channel it belongs to, if any.
    pub channel: Option<String>,
    /// Where in the file, as a path such as `channels["/a"].device_map["gpu:1"]`.
    pub path: String,
    /// What is wrong.
    pub error: Error,
}

impl Located {
    fn list(errors: &[Located]) -> String {
        let mut out = match errors.len() {
            1 => String::new(),
            n => format!("{n} errors:\n"),
        };
        for (i, e) in errors.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            if errors.len() > 1 {
                out.push_str("  ");
            }
            out.push_str(&e.to_string());
        }
        out
    }
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.error)
        } else {
            write!(f, "{}: {}", self.path, self.error)
        }
    }
}
