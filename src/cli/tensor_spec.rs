//! `NAME=DTYPE:SHAPE[@DEVICE]`: a tensor to generate, as `send` takes it.

use std::str::FromStr;

use tensorferry::device_map::Device;
use tensorferry::kernels::DType;

/// One `--tensor` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub device: Device,
    /// Bytes of its content (the shape's elements times the dtype's size).
    pub bytes: u64,
}

const FORM: &str = "NAME=DTYPE:SHAPE[@DEVICE], e.g. x=f32:1024x1024 or mask=bool:8x8@cpu (an empty SHAPE is a scalar)";

impl FromStr for TensorSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("`{s}`: {why}; write {FORM}");
        let (name, rest) = s.split_once('=').ok_or_else(|| bad("missing `=`"))?;
        let name = name.trim();
        if name.is_empty() {
            return Err(bad("the name is empty"));
        }
        let (rest, device) = match rest.rsplit_once('@') {
            Some((r, d)) => (r, d.parse::<Device>().map_err(|e| bad(&e.to_string()))?),
            None => (rest, Device::Cpu),
        };
        let (dtype, shape) = rest
            .split_once(':')
            .ok_or_else(|| bad("missing `:` between dtype and shape"))?;
        let dtype: DType = dtype
            .parse()
            .map_err(|e: tensorferry::kernels::Error| bad(&e.to_string()))?;
        let shape = if shape.trim().is_empty() {
            Vec::new()
        } else {
            shape
                .split(['x', 'X', ','])
                .map(|d| {
                    d.trim()
                        .parse::<usize>()
                        .map_err(|_| bad(&format!("`{d}` is not a dimension")))
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        let bytes = checked_bytes(s, dtype, &shape)?;
        tensorferry::engine::packed_bytes(dtype, &shape).map_err(|e| bad(&e.to_string()))?;
        Ok(Self {
            name: name.to_string(),
            dtype,
            shape,
            device,
            bytes,
        })
    }
}

/// The bytes of a `dtype` tensor of `shape`, or why they cannot be counted.
/// The product of the nonzero dimensions must fit as well: a row's stride
/// is that product, even where a zero dimension leaves no element.
fn checked_bytes(spec: &str, dtype: DType, shape: &[usize]) -> Result<u64, String> {
    fn product<'a>(mut dims: impl Iterator<Item = &'a usize>) -> Option<u64> {
        dims.try_fold(1u64, |acc, &d| acc.checked_mul(u64::try_from(d).ok()?))
    }
    let overflow = |what: &str| {
        format!(
            "`{spec}`: {what} more than a 64-bit count holds ({}); give a smaller shape",
            u64::MAX
        )
    };
    product(shape.iter().filter(|&&d| d != 0))
        .ok_or_else(|| overflow("its dimensions multiply to"))?;
    let elements = product(shape.iter()).expect("the nonzero dimensions' product fits");
    let bytes = elements
        .checked_mul(dtype.size_bytes() as u64)
        .ok_or_else(|| {
            overflow(&format!(
                "its {elements} elements of {} bytes are",
                dtype.size_bytes()
            ))
        })?;
    usize::try_from(bytes).map_err(|_| overflow("its bytes are"))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms_and_rejects_the_rest() {
        let t: TensorSpec = "x=f32:1024x1024@cuda:0".parse().expect("spec");
        assert_eq!(
            (t.name.as_str(), t.dtype, t.shape.as_slice(), t.device),
            ("x", DType::F32, &[1024, 1024][..], Device::cuda(0))
        );
        let s: TensorSpec = "s=i64:".parse().expect("scalar");
        assert!(s.shape.is_empty());
        for bad in [
            "x",
            "=f32:4",
            "x=f32",
            "x=f24:4",
            "x=f32:4xz",
            "x=f32:4@tpu",
            "x=u8:99999999999x99999999999",
            "x=f32:0x99999999999x99999999999",
            "x=f64:4611686018427387904",
            "x=f32:18446744073709551616",
        ] {
            assert!(bad.parse::<TensorSpec>().is_err(), "{bad}");
        }
        let e = "x=f32:0x99999999999x99999999999"
            .parse::<TensorSpec>()
            .expect_err("strides overflow");
        assert!(e.contains("dimensions multiply to more than"), "{e}");
        let e = "x=f64:4611686018427387904"
            .parse::<TensorSpec>()
            .expect_err("bytes overflow");
        assert!(e.contains("4611686018427387904 elements of 8 bytes"), "{e}");
        let t: TensorSpec = "e=f32:0x1000".parse().expect("an empty tensor");
        assert_eq!(t.bytes, 0);
        let t: TensorSpec = "x=f32:3x5".parse().expect("spec");
        assert_eq!(t.bytes, 60);
    }
}
