//! [`Address`]: where a node listens or connects, as users write it.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
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
/// let a: Address = "tcp://127.0.0.1:0".parse()?;
/// assert_eq!(a.to_string(), "tcp://127.0.0.1:0");
/// assert_eq!("file://run.tfm".parse::<Address>()?, Address::File("run.tfm".into()));
/// assert!("ftp://x".parse::<Address>().is_err());
/// # Ok::<(), tensorferry_engine::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Address {
    /// A record file: frames back to back.
    File(PathBuf),
    /// Within one process: messages move by reference.
    Inproc(String),
    /// TCP, `HOST:PORT`; port 0 picks a free port when listening.
    Tcp(String),
    /// Processes on one host: a Unix socket for control, shared memory for bytes.
    Shm(String),
}

/// The address forms, for error messages.
pub const SCHEMES: &str = "inproc://NAME, shm://NAME, tcp://HOST:PORT, file://PATH";

impl Address {
    /// The socket addresses of a `tcp://` address.
    ///
    /// # Errors
    ///
    /// When the host does not resolve, or this is not a TCP address.
    pub fn socket_addrs(&self) -> Result<Vec<SocketAddr>> {
        match self {
            Address::Tcp(hp) => hp
                .to_socket_addrs()
                .map(Iterator::collect)
                .map_err(|e| Error::Invalid(format!("`{self}`: cannot resolve `{hp}`: {e}"))),
            other => Err(Error::Invalid(format!("`{other}` is not a TCP address"))),
        }
    }

    /// True when the address reaches this host only (loopback TCP, inproc, shm, files).
    ///
    /// # Errors
    ///
    /// When a TCP host does not resolve.
    pub fn is_local_only(&self) -> Result<bool> {
        match self {
            Address::Tcp(_) => Ok(self.socket_addrs()?.iter().all(|a| a.ip().is_loopback())),
            _ => Ok(true),
        }
    }
}

impl FromStr for Address {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let text = s.trim();
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err(Error::Invalid(format!(
                "`{s}` is not an address: write one of {SCHEMES}"
            )));
        };
        if rest.is_empty() {
            return Err(Error::Invalid(format!(
                "`{s}`: nothing after `://`; write one of {SCHEMES}"
            )));
        }
        match scheme.to_ascii_lowercase().as_str() {
            "file" => Ok(Address::File(PathBuf::from(rest))),
            "inproc" => Ok(Address::Inproc(rest.to_string())),
            "shm" if rest.contains('/') => Err(Error::Invalid(format!(
                "`{s}`: a shm name is one word, without `/`"
            ))),
            "shm" => Ok(Address::Shm(rest.to_string())),
            "tcp" => {
                let port_ok = rest
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
                if port_ok {
                    Ok(Address::Tcp(rest.to_string()))
                } else {
                    Err(Error::Invalid(format!(
                        "`{s}`: write tcp://HOST:PORT with a port from 0 to 65535 (0 picks a free one)"
                    )))
                }
            }
            other => Err(Error::Invalid(format!(
                "`{s}`: unknown transport `{other}://`; write one of {SCHEMES}"
            ))),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::File(p) => write!(f, "file://{}", p.display()),
            Address::Inproc(n) => write!(f, "inproc://{n}"),
            Address::Tcp(hp) => write!(f, "tcp://{hp}"),
            Address::Shm(n) => write!(f, "shm://{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_scheme_and_rejects_malformed_ones() {
        for ok in [
            "inproc://a",
            "shm://cam",
            "tcp://localhost:7070",
            "tcp://[::1]:0",
            "file:///tmp/x.tfm",
        ] {
            let a: Address = ok.parse().expect(ok);
            assert_eq!(a.to_string(), ok);
        }
        for bad in [
            "tcp://host",
            "tcp://:80",
            "tcp://h:99999",
            "udp://h:1",
            "inproc://",
            "nothing",
            "shm://a/b",
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad}");
        }
        let lo: Address = "tcp://127.0.0.1:1".parse().expect("tcp");
        assert!(lo.is_local_only().expect("resolves"));
        let any: Address = "tcp://0.0.0.0:1".parse().expect("tcp");
        assert!(!any.is_local_only().expect("resolves"));
    }
}
