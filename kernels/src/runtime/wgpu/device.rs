//! The wgpu runtime proper (feature `wgpu`): one logical device per adapter
//! per process, buffers, staging through mapped buffers, the WGSL kernels,
//! each compiled into a pipeline once and cached, and the [`Backend`] they
//! make.
//!
//! Every operation runs inside wgpu error scopes, and an uncaptured-error
//! handler is installed, so a validation or memory error becomes an
//! [`Error::Backend`] instead of wgpu's default panic.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use tensorferry_device_map::Device;

use super::{CAST_WGSL, CHECKSUM_WGSL, PACK_WGSL};
use crate::cast;
use crate::cpu::pack::Plan;
use crate::cpu::{finish_checksum, Checksum, CHECKSUM_BLOCK_BYTES};
use crate::error::{Error, Result};
use crate::runtime::backend::{self, sealed, Backend, Feed, Packing, STEP_BYTES};
use crate::runtime::{lock, DeviceBuffer, PerDevice, Uploading};
use crate::{DType, Layout};

/// Invocations per workgroup in every shader.
const WORKGROUP: u32 = 64;
/// wgpu's alignment for copies and mapped ranges.
const WORD: usize = 4;
/// Largest staging buffer used for one upload or download step.
const STAGING_BYTES: usize = 32 << 20;

fn padded(len: usize) -> u64 {
    (len.div_ceil(WORD) * WORD).max(WORD) as u64
}

/// What every runtime on one adapter shares.
struct DeviceState {
    index: u32,
    device: wgpu::Device,
    queue: wgpu::Queue,
    limits: wgpu::Limits,
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
    /// An error wgpu reported outside any error scope (should not happen;
    /// kept rather than panicking).
    uncaptured: Arc<Mutex<Option<String>>>,
}

impl DeviceState {
    fn get(index: u32) -> Result<Arc<Self>> {
        static DEVICES: PerDevice<DeviceState> = PerDevice::new();
        DEVICES.get_or_open(index, || Self::open(index))
    }

