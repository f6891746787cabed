//! [`check`]: a whole file validated and resolved against an inventory, as
//! `tensorferry check-map` prints it.

use serde_json::{json, Map, Value};

use crate::config::{key_path, ChannelConfig, ChannelSpec};
use crate::device::Device;
use crate::error::{Error, Located};
use crate::map::DEFAULT_KEY;
use crate::resolve::{Inventory, Resolved};

/// One channel's resolved table.
#[derive(Debug)]
pub struct ChannelReport {
    /// The channel name.
    pub name: String,
    /// The channel's settings.
    pub spec: ChannelSpec,
    /// Every source named in the map, then every device of the inventory, each
    /// once, with where its tensors land. Sources that fail to resolve are in
    /// [`CheckReport::errors`] instead.
    pub resolved: Vec<(Device, Resolved)>,
}

/// Everything `check-map` reports about a file: every error with its place and
/// each valid channel's resolved table.
#[derive(Debug)]
pub struct CheckReport {
    /// Errors in file order; empty when the file is valid for this inventory.
    pub errors: Vec<Located>,
    /// The channels that parsed, in file order.
    pub channels: Vec<ChannelReport>,
    /// The inventory resolved against.
    pub inventory: Inventory,
}

impl CheckReport {
    /// True when the file has no error.
    pub fn is_valid(&self) -> bool {
        self.errors.is_empty()
    }

    /// The report as `{"valid", "errors": [{"channel", "path", "message"}],
    /// "channels": {NAME: {"pattern", "fallback", "resolved": {SOURCE: {"target", "reason", "detail"}}}}, "inventory"}`.
    pub fn to_json(&self) -> Value {
        let errors: Vec<Value> = self
            .errors
            .iter()
            .map(|e| json!({"channel": e.channel, "path": e.path, "message": e.error.to_string()}))
            .collect();
        let mut channels = Map::new();
        for c in &self.channels {
            let mut resolved = Map::new();
            for (source, r) in &c.resolved {
                resolved.insert(
                    source.to_string(),
                    json!({"target": r.target, "reason": r.reason.code(), "detail": r.reason.to_string()}),
                );
            }
            channels.insert(
                c.name.clone(),
                json!({"pattern": c.spec.pattern.as_str(), "fallback": c.spec.fallback.as_str(), "resolved": resolved}),
            );
        }
        json!({
            "valid": self.is_valid(),
            "errors": errors,
            "channels": channels,
            "inventory": self.inventory.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
        })
    }
}

/// Validates configuration text and resolves every channel against `inventory`:
/// each source named in a map and each device the inventory has.
///
/// # Examples
///
/// ```
/// use tensorferry_device_map::{check, Device, Inventory};
///
/// let text = r#"{"channels": {"/a": {"device_map": {"cuda:0": "cuda:1"}}}}"#;
/// let report = check(text, &"cuda:0,cuda:1".parse::<Inventory>()?);
/// assert!(report.is_valid());
/// assert_eq!(report.channels[0].resolved[0].1.target, Device::cuda(1));
///
/// let report = check(text, &Inventory::cpu_only());
/// assert!(report.errors[0].path.ends_with(r#"device_map["cuda:0"]"#));
/// # Ok::<(), tensorferry_device_map::Error>(())
/// ```
pub fn check(text: &str, inventory: &Inventory) -> CheckReport {
    let parsed = ChannelConfig::parse(text);
    let mut errors = parsed.errors;
    let mut channels = Vec::new();
    for (name, spec) in parsed.config.iter() {
        let base = format!("{}.device_map", key_path("channels", name));
        let mut sources: Vec<Device> = spec.device_map.entries().map(|e| e.source).collect();
        let unlisted: Vec<Device> = inventory.iter().filter(|d| !sources.contains(d)).collect();
        sources.extend(unlisted);
        let mut resolved = Vec::new();
        for source in sources {
            match spec.resolve(source, inventory) {
                Ok(r) => resolved.push((source, r)),
                Err(error) => {
                    let key = match spec.device_map.entry(source) {
                        Some(e) => e.source_text.clone(),
                        None if spec.device_map.default_target().is_some() => {
                            DEFAULT_KEY.to_string()
                        }
                        None => source.to_string(),
                    };
                    let path = key_path(&base, &key);
                    // A missing default target fails for every unlisted source: say it once.
                    if errors.iter().any(|e| e.path == path) {
                        continue;
                    }
                    errors.push(Located {
                        channel: Some(name.to_string()),
                        path,
                        error,
                    });
                }
            }
        }
        channels.push(ChannelReport {
            name: name.to_string(),
            spec: spec.clone(),
            resolved,
        });
    }
    CheckReport {
        errors,
        channels,
        inventory: inventory.clone(),
    }
}

