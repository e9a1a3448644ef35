//! The CLI's error type and exit codes: 0 ok, 1 operation failed, 2 usage error.

use std::fmt;

#[derive(Debug)]
pub enum Fail {
    /// Bad arguments or a missing setting: exit 2.
    Usage(String),
    /// The operation was refused or failed (validation, I/O, server said no): exit 1.
    Failed(String),
}

impl Fail {
    pub fn code(&self) -> i32 {
        match self {
            Fail::Usage(_) => 2,
            Fail::Failed(_) => 1,
        }
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fail::Usage(m) | Fail::Failed(m) => f.write_str(m),
        }
    }
}

pub type Result<T> = std::result::Result<T, Fail>;

pub fn usage(msg: impl Into<String>) -> Fail {
    Fail::Usage(msg.into())
}

pub fn failed(msg: impl Into<String>) -> Fail {
    Fail::Failed(msg.into())
}