    /// Opens device `index` (called once per device while anything holds it).
    fn open(index: u32) -> Result<Self> {
        let desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        let backends = desc.backends;
        let instance = wgpu::Instance::new(desc);
        let mut adapters = pollster::block_on(instance.enumerate_adapters(backends));
        let count = adapters.len();
        if index as usize >= count {
            return Err(if count == 0 {
                Error::Unavailable {
                    runtime: "wgpu",
                    reason: "no adapter found (install a Vulkan driver, e.g. mesa-vulkan-drivers, or try WGPU_BACKEND=gl)".to_string(),
                }
            } else {
                Error::NoSuchDevice {
                    runtime: "wgpu",
                    index,
                    count,
                }
            });
        }
        let adapter = adapters.swap_remove(index as usize);
        let info = adapter.get_info();
        tracing::debug!(
            device = %Device::wgpu(index),
            adapter = %info.name,
            backend = %info.backend,
            "opening a wgpu adapter"
        );
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("tensorferry"),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| Error::backend("opening the wgpu device", e))?;
        let uncaptured = Arc::new(Mutex::new(None));
        let sink = Arc::clone(&uncaptured);
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            // Kept for the next call to return; said now, as it happens.
            tracing::warn!(device = %Device::wgpu(index), error = %e, "wgpu error outside an error scope");
            let mut slot = lock(&sink);
            if slot.is_none() {
                *slot = Some(e.to_string());
            }
        }));
        Ok(DeviceState {
            index,
            device,
            queue,
            limits,
            pipelines: Mutex::new(HashMap::new()),
            uncaptured,
        })
    }

    /// Runs `f` inside validation and out-of-memory error scopes.
    fn scoped<T>(&self, op: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let memory = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let result = f();
        let oom = pollster::block_on(memory.pop());
        let invalid = pollster::block_on(validation.pop());
        if let Some(e) = oom.or(invalid) {
            return Err(Error::backend(op, e.to_string()));
        }
        if let Some(e) = lock(&self.uncaptured).take() {
            return Err(Error::backend(op, e));
        }
        result
    }

    fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::backend("waiting for the wgpu queue", e))
    }

    /// The pipeline `name`, built from `source()` the first time it is asked for.
    fn pipeline(
        &self,
        name: &str,
        source: impl FnOnce() -> String,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        if let Some(p) = lock(&self.pipelines).get(name) {
            return Ok(Arc::clone(p));
        }
        let pipeline = self.scoped("building a WGSL pipeline", || {
            let module = self
                .device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(name),
                    source: wgpu::ShaderSource::Wgsl(source().into()),
                });
            Ok(self
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(name),
                    layout: None,
                    module: &module,
                    entry_point: Some("main"),
                    compilation_options: Default::default(),
                    cache: None,
                }))
        })?;
        let pipeline = Arc::new(pipeline);
        tracing::debug!(device = %Device::wgpu(self.index), pipeline = name, "built a WGSL pipeline");
        lock(&self.pipelines).insert(name.to_string(), Arc::clone(&pipeline));
        Ok(pipeline)
    }

    fn uniform(&self, words: &[u32]) -> wgpu::Buffer {
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("tensorferry params"),
            size: (words.len() * 4) as u64,
            usage: wgpu::BufferUsages::UNIFORM,
            mapped_at_creation: true,
        });
        if let Ok(mut view) = buffer.get_mapped_range_mut(..) {
            view.copy_from_slice(bytemuck::cast_slice(words));
        }
        buffer.unmap();
        buffer
    }

    /// The largest byte range one storage binding may cover, rounded down to
    /// the binding-offset alignment.
    fn max_binding(&self) -> u64 {
        let align = u64::from(self.limits.min_storage_buffer_offset_alignment).max(256);
        let max = self
            .limits
            .max_storage_buffer_binding_size
            .min(u64::from(u32::MAX));
        max / align * align
    }
}

/// Workgroups covering `units` invocations, as a 2-D grid when one row
/// would exceed the per-dimension limit.
fn workgroups(units: u64) -> (u32, u32) {
    let groups = units.div_ceil(u64::from(WORKGROUP)).max(1);
    let x = groups.min(65_535);
    let y = groups.div_ceil(x);
    (x as u32, y as u32)
}

fn entry(buffer: &wgpu::Buffer, binding: u32, offset: u64, size: u64) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer,
            offset,
            size: wgpu::BufferSize::new(size),
        }),
    }
}

/// A value whose `Send` and `Sync` were proven where it was made, so that a
/// type holding it need not prove them again: wgpu's types nest so deeply
/// that re-checking them inside a larger type (a node holding runtimes, a
/// message holding device tensors) exceeds the compiler's default recursion
/// limit in every crate that uses them.
struct Proven<T>(T);

impl<T: Send + Sync> Proven<T> {
    fn new(value: T) -> Self {
        Self(value)
    }
}

impl<T: Clone + Send + Sync> Clone for Proven<T> {
    fn clone(&self) -> Self {
        Self::new(self.0.clone())
    }
}

impl<T> std::ops::Deref for Proven<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

// SAFETY: the only way to make a `Proven<T>` is `Proven::new`, which requires
// `T: Send + Sync`; it adds no state of its own.
unsafe impl<T> Send for Proven<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Proven<T> {}

/// One wgpu adapter, opened as a device. Cloning shares it.
///
/// Work is submitted to the device's queue in call order; whatever hands
/// bytes to the host waits for it. Its operations are those of [`Backend`].
#[derive(Clone)]
pub struct WgpuRuntime {
    dev: Proven<Arc<DeviceState>>,
}

/// A storage buffer on one wgpu device.
pub struct WgpuBuffer {
    dev: Proven<Arc<DeviceState>>,
    buffer: Proven<wgpu::Buffer>,
    len: usize,
}

