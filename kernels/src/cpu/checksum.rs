//! The block-structured 64-bit checksum defined in `docs/wire-format.md`.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

const P1: u32 = 0x9E37_79B1;
const P2: u32 = 0x85EB_CA77;
const P3: u32 = 0xC2B2_AE3D;
const P4: u32 = 0x27D4_EB2F;
const P5: u32 = 0x1656_67B1;

const LANES: usize = 16;
/// Bytes per checksum block: blocks are hashed independently, then summed.
pub const CHECKSUM_BLOCK_BYTES: usize = 4096;
const WORDS: usize = CHECKSUM_BLOCK_BYTES / 4;

/// A 64-bit checksum, shown as 16 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Checksum(pub u64);

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl serde::Serialize for Checksum {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Checksum {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for Checksum {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::BadChecksumText {
                text: s.to_string(),
            });
        }
        u64::from_str_radix(s, 16)
            .map(Checksum)
            .map_err(|_| Error::BadChecksumText {
                text: s.to_string(),
            })
    }
}

fn word(bytes: &[u8], i: usize) -> u32 {
    let start = i * 4;
    let mut w = [0u8; 4];
    if let Some(src) = bytes.get(start..) {
        let n = src.len().min(4);
        w[..n].copy_from_slice(&src[..n]);
    }
    u32::from_le_bytes(w)
}

#[inline(always)]
fn lanes_start(k: u32) -> [u32; LANES] {
    let mut acc = [0u32; LANES];
    for (l, a) in acc.iter_mut().enumerate() {
        *a = k
            .wrapping_mul(P5)
            .wrapping_add((l as u32).wrapping_mul(P4))
            .wrapping_add(P1);
    }
    acc
}

#[inline(always)]
fn step(a: u32, w: u32) -> u32 {
    a.wrapping_add(w.wrapping_mul(P2))
        .rotate_left(13)
        .wrapping_mul(P1)
}

#[inline(always)]
fn fold_lanes(k: u32, acc: &[u32; LANES]) -> u32 {
    acc.iter().fold(k.wrapping_mul(P3), |h, &a| {
        (h ^ a).rotate_left(17).wrapping_mul(P4).wrapping_add(P5)
    })
}

/// The hash of block `k` (at most 4096 bytes; a short block is zero-padded).
/// The plain definition: the reference the fast path is tested against.
fn block_hash(k: u32, block: &[u8]) -> u32 {
    let mut acc = lanes_start(k);
    for round in 0..WORDS / LANES {
        for (l, a) in acc.iter_mut().enumerate() {
            *a = step(*a, word(block, round * LANES + l));
        }
    }
    fold_lanes(k, &acc)
}

/// Blocks hashed side by side: their lanes are independent, so the
/// multiply latency of one block hides behind the others'.
const INTERLEAVE: usize = 4;

/// `(lo, hi)` over the whole blocks of `bytes` (a multiple of 4096 bytes),
/// the first of which is block `first`.
#[inline(always)]
fn full_block_sums(first: u32, bytes: &[u8]) -> (u32, u32) {
    let mut lo = 0u32;
    let mut hi = 0u32;
    let mut add = |k: u32, h: u32| {
        lo = lo.wrapping_add(h);
        hi = hi.wrapping_add(h.wrapping_mul(k.wrapping_mul(2).wrapping_add(1)));
    };
    let groups = bytes.chunks_exact(INTERLEAVE * CHECKSUM_BLOCK_BYTES);
    let rest = groups.remainder();
    let mut k = first;
    for group in groups {
        let mut acc = [[0u32; LANES]; INTERLEAVE];
        for (b, a) in acc.iter_mut().enumerate() {
            *a = lanes_start(k.wrapping_add(b as u32));
        }
        for round in 0..WORDS / LANES {
            for (b, a) in acc.iter_mut().enumerate() {
                let at = b * CHECKSUM_BLOCK_BYTES + round * LANES * 4;
                let chunk: &[u8; LANES * 4] = group[at..at + LANES * 4]
                    .try_into()
                    .expect("a round is 64 bytes");
                for (l, a) in a.iter_mut().enumerate() {
                    let w = u32::from_le_bytes([
                        chunk[l * 4],
                        chunk[l * 4 + 1],
                        chunk[l * 4 + 2],
                        chunk[l * 4 + 3],
                    ]);
                    *a = step(*a, w);
                }
            }
        }
        for (b, a) in acc.iter().enumerate() {
            let kb = k.wrapping_add(b as u32);
            add(kb, fold_lanes(kb, a));
        }
        k = k.wrapping_add(INTERLEAVE as u32);
    }
    for block in rest.chunks_exact(CHECKSUM_BLOCK_BYTES) {
        let mut acc = lanes_start(k);
        for chunk in block.chunks_exact(LANES * 4) {
            for (l, a) in acc.iter_mut().enumerate() {
                let w = u32::from_le_bytes([
                    chunk[l * 4],
                    chunk[l * 4 + 1],
                    chunk[l * 4 + 2],
                    chunk[l * 4 + 3],
                ]);
                *a = step(*a, w);
            }
        }
        add(k, fold_lanes(k, &acc));
        k = k.wrapping_add(1);
    }
    (lo, hi)
}

