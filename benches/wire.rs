//! Encode + decode cost per message: one 64 MiB tensor (must cost what a 4 KiB
//! one costs: O(header), not O(bytes)) and 256 small tensors (target: under
//! 100 µs per round trip). Baseline in the same group: one memcpy of the
//! same 64 MiB, what a format that copies tensor bytes would pay at least.

// criterion_group! and criterion_main! generate undocumented functions.
#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tensorferry::engine::wire::{decode, encode, EncodeOptions, FrameMeta, Limits};
use tensorferry::engine::{outbound, pattern, DType, HostBuffer, Message};

fn frame_bytes(m: &Message) -> HostBuffer {
    let enc = encode(
        m,
        &FrameMeta::message("/bench", 0),
        EncodeOptions::default(),
    )
    .expect("encode");
    let mut bytes = Vec::new();
    outbound::write_frame(&enc, &mut bytes).expect("write");
    HostBuffer::copy_from(&bytes)
}

fn round_trip(
    c: &mut Criterion,
    group: &str,
    label: &str,
    m: &Message,
    baseline_bytes: Option<usize>,
) {
    let region = frame_bytes(m);
    let limits = Limits::default();
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Bytes(m.payload_bytes()));
    g.bench_function(format!("{label}/encode+decode"), |b| {
        b.iter(|| {
            let enc = encode(
                black_box(m),
                &FrameMeta::message("/bench", 0),
                EncodeOptions::default(),
            )
            .expect("encode");
            let frame = decode(black_box(&region), &limits).expect("decode");
            black_box((enc.frame_len(), frame.tensors.len()))
        })
    });
    g.bench_function(format!("{label}/decode"), |b| {
        b.iter(|| {
            black_box(
                decode(black_box(&region), &limits)
                    .expect("decode")
                    .tensors
                    .len(),
            )
        })
    });
    if let Some(n) = baseline_bytes {
        let src = vec![1u8; n];
        let mut dst = vec![0u8; n];
        g.bench_function(format!("{label}/baseline_memcpy"), |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&src));
                black_box(dst[n - 1])
            })
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    for (label, elems) in [("4KiB", 1024usize), ("64MiB", 16 << 20)] {
        let t = pattern::tensor(DType::F32, &[elems], 1, 0, "x").expect("tensor");
        let m = Message::new().field("step", 1).tensor("x", t);
        let baseline = (elems == 16 << 20).then_some(64 << 20);
        round_trip(c, "wire/one_tensor", label, &m, baseline);
    }
    let mut m = Message::new().field("step", 1);
    for i in 0..256 {
        let name = format!("layer{i}.weight");
        m = m.tensor(
            name.clone(),
            pattern::tensor(DType::BF16, &[16, 32], 1, 0, &name).expect("tensor"),
        );
    }
    round_trip(c, "wire/256_tensors", "256x1KiB", &m, None);
}

criterion_group! {
    name = wire;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(3));
    targets = benches
}
criterion_main!(wire);
