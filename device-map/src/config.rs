//! [`ChannelConfig`]: the JSON file that names channels and gives each its
//! pattern, device map and fallback.
//!
//! ```json
//! {"channels": {"/notify/exchange": {"pattern": "pubsub",
//!   "device_map": {"cuda:0": "cuda:1", "gpu:1": "cuda:0", "cuda:3": "cpu", "default": "cpu"},
//!   "fallback": "wgpu"}}}
//! ```
//!
//! The parser keeps repeated keys (a JSON object may legally repeat one, and
//! most parsers silently keep the last) so that a device given two targets is
//! caught however it is spelt. Every error of a file is collected, each with its
//! place, before anything is returned.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::device::Device;
use crate::error::{Error, Located, Result};
use crate::map::DeviceMap;
use crate::node::NodeSection;
use crate::resolve::{resolve, Fallback, Inventory, Resolved};

/// How a channel moves messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Pattern {
    /// Publish/subscribe: one publisher, any number of subscribers. Many-to-one maps allowed.
    #[default]
    PubSub,
    /// Request/reply: replies travel back through the reverse map, so the map must be one-to-one.
    ReqRep,
}

impl Pattern {
    /// The name used in configuration files.
    pub const fn as_str(self) -> &'static str {
        match self {
            Pattern::PubSub => "pubsub",
            Pattern::ReqRep => "reqrep",
        }
    }

    const EXPECTED: &'static str = "\"pubsub\" or \"reqrep\"";
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Pattern {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "pubsub" => Ok(Pattern::PubSub),
            "reqrep" => Ok(Pattern::ReqRep),
            _ => Err(Error::InvalidValue {
                value: s.to_string(),
                expected: Self::EXPECTED,
            }),
        }
    }
}

/// What a publisher does when a subscriber's queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Overflow {
    /// Wait until the subscriber takes a message (backpressure reaches the publisher).
    #[default]
    Block,
    /// Drop the oldest queued message and count the drop.
    DropOldest,
}

impl Overflow {
    /// The name used in configuration files.
    pub const fn as_str(self) -> &'static str {
        match self {
            Overflow::Block => "block",
            Overflow::DropOldest => "drop_oldest",
        }
    }

    const EXPECTED: &'static str = "\"block\" or \"drop_oldest\"";
}

impl fmt::Display for Overflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Overflow {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "block" => Ok(Overflow::Block),
            "drop_oldest" => Ok(Overflow::DropOldest),
            _ => Err(Error::InvalidValue {
                value: s.to_string(),
                expected: Self::EXPECTED,
            }),
        }
    }
}

/// Messages a subscriber's queue holds when the configuration does not say.
pub const DEFAULT_QUEUE_DEPTH: usize = 64;

/// One channel's settings: pattern, device map, fallback and queue policy.
///
/// # Examples
///
/// ```
/// use tensorferry_device_map::{ChannelSpec, Device, DeviceMap, Fallback, Inventory, Pattern};
///
/// let spec = ChannelSpec::new(Pattern::ReqRep)
///     .with_device_map(DeviceMap::builder().entry("cuda:0", "cuda:1").build()?)
///     .with_fallback(Fallback::Cpu);
/// spec.validate()?;
/// let host: Inventory = "cuda:0".parse()?;
/// assert_eq!(spec.resolve(Device::cuda(0), &host)?.target, Device::Cpu);
/// assert_eq!(spec.reply_map()?.get(Device::cuda(1)), Some(Device::cuda(0)));
/// # Ok::<(), tensorferry_device_map::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelSpec {
    /// Publish/subscribe or request/reply. Default: pubsub.
    pub pattern: Pattern,
    /// Where tensors from each source device land. Default: empty (every device kept).
    pub device_map: DeviceMap,
    /// What to do when a target is missing on the receiving host. Default: error.
    pub fallback: Fallback,
    /// Messages each subscriber's queue holds. Default: [`DEFAULT_QUEUE_DEPTH`].
    pub queue_depth: usize,
    /// Bytes of tensors each subscriber's queue holds, besides its depth in
    /// messages (the overflow policy applies on either limit; a single
    /// message larger than this still passes through an empty queue).
    /// Default: none (messages only).
    pub queue_bytes: Option<u64>,
    /// What a publisher does when a subscriber's queue is full. Default: block.
    pub overflow: Overflow,
    /// Dtypes cast before they travel, as written in the file (lowercase):
    /// `("f32", "bf16")` sends f32 tensors as bf16. The names and the casts
    /// are checked where the dtypes are known (the engine and `check-map`).
    /// Default: none.
    pub wire_dtype: Vec<(String, String)>,
    /// Deliver tensors in their wire dtype instead of casting them back.
    /// Default: false (cast back to the dtype the sender had).
    pub keep_wire_dtype: bool,
    /// The sender checksums each tensor where it lives and the receiver
    /// verifies it on the target device; a mismatch rejects the message.
    /// Default: false.
    pub checksum: bool,
    /// Over how many tcp connections to one peer a large message is spread
    /// (`"stripes": N`, 1 to 8; 1 turns striping off), so that each end
    /// copies on several cores at once. Messages under 1 MiB are never
    /// striped. Default: `None` (`"auto"`): one connection per 16 MiB of
    /// the message, at most one per core and at most 4.
    pub stripes: Option<usize>,
}

