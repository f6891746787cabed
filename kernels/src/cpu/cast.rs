//! The CPU cast kernel: the reference for the CUDA and WGSL ones.
//!
//! f16 and bf16 to and from f32 (and up to f64) go through the `half` crate,
//! which uses the F16C instructions where the processor has them; the tests
//! check, over every 16-bit input and millions of random wider ones, that it
//! computes exactly [`crate::cast::bits`]. Casts `half` does not round
//! correctly (f64 to f16 or bf16: it drops the low mantissa word or goes
//! through f32) and the 8-bit formats use [`crate::cast::bits`] directly.

use bytemuck::Pod;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::cast::{bits, check_sizes};
use crate::error::Result;
use crate::DType;

/// Elements per work item: large enough to amortise scheduling, small enough
/// that an unaligned chunk's bounce buffers stay in cache.
const CHUNK_ELEMS: usize = 16 * 1024;
/// Below this many source bytes one thread does the whole cast.
const PARALLEL_BYTES: usize = 1 << 20;

/// Casts the elements of `src` (dtype `from`) into `dst` (dtype `to`),
/// little-endian, element by element.
///
/// Neither slice needs any alignment. Large casts run on the rayon pool; the
/// result does not depend on how the work is split.
///
/// # Errors
///
/// [`Error::UnsupportedCast`](crate::Error::UnsupportedCast) for a cast that
/// does not exist (see [`crate::cast::SUPPORTED`]);
/// [`Error::SizeMismatch`](crate::Error::SizeMismatch) when `src` is not a
/// whole number of elements or `dst` is not exactly as long as the result.
///
/// # Examples
///
/// ```
/// use tensorferry_kernels::{cpu, DType};
///
/// let src = 1.5f64.to_le_bytes();
/// let mut dst = [0u8; 2];
/// cpu::cast(&src, DType::F64, &mut dst, DType::F16)?;
/// assert_eq!(u16::from_le_bytes(dst), 0x3e00);
/// # Ok::<(), tensorferry_kernels::Error>(())
/// ```
pub fn cast(src: &[u8], from: DType, dst: &mut [u8], to: DType) -> Result<()> {
    check_sizes(src.len(), from, dst.len(), to)?;
    use DType::*;
    match (from, to) {
        _ if from == to => copy(src, dst),
        (F32, F16) => run(src, dst, |s: &[f32], d: &mut [f16]| {
            d.convert_from_f32_slice(s)
        }),
        (F32, BF16) => run(src, dst, |s: &[f32], d: &mut [bf16]| {
            d.convert_from_f32_slice(s)
        }),
        (F16, F32) => run(src, dst, |s: &[f16], d: &mut [f32]| {
            s.convert_to_f32_slice(d)
        }),
        (BF16, F32) => run(src, dst, |s: &[bf16], d: &mut [f32]| {
            s.convert_to_f32_slice(d)
        }),
        (F16, F64) => run(src, dst, |s: &[f16], d: &mut [f64]| {
            s.convert_to_f64_slice(d)
        }),
        (BF16, F64) => run(src, dst, |s: &[bf16], d: &mut [f64]| {
            s.convert_to_f64_slice(d)
        }),
        (F16, BF16) => map(src, dst, |x: f16| bf16::from_f32(x.to_f32())),
        (BF16, F16) => map(src, dst, |x: bf16| f16::from_f32(x.to_f32())),
        // Hardware conversions between f32 and f64 round correctly; only a
        // NaN's payload is left to the platform, so NaNs take the defined path.
        (F32, F64) => map(src, dst, |x: f32| {
            if x.is_nan() {
                f64::from_bits(bits::f32_to_f64(x.to_bits()))
            } else {
                f64::from(x)
            }
        }),
        (F64, F32) => map(src, dst, |x: f64| {
            if x.is_nan() {
                f32::from_bits(bits::f64_to_f32(x.to_bits()))
            } else {
                x as f32
            }
        }),
        (F64, F16) => map(src, dst, |x: u64| bits::f64_to_f16(x)),
        (F64, BF16) => map(src, dst, |x: u64| bits::f64_to_bf16(x)),
        (F32, F8E4M3) => map(src, dst, |x: u32| bits::f32_to_e4m3(x)),
        (F32, F8E5M2) => map(src, dst, |x: u32| bits::f32_to_e5m2(x)),
        (F8E4M3, F32) => map(src, dst, |x: u8| E4M3_TO_F32[usize::from(x)]),
        (F8E5M2, F32) => map(src, dst, |x: u8| E5M2_TO_F32[usize::from(x)]),
        _ => unreachable!("check_sizes accepted only supported casts"),
    }
    Ok(())
}

/// Every f8e4m3 value widened, computed at compile time from the definition.
static E4M3_TO_F32: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = bits::e4m3_to_f32(i as u8);
        i += 1;
    }
    t
};

/// Every f8e5m2 value widened.
static E5M2_TO_F32: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = bits::e5m2_to_f32(i as u8);
        i += 1;
    }
    t
};

