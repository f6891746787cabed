//! Every backend against the CPU reference: casts, checksums, pack and
//! unpack, copies, on fresh random inputs (NaNs, infinities, subnormals,
//! zero and odd lengths, sizes that are not multiples of a workgroup), with
//! outputs poisoned before each run so an unwritten element fails.
//!
//! wgpu: runs on the first adapter (lavapipe in CI); with
//! `TENSORFERRY_REQUIRE_WGPU=1` a missing adapter fails instead of skipping.
//! CUDA: runs on `cuda:0` where a driver is found; with
//! `TENSORFERRY_REQUIRE_CUDA=1` a missing one fails.

mod common;

use common::{assert_same, casts, Rng, POISON};
use tensorferry_device_map::Device;
use tensorferry_kernels::runtime::{required, Backend, DeviceBuffer, Runtime};
use tensorferry_kernels::{cpu, DType, Error, Layout};

/// The runtime for `device`, or `None` with a printed reason; panics when
/// the variable `require` is set to 1.
fn runtime(device: Device, require: &str) -> Option<Runtime> {
    match Runtime::open(device) {
        Ok(rt) => Some(rt),
        Err(e) if required(require) => panic!("{require}=1 but {device} cannot be opened: {e}"),
        Err(e) => {
            println!("SKIP: {device}: {e}");
            None
        }
    }
}

/// A buffer on `rt` holding `len` poison bytes.
fn poisoned(rt: &Runtime, len: usize) -> DeviceBuffer {
    rt.upload(&vec![POISON; len]).expect("upload poison")
}

fn check_casts(rt: &Runtime, rng: &mut Rng) {
    for (from, to) in casts() {
        for n in [0usize, 1, 2, 3, 5, 63, 64, 65, 257, 1001] {
            let src = rng.elements(from, n);
            let mut want = vec![0u8; n * to.size_bytes()];
            cpu::cast(&src, from, &mut want, to).expect("cpu cast");
            let dev_src = rt.upload(&src).expect("upload");
            let mut dev_dst = poisoned(rt, want.len());
            rt.cast(&dev_src, from, &mut dev_dst, to).expect("cast");
            let got = rt.to_vec(&dev_dst).expect("download");
            assert_same(
                &format!("{} cast {from}->{to}, n={n}", rt.device()),
                &got,
                &want,
                to.size_bytes(),
            );
        }
    }
    // Identity casts copy; unsupported ones and bad sizes are refused.
    let src = rng.elements(DType::F16, 9);
    let dev_src = rt.upload(&src).expect("upload");
    let mut same = poisoned(rt, src.len());
    rt.cast(&dev_src, DType::F16, &mut same, DType::F16)
        .expect("identity");
    assert_eq!(rt.to_vec(&same).expect("download"), src);
    let mut out = poisoned(rt, 9);
    assert!(matches!(
        rt.cast(&dev_src, DType::F16, &mut out, DType::F8E4M3),
        Err(Error::UnsupportedCast { .. })
    ));
    let mut short = poisoned(rt, 17);
    assert!(matches!(
        rt.cast(&dev_src, DType::F16, &mut short, DType::F32),
        Err(Error::SizeMismatch { .. })
    ));
}

fn check_checksums(rt: &Runtime, rng: &mut Rng) {
    for len in [
        0usize,
        1,
        3,
        4,
        5,
        4095,
        4096,
        4097,
        3 * 4096 + 17,
        100_003,
        (1 << 20) + 3,
    ] {
        let data = rng.bytes(len);
        let buf = rt.upload(&data).expect("upload");
        assert_eq!(
            rt.checksum(&buf).expect("checksum"),
            cpu::checksum(&data),
            "{} checksum, len={len}",
            rt.device()
        );
    }
}

