//! [`DeviceMap`]: the source → target table of a channel.

use std::collections::BTreeMap;

use crate::device::Device;
use crate::error::{Error, Result};

/// One `source: target` entry of a [`DeviceMap`], with the spellings the user wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The canonical source device.
    pub source: Device,
    /// The canonical target device.
    pub target: Device,
    /// The key as written (`"gpu:1"`), for messages that point back at the file.
    pub source_text: String,
}

/// The key that names the target of every source the map does not list.
pub const DEFAULT_KEY: &str = "default";

/// Whether a map key is the `default` key (any letter case, surrounding whitespace ignored).
pub fn is_default_key(key: &str) -> bool {
    key.trim().eq_ignore_ascii_case(DEFAULT_KEY)
}

/// A validated source → target table, plus an optional `default` target for
/// sources it does not list.
///
/// Validation works on canonical devices: `"gpu:1"`, `"cuda:1"` and `"1"` are one
/// source. Listing a device twice with the same target is accepted; with two
/// different targets it is an [`Error::ConflictingTargets`] naming both entries.
///
/// # Examples
///
/// ```
/// use tensorferry_device_map::{Device, DeviceMap};
///
/// let map = DeviceMap::builder()
///     .entry("cuda:0", "cuda:1")
///     .entry("gpu:1", "cuda:0")
///     .default_target("cpu")
///     .build()?;
/// assert_eq!(map.get(Device::cuda(1)), Some(Device::cuda(0)));
/// assert_eq!(map.default_target(), Some(Device::Cpu));
///
/// // One device, two targets, under two spellings: rejected.
/// let err = DeviceMap::builder().entry("cuda:1", "cpu").entry("GPU:1", "cuda:0").build();
/// assert!(err.is_err());
/// # Ok::<(), tensorferry_device_map::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct DeviceMap {
    entries: BTreeMap<Device, Entry>,
    /// Sources in the order the user listed them, so messages call the earlier entry "first".
    order: Vec<Device>,
    default: Option<Device>,
}

/// Collects entries for a [`DeviceMap`]; [`build`](DeviceMapBuilder::build) validates them all at once.
#[derive(Debug, Clone, Default)]
pub struct DeviceMapBuilder {
    raw: Vec<(String, String)>,
}

impl DeviceMapBuilder {
    /// Adds `source: target`, both in any accepted spelling. A `source` of
    /// `"default"` sets the default target.
    pub fn entry(mut self, source: impl Into<String>, target: impl Into<String>) -> Self {
        self.raw.push((source.into(), target.into()));
        self
    }

    /// Sets the target of every source the map does not list.
    pub fn default_target(self, target: impl Into<String>) -> Self {
        self.entry(DEFAULT_KEY, target)
    }

    /// Validates every entry and builds the map.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] listing every bad entry with its key (`["gpu:1"]`):
    /// unparseable devices and sources that reach two different targets.
    pub fn build(self) -> Result<DeviceMap> {
        let (map, errors) = DeviceMap::from_raw(self.raw.into_iter().map(|(k, v)| (k, Ok(v))));
        if errors.is_empty() {
            Ok(map)
        } else {
            Err(Error::Invalid {
                errors: errors
                    .into_iter()
                    .map(|(key, error)| crate::Located {
                        channel: None,
                        path: crate::config::key_path("", &key),
                        error,
                    })
                    .collect(),
            })
        }
    }
}

/// Two maps are equal when they send every device to the same place, however
/// their entries were spelt or ordered.
impl PartialEq for DeviceMap {
    fn eq(&self, other: &Self) -> bool {
        self.default == other.default
            && self.entries.len() == other.entries.len()
            && self
                .entries
                .iter()
                .all(|(source, e)| other.get(*source) == Some(e.target))
    }
}

impl Eq for DeviceMap {}

impl DeviceMap {
    /// An empty map: every device stays where it is.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a map from string entries.
    pub fn builder() -> DeviceMapBuilder {
        DeviceMapBuilder::default()
    }

