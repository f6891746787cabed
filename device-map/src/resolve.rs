//! Resolution of a channel's map against the devices a host really has.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::map::DeviceMap;

/// The devices a host has. The CPU is always present.
///
/// The kernels crate probes the real host; a stated inventory (`"cpu,cuda:0,wgpu:0"`)
/// checks a configuration meant for another machine.
///
/// # Examples
///
/// ```
/// use tensorferry_device_map::{Device, Inventory};
///
/// let inv: Inventory = "cuda:0, gpu:1".parse()?;
/// assert!(inv.contains(Device::Cpu));
/// assert!(inv.contains(Device::cuda(1)));
/// assert_eq!(inv.to_string(), "cpu, cuda:0, cuda:1");
/// # Ok::<(), tensorferry_device_map::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    devices: BTreeSet<Device>,
}

impl Default for Inventory {
    fn default() -> Self {
        Self::cpu_only()
    }
}

impl Inventory {
    /// A host with the CPU alone.
    pub fn cpu_only() -> Self {
        Self {
            devices: BTreeSet::from([Device::Cpu]),
        }
    }

    /// A host with these devices and the CPU.
    pub fn new(devices: impl IntoIterator<Item = Device>) -> Self {
        let mut inv = Self::cpu_only();
        inv.devices.extend(devices);
        inv
    }

    /// Adds a device.
    pub fn insert(&mut self, device: Device) {
        self.devices.insert(device);
    }

    /// True when the host has `device`.
    pub fn contains(&self, device: Device) -> bool {
        self.devices.contains(&device)
    }

    /// The devices, CPU first, then CUDA, then wgpu, each by index.
    pub fn iter(&self) -> impl Iterator<Item = Device> + '_ {
        self.devices.iter().copied()
    }
}

impl fmt::Display for Inventory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.devices.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Parses a comma-separated list of devices in any accepted spelling.
impl FromStr for Inventory {
    type Err = Error;

    fn from_str(list: &str) -> Result<Self> {
        let mut inv = Self::cpu_only();
        for item in list.split(',').filter(|s| !s.trim().is_empty()) {
            inv.insert(item.parse()?);
        }
        Ok(inv)
    }
}

/// What a channel does when a target device does not exist on the receiving host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Reject the message, naming the missing device. Nothing is half-delivered.
    #[default]
    Error,
    /// Deliver to host memory.
    Cpu,
    /// Deliver to `wgpu:N` for a missing `cuda:N` or `wgpu:N` (else `wgpu:0`);
    /// to the CPU when the host has no wgpu adapter at all.
    Wgpu,
}

impl Fallback {
    /// The name used in configuration files.
    pub const fn as_str(self) -> &'static str {
        match self {
            Fallback::Error => "error",
            Fallback::Cpu => "cpu",
            Fallback::Wgpu => "wgpu",
        }
    }

    /// The names accepted in configuration files.
    pub const EXPECTED: &'static str = "\"error\", \"cpu\" or \"wgpu\"";
}

impl FromStr for Fallback {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "error" => Ok(Fallback::Error),
            "cpu" => Ok(Fallback::Cpu),
            "wgpu" => Ok(Fallback::Wgpu),
            _ => Err(Error::InvalidValue {
                value: s.to_string(),
                expected: Self::EXPECTED,
            }),
        }
    }
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which rule decided where a source's tensors land.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reason {
    /// The map lists the source; `entry` is its key as written.
    Explicit {
        /// The key as written in the map.
        entry: String,
    },
    /// The map's `default` target.
    Default,
    /// The map neither lists the source nor has a default, and the host has the same device.
    SameDevice,
    /// The wanted device is missing; the `wgpu` fallback chose an adapter.
    FallbackWgpu {
        /// The device the map asked for.
        wanted: Device,
    },
    /// The wanted device is missing; the tensor lands in host memory.
    FallbackCpu {
        /// The device the map asked for.
        wanted: Device,
        /// The channel's policy (`cpu`, or `wgpu` on a host without adapters).
        policy: Fallback,
    },
}

impl Reason {
    /// A short, stable tag: `explicit`, `default`, `same_device`, `fallback_wgpu`, `fallback_cpu`.
    pub const fn code(&self) -> &'static str {
        match self {
            Reason::Explicit { .. } => "explicit",
            Reason::Default => "default",
            Reason::SameDevice => "same_device",
            Reason::FallbackWgpu { .. } => "fallback_wgpu",
            Reason::FallbackCpu { .. } => "fallback_cpu",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Explicit { entry } => write!(f, "explicit entry \"{entry}\""),
            Reason::Default => f.write_str("the map's default"),
            Reason::SameDevice => {
                f.write_str("not in the map and no default: kept on the same device")
            }
            Reason::FallbackWgpu { wanted } => {
                write!(f, "{wanted} is not on this host: fallback to wgpu")
            }
            Reason::FallbackCpu {
                wanted,
                policy: Fallback::Wgpu,
            } => write!(
                f,
                "{wanted} is not on this host and it has no wgpu adapter: fallback to cpu"
            ),
            Reason::FallbackCpu { wanted, .. } => {
                write!(f, "{wanted} is not on this host: fallback to cpu")
            }
        }
    }
}

/// Where a source device's tensors land, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The device the tensors land on; the host has it.
    pub target: Device,
    /// The rule that chose it.
    pub reason: Reason,
}

