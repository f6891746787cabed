//! Deterministic tensor content, so a receiver can check every byte it gets.
//!
//! The bytes of a tensor are a function of a seed, the message's sequence
//! number, the tensor's name and the byte offset (a counter-based generator),
//! so `send --seed S` and `recv --verify --seed S` agree on any transport, and a
//! mismatch can be reported by offset.

use tensorferry_kernels::DType;

use crate::buffer::HostBufferMut;
use crate::error::Result;
use crate::tensor::{packed_bytes, Tensor};

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn key(seed: u64, seq: u64, name: &str) -> u64 {
    // FNV-1a over the name, then mixed with seed and sequence number.
    let h = name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3)
    });
    mix(mix(seed ^ h).wrapping_add(seq.wrapping_mul(GOLDEN)))
}

fn word(key: u64, index: u64, dtype: DType) -> [u8; 8] {
    let w = mix(key.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN)));
    // Booleans must be 0 or 1.
    let w = if dtype == DType::Bool {
        w & 0x0101_0101_0101_0101
    } else {
        w
    };
    w.to_le_bytes()
}

/// Fills `out` with the content of tensor `name` of message `seq` under `seed`.
pub fn fill(dtype: DType, seed: u64, seq: u64, name: &str, out: &mut [u8]) {
    let k = key(seed, seq, name);
    let mut chunks = out.chunks_exact_mut(8);
    let mut i = 0u64;
    for c in &mut chunks {
        c.copy_from_slice(&word(k, i, dtype));
        i += 1;
    }
    let rest = chunks.into_remainder();
    let n = rest.len();
    rest.copy_from_slice(&word(k, i, dtype)[..n]);
}

/// The first byte offset where `bytes` differ from the expected content, if any.
pub fn first_mismatch(
    dtype: DType,
    seed: u64,
    seq: u64,
    name: &str,
    bytes: &[u8],
) -> Option<usize> {
    let k = key(seed, seq, name);
    bytes.chunks(8).enumerate().find_map(|(i, c)| {
        let want = word(k, i as u64, dtype);
        c.iter()
            .zip(want)
            .position(|(a, b)| *a != b)
            .map(|p| i * 8 + p)
    })
}

/// A contiguous host tensor with the content of tensor `name` of message `seq`.
///
/// # Errors
///
/// When the byte size of `shape` overflows.
///
/// # Examples
///
/// ```
/// use tensorferry_engine::{pattern, DType};
///
/// let t = pattern::tensor(DType::F32, &[4, 4], 7, 0, "x")?;
/// let bytes = t.contiguous_bytes()?;
/// assert_eq!(pattern::first_mismatch(DType::F32, 7, 0, "x", bytes), None);
/// assert_eq!(pattern::first_mismatch(DType::F32, 7, 1, "x", bytes), Some(0));
/// # Ok::<(), tensorferry_engine::Error>(())
/// ```
pub fn tensor(dtype: DType, shape: &[usize], seed: u64, seq: u64, name: &str) -> Result<Tensor> {
    let mut buf = HostBufferMut::zeroed(packed_bytes(dtype, shape)?);
    fill(dtype, seed, seq, name, buf.as_mut_slice());
    Tensor::from_host(dtype, shape, buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_depends_on_seed_seq_and_name_and_mismatches_are_located() {
        let mut a = vec![0u8; 101];
        fill(DType::U8, 1, 2, "x", &mut a);
        for (seed, seq, name) in [(2, 2, "x"), (1, 3, "x"), (1, 2, "y")] {
            let mut b = vec![0u8; 101];
            fill(DType::U8, seed, seq, name, &mut b);
            assert_ne!(a, b);
        }
        assert_eq!(first_mismatch(DType::U8, 1, 2, "x", &a), None);
        a[77] ^= 4;
        assert_eq!(first_mismatch(DType::U8, 1, 2, "x", &a), Some(77));
        let mut bools = vec![0u8; 64];
        fill(DType::Bool, 0, 0, "b", &mut bools);
        assert!(bools.iter().all(|&b| b <= 1) && bools.contains(&1));
    }
}
