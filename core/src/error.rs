//! One error type for the whole engine. Every message names the op (or file) it came from and,
//! where shapes are involved, the shapes, so a failing model says where and why in one line.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// Shapes, ranks or axes that an op cannot accept.
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    /// Operands that live on different devices.
    #[error("{op}: operands are on different devices ({lhs} and {rhs})")]
    DeviceMismatch { op: &'static str, lhs: String, rhs: String },
    /// A CUDA library, driver call, kernel compilation or launch that failed.
    #[error("cuda: {0}")]
    Cuda(String),
    /// A file that could not be read or written.
    #[error("{path}: {msg}")]
    Io { path: String, msg: String },
    /// A file that was read but does not hold what it should.
    #[error("{file}: {msg}")]
    Format { file: String, msg: String },
    /// Any other invalid argument, with a message that stands on its own.
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape { op, msg: msg.into() }
    }
    pub fn io(path: impl std::fmt::Display, err: impl std::fmt::Display) -> Self {
        Error::Io { path: path.to_string(), msg: err.to_string() }
    }
    pub fn format(file: impl std::fmt::Display, msg: impl Into<String>) -> Self {
        Error::Format { file: file.to_string(), msg: msg.into() }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}

/// `bail!(Error::shape(...))`-style early return, kept tiny on purpose.
#[macro_export]
macro_rules! shape_err {
    ($op:expr, $($arg:tt)*) => {
        return Err($crate::Error::shape($op, format!($($arg)*)))
    };
}
