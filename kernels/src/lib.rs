//! Device runtimes and the kernels tensorferry runs where the data lives.
//!
//! The main type is [`runtime::Runtime`]: one device (`cpu`, `cuda:N` or
//! `wgpu:N`) that allocates [`runtime::DeviceBuffer`]s, moves bytes to and
//! from them, and runs the three kernels a transport needs on them —
//! [`cast`] between dtypes (f32 sent as bf16 on the wire), the
//! [checksum](cpu::checksum) of `docs/wire-format.md`, and
//! [packing](cpu::pack) a strided view into contiguous bytes and back. The
//! CPU kernels in [`cpu`] are the reference; the CUDA kernels (compiled at run
//! time by NVRTC) and the WGSL kernels compute the same bits for every input.
//!
//! Its neighbours: [`runtime::HostReport::probe`] says what this host has (the
//! CPU, CUDA devices through cudarc, wgpu adapters) or why a runtime found
//! nothing, and gives the [`Inventory`](tensorferry_device_map::Inventory)
//! device maps resolve against; [`DType`] and [`Layout`] describe elements
//! and strided views. CUDA is loaded at run time, so no build needs the
//! toolkit; with a feature off, its runtime still exists and answers with the
//! reason.
//!
//! # Examples
//!
//! ```
//! use tensorferry_device_map::Device;
//! use tensorferry_kernels::runtime::{HostReport, Runtime};
//! use tensorferry_kernels::{cpu, DType};
//!
//! let host = HostReport::probe();
//! assert!(host.inventory().contains(Device::Cpu));
//! if let Some(why) = &host.cuda.unavailable {
//!     println!("no CUDA: {why}");
//! }
//!
//! // The first wgpu adapter if there is one, else the CPU: same calls, same bits.
//! let rt = Runtime::open(Device::wgpu(0)).unwrap_or(Runtime::Cpu);
//! let values: Vec<u8> = [1.0f32, 0.1, -3.5].iter().flat_map(|v| v.to_le_bytes()).collect();
//! let src = rt.upload(&values)?;
//! let mut bf16 = rt.alloc(6)?;
//! rt.cast(&src, DType::F32, &mut bf16, DType::BF16)?;
//! assert_eq!(rt.to_vec(&bf16)?, [0x80, 0x3f, 0xcd, 0x3d, 0x60, 0xc0]);
//! assert_eq!(rt.checksum(&src)?, cpu::checksum(&values));
//! # Ok::<(), tensorferry_kernels::Error>(())
//! ```

// Library output goes through `tracing`; only tests print (their `SKIP:` lines).
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

pub mod cast;
pub mod cpu;
mod dtype;
mod error;
mod layout;
pub mod runtime;

pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use layout::{contiguous_strides, element_count, Dims, Layout};
