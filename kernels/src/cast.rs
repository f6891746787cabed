//! Casting between floating-point dtypes: which casts exist and, in [`bits`],
//! the exact definition that the CPU, CUDA and WGSL kernels all compute.
//!
//! Every cast rounds to nearest, ties to even; subnormals are produced and
//! consumed exactly (nothing is flushed to zero); infinities stay infinite
//! where the target has them; a NaN stays a NaN of the same sign. The rules
//! for NaN payloads and for the 8-bit formats are in [`bits`] and
//! `docs/kernels.md`. Each backend computes the same bits for every input.
//!
//! # Examples
//!
//! ```
//! use tensorferry_kernels::{cast, cpu, DType};
//!
//! assert!(cast::is_supported(DType::F32, DType::BF16));
//! let src: Vec<u8> = [1.0f32, -2.5, f32::INFINITY].iter().flat_map(|x| x.to_le_bytes()).collect();
//! let mut dst = vec![0u8; cast::output_bytes(src.len(), DType::F32, DType::BF16)?];
//! cpu::cast(&src, DType::F32, &mut dst, DType::BF16)?;
//! assert_eq!(dst, [0x80, 0x3f, 0x20, 0xc0, 0x80, 0x7f]);
//! # Ok::<(), tensorferry_kernels::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::DType;

/// The casts that exist, for error messages and docs.
pub const SUPPORTED: &str = "any dtype to itself (a copy); f16, bf16, f32 and f64 to one another; f32 to and from f8e4m3 and f8e5m2";

/// True when a kernel casts `from` to `to` (see [`SUPPORTED`]).
pub const fn is_supported(from: DType, to: DType) -> bool {
    use DType::*;
    if from as u8 == to as u8 {
        return true;
    }
    matches!(
        (from, to),
        (F16 | BF16 | F32 | F64, F16 | BF16 | F32 | F64)
            | (F32, F8E4M3 | F8E5M2)
            | (F8E4M3 | F8E5M2, F32)
    )
}

/// Checks that the cast exists.
///
/// # Errors
///
/// [`Error::UnsupportedCast`] naming both dtypes and the casts that exist.
pub fn check(from: DType, to: DType) -> Result<()> {
    if is_supported(from, to) {
        Ok(())
    } else {
        Err(Error::UnsupportedCast { from, to })
    }
}

/// The number of bytes a cast of `src_bytes` bytes of `from` to `to` writes.
///
/// # Errors
///
/// [`Error::UnsupportedCast`] for a cast that does not exist, and
/// [`Error::SizeMismatch`] when `src_bytes` is not a whole number of elements.
pub fn output_bytes(src_bytes: usize, from: DType, to: DType) -> Result<usize> {
    check(from, to)?;
    let elem = from.size_bytes();
    if src_bytes % elem != 0 {
        return Err(Error::SizeMismatch {
            op: "cast",
            what: "source",
            expected: src_bytes - src_bytes % elem,
            actual: src_bytes,
        });
    }
    // The target is at most twice as wide as the source (f32 -> f64), so
    // this only overflows for inputs larger than the address space.
    (src_bytes / elem)
        .checked_mul(to.size_bytes())
        .ok_or_else(|| Error::BadLayout("the cast's output size overflows".into()))
}

/// Checks a cast's arguments: the cast exists, `src` holds whole elements and
/// `dst` is exactly the size [`output_bytes`] gives. Returns the element count.
pub(crate) fn check_sizes(src: usize, from: DType, dst: usize, to: DType) -> Result<usize> {
    let want = output_bytes(src, from, to)?;
    if dst != want {
        return Err(Error::SizeMismatch {
            op: "cast",
            what: "destination",
            expected: want,
            actual: dst,
        });
    }
    Ok(src / from.size_bytes())
}