impl WgpuBuffer {
    /// Length in bytes (the allocation is padded to a multiple of 4).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `wgpu:N`.
    pub fn device(&self) -> Device {
        Device::wgpu(self.dev.index)
    }

    /// The runtime of the device this buffer lives on.
    pub(crate) fn owner(&self) -> Result<WgpuRuntime> {
        Ok(WgpuRuntime {
            dev: self.dev.clone(),
        })
    }
}

impl fmt::Debug for WgpuRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgpuRuntime(wgpu:{})", self.dev.index)
    }
}

impl fmt::Debug for WgpuBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgpuBuffer(wgpu:{}, {} bytes)", self.dev.index, self.len)
    }
}

fn too_large(op: &'static str, bytes: u64, limit: u64) -> Error {
    Error::Unsupported {
        op,
        backend: "wgpu",
        reason: format!(
            "a buffer of {bytes} bytes exceeds this adapter's limit of {limit} bytes per binding; do it on the CPU or CUDA"
        ),
    }
}

impl WgpuRuntime {
    /// Opens `wgpu:index`, the index-th adapter of the list
    /// [`probe`](super::probe) shows.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] without adapters; [`Error::NoSuchDevice`] for
    /// an index past the list; [`Error::Backend`] when wgpu cannot open the
    /// device.
    pub fn new(index: u32) -> Result<Self> {
        DeviceState::get(index).map(|dev| Self {
            dev: Proven::new(dev),
        })
    }

    /// The adapter: name, backend (`vulkan`, `gl`, …), kind and driver.
    pub fn adapter(&self) -> super::AdapterInfo {
        super::AdapterInfo::new(self.dev.index, self.dev.device.adapter_info())
    }