impl Default for ChannelSpec {
    fn default() -> Self {
        Self {
            pattern: Pattern::default(),
            device_map: DeviceMap::default(),
            fallback: Fallback::default(),
            queue_depth: DEFAULT_QUEUE_DEPTH,
            queue_bytes: None,
            overflow: Overflow::default(),
            wire_dtype: Vec::new(),
            keep_wire_dtype: false,
            checksum: false,
            stripes: None,
        }
    }
}

impl ChannelSpec {
    /// A channel with this pattern, an empty map and the `error` fallback.
    pub fn new(pattern: Pattern) -> Self {
        Self {
            pattern,
            ..Self::default()
        }
    }

    /// Sets the device map.
    pub fn with_device_map(mut self, device_map: DeviceMap) -> Self {
        self.device_map = device_map;
        self
    }

    /// Sets the fallback policy.
    pub fn with_fallback(mut self, fallback: Fallback) -> Self {
        self.fallback = fallback;
        self
    }

    /// Sets the subscriber queue depth (messages, at least 1) and overflow policy.
    pub fn with_queue(mut self, depth: usize, overflow: Overflow) -> Self {
        self.queue_depth = depth.max(1);
        self.overflow = overflow;
        self
    }

    /// Bounds each subscriber's queue in bytes of tensors too (see
    /// [`ChannelSpec::queue_bytes`]).
    pub fn with_queue_bytes(mut self, bytes: u64) -> Self {
        self.queue_bytes = Some(bytes.max(1));
        self
    }

    /// Sends dtype `from` as `to` on the wire (names as [`ChannelSpec::wire_dtype`]).
    pub fn with_wire_dtype(mut self, from: &str, to: &str) -> Self {
        let from = from.trim().to_ascii_lowercase();
        self.wire_dtype.retain(|(f, _)| *f != from);
        self.wire_dtype.push((from, to.trim().to_ascii_lowercase()));
        self
    }

    /// Turns per-tensor checksums on or off.
    pub fn with_checksum(mut self, on: bool) -> Self {
        self.checksum = on;
        self
    }

    /// Spreads large messages over `n` tcp connections (clamped to 1..=8;
    /// see [`ChannelSpec::stripes`]).
    pub fn with_stripes(mut self, n: usize) -> Self {
        self.stripes = Some(n.clamp(1, MAX_STRIPES));
        self
    }

    /// Checks the rules that depend on the pattern: a request/reply map must be reversible.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] with each offending entry.
    pub fn validate(&self) -> Result<()> {
        let errors = self.pattern_errors("device_map", None);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid { errors })
        }
    }

    fn pattern_errors(&self, base: &str, channel: Option<&str>) -> Vec<Located> {
        if self.pattern == Pattern::PubSub {
            return Vec::new();
        }
        self.device_map
            .reversibility_errors()
            .into_iter()
            .map(|(key, error)| Located {
                channel: channel.map(str::to_string),
                path: key_path(base, &key),
                error,
            })
            .collect()
    }

    /// Where tensors sent from `source` land on a host with `inventory`.
    ///
    /// # Errors
    ///
    /// [`Error::MissingDevice`] when the wanted device is missing and the fallback is `error`.
    pub fn resolve(&self, source: Device, inventory: &Inventory) -> Result<Resolved> {
        resolve(&self.device_map, self.fallback, source, inventory)
    }

    /// The map replies travel with: the reverse of the request map.
    ///
    /// # Errors
    ///
    /// As [`DeviceMap::reverse`]; a validated `reqrep` channel never fails here.
    pub fn reply_map(&self) -> Result<DeviceMap> {
        self.device_map.reverse()
    }
}

