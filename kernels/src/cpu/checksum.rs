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

/// The hash of block `k` (at most 4096 bytes; a short block is zero-padded).
fn block_hash(k: u32, block: &[u8]) -> u32 {
    let mut acc = [0u32; LANES];
    for (l, a) in acc.iter_mut().enumerate() {
        *a = k
            .wrapping_mul(P5)
            .wrapping_add((l as u32).wrapping_mul(P4))
            .wrapping_add(P1);
    }
    if block.len() == CHECKSUM_BLOCK_BYTES {
        // Full block: 64 rounds of 16 independent lanes, which the compiler vectorizes.
        for chunk in block.chunks_exact(LANES * 4) {
            for (l, a) in acc.iter_mut().enumerate() {
                let w = u32::from_le_bytes([
                    chunk[l * 4],
                    chunk[l * 4 + 1],
                    chunk[l * 4 + 2],
                    chunk[l * 4 + 3],
                ]);
                *a = a
                    .wrapping_add(w.wrapping_mul(P2))
                    .rotate_left(13)
                    .wrapping_mul(P1);
            }
        }
    } else {
        for round in 0..WORDS / LANES {
            for (l, a) in acc.iter_mut().enumerate() {
                let w = word(block, round * LANES + l);
                *a = a
                    .wrapping_add(w.wrapping_mul(P2))
                    .rotate_left(13)
                    .wrapping_mul(P1);
            }
        }
    }
    acc.iter().fold(k.wrapping_mul(P3), |h, &a| {
        (h ^ a).rotate_left(17).wrapping_mul(P4).wrapping_add(P5)
    })
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
    bytes
        .chunks(CHECKSUM_BLOCK_BYTES)
        .enumerate()
        .fold((0u32, 0u32), |(lo, hi), (i, block)| {
            let k = first.wrapping_add(i as u32);
            let h = block_hash(k, block);
            (
                lo.wrapping_add(h),
                hi.wrapping_add(h.wrapping_mul(k.wrapping_mul(2).wrapping_add(1))),
            )
        })
}

/// The checksum of `bytes` (see `docs/wire-format.md`). Work is split across
/// threads for large inputs; the result does not depend on how.
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
    // Threads pay off once each has a few hundred KiB to hash.
    const PER_THREAD_MIN: usize = 256 * 1024;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (lo, hi) = if threads > 1 && bytes.len() >= 2 * PER_THREAD_MIN {
        let blocks = bytes.len().div_ceil(CHECKSUM_BLOCK_BYTES);
        let per = blocks.div_ceil(threads.min(bytes.len() / PER_THREAD_MIN));
        std::thread::scope(|s| {
            let handles: Vec<_> = bytes
                .chunks(per * CHECKSUM_BLOCK_BYTES)
                .enumerate()
                .map(|(i, part)| s.spawn(move || block_sums((i * per) as u32, part)))
                .collect();
            handles.into_iter().fold((0u32, 0u32), |(lo, hi), h| {
                let (l, m) = h.join().expect("checksum worker does not panic");
                (lo.wrapping_add(l), hi.wrapping_add(m))
            })
        })
    } else {
        block_sums(0, bytes)
    };
    let n = bytes.len() as u64;
    let lo = avalanche(lo ^ (n as u32));
    let hi = avalanche(hi ^ ((n >> 32) as u32) ^ lo.rotate_left(7));
    Checksum((u64::from(hi) << 32) | u64::from(lo))
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

    #[test]
    fn threaded_and_sequential_sums_agree() {
        let b = data(3 * 1024 * 1024 + 12345, 3);
        let (lo, hi) = block_sums(0, &b);
        let n = b.len() as u64;
        let lo = avalanche(lo ^ n as u32);
        let hi = avalanche(hi ^ (n >> 32) as u32 ^ lo.rotate_left(7));
        assert_eq!(
            checksum(&b),
            Checksum((u64::from(hi) << 32) | u64::from(lo))
        );
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