    fn alloc_buffer(&self, len: usize) -> Result<WgpuBuffer> {
        let size = padded(len);
        if size > self.dev.limits.max_buffer_size {
            return Err(Error::Unsupported {
                op: "alloc",
                backend: "wgpu",
                reason: format!(
                    "{len} bytes exceed this adapter's largest buffer ({} bytes)",
                    self.dev.limits.max_buffer_size
                ),
            });
        }
        let buffer = self.dev.scoped("allocating a wgpu buffer", || {
            Ok(self.dev.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("tensorferry buffer"),
                size,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }))
        })?;
        Ok(WgpuBuffer {
            dev: self.dev.clone(),
            buffer: Proven::new(buffer),
            len,
        })
    }

    /// Copies `src` into `dst` at `offset` through mapped staging buffers.
    fn write_into(&self, dst: &mut WgpuBuffer, offset: usize, src: &[u8]) -> Result<()> {
        backend::range("write", offset, src.len(), dst.len)?;
        if offset % WORD != 0 || (src.len() % WORD != 0 && offset + src.len() != dst.len) {
            return Err(Error::Unsupported {
                op: "write",
                backend: "wgpu",
                reason: format!(
                    "wgpu copies whole 4-byte words: write at offsets that are multiples of 4, in lengths that are multiples of 4 or that reach the buffer's end (got {} bytes at {offset})",
                    src.len()
                ),
            });
        }
        for (i, part) in src.chunks(STAGING_BYTES).enumerate() {
            let size = padded(part.len());
            let at = (offset + i * STAGING_BYTES) as u64;
            self.dev.scoped("uploading to a wgpu buffer", || {
                let staging = self.dev.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("tensorferry upload"),
                    size,
                    usage: wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: true,
                });
                {
                    let mut view = staging
                        .get_mapped_range_mut(..)
                        .map_err(|e| Error::backend("mapping a staging buffer", e.to_string()))?;
                    let mut whole = vec![0u8; size as usize];
                    whole[..part.len()].copy_from_slice(part);
                    view.copy_from_slice(&whole);
                }
                staging.unmap();
                let mut encoder = self.dev.device.create_command_encoder(&Default::default());
                encoder.copy_buffer_to_buffer(&staging, 0, &dst.buffer, at, size);
                self.dev.queue.submit([encoder.finish()]);
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Copies all of `src` into `dst`, on this adapter or another.
    fn copy_buffers(&self, src: &WgpuBuffer, dst: &mut WgpuBuffer) -> Result<()> {
        backend::same_len(src.len, dst.len)?;
        if src.len == 0 {
            return Ok(());
        }
        if src.dev.index == dst.dev.index {
            return self.dev.scoped("copying between wgpu buffers", || {
                let mut encoder = self.dev.device.create_command_encoder(&Default::default());
                encoder.copy_buffer_to_buffer(&src.buffer, 0, &dst.buffer, 0, padded(src.len));
                self.dev.queue.submit([encoder.finish()]);
                Ok(())
            });
        }
        let mut host = vec![0u8; src.len];
        src.owner()?.read(src, 0, &mut host)?;
        dst.owner()?.write_into(dst, 0, &host)
    }

    /// Copies `len` bytes from `buffer` at `offset` (both multiples of 4) to the host.
    fn fetch(&self, buffer: &wgpu::Buffer, offset: u64, len: u64, out: &mut [u8]) -> Result<()> {
        self.dev.scoped("downloading from a wgpu buffer", || {
            let staging = self.dev.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("tensorferry download"),
                size: len,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut encoder = self.dev.device.create_command_encoder(&Default::default());
            encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, len);
            self.dev.queue.submit([encoder.finish()]);
            let (tx, rx) = std::sync::mpsc::channel();
            staging.map_async(wgpu::MapMode::Read, .., move |r| {
                let _ = tx.send(r);
            });
            self.dev.wait()?;
            rx.recv()
                .map_err(|e| Error::backend("mapping a staging buffer", e))?
                .map_err(|e| Error::backend("mapping a staging buffer", e))?;
            {
                let view = staging
                    .get_mapped_range(..)
                    .map_err(|e| Error::backend("mapping a staging buffer", e.to_string()))?;
                out.copy_from_slice(&view[..out.len()]);
            }
            staging.unmap();
            Ok(())
        })
    }

    /// Copies bytes `offset..offset + dst.len()` of `src` to the host, after
    /// the work submitted before it.
    fn read(&self, src: &WgpuBuffer, offset: usize, dst: &mut [u8]) -> Result<()> {
        backend::range("download", offset, dst.len(), src.len)?;
        // Whole words around the range, then the bytes asked for.
        let mut at = 0;
        while at < dst.len() {
            let n = (dst.len() - at).min(STAGING_BYTES);
            let first = offset + at;
            let start = first / WORD * WORD;
            let end = (first + n).div_ceil(WORD) * WORD;
            let mut words = vec![0u8; end - start];
            self.fetch(&src.buffer, start as u64, (end - start) as u64, &mut words)?;
            dst[at..at + n].copy_from_slice(&words[first - start..first - start + n]);
            at += n;
        }
        Ok(())
    }

    /// Records one dispatch of `pipeline` over `units` invocations.
    fn dispatch(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        pipeline: &wgpu::ComputePipeline,
        entries: &[wgpu::BindGroupEntry<'_>],
        units: u64,
    ) {
        let layout = pipeline.get_bind_group_layout(0);
        let group = self
            .dev
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &layout,
                entries,
            });
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: None,
        });
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &group, &[]);
        let (x, y) = workgroups(units);
        pass.dispatch_workgroups(x, y, 1);
    }

    /// Runs the pack kernel `way` between the strided `storage` and the
    /// contiguous `packed` (arguments checked).
    fn run_pack(
        &self,
        way: Packing,
        storage: &WgpuBuffer,
        elem: usize,
        layout: &Layout,
        packed: &WgpuBuffer,
    ) -> Result<()> {
        let op = way.name();
        if packed.len == 0 {
            return Ok(());
        }
        let max = self.dev.max_binding();
        for bytes in [padded(storage.len), padded(packed.len)] {
            if bytes > max {
                return Err(too_large(op, bytes, max));
            }
        }
        let plan = Plan::new(layout);
        let small = |v: usize| {
            u32::try_from(v).map_err(|_| Error::Unsupported {
                op,
                backend: "wgpu",
                reason: format!("the view's size or stride {v} does not fit WGSL's 32-bit indices"),
            })
        };
        let mut dims = Vec::with_capacity(plan.dims.len() * 2);
        for &(n, s) in &plan.dims {
            dims.push(small(n)?);
            dims.push(small(s)?);
        }
        let n = small(layout.numel())?;
        let elem32 = small(elem)?;
        let offset = small(plan.offset)?;
        let words = packed.len.div_ceil(WORD) as u64;
        let whole_words = elem % WORD == 0;
        let name = match (way, whole_words) {
            (Packing::Pack, true) => "pack_words",
            (Packing::Pack, false) => "pack_bytes",
            (Packing::Unpack, true) => "unpack_words",
            (Packing::Unpack, false) => "unpack_bytes",
        };
        let pipeline = self.dev.pipeline(name, || pack_source(name))?;
        self.dev.scoped("running the pack kernel", || {
            let dims_buffer = self.dev.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("tensorferry dims"),
                size: (dims.len() * 4) as u64,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: true,
            });
            if let Ok(mut view) = dims_buffer.get_mapped_range_mut(..) {
                view.copy_from_slice(bytemuck::cast_slice(&dims));
            }
            dims_buffer.unmap();
            let params = self.dev.uniform(&[
                n,
                elem32,
                plan.dims.len() as u32,
                offset,
                words as u32,
                0,
                0,
                0,
            ]);
            let entries = [
                entry(&storage.buffer, 0, 0, padded(storage.len)),
                entry(&packed.buffer, 1, 0, padded(packed.len)),
                entry(&params, 2, 0, 32),
                entry(&dims_buffer, 3, 0, (dims.len() * 4) as u64),
            ];
            let mut encoder = self.dev.device.create_command_encoder(&Default::default());
            self.dispatch(&mut encoder, &pipeline, &entries, words);
            self.dev.queue.submit([encoder.finish()]);
            Ok(())
        })
    }
}

