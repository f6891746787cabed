//! The CUDA runtime proper (feature `cuda`): per-device contexts, streams,
//! events, device buffers, the pinned host chunks ([`ChunkDevice`]), the
//! NVRTC kernels, and the [`Backend`] they make.
//!
//! Unsafe code here is limited to what cudarc marks unsafe: allocating pinned
//! memory (uninitialised until we zero it), kernel launches (argument lists
//! must match the CUDA signatures), the two driver calls cudarc does not
//! wrap (peer access), and the asynchronous copies between pinned chunks and
//! device memory, whose contract [`ChunkDevice`] states.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    self as cu, sys, CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr,
    LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use cudarc::nvrtc::{self, CompileOptions, Ptx};

use tensorferry_device_map::Device;

use super::KERNELS_SOURCE;
use crate::cast;
use crate::cpu::pack::Plan;
use crate::cpu::{finish_checksum, Checksum, CHECKSUM_BLOCK_BYTES};
use crate::error::{Error, Result};
use crate::runtime::backend::{self, sealed, Backend, Feed, Packing};
use crate::runtime::pinned::{
    self, ChunkDevice, ChunkPool, Direction, OwnedUpload, PinnedConfig, Upload,
};
use crate::runtime::{lock, DeviceBuffer, PerDevice, Uploading};
use crate::{DType, Layout};

fn driver(op: &'static str) -> impl FnOnce(cu::DriverError) -> Error {
    move |e| Error::backend(op, e)
}

/// Every kernel in `kernels.cu`.
const KERNEL_NAMES: [&str; 19] = [
    "tf_cast_f32_f16",
    "tf_cast_f32_bf16",
    "tf_cast_f32_f64",
    "tf_cast_f32_f8e4m3",
    "tf_cast_f32_f8e5m2",
    "tf_cast_f16_f32",
    "tf_cast_f16_bf16",
    "tf_cast_f16_f64",
    "tf_cast_bf16_f32",
    "tf_cast_bf16_f16",
    "tf_cast_bf16_f64",
    "tf_cast_f64_f32",
    "tf_cast_f64_f16",
    "tf_cast_f64_bf16",
    "tf_cast_f8e4m3_f32",
    "tf_cast_f8e5m2_f32",
    "tf_checksum_blocks",
    "tf_pack",
    "tf_unpack",
];

/// The PTX of `kernels.cu`, compiled by NVRTC once per process (the first
/// runtime to need a kernel pays for it; the outcome, success or the
/// compiler's log, is kept).
fn ptx() -> Result<Ptx> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let compiled = PTX.get_or_init(|| {
        if !super::nvrtc_present() {
            return Err("libnvrtc not found: install NVRTC (the CUDA runtime compiler, e.g. the cuda-nvrtc package) or add its directory to LD_LIBRARY_PATH".to_string());
        }
        let opts = CompileOptions {
            name: Some("tensorferry_kernels.cu".to_string()),
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let compiled = nvrtc::compile_ptx_with_opts(KERNELS_SOURCE, opts)
            .map(|p| p.to_src())
            .map_err(|e| e.to_string());
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            ok = compiled.is_ok(),
            "compiled the CUDA kernels with NVRTC"
        );
        compiled
    });
    match compiled {
        Ok(src) => Ok(Ptx::from_src(src.clone())),
        Err(log) => Err(Error::backend(
            "compiling the CUDA kernels with NVRTC",
            log.clone(),
        )),
    }
}

/// The kernels loaded into one context.
struct Kernels {
    functions: HashMap<&'static str, CudaFunction>,
    _module: Arc<CudaModule>,
}

/// Makes a context current on this thread and restores the previous one on
/// drop, around driver calls that cudarc does not wrap.
struct ContextGuard;