/// A plain copy, split across threads when large.
fn copy(src: &[u8], dst: &mut [u8]) {
    const CHUNK: usize = 1 << 20;
    if src.len() < PARALLEL_BYTES {
        dst.copy_from_slice(src);
    } else {
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| d.copy_from_slice(s));
    }
}

/// Applies `f` to every element.
fn map<S: Pod, D: Pod>(src: &[u8], dst: &mut [u8], f: impl Fn(S) -> D + Sync) {
    run(src, dst, |s: &[S], d: &mut [D]| {
        for (d, &s) in d.iter_mut().zip(s) {
            *d = f(s);
        }
    });
}

/// Runs the slice conversion `f` over matching chunks of `src` and `dst`,
/// in parallel above [`PARALLEL_BYTES`]. Chunks that are not aligned for `S`
/// or `D` go through aligned bounce buffers.
fn run<S: Pod, D: Pod>(src: &[u8], dst: &mut [u8], f: impl Fn(&[S], &mut [D]) + Sync) {
    let s_chunk = CHUNK_ELEMS * std::mem::size_of::<S>();
    let d_chunk = CHUNK_ELEMS * std::mem::size_of::<D>();
    let one = |s: &[u8], d: &mut [u8]| match (
        bytemuck::try_cast_slice::<u8, S>(s),
        bytemuck::try_cast_slice_mut::<u8, D>(d),
    ) {
        (Ok(s), Ok(d)) => f(s, d),
        (s_typed, d_typed) => {
            let n = s.len() / std::mem::size_of::<S>();
            let bounce_s: Vec<S>;
            let s_typed = match s_typed {
                Ok(s) => s,
                Err(_) => {
                    bounce_s = bytemuck::pod_collect_to_vec(s);
                    &bounce_s
                }
            };
            match d_typed {
                Ok(d) => f(s_typed, d),
                Err(_) => {
                    let mut bounce_d: Vec<D> = bytemuck::zeroed_vec(n);
                    f(s_typed, &mut bounce_d);
                    d.copy_from_slice(bytemuck::cast_slice(&bounce_d));
                }
            }
        }
    };
    if src.len() < PARALLEL_BYTES {
        src.chunks(s_chunk)
            .zip(dst.chunks_mut(d_chunk))
            .for_each(|(s, d)| one(s, d));
    } else {
        src.par_chunks(s_chunk)
            .zip(dst.par_chunks_mut(d_chunk))
            .for_each(|(s, d)| one(s, d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cast::bits;

    fn cast_vec(src: &[u8], from: DType, to: DType) -> Vec<u8> {
        let mut dst = vec![0xA5; crate::cast::output_bytes(src.len(), from, to).expect("size")];
        cast(src, from, &mut dst, to).expect("cast");
        dst
    }

    /// A target dtype and the definition's result for an input's bits.
    type Check<T> = (DType, fn(T) -> u64);

    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn every_16_bit_input_matches_the_definition() {
        let all: Vec<u8> = (0..=u16::MAX).flat_map(|x| x.to_le_bytes()).collect();
        for (to, f) in [
            (
                DType::F32,
                &(|x: u16| u64::from(bits::f16_to_f32(x))) as &dyn Fn(u16) -> u64,
            ),
            (DType::F64, &|x| bits::f16_to_f64(x)),
            (DType::BF16, &|x| u64::from(bits::f16_to_bf16(x))),
        ] {
            let out = cast_vec(&all, DType::F16, to);
            for (x, got) in (0..=u16::MAX).zip(out.chunks(to.size_bytes())) {
                let mut g = [0u8; 8];
                g[..got.len()].copy_from_slice(got);
                assert_eq!(u64::from_le_bytes(g), f(x), "f16 {x:#06x} -> {to}");
            }
        }
        for (to, f) in [
            (
                DType::F32,
                &(|x: u16| u64::from(bits::bf16_to_f32(x))) as &dyn Fn(u16) -> u64,
            ),
            (DType::F64, &|x| bits::bf16_to_f64(x)),
            (DType::F16, &|x| u64::from(bits::bf16_to_f16(x))),
        ] {
            let out = cast_vec(&all, DType::BF16, to);
            for (x, got) in (0..=u16::MAX).zip(out.chunks(to.size_bytes())) {
                let mut g = [0u8; 8];
                g[..got.len()].copy_from_slice(got);
                assert_eq!(u64::from_le_bytes(g), f(x), "bf16 {x:#06x} -> {to}");
            }
        }
        // Widening agrees with the hardware (through half) for every non-NaN.
        for x in 0..=u16::MAX {
            let h = f16::from_bits(x);
            if !h.is_nan() {
                assert_eq!(bits::f16_to_f32(x), h.to_f32().to_bits());
            }
        }
    }

    #[test]
    fn every_8_bit_input_matches_the_definition() {
        let all: Vec<u8> = (0..=255u8).collect();
        for (from, f) in [
            (DType::F8E4M3, bits::e4m3_to_f32 as fn(u8) -> u32),
            (DType::F8E5M2, bits::e5m2_to_f32),
        ] {
            let out = cast_vec(&all, from, DType::F32);
            for (x, got) in all.iter().zip(out.chunks(4)) {
                assert_eq!(
                    u32::from_le_bytes(got.try_into().expect("4")),
                    f(*x),
                    "{from} {x:#x}"
                );
            }
        }
    }

    #[test]
    fn random_wide_inputs_match_the_definition() {
        let mut state = 0x2545_F491_4F6C_DD1D_u64;
        let mut f32s: Vec<u32> = (0..1 << 20).map(|_| xorshift(&mut state) as u32).collect();
        // Values near every rounding boundary of the narrow formats.
        for e in 0..256u32 {
            for m in [
                0u32, 1, 0x0fff, 0x1000, 0x1001, 0x2fff, 0x3000, 0x7fff, 0x8000, 0x8001, 0x17fff,
                0x18000, 0x7fffff,
            ] {
                f32s.push((e << 23) | m);
                f32s.push(0x8000_0000 | (e << 23) | m);
            }
        }
        let src: Vec<u8> = f32s.iter().flat_map(|x| x.to_le_bytes()).collect();
        let checks: [Check<u32>; 5] = [
            (DType::F16, |x| u64::from(bits::f32_to_f16(x))),
            (DType::BF16, |x| u64::from(bits::f32_to_bf16(x))),
            (DType::F64, bits::f32_to_f64),
            (DType::F8E4M3, |x| u64::from(bits::f32_to_e4m3(x))),
            (DType::F8E5M2, |x| u64::from(bits::f32_to_e5m2(x))),
        ];
        for (to, f) in checks {
            let out = cast_vec(&src, DType::F32, to);
            for (&x, got) in f32s.iter().zip(out.chunks(to.size_bytes())) {
                let mut g = [0u8; 8];
                g[..got.len()].copy_from_slice(got);
                assert_eq!(u64::from_le_bytes(g), f(x), "f32 {x:#010x} -> {to}");
            }
        }
        let mut f64s: Vec<u64> = (0..1 << 19).map(|_| xorshift(&mut state)).collect();
        for e in (0..2048u64).step_by(3) {
            for m in [
                0u64,
                1,
                1 << 28,
                (1 << 28) + 1,
                (1 << 29) - 1,
                1 << 41,
                (1 << 41) + 1,
                1 << 44,
                (1 << 44) + 1,
                (1 << 52) - 1,
            ] {
                f64s.push((e << 52) | m);
                f64s.push((1 << 63) | (e << 52) | m);
            }
        }
        let src: Vec<u8> = f64s.iter().flat_map(|x| x.to_le_bytes()).collect();
        let checks: [Check<u64>; 3] = [
            (DType::F32, |x| u64::from(bits::f64_to_f32(x))),
            (DType::F16, |x| u64::from(bits::f64_to_f16(x))),
            (DType::BF16, |x| u64::from(bits::f64_to_bf16(x))),
        ];
        for (to, f) in checks {
            let out = cast_vec(&src, DType::F64, to);
            for (&x, got) in f64s.iter().zip(out.chunks(to.size_bytes())) {
                let mut g = [0u8; 8];
                g[..got.len()].copy_from_slice(got);
                assert_eq!(u64::from_le_bytes(g), f(x), "f64 {x:#018x} -> {to}");
            }
        }
        // The definition agrees with the hardware's rounding on non-NaNs.
        for &x in &f64s {
            let v = f64::from_bits(x);
            if !v.is_nan() {
                assert_eq!(bits::f64_to_f32(x), (v as f32).to_bits(), "{x:#x}");
            }
        }
    }

    #[test]
    fn unaligned_and_odd_lengths_and_identity() {
        let vals: Vec<u8> = (0..1001u32)
            .flat_map(|i| (i as f32 * 0.37 - 100.0).to_le_bytes())
            .collect();
        let mut shifted = vec![0u8; vals.len() + 1];
        shifted[1..].copy_from_slice(&vals);
        let want = cast_vec(&vals, DType::F32, DType::BF16);
        let mut out = vec![0u8; want.len() + 1];
        cast(&shifted[1..], DType::F32, &mut out[1..], DType::BF16).expect("unaligned");
        assert_eq!(&out[1..], &want[..]);
        assert_eq!(cast_vec(&vals, DType::F32, DType::F32), vals);
        assert_eq!(cast_vec(&[], DType::F64, DType::F16), Vec::<u8>::new());
        assert!(cast(&vals, DType::F32, &mut [0u8; 3], DType::F16).is_err());
        assert!(cast(&vals, DType::U8, &mut vec![0u8; vals.len() * 4], DType::F32).is_err());
    }

    #[test]
    fn large_casts_split_across_threads_agree_with_small_ones() {
        let n = (PARALLEL_BYTES / 4) * 3 + 7;
        let vals: Vec<u8> = (0..n as u32)
            .flat_map(|i| f32::from_bits(i.wrapping_mul(0x9E37_79B1)).to_le_bytes())
            .collect();
        let big = cast_vec(&vals, DType::F32, DType::F16);
        for (i, chunk) in vals.chunks(4 * 1000).enumerate() {
            let small = cast_vec(chunk, DType::F32, DType::F16);
            assert_eq!(&big[i * 2000..i * 2000 + small.len()], &small[..]);
        }
    }
}