impl sealed::Sealed for WgpuRuntime {}

impl Backend for WgpuRuntime {
    fn device(&self) -> Device {
        Device::wgpu(self.dev.index)
    }

    fn alloc(&self, len: usize) -> Result<DeviceBuffer> {
        self.alloc_buffer(len).map(DeviceBuffer::Wgpu)
    }

    fn write(&self, dst: &mut DeviceBuffer, offset: usize, src: &[u8]) -> Result<()> {
        let dst: &mut WgpuBuffer = dst.on_mut(self.device(), "write", "destination")?;
        self.write_into(dst, offset, src)
    }

    /// Host steps of up to 4 MiB, each written through a mapped staging
    /// buffer once full, its copy submitted without waiting.
    fn begin_upload(&self, len: usize) -> Result<Uploading> {
        let feed = Steps {
            buf: self.alloc_buffer(len)?,
            step: Vec::new(),
            at: 0,
            filled: 0,
            rt: self.clone(),
        };
        Ok(Uploading::new(self.device(), Box::new(feed)))
    }

    /// Past one 4 MiB step: one step's copy runs while the next fills.
    fn overlaps_upload(&self, len: usize) -> bool {
        len > STEP_BYTES
    }

    fn download_range(&self, src: &DeviceBuffer, offset: usize, out: &mut [u8]) -> Result<()> {
        let src: &WgpuBuffer = src.on(self.device(), "download", "source")?;
        self.read(src, offset, out)
    }