    /// Builds a map from `(key, target)` pairs in file order, keeping every valid
    /// entry and returning the errors of the others, each with its key as written.
    /// A target is `Err` when the caller already found it malformed.
    pub(crate) fn from_raw(
        raw: impl IntoIterator<Item = (String, Result<String>)>,
    ) -> (DeviceMap, Vec<(String, Error)>) {
        let mut map = DeviceMap::default();
        let mut default_text: Option<String> = None;
        let mut errors = Vec::new();
        for (key, target) in raw {
            let key = key.as_str();
            let target = match target.and_then(|t| t.parse::<Device>()) {
                Ok(t) => t,
                Err(e) => {
                    errors.push((key.to_string(), e));
                    continue;
                }
            };
            if is_default_key(key) {
                match (map.default, &default_text) {
                    (Some(old), Some(first)) if old != target => errors.push((
                        key.to_string(),
                        Error::ConflictingDefaults {
                            first: first.clone(),
                            second: key.to_string(),
                            a: old,
                            b: target,
                        },
                    )),
                    _ => {
                        map.default = Some(target);
                        default_text.get_or_insert_with(|| key.to_string());
                    }
                }
                continue;
            }
            let source = match key.parse::<Device>() {
                Ok(s) => s,
                Err(e) => {
                    errors.push((key.to_string(), e));
                    continue;
                }
            };
            match map.entries.get(&source) {
                Some(first) if first.target != target => errors.push((
                    key.to_string(),
                    Error::ConflictingTargets {
                        first: first.source_text.clone(),
                        second: key.to_string(),
                        device: source,
                        a: first.target,
                        b: target,
                    },
                )),
                Some(_) => {}
                None => {
                    map.order.push(source);
                    map.entries.insert(
                        source,
                        Entry {
                            source,
                            target,
                            source_text: key.to_string(),
                        },
                    );
                }
            }
        }
        (map, errors)
    }

    /// The explicit target of `source`, if the map lists it.
    pub fn get(&self, source: Device) -> Option<Device> {
        self.entries.get(&source).map(|e| e.target)
    }

    /// The explicit entry for `source`, with its spelling.
    pub fn entry(&self, source: Device) -> Option<&Entry> {
        self.entries.get(&source)
    }

    /// The target of sources the map does not list.
    pub fn default_target(&self) -> Option<Device> {
        self.default
    }

