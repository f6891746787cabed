//! Test inputs shared by the backend tests: fresh random bytes each run (the
//! seed is printed; `TENSORFERRY_TEST_SEED=N` replays one), rich in the
//! values casts get wrong: NaNs with payloads, infinities, signed zeros,
//! subnormals, rounding ties and overflow boundaries.

#![allow(dead_code)]

use tensorferry_kernels::{DType, Layout};

/// SplitMix64: small, fast and good enough for test inputs.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from `TENSORFERRY_TEST_SEED` or the clock; prints the seed.
    pub fn fresh(test: &str) -> Self {
        let seed = std::env::var("TENSORFERRY_TEST_SEED")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        println!("{test}: seed {seed} (TENSORFERRY_TEST_SEED={seed} replays it)");
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// `n` elements of `dtype`, a third of them special values.
    pub fn elements(&mut self, dtype: DType, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n * dtype.size_bytes());
        for _ in 0..n {
            let bits = match dtype {
                DType::F32 => u64::from(self.f32_bits()),
                DType::F64 => self.f64_bits(),
                DType::F16 => u64::from(self.narrow_bits(5, 10)),
                DType::BF16 => u64::from(self.narrow_bits(8, 7)),
                _ => self.next(),
            };
            out.extend_from_slice(&bits.to_le_bytes()[..dtype.size_bytes()]);
        }
        out
    }

    fn f32_bits(&mut self) -> u32 {
        let sign = (self.next() as u32) & 0x8000_0000;
        let r = self.next() as u32;
        let body = match self.below(12) {
            0 => 0x7f80_0000 | (r & 0x7f_ffff) | 1, // NaN, any payload (quiet or signalling)
            1 => 0x7f80_0000,                       // infinity
            2 => 0,                                 // zero
            3 => r & 0x7f_ffff,                     // subnormal
            // Near the 8-bit and 16-bit formats' ranges, with ties: low
            // mantissa bits from a small set.
            4 | 5 => {
                let e = 100 + self.below(60) as u32; // 2^-27 .. 2^32
                let m = match self.below(4) {
                    0 => r & 0x7f_ffff,
                    1 => (r & 0x7f_e000) | 0x1000,    // f16 tie
                    2 => (r & 0x7f_0000) | 0x8000,    // bf16 tie
                    _ => (r & 0x70_0000) | 0x08_0000, // e4m3 tie
                };
                (e << 23) | m
            }
            6 => 0x477f_e000 + (r & 0x3fff), // around f16 max (65504)
            7 => 0x43e0_0000 + (r & 0x7_ffff), // around 448
            8 => 0x4760_0000 + (r & 0x7_ffff), // around 57344
            _ => r & 0x7fff_ffff,
        };
        sign | body
    }

    fn f64_bits(&mut self) -> u64 {
        let sign = self.next() & (1 << 63);
        let r = self.next();
        let body = match self.below(10) {
            0 => 0x7ff0_0000_0000_0000 | (r & 0xf_ffff_ffff_ffff) | 1,
            1 => 0x7ff0_0000_0000_0000,
            2 => 0,
            3 => r & 0xf_ffff_ffff_ffff,
            4 | 5 => {
                let e = 1023 - 160 + self.below(320);
                // Ties of f32, f16 and bf16 with a sticky bit only in the low word.
                let m = match self.below(4) {
                    0 => r & 0xf_ffff_ffff_ffff,
                    1 => (r & 0xf_ffff_e000_0000) | 0x1000_0000 | (r & 1),
                    2 => (r & 0xf_fc00_0000_0000) | 0x200_0000_0000 | (r & 0xffff),
                    _ => (r & 0xf_e000_0000_0000) | 0x1000_0000_0000 | (r & 3),
                };
                (e << 52) | m
            }
            6 => (1023 - 150 + self.below(30)) << 52 | (r & 0xf_ffff_ffff_ffff), // f32/f16 subnormal range
            _ => r & 0x7fff_ffff_ffff_ffff,
        };
        sign | body
    }

    fn narrow_bits(&mut self, exp: u32, man: u32) -> u16 {
        let width = exp + man;
        let r = self.next() as u16;
        let sign = r & (1 << width);
        let all = (1u16 << width) - 1;
        let inf = ((1u16 << exp) - 1) << man;
        let body = match self.below(8) {
            0 => inf | (r & ((1 << man) - 1)) | 1,
            1 => inf,
            2 => 0,
            3 => r & ((1 << man) - 1),
            _ => (self.next() as u16) & all,
        };
        sign | (body & all)
    }

    /// A random view: rank 0..=4, sizes 0..=9 (sometimes 33 or 65 so
    /// tiling and grids get exercised), sliced and transposed; no two
    /// elements share storage.
    pub fn layout(&mut self) -> Layout {
        let rank = self.below(5) as usize;
        let shape: Vec<usize> = (0..rank)
            .map(|_| match self.below(8) {
                0 => 33,
                1 => 65,
                _ => self.below(10) as usize,
            })
            .collect();
        let mut l = Layout::contiguous(&shape);
        if rank >= 2 {
            for _ in 0..self.below(3) {
                let (a, b) = (
                    self.below(rank as u64) as usize,
                    self.below(rank as u64) as usize,
                );
                l = l.transposed(a, b).expect("in range");
            }
        }
        if rank >= 1 && self.below(2) == 0 {
            let d = self.below(rank as u64) as usize;
            let size = l.shape()[d];
            let a = self.below(size as u64 + 1) as usize;
            let b = a + self.below((size - a) as u64 + 1) as usize;
            l = l.narrowed(d, a, b).expect("in range");
        }
        l
    }
}

/// Bytes that fill an output before a kernel runs: an element a kernel
/// forgets to write keeps this and fails the comparison.
pub const POISON: u8 = 0xA5;

/// The casts that exist (`cast::is_supported`), identities excluded.
pub fn casts() -> Vec<(DType, DType)> {
    let mut v = Vec::new();
    for a in DType::ALL {
        for b in DType::ALL {
            if a != b && tensorferry_kernels::cast::is_supported(a, b) {
                v.push((a, b));
            }
        }
    }
    v
}

/// Compares two outputs and names the first differing element.
pub fn assert_same(what: &str, got: &[u8], want: &[u8], elem: usize) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        let e = i / elem.max(1);
        let at = e * elem.max(1);
        panic!(
            "{what}: element {e} differs: got {:02x?}, want {:02x?}",
            &got[at..(at + elem).min(got.len())],
            &want[at..(at + elem).min(want.len())]
        );
    }
}