/// A configuration file: channel names and their [`ChannelSpec`]s, in file order.
///
/// # Examples
///
/// ```
/// use tensorferry_device_map::{ChannelConfig, Device, Inventory, Pattern};
///
/// let config = ChannelConfig::from_json_str(r#"{"channels": {"/camera": {
///     "pattern": "pubsub", "device_map": {"gpu:1": "cuda:0", "default": "cpu"}}}}"#)?;
/// let camera = config.channel("/camera")?;
/// assert_eq!(camera.pattern, Pattern::PubSub);
/// let host: Inventory = "cuda:0".parse()?;
/// assert_eq!(camera.resolve(Device::cuda(1), &host)?.target, Device::cuda(0));
///
/// let bad = ChannelConfig::from_json_str(r#"{"channels": {"/a": {"device_map": {"cuda:1": "cpu", "1": "cuda:0"}}}}"#);
/// assert!(bad.unwrap_err().to_string().contains(r#"channels["/a"].device_map["1"]"#));
/// # Ok::<(), tensorferry_device_map::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelConfig {
    channels: Vec<(String, ChannelSpec)>,
    node: NodeSection,
}

/// What [`ChannelConfig::parse`] made of a file: every channel that parsed and every error.
#[derive(Debug, Default)]
pub struct Parsed {
    /// The channels that are valid, in file order.
    pub config: ChannelConfig,
    /// Every error, in file order, with its place.
    pub errors: Vec<Located>,
    /// Every channel that was an object, with what could be read of it,
    /// errors or not: for checks made elsewhere (the engine's dtype checks)
    /// to report their errors too.
    pub attempted: Vec<(String, ChannelSpec)>,
}

impl ChannelConfig {
    /// No channels.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads and validates a configuration file.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the file cannot be read; [`Error::Invalid`] with every
    /// error of the file, each with its place.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::from_json_str(&text)?;
        if let Some(dir) = path.parent() {
            config.node.relative_to(dir);
        }
        Ok(config)
    }

    /// The `"node"` section: settings for the node that reads this file.
    pub fn node(&self) -> &NodeSection {
        &self.node
    }

    /// The `"node"` section, to change before it is applied (a command-line
    /// option that overrides the file, say).
    pub fn node_mut(&mut self) -> &mut NodeSection {
        &mut self.node
    }

    /// Parses and validates configuration text.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] with every error, each with its place.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let parsed = Self::parse(text);
        if parsed.errors.is_empty() {
            Ok(parsed.config)
        } else {
            Err(Error::Invalid {
                errors: parsed.errors,
            })
        }
    }

    /// Parses configuration text, keeping every valid channel and collecting
    /// every error: what `check-map` reports.
    pub fn parse(text: &str) -> Parsed {
        let mut parsed = Parsed::default();
        match serde_json::from_str::<Raw>(text) {
            Ok(raw) => parse_root(raw, &mut parsed),
            Err(e) => parsed.errors.push(Located {
                channel: None,
                path: String::new(),
                error: json_error(&e),
            }),
        }
        parsed
    }

    /// Adds or replaces a channel after checking its pattern rules.
    ///
    /// # Errors
    ///
    /// As [`ChannelSpec::validate`].
    pub fn insert(&mut self, name: impl Into<String>, spec: ChannelSpec) -> Result<()> {
        spec.validate()?;
        let name = name.into();
        match self.channels.iter_mut().find(|(n, _)| *n == name) {
            Some((_, old)) => *old = spec,
            None => self.channels.push((name, spec)),
        }
        Ok(())
    }

    /// The channel called `name`, if defined.
    pub fn get(&self, name: &str) -> Option<&ChannelSpec> {
        self.channels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
    }

    /// The channel called `name`.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownChannel`] listing the defined names.
    pub fn channel(&self, name: &str) -> Result<&ChannelSpec> {
        self.get(name).ok_or_else(|| Error::UnknownChannel {
            name: name.to_string(),
            defined: if self.channels.is_empty() {
                "(none)".to_string()
            } else {
                self.names().collect::<Vec<_>>().join(", ")
            },
        })
    }

    /// Channel names in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.channels.iter().map(|(n, _)| n.as_str())
    }

    /// `(name, spec)` pairs in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ChannelSpec)> {
        self.channels.iter().map(|(n, s)| (n.as_str(), s))
    }

    /// Number of channels.
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    /// True when no channel is defined.
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }
}