/// The scalar definition of every cast, on bit patterns.
///
/// These functions are the specification the kernels implement: the CPU
/// kernel calls them (or the `half` crate where the two agree, which the
/// tests check exhaustively), and the CUDA and WGSL sources are line-by-line
/// translations of [`narrow`](self) and [`widen`](self) below.
///
/// - Narrowing rounds to nearest, ties to even, through subnormals; a result
///   past the largest finite value becomes infinity (f16, bf16, f32), or the
///   largest finite value in the saturating 8-bit formats (f8e4m3: ±448,
///   f8e5m2: ±57344).
/// - Infinity narrows to infinity, except in f8e4m3, which has none: ±448.
///   f8e5m2 keeps its infinities (the ONNX `saturate` convention).
/// - A NaN keeps its sign. Into f16, bf16, f32 and f64 its payload keeps its
///   top bits and the quiet bit is set (what x86 and Arm hardware do); into
///   either 8-bit format it becomes the canonical `0x7f` (or `0xff`).
/// - Widening is exact. NaN payloads move to the top of the wider mantissa
///   with the quiet bit set; f8e4m3's NaN (`0x7f`) becomes `0x7ff00000`.
pub mod bits {
    /// A binary floating-point format.
    #[derive(Clone, Copy)]
    struct Format {
        exp: u32,
        man: u32,
        /// f8e4m3fn: no infinities, one NaN (all ones), saturating.
        finite_only: bool,
        /// Finite overflow gives the largest finite value, not infinity.
        saturating: bool,
    }

    const F64: Format = Format::ieee(11, 52);
    const F32: Format = Format::ieee(8, 23);
    const F16: Format = Format::ieee(5, 10);
    const BF16: Format = Format::ieee(8, 7);
    const E4M3: Format = Format {
        exp: 4,
        man: 3,
        finite_only: true,
        saturating: true,
    };
    const E5M2: Format = Format {
        exp: 5,
        man: 2,
        finite_only: false,
        saturating: true,
    };

    impl Format {
        const fn ieee(exp: u32, man: u32) -> Self {
            Self {
                exp,
                man,
                finite_only: false,
                saturating: false,
            }
        }
        const fn bias(self) -> i64 {
            (1 << (self.exp - 1)) - 1
        }
        const fn inf_code(self) -> u64 {
            ((1 << self.exp) - 1) << self.man
        }
        const fn max_finite(self) -> u64 {
            if self.finite_only {
                self.inf_code() | ((1 << self.man) - 2)
            } else {
                self.inf_code() - 1
            }
        }
        const fn nan(self, payload: u64) -> u64 {
            if self.saturating {
                (1 << (self.exp + self.man)) - 1
            } else {
                self.inf_code() | (1 << (self.man - 1)) | payload
            }
        }
    }

    /// `m >> shift`, rounded to nearest, ties to even.
    #[inline(always)]
    const fn round_shift(m: u64, shift: u32) -> u64 {
        if shift == 0 {
            return m;
        }
        if shift >= 64 {
            return 0;
        }
        let q = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        if rem > half || (rem == half && q & 1 == 1) {
            q + 1
        } else {
            q
        }
    }

    /// Rounds `x` in format `s` to the narrower format `d`.
    #[inline(always)]
    const fn narrow(x: u64, s: Format, d: Format) -> u64 {
        let width = s.exp + s.man;
        let out_sign = ((x >> width) & 1) << (d.exp + d.man);
        let e = ((x >> s.man) & ((1 << s.exp) - 1)) as i64;
        let mut m = x & ((1 << s.man) - 1);
        if e == (1 << s.exp) - 1 {
            if m != 0 {
                return out_sign | d.nan(m >> (s.man - d.man));
            }
            return out_sign
                | if d.finite_only {
                    d.max_finite()
                } else {
                    d.inf_code()
                };
        }
        // The value is m × 2^(e_eff − bias − man), with the implicit bit in m.
        let e_eff = if e == 0 {
            1
        } else {
            m |= 1 << s.man;
            e
        };
        let t = e_eff - s.bias() + d.bias();
        let drop = s.man - d.man;
        let r = if t >= 1 {
            // The implicit bit lands on bit `d.man`, adding one to the
            // exponent field `t - 1`; a rounding carry moves on into it.
            (((t - 1) as u64) << d.man) + round_shift(m, drop)
        } else {
            round_shift(m, drop + (1 - t) as u32)
        };
        if r > d.max_finite() {
            return out_sign
                | if d.saturating {
                    d.max_finite()
                } else {
                    d.inf_code()
                };
        }
        out_sign | r
    }

