//! Device names, device maps and channel configuration for tensorferry.
//!
//! The main type is [`DeviceMap`]: a channel's source → target table, built with
//! [`DeviceMap::builder`] or read from a configuration file as part of a
//! [`ChannelConfig`] (one [`ChannelSpec`] per channel: pattern, map, fallback).
//! Maps are validated on canonical [`Device`]s, after every spelling (`gpu:1`,
//! `cuda:1`, `1`) is reduced, and resolved against an [`Inventory`] of the
//! devices the receiving host has into a [`Resolved`] target with its
//! [`Reason`]. [`check`] does all of that for a file and collects every error
//! with its place, as `tensorferry check-map` prints it.
//!
//! This crate is pure Rust and links no GPU library.
//!
//! # Examples
//!
//! ```
//! use tensorferry_device_map::{ChannelConfig, Device, Inventory};
//!
//! let config = ChannelConfig::from_json_str(r#"{"channels": {"/notify/exchange": {
//!     "pattern": "pubsub",
//!     "device_map": {"cuda:0": "cuda:1", "gpu:1": "cuda:0", "cuda:3": "cpu", "default": "cpu"},
//!     "fallback": "wgpu"}}}"#)?;
//! let channel = config.channel("/notify/exchange")?;
//!
//! // A host with one CUDA device and one wgpu adapter.
//! let host: Inventory = "cuda:0,wgpu:0".parse()?;
//! let r = channel.resolve(Device::cuda(0), &host)?;
//! assert_eq!(r.target, Device::wgpu(0)); // cuda:1 is missing: the wgpu fallback applies
//! assert_eq!(channel.resolve("gpu:1".parse()?, &host)?.target, Device::cuda(0));
//! # Ok::<(), tensorferry_device_map::Error>(())
//! ```
#![forbid(unsafe_code)]

mod check;
mod config;
mod device;
mod error;
mod map;
mod node;
mod resolve;
pub mod units;

pub use check::{check, ChannelReport, CheckReport};
pub use config::{
    ChannelConfig, ChannelSpec, Overflow, Parsed, Pattern, DEFAULT_QUEUE_DEPTH, MAX_STRIPES,
};
pub use device::{Device, ACCEPTED_FORMS};
pub use error::{Error, Located, Result};
pub use map::{is_default_key, DeviceMap, DeviceMapBuilder, Entry, DEFAULT_KEY};
pub use node::{LimitSettings, NodeSection, SecretSource, TlsSettings};
pub use resolve::{resolve, Fallback, Inventory, Reason, Resolved};
