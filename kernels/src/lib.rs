//! Device runtimes and the kernels tensorferry runs where the data lives.
//!
//! The entry point today is [`runtime::HostReport::probe`]: what this host has
//! (the CPU, CUDA devices through cudarc, wgpu adapters) or why a runtime found
//! nothing, and the [`Inventory`](tensorferry_device_map::Inventory) device maps
//! resolve against. CUDA is loaded at run time, so no build needs the toolkit;
//! with a feature off, its runtime still answers, with the reason.
//!
//! # Examples
//!
//! ```
//! use tensorferry_kernels::runtime::HostReport;
//!
//! let host = HostReport::probe();
//! assert!(host.inventory().contains(tensorferry_device_map::Device::Cpu));
//! if let Some(why) = &host.cuda.unavailable {
//!     println!("no CUDA: {why}");
//! }
//! ```

pub mod cast;
pub mod cpu;
mod dtype;
mod error;
mod layout;
pub mod runtime;

pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use layout::{contiguous_strides, element_count, Dims, Layout};
