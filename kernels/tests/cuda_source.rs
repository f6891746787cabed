//! The CUDA C kernels, checked without a GPU: `kernels.cu` is compiled as
//! C++ by the host's g++ behind a header of shims for the CUDA built-ins
//! (`__global__`, `blockIdx`, `atomicAdd`, …), first as a syntax check with
//! every warning an error, then into a small program that runs each kernel
//! over an emulated grid (every block and thread in turn) and is compared,
//! bit for bit, with the CPU reference on fresh random inputs.
//!
//! What this cannot show: NVRTC-specific diagnostics, real concurrency, and
//! speed. With a GPU, `tests/backends.rs` runs the same kernels for real.
//! Without g++ the test prints `SKIP` (CI images carry it).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{assert_same, casts, Rng, POISON};
use tensorferry_kernels::runtime::cuda::KERNELS_SOURCE;
use tensorferry_kernels::{cpu, DType, Layout};

/// Stand-ins for what nvcc/NVRTC provide, enough for `kernels.cu`.
const SHIMS: &str = r#"
#pragma once
#define __global__
#define __device__
#define __forceinline__ inline
struct tf_dim3 { unsigned int x, y, z; };
static tf_dim3 blockIdx, blockDim, threadIdx, gridDim;
static inline int __clzll(long long x) {
    return x == 0 ? 64 : __builtin_clzll((unsigned long long)x);
}
static inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
    unsigned int old = *p;
    *p = old + v;
    return old;
}
"#;

/// Runs one kernel over an emulated grid of 3 blocks × 64 threads, smaller
/// than most inputs so grid-stride loops are exercised.
const DRIVER: &str = r#"
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
#include "shims.h"
#include "kernels.cu"

template <class K, class... A>
static void launch(unsigned grid, unsigned block, K kernel, A... args) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {
        for (unsigned t = 0; t < block; ++t) {
            blockIdx = {b, 0, 0};
            threadIdx = {t, 0, 0};
            kernel(args...);
        }
    }
}

