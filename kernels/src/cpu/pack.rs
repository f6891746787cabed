//! Packing a strided view into contiguous bytes, and back.

use smallvec::SmallVec;

use crate::error::{Error, Result};
use crate::layout::Layout;

/// Checks that `storage` bytes hold the view and `contiguous` bytes hold its elements.
pub(crate) fn check(layout: &Layout, elem: usize, storage: usize, contiguous: usize) -> Result<()> {
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

/// A view reduced to what the copy loops need: size-1 dimensions dropped and
/// dimensions that are contiguous with their inner neighbour merged, as
/// `(size, stride)` pairs in elements, outermost first. Never empty.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub(crate) dims: SmallVec<[(usize, usize); 6]>,
    pub(crate) offset: usize,
}

impl Plan {
    pub(crate) fn new(layout: &Layout) -> Self {
        let mut dims: SmallVec<[(usize, usize); 6]> = SmallVec::new();
        for (&n, &s) in layout.shape().iter().zip(layout.strides()) {
            if n == 1 {
                continue;
            }
            if let Some(outer) = dims.last_mut() {
                if s.checked_mul(n) == Some(outer.1) {
                    outer.0 *= n;
                    outer.1 = s;
                    continue;
                }
            }
            dims.push((n, s));
        }
        if dims.is_empty() {
            dims.push((1, 1));
        }
        Self {
            dims,
            offset: layout.offset(),
        }
    }

    fn numel(&self) -> usize {
        self.dims.iter().map(|d| d.0).product()
    }

    /// The plan for outermost indices `start..end` only.
    fn outer_range(&self, start: usize, end: usize) -> Self {
        let mut p = self.clone();
        p.offset += start * p.dims[0].1;
        p.dims[0].0 = end - start;
        p
    }
}

/// Moves one element, or a run of contiguous elements, between the strided
/// storage (element index `s`) and the packed buffer (element index `p`).
trait Mover {
    fn elem(&mut self, s: usize, p: usize);
    fn run(&mut self, s: usize, p: usize, n: usize);
    /// True when the packed side is written (pack), false when the strided
    /// storage is (unpack).
    const WRITES_PACKED: bool;
    /// Moves one tile of a transpose-like view: the elements
    /// `s0 + ib × t.s_b + ia × t.s_a` ↔ `p0 + ib × t.p_b + ia` for `ib`, `ia` in
    /// the tile's ranges, walking the side being written contiguously
    /// (scattered stores cost more than scattered loads).
    #[inline(always)]
    fn tile(&mut self, s0: usize, p0: usize, t: &Tile) {
        if Self::WRITES_PACKED {
            for ib in t.b.clone() {
                for ia in t.a.clone() {
                    self.elem(s0 + ib * t.s_b + ia * t.s_a, p0 + ib * t.p_b + ia);
                }
            }
        } else {
            for ia in t.a.clone() {
                for ib in t.b.clone() {
                    self.elem(s0 + ib * t.s_b + ia * t.s_a, p0 + ib * t.p_b + ia);
                }
            }
        }
    }
}

/// One tile of a transpose-like copy (see [`Mover::tile`]).
struct Tile {
    s_b: usize,
    s_a: usize,
    p_b: usize,
    b: std::ops::Range<usize>,
    a: std::ops::Range<usize>,
}

/// Side of the square tiles a transposing copy works in.
const TILE: usize = 32;
/// Side of the blocks of tiles (a multiple of [`TILE`]): a block touches few
/// enough pages for the TLB. Both sizes were picked by measuring a 4096 × 4096
/// f32 transpose (see `docs/benchmarks.md`).
const BLOCK: usize = 128;

/// Strided storage to packed bytes, `E` bytes per element (0: `e` at run time).
struct Gather<'a, const E: usize> {
    storage: &'a [u8],
    packed: &'a mut [u8],
    e: usize,
}

/// Packed bytes back into strided storage.
struct Scatter<'a, const E: usize> {
    packed: &'a [u8],
    storage: &'a mut [u8],
    e: usize,
}

impl<const E: usize> Mover for Gather<'_, E> {
    const WRITES_PACKED: bool = true;
    #[inline(always)]
    fn elem(&mut self, s: usize, p: usize) {
        let e = if E == 0 { self.e } else { E };
        self.packed[p * e..p * e + e].copy_from_slice(&self.storage[s * e..s * e + e]);
    }
    #[inline(always)]
    fn run(&mut self, s: usize, p: usize, n: usize) {
        let e = if E == 0 { self.e } else { E };
        self.packed[p * e..(p + n) * e].copy_from_slice(&self.storage[s * e..(s + n) * e]);
    }
}

