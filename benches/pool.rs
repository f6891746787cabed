//! Receive-buffer allocation: taking a buffer from a warm `BufferPool` and
//! returning it, for 4 KiB, 1 MiB and 64 MiB. Baselines in the same group: a
//! fresh allocation of the same size with one byte written per 4 KiB page (a
//! pool's new buffer is prefaulted the same way, and a receive writes every
//! page), as a `Vec<u8>` and as a 64-byte-aligned `HostBufferMut`.

// criterion_group! and criterion_main! generate undocumented functions.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tensorferry::engine::{BufferPool, HostBufferMut};

const PAGE: usize = 4096;

/// Writes one byte per page, so every page is faulted in.
fn touch(bytes: &mut [u8]) {
    for b in bytes.iter_mut().step_by(PAGE) {
        *b = 1;
    }
}

fn pool(c: &mut Criterion) {
    for (label, bytes) in [("4KiB", 4 << 10), ("1MiB", 1 << 20), ("64MiB", 64 << 20)] {
        let mut g = c.benchmark_group(format!("pool/{label}"));
        g.throughput(Throughput::Bytes(bytes as u64));
        let pool = BufferPool::new(1 << 30);
        // Warm: the first take allocates; every later one reuses that buffer.
        drop(pool.get(bytes));
        g.bench_function("pool take + return", |b| {
            b.iter(|| {
                let mut buf = pool.get(black_box(bytes));
                buf.as_mut_slice()[0] = 1;
                black_box(buf.as_mut_slice().as_ptr());
            })
        });
        // The path a received frame takes: freeze, view, drop the last view.
        g.bench_function("pool take + freeze + return", |b| {
            b.iter(|| {
                let mut buf = pool.get(black_box(bytes));
                buf.as_mut_slice()[0] = 1;
                let frozen = buf.freeze();
                black_box(frozen.as_slice().as_ptr());
            })
        });
        g.bench_function("baseline: fresh vec![0u8; n], pages touched", |b| {
            b.iter(|| {
                let mut v = vec![0u8; black_box(bytes)];
                touch(&mut v);
                black_box(v.as_ptr());
            })
        });
        g.bench_function(
            "baseline: fresh HostBufferMut::zeroed, pages touched",
            |b| {
                b.iter(|| {
                    let mut v = HostBufferMut::zeroed(black_box(bytes));
                    touch(v.as_mut_slice());
                    black_box(v.as_slice().as_ptr());
                })
            },
        );
        g.finish();
    }
}

criterion_group! {
    name = pool_benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = pool
}
criterion_main!(pool_benches);