    /// The explicit entries, ordered by source device.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Number of explicit entries (the default not counted).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the map has no explicit entry and no default.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.default.is_none()
    }

    /// Checks that replies can travel back: no two sources share a target and
    /// there is no `default`. Returns each offending key as written with its error.
    pub(crate) fn reversibility_errors(&self) -> Vec<(String, Error)> {
        let mut errors = Vec::new();
        if let Some(target) = self.default {
            errors.push((
                DEFAULT_KEY.to_string(),
                Error::DefaultNotReversible { target },
            ));
        }
        let mut by_target: BTreeMap<Device, &Entry> = BTreeMap::new();
        for entry in self.entries_in_file_order() {
            if let Some(first) = by_target.get(&entry.target) {
                errors.push((
                    entry.source_text.clone(),
                    Error::ManyToOne {
                        first: first.source_text.clone(),
                        second: entry.source_text.clone(),
                        target: entry.target,
                    },
                ));
            } else {
                by_target.insert(entry.target, entry);
            }
        }
        errors
    }

    fn entries_in_file_order(&self) -> impl Iterator<Item = &Entry> {
        self.order.iter().filter_map(|d| self.entries.get(d))
    }

    /// The map replies use: every `source: target` becomes `target: source`.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] when two sources share a target ([`Error::ManyToOne`])
    /// or the map has a `default` ([`Error::DefaultNotReversible`]): a reply
    /// could not tell which device to go back to.
    ///
    /// # Examples
    ///
    /// ```
    /// use tensorferry_device_map::{Device, DeviceMap};
    ///
    /// let map = DeviceMap::builder().entry("cuda:0", "cuda:1").entry("cpu", "cuda:0").build()?;
    /// let back = map.reverse()?;
    /// assert_eq!(back.get(Device::cuda(1)), Some(Device::cuda(0)));
    /// assert_eq!(back.get(Device::cuda(0)), Some(Device::Cpu));
    /// # Ok::<(), tensorferry_device_map::Error>(())
    /// ```
    pub fn reverse(&self) -> Result<DeviceMap> {
        let errors = self.reversibility_errors();
        if !errors.is_empty() {
            return Err(Error::Invalid {
                errors: errors
                    .into_iter()
                    .map(|(key, error)| crate::Located {
                        channel: None,
                        path: crate::config::key_path("", &key),
                        error,
                    })
                    .collect(),
            });
        }
        let mut back = DeviceMap::default();
        for e in self.entries_in_file_order() {
            back.order.push(e.target);
            back.entries.insert(
                e.target,
                Entry {
                    source: e.target,
                    target: e.source,
                    source_text: e.target.to_string(),
                },
            );
        }
        Ok(back)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(entries: &[(&str, &str)]) -> Result<DeviceMap> {
        entries
            .iter()
            .fold(DeviceMap::builder(), |b, (k, v)| b.entry(*k, *v))
            .build()
    }

    #[test]
    fn rejects_two_targets_for_one_device_under_any_spelling() {
        for (a, b) in [
            ("cuda:1", "gpu:1"),
            ("gpu:1", "1"),
            ("CUDA:1", " cuda:1 "),
            ("cuda:1", "cuda:1"),
        ] {
            let err = build(&[(a, "cpu"), (b, "cuda:0")]).expect_err("conflict");
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("`{a}`")) && msg.contains(&format!("`{b}`")),
                "{msg}"
            );
            assert!(msg.contains("cpu") && msg.contains("cuda:0"), "{msg}");
            assert!(matches!(
                err.errors()[0],
                Error::ConflictingTargets {
                    device: Device::Cuda(1),
                    ..
                }
            ));
        }
    }

    #[test]
    fn accepts_one_device_listed_twice_with_one_target() {
        let map =
            build(&[("cuda:1", "cpu"), ("gpu:1", "CPU:0"), ("1", "cpu")]).expect("same target");
        assert_eq!(map.len(), 1);
        assert_eq!(map.get(Device::cuda(1)), Some(Device::Cpu));
        assert_eq!(
            map.entry(Device::cuda(1)).map(|e| e.source_text.as_str()),
            Some("cuda:1")
        );
    }

    #[test]
    fn conflicting_defaults_are_rejected_and_equal_ones_merge() {
        assert!(build(&[("default", "cpu"), ("DEFAULT", "cuda:0")]).is_err());
        let map = build(&[("default", "cpu"), ("Default", "cpu:0")]).expect("same default");
        assert_eq!(map.default_target(), Some(Device::Cpu));
    }

    #[test]
    fn reports_every_bad_entry_at_once() {
        let err = build(&[
            ("tpu:0", "cpu"),
            ("cuda:0", "cuda:-1"),
            ("cuda:2", "cpu"),
            ("gpu:2", "cuda:0"),
        ])
        .expect_err("three errors");
        assert_eq!(err.errors().len(), 3, "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("[\"tpu:0\"]")
                && msg.contains("[\"cuda:0\"]")
                && msg.contains("[\"gpu:2\"]"),
            "{msg}"
        );
    }

    #[test]
    fn reverse_swaps_one_to_one_maps_and_rejects_many_to_one() {
        let map =
            build(&[("cuda:0", "cuda:1"), ("gpu:1", "cuda:0"), ("cuda:3", "cpu")]).expect("valid");
        let back = map.reverse().expect("one to one");
        assert_eq!(back.get(Device::cuda(1)), Some(Device::cuda(0)));
        assert_eq!(back.get(Device::cuda(0)), Some(Device::cuda(1)));
        assert_eq!(back.get(Device::Cpu), Some(Device::cuda(3)));
        assert_eq!(back.reverse().expect("twice"), map);

        let many = build(&[("cuda:0", "cpu"), ("cuda:1", "cpu")]).expect("valid for pubsub");
        let err = many.reverse().expect_err("many to one");
        assert!(
            matches!(
                err.errors()[0],
                Error::ManyToOne {
                    target: Device::Cpu,
                    ..
                }
            ),
            "{err}"
        );

        let with_default =
            build(&[("cuda:0", "cuda:1"), ("default", "cpu")]).expect("valid for pubsub");
        assert!(matches!(
            with_default.reverse().expect_err("default").errors()[0],
            Error::DefaultNotReversible { .. }
        ));
    }
}
