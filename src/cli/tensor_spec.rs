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
        tensorferry::engine::packed_bytes(dtype, &shape).map_err(|e| bad(&e.to_string()))?;
        Ok(Self {
            name: name.to_string(),
            dtype,
            shape,
            device,
        })
    }
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
        ] {
            assert!(bad.parse::<TensorSpec>().is_err(), "{bad}");
        }
    }
}