/// [`full_block_sums`] compiled for AVX-512: one vector holds all 16 lanes.
///
/// # Safety
///
/// The processor must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn full_block_sums_avx512(first: u32, bytes: &[u8]) -> (u32, u32) {
    full_block_sums(first, bytes)
}

/// [`full_block_sums`] compiled for AVX2: two vectors of 8 lanes.
///
/// # Safety
///
/// The processor must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn full_block_sums_avx2(first: u32, bytes: &[u8]) -> (u32, u32) {
    full_block_sums(first, bytes)
}

/// The widest vector code this processor runs.
fn full_block_sums_dispatch(first: u32, bytes: &[u8]) -> (u32, u32) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the processor supports AVX-512F: checked on the line above.
            return unsafe { full_block_sums_avx512(first, bytes) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the processor supports AVX2: checked on the line above.
            return unsafe { full_block_sums_avx2(first, bytes) };
        }
    }
    full_block_sums(first, bytes)
}

fn avalanche(mut x: u32) -> u32 {
    x ^= x >> 15;
    x = x.wrapping_mul(P2);
    x ^= x >> 13;
    x = x.wrapping_mul(P3);
    x ^= x >> 16;
    x
}

/// Sums `(lo, hi)` of the blocks in `bytes`, which start at block index `first`.
fn block_sums(first: u32, bytes: &[u8]) -> (u32, u32) {
    let whole = bytes.len() - bytes.len() % CHECKSUM_BLOCK_BYTES;
    let (lo, hi) = full_block_sums_dispatch(first, &bytes[..whole]);
    if whole == bytes.len() {
        return (lo, hi);
    }
    let k = first.wrapping_add((whole / CHECKSUM_BLOCK_BYTES) as u32);
    let h = block_hash(k, &bytes[whole..]);
    (
        lo.wrapping_add(h),
        hi.wrapping_add(h.wrapping_mul(k.wrapping_mul(2).wrapping_add(1))),
    )
}

/// Combines the block sums of a whole buffer of `len` bytes into its
/// checksum. GPU backends compute `(lo, hi)` on the device and finish here.
pub fn finish(lo: u32, hi: u32, len: u64) -> Checksum {
    let lo = avalanche(lo ^ (len as u32));
    let hi = avalanche(hi ^ ((len >> 32) as u32) ^ lo.rotate_left(7));
    Checksum((u64::from(hi) << 32) | u64::from(lo))
}

/// Bytes per parallel work item: 64 blocks.
const PARALLEL_CHUNK: usize = 64 * CHECKSUM_BLOCK_BYTES;

