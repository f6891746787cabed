//! [`Address`]: where a sender sends and a receiver listens, as users write it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A transport address.
///
/// # Examples
///
/// ```
/// use tensorferry_engine::Address;
///
/// let a: Address = "file://run.tfm".parse()?;
/// assert_eq!(a, Address::File("run.tfm".into()));
/// assert!("ftp://x".parse::<Address>().is_err());
/// # Ok::<(), tensorferry_engine::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Address {
    /// A record file: frames back to back.
    File(PathBuf),
}

/// The address schemes this build accepts, for error messages.
pub const SCHEMES: &str = "file://PATH";

impl FromStr for Address {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let text = s.trim();
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(Error::Invalid(format!(
                "`{s}` is not an address: write SCHEME://…, one of: {SCHEMES}"
            )));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "file" if !rest.is_empty() => Ok(Address::File(PathBuf::from(rest))),
            "file" => Err(Error::Invalid(format!("`{s}`: the file path is missing"))),
            other => Err(Error::Invalid(format!(
                "`{s}`: unknown transport `{other}://`; this build accepts {SCHEMES}"
            ))),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::File(p) => write!(f, "file://{}", p.display()),
        }
    }
}
