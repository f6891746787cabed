//! tensorferry: GPU-aware tensor transport.
//!
//! A message is a set of named tensors plus JSON fields; it travels over a
//! named channel, within a process, between processes through shared memory,
//! or between hosts over TCP. Each channel has a device map, validated before
//! anything moves, that says where a tensor sent from one device lands on the
//! receiver.
//!
//! This crate re-exports the three crates that make up the engine:
//!
//! - [`device_map`]: [`Device`], [`DeviceMap`], [`ChannelConfig`], validation and resolution;
//! - [`kernels`]: device runtimes (cpu, cuda, wgpu) and the kernels run where data lives;
//! - [`engine`]: tensors, messages, the wire format, transports and channels.
//!
//! # Examples
//!
//! ```
//! use tensorferry::{ChannelConfig, Device, Inventory};
//!
//! let config = ChannelConfig::from_json_str(
//!     r#"{"channels": {"/camera": {"device_map": {"gpu:1": "cuda:0"}, "fallback": "cpu"}}}"#,
//! )?;
//! let here = Inventory::cpu_only();
//! let landed = config.channel("/camera")?.resolve(Device::cuda(1), &here)?;
//! assert_eq!(landed.target, Device::Cpu);
//! # Ok::<(), tensorferry::device_map::Error>(())
//! ```

pub use tensorferry_device_map as device_map;
pub use tensorferry_engine as engine;
pub use tensorferry_kernels as kernels;

pub use tensorferry_device_map::{
    ChannelConfig, ChannelSpec, Device, DeviceMap, Fallback, Inventory, Pattern,
};