/// The checksum of `bytes` (see `docs/wire-format.md`). Work is split across
/// the rayon pool for large inputs; the result does not depend on how.
///
/// # Examples
///
/// ```
/// use tensorferry_kernels::cpu::checksum;
///
/// let a = checksum(b"hello tensors");
/// let b = checksum(b"hello tensorS");
/// assert_ne!(a, b);
/// assert_eq!(a.to_string().len(), 16);
/// ```
pub fn checksum(bytes: &[u8]) -> Checksum {
    use rayon::prelude::*;
    // Threads pay off once each has a few hundred KiB to hash.
    const PARALLEL_MIN: usize = 512 * 1024;
    let (lo, hi) = if bytes.len() >= PARALLEL_MIN && rayon::current_num_threads() > 1 {
        bytes
            .par_chunks(PARALLEL_CHUNK)
            .enumerate()
            .map(|(i, part)| block_sums((i * (PARALLEL_CHUNK / CHECKSUM_BLOCK_BYTES)) as u32, part))
            .reduce(
                || (0, 0),
                |(a, b), (c, d)| (a.wrapping_add(c), b.wrapping_add(d)),
            )
    } else {
        block_sums(0, bytes)
    };
    finish(lo, hi, bytes.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn every_single_bit_flip_changes_the_checksum() {
        for n in [1, 3, 64, 4095, 4096, 4097, 9000] {
            let mut b = data(n, n as u64);
            let base = checksum(&b);
            for byte in (0..n).step_by((n / 37).max(1)) {
                for bit in 0..8 {
                    b[byte] ^= 1 << bit;
                    assert_ne!(checksum(&b), base, "n={n} byte={byte} bit={bit}");
                    b[byte] ^= 1 << bit;
                }
            }
        }
    }

    #[test]
    fn swapped_blocks_and_trailing_zeros_change_the_checksum() {
        let b = data(4 * CHECKSUM_BLOCK_BYTES, 7);
        let mut swapped = b.clone();
        let (first, rest) = swapped.split_at_mut(CHECKSUM_BLOCK_BYTES);
        first.swap_with_slice(&mut rest[2 * CHECKSUM_BLOCK_BYTES..3 * CHECKSUM_BLOCK_BYTES]);
        assert_ne!(checksum(&swapped), checksum(&b));
        let mut longer = b.clone();
        longer.push(0);
        assert_ne!(checksum(&longer), checksum(&b));
        assert_ne!(checksum(&[]), checksum(&[0]));
    }

    // Computed by an independent Python transcription of docs/wire-format.md.
    const KNOWN_EMPTY: &str = "0000000000000000";
    const KNOWN_NAME: &str = "4d45c51efba86923";
    const KNOWN_10K: &str = "40e3188f0b39a9fb";

    /// The definition, one block at a time with no fast paths.
    fn reference(bytes: &[u8]) -> Checksum {
        let (lo, hi) = bytes.chunks(CHECKSUM_BLOCK_BYTES).enumerate().fold(
            (0u32, 0u32),
            |(lo, hi), (k, block)| {
                let k = k as u32;
                let h = block_hash(k, block);
                (
                    lo.wrapping_add(h),
                    hi.wrapping_add(h.wrapping_mul(k.wrapping_mul(2).wrapping_add(1))),
                )
            },
        );
        finish(lo, hi, bytes.len() as u64)
    }

    #[test]
    fn vector_threaded_and_reference_paths_agree() {
        let b = data(3 * 1024 * 1024 + 12345, 3);
        assert_eq!(checksum(&b), reference(&b));
        for n in [
            0,
            1,
            4095,
            4096,
            4097,
            5 * 4096,
            9 * 4096 + 3,
            64 * 4096 + 1,
        ] {
            assert_eq!(checksum(&b[..n]), reference(&b[..n]), "n={n}");
            // Unaligned start.
            assert_eq!(checksum(&b[1..n + 1]), reference(&b[1..n + 1]), "n={n}+1");
        }
        let whole = 8 * CHECKSUM_BLOCK_BYTES;
        assert_eq!(
            full_block_sums(0, &b[..whole]),
            full_block_sums_dispatch(0, &b[..whole])
        );
    }

    #[test]
    fn known_values_do_not_drift() {
        // Pinned so that an implementation change cannot silently change the
        // definition (these values travel in frames and files).
        assert_eq!(checksum(b"").to_string(), KNOWN_EMPTY);
        assert_eq!(checksum(b"tensorferry").to_string(), KNOWN_NAME);
        assert_eq!(checksum(&data(10_000, 1)).to_string(), KNOWN_10K);
    }

    #[test]
    fn text_form_round_trips_and_rejects_garbage() {
        let c = checksum(b"abc");
        assert_eq!(c.to_string().parse::<Checksum>().expect("hex"), c);
        for bad in [
            "",
            "xyz",
            "0123456789abcdef0",
            "0123456789abcdeg",
            "+123456789abcdef",
        ] {
            assert!(bad.parse::<Checksum>().is_err(), "{bad}");
        }
    }
}
