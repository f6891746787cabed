//! [`Layout`]: shape, strides and offset of a strided view, with checked arithmetic.

use smallvec::SmallVec;

use crate::error::{Error, Result};

/// Dimensions or strides: up to six kept inline, more on the heap.
pub type Dims = SmallVec<[usize; 6]>;

/// Where the elements of a (possibly strided) view sit in its storage, in elements.
///
/// Strides are non-negative element counts; a dimension of size 1 may have any stride.
///
/// # Examples
///
/// ```
/// use tensorferry_kernels::Layout;
///
/// let l = Layout::contiguous(&[2, 3]);
/// assert_eq!(l.strides(), &[3, 1]);
/// let t = l.transposed(0, 1)?; // a 3×2 view of the same storage
/// assert_eq!((t.shape(), t.strides()), (&[3, 2][..], &[1, 3][..]));
/// assert!(!t.is_contiguous());
/// assert_eq!(t.required_elems()?, 6);
/// # Ok::<(), tensorferry_kernels::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Layout {
    shape: Dims,
    strides: Dims,
    offset: usize,
}

/// Row-major strides for `shape`, or `None` if the element count overflows.
/// A shape with a zero dimension has no element, so no stride is ever used
/// to address one: its strides saturate instead of overflowing.
pub fn contiguous_strides(shape: &[usize]) -> Option<Dims> {
    let empty = shape.contains(&0);
    let mut strides: Dims = smallvec::smallvec![0; shape.len()];
    let mut acc: usize = 1;
    for (i, &dim) in shape.iter().enumerate().rev() {
        strides[i] = acc;
        acc = if empty {
            acc.saturating_mul(dim.max(1))
        } else {
            acc.checked_mul(dim)?
        };
    }
    Some(strides)
}

/// The number of elements of `shape`, or `None` on overflow.
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

impl Layout {
    /// A contiguous row-major layout.
    ///
    /// # Panics
    ///
    /// If the element count of `shape` overflows `usize` (a shape with a
    /// zero dimension never does); check it with [`element_count`] first, or
    /// use [`Layout::new`], for untrusted shapes.
    pub fn contiguous(shape: &[usize]) -> Self {
        let strides = contiguous_strides(shape).expect("shape element count overflows usize");
        Self {
            shape: Dims::from_slice(shape),
            strides,
            offset: 0,
        }
    }

    /// A layout from parts, checked: ranks agree and the reach of the view fits in `usize`.
    ///
    /// # Errors
    ///
    /// [`Error::BadLayout`] naming the problem.
    pub fn new(shape: &[usize], strides: &[usize], offset: usize) -> Result<Self> {
        if shape.len() != strides.len() {
            return Err(Error::BadLayout(format!(
                "shape has {} dimensions but strides have {}",
                shape.len(),
                strides.len()
            )));
        }
        let layout = Self {
            shape: Dims::from_slice(shape),
            strides: Dims::from_slice(strides),
            offset,
        };
        layout.required_elems()?;
        element_count(&layout.shape)
            .ok_or_else(|| Error::BadLayout("element count overflows".into()))?;
        Ok(layout)
    }

    /// Dimensions.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Strides in elements.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    /// Offset of the first element, in elements.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Number of elements in the view.
    pub fn numel(&self) -> usize {
        element_count(&self.shape).expect("checked when the layout was made")
    }

    /// True when the view is row-major contiguous from its offset (size-1 dimensions' strides ignored).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for (&dim, &stride) in self.shape.iter().zip(&self.strides).rev() {
            if dim != 1 && stride != expected {
                return self.numel() == 0;
            }
            expected = expected.saturating_mul(dim);
        }
        true
    }

    /// Elements the storage must hold for this view: one past its last element (0 for an empty view).
    ///
    /// # Errors
    ///
    /// [`Error::BadLayout`] when the reach overflows.
    pub fn required_elems(&self) -> Result<usize> {
        if self.shape.contains(&0) {
            return Ok(0);
        }
        let mut last = self.offset;
        for (&dim, &stride) in self.shape.iter().zip(&self.strides) {
            last = (dim - 1)
                .checked_mul(stride)
                .and_then(|s| last.checked_add(s))
                .ok_or_else(|| Error::BadLayout("the view's reach overflows".into()))?;
        }
        last.checked_add(1)
            .ok_or_else(|| Error::BadLayout("the view's reach overflows".into()))
    }

    /// The view with dimensions `a` and `b` swapped.
    ///
    /// # Errors
    ///
    /// [`Error::BadLayout`] when a dimension is out of range.
    pub fn transposed(&self, a: usize, b: usize) -> Result<Self> {
        let rank = self.shape.len();
        if a >= rank || b >= rank {
            return Err(Error::BadLayout(format!(
                "cannot swap dimensions {a} and {b} of a rank-{rank} view"
            )));
        }
        let mut out = self.clone();
        out.shape.swap(a, b);
        out.strides.swap(a, b);
        Ok(out)
    }

    /// The view restricted to `start..end` along dimension `dim`.
    ///
    /// # Errors
    ///
    /// [`Error::BadLayout`] when `dim` or the range is out of bounds.
    pub fn narrowed(&self, dim: usize, start: usize, end: usize) -> Result<Self> {
        let size = *self.shape.get(dim).ok_or_else(|| {
            Error::BadLayout(format!(
                "dimension {dim} of a rank-{} view",
                self.shape.len()
            ))
        })?;
        if start > end || end > size {
            return Err(Error::BadLayout(format!(
                "range {start}..{end} is outside dimension {dim} of size {size}"
            )));
        }
        let mut out = self.clone();
        out.shape[dim] = end - start;
        if end > start {
            out.offset = start
                .checked_mul(self.strides[dim])
                .and_then(|s| s.checked_add(self.offset))
                .ok_or_else(|| Error::BadLayout("offset overflows".into()))?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_shape_with_huge_dimensions_has_a_layout() {
        let l = Layout::contiguous(&[0, 99_999_999_999, 99_999_999_999]);
        assert_eq!(l.shape(), &[0, 99_999_999_999, 99_999_999_999]);
        assert_eq!(element_count(l.shape()), Some(0));
        assert_eq!(contiguous_strides(&[3, usize::MAX, 2]), None);
    }
}