fn check_pack(rt: &Runtime, rng: &mut Rng) {
    for _ in 0..25 {
        let layout = rng.layout();
        for elem in [1usize, 2, 4, 8, 3, 6] {
            let storage_len =
                layout.required_elems().expect("reach") * elem + rng.below(6) as usize;
            let storage = rng.bytes(storage_len);
            let n = layout.numel();
            let mut want = vec![0u8; n * elem];
            cpu::pack(&storage, elem, &layout, &mut want).expect("cpu pack");
            let dev_storage = rt.upload(&storage).expect("upload");
            let mut out = poisoned(rt, n * elem);
            match rt.pack(&dev_storage, elem, &layout, &mut out) {
                Ok(()) => {}
                // The largest random layouts (65^4 elements of 8 bytes) pass
                // some adapters' 128 MiB per binding: refused, saying so.
                Err(Error::Unsupported { reason, .. })
                    if storage_len > 128 << 20 && reason.contains("limit") =>
                {
                    continue
                }
                Err(e) => panic!("pack: {e:?}"),
            }
            let what = format!("{} pack {layout:?} elem {elem}", rt.device());
            assert_same(&what, &rt.to_vec(&out).expect("download"), &want, elem);

            let packed = rng.bytes(n * elem);
            let mut want = storage.clone();
            cpu::unpack(&packed, elem, &layout, &mut want).expect("cpu unpack");
            let dev_packed = rt.upload(&packed).expect("upload");
            let mut dev_storage = rt.upload(&storage).expect("upload");
            rt.unpack(&dev_packed, elem, &layout, &mut dev_storage)
                .expect("unpack");
            let what = format!("{} unpack {layout:?} elem {elem}", rt.device());
            assert_same(
                &what,
                &rt.to_vec(&dev_storage).expect("download"),
                &want,
                elem,
            );
        }
    }
    // A 70 × 90 transpose of f32: more elements than one workgroup row.
    let l = Layout::contiguous(&[70, 90])
        .transposed(0, 1)
        .expect("transpose");
    let storage = rng.elements(DType::F32, 70 * 90);
    let mut want = vec![0u8; storage.len()];
    cpu::pack(&storage, 4, &l, &mut want).expect("cpu pack");
    let mut out = poisoned(rt, want.len());
    rt.pack(&rt.upload(&storage).expect("upload"), 4, &l, &mut out)
        .expect("pack");
    assert_same("transpose", &rt.to_vec(&out).expect("download"), &want, 4);
    // Overlapping views are refused off the CPU, and the message says so.
    if !matches!(rt, Runtime::Cpu) {
        let overlapping = Layout::new(&[3, 4], &[1, 1], 0).expect("layout");
        let packed = rt.upload(&[0u8; 12]).expect("upload");
        let mut storage = poisoned(rt, 6);
        let err = rt
            .unpack(&packed, 1, &overlapping, &mut storage)
            .expect_err("overlap");
        assert!(err.to_string().contains("overlap"), "{err}");
    }
}

fn check_copies(rt: &Runtime, rng: &mut Rng) {
    for len in [0usize, 1, 6, 4096 + 3] {
        let data = rng.bytes(len);
        let a = rt.upload(&data).expect("upload");
        let mut b = poisoned(rt, len);
        b.copy_from(&a).expect("copy on device");
        assert_eq!(rt.to_vec(&b).expect("download"), data);
        // Device to host and back.
        let mut host = DeviceBuffer::Host(cpu::AlignedBuffer::zeroed(len));
        host.copy_from(&b).expect("to host");
        let mut c = poisoned(rt, len);
        c.copy_from(&host).expect("from host");
        assert_eq!(rt.to_vec(&c).expect("download"), data);
    }
    let mut wrong = poisoned(rt, 3);
    assert!(wrong
        .copy_from(&rt.upload(&[1, 2]).expect("upload"))
        .is_err());
    rt.synchronize().expect("synchronize");
}

