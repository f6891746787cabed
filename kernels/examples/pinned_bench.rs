//! Staged host↔device throughput through the pinned-chunk pipeline against
//! one plain copy from (or into) a pinned buffer of the same size, in the
//! same run.
//!
//! ```text
//! cargo run --release -p tensorferry-kernels --features cuda --example pinned_bench
//! ```
//!
//! Staged: `Backend::write` from, and `Backend::download_range` into, ordinary
//! (pageable) memory, as bytes from or for a socket would be; plain:
//! `cuMemcpyHtoDAsync` / `cuMemcpyDtoHAsync` of the whole size from or into
//! one pinned buffer, then a stream synchronize. Sizes 64 MiB and 256 MiB;
//! chunks of 256 KiB, 1 MiB and 4 MiB, 4 or 16 of them; device `cuda:0`
//! (`TENSORFERRY_BENCH_DEVICE=N` picks another); best of 5 runs after a
//! warm-up. Without a CUDA driver it prints `SKIP: <reason>` and exits 0.

use std::time::{Duration, Instant};

use cudarc::driver::{sys, CudaContext};
use tensorferry_kernels::runtime::cuda::{probe, CudaRuntime};
use tensorferry_kernels::runtime::pinned::PinnedConfig;
use tensorferry_kernels::runtime::Backend;

const RUNS: usize = 5;
const SIZES: [usize; 2] = [64 << 20, 256 << 20];
const CHUNK_BYTES: [usize; 3] = [256 << 10, 1 << 20, 4 << 20];
const CHUNKS: [usize; 2] = [4, 16];

/// The fastest of `RUNS` runs of `f`, after one warm-up.
fn best(
    mut f: impl FnMut() -> Result<(), Box<dyn std::error::Error>>,
) -> Result<Duration, Box<dyn std::error::Error>> {
    f()?;
    let mut best = Duration::MAX;
    for _ in 0..RUNS {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed());
    }
    Ok(best)
}

fn gbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let index: u32 = std::env::var("TENSORFERRY_BENCH_DEVICE")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let rt = match CudaRuntime::new(index) {
        Ok(rt) => rt,
        Err(why) => {
            println!("SKIP: {why}");
            return Ok(());
        }
    };
    let name = probe()
        .devices
        .into_iter()
        .find(|d| d.index == index)
        .map_or_else(|| "?".to_string(), |d| d.name);
    println!("cuda:{index} ({name}); best of {RUNS} runs; staged from/into pageable memory, plain from/into one pinned buffer");
    println!(
        "{:>8} {:>8} {:>6} {:>4} {:>11} {:>12} {:>6}",
        "size", "chunk", "chunks", "dir", "plain GB/s", "staged GB/s", "ratio"
    );

    // The runtime's context is the device's primary context: the same one.
    let ctx = CudaContext::new(index as usize)?;
    let stream = ctx.new_stream()?;
    for size in SIZES {
        // SAFETY: uninitialised pinned memory, only ever written by the
        // device-to-host copy or read by the host-to-device copy below, whose
        // bytes do not matter for a timing.
        let mut pinned =
            unsafe { ctx.alloc_pinned_with_flags::<u8>(size, sys::CU_MEMHOSTALLOC_PORTABLE) }?;
        let mut on_device = stream.alloc_zeros::<u8>(size)?;
        let plain_h2d = best(|| {
            stream.memcpy_htod(&pinned, &mut on_device)?;
            stream.synchronize()?;
            Ok(())
        })?;
        let plain_d2h = best(|| {
            stream.memcpy_dtoh(&on_device, &mut pinned)?;
            stream.synchronize()?;
            Ok(())
        })?;

        let data: Vec<u8> = (0..size).map(|i| (i * 31 + 7) as u8).collect();
        let mut back = vec![0u8; size];
        let mut buf = rt.alloc(size)?;
        for chunk_bytes in CHUNK_BYTES {
            for chunks in CHUNKS {
                rt.set_pinned(PinnedConfig::new(chunk_bytes, chunks)?);
                let h2d = best(|| Ok(rt.write(&mut buf, 0, &data)?))?;
                let d2h = best(|| Ok(rt.download_range(&buf, 0, &mut back)?))?;
                if back != data {
                    return Err("staged round trip changed the bytes".into());
                }
                for (dir, plain, staged) in [("h2d", plain_h2d, h2d), ("d2h", plain_d2h, d2h)] {
                    println!(
                        "{:>5}MiB {:>5}KiB {:>6} {:>4} {:>11.2} {:>12.2} {:>6.2}",
                        size >> 20,
                        chunk_bytes >> 10,
                        chunks,
                        dir,
                        gbps(size, plain),
                        gbps(size, staged),
                        plain.as_secs_f64() / staged.as_secs_f64()
                    );
                }
            }
        }
    }
    Ok(())
}
