//! The host: [`CpuRuntime`], the [`Backend`] of the CPU kernels on
//! [`AlignedBuffer`]s, and [`CpuInfo`], the processor model, cores and memory.

use std::io;

use serde::Serialize;
use tensorferry_device_map::Device;

use super::backend::{self, sealed, Backend, Feed, Packing};
use super::{DeviceBuffer, Uploading};
use crate::cpu::{AlignedBuffer, Checksum};
use crate::error::{Error, Result};
use crate::{DType, Layout};

/// The host as a runtime: [`AlignedBuffer`]s and the [`crate::cpu`]
/// kernels, which every other backend matches bit for bit.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuRuntime;

/// A host buffer of this runtime, or [`Error::WrongDevice`].
fn host<'a>(buf: &'a DeviceBuffer, op: &'static str, what: &'static str) -> Result<&'a [u8]> {
    Ok(buf.on::<AlignedBuffer>(Device::Cpu, op, what)?.as_slice())
}

/// A writable host buffer of this runtime, or [`Error::WrongDevice`].
fn host_mut<'a>(
    buf: &'a mut DeviceBuffer,
    op: &'static str,
    what: &'static str,
) -> Result<&'a mut [u8]> {
    Ok(buf
        .on_mut::<AlignedBuffer>(Device::Cpu, op, what)?
        .as_mut_slice())
}

impl sealed::Sealed for CpuRuntime {}

impl Backend for CpuRuntime {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn alloc(&self, len: usize) -> Result<DeviceBuffer> {
        Ok(DeviceBuffer::Host(AlignedBuffer::zeroed(len)))
    }

    fn write(&self, dst: &mut DeviceBuffer, offset: usize, src: &[u8]) -> Result<()> {
        let dst = host_mut(dst, "write", "destination")?;
        let at = backend::range("write", offset, src.len(), dst.len())?;
        dst[at].copy_from_slice(src);
        Ok(())
    }

    fn upload(&self, bytes: &[u8]) -> Result<DeviceBuffer> {
        Ok(DeviceBuffer::Host(AlignedBuffer::copy_from(bytes)))
    }

    fn begin_upload(&self, len: usize) -> Result<Uploading> {
        let feed = HostFeed {
            buf: AlignedBuffer::zeroed(len),
            at: 0,
        };
        Ok(Uploading::new(Device::Cpu, Box::new(feed)))
    }

    fn overlaps_upload(&self, _len: usize) -> bool {
        false
    }

    fn download_range(&self, src: &DeviceBuffer, offset: usize, out: &mut [u8]) -> Result<()> {
        let src = host(src, "download", "source")?;
        let at = backend::range("download", offset, out.len(), src.len())?;
        out.copy_from_slice(&src[at]);
        Ok(())
    }

    fn download_to(
        &self,
        src: &DeviceBuffer,
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<()> {
        let src = host(src, "download_to", "source")?;
        if src.is_empty() {
            return Ok(());
        }
        backend::to_sink(sink, src)
    }

    fn copy(&self, src: &DeviceBuffer, dst: &mut DeviceBuffer) -> Result<()> {
        let src = host(src, "copy", "source")?;
        let dst = host_mut(dst, "copy", "destination")?;
        backend::same_len(src.len(), dst.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }

    fn cast(
        &self,
        src: &DeviceBuffer,
        from: DType,
        dst: &mut DeviceBuffer,
        to: DType,
    ) -> Result<()> {
        let src = host(src, "cast", "source")?;
        crate::cpu::cast(src, from, host_mut(dst, "cast", "destination")?, to)
    }

    fn checksum(&self, buf: &DeviceBuffer) -> Result<Checksum> {
        Ok(crate::cpu::checksum(host(buf, "checksum", "input")?))
    }

    fn pack(
        &self,
        way: Packing,
        src: &DeviceBuffer,
        elem_bytes: usize,
        layout: &Layout,
        dst: &mut DeviceBuffer,
    ) -> Result<()> {
        let src = host(src, way.name(), "source")?;
        let dst = host_mut(dst, way.name(), "destination")?;
        match way {
            Packing::Pack => crate::cpu::pack(src, elem_bytes, layout, dst),
            Packing::Unpack => crate::cpu::unpack(src, elem_bytes, layout, dst),
        }
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// The CPU's upload fed piece by piece: the space is the rest of the
/// destination buffer itself.
#[derive(Debug)]
struct HostFeed {
    buf: AlignedBuffer,
    at: usize,
}

impl Feed for HostFeed {
    fn len(&self) -> usize {
        self.buf.len()
    }

    fn position(&self) -> usize {
        self.at
    }

    fn space(&mut self) -> Result<&mut [u8]> {
        Ok(&mut self.buf.as_mut_slice()[self.at..])
    }

    fn advance(&mut self, n: usize) -> Result<()> {
        let left = self.buf.len() - self.at;
        if n > left {
            return Err(Error::SizeMismatch {
                op: "upload: advance",
                what: "space left in the buffer",
                expected: n,
                actual: left,
            });
        }
        self.at += n;
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<DeviceBuffer> {
        Ok(DeviceBuffer::Host(self.buf))
    }
}

/// Facts about the host processor and memory.
#[derive(Debug, Clone, Serialize)]
pub struct CpuInfo {
    /// The processor model, or `unknown`.
    pub model: String,
    /// Hardware threads this process may use.
    pub cores: usize,
    /// Total memory in bytes, when the platform says.
    pub memory_bytes: Option<u64>,
}

impl CpuInfo {
    /// Reads the host's facts; fields it cannot read are `unknown` or `None`.
    pub fn probe() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| {
                let (key, value) = l.split_once(':')?;
                matches!(key.trim(), "model name" | "Model" | "Hardware")
                    .then(|| value.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_bytes = meminfo.lines().find_map(|l| {
            let rest = l.strip_prefix("MemTotal:")?;
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            kib.checked_mul(1024)
        });
        Self {
            model,
            cores,
            memory_bytes,
        }
    }
}