    /// Between adapters through the host: they share nothing.
    fn copy(&self, src: &DeviceBuffer, dst: &mut DeviceBuffer) -> Result<()> {
        // Buffers of any adapter, not only this one.
        let src: &WgpuBuffer = src.of_kind(self.device(), "copy", "source")?;
        let dst: &mut WgpuBuffer = dst.of_kind_mut(self.device(), "copy", "destination")?;
        self.copy_buffers(src, dst)
    }

    fn cast(
        &self,
        src: &DeviceBuffer,
        from: DType,
        dst: &mut DeviceBuffer,
        to: DType,
    ) -> Result<()> {
        let src: &WgpuBuffer = src.on(self.device(), "cast", "source")?;
        let dst: &mut WgpuBuffer = dst.on_mut(self.device(), "cast", "destination")?;
        let n = cast::check_sizes(src.len, from, dst.len, to)?;
        if n == 0 {
            return Ok(());
        }
        if from == to {
            return self.copy_buffers(src, dst);
        }
        let (s, d) = (from.size_bytes() as u64, to.size_bytes() as u64);
        let name = format!("cast_{from}_{to}");
        let pipeline = self.dev.pipeline(&name, || cast_source(from, to))?;
        // Chunks of whole 256-element groups, so every binding offset is a
        // multiple of 256 bytes, within the binding-size limit on both sides.
        let max = self.dev.max_binding();
        let chunk = (max / s.max(d)) / 256 * 256;
        let n = n as u64;
        self.dev.scoped("running the cast kernel", || {
            let mut encoder = self.dev.device.create_command_encoder(&Default::default());
            let mut uniforms = Vec::new();
            let mut start = 0u64;
            while start < n {
                let count = chunk.min(n - start);
                let units = if d < 4 {
                    (count * d).div_ceil(4)
                } else {
                    count
                };
                uniforms.push(self.dev.uniform(&[count as u32, units as u32, 0, 0]));
                let params = uniforms.last().expect("just pushed");
                let entries = [
                    entry(&src.buffer, 0, start * s, padded((count * s) as usize)),
                    entry(&dst.buffer, 1, start * d, padded((count * d) as usize)),
                    entry(params, 2, 0, 16),
                ];
                self.dispatch(&mut encoder, &pipeline, &entries, units);
                start += count;
            }
            self.dev.queue.submit([encoder.finish()]);
            Ok(())
        })
    }

    fn checksum(&self, buf: &DeviceBuffer) -> Result<Checksum> {
        let buf: &WgpuBuffer = buf.on(self.device(), "checksum", "input")?;
        let len = buf.len as u64;
        if len == 0 {
            return Ok(finish_checksum(0, 0, 0));
        }
        let pipeline = self
            .dev
            .pipeline("checksum", || CHECKSUM_WGSL.to_string())?;
        let block = CHECKSUM_BLOCK_BYTES as u64;
        let blocks_per_chunk = self.dev.max_binding() / block;
        let total_blocks = len.div_ceil(block);
        let sums = self.dev.scoped("running the checksum kernel", || {
            let sums = self.dev.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("tensorferry checksum sums"),
                size: 8,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let mut encoder = self.dev.device.create_command_encoder(&Default::default());
            let mut uniforms = Vec::new();
            let mut first = 0u64;
            while first < total_blocks {
                let blocks = blocks_per_chunk.min(total_blocks - first);
                let start = first * block;
                let bytes = (len - start).min(blocks * block);
                uniforms.push(
                    self.dev
                        .uniform(&[first as u32, bytes as u32, blocks as u32, 0]),
                );
                let params = uniforms.last().expect("just pushed");
                let entries = [
                    entry(&buf.buffer, 0, start, padded(bytes as usize)),
                    entry(&sums, 1, 0, 8),
                    entry(params, 2, 0, 16),
                ];
                self.dispatch(&mut encoder, &pipeline, &entries, blocks);
                first += blocks;
            }
            self.dev.queue.submit([encoder.finish()]);
            Ok(sums)
        })?;
        let mut out = [0u8; 8];
        self.fetch(&sums, 0, 8, &mut out)?;
        let lo = u32::from_le_bytes([out[0], out[1], out[2], out[3]]);
        let hi = u32::from_le_bytes([out[4], out[5], out[6], out[7]]);
        Ok(finish_checksum(lo, hi, len))
    }

