//! Error types of every area and the exit-code table that turns them into a process status.

use std::path::PathBuf;
use std::process::ExitCode;

use thiserror::Error;

use crate::config::ConfigError;
use crate::ssh::SshError;

/// The process exit codes, one per kind of outcome. The README documents this table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The push or rollback finished and the new release is live and healthy.
    Success = 0,
    /// `check` found a missing prerequisite, or an error that fits no other row.
    Failure = 1,
    /// Invalid arguments or an invalid hosts.toml. Nothing was contacted.
    Usage = 2,
    /// The host could not be reached, or authentication failed.
    Connection = 3,
    /// The host offered a key that is unknown or differs from the pinned one.
    HostKey = 4,
    /// Another deploy holds the lock on this host path.
    Locked = 5,
    /// A remote step failed before the switch: `current` and the service are untouched.
    StepFailed = 6,
    /// The new release failed its health gate and the previous one is live again.
    RolledBack = 7,
    /// The new release is live but a housekeeping step (pruning) failed.
    Housekeeping = 8,
    /// The new release failed after the switch and going back failed too.
    RollbackFailed = 9,
    /// Interrupted by Ctrl-C or SIGTERM before the switch; nothing changed.
    Interrupted = 130,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

/// Everything that can stop a crucible command.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),

    #[error(transparent)]
    Ssh(#[from] SshError),

    #[error("failed to read the app directory {path}: {source}")]
    Archive {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{0}")]
    Usage(String),

    #[error("deploy lock on {host}:{path} is held by {holder}; {advice}")]
    Locked {
        host: String,
        path: String,
        holder: String,
        /// What to do next, which depends on whether --lock-wait was given.
        advice: String,
    },

    #[error("step `{step}` failed: {message}")]
    StepFailed { step: String, message: String },

    #[error("release {release} failed its health check; rolled back to {previous}")]
    RolledBack { release: String, previous: String },

    #[error("release {release} failed after the switch, and no healthy release is live: {message}")]
    RollbackFailed { release: String, message: String },

    #[error("release {release} is live, but housekeeping failed: {message}")]
    Housekeeping { release: String, message: String },

    #[error("interrupted before the switch; `current` and the service are unchanged")]
    Interrupted,

    #[error("{failed} of {total} checks failed")]
    CheckFailed { failed: usize, total: usize },

    #[error("failed to write {path}: {source}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Returns the exit code for this error, as the README's table lists it.
    pub fn exit(&self) -> Exit {
        match self {
            Error::Config(_) | Error::Usage(_) => Exit::Usage,
            Error::Ssh(error) if error.is_host_key_rejection() => Exit::HostKey,
            Error::Ssh(error) if error.is_connection_failure() => Exit::Connection,
            Error::Ssh(_) => Exit::StepFailed,
            Error::Archive { .. } => Exit::StepFailed,
            Error::Locked { .. } => Exit::Locked,
            Error::StepFailed { .. } => Exit::StepFailed,
            Error::RolledBack { .. } => Exit::RolledBack,
            Error::RollbackFailed { .. } => Exit::RollbackFailed,
            Error::Housekeeping { .. } => Exit::Housekeeping,
            Error::Interrupted => Exit::Interrupted,
            Error::CheckFailed { .. } | Error::WriteFile { .. } => Exit::Failure,
        }
    }
}