/// Resolves `source` through `map` against `inventory`, applying `fallback` when
/// the wanted device is missing.
///
/// # Errors
///
/// [`Error::MissingDevice`] when the wanted device is missing and `fallback` is
/// [`Fallback::Error`]; the message lists what the host has.
pub fn resolve(
    map: &DeviceMap,
    fallback: Fallback,
    source: Device,
    inventory: &Inventory,
) -> Result<Resolved> {
    let (wanted, reason) = match (map.entry(source), map.default_target()) {
        (Some(e), _) => (
            e.target,
            Reason::Explicit {
                entry: e.source_text.clone(),
            },
        ),
        (None, Some(d)) => (d, Reason::Default),
        (None, None) => (source, Reason::SameDevice),
    };
    if inventory.contains(wanted) {
        return Ok(Resolved {
            target: wanted,
            reason,
        });
    }
    match fallback {
        Fallback::Error => Err(Error::MissingDevice {
            wanted,
            source_device: source,
            available: inventory.to_string(),
        }),
        Fallback::Cpu => Ok(Resolved {
            target: Device::Cpu,
            reason: Reason::FallbackCpu {
                wanted,
                policy: fallback,
            },
        }),
        Fallback::Wgpu => {
            let same_index = Device::Wgpu(wanted.index());
            let target = [same_index, Device::Wgpu(0)]
                .into_iter()
                .find(|d| inventory.contains(*d));
            Ok(match target {
                Some(target) => Resolved {
                    target,
                    reason: Reason::FallbackWgpu { wanted },
                },
                None => Resolved {
                    target: Device::Cpu,
                    reason: Reason::FallbackCpu {
                        wanted,
                        policy: fallback,
                    },
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(list: &str) -> Inventory {
        list.parse().expect("inventory")
    }

    fn map(entries: &[(&str, &str)]) -> DeviceMap {
        entries
            .iter()
            .fold(DeviceMap::builder(), |b, (k, v)| b.entry(*k, *v))
            .build()
            .expect("valid map")
    }

    #[test]
    fn explicit_entries_win_then_default_then_same_device() {
        let m = map(&[
            ("cuda:0", "cuda:1"),
            ("gpu:1", "cuda:0"),
            ("cuda:3", "cpu"),
            ("default", "cpu"),
        ]);
        let host = inv("cuda:0,cuda:1,cuda:2,cuda:3");
        let r = resolve(&m, Fallback::Error, Device::cuda(1), &host).expect("explicit");
        assert_eq!(r.target, Device::cuda(0));
        assert_eq!(
            r.reason,
            Reason::Explicit {
                entry: "gpu:1".into()
            }
        );
        let r = resolve(&m, Fallback::Error, Device::cuda(2), &host).expect("default");
        assert_eq!((r.target, r.reason), (Device::Cpu, Reason::Default));

        let no_default = map(&[("cuda:0", "cuda:1")]);
        let r = resolve(&no_default, Fallback::Error, Device::cuda(2), &host).expect("same");
        assert_eq!((r.target, r.reason), (Device::cuda(2), Reason::SameDevice));
    }

    #[test]
    fn missing_target_is_an_error_listing_the_host_unless_a_fallback_applies() {
        let m = map(&[("cuda:0", "cuda:1")]);
        let host = inv("cuda:0,wgpu:0");
        let err = resolve(&m, Fallback::Error, Device::cuda(0), &host).expect_err("missing");
        let msg = err.to_string();
        assert!(
            msg.contains("cuda:1") && msg.contains("cpu, cuda:0, wgpu:0"),
            "{msg}"
        );

        let r = resolve(&m, Fallback::Cpu, Device::cuda(0), &host).expect("cpu");
        assert_eq!(r.target, Device::Cpu);
        assert_eq!(r.reason.code(), "fallback_cpu");

        let r = resolve(&m, Fallback::Wgpu, Device::cuda(0), &host).expect("wgpu:0");
        assert_eq!(r.target, Device::wgpu(0));
        let r =
            resolve(&m, Fallback::Wgpu, Device::cuda(0), &inv("wgpu:0,wgpu:1")).expect("wgpu:1");
        assert_eq!(r.target, Device::wgpu(1), "cuda:N prefers wgpu:N");
        let r = resolve(&m, Fallback::Wgpu, Device::cuda(0), &inv("")).expect("cpu last");
        assert_eq!(r.target, Device::Cpu);
        assert_eq!(
            r.reason,
            Reason::FallbackCpu {
                wanted: Device::cuda(1),
                policy: Fallback::Wgpu
            }
        );
    }

    #[test]
    fn unlisted_source_missing_on_host_takes_the_fallback() {
        let empty = DeviceMap::new();
        let err =
            resolve(&empty, Fallback::Error, Device::cuda(5), &inv("cuda:0")).expect_err("missing");
        assert!(matches!(
            err,
            Error::MissingDevice {
                wanted: Device::Cuda(5),
                ..
            }
        ));
        let r = resolve(&empty, Fallback::Wgpu, Device::cuda(5), &inv("wgpu:0")).expect("wgpu");
        assert_eq!(r.target, Device::wgpu(0));
    }

    #[test]
    fn inventory_always_has_the_cpu_and_rejects_bad_names() {
        assert!(inv("").contains(Device::Cpu));
        assert_eq!(inv("wgpu:0, 1,cpu").to_string(), "cpu, cuda:1, wgpu:0");
        assert!("cuda:0,tpu".parse::<Inventory>().is_err());
    }
}