    fn pack(
        &self,
        way: Packing,
        src: &DeviceBuffer,
        elem_bytes: usize,
        layout: &Layout,
        dst: &mut DeviceBuffer,
    ) -> Result<()> {
        let src: &WgpuBuffer = src.on(self.device(), way.name(), "source")?;
        let dst: &WgpuBuffer = dst.on(self.device(), way.name(), "destination")?;
        way.check("wgpu", src.len, elem_bytes, layout, dst.len)?;
        let (storage, packed) = match way {
            Packing::Pack => (src, dst),
            Packing::Unpack => (dst, src),
        };
        self.run_pack(way, storage, elem_bytes, layout, packed)
    }

    fn synchronize(&self) -> Result<()> {
        self.dev.wait()
    }
}

/// wgpu's upload fed piece by piece: a host step of up to 4 MiB, written to
/// the adapter through a mapped staging buffer once full. Nothing waits at
/// the end: later work on the queue runs after the copies, and the staging
/// buffers belong to wgpu, not to the caller.
struct Steps {
    rt: WgpuRuntime,
    buf: WgpuBuffer,
    step: Vec<u8>,
    /// Where the step lands.
    at: usize,
    filled: usize,
}

impl Steps {
    fn cap(&self) -> usize {
        STEP_BYTES.min(self.buf.len - self.at)
    }
}

impl Feed for Steps {
    fn len(&self) -> usize {
        self.buf.len
    }

    fn position(&self) -> usize {
        self.at + self.filled
    }

    fn space(&mut self) -> Result<&mut [u8]> {
        let cap = self.cap();
        if self.step.len() < cap {
            self.step.resize(cap, 0);
        }
        Ok(&mut self.step[self.filled..cap])
    }

    fn advance(&mut self, n: usize) -> Result<()> {
        let cap = self.cap();
        if self.filled + n > cap {
            return Err(Error::SizeMismatch {
                op: "upload: advance",
                what: "free space of the staging step",
                expected: n,
                actual: cap - self.filled,
            });
        }
        self.filled += n;
        if n > 0 && self.filled == cap {
            self.rt
                .write_into(&mut self.buf, self.at, &self.step[..cap])?;
            self.at += cap;
            self.filled = 0;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<DeviceBuffer> {
        Ok(DeviceBuffer::Wgpu(self.buf))
    }
}

impl fmt::Debug for Steps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Steps")
            .field("len", &self.buf.len)
            .field("position", &self.position())
            .finish()
    }
}