/// A source that hands out bytes in uneven pieces, like a socket.
struct Trickle<'a> {
    data: &'a [u8],
    rng: &'a mut Rng,
}

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let most = 1 + self.rng.below(1 << 20) as usize;
        let n = buf.len().min(self.data.len()).min(most);
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fn check_streams(rt: &Runtime, rng: &mut Rng) {
    for len in [0usize, 1, 5, 4096 + 3, (9 << 20) + 3] {
        let data = rng.bytes(len);
        let mut source = Trickle {
            data: &data,
            rng: &mut *rng,
        };
        let buf = rt.upload_from(&mut source, len).expect("upload_from");
        assert_eq!(buf.len(), len);
        assert_eq!(
            rt.to_vec(&buf).expect("download"),
            data,
            "upload_from, {len} bytes"
        );
        let mut out = Vec::new();
        rt.download_to(&buf, &mut |bytes| {
            assert!(!bytes.is_empty(), "empty piece");
            out.extend_from_slice(bytes);
            Ok(())
        })
        .expect("download_to");
        assert_eq!(out, data, "download_to, {len} bytes");
    }
    // Fed piece by piece, as a reader that must not block does: pieces of
    // one byte up to a few MiB, with pauses.
    for len in [0usize, 1, 5, 4096 + 3, (9 << 20) + 3] {
        let data = rng.bytes(len);
        let mut up = rt.begin_upload(len).expect("begin_upload");
        assert_eq!((up.device(), up.len()), (rt.device(), len));
        let mut at = 0;
        while at < len {
            let bound = if rng.below(2) == 0 { 7 } else { 3 << 20 };
            let most = 1 + rng.below(bound) as usize;
            let space = up.space().expect("space");
            assert!(!space.is_empty(), "no space with {} bytes to go", len - at);
            let n = space.len().min(most).min(len - at);
            space[..n].copy_from_slice(&data[at..at + n]);
            up.advance(n).expect("advance");
            at += n;
            if rng.below(4) == 0 {
                up.pause().expect("pause");
            }
        }
        let buf = up.finish().expect("finish");
        assert_eq!(
            rt.to_vec(&buf).expect("download"),
            data,
            "begin_upload, {len} bytes"
        );
    }
    // An upload dropped half-way, one finished early.
    let mut up = rt.begin_upload(3 << 20).expect("begin_upload");
    up.write(&rng.bytes(1 << 20)).expect("write");
    drop(up);
    let mut up = rt.begin_upload(10).expect("begin_upload");
    up.write(&[1; 9]).expect("write");
    assert!(up.write(&[1; 2]).is_err(), "past the end");
    let err = up.finish().expect_err("a byte short");
    assert!(matches!(err, Error::SizeMismatch { .. }), "{err}");
    // A source that ends early, a sink that fails.
    let err = rt
        .upload_from(&mut &[1u8, 2, 3][..], 4)
        .expect_err("short source");
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(
        err.to_string().contains("ended after 3 of 4 bytes"),
        "{err}"
    );
    let buf = rt.upload(&[1, 2, 3]).expect("upload");
    let err = rt
        .download_to(&buf, &mut |_| Err(std::io::ErrorKind::BrokenPipe.into()))
        .expect_err("failing sink");
    assert!(matches!(err, Error::Io { .. }), "{err}");
    // The staging chunks went back: the next transfer still works.
    let data = rng.bytes(3 << 20);
    let buf = rt
        .upload_from(&mut &data[..], data.len())
        .expect("upload_from");
    assert_eq!(rt.to_vec(&buf).expect("download"), data);
}

/// Ranges read back against slices of the data: odd offsets and lengths,
/// empty ones, the whole buffer, outputs poisoned first; ranges past the
/// end are errors that write nothing.
fn check_ranges(rt: &Runtime, rng: &mut Rng) {
    for len in [0usize, 1, 5, 4096 + 3, (1 << 20) + 7, (5 << 20) + 1] {
        let data = rng.bytes(len);
        let buf = rt.upload(&data).expect("upload");
        let mut ranges = vec![(0, len), (len, 0), (len / 2, 0)];
        for _ in 0..8 {
            let from = rng.below(len as u64 + 1) as usize;
            let n = rng.below((len - from) as u64 + 1) as usize;
            ranges.push((from, n));
            // An odd offset, and a length that is not a whole word.
            let from = (from | 1).min(len);
            ranges.push((from, (len - from).min(3)));
        }
        for (from, n) in ranges {
            let mut out = vec![POISON; n];
            rt.download_range(&buf, from, &mut out)
                .expect("download_range");
            assert_same(
                &format!(
                    "{} download_range {n} bytes at {from} of {len}",
                    rt.device()
                ),
                &out,
                &data[from..from + n],
                1,
            );
        }
        for (from, n) in [(len, 1), (len / 2, len - len / 2 + 1), (usize::MAX, 2)] {
            let mut out = vec![POISON; n];
            let err = rt
                .download_range(&buf, from, &mut out)
                .expect_err("past the end");
            assert!(matches!(err, Error::SizeMismatch { .. }), "{err}");
            assert!(out.iter().all(|&b| b == POISON), "written before the check");
        }
    }
}

