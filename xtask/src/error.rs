//! The error type shared by every xtask command and the QEMU test harness.

use std::fmt;
use std::time::Duration;

use crate::exit::QemuExit;

/// Everything that can make an xtask command or a harness call fail.
#[derive(Debug)]
pub enum Error {
    /// The command line given to `cargo xtask` was not understood.
    Usage(String),
    /// An operating-system call failed.
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A host tool is missing or too old and could not be installed.
    Tools(String),
    /// A disk image could not be built.
    Image(String),
    /// A child command (cargo, apt-get, ...) exited unsuccessfully.
    CommandFailed {
        /// The command line, for the user to re-run.
        command: String,
        /// How it ended.
        status: std::process::ExitStatus,
    },
    /// `cargo build` finished but did not report the expected executable.
    Build {
        /// The app package.
        app: String,
        /// What was wrong.
        detail: String,
    },
    /// A wait on a running QEMU ran out of time.
    Timeout {
        /// What was awaited.
        waiting_for: String,
        /// How long we waited.
        after: Duration,
        /// The last serial lines and QEMU's stderr, for diagnosis.
        context: String,
    },
    /// QEMU ended while we were waiting for something else, or ended without a guest exit code.
    QemuExited {
        /// What was awaited.
        waiting_for: String,
        /// How QEMU ended.
        exit: QemuExit,
        /// The last serial lines and QEMU's stderr, for diagnosis.
        context: String,
    },
    /// The host cannot run what was asked (no SVM in the nested L1, a KVM module refused,
    /// the OpenVMM build failed): not a failure of the guest, which never ran.
    Environment(String),
    /// QEMU answered a QMP command with an error.
    Qmp {
        /// The command that failed.
        command: String,
        /// QMP error class, e.g. `GenericError`.
        class: String,
        /// QMP error description.
        description: String,
    },
    /// The QMP peer sent something that is not valid QMP.
    QmpProtocol(String),
}

impl Error {
    /// Wraps an I/O error with what we were doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(message) => write!(f, "{message}"),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
            Error::Tools(message) => write!(f, "{message}"),
            Error::Image(message) => write!(f, "disk image: {message}"),
            Error::CommandFailed { command, status } => {
                write!(f, "command failed ({status}): {command}")
            }
            Error::Build { app, detail } => write!(f, "building app `{app}`: {detail}"),
            Error::Timeout {
                waiting_for,
                after,
                context,
            } => write!(
                f,
                "timed out after {:.1} s waiting for {waiting_for}\n{context}",
                after.as_secs_f64()
            ),
            Error::QemuExited {
                waiting_for,
                exit,
                context,
            } => write!(f, "{exit} while waiting for {waiting_for}\n{context}"),
            Error::Environment(reason) => {
                write!(f, "environment failure (not the guest's): {reason}")
            }
            Error::Qmp {
                command,
                class,
                description,
            } => write!(f, "QMP command `{command}` failed: {class}: {description}"),
            Error::QmpProtocol(message) => write!(f, "QMP protocol error: {message}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
