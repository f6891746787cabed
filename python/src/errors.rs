//! Engine errors as Python exceptions (the classes of `tensorferry._errors`).

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;
use tensorferry_engine::Error;

/// The exception classes, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `Error`.
    Base,
    /// `ConfigError`.
    Config,
    /// `InvalidArgument`.
    Invalid,
    /// `TimeoutError`.
    Timeout,
    /// `PeerLost`.
    PeerLost,
    /// `ProtocolError`.
    Protocol,
    /// `ServiceError`.
    Service,
    /// `ClosedError`.
    Closed,
    /// `FrameError`.
    Frame,
    /// `DeviceError`.
    Device,
    /// `IoError`.
    Io,
    /// `NotStored`.
    NotStored,
    /// `AlreadyStored`.
    AlreadyStored,
    /// `ProxyMismatch`.
    ProxyMismatch,
    /// `StoreUnreachable`.
    StoreUnreachable,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Base => "Error",
            Kind::Config => "ConfigError",
            Kind::Invalid => "InvalidArgument",
            Kind::Timeout => "TimeoutError",
            Kind::PeerLost => "PeerLost",
            Kind::Protocol => "ProtocolError",
            Kind::Service => "ServiceError",
            Kind::Closed => "ClosedError",
            Kind::Frame => "FrameError",
            Kind::Device => "DeviceError",
            Kind::Io => "IoError",
            Kind::NotStored => "NotStored",
            Kind::AlreadyStored => "AlreadyStored",
            Kind::ProxyMismatch => "ProxyMismatch",
            Kind::StoreUnreachable => "StoreUnreachable",
        }
    }

    /// The class.
    pub fn class(self, py: Python<'_>) -> PyResult<Bound<'_, PyType>> {
        static CLASSES: [PyOnceLock<Py<PyType>>; 15] = [const { PyOnceLock::new() }; 15];
        Ok(CLASSES[self as usize]
            .import(py, "tensorferry._errors", self.name())?
            .clone())
    }

    /// An exception of this class with `message`.
    pub fn err(self, message: impl Into<String>) -> PyErr {
        let message = message.into();
        Python::attach(|py| match self.class(py) {
            Ok(cls) => PyErr::from_type(cls, message),
            Err(e) => e,
        })
    }
}

/// The exception for an engine error, carrying its message.
pub fn to_py(err: Error) -> PyErr {
    let kind = match &err {
        Error::Frame { .. }
        | Error::Truncated { .. }
        | Error::UnknownVersion { .. }
        | Error::Limit { .. }
        | Error::Header { .. } => Kind::Frame,
        Error::Tensor { .. }
        | Error::DTypeMismatch { .. }
        | Error::Misaligned { .. }
        | Error::DuplicateName { .. }
        | Error::Invalid(_) => Kind::Invalid,
        Error::NotOnHost { .. } => Kind::Device,
        Error::Timeout { .. } => Kind::Timeout,
        Error::Closed => Kind::Closed,
        Error::Io { .. } => Kind::Io,
        Error::DeviceMap(_) => Kind::Config,
        Error::Kernels(k) => match k {
            tensorferry_kernels::Error::UnknownDType { .. }
            | tensorferry_kernels::Error::BadLayout(_)
            | tensorferry_kernels::Error::BadChecksumText { .. } => Kind::Invalid,
            tensorferry_kernels::Error::Io { .. } => Kind::Io,
            _ => Kind::Device,
        },
        Error::PeerLost { peer, .. } => {
            return with_attrs(Kind::PeerLost, err.to_string(), &[("peer", peer)]);
        }
        Error::Misbehaved { peer, .. } => {
            return with_attrs(Kind::Protocol, err.to_string(), &[("peer", peer)]);
        }
        Error::Remote {
            channel,
            code,
            message,
        } => return service_error(code, message, Some(channel)),
        Error::NotStored { store, key } => {
            let attrs = [("store", store.as_str()), ("key", key.as_str())];
            return with_attrs(Kind::NotStored, err.to_string(), &attrs);
        }
        Error::AlreadyStored { store, key } => {
            let attrs = [("store", store.as_str()), ("key", key.as_str())];
            return with_attrs(Kind::AlreadyStored, err.to_string(), &attrs);
        }
        Error::ProxyMismatch { key, .. } => {
            return with_attrs(Kind::ProxyMismatch, err.to_string(), &[("key", key)]);
        }
        Error::StoreUnreachable { store, .. } => {
            return with_attrs(Kind::StoreUnreachable, err.to_string(), &[("store", store)]);
        }
        _ => Kind::Base,
    };
    kind.err(err.to_string())
}

/// An exception of `kind` with `message` and string attributes.
fn with_attrs(kind: Kind, message: String, attrs: &[(&str, &str)]) -> PyErr {
    Python::attach(|py| {
        let build = || -> PyResult<PyErr> {
            let value = kind.class(py)?.call1((message,))?;
            for (name, v) in attrs {
                value.setattr(*name, *v)?;
            }
            Ok(PyErr::from_value(value))
        };
        build().unwrap_or_else(|e| e)
    })
}

/// A `ServiceError` with its code, message and (for a reply) channel.
pub fn service_error(code: &str, message: &str, channel: Option<&str>) -> PyErr {
    Python::attach(|py| {
        Kind::Service
            .class(py)
            .and_then(|cls| cls.call1((code, message, channel)))
            .map(PyErr::from_value)
            .unwrap_or_else(|e| e)
    })
}

/// Converts an engine result.
pub trait IntoPy<T> {
    /// The value, or the engine error as a Python exception.
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for Result<T, Error> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