    /// Converts `x` in format `s` exactly to the wider format `d`.
    #[inline(always)]
    const fn widen(x: u64, s: Format, d: Format) -> u64 {
        let width = s.exp + s.man;
        let out_sign = ((x >> width) & 1) << (d.exp + d.man);
        let abs = x & ((1 << width) - 1);
        let e = (abs >> s.man) as i64;
        let m = abs & ((1 << s.man) - 1);
        let shift = d.man - s.man;
        let special = if s.finite_only {
            abs == (1 << width) - 1
        } else {
            e == (1 << s.exp) - 1
        };
        if special {
            if s.finite_only || m != 0 {
                return out_sign | d.inf_code() | (1 << (d.man - 1)) | (m << shift);
            }
            return out_sign | d.inf_code();
        }
        if s.exp == d.exp {
            // Same exponent range (bf16 -> f32): subnormals stay subnormal.
            return out_sign | (abs << shift);
        }
        if e == 0 {
            if m == 0 {
                return out_sign;
            }
            // Subnormal: normalise so the top set bit becomes the implicit one.
            let p = 63 - m.leading_zeros() as i64;
            let field = p + 1 - s.bias() - s.man as i64 + d.bias();
            let man = (m ^ (1 << p)) << (d.man as i64 - p);
            return out_sign | ((field as u64) << d.man) | man;
        }
        let field = e - s.bias() + d.bias();
        out_sign | ((field as u64) << d.man) | (m << shift)
    }

    /// f32 → f16.
    #[inline]
    pub const fn f32_to_f16(x: u32) -> u16 {
        narrow(x as u64, F32, F16) as u16
    }
    /// f32 → bf16.
    #[inline]
    pub const fn f32_to_bf16(x: u32) -> u16 {
        narrow(x as u64, F32, BF16) as u16
    }
    /// f32 → f8e4m3 (saturating; NaN → `0x7f`).
    #[inline]
    pub const fn f32_to_e4m3(x: u32) -> u8 {
        narrow(x as u64, F32, E4M3) as u8
    }
    /// f32 → f8e5m2 (finite overflow saturates, infinities stay; NaN → `0x7f`).
    #[inline]
    pub const fn f32_to_e5m2(x: u32) -> u8 {
        narrow(x as u64, F32, E5M2) as u8
    }
    /// f64 → f32.
    #[inline]
    pub const fn f64_to_f32(x: u64) -> u32 {
        narrow(x, F64, F32) as u32
    }
    /// f64 → f16, rounded once (not through f32, which could round twice).
    #[inline]
    pub const fn f64_to_f16(x: u64) -> u16 {
        narrow(x, F64, F16) as u16
    }
    /// f64 → bf16, rounded once.
    #[inline]
    pub const fn f64_to_bf16(x: u64) -> u16 {
        narrow(x, F64, BF16) as u16
    }
    /// f16 → f32 (exact).
    #[inline]
    pub const fn f16_to_f32(x: u16) -> u32 {
        widen(x as u64, F16, F32) as u32
    }
    /// bf16 → f32 (exact).
    #[inline]
    pub const fn bf16_to_f32(x: u16) -> u32 {
        widen(x as u64, BF16, F32) as u32
    }
    /// f8e4m3 → f32 (exact).
    #[inline]
    pub const fn e4m3_to_f32(x: u8) -> u32 {
        widen(x as u64, E4M3, F32) as u32
    }
    /// f8e5m2 → f32 (exact).
    #[inline]
    pub const fn e5m2_to_f32(x: u8) -> u32 {
        widen(x as u64, E5M2, F32) as u32
    }
    /// f32 → f64 (exact).
    #[inline]
    pub const fn f32_to_f64(x: u32) -> u64 {
        widen(x as u64, F32, F64)
    }
    /// f16 → f64 (exact).
    #[inline]
    pub const fn f16_to_f64(x: u16) -> u64 {
        widen(x as u64, F16, F64)
    }
    /// bf16 → f64 (exact).
    #[inline]
    pub const fn bf16_to_f64(x: u16) -> u64 {
        widen(x as u64, BF16, F64)
    }
    /// f16 → bf16: exactly to f32, then rounded once.
    #[inline]
    pub const fn f16_to_bf16(x: u16) -> u16 {
        f32_to_bf16(f16_to_f32(x))
    }
    /// bf16 → f16: exactly to f32, then rounded once.
    #[inline]
    pub const fn bf16_to_f16(x: u16) -> u16 {
        f32_to_f16(bf16_to_f32(x))
    }
}

#[cfg(test)]
mod tests {
    use super::bits::*;
    use super::*;