/// `base["key"]`, with the key quoted as a JSON string.
pub(crate) fn key_path(base: &str, key: &str) -> String {
    let quoted = serde_json::to_string(key).expect("a string always serializes");
    format!("{base}[{quoted}]")
}

pub(crate) fn field_path(base: &str, field: &str) -> String {
    if base.is_empty() {
        field.to_string()
    } else {
        format!("{base}.{field}")
    }
}

fn json_error(e: &serde_json::Error) -> Error {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    Error::Json {
        line: e.line(),
        column: e.column(),
        message: full.strip_suffix(&suffix).unwrap_or(&full).to_string(),
    }
}

/// A JSON value whose objects keep every key, repeated ones included, in order.
#[derive(Debug)]
pub(crate) enum Raw {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Array(Vec<Raw>),
    Object(Vec<(String, Raw)>),
}

impl Raw {
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            Raw::Null => "null",
            Raw::Bool(_) => "a boolean",
            Raw::Number(_) => "a number",
            Raw::String(_) => "a string",
            Raw::Array(_) => "an array",
            Raw::Object(_) => "an object",
        }
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct RawVisitor;
        impl<'de> Visitor<'de> for RawVisitor {
            type Value = Raw;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E>(self) -> std::result::Result<Raw, E> {
                Ok(Raw::Null)
            }
            fn visit_bool<E>(self, v: bool) -> std::result::Result<Raw, E> {
                Ok(Raw::Bool(v))
            }
            fn visit_u64<E>(self, v: u64) -> std::result::Result<Raw, E> {
                Ok(Raw::Number(v.into()))
            }
            fn visit_i64<E>(self, v: i64) -> std::result::Result<Raw, E> {
                Ok(Raw::Number(v.into()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Raw, E> {
                serde_json::Number::from_f64(v)
                    .map(Raw::Number)
                    .ok_or_else(|| E::custom("a number that is not finite"))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Raw, E> {
                Ok(Raw::String(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> std::result::Result<Raw, E> {
                Ok(Raw::String(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Raw, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<Raw>()? {
                    items.push(item);
                }
                Ok(Raw::Array(items))
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Raw, A::Error> {
                let mut pairs = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Raw>()? {
                    pairs.push((k, v));
                }
                Ok(Raw::Object(pairs))
            }
        }
        d.deserialize_any(RawVisitor)
    }
}

/// Collects errors for one file walk.
pub(crate) struct Walk<'a> {
    pub(crate) errors: &'a mut Vec<Located>,
    pub(crate) channel: Option<String>,
}

impl Walk<'_> {
    pub(crate) fn error(&mut self, path: String, error: Error) {
        self.errors.push(Located {
            channel: self.channel.clone(),
            path,
            error,
        });
    }

    /// The pairs of an object, or an error when `raw` is not one.
    pub(crate) fn object(&mut self, raw: Raw, path: &str) -> Option<Vec<(String, Raw)>> {
        match raw {
            Raw::Object(pairs) => Some(pairs),
            other => {
                self.error(
                    path.to_string(),
                    Error::WrongType {
                        expected: "an object",
                        found: other.type_name(),
                    },
                );
                None
            }
        }
    }

    /// Whether `key` of the object at `path` is known and not yet `seen`;
    /// reports it otherwise, so errors come in file order.
    pub(crate) fn accept(
        &mut self,
        path: &str,
        key: &str,
        known: &[&str],
        expected: &'static str,
        seen: &mut Vec<String>,
    ) -> bool {
        if !known.contains(&key) {
            self.error(
                field_path(path, key),
                Error::UnknownKey {
                    key: key.to_string(),
                    expected,
                },
            );
            false
        } else if seen.iter().any(|k| k == key) {
            self.error(
                field_path(path, key),
                Error::DuplicateKey {
                    key: key.to_string(),
                },
            );
            false
        } else {
            seen.push(key.to_string());
            true
        }
    }

    /// A whole number of at least 1 (a count), or an error saying `expected`.
    pub(crate) fn positive(
        &mut self,
        raw: Raw,
        path: String,
        expected: &'static str,
    ) -> Option<u64> {
        match raw {
            Raw::Number(n) if n.as_u64().is_some_and(|v| v >= 1) => n.as_u64(),
            other => {
                self.error(
                    path,
                    Error::InvalidValue {
                        value: match other {
                            Raw::Number(n) => n.to_string(),
                            Raw::String(s) => s,
                            other => other.type_name().to_string(),
                        },
                        expected,
                    },
                );
                None
            }
        }
    }

    pub(crate) fn boolean(&mut self, raw: Raw, path: String) -> Option<bool> {
        match raw {
            Raw::Bool(b) => Some(b),
            other => {
                self.error(
                    path,
                    Error::WrongType {
                        expected: "true or false",
                        found: other.type_name(),
                    },
                );
                None
            }
        }
    }

    pub(crate) fn string(
        &mut self,
        raw: Raw,
        path: String,
        expected: &'static str,
    ) -> Option<String> {
        match raw {
            Raw::String(s) => Some(s),
            other => {
                self.error(
                    path,
                    Error::WrongType {
                        expected,
                        found: other.type_name(),
                    },
                );
                None
            }
        }
    }
}

const ROOT_KEYS: &str = "\"channels\", \"node\"";
const CHANNEL_KEYS: &str = "\"pattern\", \"device_map\", \"fallback\", \"queue_depth\", \"queue_bytes\", \"overflow\", \"wire_dtype\", \"keep_wire_dtype\", \"checksum\", \"stripes\"";
/// Most connections a message may be striped over.
pub const MAX_STRIPES: usize = 8;
const CHANNEL_KEY_LIST: &[&str] = &[
    "pattern",
    "device_map",
    "fallback",
    "queue_depth",
    "queue_bytes",
    "overflow",
    "wire_dtype",
    "keep_wire_dtype",
    "checksum",
    "stripes",
];

fn parse_root(raw: Raw, parsed: &mut Parsed) {
    let mut walk = Walk {
        errors: &mut parsed.errors,
        channel: None,
    };
    let Some(root) = walk.object(raw, "") else {
        return;
    };
    let mut seen = Vec::new();
    for (key, value) in root {
        let mut walk = Walk {
            errors: &mut parsed.errors,
            channel: None,
        };
        if walk.accept("", &key, &["channels", "node"], ROOT_KEYS, &mut seen) {
            if key == "node" {
                parsed.config.node = crate::node::parse(&mut walk, value, "node");
            } else {
                parse_channels(value, parsed);
            }
        }
    }
    if seen.is_empty() {
        parsed.errors.push(Located {
            channel: None,
            path: String::new(),
            error: Error::MissingKey { key: "channels" },
        });
    }
}

fn parse_channels(raw: Raw, parsed: &mut Parsed) {
    let channels = match raw {
        Raw::Object(pairs) => pairs,
        other => {
            parsed.errors.push(Located {
                channel: None,
                path: "channels".into(),
                error: Error::WrongType {
                    expected: "an object of channel names",
                    found: other.type_name(),
                },
            });
            return;
        }
    };
    let mut seen: Vec<String> = Vec::new();
    for (name, raw) in channels {
        let path = key_path("channels", &name);
        let mut walk = Walk {
            errors: &mut parsed.errors,
            channel: Some(name.clone()),
        };
        if seen.contains(&name) {
            walk.error(path, Error::DuplicateKey { key: name });
            continue;
        }
        seen.push(name.clone());
        if name.trim().is_empty() || name.chars().any(char::is_control) {
            walk.error(
                path.clone(),
                Error::InvalidValue {
                    value: name.clone(),
                    expected: "a channel name: non-empty, printable (for example \"/camera\")",
                },
            );
        }
        let before = walk.errors.len();
        let spec = parse_channel(&mut walk, raw, &path);
        let clean = walk.errors.len() == before;
        if let Some(spec) = spec {
            parsed.attempted.push((name.clone(), spec.clone()));
            if clean {
                parsed.config.channels.push((name, spec));
            }
        }
    }
}

fn parse_channel(walk: &mut Walk<'_>, raw: Raw, path: &str) -> Option<ChannelSpec> {
    let pairs = walk.object(raw, path)?;
    let mut spec = ChannelSpec::default();
    let mut seen = Vec::new();
    for (key, value) in pairs {
        if !walk.accept(path, &key, CHANNEL_KEY_LIST, CHANNEL_KEYS, &mut seen) {
            continue;
        }
        let here = field_path(path, &key);
        match key.as_str() {
            "pattern" => {
                if let Some(s) = walk.string(value, here.clone(), Pattern::EXPECTED) {
                    match s.parse() {
                        Ok(p) => spec.pattern = p,
                        Err(e) => walk.error(here, e),
                    }
                }
            }
            "fallback" => {
                if let Some(s) = walk.string(value, here.clone(), Fallback::EXPECTED) {
                    match s.parse() {
                        Ok(f) => spec.fallback = f,
                        Err(e) => walk.error(here, e),
                    }
                }
            }
            "device_map" => spec.device_map = parse_map(walk, value, &here),
            "overflow" => {
                if let Some(s) = walk.string(value, here.clone(), Overflow::EXPECTED) {
                    match s.parse() {
                        Ok(o) => spec.overflow = o,
                        Err(e) => walk.error(here, e),
                    }
                }
            }
            "queue_depth" => {
                if let Some(d) =
                    walk.positive(value, here, "a whole number of messages, at least 1")
                {
                    spec.queue_depth = usize::try_from(d).unwrap_or(usize::MAX);
                }
            }
            "queue_bytes" => {
                if let Some(b) = walk.positive(value, here, "a whole number of bytes, at least 1") {
                    spec.queue_bytes = Some(b);
                }
            }
            "wire_dtype" => spec.wire_dtype = parse_wire_dtype(walk, value, &here),
            "keep_wire_dtype" => {
                if let Some(b) = walk.boolean(value, here) {
                    spec.keep_wire_dtype = b;
                }
            }
            "checksum" => {
                if let Some(b) = walk.boolean(value, here) {
                    spec.checksum = b;
                }
            }
            "stripes" => match value {
                Raw::String(s) if s == "auto" => spec.stripes = None,
                Raw::Number(n)
                    if n.as_u64()
                        .is_some_and(|v| (1..=MAX_STRIPES as u64).contains(&v)) =>
                {
                    spec.stripes = n.as_u64().map(|v| v as usize);
                }
                other => walk.error(
                    here,
                    Error::InvalidValue {
                        value: match other {
                            Raw::Number(n) => n.to_string(),
                            Raw::String(s) => s,
                            other => other.type_name().to_string(),
                        },
                        expected:
                            "\"auto\" or a whole number of connections from 1 (no striping) to 8",
                    },
                ),
            },
            _ => unreachable!("walk.accept passes known keys only"),
        }
    }
    let pattern_errors =
        spec.pattern_errors(&field_path(path, "device_map"), walk.channel.as_deref());
    walk.errors.extend(pattern_errors);
    Some(spec)
}

fn parse_wire_dtype(walk: &mut Walk<'_>, raw: Raw, path: &str) -> Vec<(String, String)> {
    let Raw::Object(pairs) = raw else {
        walk.error(
            path.to_string(),
            Error::WrongType {
                expected: "an object of dtype: wire dtype, such as {\"f32\": \"bf16\"}",
                found: raw.type_name(),
            },
        );
        return Vec::new();
    };
    let mut out: Vec<(String, String)> = Vec::new();
    for (key, value) in pairs {
        let here = key_path(path, &key);
        let from = key.trim().to_ascii_lowercase();
        if out.iter().any(|(f, _)| *f == from) {
            walk.error(here, Error::DuplicateKey { key });
            continue;
        }
        if let Some(to) = walk.string(value, here, "a dtype name such as \"bf16\"") {
            out.push((from, to.trim().to_ascii_lowercase()));
        }
    }
    out
}

fn parse_map(walk: &mut Walk<'_>, raw: Raw, path: &str) -> DeviceMap {
    let pairs = match raw {
        Raw::Object(pairs) => pairs,
        other => {
            walk.error(
                path.to_string(),
                Error::WrongType {
                    expected: "an object of source: target devices",
                    found: other.type_name(),
                },
            );
            return DeviceMap::new();
        }
    };
    let entries = pairs.into_iter().map(|(key, value)| {
        let target = match value {
            Raw::String(s) => Ok(s),
            Raw::Number(n) => Ok(n.to_string()),
            other => Err(Error::WrongType {
                expected: "a device name such as \"cuda:0\" or \"cpu\"",
                found: other.type_name(),
            }),
        };
        (key, target)
    });
    let (map, errors) = DeviceMap::from_raw(entries);
    for (key, error) in errors {
        walk.error(key_path(path, &key), error);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors_of(text: &str) -> Vec<Located> {
        ChannelConfig::parse(text).errors
    }

    fn paths(text: &str) -> Vec<String> {
        errors_of(text).into_iter().map(|l| l.path).collect()
    }

    const EXAMPLE: &str = r#"{"channels": {"/notify/exchange": {"pattern": "pubsub",
        "device_map": {"cuda:0": "cuda:1", "gpu:1": "cuda:0", "cuda:3": "cpu", "default": "cpu"},
        "fallback": "wgpu"}}}"#;

    #[test]
    fn parses_the_documented_example() {
        let config = ChannelConfig::from_json_str(EXAMPLE).expect("valid");
        let spec = config.channel("/notify/exchange").expect("defined");
        assert_eq!(spec.pattern, Pattern::PubSub);
        assert_eq!(spec.fallback, Fallback::Wgpu);
        assert_eq!(spec.device_map.get(Device::cuda(1)), Some(Device::cuda(0)));
        assert_eq!(spec.device_map.default_target(), Some(Device::Cpu));
    }

    #[test]
    fn repeated_json_key_with_two_targets_is_a_conflict() {
        let text = r#"{"channels": {"/a": {"device_map": {"cuda:1": "cpu", "cuda:1": "cuda:0"}}}}"#;
        let errs = errors_of(text);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].path, r#"channels["/a"].device_map["cuda:1"]"#);
        assert!(matches!(errs[0].error, Error::ConflictingTargets { .. }));
        let same = r#"{"channels": {"/a": {"device_map": {"cuda:1": "cpu", "cuda:1": "cpu"}}}}"#;
        assert!(errors_of(same).is_empty());
    }

    #[test]
    fn reports_all_errors_of_a_file_with_places() {
        let text = r#"{"channels": {
            "/a": {"pattern": "pubsub", "device_map": {"cuda:0": "cuda:1", "gpu:0": "cpu"}, "falback": "cpu"},
            "/b": {"pattern": "reqrep", "device_map": {"cuda:0": "cpu", "cuda:1": "cpu"}},
            "/c": {"pattern": "push", "fallback": "gpu", "device_map": {"tpu:0": "cpu", "cuda:2": true}},
            "/d": {"device_map": {"cuda:0": "cuda:1"}}
        }, "version": 2}"#;
        let got = paths(text);
        let want = [
            r#"channels["/a"].device_map["gpu:0"]"#,
            r#"channels["/a"].falback"#,
            r#"channels["/b"].device_map["cuda:1"]"#,
            r#"channels["/c"].pattern"#,
            r#"channels["/c"].fallback"#,
            r#"channels["/c"].device_map["tpu:0"]"#,
            r#"channels["/c"].device_map["cuda:2"]"#,
            "version",
        ];
        assert_eq!(got, want);
        let parsed = ChannelConfig::parse(text);
        assert_eq!(
            parsed.config.names().collect::<Vec<_>>(),
            ["/d"],
            "only valid channels kept"
        );
        let channels: Vec<_> = parsed.errors.iter().map(|e| e.channel.as_deref()).collect();
        assert_eq!(channels[0], Some("/a"));
        assert_eq!(channels[7], None);
    }

    #[test]
    fn reqrep_rejects_many_to_one_and_default_but_pubsub_accepts_them() {
        let map = r#"{"cuda:0": "cpu", "gpu:1": "cpu", "default": "cuda:0"}"#;
        let pubsub =
            format!(r#"{{"channels": {{"/p": {{"pattern": "pubsub", "device_map": {map}}}}}}}"#);
        assert!(errors_of(&pubsub).is_empty());
        let reqrep = pubsub.replace("pubsub", "reqrep");
        let errs = errors_of(&reqrep);
        let kinds: Vec<_> = errs.iter().map(|e| &e.error).collect();
        assert!(
            matches!(kinds[0], Error::DefaultNotReversible { .. }),
            "{kinds:?}"
        );
        assert!(
            matches!(
                kinds[1],
                Error::ManyToOne {
                    target: Device::Cpu,
                    ..
                }
            ),
            "{kinds:?}"
        );
        assert_eq!(errs[1].path, r#"channels["/p"].device_map["gpu:1"]"#);
        assert!(
            errs[1].to_string().contains("`cuda:0` and `gpu:1`"),
            "{}",
            errs[1]
        );
    }

    #[test]
    fn malformed_json_gives_line_and_column() {
        let errs = errors_of("{\"channels\": {\n  \"/a\": {,}\n}}");
        assert_eq!(errs.len(), 1);
        match &errs[0].error {
            Error::Json { line, column, .. } => assert_eq!((*line, *column), (2, 10)),
            other => panic!("{other:?}"),
        }
        assert!(errs[0].to_string().contains("line 2, column 10"));
    }

    #[test]
    fn wrong_shapes_are_errors_not_panics() {
        for text in [
            "[]",
            "null",
            "{}",
            r#"{"channels": []}"#,
            r#"{"channels": {"/a": 3}}"#,
            r#"{"channels": {"/a": {"device_map": "cpu"}}}"#,
            r#"{"channels": {"/a": {"pattern": 1}}}"#,
            r#"{"channels": {"/a": {"device_map": {"cuda:0": -1}}}}"#,
            r#"{"channels": {"": {}}}"#,
            r#"{"channels": {"/a": {}, "/a": {}}}"#,
            r#"{"channels": {"/a": {"pattern": "pubsub", "pattern": "reqrep"}}}"#,
            r#"{"channels": {}, "channels": {}}"#,
        ] {
            assert_eq!(errors_of(text).len(), 1, "{text}: {:?}", errors_of(text));
        }
        assert!(errors_of(r#"{"channels": {}}"#).is_empty());
    }

    #[test]
    fn queue_settings_parse_and_bad_ones_are_errors() {
        let config = ChannelConfig::from_json_str(
            r#"{"channels": {"/a": {"queue_depth": 4, "queue_bytes": 1048576, "overflow": "drop_oldest"}, "/b": {}}}"#,
        )
        .expect("valid");
        let a = config.channel("/a").expect("a");
        assert_eq!((a.queue_depth, a.overflow), (4, Overflow::DropOldest));
        assert_eq!(a.queue_bytes, Some(1 << 20));
        let b = config.channel("/b").expect("b");
        assert_eq!(
            (b.queue_depth, b.overflow),
            (DEFAULT_QUEUE_DEPTH, Overflow::Block)
        );
        let bad = r#"{"channels": {"/a": {"queue_depth": 0, "overflow": "drop_newest"}}}"#;
        assert_eq!(
            paths(bad),
            [
                r#"channels["/a"].queue_depth"#,
                r#"channels["/a"].overflow"#
            ]
        );
    }

    #[test]
    fn cast_and_checksum_settings_parse_and_bad_ones_are_errors() {
        let config = ChannelConfig::from_json_str(
            r#"{"channels": {"/a": {"wire_dtype": {"F32": "BF16", "f64": "f16"},
                "keep_wire_dtype": true, "checksum": true}, "/b": {}}}"#,
        )
        .expect("valid");
        let a = config.channel("/a").expect("a");
        assert_eq!(
            a.wire_dtype,
            [("f32".into(), "bf16".into()), ("f64".into(), "f16".into())]
        );
        assert!(a.keep_wire_dtype && a.checksum);
        let b = config.channel("/b").expect("b");
        assert!(b.wire_dtype.is_empty() && !b.keep_wire_dtype && !b.checksum);
        let bad = r#"{"channels": {"/a": {"wire_dtype": {"f32": "bf16", " F32": "f16", "f64": 3},
            "checksum": "yes"}, "/b": {"wire_dtype": ["f32"]}}}"#;
        assert_eq!(
            paths(bad),
            [
                r#"channels["/a"].wire_dtype[" F32"]"#,
                r#"channels["/a"].wire_dtype["f64"]"#,
                r#"channels["/a"].checksum"#,
                r#"channels["/b"].wire_dtype"#,
            ]
        );
    }

    #[test]
    fn stripes_are_auto_or_a_count_from_1_to_8() {
        let config = ChannelConfig::from_json_str(
            r#"{"channels": {"/a": {"stripes": 3}, "/b": {"stripes": "auto"}, "/c": {}}}"#,
        )
        .expect("valid");
        assert_eq!(config.channel("/a").expect("a").stripes, Some(3));
        assert_eq!(config.channel("/b").expect("b").stripes, None);
        assert_eq!(config.channel("/c").expect("c").stripes, None);
        let bad = r#"{"channels": {"/a": {"stripes": 0}, "/b": {"stripes": 9}, "/c": {"stripes": "many"}}}"#;
        assert_eq!(
            paths(bad),
            [
                r#"channels["/a"].stripes"#,
                r#"channels["/b"].stripes"#,
                r#"channels["/c"].stripes"#,
            ]
        );
        assert_eq!(ChannelSpec::default().with_stripes(20).stripes, Some(8));
    }

    #[test]
    fn integer_targets_mean_cuda_devices() {
        let config =
            ChannelConfig::from_json_str(r#"{"channels": {"/a": {"device_map": {"0": 1}}}}"#)
                .expect("valid");
        let spec = config.channel("/a").expect("defined");
        assert_eq!(spec.device_map.get(Device::cuda(0)), Some(Device::cuda(1)));
        assert!(config
            .channel("/b")
            .expect_err("unknown")
            .to_string()
            .contains("/a"));
    }
}
