//! [`NodeSection`]: the `"node"` section of a configuration file, so an
//! operator can set a node's listen addresses, limits, authentication,
//! shared-memory size and busy polling without code.
//!
//! ```json
//! {"node": {
//!    "name": "trainer-0",
//!    "listen": ["shm://trainer-0"], "listen_public": ["tcp://0.0.0.0:7070"],
//!    "receive_budget": "8GiB", "pool_idle": "1GiB", "shm_bytes": "4GiB",
//!    "progress_timeout_s": 30, "min_receive_rate": "64KiB",
//!    "limits": {"header_bytes": "16MiB", "tensors": 65536, "buffers": 65536, "frame_bytes": "64GiB"},
//!    "secret_file": "secret.key", "shm_peer_uids": [1001],
//!    "tls": {"cert_file": "node.pem", "key_file": "node.key", "ca_file": "ca.pem"},
//!    "busy_poll_us": 0, "io_threads": 1, "service_threads": 2, "connect_timeout_s": 5},
//!  "channels": {}}
//! ```
//!
//! Every key is optional; what is left out keeps the node's default. Sizes
//! are a whole number of bytes or a string with a unit (`B`, `KiB`, `MiB`,
//! `GiB`, written exactly so). This crate reads and checks the section,
//! each error with its place; the engine applies it to a node.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{field_path, Raw, Walk};
use crate::error::Error;

/// Where a node's shared secret comes from. The secret itself is never
/// written in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A file holding it (`"secret_file"`); a relative path is taken from
    /// the configuration file's folder.
    File(PathBuf),
    /// An environment variable holding it (`"secret_env"`).
    Env(String),
}

/// The decoder limits a node applies to its peers' frames (`"limits"`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LimitSettings {
    /// Most bytes of a frame's JSON header.
    pub header_bytes: Option<u64>,
    /// Most tensors in one message.
    pub tensors: Option<u64>,
    /// Most buffers in one message.
    pub buffers: Option<u64>,
    /// Most bytes of one frame.
    pub frame_bytes: Option<u64>,
}

/// TLS for a node's tcp connections (`"tls"`): PEM files, a relative path
/// taken from the configuration file's folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsSettings {
    /// This node's certificate chain (`"cert_file"`).
    pub cert_file: Option<PathBuf>,
    /// Its private key (`"key_file"`).
    pub key_file: Option<PathBuf>,
    /// The CAs a peer's certificate must chain to (`"ca_file"`).
    pub ca_file: Option<PathBuf>,
    /// The CAs a dialer's certificate must chain to, which makes listeners
    /// require one (`"client_ca_file"`).
    pub client_ca_file: Option<PathBuf>,
    /// The name a listener's certificate must carry (`"server_name"`;
    /// default: the host dialed).
    pub server_name: Option<String>,
}

/// A node's settings from the `"node"` section; `None` (or empty) keeps the
/// node's default. See the [module docs](self) for the keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeSection {
    /// The node's name (`"name"`).
    pub name: Option<String>,
    /// Addresses to listen on, loopback only for tcp (`"listen"`).
    pub listen: Vec<String>,
    /// Addresses to listen on that other hosts may reach (`"listen_public"`).
    pub listen_public: Vec<String>,
    /// I/O threads (`"io_threads"`).
    pub io_threads: Option<u64>,
    /// Service worker threads (`"service_threads"`).
    pub service_threads: Option<u64>,
    /// Bytes of received frames held at once (`"receive_budget"`).
    pub receive_budget: Option<u64>,
    /// Bytes of receive buffers kept for reuse (`"pool_idle"`).
    pub pool_idle: Option<u64>,
    /// Bytes of shared-memory slots for `shm://` subscribers (`"shm_bytes"`).
    pub shm_bytes: Option<u64>,
    /// Busy polling, in microseconds (`"busy_poll_us"`; 0: off).
    pub busy_poll_us: Option<u64>,
    /// How long connecting retries (`"connect_timeout_s"`).
    pub connect_timeout: Option<Duration>,
    /// How long a begun frame may lack progress (`"progress_timeout_s"`; 0: no check).
    pub progress_timeout: Option<Duration>,
    /// Slowest a begun frame may arrive, bytes per second (`"min_receive_rate"`).
    pub min_receive_rate: Option<u64>,
    /// Decoder limits (`"limits"`).
    pub limits: LimitSettings,
    /// The shared secret tcp peers must know (`"secret_file"` or `"secret_env"`).
    pub secret: Option<SecretSource>,
    /// Other users allowed to connect over `shm://` (`"shm_peer_uids"`).
    pub shm_peer_uids: Option<Vec<u32>>,
    /// TLS for tcp connections (`"tls"`).
    pub tls: Option<TlsSettings>,
}

