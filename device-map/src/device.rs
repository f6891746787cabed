//! [`Device`]: where a tensor lives, and how users spell it.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// The spellings [`Device::from_str`] accepts, quoted in its error messages.
pub const ACCEPTED_FORMS: &str =
    "cpu, cpu:0, cuda, cuda:N, gpu:N, N (a bare index means cuda:N), wgpu, wgpu:N";

/// A place a tensor can live: host memory, a CUDA device, or a wgpu adapter.
///
/// Parsing accepts the spellings PyTorch, MXNet and Wrapyfi users write
/// (`cpu`, `cpu:0`, `cuda`, `cuda:1`, `gpu:1`, `1`, in any letter case and with
/// surrounding whitespace); [`Display`](fmt::Display) always gives the canonical
/// form (`cpu`, `cuda:1`, `wgpu:0`), and so does serde.
///
/// # Examples
///
/// ```
/// use tensorferry_device_map::Device;
///
/// let d: Device = " GPU:1 ".parse()?;
/// assert_eq!(d, Device::cuda(1));
/// assert_eq!(d.to_string(), "cuda:1");
/// assert_eq!("3".parse::<Device>()?, Device::cuda(3));
/// assert!("tpu:0".parse::<Device>().is_err());
/// # Ok::<(), tensorferry_device_map::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Device {
    /// Host memory.
    Cpu,
    /// CUDA device with this ordinal.
    Cuda(u32),
    /// wgpu adapter with this index in the adapter list of the host.
    Wgpu(u32),
}

impl Device {
    /// The host.
    pub const fn cpu() -> Self {
        Device::Cpu
    }

    /// CUDA device `index`.
    pub const fn cuda(index: u32) -> Self {
        Device::Cuda(index)
    }

    /// wgpu adapter `index`.
    pub const fn wgpu(index: u32) -> Self {
        Device::Wgpu(index)
    }

    /// The device's index: 0 for the CPU.
    pub const fn index(self) -> u32 {
        match self {
            Device::Cpu => 0,
            Device::Cuda(i) | Device::Wgpu(i) => i,
        }
    }

    /// The device kind as written in canonical names: `cpu`, `cuda` or `wgpu`.
    pub const fn kind(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
            Device::Wgpu(_) => "wgpu",
        }
    }

    /// True for the host.
    pub const fn is_cpu(self) -> bool {
        matches!(self, Device::Cpu)
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Wgpu(i) => write!(f, "wgpu:{i}"),
        }
    }
}

fn invalid(text: &str, reason: impl Into<String>) -> Error {
    Error::InvalidDevice {
        text: text.to_string(),
        reason: reason.into(),
    }
}

/// Parses a device index: ASCII digits only (no sign, no spaces), fitting in a `u32`.
fn parse_index(text: &str, digits: &str) -> Result<u32> {
    if digits.is_empty() {
        return Err(invalid(text, "the index after `:` is missing"));
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(
            text,
            format!("`{digits}` is not a device index (a non-negative whole number)"),
        ));
    }
    digits.parse::<u32>().map_err(|_| {
        invalid(
            text,
            format!("index `{digits}` is too large (at most {})", u32::MAX),
        )
    })
}

impl FromStr for Device {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        // Canonical names (what the wire carries) parse without allocating.
        if text == "cpu" {
            return Ok(Device::Cpu);
        }
        if let Some(digits) = text.strip_prefix("cuda:") {
            if let Ok(i) = parse_index(text, digits) {
                return Ok(Device::Cuda(i));
            }
        }
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(invalid(text, "the name is empty"));
        }
        let lower = trimmed.to_ascii_lowercase();
        if lower.bytes().all(|b| b.is_ascii_digit()) {
            return parse_index(text, &lower).map(Device::Cuda);
        }
        let (kind, index) = match lower.split_once(':') {
            Some((kind, rest)) => {
                if rest.contains(':') {
                    return Err(invalid(text, "a device name has at most one `:`"));
                }
                (kind, Some(rest))
            }
            None => (lower.as_str(), None),
        };
        match (kind, index) {
            ("cpu", None) => Ok(Device::Cpu),
            ("cpu", Some(digits)) => match parse_index(text, digits)? {
                0 => Ok(Device::Cpu),
                n => Err(invalid(
                    text,
                    format!("there is one host device, `cpu:0`; `cpu:{n}` does not exist"),
                )),
            },
            ("cuda", None) => Ok(Device::Cuda(0)),
            ("cuda" | "gpu", Some(digits)) => parse_index(text, digits).map(Device::Cuda),
            ("wgpu", None) => Ok(Device::Wgpu(0)),
            ("wgpu", Some(digits)) => parse_index(text, digits).map(Device::Wgpu),
            ("gpu", None) => Err(invalid(text, "`gpu` needs an index, as in `gpu:0`")),
            _ => Err(invalid(text, format!("unknown device kind `{kind}`"))),
        }
    }
}

