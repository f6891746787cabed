//! Packing a strided view into contiguous bytes, and back.

use crate::error::{Error, Result};
use crate::layout::Layout;

/// Checks that `storage` bytes hold the view and `contiguous` bytes hold its elements.
fn check(layout: &Layout, elem: usize, storage: usize, contiguous: usize) -> Result<()> {
    let need = layout
        .required_elems()?
        .checked_mul(elem)
        .ok_or_else(|| Error::BadLayout("the view's byte reach overflows".into()))?;
    if storage < need {
        return Err(Error::BadLayout(format!(
            "the view reaches byte {need} but its storage has {storage}"
        )));
    }
    let packed = layout
        .numel()
        .checked_mul(elem)
        .ok_or_else(|| Error::BadLayout("the packed size overflows".into()))?;
    if contiguous != packed {
        return Err(Error::BadLayout(format!(
            "the packed buffer has {contiguous} bytes but the view has {packed}"
        )));
    }
    Ok(())
}

/// Calls `f(storage_byte_offset, contiguous_byte_offset, run_bytes)` for every
/// run of elements that is contiguous in both, in row-major order.
fn for_each_run(layout: &Layout, elem: usize, mut f: impl FnMut(usize, usize, usize)) {
    let n = layout.numel();
    if n == 0 {
        return;
    }
    let shape = layout.shape();
    let strides = layout.strides();
    // Merge trailing dimensions that are contiguous into one run.
    let mut run = 1usize;
    let mut outer = shape.len();
    while outer > 0 && (shape[outer - 1] == 1 || strides[outer - 1] == run) {
        run *= shape[outer - 1];
        outer -= 1;
    }
    let run_bytes = run * elem;
    let mut index = vec![0usize; outer];
    let mut dst = 0usize;
    loop {
        let src = layout.offset() + index.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
        f(src * elem, dst, run_bytes);
        dst += run_bytes;
        // Advance the multi-index over the outer dimensions.
        let mut d = outer;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

/// Copies the elements of the view `layout` of `storage` into `out`, row-major.
///
/// # Errors
///
/// [`Error::BadLayout`] when the view reaches past `storage` or `out` is not exactly
/// `numel × elem_bytes` long.
///
/// # Examples
///
/// ```
/// use tensorferry_kernels::{cpu, Layout};
///
/// let storage: Vec<u8> = (0..6).collect(); // a 2×3 matrix of u8
/// let t = Layout::contiguous(&[2, 3]).transposed(0, 1)?;
/// let mut out = vec![0u8; 6];
/// cpu::pack(&storage, 1, &t, &mut out)?;
/// assert_eq!(out, [0, 3, 1, 4, 2, 5]);
/// # Ok::<(), tensorferry_kernels::Error>(())
/// ```
pub fn pack(storage: &[u8], elem_bytes: usize, layout: &Layout, out: &mut [u8]) -> Result<()> {
    check(layout, elem_bytes, storage.len(), out.len())?;
    for_each_run(layout, elem_bytes, |src, dst, len| {
        out[dst..dst + len].copy_from_slice(&storage[src..src + len]);
    });
    Ok(())
}

/// Copies contiguous `packed` elements into the view `layout` of `storage`: the inverse of [`pack`].
///
/// # Errors
///
/// As [`pack`].
pub fn unpack(packed: &[u8], elem_bytes: usize, layout: &Layout, storage: &mut [u8]) -> Result<()> {
    check(layout, elem_bytes, storage.len(), packed.len())?;
    for_each_run(layout, elem_bytes, |dst, src, len| {
        storage[dst..dst + len].copy_from_slice(&packed[src..src + len]);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: one element at a time through explicit index arithmetic.
    fn naive(storage: &[u8], elem: usize, l: &Layout) -> Vec<u8> {
        let mut out = Vec::new();
        let n = l.numel();
        for flat in 0..n {
            let mut rem = flat;
            let mut off = l.offset();
            for d in (0..l.shape().len()).rev() {
                off += (rem % l.shape()[d]) * l.strides()[d];
                rem /= l.shape()[d];
            }
            out.extend_from_slice(&storage[off * elem..(off + 1) * elem]);
        }
        out
    }

    #[test]
    fn pack_matches_element_by_element_copy_for_slices_and_transposes() {
        let storage: Vec<u8> = (0..4 * 5 * 6 * 2).map(|i| i as u8).collect();
        let base = Layout::contiguous(&[4, 5, 6]);
        let views = [
            base.clone(),
            base.transposed(0, 2).expect("t"),
            base.narrowed(1, 1, 4).expect("n"),
            base.narrowed(2, 2, 5)
                .expect("n")
                .transposed(0, 1)
                .expect("t"),
            base.narrowed(0, 3, 3).expect("empty"),
            Layout::new(&[], &[], 7).expect("scalar"),
            Layout::new(&[3, 1, 2], &[7, 99, 2], 1).expect("odd strides"),
        ];
        for l in &views {
            let want = naive(&storage, 2, l);
            let mut out = vec![0xAA; want.len()];
            pack(&storage, 2, l, &mut out).expect("pack");
            assert_eq!(out, want, "{l:?}");
            let mut back = vec![0u8; storage.len()];
            unpack(&out, 2, l, &mut back).expect("unpack");
            assert_eq!(naive(&back, 2, l), want, "{l:?}");
        }
    }

    #[test]
    fn rejects_views_past_the_storage_and_wrong_output_sizes() {
        let storage = vec![0u8; 10];
        let l = Layout::contiguous(&[3, 4]);
        assert!(pack(&storage, 1, &l, &mut [0u8; 12]).is_err());
        assert!(pack(&[0u8; 12], 1, &l, &mut [0u8; 11]).is_err());
        assert!(Layout::new(&[2, usize::MAX], &[1, 2], 0).is_err());
    }
}