int main(int argc, char** argv) {
    std::vector<unsigned char> in;
    unsigned char buf[65536];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, stdin)) > 0) in.insert(in.end(), buf, buf + got);
    // Keep the input 8-byte aligned whatever its length (typed loads).
    std::vector<u64> aligned(in.size() / 8 + 1);
    unsigned char* data = (unsigned char*)aligned.data();
    for (size_t i = 0; i < in.size(); ++i) data[i] = in[i];
    std::string op = argv[1];
    std::vector<u64> out_words;
    unsigned char* out = nullptr;
    size_t out_len = 0;
    if (op == "cast") {
        std::string name = argv[2];
        size_t from = strtoull(argv[3], nullptr, 10), to = strtoull(argv[4], nullptr, 10);
        u64 n = in.size() / from;
        out_len = n * to;
        out_words.assign(out_len / 8 + 1, 0xA5A5A5A5A5A5A5A5ULL);
        out = (unsigned char*)out_words.data();
#define TF_RUN(NAME, S, D) \
        if (name == #NAME) launch(3, 64, tf_cast_##NAME, (const S*)data, (D*)out, n);
        TF_RUN(f32_f16, u32, u16) TF_RUN(f32_bf16, u32, u16) TF_RUN(f32_f64, u32, u64)
        TF_RUN(f32_f8e4m3, u32, u8) TF_RUN(f32_f8e5m2, u32, u8) TF_RUN(f16_f32, u16, u32)
        TF_RUN(f16_bf16, u16, u16) TF_RUN(f16_f64, u16, u64) TF_RUN(bf16_f32, u16, u32)
        TF_RUN(bf16_f16, u16, u16) TF_RUN(bf16_f64, u16, u64) TF_RUN(f64_f32, u64, u32)
        TF_RUN(f64_f16, u64, u16) TF_RUN(f64_bf16, u64, u16) TF_RUN(f8e4m3_f32, u8, u32)
        TF_RUN(f8e5m2_f32, u8, u32)
    } else if (op == "checksum") {
        out_words.assign(1, 0);
        out = (unsigned char*)out_words.data();
        out_len = 8;
        u64 len = in.size();
        u64 blocks = (len + 4095) / 4096;
        launch(2, 8, tf_checksum_blocks, (const u8*)data, len, 0ULL, blocks, (u32*)out);
    } else {
        // pack|unpack ELEM OFFSET STORAGE_LEN SIZE STRIDE ...
        bool pack = op == "pack";
        u32 elem = (u32)strtoul(argv[2], nullptr, 10);
        u64 offset = strtoull(argv[3], nullptr, 10);
        size_t storage_len = strtoull(argv[4], nullptr, 10);
        std::vector<u64> dims;
        u64 n = 1;
        for (int i = 5; i + 1 < argc; i += 2) {
            dims.push_back(strtoull(argv[i], nullptr, 10));
            dims.push_back(strtoull(argv[i + 1], nullptr, 10));
            n *= dims[dims.size() - 2];
        }
        u32 rank = (u32)(dims.size() / 2);
        dims.push_back(0);
        if (pack) {
            out_len = n * elem;
            out_words.assign(out_len / 8 + 1, 0xA5A5A5A5A5A5A5A5ULL);
            out = (unsigned char*)out_words.data();
            launch(3, 64, tf_pack, (const u8*)data, (u8*)out, n, elem, rank, (const u64*)dims.data(), offset);
        } else {
            // stdin: the storage, then the packed elements.
            out_len = storage_len;
            out_words.assign(out_len / 8 + 1, 0);
            out = (unsigned char*)out_words.data();
            for (size_t i = 0; i < storage_len; ++i) out[i] = data[i];
            std::vector<u64> packed(n * elem / 8 + 1);
            unsigned char* p = (unsigned char*)packed.data();
            for (size_t i = 0; i < n * elem; ++i) p[i] = data[storage_len + i];
            launch(3, 64, tf_unpack, (const u8*)p, (u8*)out, n, elem, rank, (const u64*)dims.data(), offset);
        }
    }
    fwrite(out, 1, out_len, stdout);
    return 0;
}
"#;

fn compiler() -> Option<String> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".to_string());
    Command::new(&cxx)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| cxx)
}

/// A scratch directory holding the shims, the kernels and the driver.
fn workdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tensorferry-cuda-source-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    std::fs::write(dir.join("shims.h"), SHIMS).expect("write shims");
    std::fs::write(dir.join("kernels.cu"), KERNELS_SOURCE).expect("write kernels");
    std::fs::write(
        dir.join("check.cpp"),
        "#include \"shims.h\"\n#include \"kernels.cu\"\n",
    )
    .expect("write check");
    std::fs::write(dir.join("driver.cpp"), DRIVER).expect("write driver");
    dir
}

fn run_driver(driver: &Path, args: &[String], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new(driver)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the emulated kernels");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("driver output");
    writer.join().expect("writer").expect("write input");
    assert!(out.status.success(), "driver failed for {args:?}");
    out.stdout
}