impl TryFrom<&str> for Device {
    type Error = Error;

    fn try_from(text: &str) -> Result<Self> {
        text.parse()
    }
}

impl Serialize for Device {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct DeviceVisitor;

        impl Visitor<'_> for DeviceVisitor {
            type Value = Device;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a device name ({ACCEPTED_FORMS})")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Device, E> {
                v.parse().map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Device, E> {
                u32::try_from(v)
                    .map(Device::Cuda)
                    .map_err(|_| E::custom(invalid(&v.to_string(), "the index is too large")))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Device, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(invalid(&v.to_string(), "the index is negative")))
                    .and_then(|v| self.visit_u64(v))
            }
        }

        deserializer.deserialize_any(DeviceVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Device {
        text.parse()
            .unwrap_or_else(|e| panic!("`{text}` should parse: {e}"))
    }

    #[test]
    fn accepts_every_documented_spelling() {
        for (text, want) in [
            ("cpu", Device::Cpu),
            ("cpu:0", Device::Cpu),
            ("CPU", Device::Cpu),
            ("  Cpu:0\t", Device::Cpu),
            ("cuda", Device::Cuda(0)),
            ("cuda:0", Device::Cuda(0)),
            ("CUDA:7", Device::Cuda(7)),
            ("gpu:1", Device::Cuda(1)),
            ("GPU:3", Device::Cuda(3)),
            ("1", Device::Cuda(1)),
            (" 12 ", Device::Cuda(12)),
            ("wgpu", Device::Wgpu(0)),
            ("wgpu:2", Device::Wgpu(2)),
            ("WGPU:0", Device::Wgpu(0)),
            ("cuda:4294967295", Device::Cuda(u32::MAX)),
        ] {
            assert_eq!(ok(text), want, "parsing `{text}`");
        }
    }

    #[test]
    fn rejects_other_spellings_naming_the_text_and_the_forms() {
        for text in [
            "tpu:0",
            "cuda:-1",
            "cuda:1:2",
            "cuda:4294967296",
            "99999999999999999999",
            "",
            "   ",
            "cuda:",
            "cuda:+1",
            "cuda: 1",
            "cuda 1",
            "gpu",
            "cpu:1",
            "-1",
            "+1",
            "cuda:1.0",
            "cuda:x",
            ":1",
        ] {
            let err = text.parse::<Device>().expect_err(text);
            let msg = err.to_string();
            assert!(msg.contains(&format!("`{text}`")), "{msg}");
            assert!(msg.contains(ACCEPTED_FORMS), "{msg}");
        }
    }

    #[test]
    fn displays_canonically_and_round_trips() {
        for d in [
            Device::Cpu,
            Device::Cuda(0),
            Device::Cuda(9),
            Device::Wgpu(1),
        ] {
            assert_eq!(ok(&d.to_string()), d);
        }
        assert_eq!(ok("gpu:5").to_string(), "cuda:5");
    }

    #[test]
    fn serde_uses_canonical_names_and_accepts_integers() {
        assert_eq!(
            serde_json::to_string(&Device::Cuda(2)).expect("serialize"),
            "\"cuda:2\""
        );
        let d: Device = serde_json::from_str("\"GPU:4\"").expect("string");
        assert_eq!(d, Device::Cuda(4));
        let d: Device = serde_json::from_str("3").expect("integer");
        assert_eq!(d, Device::Cuda(3));
        assert!(serde_json::from_str::<Device>("-3").is_err());
        assert!(serde_json::from_str::<Device>("\"tpu\"").is_err());
        assert!(serde_json::from_str::<Device>("1.5").is_err());
    }
}
