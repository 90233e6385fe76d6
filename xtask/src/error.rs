//! The error type shared by every xtask command and the QEMU test harness.

use std::time::Duration;

use thiserror::Error;

use crate::exit::QemuExit;

/// Everything that can make an xtask command or a harness call fail.
#[derive(Debug, Error)]
pub enum Error {
    /// The command line given to `cargo xtask` was not understood.
    #[error("{0}")]
    Usage(String),
    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A host tool is missing or too old and could not be installed.
    #[error("{0}")]
    Tools(String),
    /// A disk image could not be built.
    #[error("disk image: {0}")]
    Image(String),
    /// A child command (cargo, apt-get, ...) exited unsuccessfully.
    #[error("command failed ({status}): {command}")]
    CommandFailed {
        /// The command line, for the user to re-run.
        command: String,
        /// How it ended.
        status: std::process::ExitStatus,
    },
    /// `cargo build` finished but did not report the expected executable.
    #[error("building app `{app}`: {detail}")]
    Build {
        /// The app package.
        app: String,
        /// What was wrong.
        detail: String,
    },
    /// A wait on a running QEMU ran out of time.
    #[error("timed out after {:.1} s waiting for {waiting_for}\n{context}", .after.as_secs_f64())]
    Timeout {
        /// What was awaited.
        waiting_for: String,
        /// How long we waited.
        after: Duration,
        /// The last serial lines and QEMU's stderr, for diagnosis.
        context: String,
    },
    /// QEMU ended while we were waiting for something else, or ended without a guest exit code.
    #[error("{exit} while waiting for {waiting_for}\n{context}")]
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
    #[error("environment failure (not the guest's): {0}")]
    Environment(String),
    /// QEMU answered a QMP command with an error.
    #[error("QMP command `{command}` failed: {class}: {description}")]
    Qmp {
        /// The command that failed.
        command: String,
        /// QMP error class, e.g. `GenericError`.
        class: String,
        /// QMP error description.
        description: String,
    },
    /// The QMP peer sent something that is not valid QMP.
    #[error("QMP protocol error: {0}")]
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

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn messages_carry_their_context() {
        let cases = [
            (
                Error::Usage("unknown command `x`".into()),
                "unknown command `x`",
            ),
            (
                Error::io(
                    "reading image",
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
                ),
                "reading image: no such file",
            ),
            (Error::Tools("qemu too old".into()), "qemu too old"),
            (Error::Image("no space".into()), "disk image: no space"),
            (
                Error::CommandFailed {
                    command: "cargo build".into(),
                    status: std::process::ExitStatus::from_raw(256),
                },
                "command failed (exit status: 1): cargo build",
            ),
            (
                Error::Build {
                    app: "hello".into(),
                    detail: "no executable".into(),
                },
                "building app `hello`: no executable",
            ),
            (
                Error::Timeout {
                    waiting_for: "login".into(),
                    after: Duration::from_millis(1500),
                    context: "last lines".into(),
                },
                "timed out after 1.5 s waiting for login\nlast lines",
            ),
            (
                Error::QemuExited {
                    waiting_for: "login".into(),
                    exit: QemuExit::Signal(9),
                    context: "last lines".into(),
                },
                "QEMU was killed by signal 9 while waiting for login\nlast lines",
            ),
            (
                Error::Environment("no SVM".into()),
                "environment failure (not the guest's): no SVM",
            ),
            (
                Error::Qmp {
                    command: "quit".into(),
                    class: "GenericError".into(),
                    description: "nope".into(),
                },
                "QMP command `quit` failed: GenericError: nope",
            ),
            (
                Error::QmpProtocol("not JSON".into()),
                "QMP protocol error: not JSON",
            ),
        ];
        for (error, message) in cases {
            assert_eq!(error.to_string(), message);
            assert_eq!(error.source().is_some(), matches!(error, Error::Io { .. }));
        }
    }
}