impl NodeSection {
    /// Whether the section sets nothing.
    pub fn is_empty(&self) -> bool {
        *self == NodeSection::default()
    }

    /// Takes a relative `secret_file` from `dir` (the configuration file's
    /// folder), as a reader of the file would.
    pub fn relative_to(&mut self, dir: &Path) {
        let mut files: Vec<&mut PathBuf> = Vec::new();
        if let Some(SecretSource::File(path)) = &mut self.secret {
            files.push(path);
        }
        if let Some(tls) = &mut self.tls {
            files.extend(
                [
                    &mut tls.cert_file,
                    &mut tls.key_file,
                    &mut tls.ca_file,
                    &mut tls.client_ca_file,
                ]
                .into_iter()
                .flatten(),
            );
        }
        for path in files {
            if path.is_relative() {
                *path = dir.join(&*path);
            }
        }
    }
}

const KEYS: &[&str] = &[
    "name",
    "listen",
    "listen_public",
    "io_threads",
    "service_threads",
    "receive_budget",
    "pool_idle",
    "shm_bytes",
    "busy_poll_us",
    "connect_timeout_s",
    "progress_timeout_s",
    "min_receive_rate",
    "limits",
    "secret_file",
    "secret_env",
    "shm_peer_uids",
    "tls",
];
const EXPECTED: &str = "\"name\", \"listen\", \"listen_public\", \"io_threads\", \"service_threads\", \"receive_budget\", \"pool_idle\", \"shm_bytes\", \"busy_poll_us\", \"connect_timeout_s\", \"progress_timeout_s\", \"min_receive_rate\", \"limits\", \"secret_file\", \"secret_env\", \"shm_peer_uids\", \"tls\"";
const TLS_KEYS: &[&str] = &[
    "cert_file",
    "key_file",
    "ca_file",
    "client_ca_file",
    "server_name",
];
const TLS_EXPECTED: &str =
    "\"cert_file\", \"key_file\", \"ca_file\", \"client_ca_file\", \"server_name\"";
const LIMIT_KEYS: &[&str] = &["header_bytes", "tensors", "buffers", "frame_bytes"];
const LIMIT_EXPECTED: &str = "\"header_bytes\", \"tensors\", \"buffers\", \"frame_bytes\"";

/// The longest timeout a file may set: a week (longer ones are mistakes).
const MAX_SECONDS: f64 = 604_800.0;