impl From<CheckReport> for Result<ChannelConfig, Error> {
    fn from(report: CheckReport) -> Self {
        if report.errors.is_empty() {
            let mut config = ChannelConfig::new();
            for c in report.channels {
                config.insert(c.name, c.spec)?;
            }
            Ok(config)
        } else {
            Err(Error::Invalid {
                errors: report.errors,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{"channels": {"/notify/exchange": {"pattern": "pubsub",
        "device_map": {"cuda:0": "cuda:1", "gpu:1": "cuda:0", "cuda:3": "cpu", "default": "cpu"},
        "fallback": "wgpu"}}}"#;

    #[test]
    fn resolves_map_sources_and_inventory_devices_with_reasons() {
        let inv: Inventory = "cpu,cuda:0,cuda:1,cuda:2,cuda:3,wgpu:0"
            .parse()
            .expect("inv");
        let report = check(EXAMPLE, &inv);
        assert!(report.is_valid(), "{:?}", report.errors);
        let json = report.to_json();
        let r = &json["channels"]["/notify/exchange"]["resolved"];
        assert_eq!(r["cuda:0"]["target"], "cuda:1");
        assert_eq!(r["cuda:1"]["target"], "cuda:0");
        assert_eq!(r["cuda:1"]["reason"], "explicit");
        assert_eq!(r["cuda:3"]["target"], "cpu");
        assert_eq!(r["cuda:2"]["reason"], "default");
        assert_eq!(r["wgpu:0"]["target"], "cpu");
        assert_eq!(r["cpu"]["reason"], "default");
        assert_eq!(json["valid"], true);
    }

    #[test]
    fn missing_targets_are_errors_at_their_entry_and_a_missing_default_is_reported_once() {
        let text =
            r#"{"channels": {"/a": {"device_map": {"cuda:0": "cuda:1", "default": "cuda:7"}}}}"#;
        let report = check(text, &"cuda:0,cuda:2,cuda:3".parse().expect("inv"));
        let paths: Vec<_> = report.errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                r#"channels["/a"].device_map["cuda:0"]"#,
                r#"channels["/a"].device_map["default"]"#
            ]
        );
        let json = report.to_json();
        assert_eq!(json["valid"], false);
        assert_eq!(json["errors"][0]["channel"], "/a");
        assert!(json["errors"][1]["message"]
            .as_str()
            .expect("message")
            .contains("cuda:7"));
        let config: Result<ChannelConfig, Error> = report.into();
        assert!(config.is_err());
    }

    #[test]
    fn fallback_wgpu_lands_on_the_adapter() {
        let report = check(EXAMPLE, &"wgpu:0".parse().expect("inv"));
        assert!(report.is_valid(), "{:?}", report.errors);
        let json = report.to_json();
        let r = &json["channels"]["/notify/exchange"]["resolved"];
        assert_eq!(r["cuda:0"]["target"], "wgpu:0");
        assert_eq!(r["cuda:0"]["reason"], "fallback_wgpu");
    }
}