impl<const E: usize> Mover for Scatter<'_, E> {
    const WRITES_PACKED: bool = false;
    #[inline(always)]
    fn elem(&mut self, s: usize, p: usize) {
        let e = if E == 0 { self.e } else { E };
        self.storage[s * e..s * e + e].copy_from_slice(&self.packed[p * e..p * e + e]);
    }
    #[inline(always)]
    fn run(&mut self, s: usize, p: usize, n: usize) {
        let e = if E == 0 { self.e } else { E };
        self.storage[s * e..(s + n) * e].copy_from_slice(&self.packed[p * e..(p + n) * e]);
    }
}

/// Steps a multi-index over `dims` (`(size, strided stride, packed stride)`),
/// keeping both element offsets current. Returns false after the last index.
#[inline(always)]
fn advance(
    idx: &mut [usize],
    dims: &[(usize, usize, usize)],
    s: &mut usize,
    p: &mut usize,
) -> bool {
    for d in (0..dims.len()).rev() {
        let (n, ss, ps) = dims[d];
        idx[d] += 1;
        *s += ss;
        *p += ps;
        if idx[d] < n {
            return true;
        }
        *s -= ss * n;
        *p -= ps * n;
        idx[d] = 0;
    }
    false
}

/// Moves every element of the plan's view, in packed (row-major) order.
fn copy_view(plan: &Plan, m: &mut impl Mover) {
    let dims = &plan.dims;
    let rank = dims.len();
    // Packed (row-major) strides of the merged dimensions.
    let mut packed_strides: SmallVec<[usize; 6]> = SmallVec::from_elem(1, rank);
    for d in (0..rank.saturating_sub(1)).rev() {
        packed_strides[d] = packed_strides[d + 1] * dims[d + 1].0;
    }
    let (n_in, s_in) = dims[rank - 1];
    // A transpose-like view: some outer dimension walks the storage with a
    // smaller stride than the innermost one. Copy it tile by tile so both
    // sides stay in cache.
    let tile_dim = (0..rank - 1)
        .filter(|&d| dims[d].1 < s_in)
        .min_by_key(|&d| dims[d].1);
    if let Some(b) = tile_dim {
        let (n_b, s_b) = dims[b];
        let p_b = packed_strides[b];
        let others: SmallVec<[(usize, usize, usize); 6]> = (0..rank - 1)
            .filter(|&d| d != b)
            .map(|d| (dims[d].0, dims[d].1, packed_strides[d]))
            .collect();
        let mut idx: SmallVec<[usize; 6]> = SmallVec::from_elem(0, others.len());
        let (mut s0, mut p0) = (plan.offset, 0usize);
        loop {
            // Blocks of tiles: a block touches BLOCK rows of each side, few
            // enough pages for the TLB and bytes for L2.
            for ia1 in (0..n_in).step_by(BLOCK) {
                for ib1 in (0..n_b).step_by(BLOCK) {
                    for ib0 in (ib1..(ib1 + BLOCK).min(n_b)).step_by(TILE) {
                        for ia0 in (ia1..(ia1 + BLOCK).min(n_in)).step_by(TILE) {
                            let t = Tile {
                                s_b,
                                s_a: s_in,
                                p_b,
                                b: ib0..(ib0 + TILE).min(n_b),
                                a: ia0..(ia0 + TILE).min(n_in),
                            };
                            m.tile(s0, p0, &t);
                        }
                    }
                }
            }
            if !advance(&mut idx, &others, &mut s0, &mut p0) {
                return;
            }
        }
    }
    // Rows: the innermost dimension is a run (stride 1) or a strided gather.
    let outer: SmallVec<[(usize, usize, usize); 6]> = (0..rank - 1)
        .map(|d| (dims[d].0, dims[d].1, packed_strides[d]))
        .collect();
    let mut idx: SmallVec<[usize; 6]> = SmallVec::from_elem(0, outer.len());
    let (mut s, mut p) = (plan.offset, 0usize);
    loop {
        if s_in == 1 {
            m.run(s, p, n_in);
        } else {
            for j in 0..n_in {
                m.elem(s + j * s_in, p + j);
            }
        }
        if !advance(&mut idx, &outer, &mut s, &mut p) {
            return;
        }
    }
}