#[test]
fn cuda_kernels_compile_as_cpp_and_match_the_cpu_reference_when_emulated() {
    let Some(cxx) = compiler() else {
        println!("SKIP: no C++ compiler (g++ or $CXX) to check the CUDA sources with");
        return;
    };
    let dir = workdir();
    let syntax = Command::new(&cxx)
        .current_dir(&dir)
        .args([
            "-std=c++17",
            "-fsyntax-only",
            "-Wall",
            "-Wextra",
            "-Werror",
            "check.cpp",
        ])
        .output()
        .expect("run the compiler");
    assert!(
        syntax.status.success(),
        "kernels.cu does not compile:\n{}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    let driver = dir.join("driver");
    let build = Command::new(&cxx)
        .current_dir(&dir)
        .args([
            "-std=c++17",
            "-O1",
            "-fno-strict-aliasing",
            "-o",
            "driver",
            "driver.cpp",
        ])
        .output()
        .expect("run the compiler");
    assert!(
        build.status.success(),
        "the emulation driver does not build:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );

    let mut rng = Rng::fresh("cuda_source");

    // Casts: every pair, odd and zero lengths, more elements than the grid.
    for (from, to) in casts() {
        for n in [0usize, 1, 7, 192, 1237] {
            let src = rng.elements(from, n);
            let mut want = vec![POISON; n * to.size_bytes()];
            cpu::cast(&src, from, &mut want, to).expect("cpu cast");
            let args = vec![
                "cast".to_string(),
                format!("{from}_{to}"),
                from.size_bytes().to_string(),
                to.size_bytes().to_string(),
            ];
            let got = run_driver(&driver, &args, &src);
            assert_same(
                &format!("emulated cast {from}->{to}, n={n}"),
                &got,
                &want,
                to.size_bytes(),
            );
        }
    }

    // Checksum: empty, partial blocks, more blocks than emulated threads.
    for len in [0usize, 1, 3, 4095, 4096, 4097, 20 * 4096 + 5, 70 * 4096] {
        let data = rng.bytes(len);
        let got = run_driver(&driver, &["checksum".to_string()], &data);
        let lo = u32::from_le_bytes(got[0..4].try_into().expect("4 bytes"));
        let hi = u32::from_le_bytes(got[4..8].try_into().expect("4 bytes"));
        assert_eq!(
            cpu::finish_checksum(lo, hi, len as u64),
            cpu::checksum(&data),
            "emulated checksum, len={len}"
        );
    }

    // Pack and unpack: random views, every element size.
    for _ in 0..40 {
        let layout = rng.layout();
        for elem in [1usize, 2, 4, 8, 3] {
            check_pack(&driver, &mut rng, &layout, elem);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn check_pack(driver: &Path, rng: &mut Rng, layout: &Layout, elem: usize) {
    let storage_len = layout.required_elems().expect("reach") * elem + rng.below(5) as usize;
    let storage = rng.bytes(storage_len);
    let n = layout.numel();
    let mut dims_args = Vec::new();
    for (&size, &stride) in layout.shape().iter().zip(layout.strides()) {
        dims_args.push(size.to_string());
        dims_args.push(stride.to_string());
    }
    let head = |op: &str| {
        let mut a = vec![
            op.to_string(),
            elem.to_string(),
            layout.offset().to_string(),
            storage_len.to_string(),
        ];
        a.extend(dims_args.iter().cloned());
        a
    };
    let mut want = vec![POISON; n * elem];
    cpu::pack(&storage, elem, layout, &mut want).expect("cpu pack");
    let got = run_driver(driver, &head("pack"), &storage);
    assert_same(
        &format!("emulated pack {layout:?} elem {elem}"),
        &got,
        &want,
        elem,
    );

    let packed = rng.bytes(n * elem);
    let mut want = storage.clone();
    cpu::unpack(&packed, elem, layout, &mut want).expect("cpu unpack");
    let mut input = storage;
    input.extend_from_slice(&packed);
    let got = run_driver(driver, &head("unpack"), &input);
    assert_same(
        &format!("emulated unpack {layout:?} elem {elem}"),
        &got,
        &want,
        elem,
    );
}

/// The DType names the kernels are named after must stay the dtypes' names.
#[test]
fn cast_kernel_names_follow_dtype_names() {
    for (from, to) in casts() {
        let name = format!("tf_cast_{from}_{to}");
        assert!(
            KERNELS_SOURCE.contains(&format!("TF_CAST({from}_{to},")),
            "{name} missing"
        );
    }
    assert_eq!(DType::F8E4M3.name(), "f8e4m3");
}