/// The WGSL of one cast: the shared functions and an entry point that
/// produces one output word (8- and 16-bit targets) or element per invocation.
fn cast_source(from: DType, to: DType) -> String {
    use DType::*;
    let read = match from.size_bytes() {
        1 => "read8",
        2 => "read16",
        4 => "read32",
        _ => "read64",
    };
    let conv = match (from, to) {
        (F32, F16) => "narrow32(x, 5u, 10u, false, false)",
        (F32, BF16) => "narrow32(x, 8u, 7u, false, false)",
        (F32, F8E4M3) => "narrow32(x, 4u, 3u, true, true)",
        (F32, F8E5M2) => "narrow32(x, 5u, 2u, false, true)",
        (F32, F64) => "f32_to_f64(x)",
        (F16, F32) => "widen32(x, 5u, 10u, false)",
        (BF16, F32) => "widen32(x, 8u, 7u, false)",
        (F8E4M3, F32) => "widen32(x, 4u, 3u, true)",
        (F8E5M2, F32) => "widen32(x, 5u, 2u, false)",
        (F16, F64) => "f32_to_f64(widen32(x, 5u, 10u, false))",
        (BF16, F64) => "f32_to_f64(widen32(x, 8u, 7u, false))",
        (F16, BF16) => "narrow32(widen32(x, 5u, 10u, false), 8u, 7u, false, false)",
        (BF16, F16) => "narrow32(widen32(x, 8u, 7u, false), 5u, 10u, false, false)",
        (F64, F32) => "narrow64(x, 8u, 23u)",
        (F64, F16) => "narrow64(x, 5u, 10u)",
        (F64, BF16) => "narrow64(x, 8u, 7u)",
        _ => "x",
    };
    let body = match to.size_bytes() {
        1 | 2 => {
            let per = 4 / to.size_bytes();
            let bits = 8 * to.size_bytes();
            format!(
                "    var w = 0u;\n    for (var j = 0u; j < {per}u; j++) {{\n        let i = u * {per}u + j;\n        if (i < params.n) {{\n            let x = {read}(i);\n            w = w | ({conv} << ({bits}u * j));\n        }}\n    }}\n    dst[u] = w;\n"
            )
        }
        4 => format!("    let x = {read}(u);\n    dst[u] = {conv};\n"),
        _ => format!(
            "    let x = {read}(u);\n    let v = {conv};\n    dst[2u * u] = v.x;\n    dst[2u * u + 1u] = v.y;\n"
        ),
    };
    format!(
        "{CAST_WGSL}\n@compute @workgroup_size({WORKGROUP})\nfn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {{\n    let u = gid.x + gid.y * nwg.x * {WORKGROUP}u;\n    if (u >= params.units) {{ return; }}\n{body}}}\n"
    )
}

/// The WGSL of one pack kernel: the shared part, the storage declaration the
/// kernel needs, and its entry point (one packed word per invocation).
fn pack_source(name: &str) -> String {
    let (storage, body) = match name {
        "pack_words" => (
            "var<storage, read> base: array<u32>",
            "    let ew = params.elem / 4u;\n    packed[w] = base[strided(w / ew) * ew + (w % ew)];\n",
        ),
        "unpack_words" => (
            "var<storage, read_write> base: array<u32>",
            "    let ew = params.elem / 4u;\n    base[strided(w / ew) * ew + (w % ew)] = packed[w];\n",
        ),
        "pack_bytes" => (
            "var<storage, read> base: array<u32>",
            "    let total = params.n * params.elem;\n    var v = 0u;\n    for (var b = 0u; b < 4u; b++) {\n        let at = w * 4u + b;\n        if (at < total) {\n            let sb = strided(at / params.elem) * params.elem + (at % params.elem);\n            v = v | (((base[sb >> 2u] >> ((sb & 3u) * 8u)) & 0xffu) << (8u * b));\n        }\n    }\n    packed[w] = v;\n",
        ),
        _ => (
            "var<storage, read_write> base: array<atomic<u32>>",
            "    let total = params.n * params.elem;\n    let v = packed[w];\n    for (var b = 0u; b < 4u; b++) {\n        let at = w * 4u + b;\n        if (at < total) {\n            let sb = strided(at / params.elem) * params.elem + (at % params.elem);\n            let sh = (sb & 3u) * 8u;\n            atomicAnd(&base[sb >> 2u], ~(0xffu << sh));\n            atomicOr(&base[sb >> 2u], ((v >> (8u * b)) & 0xffu) << sh);\n        }\n    }\n",
        ),
    };
    format!(
        "@group(0) @binding(0) {storage};\n{PACK_WGSL}\n@compute @workgroup_size({WORKGROUP})\nfn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {{\n    let w = index(gid, nwg);\n    if (w >= params.words) {{ return; }}\n{body}}}\n"
    )
}