/// Packs on this thread, with the element size fixed at compile time where
/// it is a common one.
fn pack_serial(storage: &[u8], elem: usize, plan: &Plan, packed: &mut [u8]) {
    macro_rules! go {
        ($e:literal) => {
            copy_view(
                plan,
                &mut Gather::<$e> {
                    storage,
                    packed,
                    e: elem,
                },
            )
        };
    }
    match elem {
        1 => go!(1),
        2 => go!(2),
        4 => go!(4),
        8 => go!(8),
        16 => go!(16),
        _ => go!(0),
    }
}

/// Packed bytes below which one thread packs the whole view.
const PARALLEL_BYTES: usize = 1 << 20;

/// Copies the elements of the view `layout` of `storage` into `out`, row-major.
/// Large views are packed on the rayon pool, split along their outermost
/// dimension.
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
    if out.is_empty() {
        return Ok(());
    }
    let plan = Plan::new(layout);
    let outer = plan.dims[0].0;
    if out.len() < PARALLEL_BYTES || outer < 2 {
        pack_serial(storage, elem_bytes, &plan, out);
        return Ok(());
    }
    use rayon::prelude::*;
    let per_outer = plan.numel() / outer;
    // A few pieces per thread so that uneven progress evens out.
    let pieces = (rayon::current_num_threads() * 4).min(outer);
    let rows = outer.div_ceil(pieces);
    out.par_chunks_mut(rows * per_outer * elem_bytes)
        .enumerate()
        .for_each(|(i, part)| {
            let start = i * rows;
            let end = (start + rows).min(outer);
            pack_serial(storage, elem_bytes, &plan.outer_range(start, end), part);
        });
    Ok(())
}

/// Copies contiguous `packed` elements into the view `layout` of `storage`: the inverse of [`pack`].
/// Runs on the calling thread (views may overlap; the last write in row-major
/// order wins, as when each element is stored in turn).
///
/// # Errors
///
/// As [`pack`].
pub fn unpack(packed: &[u8], elem_bytes: usize, layout: &Layout, storage: &mut [u8]) -> Result<()> {
    check(layout, elem_bytes, storage.len(), packed.len())?;
    if packed.is_empty() {
        return Ok(());
    }
    let plan = Plan::new(layout);
    if overlaps(&plan) {
        // Tiling would reorder writes to shared elements: keep row-major order.
        let mut m = Scatter::<0> {
            packed,
            storage,
            e: elem_bytes,
        };
        for_each_element_in_order(&plan, &mut m);
        return Ok(());
    }
    macro_rules! go {
        ($e:literal) => {
            copy_view(
                &plan,
                &mut Scatter::<$e> {
                    packed,
                    storage,
                    e: elem_bytes,
                },
            )
        };
    }
    match elem_bytes {
        1 => go!(1),
        2 => go!(2),
        4 => go!(4),
        8 => go!(8),
        16 => go!(16),
        _ => go!(0),
    }
    Ok(())
}

/// True unless the view's elements are provably distinct: sorted by stride,
/// each dimension's stride must exceed the reach of all smaller ones.
pub(crate) fn overlaps(plan: &Plan) -> bool {
    let mut dims: SmallVec<[(usize, usize); 6]> =
        plan.dims.iter().copied().filter(|d| d.0 > 1).collect();
    dims.sort_by_key(|d| d.1);
    let mut reach = 0usize; // largest offset the smaller dimensions reach
    for (n, s) in dims {
        if s <= reach {
            return true;
        }
        reach = match (n - 1).checked_mul(s).and_then(|r| r.checked_add(reach)) {
            Some(r) => r,
            None => return true,
        };
    }
    false
}