impl ContextGuard {
    fn push(ctx: &CudaContext) -> Result<Self> {
        // SAFETY: `cu_ctx` is the live context owned by `ctx`, which outlives
        // the guard (the guard is dropped before `ctx` in every caller).
        unsafe { sys::cuCtxPushCurrent_v2(ctx.cu_ctx()) }
            .result()
            .map_err(driver("making the device's context current"))?;
        Ok(ContextGuard)
    }
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        let mut previous = std::ptr::null_mut();
        // SAFETY: pops the context pushed in `push` on this thread; the
        // out-pointer is a valid local.
        let _ = unsafe { sys::cuCtxPopCurrent_v2(&mut previous) };
    }
}

/// A pinned host chunk for copies between the host and the device.
pub struct Chunk {
    mem: PinnedHostSlice<u8>,
}

/// The pinned pools of one device: host-to-device chunks are write-combined
/// (fast for the device to read, slow for the CPU to read, which it never
/// does), device-to-host chunks ordinary pinned memory the CPU reads quickly.
/// Both are portable, so another device's context may use them too.
struct Pools {
    /// Shared with the owned uploads that outlive a call ([`Backend::begin_upload`]).
    h2d: Arc<ChunkPool<Chunk>>,
    d2h: ChunkPool<Chunk>,
}

impl Pools {
    fn new(index: u32, config: PinnedConfig) -> Arc<Self> {
        Arc::new(Self {
            h2d: Arc::new(ChunkPool::new(
                format!("cuda:{index} host-to-device pinned pool"),
                config,
                Direction::ToDevice,
            )),
            d2h: ChunkPool::new(
                format!("cuda:{index} device-to-host pinned pool"),
                config,
                Direction::ToHost,
            ),
        })
    }
}

/// What every runtime on one device shares.
struct DeviceState {
    index: u32,
    ctx: Arc<CudaContext>,
    kernels: OnceLock<std::result::Result<Kernels, String>>,
    /// The pinned pools; replaced whole by `set_pinned`, so a pipeline
    /// keeps the pools it started with.
    pinned: Mutex<Arc<Pools>>,
    /// Devices whose memory this one's context may access directly.
    peers: Mutex<Vec<u32>>,
}

impl DeviceState {
    /// The state of `cuda:index`: one per device per process while any
    /// runtime on it lives.
    fn get(index: u32) -> Result<Arc<Self>> {
        static DEVICES: PerDevice<DeviceState> = PerDevice::new();
        DEVICES.get_or_open(index, || Self::open(index))
    }

    /// Opens device `index` (called once per device while anything holds it).
    fn open(index: u32) -> Result<Self> {
        // Check the ordinal before cudarc sees it: the driver must list it.
        if !super::driver_present() {
            return Err(Error::Unavailable {
                runtime: "cuda",
                reason: "libcuda not found (no NVIDIA driver on this host)".to_string(),
            });
        }
        cu::result::init().map_err(driver("cuInit"))?;
        let count = cu::result::device::get_count().map_err(driver("cuDeviceGetCount"))?;
        let count = usize::try_from(count).unwrap_or(0);
        if index as usize >= count {
            return Err(Error::NoSuchDevice {
                runtime: "cuda",
                index,
                count,
            });
        }
        let config = PinnedConfig::from_env()?;
        let ctx = CudaContext::new(index as usize).map_err(driver("creating a CUDA context"))?;
        tracing::debug!(
            device = %Device::cuda(index),
            pinned_chunk_bytes = config.chunk_bytes(),
            pinned_chunks = config.chunks(),
            "opened a CUDA device"
        );
        Ok(DeviceState {
            index,
            ctx,
            kernels: OnceLock::new(),
            pinned: Mutex::new(Pools::new(index, config)),
            peers: Mutex::new(Vec::new()),
        })
    }

    /// The pinned pools new pipelines use.
    fn pools(&self) -> Arc<Pools> {
        Arc::clone(&lock(&self.pinned))
    }