/// Reads the `"node"` section at `path`, reporting each error with its place.
pub(crate) fn parse(walk: &mut Walk<'_>, raw: Raw, path: &str) -> NodeSection {
    let mut node = NodeSection::default();
    let Some(pairs) = walk.object(raw, path) else {
        return node;
    };
    let mut seen = Vec::new();
    for (key, value) in pairs {
        if !walk.accept(path, &key, KEYS, EXPECTED, &mut seen) {
            continue;
        }
        let here = field_path(path, &key);
        match key.as_str() {
            "name" => node.name = walk.string(value, here, "a name (a string)"),
            "listen" => node.listen = addresses(walk, value, &here),
            "listen_public" => node.listen_public = addresses(walk, value, &here),
            "io_threads" => {
                node.io_threads =
                    walk.positive(value, here, "a whole number of threads, at least 1")
            }
            "service_threads" => {
                node.service_threads =
                    walk.positive(value, here, "a whole number of threads, at least 1")
            }
            "receive_budget" => node.receive_budget = size(walk, value, here),
            "pool_idle" => node.pool_idle = size(walk, value, here),
            "shm_bytes" => node.shm_bytes = size(walk, value, here),
            "min_receive_rate" => node.min_receive_rate = size(walk, value, here),
            "busy_poll_us" => {
                node.busy_poll_us = whole(
                    walk,
                    value,
                    here,
                    0,
                    1_000_000,
                    "a whole number of microseconds from 0 (off) to 1000000",
                )
            }
            "connect_timeout_s" => node.connect_timeout = seconds(walk, value, here, false),
            "progress_timeout_s" => node.progress_timeout = seconds(walk, value, here, true),
            "limits" => node.limits = limits(walk, value, &here),
            "secret_file" | "secret_env" => {
                if node.secret.is_some() {
                    walk.error(
                        here,
                        Error::Setting {
                            message:
                                "give the secret once: \"secret_file\" or \"secret_env\", not both"
                                    .into(),
                        },
                    );
                    continue;
                }
                let Some(text) = walk.string(value, here.clone(), "a string") else {
                    continue;
                };
                if text.trim().is_empty() {
                    walk.error(
                        here,
                        Error::Setting {
                            message: format!("`{key}` is empty; name the file or the variable that holds the secret"),
                        },
                    );
                } else if key == "secret_file" {
                    node.secret = Some(SecretSource::File(PathBuf::from(text)));
                } else {
                    node.secret = Some(SecretSource::Env(text));
                }
            }
            "shm_peer_uids" => node.shm_peer_uids = uids(walk, value, &here),
            "tls" => node.tls = tls(walk, value, &here),
            _ => unreachable!("walk.accept passes known keys only"),
        }
    }
    node
}

fn addresses(walk: &mut Walk<'_>, raw: Raw, path: &str) -> Vec<String> {
    let items = match raw {
        Raw::String(s) => vec![Raw::String(s)],
        Raw::Array(items) => items,
        other => {
            walk.error(
                path.to_string(),
                Error::WrongType {
                    expected:
                        "an address or an array of addresses (\"tcp://HOST:PORT\", \"shm://NAME\")",
                    found: other.type_name(),
                },
            );
            return Vec::new();
        }
    };
    items
        .into_iter()
        .enumerate()
        .filter_map(|(i, item)| {
            walk.string(
                item,
                format!("{path}[{i}]"),
                "an address (\"tcp://HOST:PORT\", \"shm://NAME\")",
            )
        })
        .collect()
}

fn uids(walk: &mut Walk<'_>, raw: Raw, path: &str) -> Option<Vec<u32>> {
    let Raw::Array(items) = raw else {
        walk.error(
            path.to_string(),
            Error::WrongType {
                expected: "an array of user ids",
                found: raw.type_name(),
            },
        );
        return None;
    };
    let mut out = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let here = format!("{path}[{i}]");
        if let Some(uid) = whole(
            walk,
            item,
            here,
            0,
            u32::MAX as u64,
            "a user id (a whole number)",
        ) {
            out.push(uid as u32);
        }
    }
    Some(out)
}

fn tls(walk: &mut Walk<'_>, raw: Raw, path: &str) -> Option<TlsSettings> {
    let pairs = walk.object(raw, path)?;
    let mut tls = TlsSettings::default();
    let mut seen = Vec::new();
    for (key, value) in pairs {
        if !walk.accept(path, &key, TLS_KEYS, TLS_EXPECTED, &mut seen) {
            continue;
        }
        let here = field_path(path, &key);
        let Some(text) = walk.string(value, here.clone(), "a string") else {
            continue;
        };
        if text.trim().is_empty() {
            walk.error(
                here,
                Error::Setting {
                    message: format!("`{key}` is empty; leave it out or name a file"),
                },
            );
            continue;
        }
        match key.as_str() {
            "cert_file" => tls.cert_file = Some(text.into()),
            "key_file" => tls.key_file = Some(text.into()),
            "ca_file" => tls.ca_file = Some(text.into()),
            "client_ca_file" => tls.client_ca_file = Some(text.into()),
            "server_name" => tls.server_name = Some(text),
            _ => unreachable!("walk.accept passes known keys only"),
        }
    }
    if tls.cert_file.is_some() != tls.key_file.is_some() {
        walk.error(
            path.to_string(),
            Error::Setting {
                message:
                    "give \"cert_file\" and \"key_file\" together (a certificate needs its key)"
                        .into(),
            },
        );
    }
    Some(tls)
}

