//! [`DType`]: element types, with their DLPack codes and the names people write.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// The element type of a tensor.
///
/// Parsing accepts the names NumPy, PyTorch and safetensors users write
/// (`f32`, `float32`, `float`, `bf16`, `bfloat16`, `F16`, `float8_e4m3fn`, …),
/// in any letter case; [`Display`](fmt::Display) and serde use the short name
/// (`f32`, `bf16`, `f8e4m3`).
///
/// # Examples
///
/// ```
/// use tensorferry_kernels::DType;
///
/// let d: DType = "bfloat16".parse()?;
/// assert_eq!(d, DType::BF16);
/// assert_eq!(d.to_string(), "bf16");
/// assert_eq!(d.size_bytes(), 2);
/// assert_eq!(d.dlpack(), (4, 16)); // kDLBfloat, 16 bits
/// # Ok::<(), tensorferry_kernels::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum DType {
    /// Boolean, one byte (0 or 1).
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Unsigned 16-bit integer.
    U16,
    /// Unsigned 32-bit integer.
    U32,
    /// Unsigned 64-bit integer.
    U64,
    /// Signed 8-bit integer.
    I8,
    /// Signed 16-bit integer.
    I16,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16: the top half of an f32.
    BF16,
    /// IEEE 754 single precision.
    F32,
    /// IEEE 754 double precision.
    F64,
    /// 8-bit float, 4 exponent and 3 mantissa bits, finite only (`float8_e4m3fn`).
    F8E4M3,
    /// 8-bit float, 5 exponent and 2 mantissa bits, with infinities (`float8_e5m2`).
    F8E5M2,
}

impl DType {
    /// Every dtype, in declaration order.
    pub const ALL: [DType; 15] = [
        DType::Bool,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::F8E4M3,
        DType::F8E5M2,
    ];

    /// The short name: `f32`, `bf16`, `f8e4m3`, …
    pub const fn name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::U8 => "u8",
            DType::U16 => "u16",
            DType::U32 => "u32",
            DType::U64 => "u64",
            DType::I8 => "i8",
            DType::I16 => "i16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F8E4M3 => "f8e4m3",
            DType::F8E5M2 => "f8e5m2",
        }
    }

    /// Bits per element.
    pub const fn bits(self) -> u32 {
        match self {
            DType::Bool | DType::U8 | DType::I8 | DType::F8E4M3 | DType::F8E5M2 => 8,
            DType::U16 | DType::I16 | DType::F16 | DType::BF16 => 16,
            DType::U32 | DType::I32 | DType::F32 => 32,
            DType::U64 | DType::I64 | DType::F64 => 64,
        }
    }

    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        (self.bits() / 8) as usize
    }

    /// The DLPack `(type code, bits)` pair (DLPack 1.1 codes: int 0, uint 1,
    /// float 2, bfloat 4, bool 6, float8_e4m3fn 10, float8_e5m2 12).
    pub const fn dlpack(self) -> (u8, u8) {
        let code = match self {
            DType::I8 | DType::I16 | DType::I32 | DType::I64 => 0,
            DType::U8 | DType::U16 | DType::U32 | DType::U64 => 1,
            DType::F16 | DType::F32 | DType::F64 => 2,
            DType::BF16 => 4,
            DType::Bool => 6,
            DType::F8E4M3 => 10,
            DType::F8E5M2 => 12,
        };
        (code, self.bits() as u8)
    }

    /// The dtype with this DLPack `(type code, bits)`, if any.
    pub fn from_dlpack(code: u8, bits: u8) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.dlpack() == (code, bits))
    }

    /// True for the floating-point types (f16, bf16, f32, f64, fp8).
    pub const fn is_float(self) -> bool {
        matches!(
            self,
            DType::F16 | DType::BF16 | DType::F32 | DType::F64 | DType::F8E4M3 | DType::F8E5M2
        )
    }

    /// The names [`FromStr`] accepts, for error messages.
    pub const ACCEPTED: &'static str = "bool, u8, u16, u32, u64, i8, i16, i32, i64, f16 (half, float16), bf16 (bfloat16), f32 (float, float32), f64 (double, float64), f8e4m3 (float8_e4m3fn), f8e5m2 (float8_e5m2)";
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl DType {
    /// The dtype a name or alias stands for, as written (no trimming or case folding).
    fn by_name(name: &str) -> Option<DType> {
        Some(match name {
            "bool" | "b8" => DType::Bool,
            "u8" | "uint8" => DType::U8,
            "u16" | "uint16" => DType::U16,
            "u32" | "uint32" => DType::U32,
            "u64" | "uint64" => DType::U64,
            "i8" | "int8" => DType::I8,
            "i16" | "int16" | "short" => DType::I16,
            "i32" | "int32" | "int" => DType::I32,
            "i64" | "int64" | "long" => DType::I64,
            "f16" | "float16" | "half" => DType::F16,
            "bf16" | "bfloat16" => DType::BF16,
            "f32" | "float32" | "float" => DType::F32,
            "f64" | "float64" | "double" => DType::F64,
            "f8e4m3" | "f8_e4m3" | "float8_e4m3fn" | "float8_e4m3" | "e4m3" => DType::F8E4M3,
            "f8e5m2" | "f8_e5m2" | "float8_e5m2" | "e5m2" => DType::F8E5M2,
            _ => return None,
        })
    }
}

