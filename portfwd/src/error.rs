//! The library's one error type, and the one place where a failure becomes
//! an exit status (CLI) or a CNI error code.
//!
//! Errors travel as `anyhow::Error` chains, whose context says what was
//! being done; an [`Error`] anywhere in the chain marks bad input (a usage
//! error: nothing was changed), anything else is a runtime failure.

use thiserror::Error as ThisError;

/// Bad input, found before anything changed.
#[derive(Debug, Clone, PartialEq, Eq, ThisError)]
pub enum Error {
    /// An argument, option or file that makes no sense.
    #[error("{0}")]
    Usage(String),
    /// A `-p` publication that does not parse.
    #[error("invalid publish {input:?}: {message}")]
    Publish { input: String, message: String },
    /// A protocol or a port (range) that does not parse; the message starts
    /// with what it is about ("port ...", "protocol ...").
    #[error("{0}")]
    Parse(String),
}

impl Error {
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Error::Usage(message.into())
    }

    pub(crate) fn parse(message: impl Into<String>) -> Self {
        Error::Parse(message.into())
    }
}

/// Well-known CNI error codes, and ours (100 and up).
pub(crate) mod cni_code {
    pub(crate) const INCOMPATIBLE_VERSION: u32 = 1;
    pub(crate) const INVALID_ENVIRONMENT: u32 = 4;
    pub(crate) const IO_FAILURE: u32 = 5;
    pub(crate) const DECODING_FAILURE: u32 = 6;
    pub(crate) const INVALID_CONFIG: u32 = 7;
    /// Publishing or removing mappings failed (e.g. the host port is
    /// already published by another container).
    pub(crate) const PUBLISH_FAILED: u32 = 100;
    /// portfwd was not up and could not be brought up.
    pub(crate) const UP_FAILED: u32 = 101;
    /// CHECK: the attachment's mappings are not what they should be.
    pub(crate) const CHECK_FAILED: u32 = 102;
}

/// Whether the chain holds a usage error.
fn is_usage(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| cause.is::<Error>())
}

/// The CLI's exit status: 2 for usage errors, 1 for everything else.
pub(crate) fn exit_status(error: &anyhow::Error) -> u8 {
    if is_usage(error) { 2 } else { 1 }
}

/// The CNI error code: usage errors are configuration errors, everything
/// else is `runtime_code`.
pub(crate) fn cni_code_of(error: &anyhow::Error, runtime_code: u32) -> u32 {
    if is_usage(error) {
        cni_code::INVALID_CONFIG
    } else {
        runtime_code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_anywhere_in_the_chain_decide() {
        let usage = anyhow::Error::new(Error::usage("bad")).context("doing x");
        assert_eq!(exit_status(&usage), 2);
        assert_eq!(cni_code_of(&usage, 100), cni_code::INVALID_CONFIG);
        let runtime = anyhow::anyhow!("disk on fire").context("doing x");
        assert_eq!(exit_status(&runtime), 1);
        assert_eq!(cni_code_of(&runtime, 100), 100);
    }
}