fn check_backend(rt: &Runtime) {
    let mut rng = Rng::fresh(&rt.device().to_string());
    check_casts(rt, &mut rng);
    check_checksums(rt, &mut rng);
    check_pack(rt, &mut rng);
    check_copies(rt, &mut rng);
    check_ranges(rt, &mut rng);
    check_streams(rt, &mut rng);
}

#[test]
fn cpu_runtime_matches_the_cpu_kernels() {
    check_backend(&Runtime::open(Device::Cpu).expect("cpu"));
}

/// Every adapter listed (on a host without a GPU: lavapipe on Vulkan and
/// llvmpipe on GL; `WGPU_BACKEND` narrows the list).
#[test]
fn wgpu_kernels_match_the_cpu_reference() {
    let adapters = tensorferry_kernels::runtime::wgpu::probe().devices;
    if adapters.is_empty() {
        // Fails under TENSORFERRY_REQUIRE_WGPU=1, else prints why.
        let _ = runtime(Device::wgpu(0), "TENSORFERRY_REQUIRE_WGPU");
    }
    for a in adapters {
        println!("wgpu:{} is {} on {}", a.index, a.name, a.backend);
        let rt = Runtime::open(Device::wgpu(a.index)).expect("open a listed adapter");
        check_backend(&rt);
    }
}

#[test]
fn wgpu_reads_any_range_and_writes_whole_words() {
    let Some(Runtime::Wgpu(rt)) = runtime(Device::wgpu(0), "TENSORFERRY_REQUIRE_WGPU") else {
        return;
    };
    let data: Vec<u8> = (0..23).collect();
    let mut buf = rt.upload(&data).expect("upload");
    let mut part = [0u8; 5];
    rt.download_range(&buf, 7, &mut part)
        .expect("unaligned read");
    assert_eq!(part, [7, 8, 9, 10, 11]);
    rt.write(&mut buf, 4, &[0xff; 8]).expect("aligned write");
    rt.write(&mut buf, 20, &[1, 2, 3])
        .expect("write to the end");
    assert!(rt.write(&mut buf, 3, &[0; 4]).is_err(), "unaligned offset");
    assert!(
        rt.write(&mut buf, 8, &[0; 3]).is_err(),
        "partial word mid-buffer"
    );
    assert!(
        rt.download_range(&buf, 20, &mut [0u8; 4]).is_err(),
        "past the end"
    );
    let mut all = [0u8; 23];
    rt.download_range(&buf, 0, &mut all).expect("read");
    assert_eq!(&all[4..12], &[0xff; 8]);
    assert_eq!(&all[20..], &[1, 2, 3]);
    assert_eq!(&all[..4], &[0, 1, 2, 3]);
}

#[test]
fn cuda_kernels_match_the_cpu_reference() {
    if let Some(rt) = runtime(Device::cuda(0), "TENSORFERRY_REQUIRE_CUDA") {
        check_backend(&rt);
    }
}

#[test]
fn buffers_on_another_device_are_refused_with_the_fix() {
    let cpu = Runtime::Cpu;
    let Some(wgpu) = runtime(Device::wgpu(0), "TENSORFERRY_REQUIRE_WGPU") else {
        return;
    };
    let on_gpu = wgpu.upload(&[0u8; 8]).expect("upload");
    let mut on_host = cpu.alloc(4).expect("alloc");
    let err = cpu
        .cast(&on_gpu, DType::F32, &mut on_host, DType::BF16)
        .expect_err("wrong device");
    assert!(matches!(err, Error::WrongDevice { .. }), "{err}");
    assert!(err.to_string().contains("copy it to cpu first"), "{err}");
    let err = wgpu
        .download_to(&on_host, &mut |_| Ok(()))
        .expect_err("wrong device");
    assert!(matches!(err, Error::WrongDevice { .. }), "{err}");
}