    /// The kernel `name`, loading the module into this context on first use.
    fn kernel(&self, name: &str) -> Result<&CudaFunction> {
        let loaded = self.kernels.get_or_init(|| {
            let ptx = ptx().map_err(|e| e.to_string())?;
            let module = self
                .ctx
                .load_module(ptx)
                .map_err(|e| format!("loading the kernels: {e}"))?;
            let functions = KERNEL_NAMES
                .iter()
                .map(|&n| {
                    module
                        .load_function(n)
                        .map(|f| (n, f))
                        .map_err(|e| format!("finding kernel {n}: {e}"))
                })
                .collect::<std::result::Result<_, _>>()?;
            Ok(Kernels {
                functions,
                _module: module,
            })
        });
        match loaded {
            Ok(k) => k.functions.get(name).ok_or_else(|| {
                Error::backend("finding a CUDA kernel", format!("no kernel named {name}"))
            }),
            Err(e) => Err(Error::backend("loading the CUDA kernels", e.clone())),
        }
    }

    /// Lets this device read `other`'s memory directly, if the hardware can.
    fn peer_with(&self, other: &DeviceState) -> Result<bool> {
        let mut peers = lock(&self.peers);
        if peers.contains(&other.index) {
            return Ok(true);
        }
        let mut can = 0i32;
        // SAFETY: both devices are valid handles from live contexts; `can` is
        // a valid out-pointer.
        unsafe {
            sys::cuDeviceCanAccessPeer(&mut can, self.ctx.cu_device(), other.ctx.cu_device())
        }
        .result()
        .map_err(driver("cuDeviceCanAccessPeer"))?;
        if can == 0 {
            return Ok(false);
        }
        let _current = ContextGuard::push(&self.ctx)?;
        // SAFETY: `other.ctx` is a live context; this context is current.
        match unsafe { sys::cuCtxEnablePeerAccess(other.ctx.cu_ctx(), 0) } {
            sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {
            }
            e => return Err(Error::backend("cuCtxEnablePeerAccess", cu::DriverError(e))),
        }
        peers.push(other.index);
        Ok(true)
    }
}

/// One CUDA device, with a stream of its own. Cloning shares the stream;
/// [`CudaRuntime::fork`] makes another on the same device.
///
/// Work is queued on the stream in call order and runs asynchronously;
/// whatever hands bytes to the host waits for it. Its operations are those
/// of [`Backend`].
#[derive(Clone)]
pub struct CudaRuntime {
    dev: Arc<DeviceState>,
    stream: Arc<CudaStream>,
}

/// Device memory on one CUDA device.
pub struct CudaBuffer {
    dev: Arc<DeviceState>,
    /// `None` for an empty buffer: the driver allocates no zero-byte memory.
    mem: Option<CudaSlice<u8>>,
    /// For memory another library allocated ([`CudaRuntime::wrap_foreign`]):
    /// what keeps it valid. Such memory is never freed here.
    foreign: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        if let Some(owner) = self.foreign.take() {
            if let Some(mem) = self.mem.take() {
                // Waits for this crate's work on it, then lets the memory go
                // without freeing it: its allocator frees it once `owner`,
                // dropped after, lets go.
                let _ = mem.leak();
            }
            drop(owner);
        }
    }
}

/// A point in a stream's work that other streams and the host can wait for.
pub struct CudaEvent {
    event: cu::CudaEvent,
}

impl CudaBuffer {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.mem.as_ref().map_or(0, |m| m.len())
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `cuda:N`.
    pub fn device(&self) -> Device {
        Device::cuda(self.dev.index)
    }

    /// A runtime on the stream the buffer was allocated on (empty buffers
    /// have none).
    pub(crate) fn owner(&self) -> Result<CudaRuntime> {
        Ok(CudaRuntime {
            dev: Arc::clone(&self.dev),
            stream: Arc::clone(self.mem()?.stream()),
        })
    }

    /// Whether the memory came from another library
    /// ([`CudaRuntime::wrap_foreign`]).
    pub fn is_foreign(&self) -> bool {
        self.foreign.is_some()
    }

    /// The device address of the first byte (0 for an empty buffer), for
    /// another library to read in place (DLPack). Work this crate queued on
    /// the buffer is waited for first, so what the address shows is done.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when waiting for that work fails.
    pub fn device_address(&self) -> Result<u64> {
        let Some(mem) = &self.mem else {
            return Ok(0);
        };
        let stream = mem.stream();
        stream
            .synchronize()
            .map_err(driver("cuStreamSynchronize"))?;
        let (ptr, _read) = mem.device_ptr(stream);
        Ok(ptr)
    }