fn limits(walk: &mut Walk<'_>, raw: Raw, path: &str) -> LimitSettings {
    let mut limits = LimitSettings::default();
    let Some(pairs) = walk.object(raw, path) else {
        return limits;
    };
    let mut seen = Vec::new();
    for (key, value) in pairs {
        if !walk.accept(path, &key, LIMIT_KEYS, LIMIT_EXPECTED, &mut seen) {
            continue;
        }
        let here = field_path(path, &key);
        match key.as_str() {
            "header_bytes" => limits.header_bytes = size(walk, value, here),
            "frame_bytes" => limits.frame_bytes = size(walk, value, here),
            "tensors" => limits.tensors = walk.positive(value, here, "a whole number, at least 1"),
            "buffers" => limits.buffers = walk.positive(value, here, "a whole number, at least 1"),
            _ => unreachable!("walk.accept passes known keys only"),
        }
    }
    limits
}

/// A size: a whole number of bytes, or a string with a unit.
fn size(walk: &mut Walk<'_>, raw: Raw, path: String) -> Option<u64> {
    let parsed = match &raw {
        Raw::Number(n) => match n.as_u64() {
            Some(v) if v >= 1 => Ok(v),
            _ => Err(format!("takes sizes of at least 1 byte, not `{n}`")),
        },
        Raw::String(s) => crate::units::size(s),
        other => {
            walk.error(
                path,
                Error::WrongType {
                    expected: "a size: a whole number of bytes, or a string such as \"64MiB\"",
                    found: other.type_name(),
                },
            );
            return None;
        }
    };
    match parsed {
        Ok(v) => Some(v),
        Err(why) => {
            walk.error(path, Error::Setting { message: why });
            None
        }
    }
}

/// A whole number from `min` to `max`.
fn whole(
    walk: &mut Walk<'_>,
    raw: Raw,
    path: String,
    min: u64,
    max: u64,
    expected: &'static str,
) -> Option<u64> {
    match raw {
        Raw::Number(n) if n.as_u64().is_some_and(|v| (min..=max).contains(&v)) => n.as_u64(),
        other => {
            walk.error(
                path,
                Error::InvalidValue {
                    value: match other {
                        Raw::Number(n) => n.to_string(),
                        Raw::String(s) => format!("\"{s}\""),
                        other => other.type_name().to_string(),
                    },
                    expected,
                },
            );
            None
        }
    }
}