impl FromStr for DType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        // Names as the wire carries them need no allocation.
        if let Some(d) = DType::by_name(s) {
            return Ok(d);
        }
        let lower = s.trim().to_ascii_lowercase();
        let name = lower.strip_prefix("torch.").unwrap_or(&lower);
        DType::by_name(name).ok_or_else(|| Error::UnknownDType {
            text: s.to_string(),
        })
    }
}

impl Serialize for DType {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for DType {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A Rust type that is the element type of tensors of one [`DType`].
pub trait Element: bytemuck::Pod {
    /// The dtype whose elements are this type.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {
        $(impl Element for $t { const DTYPE: DType = DType::$d; })*
    };
}

element!(u8 => U8, u16 => U16, u32 => U32, u64 => U64, i8 => I8, i16 => I16, i32 => I32,
    i64 => I64, f32 => F32, f64 => F64, half::f16 => F16, half::bf16 => BF16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_aliases_parse() {
        for d in DType::ALL {
            assert_eq!(d.name().parse::<DType>().expect("own name"), d);
            assert_eq!(
                d.to_string()
                    .to_uppercase()
                    .parse::<DType>()
                    .expect("any case"),
                d
            );
            let json = serde_json::to_string(&d).expect("serialize");
            assert_eq!(
                serde_json::from_str::<DType>(&json).expect("deserialize"),
                d
            );
        }
        for (text, d) in [
            ("float32", DType::F32),
            ("torch.float16", DType::F16),
            ("bfloat16", DType::BF16),
            (" BF16 ", DType::BF16),
            ("double", DType::F64),
            ("float8_e4m3fn", DType::F8E4M3),
            ("float8_e5m2", DType::F8E5M2),
            ("int64", DType::I64),
        ] {
            assert_eq!(text.parse::<DType>().expect(text), d);
        }
        let err = "f24".parse::<DType>().expect_err("unknown");
        assert!(err.to_string().contains("`f24`") && err.to_string().contains("bfloat16"));
    }

    #[test]
    fn dlpack_codes_are_distinct_and_invert() {
        for d in DType::ALL {
            let (code, bits) = d.dlpack();
            assert_eq!(DType::from_dlpack(code, bits), Some(d));
            assert_eq!(u32::from(bits), d.bits());
            assert_eq!(d.size_bytes() * 8, d.bits() as usize);
        }
        assert_eq!(DType::F32.dlpack(), (2, 32));
        assert_eq!(DType::Bool.dlpack(), (6, 8));
        assert_eq!(DType::from_dlpack(5, 64), None);
    }
}