fn for_each_element_in_order(plan: &Plan, m: &mut impl Mover) {
    let outer: SmallVec<[(usize, usize, usize); 6]> = {
        let rank = plan.dims.len();
        let mut packed = 1usize;
        let mut v: SmallVec<[(usize, usize, usize); 6]> = SmallVec::new();
        for d in (0..rank).rev() {
            v.push((plan.dims[d].0, plan.dims[d].1, packed));
            packed *= plan.dims[d].0;
        }
        v.reverse();
        v
    };
    let mut idx: SmallVec<[usize; 6]> = SmallVec::from_elem(0, outer.len());
    let (mut s, mut p) = (plan.offset, 0usize);
    loop {
        m.elem(s, p);
        if !advance(&mut idx, &outer, &mut s, &mut p) {
            return;
        }
    }
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

    /// A random view of a random storage: any rank up to 5, sizes 0..=7 (some
    /// 40 to force tiling), strides that slice, transpose, broadcast.
    fn random_view(state: &mut u64) -> Layout {
        let mut next = |n: u64| {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            (*state % n) as usize
        };
        let rank = next(6);
        let shape: Vec<usize> = (0..rank)
            .map(|_| if next(5) == 0 { 40 } else { next(8) })
            .collect();
        let mut l = Layout::contiguous(&shape);
        for _ in 0..next(4) {
            if rank >= 2 {
                l = l
                    .transposed(next(rank as u64), next(rank as u64))
                    .expect("t");
            }
        }
        if rank >= 1 && next(2) == 0 {
            let d = next(rank as u64);
            let size = l.shape()[d];
            let a = next(size as u64 + 1);
            let b = a + next((size - a) as u64 + 1);
            l = l.narrowed(d, a, b).expect("n");
        }
        if rank >= 1 && next(8) == 0 {
            // A broadcast (stride 0) dimension.
            let mut strides = l.strides().to_vec();
            strides[next(rank as u64)] = 0;
            l = Layout::new(l.shape(), &strides, l.offset()).expect("b");
        }
        l
    }

    #[test]
    fn random_views_pack_and_unpack_like_element_by_element_copies() {
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        for _ in 0..300 {
            let l = random_view(&mut state);
            if l.numel() > 20_000 {
                continue; // keeps the element-by-element reference quick
            }
            for elem in [1usize, 2, 4, 8, 3] {
                let reach = l.required_elems().expect("reach") * elem;
                let storage: Vec<u8> = (0..reach).map(|i| (i * 7 + 3) as u8).collect();
                let want = naive(&storage, elem, &l);
                let mut out = vec![0xAA; want.len()];
                pack(&storage, elem, &l, &mut out).expect("pack");
                assert_eq!(out, want, "{l:?} elem {elem}");
                // Unpack distinct values; the reference stores them in row-major order.
                let packed: Vec<u8> = (0..want.len()).map(|i| (i * 13 + 1) as u8).collect();
                let mut got = vec![0x55u8; reach];
                unpack(&packed, elem, &l, &mut got).expect("unpack");
                let mut expect = vec![0x55u8; reach];
                naive_unpack(&packed, elem, &l, &mut expect);
                assert_eq!(got, expect, "unpack {l:?} elem {elem}");
            }
        }
    }

    #[test]
    fn large_views_pack_in_parallel_like_small_ones() {
        let storage: Vec<u8> = (0..600 * 700 * 4).map(|i| (i % 251) as u8).collect();
        let l = Layout::contiguous(&[600, 700]).transposed(0, 1).expect("t");
        let want = naive(&storage, 4, &l);
        let mut out = vec![0u8; want.len()];
        pack(&storage, 4, &l, &mut out).expect("pack");
        assert_eq!(out, want);
    }

    fn naive_unpack(packed: &[u8], elem: usize, l: &Layout, storage: &mut [u8]) {
        for flat in 0..l.numel() {
            let mut rem = flat;
            let mut off = l.offset();
            for d in (0..l.shape().len()).rev() {
                off += (rem % l.shape()[d]) * l.strides()[d];
                rem /= l.shape()[d];
            }
            storage[off * elem..(off + 1) * elem]
                .copy_from_slice(&packed[flat * elem..(flat + 1) * elem]);
        }
    }

    #[test]
    fn overlap_check_accepts_slices_and_transposes_and_rejects_aliasing() {
        let base = Layout::contiguous(&[4, 5, 6]);
        for l in [
            base.clone(),
            base.transposed(0, 2).expect("t"),
            base.narrowed(1, 1, 3).expect("n"),
            Layout::new(&[3, 4], &[1, 3], 0).expect("column-major"),
        ] {
            assert!(!overlaps(&Plan::new(&l)), "{l:?}");
        }
        for l in [
            Layout::new(&[3, 4], &[0, 1], 0).expect("broadcast"),
            Layout::new(&[3, 4], &[2, 1], 0).expect("rows overlap"),
        ] {
            assert!(overlaps(&Plan::new(&l)), "{l:?}");
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