    fn mem(&self) -> Result<&CudaSlice<u8>> {
        self.mem
            .as_ref()
            .ok_or_else(|| Error::backend("using a CUDA buffer", "the buffer is empty".to_string()))
    }

    fn mem_mut(&mut self) -> Result<&mut CudaSlice<u8>> {
        self.mem
            .as_mut()
            .ok_or_else(|| Error::backend("using a CUDA buffer", "the buffer is empty".to_string()))
    }
}

impl CudaEvent {
    /// Blocks the calling thread until the recorded work is done.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`].
    pub fn synchronize(&self) -> Result<()> {
        self.event
            .synchronize()
            .map_err(driver("cuEventSynchronize"))
    }
}

impl fmt::Debug for CudaRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaRuntime(cuda:{})", self.dev.index)
    }
}

impl fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CudaBuffer(cuda:{}, {} bytes)",
            self.dev.index,
            self.len()
        )
    }
}

impl fmt::Debug for CudaEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CudaEvent")
    }
}

fn chunk_too_short(len: usize, chunk: usize) -> Error {
    Error::SizeMismatch {
        op: "pinned copy",
        what: "pinned chunk",
        expected: len,
        actual: chunk,
    }
}

/// The first `len` bytes of a chunk's memory.
fn chunk_part(host: &[u8], len: usize) -> Result<&[u8]> {
    let chunk = host.len();
    host.get(..len).ok_or_else(|| chunk_too_short(len, chunk))
}

/// The first `len` bytes of a chunk's memory, to write.
fn chunk_part_mut(host: &mut [u8], len: usize) -> Result<&mut [u8]> {
    let chunk = host.len();
    host.get_mut(..len)
        .ok_or_else(|| chunk_too_short(len, chunk))
}

/// Copies between pinned chunks and device memory on the runtime's stream,
/// each followed by an event the pipeline waits on.
impl ChunkDevice for CudaRuntime {
    type Chunk = Chunk;
    type Buffer = CudaBuffer;
    type Event = cu::CudaEvent;

    fn buffer_len(&self, buf: &CudaBuffer) -> usize {
        buf.len()
    }

    fn alloc_chunk(&self, bytes: usize, direction: Direction) -> Result<Chunk> {
        let flags = match direction {
            Direction::ToDevice => {
                sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_WRITECOMBINED
            }
            Direction::ToHost => sys::CU_MEMHOSTALLOC_PORTABLE,
        };
        // SAFETY: the memory is uninitialised; it is zeroed below before
        // anything reads it.
        let mut mem = unsafe { self.dev.ctx.alloc_pinned_with_flags::<u8>(bytes, flags) }
            .map_err(driver("allocating pinned host memory"))?;
        let ptr = mem
            .as_mut_ptr()
            .map_err(driver("reaching pinned host memory"))?;
        // SAFETY: `ptr` is valid for `bytes` bytes (just allocated with that
        // length) and nothing else refers to it yet.
        unsafe { std::ptr::write_bytes(ptr, 0, bytes) };
        Ok(Chunk { mem })
    }

