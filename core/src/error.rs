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
    /// A tensor on a device the code at hand cannot read (a CPU kernel given a GPU tensor).
    #[error("{op}: {msg}")]
    Device { op: &'static str, msg: String },
    /// A value an op cannot take that is not a shape: a step of 0, a τ that is not positive.
    #[error("{op}: {msg}")]
    Argument { op: &'static str, msg: String },
    /// An id outside its range: a token id or target that is not an integer in [0, vocab).
    #[error("{op}: {msg}")]
    Index { op: &'static str, msg: String },
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
    pub fn device(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Device { op, msg: msg.into() }
    }
    pub fn argument(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Argument { op, msg: msg.into() }
    }
    pub fn index(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Index { op, msg: msg.into() }
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
