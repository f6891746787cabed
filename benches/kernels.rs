//! The kernels on the CPU for 64 MiB, each group with a memcpy of the same
//! bytes as its baseline (target: checksum at ≥ 0.8× memcpy), and the WGSL
//! kernels on whatever wgpu adapter is found, at correctness-scale sizes.
//!
//! On a host without a GPU that adapter is Mesa's lavapipe, a CPU emulation of
//! Vulkan: its figures are labelled `wgpu-lavapipe-not-gpu-timing` and say
//! nothing about GPU speed. Threads: the rayon pool (all cores unless
//! `RAYON_NUM_THREADS` is set).

// criterion_group! and criterion_main! generate undocumented functions.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tensorferry::device_map::Device;
use tensorferry::kernels::runtime::{wgpu::probe, Runtime};
use tensorferry::kernels::{cpu, DType, Layout};

const MIB: usize = 1 << 20;
const SIZE: usize = 64 * MIB;

/// Deterministic bytes that are ordinary f32 values (no NaN-heavy fast paths).
fn floats(bytes: usize) -> Vec<u8> {
    (0..bytes / 4)
        .flat_map(|i| ((i as f32) * 0.618_034 - 1.0e5).to_le_bytes())
        .collect()
}

fn memcpy_baseline(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    bytes: usize,
) {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    g.bench_function("memcpy (baseline)", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(dst.as_ptr());
        })
    });
}

fn cpu_checksum(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/checksum/64MiB");
    g.throughput(Throughput::Bytes(SIZE as u64));
    memcpy_baseline(&mut g, SIZE);
    let data = floats(SIZE);
    g.bench_function("checksum", |b| {
        b.iter(|| black_box(cpu::checksum(black_box(&data))))
    });
    g.finish();
}

fn cpu_cast(c: &mut Criterion) {
    // Throughput counts source bytes: 64 MiB in every row.
    let mut g = c.benchmark_group("cpu/cast/64MiB-source");
    g.throughput(Throughput::Bytes(SIZE as u64));
    memcpy_baseline(&mut g, SIZE);
    let f32s = floats(SIZE);
    let mut f16s = vec![0u8; SIZE / 2];
    cpu::cast(&f32s, DType::F32, &mut f16s, DType::F16).expect("cast");
    let f16_src: Vec<u8> = f16s.iter().cycle().take(SIZE).copied().collect();
    let f64_src: Vec<u8> = floats(SIZE / 2)
        .chunks(4)
        .flat_map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
        .collect();
    for (src, from, to) in [
        (&f32s, DType::F32, DType::F16),
        (&f32s, DType::F32, DType::BF16),
        (&f16_src, DType::F16, DType::F32),
        (&f64_src, DType::F64, DType::F32),
        (&f64_src, DType::F64, DType::BF16),
        (&f32s, DType::F32, DType::F8E4M3),
    ] {
        let n = SIZE / from.size_bytes() * to.size_bytes();
        let mut dst = vec![0u8; n];
        g.bench_function(format!("{from}->{to}"), |b| {
            b.iter(|| cpu::cast(black_box(src), from, &mut dst, to).expect("cast"))
        });
    }
    g.finish();
}

fn cpu_pack(c: &mut Criterion) {
    // A 4096 × 4096 f32 matrix (64 MiB): its transpose, and the view that
    // keeps every other column (32 MiB packed; throughput counts packed bytes).
    let mut g = c.benchmark_group("cpu/pack/f32-4096x4096");
    g.throughput(Throughput::Bytes(SIZE as u64));
    memcpy_baseline(&mut g, SIZE);
    let storage = floats(SIZE);
    let base = Layout::contiguous(&[4096, 4096]);
    let t = base.transposed(0, 1).expect("transpose");
    let mut out = vec![0u8; SIZE];
    g.bench_function("pack transpose", |b| {
        b.iter(|| cpu::pack(black_box(&storage), 4, &t, &mut out).expect("pack"))
    });
    let mut back = vec![0u8; SIZE];
    g.bench_function("unpack transpose", |b| {
        b.iter(|| cpu::unpack(black_box(&out), 4, &t, &mut back).expect("unpack"))
    });
    g.bench_function("pack contiguous", |b| {
        b.iter(|| cpu::pack(black_box(&storage), 4, &base, &mut out).expect("pack"))
    });
    g.finish();
    let mut g = c.benchmark_group("cpu/pack/f32-4096x4096-every-other-column");
    g.throughput(Throughput::Bytes((SIZE / 2) as u64));
    memcpy_baseline(&mut g, SIZE / 2);
    let strided = Layout::new(&[4096, 2048], &[4096, 2], 0).expect("layout");
    let mut half_out = vec![0u8; SIZE / 2];
    g.bench_function("pack", |b| {
        b.iter(|| cpu::pack(black_box(&storage), 4, &strided, &mut half_out).expect("pack"))
    });
    g.finish();
}

/// The WGSL kernels on the first wgpu adapter, at 1 MiB. Each iteration
/// waits for the device (checksum reads its result back; the others
/// synchronize), so the figures include submission and polling.
fn wgpu_kernels(c: &mut Criterion) {
    let Some(adapter) = probe().devices.into_iter().next() else {
        println!("wgpu benches skipped: no adapter");
        return;
    };
    let Ok(rt) = Runtime::open(Device::wgpu(adapter.index)) else {
        println!(
            "wgpu benches skipped: adapter {} does not open",
            adapter.index
        );
        return;
    };
    let label = if adapter.device_type == "Cpu" {
        // lavapipe/llvmpipe: a CPU emulating a GPU. Not GPU timings.
        format!("wgpu-{}-cpu-emulation-not-gpu-timing", adapter.backend)
    } else {
        format!(
            "wgpu-{}-{}",
            adapter.backend,
            adapter.name.replace(' ', "_")
        )
    };
    let bytes = MIB;
    let mut g = c.benchmark_group(format!("{label}/1MiB"));
    g.throughput(Throughput::Bytes(bytes as u64));
    g.sample_size(10);
    let data = rt.upload(&floats(bytes)).expect("upload");
    g.bench_function("checksum", |b| {
        b.iter(|| black_box(rt.checksum(&data).expect("checksum")))
    });
    let mut bf16 = rt.alloc(bytes / 2).expect("alloc");
    g.bench_function("cast f32->bf16", |b| {
        b.iter(|| {
            rt.cast(&data, DType::F32, &mut bf16, DType::BF16)
                .expect("cast");
            rt.synchronize().expect("sync");
        })
    });
    let t = Layout::contiguous(&[512, 512])
        .transposed(0, 1)
        .expect("transpose");
    let mut out = rt.alloc(bytes).expect("alloc");
    g.bench_function("pack transpose f32 512x512", |b| {
        b.iter(|| {
            rt.pack(&data, 4, &t, &mut out).expect("pack");
            rt.synchronize().expect("sync");
        })
    });
    g.finish();
}

criterion_group!(benches, cpu_checksum, cpu_cast, cpu_pack, wgpu_kernels);
criterion_main!(benches);