    fn host_mut<'c>(&self, chunk: &'c mut Chunk) -> Result<&'c mut [u8]> {
        chunk
            .mem
            .as_mut_slice()
            .map_err(driver("reaching a pinned chunk"))
    }

    unsafe fn copy_to_device(
        &self,
        chunk: &Chunk,
        len: usize,
        dst: &mut CudaBuffer,
        offset: usize,
    ) -> Result<cu::CudaEvent> {
        let at = backend::range("copy to device", offset, len, dst.len())?;
        let host = chunk
            .mem
            .as_slice()
            .map_err(driver("reaching a pinned chunk"))?;
        let host = chunk_part(host, len)?;
        let mut view = dst.mem_mut()?.slice_mut(at);
        // Asynchronous: the chunk is pinned, so the driver reads it while the
        // host goes on; the caller leaves it alone until the event is done.
        self.stream
            .memcpy_htod(host, &mut view)
            .map_err(driver("copying host to device"))?;
        self.stream
            .record_event(None)
            .map_err(driver("recording an event"))
    }

    unsafe fn copy_to_host(
        &self,
        src: &CudaBuffer,
        offset: usize,
        chunk: &mut Chunk,
        len: usize,
    ) -> Result<cu::CudaEvent> {
        let at = backend::range("copy to host", offset, len, src.len())?;
        let host = chunk
            .mem
            .as_mut_slice()
            .map_err(driver("reaching a pinned chunk"))?;
        let host = chunk_part_mut(host, len)?;
        let view = src.mem()?.slice(at);
        self.stream
            .memcpy_dtoh(&view, host)
            .map_err(driver("copying device to host"))?;
        self.stream
            .record_event(None)
            .map_err(driver("recording an event"))
    }

    fn is_done(&self, event: &cu::CudaEvent) -> Result<bool> {
        event
            .try_is_complete()
            .map_err(driver("querying a copy's event"))
    }

    fn wait(&self, event: &cu::CudaEvent) -> Result<()> {
        event
            .synchronize()
            .map_err(driver("waiting for a copy's event"))
    }
}