/// Seconds: a number above 0 (or 0 too, when `zero_is_off`), at most a week.
fn seconds(walk: &mut Walk<'_>, raw: Raw, path: String, zero_is_off: bool) -> Option<Duration> {
    let value = match &raw {
        Raw::Number(n) => n.as_f64(),
        _ => None,
    };
    match value {
        Some(v) if v.is_finite() && (v > 0.0 || (zero_is_off && v == 0.0)) && v <= MAX_SECONDS => {
            Some(Duration::from_secs_f64(v))
        }
        _ => {
            walk.error(
                path,
                Error::InvalidValue {
                    value: match raw {
                        Raw::Number(n) => n.to_string(),
                        Raw::String(s) => format!("\"{s}\""),
                        other => other.type_name().to_string(),
                    },
                    expected: if zero_is_off {
                        "a number of seconds from 0 (off) to 604800 (a week)"
                    } else {
                        "a number of seconds above 0, at most 604800 (a week)"
                    },
                },
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::ChannelConfig;

    use super::*;

    #[test]
    fn a_full_section_reads_into_settings() {
        let config = ChannelConfig::from_json_str(
            r#"{"node": {"name": "n0", "listen": "shm://n0", "listen_public": ["tcp://0.0.0.0:7070"],
                "receive_budget": "2GiB", "pool_idle": 1048576, "shm_bytes": "512MiB",
                "busy_poll_us": 50, "connect_timeout_s": 2.5, "progress_timeout_s": 0,
                "min_receive_rate": "16KiB", "io_threads": 2, "service_threads": 3,
                "limits": {"header_bytes": "1MiB", "tensors": 10, "buffers": 12, "frame_bytes": "4GiB"},
                "secret_env": "MY_SECRET", "shm_peer_uids": [0, 1001],
                "tls": {"cert_file": "a.pem", "key_file": "a.key", "ca_file": "/ca.pem"}}}"#,
        )
        .expect("valid");
        let node = config.node();
        assert_eq!(node.name.as_deref(), Some("n0"));
        assert_eq!(node.listen, ["shm://n0"]);
        assert_eq!(node.listen_public, ["tcp://0.0.0.0:7070"]);
        assert_eq!(node.receive_budget, Some(2 << 30));
        assert_eq!(node.pool_idle, Some(1 << 20));
        assert_eq!(node.shm_bytes, Some(512 << 20));
        assert_eq!(node.busy_poll_us, Some(50));
        assert_eq!(node.connect_timeout, Some(Duration::from_millis(2500)));
        assert_eq!(node.progress_timeout, Some(Duration::ZERO));
        assert_eq!(node.min_receive_rate, Some(16 << 10));
        assert_eq!((node.io_threads, node.service_threads), (Some(2), Some(3)));
        assert_eq!(node.limits.header_bytes, Some(1 << 20));
        assert_eq!(node.limits.tensors, Some(10));
        assert_eq!(node.limits.buffers, Some(12));
        assert_eq!(node.limits.frame_bytes, Some(4 << 30));
        assert_eq!(node.secret, Some(SecretSource::Env("MY_SECRET".into())));
        assert_eq!(node.shm_peer_uids, Some(vec![0, 1001]));
        let tls = node.tls.as_ref().expect("tls");
        assert_eq!(tls.cert_file.as_deref(), Some(Path::new("a.pem")));
        assert_eq!(tls.key_file.as_deref(), Some(Path::new("a.key")));
        assert_eq!(tls.ca_file.as_deref(), Some(Path::new("/ca.pem")));
        let mut moved = node.clone();
        moved.relative_to(Path::new("/etc/tf"));
        let tls = moved.tls.expect("tls");
        assert_eq!(tls.cert_file.as_deref(), Some(Path::new("/etc/tf/a.pem")));
        assert_eq!(tls.ca_file.as_deref(), Some(Path::new("/ca.pem")));
        assert!(config.is_empty(), "no channels");
    }

    #[test]
    fn every_bad_setting_is_reported_with_its_place() {
        let e = ChannelConfig::from_json_str(
            r#"{"node": {"receive_budget": "8gb", "io_threads": 0, "busy_poll_us": -1,
                "connect_timeout_s": 0, "listen": [7], "secret_file": "a", "secret_env": "B",
                "limits": {"frames": 1}, "shm_peer_uids": [-3], "colour": "red",
                "tls": {"cert_file": "c.pem"}},
               "channels": {}}"#,
        )
        .expect_err("invalid")
        .to_string();
        for place in [
            "node.receive_budget",
            "did you mean 8GiB?",
            "node.io_threads",
            "node.busy_poll_us",
            "node.connect_timeout_s",
            "node.listen[0]",
            "node.secret_env",
            "not both",
            "node.limits.frames",
            "node.shm_peer_uids[0]",
            "node.colour",
            "node.tls",
            "cert_file\" and \"key_file\" together",
        ] {
            assert!(e.contains(place), "`{place}` missing from: {e}");
        }
    }

    #[test]
    fn a_relative_secret_file_is_taken_from_the_configuration_folder() {
        let mut node = NodeSection {
            secret: Some(SecretSource::File("keys/secret".into())),
            ..NodeSection::default()
        };
        node.relative_to(Path::new("/etc/tensorferry"));
        assert_eq!(
            node.secret,
            Some(SecretSource::File("/etc/tensorferry/keys/secret".into()))
        );
        let mut absolute = NodeSection {
            secret: Some(SecretSource::File("/run/secret".into())),
            ..NodeSection::default()
        };
        absolute.relative_to(Path::new("/etc"));
        assert_eq!(
            absolute.secret,
            Some(SecretSource::File("/run/secret".into()))
        );
    }
}