    #[test]
    fn supported_pairs_are_the_documented_ones() {
        let floats = [DType::F16, DType::BF16, DType::F32, DType::F64];
        for a in DType::ALL {
            for b in DType::ALL {
                let want = a == b
                    || (floats.contains(&a) && floats.contains(&b))
                    || (a == DType::F32 && matches!(b, DType::F8E4M3 | DType::F8E5M2))
                    || (b == DType::F32 && matches!(a, DType::F8E4M3 | DType::F8E5M2));
                assert_eq!(is_supported(a, b), want, "{a} -> {b}");
            }
        }
        let err = check(DType::F64, DType::F8E4M3).expect_err("unsupported");
        assert!(err.to_string().contains("f64 to f8e4m3"), "{err}");
        assert!(output_bytes(7, DType::F32, DType::F16).is_err());
        assert_eq!(output_bytes(8, DType::F32, DType::F64).expect("ok"), 16);
    }

    #[test]
    fn e4m3_matches_the_ocp_table() {
        // (f32 value, e4m3fn byte)
        for (x, b) in [
            (0.0f32, 0x00u8),
            (-0.0, 0x80),
            (1.0, 0x38),
            (-2.0, 0xc0),
            (448.0, 0x7e),
            (464.0, 0x7e), // overflow saturates
            (1.0e9, 0x7e), // overflow saturates
            (f32::INFINITY, 0x7e),
            (f32::NEG_INFINITY, 0xfe),
            (f32::NAN, 0x7f),
            (-f32::NAN, 0xff),
            (2.0f32.powi(-6), 0x08),         // smallest normal
            (2.0f32.powi(-9), 0x01),         // smallest subnormal
            (2.0f32.powi(-10), 0x00),        // half of it: tie to even (0)
            (3.0 * 2.0f32.powi(-10), 0x02),  // 1.5 ulp: tie to even (2)
            (0.875 * 2.0f32.powi(-6), 0x07), // largest subnormal
            (1.0625, 0x38),                  // tie between 1.0 and 1.125: to even
            (1.1875, 0x3a),                  // tie between 1.125 and 1.25: to even
        ] {
            assert_eq!(f32_to_e4m3(x.to_bits()), b, "{x}");
        }
        for b in 0..=255u8 {
            let x = f32::from_bits(e4m3_to_f32(b));
            if b & 0x7f == 0x7f {
                assert!(x.is_nan());
                assert_eq!(e4m3_to_f32(b), u32::from(b >> 7) << 31 | 0x7ff0_0000);
            } else {
                assert_eq!(f32_to_e4m3(x.to_bits()), b, "round trip {b:#x}");
            }
        }
        assert_eq!(f32::from_bits(e4m3_to_f32(0x7e)), 448.0);
        assert_eq!(f32::from_bits(e4m3_to_f32(0x01)), 2.0f32.powi(-9));
    }

    #[test]
    fn e5m2_saturates_finite_overflow_and_keeps_infinities() {
        for (x, b) in [
            (57344.0f32, 0x7bu8),
            (61440.0, 0x7b), // tie that would round to infinity: saturates
            (1.0e9, 0x7b),
            (-1.0e9, 0xfb),
            (f32::INFINITY, 0x7c),
            (f32::NEG_INFINITY, 0xfc),
            (f32::NAN, 0x7f),
            (2.0f32.powi(-16), 0x01),
            (1.0, 0x3c),
        ] {
            assert_eq!(f32_to_e5m2(x.to_bits()), b, "{x}");
        }
        for b in 0..=255u8 {
            let x = f32::from_bits(e5m2_to_f32(b));
            // e5m2 is the top byte of an f16: widening agrees with f16's.
            assert_eq!(e5m2_to_f32(b), f16_to_f32(u16::from(b) << 8), "{b:#x}");
            if !x.is_nan() {
                assert_eq!(f32_to_e5m2(x.to_bits()), b, "round trip {b:#x}");
            }
        }
    }

    #[test]
    fn f64_to_half_rounds_once() {
        // 1 + 2^-11 + 2^-40 lies just above the tie between 1 and 1 + 2^-10:
        // the correct f16 is 1 + 2^-10. Through f32 (or ignoring the low
        // mantissa word) it is a tie and rounds to even, giving 1.0.
        let x = 1.0f64 + 2.0f64.powi(-11) + 2.0f64.powi(-40);
        assert_eq!(f64_to_f16(x.to_bits()), 0x3c01);
        let y = 1.0f64 + 2.0f64.powi(-8) + 2.0f64.powi(-40);
        assert_eq!(f64_to_bf16(y.to_bits()), 0x3f81);
    }
}