/// Threads per block and a grid that covers `n` items with grid-stride loops.
fn grid(n: u64) -> LaunchConfig {
    const THREADS: u32 = 256;
    let blocks = n.div_ceil(u64::from(THREADS)).clamp(1, 1 << 20) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl CudaRuntime {
    /// Opens `cuda:index`.
    ///
    /// # Errors
    ///
    /// [`Error::Unavailable`] without a driver; [`Error::NoSuchDevice`] for
    /// an index the driver does not list; [`Error::BadPinned`] for a bad
    /// pinned pool setting in the environment; [`Error::Backend`] when the
    /// driver fails.
    pub fn new(index: u32) -> Result<Self> {
        let dev = DeviceState::get(index)?;
        let stream = dev
            .ctx
            .new_stream()
            .map_err(driver("creating a CUDA stream"))?;
        Ok(Self { dev, stream })
    }

    /// A runtime on the same device with a new stream, for work that should
    /// overlap this one's (copies beside kernels).
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the driver cannot create a stream.
    pub fn fork(&self) -> Result<Self> {
        let stream = self
            .dev
            .ctx
            .new_stream()
            .map_err(driver("creating a CUDA stream"))?;
        Ok(Self {
            dev: Arc::clone(&self.dev),
            stream,
        })
    }

    /// Device memory another library allocated on this device (a PyTorch
    /// tensor, say), `len` bytes from address `ptr`, as a buffer: nothing is
    /// copied, and the memory is never freed here. `owner` is kept until the
    /// buffer is dropped (after this crate's work on it is done), so the
    /// memory stays valid meanwhile.
    ///
    /// # Safety
    ///
    /// `ptr..ptr + len` must be memory this device's primary context can
    /// address, valid while `owner` is held, and not written by anyone else
    /// while the buffer lives. Work another stream queued on it must be done,
    /// or ordered before this runtime's stream ([`stream_handle`](Self::stream_handle)
    /// is the handle to give a DLPack producer for that).
    ///
    /// # Errors
    ///
    /// [`Error::Unsupported`] for a null address with a non-zero length.
    pub unsafe fn wrap_foreign(
        &self,
        ptr: u64,
        len: usize,
        owner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Result<DeviceBuffer> {
        if len > 0 && ptr == 0 {
            return Err(Error::Unsupported {
                op: "wrapping foreign device memory",
                backend: "cuda",
                reason: format!(
                    "a null address for {len} bytes of cuda:{}: the producer gave no memory",
                    self.dev.index
                ),
            });
        }
        let mem = if len == 0 {
            None
        } else {
            // SAFETY: the caller guarantees the range is valid device memory
            // of this context while `owner` lives; `Drop` leaks the slice
            // instead of freeing it, before `owner` goes.
            Some(unsafe { self.stream.upgrade_device_ptr::<u8>(ptr, len) })
        };
        Ok(DeviceBuffer::Cuda(CudaBuffer {
            dev: Arc::clone(&self.dev),
            mem,
            foreign: Some(owner),
        }))
    }

    /// The raw handle (`CUstream`) of the stream this runtime queues work
    /// on: what a consumer gives a DLPack producer's `__dlpack__(stream=…)`,
    /// so the producer orders its pending writes before this stream's work.
    pub fn stream_handle(&self) -> u64 {
        self.stream.cu_stream() as u64
    }

    /// The size of this device's pinned pools.
    pub fn pinned(&self) -> PinnedConfig {
        lock(&self.dev.pinned).h2d.config()
    }

    /// Sizes this device's pinned pools (for every runtime on the device).
    /// Transfers already running finish on the old pools, whose chunks are
    /// freed when they are done; later ones use the new. The default comes
    /// from `TENSORFERRY_PINNED_CHUNK_BYTES` and `TENSORFERRY_PINNED_CHUNKS`,
    /// else 16 × 1 MiB per direction.
    pub fn set_pinned(&self, config: PinnedConfig) {
        tracing::debug!(
            device = %self.device(),
            pinned_chunk_bytes = config.chunk_bytes(),
            pinned_chunks = config.chunks(),
            "resized the pinned pools"
        );
        *lock(&self.dev.pinned) = Pools::new(self.dev.index, config);
    }

    /// Records the work queued so far.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`].
    pub fn record_event(&self) -> Result<CudaEvent> {
        self.stream
            .record_event(None)
            .map(|event| CudaEvent { event })
            .map_err(driver("recording an event"))
    }

    /// Makes work queued after this call wait for `event` (on any stream of this device).
    ///
    /// # Errors
    ///
    /// [`Error::Backend`].
    pub fn wait_event(&self, event: &CudaEvent) -> Result<()> {
        self.stream
            .wait(&event.event)
            .map_err(driver("waiting for an event"))
    }

    /// `len` zeroed bytes of device memory.
    fn alloc_buffer(&self, len: usize) -> Result<CudaBuffer> {
        let mem = if len == 0 {
            None
        } else {
            Some(
                self.stream
                    .alloc_zeros::<u8>(len)
                    .map_err(driver("allocating device memory"))?,
            )
        };
        Ok(CudaBuffer {
            dev: Arc::clone(&self.dev),
            mem,
            foreign: None,
        })
    }

    /// The plan's `(size, stride)` pairs on the device.
    fn dims(&self, plan: &Plan) -> Result<CudaSlice<u64>> {
        let dims: Vec<u64> = plan
            .dims
            .iter()
            .flat_map(|&(n, s)| [n as u64, s as u64])
            .collect();
        self.stream
            .clone_htod(&dims)
            .map_err(driver("copying a layout to the device"))
    }
}

impl sealed::Sealed for CudaRuntime {}

impl Backend for CudaRuntime {
    fn device(&self) -> Device {
        Device::cuda(self.dev.index)
    }

    fn alloc(&self, len: usize) -> Result<DeviceBuffer> {
        self.alloc_buffer(len).map(DeviceBuffer::Cuda)
    }

    /// Staged through pinned chunks: the host copies into one chunk while
    /// earlier ones are on their way to the device; returns once the bytes
    /// are on the device.
    fn write(&self, dst: &mut DeviceBuffer, offset: usize, src: &[u8]) -> Result<()> {
        let dst: &mut CudaBuffer = dst.on_mut(self.device(), "write", "destination")?;
        backend::range("write", offset, src.len(), dst.len())?;
        if src.is_empty() {
            return Ok(());
        }
        let pools = self.dev.pools();
        let mut upload = Upload::new(self, &pools.h2d, dst, offset)?;
        upload.write(src)?;
        upload.finish()
    }

    fn begin_upload(&self, len: usize) -> Result<Uploading> {
        let buf = self.alloc_buffer(len)?;
        let pools = self.dev.pools();
        let feed = OwnedUpload::new(self.clone(), Arc::clone(&pools.h2d), buf);
        Ok(Uploading::new(self.device(), Box::new(feed)))
    }

    /// Always: each pinned chunk is copied while the next fills, and the
    /// bytes skip a host copy.
    fn overlaps_upload(&self, _len: usize) -> bool {
        true
    }

    /// Through the device-to-host pinned pipeline, several chunk copies in
    /// flight, each chunk copied into `out` while later ones still run.
    fn download_range(&self, src: &DeviceBuffer, offset: usize, out: &mut [u8]) -> Result<()> {
        let src: &CudaBuffer = src.on(self.device(), "download", "source")?;
        let pools = self.dev.pools();
        pinned::download_into(self, &pools.d2h, src, offset, out)
    }

    /// Pinned chunk by chunk: while the sink takes one chunk (a socket
    /// write), the copies of the next ones run.
    fn download_to(
        &self,
        src: &DeviceBuffer,
        sink: &mut dyn FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<()> {
        let src: &CudaBuffer = src.on(self.device(), "download_to", "source")?;
        if src.is_empty() {
            return Ok(());
        }
        let pools = self.dev.pools();
        pinned::download(self, &pools.d2h, src, 0, src.len(), |bytes| {
            backend::to_sink(sink, bytes)
        })
    }

    /// Between devices, peer to peer where the hardware allows, else a
    /// download from the source's device feeding an upload to the
    /// destination's, both through pinned chunks.
    fn copy(&self, src: &DeviceBuffer, dst: &mut DeviceBuffer) -> Result<()> {
        // Buffers of any CUDA device, not only this one.
        let src: &CudaBuffer = src.of_kind(self.device(), "copy", "source")?;
        let dst: &mut CudaBuffer = dst.of_kind_mut(self.device(), "copy", "destination")?;
        backend::same_len(src.len(), dst.len())?;
        if src.is_empty() {
            return Ok(());
        }
        if src.dev.index == dst.dev.index || dst.dev.peer_with(&src.dev)? {
            // Same device, or peers: one copy on the destination's stream
            // (cudarc issues cuMemcpyPeerAsync when the contexts differ).
            let stream = Arc::clone(dst.mem()?.stream());
            let from = src.mem()?;
            return stream
                .memcpy_dtod(from, dst.mem_mut()?)
                .map_err(driver("copying device to device"));
        }
        let (from, to) = (src.owner()?, dst.owner()?);
        let (src_pools, dst_pools) = (src.dev.pools(), dst.dev.pools());
        let len = src.len();
        let mut upload = Upload::new(&to, &dst_pools.h2d, dst, 0)?;
        pinned::download(&from, &src_pools.d2h, src, 0, len, |bytes| {
            upload.write(bytes)
        })?;
        upload.finish()
    }

    fn cast(
        &self,
        src: &DeviceBuffer,
        from: DType,
        dst: &mut DeviceBuffer,
        to: DType,
    ) -> Result<()> {
        let src: &CudaBuffer = src.on(self.device(), "cast", "source")?;
        let dst: &mut CudaBuffer = dst.on_mut(self.device(), "cast", "destination")?;
        let n = cast::check_sizes(src.len(), from, dst.len(), to)?;
        if n == 0 {
            return Ok(());
        }
        if from == to {
            return self
                .stream
                .memcpy_dtod(src.mem()?, dst.mem_mut()?)
                .map_err(driver("copying device to device"));
        }
        let name = format!("tf_cast_{from}_{to}");
        let f = self.dev.kernel(&name)?;
        let n64 = n as u64;
        let (input, output) = (src.mem()?, dst.mem_mut()?);
        let mut launch = self.stream.launch_builder(f);
        launch.arg(input).arg(output).arg(&n64);
        // SAFETY: `tf_cast_<from>_<to>(const S* src, D* dst, u64 n)`: the
        // buffers hold exactly n elements of each dtype (check_sizes above),
        // and device allocations are aligned for every element type.
        unsafe { launch.launch(grid(n64)) }.map_err(driver("launching the cast kernel"))?;
        Ok(())
    }

    fn checksum(&self, buf: &DeviceBuffer) -> Result<Checksum> {
        let buf: &CudaBuffer = buf.on(self.device(), "checksum", "input")?;
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(finish_checksum(0, 0, 0));
        }
        let blocks = len.div_ceil(CHECKSUM_BLOCK_BYTES as u64);
        let mut sums = self
            .stream
            .alloc_zeros::<u32>(2)
            .map_err(driver("allocating device memory"))?;
        let f = self.dev.kernel("tf_checksum_blocks")?;
        let first = 0u64;
        let data = buf.mem()?;
        let mut launch = self.stream.launch_builder(f);
        launch
            .arg(data)
            .arg(&len)
            .arg(&first)
            .arg(&blocks)
            .arg(&mut sums);
        // SAFETY: `tf_checksum_blocks(const u8* data, u64 len, u64 first,
        // u64 blocks, u32* sums)`: data holds len bytes, blocks covers exactly
        // them, sums holds two u32.
        unsafe { launch.launch(grid(blocks)) }.map_err(driver("launching the checksum kernel"))?;
        let host = self
            .stream
            .clone_dtoh(&sums)
            .map_err(driver("reading the checksum"))?;
        self.stream
            .synchronize()
            .map_err(driver("waiting for the checksum"))?;
        Ok(finish_checksum(host[0], host[1], len))
    }

    fn pack(
        &self,
        way: Packing,
        src: &DeviceBuffer,
        elem_bytes: usize,
        layout: &Layout,
        dst: &mut DeviceBuffer,
    ) -> Result<()> {
        let src: &CudaBuffer = src.on(self.device(), way.name(), "source")?;
        let dst: &mut CudaBuffer = dst.on_mut(self.device(), way.name(), "destination")?;
        let n = way.check("cuda", src.len(), elem_bytes, layout, dst.len())? as u64;
        let (Some(from), Some(to), true) = (src.mem.as_ref(), dst.mem.as_mut(), n > 0) else {
            // An empty view moves nothing.
            return Ok(());
        };
        let plan = Plan::new(layout);
        let dims = self.dims(&plan)?;
        let elem32 = u32::try_from(elem_bytes)
            .map_err(|_| Error::BadLayout(format!("element size {elem_bytes} is too large")))?;
        let rank = plan.dims.len() as u32;
        let offset = plan.offset as u64;
        let f = self.dev.kernel(match way {
            Packing::Pack => "tf_pack",
            Packing::Unpack => "tf_unpack",
        })?;
        let mut launch = self.stream.launch_builder(f);
        launch
            .arg(from)
            .arg(to)
            .arg(&n)
            .arg(&elem32)
            .arg(&rank)
            .arg(&dims)
            .arg(&offset);
        // SAFETY: `tf_pack`/`tf_unpack(const u8* from, u8* to, u64 n, u32
        // elem, u32 rank, const u64* dims, u64 offset)`; `way.check` verified
        // that every element of the view lies inside its buffer and that the
        // contiguous one holds n × elem bytes; dims holds 2 × rank values.
        unsafe { launch.launch(grid(n)) }.map_err(driver("launching the pack kernel"))?;
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(driver("cuStreamSynchronize"))
    }
}

/// CUDA's upload fed piece by piece: the pinned chunks of the device's
/// host-to-device pool, copies on the runtime's stream.
impl Feed for OwnedUpload<CudaRuntime> {
    fn len(&self) -> usize {
        OwnedUpload::len(self)
    }

    fn position(&self) -> usize {
        OwnedUpload::position(self)
    }

    fn space(&mut self) -> Result<&mut [u8]> {
        OwnedUpload::space(self)
    }

    fn advance(&mut self, n: usize) -> Result<()> {
        OwnedUpload::advance(self, n)
    }

    fn pause(&mut self) -> Result<()> {
        OwnedUpload::pause(self)
    }

    fn finish(self: Box<Self>) -> Result<DeviceBuffer> {
        OwnedUpload::finish(*self).map(DeviceBuffer::Cuda)
    }
}
